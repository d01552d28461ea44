"""Merge-readiness diagnostics: held-out loss along the straight line between two models.

For weights theta0 and theta1 of the same architecture and alpha in [0, 1],

    theta(alpha) = theta0 + alpha * (theta1 - theta0)

is computed leaf by leaf in float32 and cast back to each leaf's dtype. The
loss barrier of a task (Frankle et al., 2020, "Linear Mode Connectivity and
the Lottery Ticket Hypothesis") is the largest excess of the path loss over
the straight line between the end-point losses,

    barrier = max over alpha of L(alpha) - ((1 - alpha) L(0) + alpha L(1)),

taken over the given alphas, which must include 0 and 1. A barrier near zero
or below suggests that the two models lie in one low-loss basin, where a
weight average tends to keep the low loss of its ends.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from merit_jax.eval.held_out import HeldOutData, task_loss_sums
from merit_jax.models.decoder import Decoder

logger = logging.getLogger(__name__)

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclasses.dataclass(frozen=True)
class LinearPathResult:
    """Held-out losses at every alpha, per task and pooled over all targets."""

    alphas: tuple[float, ...]
    task_losses: dict[str, tuple[float, ...]]  # task -> loss at each alpha
    pooled_losses: tuple[float, ...]
    task_barriers: dict[str, float]
    pooled_barrier: float

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def interpolate_states(state0: nnx.State, state1: nnx.State, alpha: float) -> nnx.State:
    """Return theta0 + alpha * (theta1 - theta0) for every leaf, in float32, cast back."""

    def mix(leaf0: jax.Array, leaf1: jax.Array) -> jax.Array:
        if leaf0.shape != leaf1.shape or leaf0.dtype != leaf1.dtype:
            raise ValueError(
                f"cannot interpolate a {leaf0.dtype}{list(leaf0.shape)} leaf with a "
                f"{leaf1.dtype}{list(leaf1.shape)} leaf; both models need the same config"
            )
        if not jnp.issubdtype(leaf0.dtype, jnp.floating):
            raise ValueError(f"cannot interpolate a non-float {leaf0.dtype} leaf")
        start = leaf0.astype(jnp.float32)
        return (start + alpha * (leaf1.astype(jnp.float32) - start)).astype(leaf0.dtype)

    return jax.tree.map(mix, state0, state1)


def loss_barrier(alphas: Sequence[float], losses: Sequence[float]) -> float:
    """Return max over alpha of L(alpha) minus the chord between L(0) and L(1)."""
    alphas_a = np.asarray(alphas, np.float64)
    losses_a = np.asarray(losses, np.float64)
    ends = {float(alpha): float(loss) for alpha, loss in zip(alphas_a, losses_a, strict=True)}
    if 0.0 not in ends or 1.0 not in ends:
        raise ValueError(f"alphas={list(alphas)} must include 0 and 1 to define the chord")
    chord = (1.0 - alphas_a) * ends[0.0] + alphas_a * ends[1.0]
    return float(np.max(losses_a - chord))


def linear_path_losses(
    theta0: Decoder,
    model: Decoder,
    data: HeldOutData,
    *,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
) -> LinearPathResult:
    """Return held-out losses of the models on the line from ``theta0`` to ``model``.

    ``data`` comes from :func:`~merit_jax.eval.held_out.prepare_held_out`.
    Only one interpolated state is alive at a time.
    """
    alphas = tuple(float(alpha) for alpha in alphas)
    if not alphas or any(not 0.0 <= alpha <= 1.0 for alpha in alphas):
        raise ValueError(f"alphas={list(alphas)} must be a non-empty list of values in [0, 1]")
    graphdef0, state0 = nnx.split(theta0)
    graphdef1, state1 = nnx.split(model)
    if graphdef0 != graphdef1:
        raise ValueError(
            "the two models differ in structure or config; the linear path needs two "
            "checkpoints of the same architecture"
        )

    start = time.perf_counter()
    sums_at, counts = [], None
    for alpha in alphas:
        state = interpolate_states(state0, state1, alpha)
        sums, counts = task_loss_sums(graphdef0, state, data)
        sums_at.append(sums)
        del state
    assert counts is not None
    sums_an = np.stack(sums_at)  # [num_alphas, num_tasks]
    task_losses = {
        name: tuple(float(x) for x in sums_an[:, index] / counts[index])
        for index, name in enumerate(data.task_names)
    }
    pooled = tuple(float(x) for x in sums_an.sum(axis=1) / counts.sum())
    result = LinearPathResult(
        alphas=alphas,
        task_losses=task_losses,
        pooled_losses=pooled,
        task_barriers={name: loss_barrier(alphas, losses) for name, losses in task_losses.items()},
        pooled_barrier=loss_barrier(alphas, pooled),
    )
    logger.info(
        "linear path at %d alphas over %d tasks in %.1f s: pooled losses %s, barrier %.4f",
        len(alphas),
        len(task_losses),
        time.perf_counter() - start,
        ", ".join(f"{loss:.4f}" for loss in pooled),
        result.pooled_barrier,
    )
    return result
