"""Column-centred PCA of the task cosine matrix.

Each row C[t] of the cosine matrix C [T, T] describes task t by its cosines to
all tasks. The PCA treats the T rows as observations of T variables:

    X_c = C - 1 mu^T,  mu[j] = mean_t C[t, j]     (centre every column)
    Sigma = X_c^T X_c / T                        (population covariance, T x T)
    Sigma = V diag(lambda) V^T,  lambda_1 >= lambda_2 >= ... (numpy.linalg.eigh)
    z_t = X_c[t] @ V[:, :r]                      (embedding of task t, r coordinates)

The divisor T (not T - 1) scales the eigenvalues only. The embedding and the
explained variance ratios lambda_i / sum(lambda) do not depend on it.

Sign convention: an eigenvector is flipped so that its entry of largest
absolute value is positive. Entries within 1e-12 (relative) of that maximum
count as ties, and the one with the lowest index decides. Within a repeated
eigenvalue the eigenvectors are not unique, and no convention can fix them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from numpy.typing import ArrayLike

_SYMMETRY_TOLERANCE = 1e-8
_SIGN_TIE_TOLERANCE = 1e-12


@dataclasses.dataclass(frozen=True, eq=False)
class PCAResult:
    """PCA of a cosine matrix (all arrays float64).

    Attributes:
        column_mean: mu [T], the column means removed before the PCA.
        eigenvalues: all T eigenvalues of Sigma, descending.
        eigenvectors: V [T, T], column i belongs to eigenvalue i, sign-fixed.
        embedding: z [T, r], row t is the embedding of task t.
        explained_variance_ratio: lambda_i / sum(lambda) [T]; all zeros when C
            has no variance (every row equal).
    """

    column_mean: np.ndarray
    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    embedding: np.ndarray
    explained_variance_ratio: np.ndarray

    @property
    def num_components(self) -> int:
        """Number r of kept components."""
        return int(self.embedding.shape[1])


def fix_signs(vectors: np.ndarray) -> np.ndarray:
    """Flip each column so that its entry of largest absolute value is positive.

    Ties within a relative 1e-12 of the maximum go to the lowest row index.
    """
    fixed = np.array(vectors, dtype=np.float64, copy=True)
    for i in range(fixed.shape[1]):
        magnitude = np.abs(fixed[:, i])
        peak = magnitude.max(initial=0.0)
        if peak == 0.0:
            continue
        pivot = int(np.flatnonzero(magnitude >= peak * (1.0 - _SIGN_TIE_TOLERANCE))[0])
        if fixed[pivot, i] < 0:
            fixed[:, i] = -fixed[:, i]
    return fixed


def validate_cosine_matrix(matrix: ArrayLike) -> np.ndarray:
    """Return ``matrix`` as float64 after checking that it is square, finite and symmetric."""
    c = np.asarray(matrix, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"the cosine matrix must be square [T, T], got shape {c.shape}")
    if c.shape[0] == 0:
        raise ValueError("the cosine matrix is empty: at least one task is needed")
    if not np.isfinite(c).all():
        raise ValueError("the cosine matrix contains NaN or inf: recompute it from finite sketches")
    asymmetry = float(np.abs(c - c.T).max())
    if asymmetry > _SYMMETRY_TOLERANCE:
        raise ValueError(
            f"the cosine matrix is not symmetric (max |C - C^T| = {asymmetry:.3g}): "
            "build it with similarity.cosine_matrix"
        )
    return c


def conflict_pca(matrix: ArrayLike, num_components: int) -> PCAResult:
    """Run the column-centred PCA of a cosine matrix C [T, T] and keep r components.

    Args:
        matrix: the symmetric cosine matrix C.
        num_components: r, with 1 <= r <= T.
    """
    c = validate_cosine_matrix(matrix)
    t = c.shape[0]
    if not 1 <= num_components <= t:
        raise ValueError(
            f"num_components (PCA dimension r) = {num_components} is out of range for "
            f"{t} tasks: use 1 <= r <= {t}"
        )
    column_mean = c.mean(axis=0)
    centered = c - column_mean[None, :]
    covariance = centered.T @ centered / t
    covariance = (covariance + covariance.T) / 2.0

    eigenvalues, eigenvectors = np.linalg.eigh(covariance)  # ascending
    order = np.argsort(-eigenvalues, kind="stable")
    eigenvalues = eigenvalues[order]
    eigenvectors = fix_signs(eigenvectors[:, order])
    # Sigma is positive semi-definite, so negative eigenvalues are rounding error.
    eigenvalues = np.maximum(eigenvalues, 0.0)

    total = float(eigenvalues.sum())
    ratio = eigenvalues / total if total > 0.0 else np.zeros_like(eigenvalues)
    embedding = centered @ eigenvectors[:, :num_components]
    return PCAResult(
        column_mean=column_mean,
        eigenvalues=eigenvalues,
        eigenvectors=eigenvectors,
        embedding=embedding,
        explained_variance_ratio=ratio,
    )
