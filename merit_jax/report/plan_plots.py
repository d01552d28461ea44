"""Figures of the plan step, drawn with matplotlib's Agg backend.

* :func:`plot_similarity`: the task cosine matrix C, rows and columns ordered
  by group, with the group boundaries drawn and the task names as labels;
* :func:`plot_pca`: every task at its coordinates on PCA axes 1 and 2,
  coloured by group and labelled;
* :func:`plot_calibration_curve`: mean and minimum cosine between a task
  gradient from n examples and a larger-sample reference, against n.

:func:`write_plan_plots` draws the first two into a plan directory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from merit_jax.conflict.artifacts import PlanArrays
from merit_jax.conflict.pca import PCAResult
from merit_jax.conflict.plan import Plan

_NI_PREFIX = "natural_instructions/subtask"
SIMILARITY_PLOT = "similarity.png"
PCA_PLOT = "pca.png"


def short_label(name: str) -> str:
    """Return a compact axis label: Natural Instructions subtasks become "NI 041_qasc_..."."""
    if name.startswith(_NI_PREFIX):
        return "NI " + name[len(_NI_PREFIX) :]
    return name


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _group_order(groups: Sequence[int]) -> np.ndarray:
    """Task indices sorted by group, keeping task order within a group."""
    return np.array(sorted(range(len(groups)), key=lambda t: (groups[t], t)), dtype=np.int64)


def _check_lengths(num_tasks: int, names: Sequence[str], groups: Sequence[int]) -> None:
    if len(names) != num_tasks or len(groups) != num_tasks:
        raise ValueError(
            f"got {len(names)} names and {len(groups)} group labels for {num_tasks} tasks; "
            "pass one of each per task, in the matrix's row order"
        )


def plot_similarity(
    similarity: ArrayLike, names: Sequence[str], groups: Sequence[int], path: str | Path
) -> Path:
    """Draw C [T, T] ordered by group, with group boundaries; write a PNG to ``path``.

    The colour scale is symmetric around 0 and spans the largest off-diagonal
    |cosine|, so the diagonal (always 1) does not wash out the structure.
    """
    c = np.asarray(similarity, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"similarity must be a square [T, T] matrix, got shape {c.shape}")
    num_tasks = c.shape[0]
    _check_lengths(num_tasks, names, groups)
    order = _group_order(groups)
    ordered = c[np.ix_(order, order)]
    off_diagonal = np.abs(c[~np.eye(num_tasks, dtype=bool)])
    scale = float(off_diagonal.max()) if off_diagonal.size else 1.0
    scale = scale if scale > 0 else 1.0

    plt = _pyplot()
    size = max(6.0, 0.3 * num_tasks + 3.0)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    image = ax.imshow(ordered, cmap="RdBu_r", vmin=-scale, vmax=scale, interpolation="nearest")
    labels = [f"{short_label(names[t])} [{groups[t]}]" for t in order]
    ax.set_xticks(range(num_tasks), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(num_tasks), labels, fontsize=7)
    sorted_groups = [groups[t] for t in order]
    for position in range(1, num_tasks):
        if sorted_groups[position] != sorted_groups[position - 1]:
            ax.axhline(position - 0.5, color="black", linewidth=1.5)
            ax.axvline(position - 0.5, color="black", linewidth=1.5)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="cosine (diagonal = 1, clipped)")
    ax.set_title("Task gradient cosines at theta0, ordered by group (label suffix [k]: group k)")
    fig.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=120)
    plt.close(fig)
    return target


def pca_coordinates(similarity: ArrayLike, pca: PCAResult, axes: int = 2) -> np.ndarray:
    """Return every task's coordinates on the first ``axes`` PCA axes, [T, axes].

    The same projection as ``PCAResult.embedding`` (centred rows of C times the
    eigenvectors), computed for ``axes`` axes whatever r the plan kept.
    """
    c = np.asarray(similarity, dtype=np.float64)
    axes = min(axes, pca.eigenvectors.shape[1])
    return (c - pca.column_mean[None, :]) @ pca.eigenvectors[:, :axes]


def plot_pca(
    similarity: ArrayLike,
    pca: PCAResult,
    names: Sequence[str],
    groups: Sequence[int],
    path: str | Path,
) -> Path:
    """Draw the tasks on PCA axes 1 and 2, coloured by group and labelled; write a PNG."""
    coords = pca_coordinates(similarity, pca)
    num_tasks = coords.shape[0]
    _check_lengths(num_tasks, names, groups)
    if coords.shape[1] < 2:
        coords = np.concatenate([coords, np.zeros((num_tasks, 1))], axis=1)
    ratio = pca.explained_variance_ratio

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 7))
    colours = plt.get_cmap("tab10")
    for group in sorted(set(groups)):
        members = [t for t in range(num_tasks) if groups[t] == group]
        ax.scatter(
            coords[members, 0],
            coords[members, 1],
            color=colours(group % 10),
            label=f"group {group} ({len(members)} tasks)",
            s=40,
        )
    for t in range(num_tasks):
        ax.annotate(
            short_label(names[t]),
            (coords[t, 0], coords[t, 1]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.axvline(0.0, color="grey", linewidth=0.5)
    second = f"{100 * ratio[1]:.1f}%" if ratio.size > 1 else "n/a"
    ax.set_xlabel(f"PCA axis 1 ({100 * ratio[0]:.1f}% of variance)")
    ax.set_ylabel(f"PCA axis 2 ({second} of variance)")
    ax.set_title("Tasks in the PCA coordinates of the cosine matrix")
    ax.legend(fontsize=8)
    fig.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=120)
    plt.close(fig)
    return target


def plot_calibration_curve(
    sizes: Sequence[int],
    mean_cosine: ArrayLike,
    min_cosine: ArrayLike,
    path: str | Path,
    *,
    reference_size: int,
) -> Path:
    """Draw the mean and minimum cosine to the reference gradient against n; write a PNG."""
    means = np.asarray(mean_cosine, dtype=np.float64)
    minima = np.asarray(min_cosine, dtype=np.float64)
    if not len(sizes) == means.size == minima.size or not sizes:
        raise ValueError(
            f"got {len(sizes)} sizes, {means.size} means and {minima.size} minima; "
            "pass one of each per calibration size"
        )
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(sizes, means, marker="o", label="mean over tasks")
    ax.plot(sizes, minima, marker="s", label="worst task")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(sizes), [str(n) for n in sizes])
    ax.set_xlabel("calibration examples per task (n)")
    ax.set_ylabel(f"cosine to the {reference_size}-example reference")
    ax.set_ylim(min(0.0, float(minima.min()) - 0.05), 1.0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title("Gradient estimate quality against calibration size")
    fig.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=120)
    plt.close(fig)
    return target


def write_plan_plots(out_dir: str | Path, plan: Plan, arrays: PlanArrays) -> list[Path]:
    """Draw similarity.png and pca.png of a plan into ``out_dir``; return their paths."""
    out = Path(out_dir)
    names = [task.name for task in plan.tasks]
    groups = [task.group for task in plan.tasks]
    return [
        plot_similarity(arrays.similarity, names, groups, out / SIMILARITY_PLOT),
        plot_pca(arrays.similarity, arrays.pca, names, groups, out / PCA_PLOT),
    ]
