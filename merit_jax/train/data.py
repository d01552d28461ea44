"""The batches of one branch, as a pure function of (seed, step).

Axis letters: B rows per step, T sequence.

A branch trains on the union of its tasks, each spending its token budget
n_t. The order of examples is ``data.sampling.mixture_schedule``: each task's
budget schedule (fresh permutations of its examples until n_t tokens), and
the union shuffled by a generator derived from the seed and the branch name.
The examples are then laid into rows once, up front: one example per row
(padding) or several (packing, first fit in schedule order). Step s trains on
rows [s * B, (s + 1) * B). The whole layout depends only on the tasks, the
budgets, the seed and the batch settings. A resumed run therefore needs only
the step number to continue with the same data, and ``fingerprint`` checks
that the data is the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np

from merit_jax.data.batching import Batch, pack_rows, packed_batch
from merit_jax.data.format import TokenizedExample, TokenizedTask
from merit_jax.data.sampling import mixture_schedule

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BranchData:
    """The fixed sequence of [batch_size, seq_len] batches of one branch."""

    name: str  # branch name, part of the shuffling seed
    task_names: tuple[str, ...]
    budgets: Mapping[str, int]  # n_t of every task
    rows: tuple[tuple[TokenizedExample, ...], ...]  # examples of each row, in training order
    schedule: tuple[tuple[int, int], ...]  # (task index, example index) in training order
    batch_size: int
    seq_len: int
    pad_id: int
    fingerprint: str  # sha256 of the tasks' tokens and the row layout

    @property
    def num_steps(self) -> int:
        """Steps of one pass over the rows (the last batch may hold padding rows)."""
        return -(-len(self.rows) // self.batch_size)

    @property
    def num_tokens(self) -> int:
        """Non-padding tokens over all steps, about sum of n_t (each task overshoots a little)."""
        return sum(example.length for row in self.rows for example in row)

    def batch(self, step: int) -> Batch:
        """Return the batch of ``step``, 0 <= step < num_steps."""
        if not 0 <= step < self.num_steps:
            raise IndexError(f"step {step} is outside the {self.num_steps} steps of {self.name}")
        rows = self.rows[step * self.batch_size : (step + 1) * self.batch_size]
        return packed_batch(
            rows, seq_len=self.seq_len, pad_id=self.pad_id, batch_size=self.batch_size
        )


def build_branch_data(
    name: str,
    tasks: Sequence[TokenizedTask],
    budgets: Mapping[str, int],
    *,
    seed: int,
    batch_size: int,
    seq_len: int,
    pad_id: int,
    packing: bool,
) -> BranchData:
    """Lay out the training rows of one branch; see the module doc.

    Raises ValueError for a task without a budget, an unknown budget key, or an
    example longer than ``seq_len``.
    """
    start = time.perf_counter()
    names = [task.name for task in tasks]
    if not tasks:
        raise ValueError(f"branch {name} has no tasks")
    unknown = sorted(set(budgets) - set(names))
    if unknown:
        raise ValueError(f"branch {name}: budgets name tasks {unknown} that it does not train on")
    pairs = mixture_schedule(tasks, budgets, seed=seed, group=name)
    examples = [tasks[t].examples[i] for t, i in pairs]
    too_long = [example.length for example in examples if example.length > seq_len]
    if too_long:
        raise ValueError(
            f"branch {name}: {len(too_long)} example(s) are longer than seq_len={seq_len} "
            f"(up to {max(too_long)} tokens); tokenize with max_length <= seq_len"
        )
    if packing:
        rows = tuple(tuple(row) for row in pack_rows(examples, seq_len=seq_len))
    else:
        rows = tuple((example,) for example in examples)

    digest = hashlib.sha256()
    digest.update(f"{name}\0{seed}\0{batch_size}\0{seq_len}\0{pad_id}\0{packing}".encode())
    for row in rows:
        digest.update(b"\1")
        for example in row:
            digest.update(np.ascontiguousarray(example.tokens, dtype="<i4").tobytes())
            digest.update(np.packbits(example.loss_mask).tobytes())
            digest.update(b"\0")

    data = BranchData(
        name=name,
        task_names=tuple(names),
        budgets=dict(budgets),
        rows=rows,
        schedule=tuple(pairs),
        batch_size=batch_size,
        seq_len=seq_len,
        pad_id=pad_id,
        fingerprint=digest.hexdigest(),
    )
    logger.info(
        "%s: %d examples from %d task(s) in %d rows of %d tokens (%s), %d steps of %d rows, "
        "%d tokens (%.0f%% of the row capacity) in %.1f s",
        name,
        len(examples),
        len(tasks),
        len(rows),
        seq_len,
        "packed" if packing else "padded",
        data.num_steps,
        batch_size,
        data.num_tokens,
        100.0 * data.num_tokens / max(data.num_steps * batch_size * seq_len, 1),
        time.perf_counter() - start,
    )
    return data
