"""Cosine matrix tests against direct numpy cosines."""

from __future__ import annotations

import numpy as np
import pytest

from merit_jax.conflict.similarity import (
    cosine_matrix,
    extend_cosine_matrix,
    normalize_sketches,
)


def random_sketches(rng: np.random.Generator, tasks: int, dim: int = 50) -> np.ndarray:
    shared = rng.standard_normal(dim)
    return (rng.standard_normal((tasks, dim)) + shared * rng.uniform(-2, 2, (tasks, 1))).astype(
        np.float32
    )


def test_cosine_matrix_matches_pairwise_cosines():
    sketches = random_sketches(np.random.default_rng(0), 7)
    matrix = cosine_matrix(normalize_sketches(sketches))
    x = sketches.astype(np.float64)
    for i in range(7):
        for j in range(7):
            expected = x[i] @ x[j] / (np.linalg.norm(x[i]) * np.linalg.norm(x[j]))
            assert matrix[i, j] == pytest.approx(expected, abs=1e-12)


def test_cosine_matrix_symmetric_unit_diagonal():
    matrix = cosine_matrix(normalize_sketches(random_sketches(np.random.default_rng(1), 9)))
    assert matrix.dtype == np.float64
    np.testing.assert_array_equal(matrix, matrix.T)
    np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-12)
    assert np.abs(matrix).max() <= 1.0


def test_normalization_is_float64():
    sketches = np.array([[3.0, 4.0], [1e-20, 0.0]], dtype=np.float32)
    normalized = normalize_sketches(sketches)
    assert normalized.dtype == np.float64
    np.testing.assert_allclose(normalized, [[0.6, 0.8], [1.0, 0.0]], atol=1e-15)


@pytest.mark.parametrize("tasks, added", [(1, 1), (4, 3), (6, 1), (2, 5)])
def test_extend_equals_full_recompute(tasks, added):
    sketches = random_sketches(np.random.default_rng(tasks * 10 + added), tasks + added)
    old_normalized = normalize_sketches(sketches[:tasks])
    old_matrix = cosine_matrix(old_normalized)
    matrix, normalized = extend_cosine_matrix(old_matrix, old_normalized, sketches[tasks:])
    full_normalized = normalize_sketches(sketches)
    np.testing.assert_allclose(normalized, full_normalized, rtol=0, atol=1e-15)
    np.testing.assert_allclose(matrix, cosine_matrix(full_normalized), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(matrix, matrix.T)
    np.testing.assert_array_equal(matrix[:tasks, :tasks], old_matrix)


def test_zero_row_rejected():
    sketches = np.ones((3, 4))
    sketches[1] = 0.0
    with pytest.raises(ValueError, match=r"rows \[1\] have zero norm"):
        normalize_sketches(sketches)


def test_nan_row_rejected():
    sketches = np.ones((3, 4))
    sketches[2, 0] = np.nan
    with pytest.raises(ValueError, match=r"rows \[2\] contain NaN"):
        normalize_sketches(sketches)


def test_extend_rejects_mismatched_dim():
    normalized = normalize_sketches(np.ones((2, 4)))
    with pytest.raises(ValueError, match="dim 5"):
        extend_cosine_matrix(cosine_matrix(normalized), normalized, np.ones((1, 5)))


def test_extend_rejects_raw_sketches():
    raw = np.full((2, 4), 3.0)
    with pytest.raises(ValueError, match="not unit vectors"):
        extend_cosine_matrix(np.ones((2, 2)), raw, np.ones((1, 4)))


def test_extend_rejects_wrong_matrix_shape():
    normalized = normalize_sketches(np.eye(3))
    with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
        extend_cosine_matrix(np.eye(2), normalized, np.ones((1, 3)))
