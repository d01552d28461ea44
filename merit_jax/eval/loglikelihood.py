"""Batched log-likelihood of token continuations in a few fixed [B, T] shapes.

Axis letters: B batch rows, T sequence, V vocabulary.

A request is a pair (context token ids, continuation token ids). Its score is
the summed log-probability of the continuation tokens given everything before
them: sum over j of log p(continuation[j] | context, continuation[:j]).

Every request becomes one row: the context followed by the continuation,
right-padded with segment id 0 (the decoder never attends to padding). Rows
are grouped by length into buckets, and a bucket of length T runs in batches
of ``max(1, batch_tokens // T)`` rows. The last batch of a bucket is filled
with all-padding rows, so each bucket compiles one shape. Bucket lengths are
powers of two from ``min_bucket`` up, capped at ``max_length``.

A request longer than ``max_length`` tokens loses tokens from the left of its
context, and such requests are counted as truncated. A continuation needs at
least one token before it, so one of ``max_length`` tokens or more raises.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from merit_jax.models.decoder import Decoder
from merit_jax.models.loss import token_losses

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoglikelihoodRequest:
    """One continuation to score after one context, both as token ids."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "context", tuple(int(t) for t in self.context))
        object.__setattr__(self, "continuation", tuple(int(t) for t in self.continuation))
        if not self.context:
            raise ValueError(
                "a log-likelihood request has an empty context, so no position predicts the "
                "first continuation token; start the context with a BOS or EOS token"
            )
        if not self.continuation:
            raise ValueError("a log-likelihood request has an empty continuation; nothing to score")

    @property
    def length(self) -> int:
        return len(self.context) + len(self.continuation)


@dataclasses.dataclass(frozen=True)
class LoglikelihoodResult:
    """Scores of a list of requests, in request order."""

    scores: np.ndarray  # float64 [num_requests]: summed log-probability of each continuation
    truncated: np.ndarray  # bool [num_requests]: the context lost tokens on the left
    num_batches: int
    shapes: tuple[tuple[int, int], ...]  # the distinct [B, T] shapes that ran

    @property
    def num_truncated(self) -> int:
        return int(self.truncated.sum())


@partial(jax.jit, static_argnames=("graphdef",))
def _target_logprobs(
    graphdef: nnx.GraphDef, state: nnx.State, tokens_bt: jax.Array, segment_ids_bt: jax.Array
) -> jax.Array:
    """Return log p(tokens[:, t + 1] | tokens[:, :t + 1]), float32 [B, T-1]."""
    model = nnx.merge(graphdef, state)
    hidden_btd, _ = model(tokens_bt, segment_ids_bt=segment_ids_bt, return_hidden=True)
    # The last position predicts nothing, so only T-1 positions are projected to logits.
    return -token_losses(model.logits(hidden_btd[:, :-1]), tokens_bt[:, 1:])


def bucket_lengths(max_length: int, min_bucket: int) -> list[int]:
    """Return the row lengths used: powers of two from ``min_bucket``, then ``max_length``."""
    if max_length < 2:
        raise ValueError(f"max_length={max_length} must be at least 2 tokens")
    if min_bucket < 2:
        raise ValueError(f"min_bucket={min_bucket} must be at least 2 tokens")
    lengths = []
    length = 1 << (min_bucket - 1).bit_length()  # the smallest power of two >= min_bucket
    while length < max_length:
        lengths.append(length)
        length *= 2
    lengths.append(max_length)
    return lengths


def score_requests(
    model: Decoder,
    requests: Sequence[LoglikelihoodRequest],
    *,
    max_length: int,
    batch_tokens: int = 4096,
    min_bucket: int = 32,
    pad_id: int = 0,
) -> LoglikelihoodResult:
    """Return the summed continuation log-probability of every request (see the module doc).

    ``batch_tokens`` bounds B * T of one forward pass, which sets the memory of
    its float32 [B, T, V] logits. ``pad_id`` fills the padding and may be any
    valid token id, because padding is masked.
    """
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens={batch_tokens} must be a positive integer")
    buckets = bucket_lengths(max_length, min_bucket)
    num_requests = len(requests)
    scores = np.zeros(num_requests, np.float64)
    truncated = np.zeros(num_requests, bool)
    if num_requests == 0:
        return LoglikelihoodResult(scores, truncated, num_batches=0, shapes=())

    sequences: list[list[int]] = []
    for index, request in enumerate(requests):
        if len(request.continuation) >= max_length:
            raise ValueError(
                f"request {index}: the continuation has {len(request.continuation)} tokens, "
                f"but max_length={max_length} leaves no room for context before it; raise "
                "max_length"
            )
        sequence = list(request.context) + list(request.continuation)
        if len(sequence) > max_length:
            sequence = sequence[len(sequence) - max_length :]
            truncated[index] = True
        sequences.append(sequence)

    # Group the requests by bucket, longest first so that a slow bucket shows up early.
    by_bucket: dict[int, list[int]] = {}
    for index in sorted(range(num_requests), key=lambda i: -len(sequences[i])):
        bucket = next(b for b in buckets if len(sequences[index]) <= b)
        by_bucket.setdefault(bucket, []).append(index)

    graphdef, state = nnx.split(model)
    start = time.perf_counter()
    num_batches = 0
    shapes: list[tuple[int, int]] = []
    for length in sorted(by_bucket, reverse=True):
        rows = max(1, batch_tokens // length)
        shapes.append((rows, length))
        members = by_bucket[length]
        for first in range(0, len(members), rows):
            chunk = members[first : first + rows]
            tokens_bt = np.full((rows, length), pad_id, np.int32)
            segment_ids_bt = np.zeros((rows, length), np.int32)
            for row, index in enumerate(chunk):
                sequence = sequences[index]
                tokens_bt[row, : len(sequence)] = sequence
                segment_ids_bt[row, : len(sequence)] = 1
            logprobs_bt = np.asarray(
                _target_logprobs(
                    graphdef, state, jnp.asarray(tokens_bt), jnp.asarray(segment_ids_bt)
                )
            )
            for row, index in enumerate(chunk):
                # Position t predicts token t + 1, so the continuation's c tokens at
                # [n - c, n) are predicted at positions [n - c - 1, n - 1).
                end = len(sequences[index]) - 1
                count = len(requests[index].continuation)
                scores[index] = logprobs_bt[row, end - count : end].astype(np.float64).sum()
            num_batches += 1

    logger.info(
        "scored %d requests in %d batches of shapes %s in %.1f s (%d truncated to %d tokens)",
        num_requests,
        num_batches,
        shapes,
        time.perf_counter() - start,
        int(truncated.sum()),
        max_length,
    )
    return LoglikelihoodResult(scores, truncated, num_batches=num_batches, shapes=tuple(shapes))
