"""Held-out loss and the linear-path diagnostic against a per-example numpy reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from merit_jax.data.format import tokenize_example
from merit_jax.data.task import Example
from merit_jax.data.testing import chatml_byte_tokenizer
from merit_jax.eval.diagnostics import (
    interpolate_states,
    linear_path_losses,
    loss_barrier,
)
from merit_jax.eval.held_out import held_out_losses, pooled_loss, prepare_held_out
from merit_jax.models.config import ModelConfig
from merit_jax.models.decoder import Decoder, init_decoder

VOCAB_SIZE = 3 + 256  # the byte tokenizer: 3 special tokens and 256 bytes


def tiny_model(seed: int) -> Decoder:
    config = ModelConfig(
        model_type="llama",
        vocab_size=VOCAB_SIZE,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=6,
        tie_word_embeddings=False,
    )
    model = init_decoder(config, seed=seed)
    # Scale the weights up from the 0.02 init so the logits are far from uniform.
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda leaf: leaf * 8.0, state))


HELD_OUT = {
    "short": (
        Example(instruction="Add 2 and 3.", response="5"),
        Example(instruction="Name a colour.", response="blue"),
        Example(instruction="Spell it", input="cat", response="c a t"),
    ),
    "long": (
        Example(instruction="Say something long.", response="a fairly long answer " * 3),
        Example(instruction="Echo", input="the input text here", response="the input text here"),
    ),
}


@jax.jit
def _logits(state, tokens_bt):
    return nnx.merge(_GRAPHDEF, state)(tokens_bt)[0]


_GRAPHDEF = nnx.graphdef(tiny_model(seed=0))


def reference_losses(model: Decoder, tokenizer, held_out, *, max_length: int):
    """Per-task mean response-token loss: every example alone, numpy float64 log-softmax."""
    assert nnx.graphdef(model) == _GRAPHDEF
    state = nnx.state(model)
    losses = {}
    for name, examples in held_out.items():
        total, count = 0.0, 0
        for example in examples:
            tokenized = tokenize_example(tokenizer, example, max_length=max_length)
            logits = _logits(state, jnp.asarray(tokenized.tokens[None, :]))
            logits = np.asarray(logits[0], np.float64)
            shifted = logits - logits.max(axis=-1, keepdims=True)
            log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
            for position in range(1, tokenized.length):
                if tokenized.loss_mask[position]:
                    total -= log_probs[position - 1, tokenized.tokens[position]]
                    count += 1
        losses[name] = (total / count, count)
    return losses


@pytest.fixture(scope="module")
def theta0() -> Decoder:
    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def theta1() -> Decoder:
    return tiny_model(seed=1)


@pytest.fixture(scope="module")
def tokenizer():
    return chatml_byte_tokenizer()


@pytest.fixture(scope="module")
def held_out_data(tokenizer):
    # Rows of 128 tokens hold two or three examples each, so packing matters.
    return prepare_held_out(tokenizer, HELD_OUT, seq_len=128, batch_size=2)


def test_targets_are_response_and_end_of_turn(tokenizer):
    data = prepare_held_out(tokenizer, {"short": HELD_OUT["short"][:1]}, seq_len=64, batch_size=1)
    batch = data.batches[0]
    targets = batch.tokens[batch.loss_mask]
    # Response "5" (one byte token) followed by <|im_end|>.
    assert tokenizer.convert_ids_to_tokens(targets.tolist()) == ["5", "<|im_end|>"]


def test_held_out_loss_matches_numpy(tokenizer, held_out_data, theta0):
    model = theta0
    assert len(held_out_data.batches) >= 2
    assert max(int(batch.segment_ids.max()) for batch in held_out_data.batches) >= 2
    results = held_out_losses(model, held_out_data)
    expected = reference_losses(model, tokenizer, HELD_OUT, max_length=128)
    for name, (loss, count) in expected.items():
        assert results[name].num_targets == count
        assert results[name].loss == pytest.approx(loss, abs=1e-5, rel=0)
        assert results[name].num_examples == len(HELD_OUT[name])
    pooled = sum(loss * count for loss, count in expected.values()) / sum(
        count for _, count in expected.values()
    )
    assert pooled_loss(results) == pytest.approx(pooled, abs=1e-5, rel=0)


def test_held_out_skips_examples_that_do_not_fit(tokenizer):
    held_out = {"mixed": (Example("Hi", "x" * 200), Example("Hi", "ok"))}
    data = prepare_held_out(tokenizer, held_out, seq_len=64, batch_size=1)
    assert data.num_skipped == (1,)
    assert data.num_examples == (1,)


def test_held_out_rejects_empty_task(tokenizer):
    with pytest.raises(ValueError, match="no held-out examples for tasks \\['none'\\]"):
        prepare_held_out(tokenizer, {"none": ()}, seq_len=64, batch_size=1)


def test_loss_barrier_hand_values():
    assert loss_barrier([0.0, 0.5, 1.0], [1.0, 2.0, 3.0]) == pytest.approx(0.0)
    assert loss_barrier([0.0, 0.5, 1.0], [1.0, 3.0, 1.0]) == pytest.approx(2.0)
    assert loss_barrier([1.0, 0.25, 0.0], [2.0, 1.0, 2.0]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="must include 0 and 1"):
        loss_barrier([0.0, 0.5], [1.0, 2.0])


def test_interpolate_states_keeps_dtype():
    state0 = {"a": jnp.ones((2,), jnp.bfloat16), "b": jnp.zeros((3,), jnp.float32)}
    state1 = {"a": jnp.full((2,), 3.0, jnp.bfloat16), "b": jnp.full((3,), 4.0, jnp.float32)}
    mixed = interpolate_states(state0, state1, 0.25)
    assert mixed["a"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(mixed["a"], np.float32), 1.5)
    np.testing.assert_allclose(np.asarray(mixed["b"]), 1.0)
    with pytest.raises(ValueError, match="same config"):
        interpolate_states(state0, {"a": state1["a"], "b": jnp.zeros((4,))}, 0.5)


def test_linear_path_matches_endpoints_and_midpoint(tokenizer, held_out_data, theta0, theta1):
    result = linear_path_losses(theta0, theta1, held_out_data, alphas=(0.0, 0.5, 1.0))

    graphdef, state0 = nnx.split(theta0)
    _, state1 = nnx.split(theta1)
    midpoint = nnx.merge(
        graphdef,
        jax.tree.map(lambda a, b: jnp.asarray((np.asarray(a) + np.asarray(b)) / 2), state0, state1),
    )
    for alpha, model in ((0.0, theta0), (0.5, midpoint), (1.0, theta1)):
        expected = reference_losses(model, tokenizer, HELD_OUT, max_length=128)
        index = result.alphas.index(alpha)
        for name, (loss, _) in expected.items():
            assert result.task_losses[name][index] == pytest.approx(loss, abs=1e-5, rel=0)

    for name, losses in result.task_losses.items():
        chord_mid = (losses[0] + losses[2]) / 2
        assert result.task_barriers[name] == pytest.approx(max(0.0, losses[1] - chord_mid))
    assert len(result.pooled_losses) == 3


def test_linear_path_rejects_other_architecture(held_out_data, theta0):
    other = init_decoder(theta0.config.replace(num_hidden_layers=1))
    with pytest.raises(ValueError, match="same architecture"):
        linear_path_losses(theta0, other, held_out_data)
