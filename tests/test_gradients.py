"""Per-task gradients at theta0: accumulation, target gather, sketching, resume and sharding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from merit_jax.conflict.gradients import (
    GradientEngine,
    GradientSettings,
    GradientStore,
    TaskGradient,
    TaskInput,
    calibration_batches,
    compute_gradients,
    max_targets_per_row,
    response_loss,
    split_trainable,
    state_sha256,
    target_capacity,
)
from merit_jax.conflict.sketch import SketchConfig, count_sketch, flatten_exact
from merit_jax.data.batching import pad_rows
from merit_jax.data.format import TokenizedExample
from merit_jax.models.config import ModelConfig
from merit_jax.models.decoder import Decoder
from merit_jax.models.loss import masked_lm_loss

VOCAB = 67


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(
        model_type="llama",
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=4,
        tie_word_embeddings=True,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def tiny_model(seed: int = 0, **overrides) -> Decoder:
    return Decoder(tiny_config(**overrides), rngs=nnx.Rngs(seed))


def random_examples(count: int, *, seed: int, low: int = 4, high: int = 13):
    """Examples of odd lengths whose last third (at least one token) is the response."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(count):
        length = int(rng.integers(low, high + 1))
        tokens = rng.integers(1, VOCAB, size=length)
        mask = np.zeros(length, dtype=bool)
        mask[length - max(1, length // 3) :] = True
        examples.append(TokenizedExample(tokens=tokens, loss_mask=mask))
    return examples


def settings(**overrides) -> GradientSettings:
    fields = dict(
        calibration_size=8,
        trainable=(".*",),
        sketch=SketchConfig(dim=None),
        micro_batch_size=2,
        seq_len=24,
        packing=True,
        compute_dtype="float32",
    )
    fields.update(overrides)
    return GradientSettings(**fields)


def direct_gradient(model, examples, trainable=(".*",)) -> np.ndarray:
    """jax.grad of masked_lm_loss on one padded batch with every example in its own row."""
    seq_len = max(example.length for example in examples)
    batch = pad_rows(examples, seq_len=seq_len, pad_id=0)
    graphdef, params, frozen = split_trainable(model, trainable)

    def loss_fn(params):
        merged = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, frozen))
        loss, _ = masked_lm_loss(
            merged,
            jnp.asarray(batch.tokens),
            jnp.asarray(batch.loss_mask),
            segment_ids_bt=jnp.asarray(batch.segment_ids),
            positions_bt=jnp.asarray(batch.positions),
        )
        return loss

    return np.asarray(flatten_exact(jax.grad(loss_fn)(params)))


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("capacity", [None, "fit"])
def test_accumulation_equals_full_batch_gradient(packing, capacity):
    model = tiny_model()
    examples = random_examples(9, seed=1)
    config = settings(packing=packing)
    batches = calibration_batches(
        examples, micro_batch_size=2, seq_len=24, pad_id=0, packing=packing
    )
    assert len(batches) >= 2  # several micro-batches, the last one partly padding
    size = target_capacity(batches, 24, multiple=4) if capacity == "fit" else None
    result = GradientEngine(model, config, capacity=size).task_gradient(batches)
    expected = direct_gradient(model, examples)
    np.testing.assert_allclose(result.vector, expected, rtol=1e-5, atol=1e-6)
    assert result.num_examples == 9
    assert result.num_targets == sum(example.num_targets for example in examples)


def test_response_loss_with_capacity_equals_masked_loss():
    model = tiny_model(seed=3)
    examples = random_examples(7, seed=4)
    batch = calibration_batches(examples, micro_batch_size=3, seq_len=30, pad_id=0, packing=True)[0]
    arrays = {name: jnp.asarray(value) for name, value in batch.as_dict().items()}
    capacity = max_targets_per_row([batch])
    graphdef, params, frozen = split_trainable(model, (".*",))

    def loss(params, capacity):
        merged = nnx.merge(graphdef, params, frozen)
        return response_loss(
            merged,
            arrays["tokens"],
            arrays["loss_mask"],
            arrays["segment_ids"],
            arrays["positions"],
            capacity=capacity,
        )

    full, count_full = loss(params, None)
    gathered, count_gathered = loss(params, capacity)
    assert int(count_full) == int(count_gathered) == batch.num_targets
    np.testing.assert_allclose(float(gathered), float(full), rtol=1e-6)
    grad_full = flatten_exact(jax.grad(lambda p: loss(p, None)[0])(params))
    grad_gathered = flatten_exact(jax.grad(lambda p: loss(p, capacity)[0])(params))
    np.testing.assert_allclose(np.asarray(grad_gathered), np.asarray(grad_full), atol=1e-6)


def test_capacity_too_small_raises():
    model = tiny_model()
    batches = calibration_batches(
        random_examples(4, seed=2), micro_batch_size=2, seq_len=24, pad_id=0, packing=True
    )
    engine = GradientEngine(model, settings(), capacity=1)
    with pytest.raises(ValueError, match="more than the target capacity 1"):
        engine.task_gradient(batches)


def test_target_capacity_rounds_up_and_caps():
    batches = calibration_batches(
        random_examples(6, seed=5), micro_batch_size=1, seq_len=40, pad_id=0, packing=True
    )
    needed = max_targets_per_row(batches)
    assert target_capacity(batches, 40, multiple=8) == min(39, -(-needed // 8) * 8)
    assert target_capacity(batches, 6, multiple=32) == 5


def test_sketch_inside_jit_equals_sketch_of_exact_gradient():
    model = tiny_model(seed=7)
    examples = random_examples(6, seed=8)
    batches = calibration_batches(examples, micro_batch_size=2, seq_len=24, pad_id=0, packing=True)
    sketch = SketchConfig(dim=97, seed=11)
    sketched = GradientEngine(model, settings(sketch=sketch)).task_gradient(batches)
    engine = GradientEngine(model, settings())
    grad_tree, _, _ = engine.accumulate(batches)
    expected = count_sketch(grad_tree, dim=97, seed=11)
    assert sketched.vector.shape == (97,)
    np.testing.assert_allclose(sketched.vector, np.asarray(expected), rtol=1e-5, atol=1e-6)


def test_trainable_patterns_select_parameters():
    model = tiny_model()
    examples = random_examples(4, seed=9)
    batches = calibration_batches(examples, micro_batch_size=2, seq_len=24, pad_id=0, packing=True)
    patterns = ("layers/mlp/", "final_norm")
    engine = GradientEngine(model, settings(trainable=patterns))
    config = model.config
    expected_size = (
        config.num_hidden_layers * 3 * config.hidden_size * config.intermediate_size
        + config.hidden_size
    )
    assert engine.num_parameters == expected_size
    result = engine.task_gradient(batches)
    np.testing.assert_allclose(
        result.vector, direct_gradient(model, examples, patterns), rtol=1e-5, atol=1e-6
    )


def test_trainable_without_match_lists_paths():
    with pytest.raises(ValueError) as error:
        split_trainable(tiny_model(), ("decoder/q_proj",))
    message = str(error.value)
    assert "matches no parameter" in message
    assert "layers/attn/q_kernel" in message


def test_wrong_batch_shape_raises():
    model = tiny_model()
    batches = calibration_batches(
        random_examples(3, seed=1), micro_batch_size=1, seq_len=24, pad_id=0, packing=True
    )
    with pytest.raises(ValueError, match=r"expected \(2, 24\)"):
        GradientEngine(model, settings()).task_gradient(batches)


def test_gradient_matches_pytorch(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from merit_jax.models.pretrained import load_pretrained
    from merit_jax.models.weights import hf_from_decoder

    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_theta=1e4,
    )
    torch_model = transformers.LlamaForCausalLM(hf_config).float()
    with torch.no_grad():
        for param in torch_model.parameters():
            param.copy_(0.2 * torch.randn_like(param))
    torch_model.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path, with_tokenizer=False).model

    examples = random_examples(5, seed=12)
    total = None
    for example in examples:
        tokens = torch.tensor(example.tokens[None].astype(np.int64))
        logits = torch_model(tokens).logits[0, :-1]
        losses = torch.nn.functional.cross_entropy(logits, tokens[0, 1:], reduction="none")
        loss = (losses * torch.tensor(example.loss_mask[1:], dtype=torch.float32)).sum()
        total = loss if total is None else total + loss
    total.backward()

    batches = calibration_batches(examples, micro_batch_size=2, seq_len=32, pad_id=0, packing=True)
    engine = GradientEngine(model, settings(seq_len=32))
    grad_tree, _, _ = engine.accumulate(batches)
    graphdef, _, frozen = split_trainable(model, (".*",))
    ours = hf_from_decoder(nnx.merge(graphdef, grad_tree, frozen))
    reference = dict(torch_model.named_parameters())
    assert set(ours) <= set(reference)
    for name, value in ours.items():
        expected = reference[name].grad.numpy()
        np.testing.assert_allclose(value, expected, rtol=1e-3, atol=1e-4, err_msg=name)


# --------------------------------------------------------------------------- storage


class CountingEngine:
    """Stands in for GradientEngine and records which tasks it computed."""

    def __init__(self):
        self.calls: list[int] = []

    def task_gradient(self, batches):
        value = float(batches[0].tokens.sum())
        self.calls.append(len(self.calls))
        return TaskGradient(
            vector=np.full(4, value, np.float32),
            loss_sum=value,
            num_targets=3,
            num_examples=len(batches),
            num_tokens=10,
            num_batches=len(batches),
            seconds=0.0,
        )


def task_input(name: str, seed: int) -> TaskInput:
    batches = calibration_batches(
        random_examples(3, seed=seed), micro_batch_size=1, seq_len=24, pad_id=0, packing=True
    )
    return TaskInput(name, tuple(batches))


def test_resume_skips_finished_tasks(tmp_path):
    store = GradientStore(tmp_path)
    tasks = [task_input("gem/e2e", 1), task_input("arith/add", 2)]
    first = CountingEngine()
    results = compute_gradients(first, tasks[:1], store=store, key="k", progress=False)
    assert len(first.calls) == 1
    second = CountingEngine()
    again = compute_gradients(second, tasks, store=store, key="k", progress=False)
    assert len(second.calls) == 1  # only arith/add
    np.testing.assert_array_equal(again[0].vector, results[0].vector)
    assert again[0].loss_sum == results[0].loss_sum
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "arith%2Fadd.json",
        "arith%2Fadd.npy",
        "gem%2Fe2e.json",
        "gem%2Fe2e.npy",
    ]


def test_resume_recomputes_after_settings_or_data_change(tmp_path):
    store = GradientStore(tmp_path)
    task = task_input("a", 1)
    compute_gradients(CountingEngine(), [task], store=store, key="k1", progress=False)
    changed_key = CountingEngine()
    compute_gradients(changed_key, [task], store=store, key="k2", progress=False)
    assert len(changed_key.calls) == 1
    changed_data = CountingEngine()
    compute_gradients(changed_data, [task_input("a", 2)], store=store, key="k2", progress=False)
    assert len(changed_data.calls) == 1
    unchanged = CountingEngine()
    compute_gradients(unchanged, [task_input("a", 2)], store=store, key="k2", progress=False)
    assert unchanged.calls == []


def test_store_ignores_metadata_without_array(tmp_path):
    store = GradientStore(tmp_path)
    task = task_input("a", 1)
    compute_gradients(CountingEngine(), [task], store=store, key="k", progress=False)
    array_path, meta_path = store.paths("a")
    array_path.unlink()
    assert store.load("a", key="k", data_sha256=task.data_sha256) is None
    meta = json.loads(meta_path.read_text())
    assert meta["task"] == "a"


def test_settings_key_ignores_batch_shape_but_not_sketch():
    base = settings()
    assert base.key("0" * 64) == settings(micro_batch_size=4, seq_len=64).key("0" * 64)
    assert base.key("0" * 64) != settings(sketch=SketchConfig(dim=64)).key("0" * 64)
    assert base.key("0" * 64) != base.key("1" * 64)


def test_state_sha256_changes_with_weights():
    first = state_sha256(nnx.state(tiny_model(seed=0)))
    assert first == state_sha256(nnx.state(tiny_model(seed=0)))
    assert first != state_sha256(nnx.state(tiny_model(seed=1)))


# --------------------------------------------------------------------------- devices

_TWO_DEVICE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax
    import numpy as np
    from flax import nnx
    sys.path.insert(0, {tests!r})
    from test_gradients import random_examples, settings, tiny_model
    from merit_jax.conflict.gradients import GradientEngine, calibration_batches
    from merit_jax.conflict.sketch import SketchConfig

    assert jax.local_device_count() == 2, jax.devices()
    examples = random_examples(9, seed=1)
    batches = calibration_batches(
        examples, micro_batch_size=2, seq_len=24, pad_id=0, packing=True
    )
    engine = GradientEngine(tiny_model(), settings(sketch=SketchConfig(dim=64, seed=3)))
    vector = engine.task_gradient(batches).vector
    try:
        GradientEngine(tiny_model(), settings(micro_batch_size=3))
        odd = "accepted"
    except ValueError as error:
        odd = str(error)
    print(json.dumps({{"vector": vector.tolist(), "odd": odd}}))
    """
)


def test_two_devices_match_one_device():
    script = _TWO_DEVICE_SCRIPT.format(tests=os.path.dirname(__file__))
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    output = json.loads(completed.stdout.strip().splitlines()[-1])
    assert "multiple of the 2 local devices" in output["odd"]

    examples = random_examples(9, seed=1)
    batches = calibration_batches(examples, micro_batch_size=2, seq_len=24, pad_id=0, packing=True)
    engine = GradientEngine(tiny_model(), settings(sketch=SketchConfig(dim=64, seed=3)))
    expected = engine.task_gradient(batches).vector
    np.testing.assert_allclose(np.array(output["vector"]), expected, rtol=1e-5, atol=1e-6)
