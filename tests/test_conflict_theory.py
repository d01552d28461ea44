"""Merging-gain tests: the two-branch hand case and a full-Hessian numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

from merit_jax.conflict.theory import (
    check_merge_weights,
    merged_point,
    predicted_merging_gain,
    weighted_variance,
)


def direct_gain(hessian: np.ndarray, displacements: np.ndarray, weights: np.ndarray) -> float:
    """0.5 * E_w[(d - mean)^T H (d - mean)] with the full Hessian."""
    mean = weights @ displacements
    return 0.5 * sum(
        w * (d - mean) @ hessian @ (d - mean) for w, d in zip(weights, displacements, strict=True)
    )


def test_two_branch_hand_case():
    eigenvalues = np.array([4.0, 1.0])
    eigenvectors = np.eye(2)
    displacements = np.array([[2.0, 0.0], [0.0, 1.0]])
    weights = np.array([0.5, 0.5])
    # Projections on u_1: (2, 0), mean 1, Var_w 1. On u_2: (0, 1), mean 0.5, Var_w 0.25.
    # Gain = 1/2 (4 * 1 + 1 * 0.25) = 2.125. A gain of 1.125 would need eigenvalues (2, 1).
    gain = predicted_merging_gain(eigenvalues, eigenvectors, displacements, weights)
    assert gain == pytest.approx(2.125, abs=1e-15)
    assert gain == pytest.approx(direct_gain(np.diag(eigenvalues), displacements, weights))
    theta0 = np.array([0.3, -0.7])
    np.testing.assert_allclose(
        merged_point(theta0, displacements, weights), theta0 + [1.0, 0.5], atol=1e-15
    )


def test_hand_case_variances():
    np.testing.assert_allclose(
        weighted_variance([[2.0, 0.0], [0.0, 1.0]], [0.5, 0.5]), [1.0, 0.25], atol=1e-15
    )


@pytest.mark.parametrize("seed", range(3))
def test_random_case_matches_full_hessian(seed):
    rng = np.random.default_rng(seed)
    params, branches = 6, 4
    q, _ = np.linalg.qr(rng.standard_normal((params, params)))
    eigenvalues = rng.uniform(0.1, 5.0, params)
    hessian = q @ np.diag(eigenvalues) @ q.T
    displacements = rng.standard_normal((branches, params))
    weights = rng.uniform(0.1, 1.0, branches)
    weights /= weights.sum()
    gain = predicted_merging_gain(eigenvalues, q, displacements, weights)
    assert gain == pytest.approx(direct_gain(hessian, displacements, weights), rel=1e-12)


def test_gain_equals_loss_reduction_of_quadratic():
    rng = np.random.default_rng(3)
    params = 5
    q, _ = np.linalg.qr(rng.standard_normal((params, params)))
    eigenvalues = rng.uniform(0.5, 3.0, params)
    hessian = q @ np.diag(eigenvalues) @ q.T
    optimum = rng.standard_normal(params)
    theta0 = rng.standard_normal(params)

    def loss(theta):
        return 0.5 * (theta - optimum) @ hessian @ (theta - optimum) + 1.7

    displacements = rng.standard_normal((3, params))
    weights = np.array([0.2, 0.5, 0.3])
    branch_losses = [loss(theta0 + d) for d in displacements]
    merged = merged_point(theta0, displacements, weights)
    reduction = weights @ branch_losses - loss(merged)
    gain = predicted_merging_gain(eigenvalues, q, displacements, weights)
    assert gain == pytest.approx(reduction, rel=1e-10)


def test_truncated_spectrum_counts_only_given_axes():
    displacements = np.array([[2.0, 0.0, 3.0], [0.0, 1.0, -3.0]])
    gain = predicted_merging_gain([4.0, 1.0], np.eye(3)[:, :2], displacements, [0.5, 0.5])
    assert gain == pytest.approx(2.125)


@pytest.mark.parametrize(
    "weights, message",
    [
        ([0.5, 0.6], "sum to 1.1"),
        ([1.5, -0.5], "non-negative"),
        ([0.5, np.nan], "finite"),
        ([[0.5, 0.5]], "1-D"),
    ],
)
def test_invalid_weights(weights, message):
    with pytest.raises(ValueError, match=message):
        check_merge_weights(weights)


def test_weight_count_must_match_branches():
    with pytest.raises(ValueError, match="3 merge weights for 2 branches"):
        merged_point(np.zeros(2), np.ones((2, 2)), [0.2, 0.3, 0.5])


def test_eigenvector_shape_checked():
    with pytest.raises(ValueError, match=r"\[P, E\] = \[2, 2\]"):
        predicted_merging_gain([1.0, 2.0], np.eye(3), np.ones((2, 2)), [0.5, 0.5])
