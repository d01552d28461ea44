"""Mean token loss on held-out instruction examples, formatted and masked as in training.

Axis letters: B batch rows, T sequence.

Every example is rendered with the chat template and tokenized with the
response-only loss mask of ``merit_jax.data.format``: the targets are the
assistant tokens, end-of-turn token included, exactly as training counts them.
The examples of all tasks are packed together into fixed [batch_size,
seq_len] batches (several examples per row, one segment each), so only one
shape compiles. Each target token is attributed to its example's task, and
the loss of a task is

    loss_t = (sum of the token losses of task t) / (number of targets of task t)

in nats per target token. The pooled loss divides the sum over all tasks by
the count over all tasks.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from merit_jax.data.batching import Batch, pack_rows, packed_batch
from merit_jax.data.format import Truncation, tokenize_task
from merit_jax.data.task import Example, Task
from merit_jax.models.decoder import Decoder
from merit_jax.models.loss import target_weights, token_losses

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class HeldOutData:
    """Tokenized, packed held-out examples of several tasks, ready to score with any weights."""

    task_names: tuple[str, ...]
    batches: tuple[Batch, ...]
    # int32 [B, T] per batch: task index of each token, -1 on padding
    task_ids: tuple[np.ndarray, ...]
    num_examples: tuple[int, ...]  # tokenized examples per task
    num_skipped: tuple[int, ...]  # examples per task whose response does not fit seq_len
    num_truncated: tuple[int, ...]  # examples per task whose prompt was shortened to fit


@dataclasses.dataclass(frozen=True)
class HeldOutResult:
    """Held-out loss of one task."""

    task: str
    loss: float  # mean loss per target token, in nats
    num_targets: int
    num_examples: int
    num_skipped: int
    num_truncated: int

    def summary(self) -> dict[str, Any]:
        """Return the numbers of this result, without the task name."""
        return {key: value for key, value in dataclasses.asdict(self).items() if key != "task"}


def prepare_held_out(
    tokenizer: Any,
    held_out: Mapping[str, Sequence[Example]],
    *,
    seq_len: int,
    batch_size: int,
    system: str | None = None,
    truncation: Truncation = "middle",
    pad_id: int = 0,
) -> HeldOutData:
    """Tokenize and pack the held-out examples of every task (see the module doc).

    ``held_out`` maps task names to their held-out examples. A task without
    examples raises ValueError, and so does a task whose every example is too long.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be a positive integer")
    names = tuple(held_out)
    empty = [name for name in names if not held_out[name]]
    if empty:
        raise ValueError(
            f"no held-out examples for tasks {empty}; set held_out > 0 in their dataset specs "
            "or leave them out of the held-out evaluation"
        )

    task_of: dict[int, int] = {}
    examples = []
    num_examples, num_skipped, num_truncated = [], [], []
    for task_index, name in enumerate(names):
        task = Task(name=name, source="held_out", examples=tuple(held_out[name]))
        tokenized = tokenize_task(
            tokenizer, task, max_length=seq_len, system=system, truncation=truncation
        )
        for example in tokenized.examples:
            task_of[id(example)] = task_index
            examples.append(example)
        num_examples.append(len(tokenized.examples))
        num_skipped.append(tokenized.num_skipped)
        num_truncated.append(tokenized.num_truncated)

    rows = pack_rows(examples, seq_len=seq_len)
    batches, task_ids = [], []
    for first in range(0, len(rows), batch_size):
        chunk = rows[first : first + batch_size]
        batches.append(packed_batch(chunk, seq_len=seq_len, pad_id=pad_id, batch_size=batch_size))
        ids_bt = np.full((batch_size, seq_len), -1, np.int32)
        for row, row_examples in enumerate(chunk):
            start = 0
            for example in row_examples:
                ids_bt[row, start : start + example.length] = task_of[id(example)]
                start += example.length
        task_ids.append(ids_bt)
    return HeldOutData(
        task_names=names,
        batches=tuple(batches),
        task_ids=tuple(task_ids),
        num_examples=tuple(num_examples),
        num_skipped=tuple(num_skipped),
        num_truncated=tuple(num_truncated),
    )


@partial(jax.jit, static_argnames=("graphdef",))
def _weighted_token_losses(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens_bt: jax.Array,
    loss_mask_bt: jax.Array,
    segment_ids_bt: jax.Array,
    positions_bt: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Return the loss of every target, zero where it does not count, and the weights [B, T-1]."""
    model = nnx.merge(graphdef, state)
    hidden_btd, _ = model(
        tokens_bt, positions_bt=positions_bt, segment_ids_bt=segment_ids_bt, return_hidden=True
    )
    targets_bt, weights_bt = target_weights(tokens_bt, loss_mask_bt, segment_ids_bt)
    # The last position has no target, so only T-1 positions are projected to logits.
    losses_bt = token_losses(model.logits(hidden_btd[:, :-1]), targets_bt)
    return jnp.where(weights_bt > 0, losses_bt, 0.0), weights_bt


def task_loss_sums(
    graphdef: nnx.GraphDef, state: nnx.State, data: HeldOutData
) -> tuple[np.ndarray, np.ndarray]:
    """Return the summed target loss and the target count of every task, float64 and int64.

    The model is ``nnx.merge(graphdef, state)``; passing the state separately
    lets callers score other weights (an interpolation, say) without building a
    module.
    """
    num_tasks = len(data.task_names)
    sums = np.zeros(num_tasks, np.float64)
    counts = np.zeros(num_tasks, np.int64)
    for batch, ids_bt in zip(data.batches, data.task_ids, strict=True):
        losses_bt, weights_bt = _weighted_token_losses(
            graphdef,
            state,
            jnp.asarray(batch.tokens),
            jnp.asarray(batch.loss_mask),
            jnp.asarray(batch.segment_ids),
            jnp.asarray(batch.positions),
        )
        counted = np.asarray(weights_bt) > 0
        # Target t + 1 belongs to the example of token t + 1.
        target_tasks = ids_bt[:, 1:][counted]
        sums += np.bincount(
            target_tasks, weights=np.asarray(losses_bt, np.float64)[counted], minlength=num_tasks
        )
        counts += np.bincount(target_tasks, minlength=num_tasks)
    return sums, counts


def held_out_losses(model: Decoder, data: HeldOutData) -> dict[str, HeldOutResult]:
    """Return the held-out loss of every task of ``data``."""
    start = time.perf_counter()
    graphdef, state = nnx.split(model)
    sums, counts = task_loss_sums(graphdef, state, data)
    results = {}
    for index, name in enumerate(data.task_names):
        results[name] = HeldOutResult(
            task=name,
            loss=float(sums[index] / counts[index]),
            num_targets=int(counts[index]),
            num_examples=data.num_examples[index],
            num_skipped=data.num_skipped[index],
            num_truncated=data.num_truncated[index],
        )
    logger.info(
        "held-out loss of %d tasks (%d targets, %d batches) in %.1f s",
        len(results),
        int(counts.sum()),
        len(data.batches),
        time.perf_counter() - start,
    )
    return results


def pooled_loss(results: Mapping[str, HeldOutResult]) -> float:
    """Return the loss over the targets of all tasks together."""
    total = sum(result.loss * result.num_targets for result in results.values())
    count = sum(result.num_targets for result in results.values())
    if count == 0:
        raise ValueError("no held-out targets to average")
    return total / count
