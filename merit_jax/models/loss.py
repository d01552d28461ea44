"""Token cross-entropy for causal language-model training with a loss mask.

Axis letters: B batch, T sequence, D model, V vocabulary, C vocabulary chunk.

Label convention: the label of position t is token t + 1, so the logits at
position t are scored against ``tokens[:, t + 1]``. ``loss_mask[b, t]`` marks
whether *target* token t counts (for instruction tuning: the response tokens,
end-of-turn token included), so ``loss_mask[:, 0]`` never counts because no
position predicts the first token. A target also counts only when it lies in
the same non-padding segment as the position that predicts it: the first token
of a packed sequence is never predicted from the end of the previous one.

The functions return the summed loss and the number of counted targets
separately, so that accumulating both over micro-batches and dividing once
gives exactly the mean over the whole batch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from merit_jax.models.config import to_dtype

if TYPE_CHECKING:
    from merit_jax.models.decoder import Decoder


def token_losses(logits_btv: jax.Array, targets_bt: jax.Array) -> jax.Array:
    """Return the per-token cross-entropy -log softmax(logits)[target], float32 [B, T].

    Computed as logsumexp(logits) - logits[target] in float32, which is stable
    for any logit scale.
    """
    if logits_btv.shape[:-1] != targets_bt.shape:
        raise ValueError(
            f"logits shape {logits_btv.shape} does not match targets shape {targets_bt.shape}; "
            "logits must be [B, T, V] for targets [B, T]"
        )
    logits_btv = logits_btv.astype(jnp.float32)
    log_normalizer_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    target_logits_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    return log_normalizer_bt - target_logits_bt


def target_weights(
    tokens_bt: jax.Array, loss_mask_bt: jax.Array, segment_ids_bt: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Return the targets [B, T-1] of positions 0..T-2 and their float32 weights [B, T-1].

    Weight 1 means the target counts: its ``loss_mask`` entry is set and it is
    in the same non-padding segment as the position that predicts it.
    """
    if tokens_bt.ndim != 2:
        raise ValueError(f"tokens must be [B, T]; got shape {tokens_bt.shape}")
    if loss_mask_bt.shape != tokens_bt.shape:
        raise ValueError(
            f"loss_mask shape {loss_mask_bt.shape} does not match tokens shape {tokens_bt.shape}"
        )
    counts_bt = loss_mask_bt[:, 1:].astype(bool)
    if segment_ids_bt is not None:
        if segment_ids_bt.shape != tokens_bt.shape:
            raise ValueError(
                f"segment_ids shape {segment_ids_bt.shape} does not match tokens shape "
                f"{tokens_bt.shape}"
            )
        same_segment_bt = segment_ids_bt[:, 1:] == segment_ids_bt[:, :-1]
        counts_bt = counts_bt & same_segment_bt & (segment_ids_bt[:, 1:] != 0)
    return tokens_bt[:, 1:], counts_bt.astype(jnp.float32)


def _sum_and_count(losses_bt: jax.Array, weights_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    # where, not multiply: a masked position with an infinite loss must not give NaN.
    sum_loss = jnp.sum(jnp.where(weights_bt > 0, losses_bt, 0.0))
    return sum_loss, jnp.sum(weights_bt).astype(jnp.int32)


def masked_lm_loss_from_logits(
    logits_btv: jax.Array,
    tokens_bt: jax.Array,
    loss_mask_bt: jax.Array,
    segment_ids_bt: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Return (summed loss, target count) of next-token cross-entropy over masked targets.

    sum_loss = sum over b and t < T-1 of w[b, t] * CE(logits[b, t], tokens[b, t + 1]),
    count = sum of w, where w comes from :func:`target_weights`. ``logits`` are
    [B, T, V]; the last position has no target and is ignored. The loss is a
    float32 scalar and the count an int32 scalar.
    """
    targets_bt, weights_bt = target_weights(tokens_bt, loss_mask_bt, segment_ids_bt)
    losses_bt = token_losses(logits_btv[:, :-1], targets_bt)
    return _sum_and_count(losses_bt, weights_bt)


def chunked_lm_loss_from_hidden(
    model: Decoder,
    hidden_btd: jax.Array,
    tokens_bt: jax.Array,
    loss_mask_bt: jax.Array,
    segment_ids_bt: jax.Array | None = None,
    *,
    vocab_chunk_size: int = 8192,
) -> tuple[jax.Array, jax.Array]:
    """Return the same (summed loss, count) as the logits path, without a [B, T, V] array.

    ``hidden_btd`` are the final (normed) hidden states, as the model returns
    with ``return_hidden=True``. The log-normalizer is accumulated over
    vocabulary chunks of ``vocab_chunk_size`` rows of the output projection
    with a running maximum (online logsumexp), and each chunk is recomputed in
    the backward pass, so the largest live logits array is [B, T, C].
    """
    if vocab_chunk_size <= 0:
        raise ValueError(f"vocab_chunk_size={vocab_chunk_size} must be a positive integer")
    config = model.config
    cdt = to_dtype(config.compute_dtype)
    targets_bt, weights_bt = target_weights(tokens_bt, loss_mask_bt, segment_ids_bt)
    x_btd = hidden_btd[:, :-1].astype(cdt)

    if config.tie_word_embeddings:
        weight_vd = model.embed[...]
    else:
        weight_vd = model.lm_head[...].T
    weight_vd = weight_vd.astype(cdt)
    vocab = weight_vd.shape[0]
    chunk = min(vocab_chunk_size, vocab)
    num_chunks = math.ceil(vocab / chunk)
    padded = num_chunks * chunk
    if padded != vocab:
        weight_vd = jnp.pad(weight_vd, ((0, padded - vocab), (0, 0)))
    weight_ncd = weight_vd.reshape(num_chunks, chunk, -1)

    @jax.checkpoint
    def chunk_step(carry, inputs):
        running_max_bt, running_sum_bt = carry
        weight_cd, first_row = inputs
        logits_btc = jnp.einsum("btd,cd->btc", x_btd, weight_cd, preferred_element_type=jnp.float32)
        in_vocab_c = first_row + jnp.arange(chunk) < vocab
        logits_btc = jnp.where(in_vocab_c, logits_btc, -jnp.inf)
        new_max_bt = jnp.maximum(running_max_bt, jnp.max(logits_btc, axis=-1))
        # The running max is only a shift for stability: stop its gradient, as logsumexp does.
        shift_bt = jax.lax.stop_gradient(new_max_bt)
        running_sum_bt = running_sum_bt * jnp.exp(
            jax.lax.stop_gradient(running_max_bt) - shift_bt
        ) + jnp.sum(jnp.exp(logits_btc - shift_bt[..., None]), axis=-1)
        return (new_max_bt, running_sum_bt), None

    batch, length = targets_bt.shape
    init = (
        jnp.full((batch, length), -jnp.inf, jnp.float32),
        jnp.zeros((batch, length), jnp.float32),
    )
    first_rows = jnp.arange(num_chunks) * chunk
    (max_bt, sum_bt), _ = jax.lax.scan(chunk_step, init, (weight_ncd, first_rows))
    log_normalizer_bt = jax.lax.stop_gradient(max_bt) + jnp.log(sum_bt)

    target_rows_btd = jnp.take(weight_vd, targets_bt, axis=0)
    target_logits_bt = jnp.einsum(
        "btd,btd->bt", x_btd, target_rows_btd, preferred_element_type=jnp.float32
    )
    losses_bt = log_normalizer_bt - target_logits_bt
    return _sum_and_count(losses_bt, weights_bt)


def masked_lm_loss(
    model: Decoder,
    tokens_bt: jax.Array,
    loss_mask_bt: jax.Array,
    *,
    segment_ids_bt: jax.Array | None = None,
    positions_bt: jax.Array | None = None,
    vocab_chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Run ``model`` on ``tokens`` and return (summed loss, target count).

    See the module docstring for the label convention. With ``vocab_chunk_size``
    the loss is computed from the final hidden states in vocabulary chunks
    (:func:`chunked_lm_loss_from_hidden`), which never builds the [B, T, V]
    logits; the result is the same up to float32 rounding.
    """
    hidden_btd, _ = model(
        tokens_bt, positions_bt=positions_bt, segment_ids_bt=segment_ids_bt, return_hidden=True
    )
    if vocab_chunk_size is None:
        # Project only the T-1 positions that have a target: slicing the logits instead
        # would pad and copy a [B, T, V] gradient in the backward pass.
        targets_bt, weights_bt = target_weights(tokens_bt, loss_mask_bt, segment_ids_bt)
        losses_bt = token_losses(model.logits(hidden_btd[:, :-1]), targets_bt)
        return _sum_and_count(losses_bt, weights_bt)
    return chunked_lm_loss_from_hidden(
        model,
        hidden_btd,
        tokens_bt,
        loss_mask_bt,
        segment_ids_bt,
        vocab_chunk_size=vocab_chunk_size,
    )
