"""Partitioners: split T tasks into K disjoint, non-empty groups.

A partition is a tuple of K groups, each a sorted tuple of task indices in
[0, T). Every partitioner takes the same keyword arguments and ignores those
it does not need:

    weights     s_t [T], sample counts (positive)
    embedding   z [T, >= r], PCA embedding of the cosine matrix
    similarity  C [T, T], cosine matrix of the task gradients
    r           PCA dimension; K = 2^r groups (except "joint": K = 1)
    seed        seed of the random baselines

Registry (``PARTITIONERS``):

    merit            recursive sample-weighted median split along PCA axes 1..r
    random           random task order, balanced by sample count (seeded)
    kmeans           k-means with k-means++ initialization on z (seeded)
    greedy_conflict  balanced groups maximizing the within-group cosine sum
    joint            one group with every task (joint training)
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from numpy.typing import ArrayLike

Groups = tuple[tuple[int, ...], ...]


class PartitionError(ValueError):
    """A partition cannot be built from the given tasks and settings."""


class Partitioner(Protocol):
    """Signature shared by every entry of ``PARTITIONERS``."""

    def __call__(
        self,
        *,
        weights: ArrayLike,
        embedding: ArrayLike | None,
        similarity: ArrayLike | None,
        r: int,
        seed: int,
    ) -> Groups: ...


# --------------------------------------------------------------------------- inputs


def _check_weights(weights: ArrayLike) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise PartitionError(f"weights must be a non-empty 1-D array [T], got shape {w.shape}")
    bad = np.flatnonzero(~np.isfinite(w) | (w <= 0))
    if bad.size:
        raise PartitionError(
            f"weights (sample counts s_t) must be positive and finite; tasks {bad.tolist()} "
            f"have {w[bad].tolist()}: drop empty tasks before partitioning"
        )
    return w


def _check_r(r: int) -> int:
    if r < 1:
        raise PartitionError(f"r = {r} is invalid: the number of PCA axes must be >= 1")
    return 2**r


def _check_enough_tasks(num_tasks: int, r: int, name: str) -> int:
    k = _check_r(r)
    if num_tasks < k:
        max_r = int(np.floor(np.log2(num_tasks)))
        fix = f"use r <= {max_r}" if max_r >= 1 else "use the joint partitioner"
        raise PartitionError(
            f"{name} with r = {r} needs at least 2^r = {k} tasks, got T = {num_tasks}: {fix}"
        )
    return k


def _check_embedding(embedding: ArrayLike | None, num_tasks: int, r: int, name: str) -> np.ndarray:
    if embedding is None:
        raise PartitionError(f"the {name} partitioner needs the PCA embedding; pass embedding=")
    z = np.asarray(embedding, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] != num_tasks or z.shape[1] < r:
        raise PartitionError(
            f"embedding has shape {z.shape}; the {name} partitioner needs [T, >= r] = "
            f"[{num_tasks}, >= {r}]"
        )
    if not np.isfinite(z).all():
        raise PartitionError("the embedding contains NaN or inf: recompute the PCA")
    return z[:, :r]


def _check_similarity(similarity: ArrayLike | None, num_tasks: int) -> np.ndarray:
    if similarity is None:
        raise PartitionError(
            "the greedy_conflict partitioner needs the cosine matrix; pass similarity="
        )
    c = np.asarray(similarity, dtype=np.float64)
    if c.shape != (num_tasks, num_tasks):
        raise PartitionError(
            f"similarity has shape {c.shape}, expected [T, T] = [{num_tasks}, {num_tasks}]"
        )
    if not np.isfinite(c).all():
        raise PartitionError("the cosine matrix contains NaN or inf: recompute it")
    return c


def validate_groups(groups: Groups, num_tasks: int) -> None:
    """Raise PartitionError unless ``groups`` are non-empty, disjoint and cover 0..T-1."""
    problems = []
    seen: dict[int, int] = {}
    for k, group in enumerate(groups):
        if not group:
            problems.append(f"group {k} is empty")
        for t in group:
            if not 0 <= t < num_tasks:
                problems.append(f"group {k} contains task index {t}, outside [0, {num_tasks})")
            elif t in seen:
                problems.append(f"task {t} is in groups {seen[t]} and {k}")
            else:
                seen[t] = k
    missing = sorted(set(range(num_tasks)) - set(seen))
    if missing:
        problems.append(f"tasks {missing} are in no group")
    if problems:
        raise PartitionError("invalid partition: " + "; ".join(problems))


def group_of_task(groups: Groups, num_tasks: int) -> np.ndarray:
    """Return the group index of every task [T] (int64)."""
    validate_groups(groups, num_tasks)
    assignment = np.empty(num_tasks, dtype=np.int64)
    for k, group in enumerate(groups):
        assignment[list(group)] = k
    return assignment


def _as_groups(members: list[list[int]] | list[np.ndarray]) -> Groups:
    return tuple(tuple(sorted(int(t) for t in group)) for group in members)


# --------------------------------------------------------------------------- MERIT


def weighted_median_split(
    coordinates: ArrayLike, weights: ArrayLike, task_indices: ArrayLike
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Split tasks in two at the sample-weighted median of one coordinate.

    The tasks are sorted by coordinate, ties broken by task index. Among the
    cuts that leave both sides non-empty (the first c tasks go left, 1 <= c < n),
    the cut minimizing |left weight - right weight| wins; when several cuts tie,
    the one with the fewest tasks on the left wins.

    Returns:
        (left, right): sorted task indices, left holding the lower coordinates.
    """
    x = np.asarray(coordinates, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    idx = np.asarray(task_indices, dtype=np.int64)
    if not x.shape == w.shape == idx.shape or x.ndim != 1:
        raise PartitionError(
            f"coordinates, weights and task indices must be 1-D of equal length, got "
            f"shapes {x.shape}, {w.shape}, {idx.shape}"
        )
    if x.size < 2:
        raise PartitionError(f"cannot split {x.size} task(s) into two non-empty sides")
    order = np.lexsort((idx, x))  # primary key: coordinate, then task index
    left_weight = np.cumsum(w[order])[:-1]  # weight left of cut c = 1..n-1
    imbalance = np.abs(2.0 * left_weight - w.sum())
    cut = int(np.argmin(imbalance)) + 1  # argmin returns the first minimum
    sorted_idx = idx[order]
    return tuple(sorted(sorted_idx[:cut].tolist())), tuple(sorted(sorted_idx[cut:].tolist()))


def merit_partition(
    *,
    weights: ArrayLike,
    embedding: ArrayLike | None,
    similarity: ArrayLike | None = None,
    r: int,
    seed: int = 0,
) -> Groups:
    """Split recursively at the sample-weighted median along PCA axes 1, 2, ..., r.

    Every group of the previous level is split along the next axis, so K = 2^r
    groups come out. The bits of k, axis 1 as the most significant bit, give the
    side of each cut that group k lies on, with bit 0 for the lower side. For r = 2 the
    order is (low, low), (low, high), (high, low), (high, high).

    Raises PartitionError when T < 2^r, or when a group has a single task left
    before a later split, which happens when a few tasks carry most of the
    sample weight.
    """
    del similarity, seed
    w = _check_weights(weights)
    num_tasks = w.size
    _check_enough_tasks(num_tasks, r, "the merit partitioner")
    z = _check_embedding(embedding, num_tasks, r, "merit")

    groups: list[tuple[int, ...]] = [tuple(range(num_tasks))]
    for axis in range(r):
        split: list[tuple[int, ...]] = []
        for code, group in enumerate(groups):
            if len(group) < 2:
                raise PartitionError(
                    f"group {code} contains only task(s) {list(group)} before the split along "
                    f"PCA axis {axis + 1} of {r}, so a group would be empty: the sample "
                    f"weights are too uneven for r = {r}; use a smaller r or cap the large tasks"
                )
            members = np.asarray(group)
            left, right = weighted_median_split(z[members, axis], w[members], members)
            split.extend([left, right])
        groups = split
    return tuple(groups)


# --------------------------------------------------------------------------- baselines


def random_partition(
    *,
    weights: ArrayLike,
    embedding: ArrayLike | None = None,
    similarity: ArrayLike | None = None,
    r: int,
    seed: int,
) -> Groups:
    """Assign tasks in a seeded random order, each to the group with the least sample weight.

    Ties go to the lowest group index. The first K tasks fill the K empty groups,
    so no group is empty when T >= K = 2^r.
    """
    del embedding, similarity
    w = _check_weights(weights)
    k = _check_enough_tasks(w.size, r, "the random partitioner")
    order = np.random.default_rng(seed).permutation(w.size)
    loads = np.zeros(k)
    members: list[list[int]] = [[] for _ in range(k)]
    for t in order:
        target = int(np.argmin(loads))
        members[target].append(int(t))
        loads[target] += w[t]
    return _as_groups(members)


def _kmeans_plus_plus(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    n = points.shape[0]
    centers = [points[int(rng.integers(n))]]
    nearest = ((points - centers[0]) ** 2).sum(axis=1)
    for _ in range(1, k):
        total = nearest.sum()
        if total > 0:
            choice = int(rng.choice(n, p=nearest / total))
        else:  # every point sits on a center already
            choice = int(rng.integers(n))
        centers.append(points[choice])
        nearest = np.minimum(nearest, ((points - points[choice]) ** 2).sum(axis=1))
    return np.array(centers)


def _fill_empty_clusters(
    points: np.ndarray, labels: np.ndarray, centers: np.ndarray, k: int
) -> None:
    # Move the point farthest from its own center (among clusters with >= 2
    # points) into each empty cluster, so that every group is non-empty.
    for cluster in range(k):
        if np.any(labels == cluster):
            continue
        counts = np.bincount(labels, minlength=k)
        distance = ((points - centers[labels]) ** 2).sum(axis=1)
        distance[counts[labels] < 2] = -1.0
        donor = int(np.argmax(distance))
        labels[donor] = cluster
        centers[cluster] = points[donor]


def _lloyd(points: np.ndarray, centers: np.ndarray, max_iter: int) -> tuple[np.ndarray, float]:
    k = centers.shape[0]
    labels = np.full(points.shape[0], -1)
    for _ in range(max_iter):
        distance = ((points[:, None, :] - centers[None, :, :]) ** 2).sum(axis=2)
        new_labels = np.argmin(distance, axis=1)
        _fill_empty_clusters(points, new_labels, centers, k)
        converged = np.array_equal(new_labels, labels)
        labels = new_labels
        centers = np.array([points[labels == c].mean(axis=0) for c in range(k)])
        if converged:
            break
    inertia = float(((points - centers[labels]) ** 2).sum())
    return labels, inertia


def kmeans_partition(
    *,
    weights: ArrayLike,
    embedding: ArrayLike | None,
    similarity: ArrayLike | None = None,
    r: int,
    seed: int,
    num_init: int = 10,
    max_iter: int = 300,
) -> Groups:
    """Cluster the embedding z [T, r] into K = 2^r groups with k-means.

    Plain (unweighted) Lloyd iterations from ``num_init`` k-means++ starts drawn
    from ``numpy.random.default_rng(seed)``; the start with the lowest inertia
    wins (the first on ties). Groups are not balanced by sample count. An empty
    cluster takes the point farthest from its own center. Groups are ordered by
    their smallest task index.
    """
    del similarity
    w = _check_weights(weights)
    k = _check_enough_tasks(w.size, r, "the kmeans partitioner")
    z = _check_embedding(embedding, w.size, r, "kmeans")
    rng = np.random.default_rng(seed)
    best_labels: np.ndarray | None = None
    best_inertia = np.inf
    for _ in range(num_init):
        labels, inertia = _lloyd(z, _kmeans_plus_plus(z, k, rng), max_iter)
        if inertia < best_inertia:
            best_labels, best_inertia = labels, inertia
    assert best_labels is not None
    members = [np.flatnonzero(best_labels == c) for c in range(k)]
    return tuple(sorted(_as_groups(members), key=lambda group: group[0]))


def _greedy_seeds(c: np.ndarray, k: int) -> list[int]:
    # Farthest-point seeding on cosines: start from the most conflicting pair,
    # then add the task whose largest cosine to the seeds is smallest.
    n = c.shape[0]
    off_diagonal = c + np.diag(np.full(n, np.inf))
    i, j = np.unravel_index(int(np.argmin(off_diagonal)), c.shape)
    seeds = [int(min(i, j)), int(max(i, j))][:k]
    while len(seeds) < k:
        closeness = c[:, seeds].max(axis=1)
        closeness[seeds] = np.inf
        seeds.append(int(np.argmin(closeness)))
    return seeds


def greedy_conflict_partition(
    *,
    weights: ArrayLike,
    embedding: ArrayLike | None = None,
    similarity: ArrayLike | None,
    r: int,
    seed: int = 0,
) -> Groups:
    """Group tasks so that conflicting tasks (negative cosine) land in different groups.

    Objective: maximize J = sum over groups k of sum over pairs i < j in group k
    of C[i, j], with group sizes floor(T/K) or ceil(T/K) (balanced task counts,
    not sample counts). Since the sum over all pairs is fixed, this also
    minimizes the cosine sum across groups. Steps, all deterministic:

    1. Seeds: the two tasks of the most negative pair, then repeatedly the task
       whose largest cosine to the seeds is smallest, one seed per group.
    2. Greedy fill: repeatedly place the unassigned task and open group with the
       largest gain sum_{j in group} C[t, j] (ties: lowest task, then group).
    3. Local search: apply the best swap of two tasks in different groups while
       it raises J by more than 1e-12; swaps keep the sizes.
    """
    del embedding, seed
    w = _check_weights(weights)
    n = w.size
    k = _check_enough_tasks(n, r, "the greedy_conflict partitioner")
    c = _check_similarity(similarity, n)

    labels = np.full(n, -1)
    for seed_group, seed_task in enumerate(_greedy_seeds(c, k)):
        labels[seed_task] = seed_group
    small, extra = divmod(n, k)  # `extra` groups get small + 1 tasks
    while np.any(labels < 0):
        sizes = np.bincount(labels[labels >= 0], minlength=k)
        full = int(np.sum(sizes == small + 1)) if extra else 0
        open_groups = (sizes < small) | ((sizes == small) & (full < extra))
        onehot = (labels[:, None] == np.arange(k)[None, :]).astype(np.float64)
        gain = c @ onehot  # [T, K]
        gain[labels >= 0, :] = -np.inf
        gain[:, ~open_groups] = -np.inf
        task, group = np.unravel_index(int(np.argmax(gain)), gain.shape)
        labels[task] = group

    diagonal = np.diag(c)
    for _ in range(10 * n * n):
        onehot = (labels[:, None] == np.arange(k)[None, :]).astype(np.float64)
        affinity = c @ onehot  # affinity[i, g] = sum of C[i, j] over j in group g
        own = affinity[np.arange(n), labels]  # [T]
        to_other = affinity[:, labels]  # [i, j] = affinity of i to j's group
        delta = (
            to_other
            - own[:, None]
            + to_other.T
            - own[None, :]
            - 2.0 * c
            + diagonal[:, None]
            + diagonal[None, :]
        )
        delta[labels[:, None] == labels[None, :]] = -np.inf
        best = int(np.argmax(delta))
        if delta.flat[best] <= 1e-12:
            break
        i, j = np.unravel_index(best, delta.shape)
        labels[i], labels[j] = labels[j], labels[i]
    return _as_groups([np.flatnonzero(labels == g) for g in range(k)])


def joint_partition(
    *,
    weights: ArrayLike,
    embedding: ArrayLike | None = None,
    similarity: ArrayLike | None = None,
    r: int = 0,
    seed: int = 0,
) -> Groups:
    """Return one group with every task: the joint-training baseline."""
    del embedding, similarity, r, seed
    w = _check_weights(weights)
    return (tuple(range(w.size)),)


PARTITIONERS: dict[str, Partitioner] = {
    "merit": merit_partition,
    "random": random_partition,
    "kmeans": kmeans_partition,
    "greedy_conflict": greedy_conflict_partition,
    "joint": joint_partition,
}


def get_partitioner(name: str) -> Partitioner:
    """Look up a partitioner by registry name."""
    try:
        return PARTITIONERS[name]
    except KeyError:
        raise ValueError(
            f"unknown partitioner {name!r}: choose one of {sorted(PARTITIONERS)}"
        ) from None


def partition_tasks(
    name: str,
    *,
    weights: ArrayLike,
    embedding: ArrayLike | None = None,
    similarity: ArrayLike | None = None,
    r: int,
    seed: int = 0,
) -> Groups:
    """Run the partitioner ``name`` and check the result covers every task exactly once."""
    groups = get_partitioner(name)(
        weights=weights, embedding=embedding, similarity=similarity, r=r, seed=seed
    )
    validate_groups(groups, np.asarray(weights).size)
    return groups
