"""The jitted branch step: exact micro-batch accumulation, AdamW against numpy, overfitting."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from merit_jax.data.batching import packed_batch
from merit_jax.data.format import TokenizedExample
from merit_jax.models.decoder import init_decoder
from merit_jax.models.loss import masked_lm_loss
from merit_jax.train.config import TrainConfig
from merit_jax.train.loop import BranchSpec, train_branches
from merit_jax.train.mesh import carve_submeshes
from merit_jax.train.step import (
    compile_branch_step,
    decay_mask,
    init_state,
    place_batch,
    split_params,
)
from merit_jax.train.testing import random_task, tiny_model_config

SEQ_LEN = 12
LR = 1e-3
WEIGHT_DECAY = 0.1
CLIP = 0.1
EPS = 1e-3  # large enough that Adam's first update is smooth in the gradient


def uneven_batch() -> dict[str, np.ndarray]:
    """Eight rows whose target counts differ a lot, two of them without any target."""
    rng = np.random.default_rng(3)

    def example(length: int, targets: int) -> TokenizedExample:
        mask = np.zeros(length, dtype=bool)
        mask[length - targets :] = True
        return TokenizedExample(tokens=rng.integers(1, 61, size=length), loss_mask=mask)

    rows = [
        [example(12, 11)],
        [example(5, 1)],
        [example(6, 2), example(6, 5)],
        [example(3, 1)],
        [],
        [example(12, 10)],
        [],
        [example(4, 2)],
    ]
    return packed_batch(rows, seq_len=SEQ_LEN, pad_id=0, batch_size=8).as_dict()


def step_config(micro_batches: int) -> TrainConfig:
    return TrainConfig(
        learning_rate=LR,
        warmup_steps=0,
        weight_decay=WEIGHT_DECAY,
        clip_norm=CLIP,
        adam_eps=EPS,
        batch_size=8,
        micro_batches=micro_batches,
        seq_len=SEQ_LEN,
    )


@functools.cache
def compiled_step(micro_batches: int):
    """Return (compiled branch step, host parameters); cached because compiling takes seconds."""
    model = init_decoder(tiny_model_config(), seed=1)
    graphdef, params = split_params(model)
    host = jax.tree.map(np.asarray, params)
    mesh = carve_submeshes(1, jax.devices()[:1])[0].mesh
    return compile_branch_step(graphdef, host, mesh, step_config(micro_batches), 10), host


def run_one_step(micro_batches: int, batch: dict[str, np.ndarray]):
    branch_step, host = compiled_step(micro_batches)
    state = init_state(branch_step, host, seed=0)
    state, metrics = branch_step(state, place_batch(branch_step, batch))
    return host, jax.device_get(state.params), jax.device_get(metrics)


def reference_loss_and_grads(host_params, batch):
    """Full-batch mean loss and its gradient, without micro-batches or the step code."""
    graphdef, _ = split_params(init_decoder(tiny_model_config(), seed=1))

    def mean_loss(params):
        model = nnx.merge(graphdef, params)
        total, count = masked_lm_loss(
            model,
            jnp.asarray(batch["tokens"]),
            jnp.asarray(batch["loss_mask"]),
            segment_ids_bt=jnp.asarray(batch["segment_ids"]),
            positions_bt=jnp.asarray(batch["positions"]),
        )
        return total / count

    loss, grads = jax.value_and_grad(mean_loss)(host_params)
    return float(loss), jax.tree.map(np.asarray, grads)


def numpy_adamw_first_step(params, grads):
    """One AdamW step from zero moments, after global-norm clipping, in float64 numpy."""
    leaves = jax.tree.leaves(grads)
    norm = np.sqrt(sum(np.sum(np.square(g.astype(np.float64))) for g in leaves))
    scale = min(1.0, CLIP / norm)
    mask = decay_mask(params)

    def update(p, g, decays):
        g = g.astype(np.float64) * scale
        m_hat = (1 - 0.9) * g / (1 - 0.9)
        v_hat = (1 - 0.999) * g * g / (1 - 0.999)
        step = m_hat / (np.sqrt(v_hat) + EPS)
        if decays:
            step = step + WEIGHT_DECAY * p
        return p - LR * step

    return jax.tree.map(update, params, grads, mask), norm


def test_accumulation_matches_full_batch():
    batch = uneven_batch()
    _, params_full, metrics_full = run_one_step(1, batch)
    _, params_micro, metrics_micro = run_one_step(4, batch)

    assert (
        metrics_full["targets"]
        == metrics_micro["targets"]
        == int((batch["loss_mask"] & (batch["segment_ids"] != 0)).sum())
    )
    np.testing.assert_allclose(metrics_micro["loss"], metrics_full["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics_micro["grad_norm"], metrics_full["grad_norm"], rtol=1e-5)
    for full, micro in zip(
        jax.tree.leaves(params_full), jax.tree.leaves(params_micro), strict=True
    ):
        np.testing.assert_allclose(micro, full, atol=1e-7, rtol=0)


def test_accumulated_loss_is_sum_over_count():
    batch = uneven_batch()
    host, _, metrics = run_one_step(4, batch)
    loss, _ = reference_loss_and_grads(host, batch)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)

    # The mean of the micro-batch means weighs targets unequally; it must differ,
    # or this batch could not tell the two conventions apart.
    graphdef, _ = split_params(init_decoder(tiny_model_config(), seed=1))
    model = nnx.merge(graphdef, host)
    means = []
    for part in range(4):
        rows = slice(2 * part, 2 * part + 2)
        total, count = masked_lm_loss(
            model,
            jnp.asarray(batch["tokens"][rows]),
            jnp.asarray(batch["loss_mask"][rows]),
            segment_ids_bt=jnp.asarray(batch["segment_ids"][rows]),
            positions_bt=jnp.asarray(batch["positions"][rows]),
        )
        means.append(float(total) / max(int(count), 1))
    assert abs(np.mean(means) - loss) > 1e-3


def test_step_matches_numpy_adamw():
    batch = uneven_batch()
    host, params_after, metrics = run_one_step(4, batch)
    _, grads = reference_loss_and_grads(host, batch)
    expected, norm = numpy_adamw_first_step(host, grads)

    np.testing.assert_allclose(metrics["grad_norm"], norm, rtol=1e-5)
    assert norm > CLIP  # clipping is active in this case
    np.testing.assert_allclose(metrics["learning_rate"], LR, rtol=1e-6)
    for path, want in jax.tree_util.tree_leaves_with_path(expected):
        got = params_after
        for key in path:
            got = got[key.key]
        np.testing.assert_allclose(got, want, atol=2e-7, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_norm_scales_get_no_weight_decay():
    mask = decay_mask(split_params(init_decoder(tiny_model_config(attention_bias=True)))[1])
    assert mask["embed"] is True
    assert mask["layers"]["attn"]["q_kernel"] is True
    assert mask["layers"]["attn"]["q_bias"] is False
    assert mask["layers"]["attn_norm"]["scale"] is False
    assert mask["final_norm"]["scale"] is False


def test_batch_of_wrong_shape_raises():
    branch_step, _ = compiled_step(1)
    batch = uneven_batch()
    batch["tokens"] = batch["tokens"][:4]
    with pytest.raises(ValueError, match=r"batch tokens has shape \(4, 12\)"):
        place_batch(branch_step, batch)


def test_loss_decreases_on_tiny_overfit_task(tmp_path):
    task = random_task("memorize", 4, seed=5, min_length=8, max_length=12)
    spec = BranchSpec(index=0, tasks=(task,), budgets={"memorize": 40 * 40}, pad_id=0)
    config = TrainConfig(
        learning_rate=1e-2,
        warmup_steps=2,
        schedule="constant",
        batch_size=4,
        seq_len=SEQ_LEN,
        packing=False,
        checkpoint_every=0,
        max_steps=40,
    )
    (result,) = train_branches(
        [spec], init_decoder(tiny_model_config(), seed=2), tmp_path, config, progress=False
    )
    assert result.finished
    assert result.steps == 40
    records = [
        json.loads(line) for line in (result.directory / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records] == list(range(1, 41))
    first = np.mean([r["loss"] for r in records[:3]])
    last = np.mean([r["loss"] for r in records[-3:]])
    assert first > 3.5  # about log(61) at initialization
    assert last < 0.5 * first
