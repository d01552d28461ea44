"""Token cross-entropy and the masked LM loss against numpy and PyTorch references."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from merit_jax.models.config import ModelConfig
from merit_jax.models.decoder import init_decoder
from merit_jax.models.loss import (
    chunked_lm_loss_from_hidden,
    masked_lm_loss,
    masked_lm_loss_from_logits,
    target_weights,
    token_losses,
)


def _numpy_token_losses(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return -np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def _tiny_config(**overrides) -> ModelConfig:
    fields = dict(
        model_type="llama",
        vocab_size=37,  # not a multiple of the chunk sizes used below
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


def test_token_losses_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(3, 5, 11)).astype(np.float32)
    targets = rng.integers(0, 11, size=(3, 5))
    got = np.asarray(token_losses(jnp.asarray(logits), jnp.asarray(targets)))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, _numpy_token_losses(logits, targets), rtol=1e-6, atol=1e-6)


def test_token_losses_stable_for_large_logits():
    logits = jnp.array([[[1e4, 0.0, -1e4], [-3e4, 3e4, 0.0]]], jnp.float32)
    targets = jnp.array([[0, 0]])
    got = np.asarray(token_losses(logits, targets))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, [[0.0, 6e4]], rtol=1e-6)


def test_token_losses_bfloat16_logits_in_float32():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(2, 3))
    got = token_losses(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets))
    assert got.dtype == jnp.float32
    rounded = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(got), _numpy_token_losses(rounded, targets), rtol=1e-6)


def test_token_losses_shape_mismatch_raises():
    with pytest.raises(ValueError, match="does not match targets shape"):
        token_losses(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4), jnp.int32))


def test_masked_loss_matches_torch_cross_entropy():
    rng = np.random.default_rng(2)
    b, t, v = 3, 9, 13
    logits = rng.normal(scale=2.0, size=(b, t, v)).astype(np.float32)
    tokens = rng.integers(0, v, size=(b, t))
    loss_mask = rng.random((b, t)) < 0.6
    loss_mask[:, 1] = True  # at least one counted target per row

    got_sum, got_count = masked_lm_loss_from_logits(
        jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(loss_mask)
    )

    labels = torch.tensor(tokens[:, 1:], dtype=torch.long)
    labels[~torch.tensor(loss_mask[:, 1:])] = -100  # torch's ignore_index
    expected_sum = torch.nn.functional.cross_entropy(
        torch.tensor(logits[:, :-1]).reshape(-1, v), labels.reshape(-1), reduction="sum"
    )
    assert int(got_count) == int(loss_mask[:, 1:].sum())
    assert got_count.dtype == jnp.int32
    np.testing.assert_allclose(float(got_sum), expected_sum.item(), rtol=1e-5)


def test_masked_loss_label_is_next_token():
    # Hand case: logits put all mass on one token; only the target matching it costs ~0.
    v = 4
    logits = np.full((1, 3, v), -50.0, np.float32)
    logits[0, 0, 2] = 50.0  # position 0 predicts token 2
    logits[0, 1, 3] = 50.0  # position 1 predicts token 3
    tokens = jnp.array([[0, 2, 1]])  # target of position 0 is 2 (right), of position 1 is 1 (wrong)
    first_only = jnp.array([[0, 1, 0]])
    second_only = jnp.array([[0, 0, 1]])
    loss_first, count_first = masked_lm_loss_from_logits(jnp.asarray(logits), tokens, first_only)
    loss_second, _ = masked_lm_loss_from_logits(jnp.asarray(logits), tokens, second_only)
    assert int(count_first) == 1
    assert float(loss_first) < 1e-6
    np.testing.assert_allclose(float(loss_second), 100.0, rtol=1e-5)


def test_first_mask_entry_and_segment_boundaries_ignored():
    tokens = jnp.array([[5, 6, 7, 8, 9, 1]])
    loss_mask = jnp.ones((1, 6), bool)
    segment_ids = jnp.array([[1, 1, 1, 2, 2, 0]])
    _, weights = target_weights(tokens, loss_mask, segment_ids)
    # Targets are tokens 1..5: token 3 starts segment 2, token 5 is padding.
    np.testing.assert_array_equal(np.asarray(weights), [[1.0, 1.0, 0.0, 1.0, 0.0]])
    _, weights_no_segments = target_weights(tokens, loss_mask)
    np.testing.assert_array_equal(np.asarray(weights_no_segments), [[1.0] * 5])


def test_masked_position_with_infinite_loss_gives_no_nan():
    logits = jnp.array([[[0.0, -jnp.inf], [0.0, 0.0], [0.0, 0.0]]])
    tokens = jnp.array([[0, 1, 0]])  # target 1 at position 0 has probability 0
    loss_sum, count = masked_lm_loss_from_logits(logits, tokens, jnp.array([[0, 0, 1]]))
    assert int(count) == 1
    np.testing.assert_allclose(float(loss_sum), np.log(2.0), rtol=1e-6)


def test_mask_shape_mismatch_raises():
    with pytest.raises(ValueError, match="loss_mask shape"):
        target_weights(jnp.zeros((2, 5), jnp.int32), jnp.ones((2, 4), bool))


def test_micro_batch_accumulation_is_exact():
    config = _tiny_config()
    model = init_decoder(config, seed=3)
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, size=(4, 7)))
    loss_mask = jnp.asarray(rng.random((4, 7)) < 0.5)
    graphdef, state = nnx.split(model)

    @jax.jit
    def loss_fn(state, tokens_bt, loss_mask_bt):
        return masked_lm_loss(nnx.merge(graphdef, state), tokens_bt, loss_mask_bt)

    full_sum, full_count = loss_fn(state, tokens, loss_mask)
    sums, counts = zip(
        *(loss_fn(state, tokens[i : i + 2], loss_mask[i : i + 2]) for i in (0, 2)), strict=True
    )
    assert int(sum(counts)) == int(full_count)
    np.testing.assert_allclose(float(sum(sums)), float(full_sum), rtol=1e-6)


def test_model_loss_matches_logits_path():
    config = _tiny_config(tie_word_embeddings=False)
    model = init_decoder(config, seed=6)
    rng = np.random.default_rng(6)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, size=(2, 8)))
    loss_mask = jnp.asarray(rng.random((2, 8)) < 0.7)
    segment_ids = jnp.array([[1] * 3 + [2] * 5, [1] * 6 + [0] * 2])
    logits, _ = model(tokens, segment_ids_bt=segment_ids)
    expected_sum, expected_count = masked_lm_loss_from_logits(
        logits, tokens, loss_mask, segment_ids
    )
    got_sum, got_count = masked_lm_loss(model, tokens, loss_mask, segment_ids_bt=segment_ids)
    assert int(got_count) == int(expected_count)
    np.testing.assert_allclose(float(got_sum), float(expected_sum), rtol=1e-6)


@pytest.mark.parametrize("remat", [False, True])
def test_loss_gradients_same_in_every_layer_mode(remat):
    # The unrolled layer loop and nnx.scan share one stacked parameter layout, so
    # their loss gradients must agree leaf by leaf.
    rng = np.random.default_rng(7)
    tokens = jnp.asarray(rng.integers(0, 37, size=(2, 9)))
    loss_mask = jnp.asarray(rng.random((2, 9)) < 0.8)
    grads = {}
    for scan_layers in (True, False):
        config = _tiny_config(scan_layers=scan_layers, remat=remat, num_hidden_layers=3)
        graphdef, state = nnx.split(init_decoder(config, seed=7))

        def loss_fn(state, graphdef=graphdef):
            loss_sum, count = masked_lm_loss(nnx.merge(graphdef, state), tokens, loss_mask)
            return loss_sum / count

        grads[scan_layers] = jax.jit(jax.grad(loss_fn))(state)
    for scanned, unrolled in zip(
        jax.tree.leaves(grads[True]), jax.tree.leaves(grads[False]), strict=True
    ):
        assert np.abs(np.asarray(scanned)).max() > 0
        np.testing.assert_allclose(np.asarray(unrolled), np.asarray(scanned), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("chunk", [5, 37, 64])
def test_chunked_loss_matches_full_logits(tie, chunk):
    config = _tiny_config(tie_word_embeddings=tie)
    model = init_decoder(config, seed=4)
    # Larger output weights so the softmax is far from uniform.
    if tie:
        model.embed[...] = model.embed[...] * 50
    else:
        model.lm_head[...] = model.lm_head[...] * 50
    rng = np.random.default_rng(4)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, size=(2, 9)))
    loss_mask = jnp.asarray(rng.random((2, 9)) < 0.7)
    segment_ids = jnp.array([[1] * 5 + [2] * 4, [1] * 7 + [0] * 2])
    graphdef, state = nnx.split(model)

    def loss_fn(state, chunk_size):
        m = nnx.merge(graphdef, state)
        loss_sum, count = masked_lm_loss(
            m, tokens, loss_mask, segment_ids_bt=segment_ids, vocab_chunk_size=chunk_size
        )
        return loss_sum, count

    def value_and_grad(chunk_size):
        return jax.jit(
            jax.value_and_grad(lambda s: loss_fn(s, chunk_size), has_aux=True),
        )(state)

    (full_sum, full_count), full_grads = value_and_grad(None)
    (chunk_sum, chunk_count), chunk_grads = value_and_grad(chunk)

    assert int(chunk_count) == int(full_count)
    np.testing.assert_allclose(float(chunk_sum), float(full_sum), rtol=1e-5)
    for full_leaf, chunk_leaf in zip(
        jax.tree.leaves(full_grads), jax.tree.leaves(chunk_grads), strict=True
    ):
        # Near one-hot softmaxes lose digits in (p - onehot), in both paths alike.
        np.testing.assert_allclose(
            np.asarray(chunk_leaf), np.asarray(full_leaf), rtol=1e-3, atol=1e-5
        )


def test_chunked_loss_direct_call_matches_numpy():
    config = _tiny_config()
    model = init_decoder(config, seed=5)
    rng = np.random.default_rng(5)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, size=(2, 6)))
    loss_mask = jnp.ones((2, 6), bool)
    hidden, _ = model(tokens, return_hidden=True)
    got_sum, got_count = chunked_lm_loss_from_hidden(
        model, hidden, tokens, loss_mask, vocab_chunk_size=10
    )
    logits = np.asarray(hidden, np.float64) @ np.asarray(model.embed[...], np.float64).T
    expected = _numpy_token_losses(logits[:, :-1], np.asarray(tokens[:, 1:])).sum()
    assert int(got_count) == 10
    np.testing.assert_allclose(float(got_sum), expected, rtol=1e-5)


def test_chunk_size_must_be_positive():
    config = _tiny_config()
    model = init_decoder(config, seed=0)
    tokens = jnp.zeros((1, 3), jnp.int32)
    with pytest.raises(ValueError, match="vocab_chunk_size=0"):
        masked_lm_loss(model, tokens, jnp.ones((1, 3), bool), vocab_chunk_size=0)
