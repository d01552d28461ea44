"""Column-centred PCA tests against numpy's SVD of the centred matrix."""

from __future__ import annotations

import numpy as np
import pytest

from merit_jax.conflict.pca import conflict_pca, fix_signs
from merit_jax.conflict.similarity import cosine_matrix, normalize_sketches


def random_cosines(seed: int, tasks: int, dim: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((3, dim))
    sketches = centers[rng.integers(0, 3, tasks)] + 0.7 * rng.standard_normal((tasks, dim))
    return cosine_matrix(normalize_sketches(sketches))


def svd_reference(matrix: np.ndarray):
    centered = matrix - matrix.mean(axis=0)
    u, singular, vt = np.linalg.svd(centered)
    return centered, u, singular, vt


@pytest.mark.parametrize("tasks, r", [(5, 1), (8, 2), (13, 3), (12, 4)])
def test_pca_matches_svd(tasks, r):
    matrix = random_cosines(tasks, tasks)
    result = conflict_pca(matrix, r)
    centered, u, singular, vt = svd_reference(matrix)

    np.testing.assert_allclose(result.eigenvalues, singular**2 / tasks, atol=1e-12)
    ratio = singular**2 / np.sum(singular**2)
    np.testing.assert_allclose(result.explained_variance_ratio, ratio, atol=1e-12)
    assert result.explained_variance_ratio.sum() == pytest.approx(1.0)

    # Same embedding up to one sign per component: z = U S for the centred rows.
    reference = u[:, :r] * singular[:r]
    for i in range(r):
        sign = np.sign(reference[:, i] @ result.embedding[:, i])
        np.testing.assert_allclose(result.embedding[:, i], sign * reference[:, i], atol=1e-10)
        np.testing.assert_allclose(result.eigenvectors[:, i], sign * vt[i], atol=1e-10)
    np.testing.assert_allclose(result.embedding, centered @ result.eigenvectors[:, :r], atol=1e-12)
    np.testing.assert_allclose(result.column_mean, matrix.mean(axis=0), atol=1e-15)
    assert result.num_components == r


def test_eigenvalues_descending_and_nonnegative():
    result = conflict_pca(random_cosines(3, 10), 2)
    assert np.all(np.diff(result.eigenvalues) <= 0)
    assert np.all(result.eigenvalues >= 0)


def test_sign_convention_largest_entry_positive():
    result = conflict_pca(random_cosines(4, 9), 3)
    for i in range(9):
        vector = result.eigenvectors[:, i]
        if np.abs(vector).max() > 0:
            assert vector[np.argmax(np.abs(vector))] > 0


def test_embedding_follows_task_relabeling():
    matrix = random_cosines(5, 8)
    order = np.random.default_rng(0).permutation(8)
    first = conflict_pca(matrix, 2)
    permuted = conflict_pca(matrix[np.ix_(order, order)], 2)
    # The sign rule looks at the largest entry, which moves with its task, so
    # relabeling the tasks permutes the embedding rows and flips nothing.
    np.testing.assert_allclose(permuted.embedding, first.embedding[order], atol=1e-10)


def test_pca_is_deterministic():
    matrix = random_cosines(6, 8)
    np.testing.assert_array_equal(
        conflict_pca(matrix, 2).embedding, conflict_pca(matrix, 2).embedding
    )


def test_fix_signs_same_for_negated_vectors():
    vectors = np.linalg.qr(np.random.default_rng(1).standard_normal((6, 6)))[0]
    np.testing.assert_array_equal(fix_signs(vectors), fix_signs(-vectors))


def test_fix_signs_ties_go_to_lowest_index():
    vectors = np.array([[-0.5, 0.5], [0.5, -0.5], [0.1, 0.1]])
    fixed = fix_signs(vectors)
    np.testing.assert_array_equal(fixed[:, 0], [0.5, -0.5, -0.1])
    np.testing.assert_array_equal(fixed[:, 1], [0.5, -0.5, 0.1])


def test_fix_signs_flips_negative_peak():
    fixed = fix_signs(np.array([[0.2], [-0.9], [0.1]]))
    np.testing.assert_array_equal(fixed[:, 0], [-0.2, 0.9, -0.1])


def test_hand_case_two_blocks():
    # Two blocks of two identical tasks, opposite to each other: one axis separates them.
    matrix = np.array(
        [
            [1.0, 1.0, -1.0, -1.0],
            [1.0, 1.0, -1.0, -1.0],
            [-1.0, -1.0, 1.0, 1.0],
            [-1.0, -1.0, 1.0, 1.0],
        ]
    )
    result = conflict_pca(matrix, 1)
    assert result.explained_variance_ratio[0] == pytest.approx(1.0)
    assert result.eigenvalues[0] == pytest.approx(4.0)  # ||row||^2 = 4, same for every row
    z = result.embedding[:, 0]
    assert z[0] == pytest.approx(z[1])
    assert z[2] == pytest.approx(-z[0])
    assert abs(z[0]) == pytest.approx(2.0)


def test_constant_matrix_has_zero_variance():
    result = conflict_pca(np.ones((4, 4)), 2)
    np.testing.assert_array_equal(result.explained_variance_ratio, np.zeros(4))
    np.testing.assert_allclose(result.embedding, 0.0, atol=1e-15)


@pytest.mark.parametrize(
    "matrix, r, message",
    [
        (np.eye(3), 0, "out of range"),
        (np.eye(3), 4, "out of range"),
        (np.ones((2, 3)), 1, "square"),
        (np.array([[1.0, 0.5], [0.2, 1.0]]), 1, "not symmetric"),
        (np.array([[1.0, np.nan], [np.nan, 1.0]]), 1, "NaN"),
    ],
)
def test_invalid_input_rejected(matrix, r, message):
    with pytest.raises(ValueError, match=message):
        conflict_pca(matrix, r)
