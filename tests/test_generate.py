"""KV-cache generation against naive full-recompute decoding and transformers' generate."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from merit_jax.models.config import ModelConfig
from merit_jax.models.decoder import init_decoder
from merit_jax.models.generate import generate, generate_text, left_pad, nucleus_logits


def _tiny_config(**overrides) -> ModelConfig:
    fields = dict(
        model_type="llama",
        vocab_size=53,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=4,
        tie_word_embeddings=False,
        rope_theta=1e4,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def _peaked_model(config: ModelConfig, seed: int):
    """A random decoder with logits far apart, so argmax ties cannot decide a test."""
    model = init_decoder(config, seed=seed)
    if config.tie_word_embeddings:
        model.embed[...] = model.embed[...] * 40
    else:
        model.lm_head[...] = model.lm_head[...] * 40
    return model


def _naive_greedy(model, prompt: list[int], max_new_tokens: int, eos: set[int]) -> list[int]:
    """Recompute the whole forward pass without a cache at every step and take the argmax.

    The sequence is right-padded to one fixed width, so the forward compiles once.
    Causal attention keeps the padding after the last real token from changing
    its logits.
    """
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])
    width = len(prompt) + max_new_tokens
    tokens = list(prompt)
    new: list[int] = []
    for _ in range(max_new_tokens):
        padded = tokens + [0] * (width - len(tokens))
        logits = forward(state, jnp.asarray([padded], jnp.int32))
        token = int(np.argmax(np.asarray(logits[0, len(tokens) - 1])))
        new.append(token)
        tokens.append(token)
        if token in eos:
            break
    return new


PROMPTS = [[5, 9, 2, 41, 7], [33], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [12, 12, 12]]


@pytest.mark.parametrize("scan_layers", [True, False])
def test_greedy_matches_naive_recompute(scan_layers):
    config = _tiny_config(scan_layers=scan_layers)
    model = _peaked_model(config, seed=0)
    for prompt in PROMPTS[:3]:
        got = generate(model, [prompt], max_new_tokens=8, eos_ids=[])
        expected = _naive_greedy(model, prompt, 8, eos=set())
        assert got == [expected]


def test_batched_left_padded_matches_single():
    config = _tiny_config(tie_word_embeddings=True)
    model = _peaked_model(config, seed=1)
    batched = generate(model, PROMPTS, max_new_tokens=7, eos_ids=[], pad_id=3)
    singles = [generate(model, [p], max_new_tokens=7, eos_ids=[])[0] for p in PROMPTS]
    assert batched == singles
    assert all(len(row) == 7 for row in batched)


def test_stops_at_eos_per_row():
    config = _tiny_config()
    model = _peaked_model(config, seed=2)
    free = generate(model, PROMPTS, max_new_tokens=6, eos_ids=[])
    # Make the third generated token of row 0 an eos id: that row stops there, the
    # others stop at their own first occurrence of it or run to max_new_tokens.
    eos_id = free[0][2]
    stopped = generate(model, PROMPTS, max_new_tokens=6, eos_ids=[eos_id])
    for free_row, stopped_row in zip(free, stopped, strict=True):
        if eos_id in free_row:
            end = free_row.index(eos_id) + 1
            assert stopped_row == free_row[:end]
        else:
            assert stopped_row == free_row
    assert stopped[0][-1] == eos_id
    assert len(stopped[0]) <= 3


def test_eos_from_config_by_default():
    config = _tiny_config()
    model = _peaked_model(config, seed=2)
    free = generate(model, [PROMPTS[0]], max_new_tokens=6, eos_ids=[])[0]
    with_config_eos = _peaked_model(config.replace(eos_token_id=[free[1], 50]), seed=2)
    got = generate(with_config_eos, [PROMPTS[0]], max_new_tokens=6)[0]
    assert got == free[: free.index(free[1]) + 1]


def test_tiny_top_p_equals_greedy():
    config = _tiny_config()
    model = _peaked_model(config, seed=3)
    greedy = generate(model, PROMPTS, max_new_tokens=6, eos_ids=[])
    for seed in (0, 1, 2):
        sampled = generate(
            model, PROMPTS, max_new_tokens=6, temperature=1.5, top_p=1e-6, seed=seed, eos_ids=[]
        )
        assert sampled == greedy


def test_sampling_depends_on_seed_only():
    config = _tiny_config()
    model = init_decoder(config, seed=4)  # unscaled: a flat distribution, so seeds differ
    first = generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, seed=7, eos_ids=[])
    again = generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, seed=7, eos_ids=[])
    other = generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, seed=8, eos_ids=[])
    assert first == again
    assert first != other


def test_sampling_frequencies_follow_softmax():
    # One-step generation from a fixed distribution, many rows: frequencies of the
    # sampled first tokens must match softmax(logits / T) within sampling error.
    config = _tiny_config(
        vocab_size=5,
        hidden_size=8,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
        intermediate_size=8,
    )
    model = init_decoder(config, seed=5)
    model.lm_head[...] = jax.random.normal(jax.random.key(0), (8, 5)) * 0.5
    prompt = [1, 2]
    rows = 4000
    temperature = 0.7
    got = generate(model, [prompt] * rows, max_new_tokens=1, temperature=temperature, eos_ids=[])
    frequencies = np.bincount([row[0] for row in got], minlength=5) / rows
    logits, _ = model(jnp.asarray([prompt]))
    expected = np.asarray(jax.nn.softmax(logits[0, -1] / temperature))
    tolerance = 4 * np.sqrt(0.25 / rows)  # four binomial standard deviations at most
    np.testing.assert_allclose(frequencies, expected, atol=tolerance)
    # The check can tell the temperature apart: T = 1 would be rejected.
    untempered = np.asarray(jax.nn.softmax(logits[0, -1]))
    assert np.abs(untempered - expected).max() > 2 * tolerance


def test_nucleus_keeps_smallest_top_set():
    probs = np.array([[0.5, 0.05, 0.3, 0.15]])
    logits = jnp.log(jnp.asarray(probs))
    cases = {0.4: [0], 0.5: [0], 0.51: [0, 2], 0.8: [0, 2], 0.81: [0, 2, 3], 1.0: [0, 1, 2, 3]}
    for top_p, kept in cases.items():
        out = np.asarray(nucleus_logits(logits, jnp.float32(top_p)))
        assert sorted(np.flatnonzero(np.isfinite(out[0])).tolist()) == kept, top_p
        np.testing.assert_allclose(out[0, kept], np.log(probs[0, kept]), rtol=1e-6)


def test_left_pad_layout():
    tokens, positions, segments = left_pad([[4, 5, 6], [7]], pad_id=0)
    np.testing.assert_array_equal(tokens, [[4, 5, 6], [0, 0, 7]])
    np.testing.assert_array_equal(positions, [[0, 1, 2], [0, 0, 0]])
    np.testing.assert_array_equal(segments, [[1, 1, 1], [0, 0, 1]])


def test_left_pad_rounds_width_up():
    tokens, positions, segments = left_pad([[4, 5, 6], [7]], pad_id=9, pad_multiple=4)
    np.testing.assert_array_equal(tokens, [[9, 4, 5, 6], [9, 9, 9, 7]])
    np.testing.assert_array_equal(positions, [[0, 0, 1, 2], [0, 0, 0, 0]])
    np.testing.assert_array_equal(segments, [[0, 1, 1, 1], [0, 0, 0, 1]])


def test_pad_multiple_does_not_change_tokens():
    model = _peaked_model(_tiny_config(), seed=6)
    exact = generate(model, PROMPTS, max_new_tokens=5, eos_ids=[], pad_multiple=1)
    bucketed = generate(model, PROMPTS, max_new_tokens=5, eos_ids=[], pad_multiple=32)
    assert exact == bucketed


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(prompts=[[]]), "prompts\\[0\\] is empty"),
        (dict(prompts=[[1, 99]]), "outside the vocabulary"),
        (dict(max_new_tokens=0), "max_new_tokens=0"),
        (dict(temperature=-1.0), "temperature=-1.0"),
        (dict(top_p=0.0), "top_p=0.0"),
        (dict(top_p=1.5), "top_p=1.5"),
        (dict(pad_id=53), "pad_id=53"),
        (dict(pad_multiple=0), "pad_multiple=0"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    model = init_decoder(_tiny_config(), seed=0)
    arguments = dict(prompts=[[1, 2]], max_new_tokens=2, eos_ids=[])
    arguments.update(kwargs)
    prompts = arguments.pop("prompts")
    with pytest.raises(ValueError, match=message):
        generate(model, prompts, **arguments)


def test_empty_batch_returns_empty():
    model = init_decoder(_tiny_config(), seed=0)
    assert generate(model, [], max_new_tokens=3) == []


# --------------------------------------------------------------------------- transformers


def test_matches_transformers_greedy_generate(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from merit_jax.models.pretrained import load_pretrained

    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=36,
        intermediate_size=70,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=1e4,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch_model = transformers.LlamaForCausalLM(hf_config)
    with torch.no_grad():
        for name, param in torch_model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.copy_(0.3 * torch.randn_like(param))
    torch_model = torch_model.float().eval()
    torch_model.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path, with_tokenizer=False).model

    prompts = [[1, 17, 45, 3, 88, 60], [1, 90, 4], [1, 7, 7, 7, 7, 7, 7, 7, 12]]
    max_new = 12
    # No eos stops: compare the whole 12 tokens of every row.
    got = generate(model, prompts, max_new_tokens=max_new, eos_ids=[])
    for prompt, got_row in zip(prompts, got, strict=True):
        with torch.no_grad():
            out = torch_model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=max_new,
                min_new_tokens=max_new,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        expected = out[0, len(prompt) :].tolist()
        assert got_row == expected


# --------------------------------------------------------------------------- real model


@pytest.mark.real
def test_real_model_answers_capital_of_france():
    from merit_jax import assets

    gguf_files = sorted((assets.cache_dir() / "models" / assets.SMOLLM2).glob("*.gguf"))
    if not gguf_files:
        pytest.skip(
            f"no GGUF file under {assets.cache_dir() / 'models' / assets.SMOLLM2}; "
            f"run `merit fetch {assets.SMOLLM2}` first"
        )
    reply = generate_text(assets.SMOLLM2, "What is the capital of France?", max_new_tokens=24)
    assert "Paris" in reply, reply
