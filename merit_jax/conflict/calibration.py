"""How many calibration examples a task gradient needs: the calibration curve.

For every task, a reference gradient g_ref comes from ``reference`` examples,
and estimates g_n from n examples disjoint from them, for each requested n:

    cos(g_n, g_ref) = <g_n, g_ref> / (||g_n|| ||g_ref||)

The curve reports the mean and the minimum of this cosine over tasks for
every n. The examples are one seeded permutation per task (the one the plan
draws from): the first ``reference`` form the reference, and the estimate for
n uses the next n, so the estimates are nested. Each estimate is the sum of
the sketches of disjoint chunks (a count-sketch is linear), so every example
is run through the model once: ``reference + max(n)`` examples per task.
The cosine to a finite reference underestimates the cosine to the true
gradient, because the reference has noise of its own.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from merit_jax.conflict.artifacts import write_atomic
from merit_jax.conflict.gradients import compute_gradients
from merit_jax.conflict.planner import (
    Theta0,
    gradient_settings,
    load_theta0,
    load_training_splits,
    make_engine,
    prepare_tasks,
    task_inputs,
)
from merit_jax.data.bigbench import BigBenchArchive
from merit_jax.runconfig import RunConfig

logger = logging.getLogger(__name__)

CALIBRATION_DIRNAME = "calibration"
CURVE_FILENAME = "curve.json"
CURVE_PLOT = "curve.png"


@dataclasses.dataclass(frozen=True)
class CalibrationCurve:
    """Cosines between n-example task gradients and a reference, for every task and n."""

    sizes: tuple[int, ...]  # the n values, increasing
    reference: int  # examples in each reference gradient
    task_names: tuple[str, ...]
    cosines: np.ndarray  # float64 [T, len(sizes)]

    @property
    def mean(self) -> np.ndarray:
        """Mean cosine over tasks, per n."""
        return self.cosines.mean(axis=0)

    @property
    def minimum(self) -> np.ndarray:
        """Smallest cosine over tasks, per n."""
        return self.cosines.min(axis=0)

    def to_dict(self) -> dict[str, object]:
        return {
            "sizes": list(self.sizes),
            "reference": self.reference,
            "tasks": {
                name: [float(c) for c in row]
                for name, row in zip(self.task_names, self.cosines, strict=True)
            },
            "mean": [float(c) for c in self.mean],
            "min": [float(c) for c in self.minimum],
        }


def check_sizes(sizes: Sequence[int], reference: int) -> tuple[int, ...]:
    """Return ``sizes`` as a tuple after checking they are increasing positive integers."""
    values = tuple(int(n) for n in sizes)
    if not values or min(values) < 1 or list(values) != sorted(set(values)):
        raise ValueError(
            f"calibration sizes {list(sizes)} must be increasing positive integers, e.g. 4,8,16,32"
        )
    if reference < 1:
        raise ValueError(f"reference={reference} must be a positive number of examples")
    return values


def chunk_bounds(sizes: Sequence[int], reference: int) -> list[tuple[int, int]]:
    """Return the [start, end) example ranges: the reference, then one chunk per size step."""
    bounds = [(0, reference)]
    previous = 0
    for n in sizes:
        bounds.append((reference + previous, reference + n))
        previous = n
    return bounds


def curve_from_sketches(
    chunk_sketches: np.ndarray, sizes: Sequence[int], reference: int, task_names: Sequence[str]
) -> CalibrationCurve:
    """Build the curve from chunk sketches [T, 1 + len(sizes), d] (reference chunk first)."""
    chunks = np.asarray(chunk_sketches, dtype=np.float64)
    ref = chunks[:, 0]
    estimates = np.cumsum(chunks[:, 1:], axis=1)  # g_n for every n: [T, len(sizes), d]
    dots = np.einsum("tnd,td->tn", estimates, ref)
    norms = np.linalg.norm(estimates, axis=2) * np.linalg.norm(ref, axis=1)[:, None]
    if (norms == 0).any():
        raise ValueError("a task produced a zero gradient, so its cosine is undefined")
    return CalibrationCurve(
        sizes=tuple(sizes),
        reference=reference,
        task_names=tuple(task_names),
        cosines=dots / norms,
    )


def run_calibration_curve(
    config: RunConfig,
    *,
    sizes: Sequence[int],
    reference: int,
    out_dir: str | Path | None = None,
    progress: bool = True,
    theta0: Theta0 | None = None,
    archive: BigBenchArchive | None = None,
) -> tuple[CalibrationCurve, Path]:
    """Compute the calibration curve of every training task of ``config``.

    Writes ``curve.json`` into ``out_dir`` (default: the plan directory's
    ``calibration/``) and returns the curve and that directory. Every task
    needs ``reference + max(sizes)`` examples that survive tokenization.
    """
    sizes = check_sizes(sizes, reference)
    out = Path(out_dir) if out_dir is not None else config.plan_dir / CALIBRATION_DIRNAME
    if theta0 is None:
        theta0 = load_theta0(config)
    needed = reference + sizes[-1]
    splits = load_training_splits(config, config.data.mixture, archive=archive)
    prepared = prepare_tasks(splits, theta0.tokenizer, config, calibration_size=needed)
    short = [p.task.name for p in prepared if len(p.calibration) < needed]
    if short:
        raise ValueError(
            f"tasks {short} have fewer than reference + max(n) = {needed} usable examples; "
            "lower --reference or the largest calibration size, or raise max_samples"
        )

    bounds = chunk_bounds(sizes, reference)
    named = [
        (f"{p.task.name}#{start}:{end}", p.calibration[start:end])
        for p in prepared
        for start, end in bounds
    ]
    settings = gradient_settings(config, calibration_size=needed)
    inputs = task_inputs(named, settings, theta0.pad_id)
    logger.info(
        "calibration curve: %d tasks, reference %d, sizes %s: %d examples per task",
        len(prepared),
        reference,
        list(sizes),
        needed,
    )
    gradients = compute_gradients(
        make_engine(theta0, settings, inputs), inputs, store=None, key="", progress=progress
    )
    vectors = np.stack([g.vector for g in gradients]).reshape(len(prepared), len(bounds), -1)
    curve = curve_from_sketches(vectors, sizes, reference, [p.task.name for p in prepared])
    payload = json.dumps(curve.to_dict(), indent=1, sort_keys=True) + "\n"
    write_atomic(out / CURVE_FILENAME, payload.encode(), overwrite=True)
    return curve, out


def format_curve(curve: CalibrationCurve) -> str:
    """Return the table: n, mean and minimum cosine, and the worst task per n."""
    lines = [
        f"cosine between g_t from n examples and a {curve.reference}-example reference "
        f"(disjoint examples, {len(curve.task_names)} tasks)",
        f"{'n':>5}  {'mean':>6}  {'min':>6}  worst task",
    ]
    for column, n in enumerate(curve.sizes):
        worst = int(np.argmin(curve.cosines[:, column]))
        lines.append(
            f"{n:>5}  {curve.mean[column]:>6.3f}  {curve.minimum[column]:>6.3f}  "
            f"{curve.task_names[worst]}"
        )
    return "\n".join(lines)
