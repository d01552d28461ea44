"""Training loss curves of a run, read from each branch's metrics.jsonl.

Every branch (and the joint baseline) writes one JSON object per step to
``metrics.jsonl`` (see ``merit_jax.train.loop``). :func:`read_metrics`
reads it, and :func:`plot_loss_curves` draws the loss of every run against
the tokens it has trained on, with a moving average over a few steps,
because a single step's loss is noisy.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

LOSS_CURVES_PLOT = "loss_curves.png"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Return the step records of a metrics.jsonl file, in step order.

    A line that is not valid JSON (the last line of a killed run) is skipped
    with a warning. A missing file gives an empty list.
    """
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("skipping line %d of %s: not valid JSON", number, path)
            continue
        if isinstance(record, dict) and "step" in record and "loss" in record:
            records.append(record)
    records.sort(key=lambda record: record["step"])
    return records


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Return the trailing mean over the last ``window`` values at every position.

    The first ``window - 1`` positions average over the values seen so far.
    """
    if window < 1:
        raise ValueError(f"window={window} must be a positive integer")
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return array
    cumulative = np.concatenate([[0.0], np.cumsum(array)])
    ends = np.arange(1, array.size + 1)
    starts = np.maximum(ends - window, 0)
    return (cumulative[ends] - cumulative[starts]) / (ends - starts)


def smoothing_window(num_steps: int) -> int:
    """Return the moving-average window for a curve of ``num_steps`` steps (about 1/10 of it)."""
    return max(1, min(25, math.ceil(num_steps / 10)))


def plot_loss_curves(curves: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path) -> Path:
    """Draw the training loss of every named run against its tokens seen; return the PNG path.

    ``curves`` maps a label (``"branch 0"``, ``"joint"``) to its metrics
    records. Each curve is drawn faint per step and solid as a moving average.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    drawn = {label: records for label, records in curves.items() if records}
    if not drawn:
        raise ValueError("no metrics to plot: every run has an empty metrics.jsonl")
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = plt.get_cmap("tab10")
    for index, (label, records) in enumerate(drawn.items()):
        tokens = [record.get("tokens_seen", record["step"]) for record in records]
        losses = [record["loss"] for record in records]
        color = "black" if label == "joint" else colors(index % 10)
        window = smoothing_window(len(losses))
        ax.plot(tokens, losses, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(
            tokens,
            moving_average(losses, window),
            color=color,
            linewidth=1.8,
            label=f"{label} (mean of {window} steps)" if window > 1 else label,
        )
    ax.set_xlabel("training tokens seen")
    ax.set_ylabel("training loss (nats per response token)")
    ax.set_title("Training loss: each branch on its own tasks, joint on all tasks")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=120)
    plt.close(fig)
    return target
