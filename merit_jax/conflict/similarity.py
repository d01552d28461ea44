"""Cosine similarity matrix of task gradients, with an incremental update.

Shapes: T tasks, d sketch dimension, m tasks added in one update.

    g~_t = g_t / ||g_t||            (normalized sketch, float64)
    C[i, j] = <g~_i, g~_j>          (T x T, symmetric, diagonal 1 up to rounding)

Sketches arrive as float32. The normalization and every inner product run in
float64, so a cosine carries no more error than the sketch itself.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def normalize_sketches(sketches: ArrayLike) -> np.ndarray:
    """Return the rows of ``sketches`` [T, d] divided by their norms, as float64.

    Raises ValueError naming the rows that are not finite or have zero norm,
    because a zero gradient has no direction to compare.
    """
    rows = np.asarray(sketches, dtype=np.float64)
    if rows.ndim != 2:
        raise ValueError(f"sketches must be a 2-D array [tasks, dim], got shape {rows.shape}")
    not_finite = np.flatnonzero(~np.isfinite(rows).all(axis=1))
    if not_finite.size:
        raise ValueError(
            f"sketch rows {not_finite.tolist()} contain NaN or inf: check the loss and "
            "gradients of those tasks at theta0"
        )
    norms = np.linalg.norm(rows, axis=1)
    zero = np.flatnonzero(norms == 0.0)
    if zero.size:
        raise ValueError(
            f"sketch rows {zero.tolist()} have zero norm: those tasks produced a zero "
            "gradient (no loss tokens, or no trainable parameter receives a gradient)"
        )
    return rows / norms[:, None]


def _clipped_gram(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.clip(a @ b.T, -1.0, 1.0)


def cosine_matrix(normalized: ArrayLike) -> np.ndarray:
    """Return C = X X^T [T, T] (float64) for normalized sketches X [T, d].

    The result is made exactly symmetric by averaging with its transpose and
    clipped to [-1, 1] against rounding.
    """
    x = _as_normalized(normalized)
    gram = _clipped_gram(x, x)
    return (gram + gram.T) / 2.0


def extend_cosine_matrix(
    matrix: ArrayLike, normalized: ArrayLike, new_sketches: ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """Add m tasks to a cosine matrix without recomputing the T x T block.

    Args:
        matrix: C [T, T] of the existing tasks.
        normalized: their normalized sketches [T, d].
        new_sketches: raw (unnormalized) sketches of the new tasks [m, d].

    Returns:
        (C' [T + m, T + m], normalized sketches [T + m, d]). The new rows come
        after the existing ones, in the order of ``new_sketches``. C' equals
        ``cosine_matrix`` of the stacked normalized sketches up to float64
        rounding of the blocked products.
    """
    old = _as_normalized(normalized)
    c = np.asarray(matrix, dtype=np.float64)
    t = old.shape[0]
    if c.shape != (t, t):
        raise ValueError(
            f"matrix has shape {c.shape} but there are {t} normalized sketches: pass the "
            "matrix and the sketches of the same tasks"
        )
    new = normalize_sketches(new_sketches)
    if new.shape[1] != old.shape[1]:
        raise ValueError(
            f"new sketches have dim {new.shape[1]} but the stored ones have dim "
            f"{old.shape[1]}: sketch every task with the same SketchConfig (dim and seed)"
        )
    m = new.shape[0]
    cross = _clipped_gram(old, new)  # [T, m]
    corner = _clipped_gram(new, new)  # [m, m]
    corner = (corner + corner.T) / 2.0

    extended = np.empty((t + m, t + m), dtype=np.float64)
    extended[:t, :t] = c
    extended[:t, t:] = cross
    extended[t:, :t] = cross.T
    extended[t:, t:] = corner
    return extended, np.concatenate([old, new], axis=0)


def _as_normalized(normalized: ArrayLike) -> np.ndarray:
    x = np.asarray(normalized, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"normalized sketches must be 2-D [tasks, dim], got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1)
    off = np.flatnonzero(np.abs(norms - 1.0) > 1e-6)
    if off.size:
        raise ValueError(
            f"rows {off.tolist()} are not unit vectors (norms {norms[off].tolist()}): "
            "pass the output of normalize_sketches, not raw sketches"
        )
    return x
