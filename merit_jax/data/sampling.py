"""Deterministic sampling: seeds per task, held-out splits, calibration subsets, token budgets.

Every random choice draws from a numpy Generator whose seed is the SHA-256 of
the run seed, the task name and a purpose string. Python's ``hash()`` would
not do, because it is salted per process. A choice therefore depends only on
those three values, and adding or removing another task never changes it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from merit_jax.data.format import TokenizedExample, TokenizedTask
from merit_jax.data.task import Example, Task


def derive_seed(seed: int, *keys: str) -> int:
    """Return a 64-bit seed from ``seed`` and ``keys``: the first 8 bytes of their SHA-256."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__} {seed!r}")
    digest = hashlib.sha256(str(seed).encode())
    for key in keys:
        digest.update(b"\0")
        digest.update(key.encode())
    return int.from_bytes(digest.digest()[:8], "little")


def task_rng(seed: int, task_name: str, purpose: str) -> np.random.Generator:
    """Return the Generator for one purpose (e.g. "held_out", "budget") of one task."""
    return np.random.Generator(np.random.PCG64(derive_seed(seed, task_name, purpose)))


def split_held_out(task: Task, held_out: int, *, seed: int) -> tuple[Task, tuple[Example, ...]]:
    """Split ``task`` into a training task and ``held_out`` examples drawn at random.

    Both parts keep the file order of their examples. The training part must
    keep at least one example.
    """
    if not isinstance(held_out, int) or held_out < 0:
        raise ValueError(f"held_out={held_out!r} must be a non-negative integer")
    if held_out == 0:
        return task, ()
    if held_out >= len(task.examples):
        raise ValueError(
            f"task {task.name!r} has {len(task.examples)} examples, too few to hold out "
            f"{held_out} and still train; lower held_out"
        )
    order = task_rng(seed, task.name, "held_out").permutation(len(task.examples))
    held_indices = np.sort(order[:held_out])
    train = np.sort(order[held_out:])
    held_examples = tuple(task.examples[i] for i in held_indices)
    return task.with_examples([task.examples[i] for i in train]), held_examples


def subsample(task: Task, max_samples: int | None, *, seed: int) -> Task:
    """Keep at most ``max_samples`` examples, drawn at random and kept in file order."""
    if max_samples is None or max_samples >= len(task.examples):
        return task
    if max_samples < 1:
        raise ValueError(f"max_samples={max_samples} must be a positive integer")
    order = task_rng(seed, task.name, "subsample").permutation(len(task.examples))
    keep = np.sort(order[:max_samples])
    return task.with_examples([task.examples[i] for i in keep])


def calibration_indices(task: Task, n: int, *, seed: int, allow_fewer: bool = False) -> np.ndarray:
    """Return the indices of ``n`` distinct examples for the gradient at theta0, int64 [n].

    The conflict matrix compares tasks under identical settings, so a task with
    fewer than ``n`` examples raises ValueError unless ``allow_fewer``, which
    then uses all of them.
    """
    if n < 1:
        raise ValueError(f"calibration size n={n} must be a positive integer")
    count = len(task.examples)
    if count < n and not allow_fewer:
        raise ValueError(
            f"task {task.name!r} has {count} examples, fewer than the calibration size {n}; "
            "lower the calibration size, or allow fewer so this task uses all its examples"
        )
    order = task_rng(seed, task.name, "calibration").permutation(count)
    return order[: min(n, count)]


def calibration_subset(
    task: Task, n: int, *, seed: int, allow_fewer: bool = False
) -> tuple[Example, ...]:
    """Return ``n`` distinct random examples of ``task``; see :func:`calibration_indices`."""
    indices = calibration_indices(task, n, seed=seed, allow_fewer=allow_fewer)
    return tuple(task.examples[i] for i in indices)


def budget_schedule(
    lengths: Sequence[int] | np.ndarray, n_t: int, *, seed: int, task_name: str
) -> np.ndarray:
    """Return the example indices, in training order, that spend a budget of ``n_t`` tokens.

    Each epoch is a fresh permutation of all examples. Epochs repeat until the
    running token count reaches ``n_t``, so the last example may overshoot it
    by less than its own length. Returns int64 [num_steps]. The order depends
    only on ``seed``, ``task_name`` and the lengths.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1 or lengths.size == 0:
        raise ValueError(f"lengths must be a non-empty 1-D sequence, got shape {lengths.shape}")
    if (lengths <= 0).any():
        raise ValueError("every example length must be positive")
    if n_t < 1:
        raise ValueError(f"token budget n_t={n_t} must be a positive integer")
    epoch_tokens = int(lengths.sum())
    num_epochs = -(-n_t // epoch_tokens)  # ceil
    rng = task_rng(seed, task_name, "budget")
    order = np.concatenate([rng.permutation(lengths.size) for _ in range(num_epochs)])
    cumulative = np.cumsum(lengths[order])
    stop = int(np.searchsorted(cumulative, n_t, side="left")) + 1
    return order[:stop]


def iterate_budget(tokenized: TokenizedTask, n_t: int, *, seed: int) -> Iterator[TokenizedExample]:
    """Yield the examples of ``tokenized`` in the order of :func:`budget_schedule`."""
    schedule = budget_schedule(tokenized.lengths, n_t, seed=seed, task_name=tokenized.name)
    for index in schedule:
        yield tokenized.examples[index]


def mixture_schedule(
    tokenized_tasks: Sequence[TokenizedTask],
    budgets: Mapping[str, int],
    *,
    seed: int,
    group: str = "mixture",
) -> list[tuple[int, int]]:
    """Return (task index, example index) pairs that interleave several tasks' budgets.

    Each task contributes its :func:`budget_schedule`; the union is shuffled
    with a Generator derived from ``seed`` and ``group`` (e.g. the branch id),
    so each batch mixes the tasks in proportion to their budgets.
    """
    names = [task.name for task in tokenized_tasks]
    missing = [name for name in names if name not in budgets]
    if missing:
        raise ValueError(f"no token budget for tasks {missing}; resolve n_t for every task first")
    pairs: list[tuple[int, int]] = []
    for task_index, tokenized in enumerate(tokenized_tasks):
        schedule = budget_schedule(
            tokenized.lengths, budgets[tokenized.name], seed=seed, task_name=tokenized.name
        )
        pairs.extend((task_index, int(example)) for example in schedule)
    order = np.random.Generator(np.random.PCG64(derive_seed(seed, group, "mixture"))).permutation(
        len(pairs)
    )
    return [pairs[i] for i in order]
