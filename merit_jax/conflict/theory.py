"""Local quadratic model of weight merging: predicted gain and merged point.

Shapes: P parameters, E Hessian eigenpairs, K branches.

Around theta0, take the loss L(theta) = L* + 1/2 (theta - theta*)^T H (theta - theta*)
with H = sum_i lambda_i u_i u_i^T. Branch k ends at theta0 + delta_k, and the
merge with weights w_k (w_k >= 0, sum w_k = 1) ends at

    theta_bar = theta0 + sum_k w_k delta_k.

For any quadratic L, the weighted mean of the branch losses exceeds the loss of
the merged point by

    sum_k w_k L(theta_k) - L(theta_bar)
        = 1/2 sum_k w_k (delta_k - delta_bar)^T H (delta_k - delta_bar)
        = 1/2 sum_i lambda_i Var_w(u_i^T delta),

the curvature-weighted variance of the branches, with delta_bar = sum_k w_k delta_k
and Var_w(x) = sum_k w_k (x_k - sum_j w_j x_j)^2. This is the predicted merging
gain (Choi and Kim, "Decentralized Instruction Tuning: Conflict-Aware
Splitting and Weight Merging", arXiv 2606.01717).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

_WEIGHT_SUM_TOLERANCE = 1e-9


def check_merge_weights(weights: ArrayLike, num_branches: int | None = None) -> np.ndarray:
    """Return the weights w [K] as float64 after checking w_k >= 0 and sum w_k = 1 (to 1e-9)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise ValueError(f"merge weights must be a non-empty 1-D array [K], got shape {w.shape}")
    if num_branches is not None and w.size != num_branches:
        raise ValueError(
            f"got {w.size} merge weights for {num_branches} branches: pass one per branch"
        )
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"merge weights must be finite and non-negative, got {w.tolist()}")
    if abs(w.sum() - 1.0) > _WEIGHT_SUM_TOLERANCE:
        raise ValueError(
            f"merge weights sum to {w.sum():.12g}, not 1: divide them by their sum "
            "(token weights are w_k = N_k / sum_j N_j)"
        )
    return w


def _check_displacements(displacements: ArrayLike) -> np.ndarray:
    d = np.asarray(displacements, dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(
            f"displacements must be a 2-D array [K branches, P parameters], got shape {d.shape}"
        )
    return d


def merged_point(theta0: ArrayLike, displacements: ArrayLike, weights: ArrayLike) -> np.ndarray:
    """Return theta_bar = theta0 + sum_k w_k delta_k [P] for displacements delta [K, P]."""
    d = _check_displacements(displacements)
    w = check_merge_weights(weights, d.shape[0])
    start = np.asarray(theta0, dtype=np.float64)
    if start.shape != d.shape[1:]:
        raise ValueError(
            f"theta0 has shape {start.shape} but the displacements have {d.shape[1]} parameters"
        )
    return start + w @ d


def weighted_variance(values: ArrayLike, weights: ArrayLike) -> np.ndarray:
    """Return Var_w along axis 0: sum_k w_k (x_k - sum_j w_j x_j)^2, for values [K, ...]."""
    x = np.asarray(values, dtype=np.float64)
    w = check_merge_weights(weights, x.shape[0])
    mean = np.tensordot(w, x, axes=1)
    return np.tensordot(w, (x - mean) ** 2, axes=1)


def predicted_merging_gain(
    eigenvalues: ArrayLike,
    eigenvectors: ArrayLike,
    displacements: ArrayLike,
    weights: ArrayLike,
) -> float:
    """Return 1/2 sum_i lambda_i Var_w(u_i^T delta).

    Args:
        eigenvalues: lambda [E] of the Hessian at theta0.
        eigenvectors: U [P, E], column i is u_i (orthonormal columns).
        displacements: delta [K, P], delta_k = theta_k - theta0.
        weights: merge weights w [K].
    """
    lam = np.asarray(eigenvalues, dtype=np.float64)
    u = np.asarray(eigenvectors, dtype=np.float64)
    d = _check_displacements(displacements)
    if lam.ndim != 1 or u.shape != (d.shape[1], lam.size):
        raise ValueError(
            f"eigenvectors must have shape [P, E] = [{d.shape[1]}, {lam.size}] to match "
            f"the displacements and eigenvalues, got {u.shape}"
        )
    projections = d @ u  # [K, E], u_i^T delta_k
    return 0.5 * float(lam @ weighted_variance(projections, weights))
