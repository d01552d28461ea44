"""Partitioner tests: hand-made cases, balance properties, determinism and errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from merit_jax.conflict.partition import (
    PARTITIONERS,
    PartitionError,
    get_partitioner,
    greedy_conflict_partition,
    group_of_task,
    joint_partition,
    kmeans_partition,
    merit_partition,
    partition_tasks,
    random_partition,
    validate_groups,
    weighted_median_split,
)


def group_weights(groups, weights):
    return [sum(weights[t] for t in group) for group in groups]


def within_group_cosine_sum(groups, c):
    return sum(c[i, j] for group in groups for i, j in itertools.combinations(group, 2))


# --------------------------------------------------------------------------- weighted median


def test_median_split_equal_weights():
    left, right = weighted_median_split([3.0, 1.0, 2.0, 4.0], [1, 1, 1, 1], [0, 1, 2, 3])
    assert left == (1, 2)
    assert right == (0, 3)


def test_median_split_heavy_task_alone():
    left, right = weighted_median_split([0.0, 1.0, 2.0, 3.0], [5, 1, 1, 1], [0, 1, 2, 3])
    assert left == (0,)
    assert right == (1, 2, 3)


def test_median_split_heavy_task_on_right():
    left, right = weighted_median_split([0.0, 1.0, 2.0, 3.0], [1, 1, 1, 2], [0, 1, 2, 3])
    # Cuts give |1-4|, |2-3|, |3-2|: cuts 2 and 3 tie, and the first one wins.
    assert left == (0, 1)
    assert right == (2, 3)


def test_median_split_coordinate_ties_broken_by_index():
    left, right = weighted_median_split([1.0, 1.0, 1.0, 1.0], [1, 1, 1, 1], [3, 0, 2, 1])
    assert left == (0, 1)
    assert right == (2, 3)


def test_median_split_imbalance_tie_takes_first_cut():
    left, right = weighted_median_split([0.0, 1.0, 2.0], [1, 2, 1], [0, 1, 2])
    assert left == (0,)
    assert right == (1, 2)


def test_median_split_odd_count():
    left, right = weighted_median_split(np.arange(5.0), np.ones(5), np.arange(5))
    assert left == (0, 1)
    assert right == (2, 3, 4)


def test_median_split_uses_task_indices():
    left, right = weighted_median_split([2.0, -1.0], [1, 1], [10, 20])
    assert left == (20,)
    assert right == (10,)


def test_median_split_needs_two_tasks():
    with pytest.raises(PartitionError, match="cannot split 1 task"):
        weighted_median_split([0.0], [1], [0])


# --------------------------------------------------------------------------- MERIT


def test_merit_r1_splits_first_axis():
    embedding = np.array([[0.5, 9.0], [-1.0, 0.0], [2.0, -9.0], [-3.0, 1.0]])
    groups = merit_partition(weights=[1, 1, 1, 1], embedding=embedding, r=1)
    assert groups == ((1, 3), (0, 2))


def test_merit_r2_binary_code_order():
    # Task t sits at (axis 1, axis 2) = code bits; the order is (low, low), (low, high), ...
    embedding = np.array([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    groups = merit_partition(weights=[1, 1, 1, 1], embedding=embedding, r=2)
    assert groups == ((1,), (3,), (2,), (0,))


def test_merit_r3_one_task_per_octant():
    codes = np.array(list(itertools.product([0.0, 1.0], repeat=3)))
    order = np.random.default_rng(0).permutation(8)
    embedding = codes[order]  # task t has code codes[order[t]]
    groups = merit_partition(weights=np.ones(8), embedding=embedding, r=3)
    expected = tuple((int(np.flatnonzero(order == code)[0]),) for code in range(8))
    assert groups == expected


def test_merit_weighted_hand_case():
    # Axis 1 order: 0, 1, 2, 3, 4, 5 with weights 4, 1, 1, 1, 1, 4 (total 12).
    # Cut 3 gives 6 | 6. Left (0, 1, 2) along axis 2 (values 0, 2, 1): order 0, 2, 1 with
    # weights 4, 1, 1: cuts 4|2 and 5|1, so 0 | 1, 2. Right (3, 4, 5) along axis 2
    # (values 5, 4, 3): order 5, 4, 3 with weights 4, 1, 1, so 5 | 3, 4.
    embedding = np.array([[0.0, 0.0], [1.0, 2.0], [2.0, 1.0], [3.0, 5.0], [4.0, 4.0], [5.0, 3.0]])
    groups = merit_partition(weights=[4, 1, 1, 1, 1, 4], embedding=embedding, r=2)
    assert groups == ((0,), (1, 2), (5,), (3, 4))


def test_merit_equal_weights_sizes_differ_by_one():
    embedding = np.random.default_rng(1).standard_normal((13, 2))
    groups = merit_partition(weights=np.ones(13), embedding=embedding, r=2)
    assert sorted(len(g) for g in groups) == [3, 3, 3, 4]
    validate_groups(groups, 13)


@pytest.mark.parametrize("seed", range(5))
def test_merit_first_split_balanced_and_ordered(seed):
    rng = np.random.default_rng(seed)
    weights = rng.integers(1, 100, 31)
    embedding = rng.standard_normal((31, 3))
    groups = merit_partition(weights=weights, embedding=embedding, r=1)
    left, right = groups
    imbalance = abs(sum(weights[list(left)]) - sum(weights[list(right)]))
    assert imbalance <= weights.max()
    assert embedding[list(left), 0].max() <= embedding[list(right), 0].min()
    # No other cut along axis 1 balances better.
    order = np.lexsort((np.arange(31), embedding[:, 0]))
    best = min(abs(2 * weights[order[:c]].sum() - weights.sum()) for c in range(1, 31))
    assert imbalance == best


@pytest.mark.parametrize("seed", range(3))
def test_merit_r3_recursive_balance(seed):
    rng = np.random.default_rng(seed)
    weights = rng.integers(1, 20, 40)
    embedding = rng.standard_normal((40, 3))
    groups = merit_partition(weights=weights, embedding=embedding, r=3)
    assert len(groups) == 8
    validate_groups(groups, 40)
    # Siblings (codes 2i, 2i+1) come from one split along axis 3.
    for k in range(0, 8, 2):
        low, high = groups[k], groups[k + 1]
        assert embedding[list(low), 2].max() <= embedding[list(high), 2].min()
        difference = abs(weights[list(low)].sum() - weights[list(high)].sum())
        assert difference <= weights[list(low + high)].max()


def test_merit_is_deterministic():
    rng = np.random.default_rng(7)
    weights, embedding = rng.integers(1, 9, 20), rng.standard_normal((20, 2))
    first = merit_partition(weights=weights, embedding=embedding, r=2)
    assert merit_partition(weights=weights, embedding=embedding, r=2) == first
    assert merit_partition(weights=weights, embedding=embedding, r=2, seed=99) == first


def test_merit_too_few_tasks():
    with pytest.raises(PartitionError, match=r"2\^r = 4 tasks, got T = 3: use r <= 1"):
        merit_partition(weights=[1, 1, 1], embedding=np.zeros((3, 2)), r=2)


def test_merit_empty_group_error():
    embedding = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    with pytest.raises(PartitionError, match=r"group 0 contains only task\(s\) \[0\]"):
        merit_partition(weights=[100, 1, 1, 1], embedding=embedding, r=2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"weights": [1, 0, 1, 1], "embedding": np.zeros((4, 1)), "r": 1}, "positive"),
        ({"weights": [1, 1, 1, 1], "embedding": np.zeros((4, 1)), "r": 0}, "r = 0"),
        ({"weights": [1, 1, 1, 1], "embedding": None, "r": 1}, "needs the PCA embedding"),
        ({"weights": [1, 1, 1, 1], "embedding": np.zeros((4, 1)), "r": 2}, r"\[4, >= 2\]"),
        ({"weights": [1, 1], "embedding": [[np.nan], [0.0]], "r": 1}, "NaN"),
    ],
)
def test_merit_invalid_input(kwargs, message):
    with pytest.raises(PartitionError, match=message):
        merit_partition(**kwargs)


# --------------------------------------------------------------------------- random


def test_random_deterministic_and_seeded():
    weights = np.arange(1, 21)
    first = random_partition(weights=weights, r=2, seed=3)
    assert random_partition(weights=weights, r=2, seed=3) == first
    assert random_partition(weights=weights, r=2, seed=4) != first
    validate_groups(first, 20)


@pytest.mark.parametrize("seed", range(5))
def test_random_balanced_by_weight(seed):
    weights = np.random.default_rng(seed).integers(1, 50, 17)
    groups = random_partition(weights=weights, r=2, seed=seed)
    loads = group_weights(groups, weights)
    assert len(groups) == 4
    assert min(len(g) for g in groups) >= 1
    assert max(loads) - min(loads) <= weights.max()


def test_random_too_few_tasks():
    with pytest.raises(PartitionError, match="use the joint partitioner"):
        random_partition(weights=[1], r=1, seed=0)


# --------------------------------------------------------------------------- k-means


def test_kmeans_recovers_separated_clusters():
    rng = np.random.default_rng(0)
    centers = np.array([[10.0, 0.0], [-10.0, 0.0], [0.0, 10.0], [0.0, -10.0]])
    labels = rng.permutation(np.repeat(np.arange(4), 3))
    embedding = centers[labels] + 0.1 * rng.standard_normal((12, 2))
    groups = kmeans_partition(weights=np.ones(12), embedding=embedding, r=2, seed=0)
    expected = sorted(
        (tuple(np.flatnonzero(labels == c).tolist()) for c in range(4)), key=lambda g: g[0]
    )
    assert groups == tuple(expected)


def test_kmeans_deterministic():
    embedding = np.random.default_rng(2).standard_normal((15, 2))
    first = kmeans_partition(weights=np.ones(15), embedding=embedding, r=2, seed=5)
    assert kmeans_partition(weights=np.ones(15), embedding=embedding, r=2, seed=5) == first
    validate_groups(first, 15)
    assert [g[0] for g in first] == sorted(g[0] for g in first)


def test_kmeans_duplicate_points_fill_every_group():
    groups = kmeans_partition(weights=np.ones(4), embedding=np.zeros((4, 2)), r=2, seed=0)
    assert sorted(len(g) for g in groups) == [1, 1, 1, 1]


def test_kmeans_lloyd_fixed_point():
    rng = np.random.default_rng(3)
    embedding = rng.standard_normal((20, 2))
    groups = kmeans_partition(weights=np.ones(20), embedding=embedding, r=2, seed=1)
    centers = np.array([embedding[list(g)].mean(axis=0) for g in groups])
    nearest = np.argmin(((embedding[:, None] - centers[None]) ** 2).sum(axis=2), axis=1)
    np.testing.assert_array_equal(nearest, group_of_task(groups, 20))


# --------------------------------------------------------------------------- greedy conflict


def block_cosines(labels: np.ndarray, inside: float, across: float) -> np.ndarray:
    same = labels[:, None] == labels[None, :]
    c = np.where(same, inside, across)
    np.fill_diagonal(c, 1.0)
    return c


def test_greedy_separates_two_blocks():
    labels = np.array([0, 1, 0, 1, 0, 1])
    c = block_cosines(labels, 0.9, -0.5)
    groups = greedy_conflict_partition(weights=np.ones(6), similarity=c, r=1)
    assert groups == ((0, 2, 4), (1, 3, 5))


def test_greedy_balanced_sizes_odd_count():
    c = np.random.default_rng(0).uniform(-1, 1, (7, 7))
    c = (c + c.T) / 2
    np.fill_diagonal(c, 1.0)
    groups = greedy_conflict_partition(weights=np.ones(7), similarity=c, r=2)
    assert sorted(len(g) for g in groups) == [1, 2, 2, 2]
    validate_groups(groups, 7)


@pytest.mark.parametrize("seed", range(4))
def test_greedy_no_improving_swap(seed):
    rng = np.random.default_rng(seed)
    c = rng.uniform(-1, 1, (10, 10))
    c = (c + c.T) / 2
    np.fill_diagonal(c, 1.0)
    groups = greedy_conflict_partition(weights=np.ones(10), similarity=c, r=2)
    score = within_group_cosine_sum(groups, c)
    for a, b in itertools.combinations(range(len(groups)), 2):
        for i in groups[a]:
            for j in groups[b]:
                swapped = [list(g) for g in groups]
                swapped[a] = [j if t == i else t for t in swapped[a]]
                swapped[b] = [i if t == j else t for t in swapped[b]]
                assert within_group_cosine_sum(swapped, c) <= score + 1e-9


def test_greedy_finds_planted_optimum():
    rng = np.random.default_rng(5)
    labels = rng.permutation(np.repeat([0, 1], 4))
    c = block_cosines(labels, 0.6, -0.3) + 0.05 * rng.standard_normal((8, 8))
    c = (c + c.T) / 2
    groups = greedy_conflict_partition(weights=np.ones(8), similarity=c, r=1)
    best = max(
        within_group_cosine_sum((left, tuple(sorted(set(range(8)) - set(left)))), c)
        for left in itertools.combinations(range(8), 4)
    )
    assert within_group_cosine_sum(groups, c) == pytest.approx(best)


def test_greedy_needs_similarity():
    with pytest.raises(PartitionError, match="pass similarity="):
        greedy_conflict_partition(weights=np.ones(4), similarity=None, r=1)


# --------------------------------------------------------------------------- joint and registry


def test_joint_single_group():
    assert joint_partition(weights=[3, 1, 2]) == ((0, 1, 2),)


def test_registry_names():
    assert set(PARTITIONERS) == {"merit", "random", "kmeans", "greedy_conflict", "joint"}


def test_unknown_partitioner_lists_choices():
    with pytest.raises(ValueError, match=r"unknown partitioner 'pca'.*'merit'"):
        get_partitioner("pca")


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_every_partitioner_covers_tasks(name):
    rng = np.random.default_rng(11)
    weights = rng.integers(1, 30, 12)
    embedding = rng.standard_normal((12, 2))
    c = np.corrcoef(rng.standard_normal((12, 30)))
    groups = partition_tasks(name, weights=weights, embedding=embedding, similarity=c, r=2, seed=1)
    validate_groups(groups, 12)
    assert len(groups) == (1 if name == "joint" else 4)
    again = partition_tasks(name, weights=weights, embedding=embedding, similarity=c, r=2, seed=1)
    assert again == groups


# --------------------------------------------------------------------------- group checks


@pytest.mark.parametrize(
    "groups, message",
    [
        (((0, 1), ()), "group 1 is empty"),
        (((0, 1), (1, 2)), "task 1 is in groups 0 and 1"),
        (((0,), (1,)), r"tasks \[2\] are in no group"),
        (((0, 1, 2, 5),), "outside"),
    ],
)
def test_validate_groups_errors(groups, message):
    with pytest.raises(PartitionError, match=message):
        validate_groups(groups, 3)


def test_group_of_task():
    np.testing.assert_array_equal(group_of_task(((1, 3), (0, 2)), 4), [1, 0, 1, 0])
