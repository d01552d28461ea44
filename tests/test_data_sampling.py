"""Deterministic seeds, held-out splits, calibration subsets and token budgets."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest

from merit_jax.data.format import TokenizedExample, TokenizedTask
from merit_jax.data.sampling import (
    budget_schedule,
    calibration_indices,
    calibration_subset,
    derive_seed,
    iterate_budget,
    mixture_schedule,
    split_held_out,
    subsample,
    task_rng,
)
from merit_jax.data.task import Example, Task


def make_task(name: str, count: int) -> Task:
    examples = tuple(Example(instruction="Q", input=str(i), response=f"A{i}") for i in range(count))
    return Task(name=name, source="test", examples=examples)


def make_tokenized(name: str, lengths: list[int]) -> TokenizedTask:
    examples = []
    for n in lengths:
        mask = np.zeros(n, dtype=bool)
        mask[-1] = True
        examples.append(TokenizedExample(tokens=np.arange(n), loss_mask=mask))
    return TokenizedTask(name, tuple(examples), tuple(range(len(lengths))), 0, 0)


def test_derive_seed_reference():
    expected = hashlib.sha256(b"7\0gem/e2e_nlg\0budget").digest()[:8]
    assert derive_seed(7, "gem/e2e_nlg", "budget") == int.from_bytes(expected, "little")


def test_derive_seed_stable_across_processes():
    # Python's hash() of a str changes with PYTHONHASHSEED; the derived seed must not.
    code = "from merit_jax.data.sampling import derive_seed; print(derive_seed(3, 'task', 'x'))"
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={"PYTHONHASHSEED": str(hash_seed)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for hash_seed in (1, 2)
    }
    assert outputs == {str(derive_seed(3, "task", "x"))}


def test_derive_seed_rejects_non_integer():
    with pytest.raises(TypeError, match="seed must be an integer"):
        derive_seed("7", "a")  # type: ignore[arg-type]


def test_task_rng_depends_on_all_keys():
    draws = {
        key: task_rng(*key).integers(0, 2**62)
        for key in [(0, "a", "p"), (0, "a", "p"), (1, "a", "p"), (0, "b", "p"), (0, "a", "q")]
    }
    assert len(set(draws.values())) == 4


def test_split_held_out_disjoint_and_deterministic():
    task = make_task("t", 50)
    train, held = split_held_out(task, 10, seed=3)
    again_train, again_held = split_held_out(task, 10, seed=3)
    other_train, other_held = split_held_out(task, 10, seed=4)

    assert len(held) == 10
    assert train.s_t == 40
    assert set(held).isdisjoint(train.examples)
    assert set(held) | set(train.examples) == set(task.examples)
    assert held == again_held
    assert train == again_train
    assert held != other_held
    positions = [task.examples.index(example) for example in train.examples]
    assert positions == sorted(positions)


def test_split_held_out_zero_and_too_many():
    task = make_task("t", 5)
    assert split_held_out(task, 0, seed=0) == (task, ())
    with pytest.raises(ValueError, match="'t' has 5 examples"):
        split_held_out(task, 5, seed=0)


def test_subsample_deterministic_subset():
    task = make_task("t", 100)
    first = subsample(task, 30, seed=1)
    assert first.s_t == 30
    assert first == subsample(task, 30, seed=1)
    assert first != subsample(task, 30, seed=2)
    assert set(first.examples) <= set(task.examples)
    assert subsample(task, None, seed=1) is task
    assert subsample(task, 500, seed=1) is task


def test_calibration_subset_same_seed_same_samples():
    task = make_task("t", 300)
    first = calibration_subset(task, 200, seed=5)
    assert first == calibration_subset(task, 200, seed=5)
    assert first != calibration_subset(task, 200, seed=6)
    assert len(set(first)) == 200
    # The subset of a task does not depend on other tasks or on the order of calls.
    calibration_subset(make_task("other", 300), 200, seed=5)
    assert first == calibration_subset(task, 200, seed=5)


def test_calibration_too_few_examples():
    task = make_task("small", 20)
    with pytest.raises(
        ValueError, match="'small' has 20 examples, fewer than the calibration size 32"
    ):
        calibration_indices(task, 32, seed=0)
    indices = calibration_indices(task, 32, seed=0, allow_fewer=True)
    assert sorted(indices.tolist()) == list(range(20))


def naive_budget(lengths: list[int], n_t: int, orders: list[np.ndarray]) -> list[int]:
    """Reference: walk the epochs one example at a time until n_t tokens are reached."""
    total = 0
    chosen = []
    for order in orders:
        for index in order:
            chosen.append(int(index))
            total += lengths[index]
            if total >= n_t:
                return chosen
    raise AssertionError("ran out of epochs")


@pytest.mark.parametrize("n_t", [1, 5, 99, 100, 101, 250, 1000])
def test_budget_schedule_accounting(n_t):
    lengths = [10, 20, 30, 40]  # 100 tokens per epoch
    schedule = budget_schedule(lengths, n_t, seed=0, task_name="t")
    rng = task_rng(0, "t", "budget")
    orders = [rng.permutation(4) for _ in range(-(-n_t // 100))]
    assert schedule.tolist() == naive_budget(lengths, n_t, orders)

    tokens = int(np.take(lengths, schedule).sum())
    assert tokens >= n_t
    assert tokens - lengths[schedule[-1]] < n_t  # stops at the first example reaching n_t
    # Every full epoch is a permutation of all examples.
    for epoch in range(len(schedule) // 4):
        assert sorted(schedule[epoch * 4 : epoch * 4 + 4].tolist()) == [0, 1, 2, 3]


def test_budget_schedule_deterministic_by_seed():
    lengths = list(range(1, 40))
    first = budget_schedule(lengths, 5000, seed=1, task_name="t")
    assert first.tolist() == budget_schedule(lengths, 5000, seed=1, task_name="t").tolist()
    assert first.tolist() != budget_schedule(lengths, 5000, seed=2, task_name="t").tolist()
    assert first.tolist() != budget_schedule(lengths, 5000, seed=1, task_name="u").tolist()


def test_iterate_budget_reaches_budget():
    tokenized = make_tokenized("t", [5, 7, 9])
    examples = list(iterate_budget(tokenized, 100, seed=0))
    total = sum(example.length for example in examples)
    assert total >= 100
    assert total - examples[-1].length < 100


def test_mixture_schedule_counts_and_shuffle():
    tasks = [make_tokenized("a", [10] * 5), make_tokenized("b", [4] * 8)]
    pairs = mixture_schedule(tasks, {"a": 120, "b": 40}, seed=0, group="branch-0")
    counts = np.bincount([task for task, _ in pairs], minlength=2)
    assert counts.tolist() == [12, 10]
    assert pairs == mixture_schedule(tasks, {"a": 120, "b": 40}, seed=0, group="branch-0")
    assert pairs != mixture_schedule(tasks, {"a": 120, "b": 40}, seed=0, group="branch-1")
    with pytest.raises(ValueError, match="no token budget for tasks \\['b'\\]"):
        mixture_schedule(tasks, {"a": 10}, seed=0)


@pytest.mark.parametrize(
    ("lengths", "n_t", "match"),
    [([], 10, "non-empty"), ([3, 0], 10, "positive"), ([3], 0, "n_t=0")],
)
def test_budget_schedule_bad_input(lengths, n_t, match):
    with pytest.raises(ValueError, match=match):
        budget_schedule(lengths, n_t, seed=0, task_name="t")
