"""Streaming merge of orbax parameter checkpoints, one leaf at a time.

Every leaf (one parameter array) is read from every checkpoint with orbax's
partial restore, accumulated as sum_k w_k theta_k in float32, cast to the
output dtype and kept. Peak memory is therefore about one merged model plus
one leaf per read; reads of small leaves are grouped, up to ``GROUP_BYTES``
per checkpoint. The output directory contains ``final/`` (an orbax checkpoint
in the layout of its inputs) and ``merge.json``, and appears only once
complete (see ``staging``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from merit_jax import __version__
from merit_jax.merge.checkpoint import (
    CheckpointReader,
    LeafPath,
    LeafSpec,
    checkpoint_leaves,
    group_leaves,
    leaf_name,
    save_params,
    tree_problems,
    unflatten,
)
from merit_jax.merge.errors import MergeError
from merit_jax.merge.operators import (
    LeafReader,
    MergeOperator,
    accumulation_dtype,
    make_operator,
    output_dtype,
    resolve_weights,
)
from merit_jax.merge.staging import MERGE_JSON, check_output_dir, staged_dir, write_json

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "final"

# Small leaves (norm scales, biases) are restored together, up to this many bytes
# per checkpoint, because every orbax restore call has a fixed cost of a few ms.
GROUP_BYTES = 16 * 2**20


@dataclasses.dataclass(frozen=True)
class MergeResult:
    """Paths, weights and sizes of a finished merge."""

    out_dir: Path  # contains final/ and merge.json
    checkpoint_dir: Path  # out_dir / "final"
    weights: tuple[float, ...]
    weighting: str  # "token", "uniform" or "explicit"
    dtype: str  # dtype of the merged leaves ("mixed" when they differ)
    num_parameters: int
    seconds: float
    hf_dir: Path | None = None  # the Hugging Face export, when requested


# --------------------------------------------------------------------------- merging


def _dtype_label(dtypes: set[np.dtype]) -> str:
    return dtypes.pop().name if len(dtypes) == 1 else "mixed"


def merge_params(
    checkpoints: Sequence[Path],
    specs: Mapping[LeafPath, LeafSpec],
    operator: MergeOperator,
    *,
    dtype: str | None = None,
) -> dict[str, Any]:
    """Merge the leaves ``specs`` of ``checkpoints`` into a nested dict of numpy arrays.

    Leaves are read one at a time from each checkpoint (small ones in groups of at
    most ``GROUP_BYTES``), accumulated in float32 (float64 for float64 leaves) and
    cast to ``dtype`` (None keeps each leaf's dtype).
    """
    out_dtype = output_dtype(dtype)
    readers = [CheckpointReader(path) for path in checkpoints]
    cast_buffer = np.empty(0, np.float32)
    merged: dict[LeafPath, np.ndarray] = {}
    for group in group_leaves(specs, GROUP_BYTES):
        # One leaf is read lazily per branch; a group of small ones once per branch.
        prefetched = [reader.read(group) for reader in readers] if len(group) > 1 else None
        for leaf in group:
            leaf_dtype, shape = specs[leaf]
            target = out_dtype or leaf_dtype
            accumulator_dtype = accumulation_dtype(leaf_dtype)
            if target == accumulator_dtype:
                out = np.empty(shape, accumulator_dtype)
            else:
                if cast_buffer.dtype != accumulator_dtype or cast_buffer.size < math.prod(shape):
                    cast_buffer = np.empty(math.prod(shape), accumulator_dtype)
                out = cast_buffer[: math.prod(shape)].reshape(shape)

            operator.merge_leaf(_leaf_reader(readers, prefetched, leaf), out)
            merged[leaf] = out if target == accumulator_dtype else out.astype(target)
            logger.debug("merged %s %s", leaf_name(leaf), list(shape))
    return unflatten(merged)


def _leaf_reader(
    readers: Sequence[CheckpointReader],
    prefetched: list[dict[LeafPath, np.ndarray]] | None,
    leaf: LeafPath,
) -> LeafReader:
    def read(k: int) -> np.ndarray:
        if prefetched is not None:
            return prefetched[k].pop(leaf)  # pop: the merged group frees as it goes
        return readers[k].read([leaf])[leaf]

    return read


def _count(specs: Mapping[LeafPath, LeafSpec]) -> int:
    return sum(math.prod(shape) for _, shape in specs.values())


def write_merge_output(
    out_dir: Path,
    checkpoints: Sequence[Path],
    specs: Mapping[LeafPath, LeafSpec],
    operator: MergeOperator,
    *,
    dtype: str | None,
    record: Mapping[str, Any],
    overwrite: bool,
    start: float,
) -> tuple[dict[str, Any], str]:
    """Merge into a staging directory, write final/ and merge.json, then move it to ``out_dir``.

    merge.json gets the operator's settings, ``record``, the dtype, the parameter
    count, ``merge_seconds`` (from ``start`` until the merged parameters are in
    memory) and ``seconds`` (until written). Returns the merged parameters and
    the dtype name.
    """
    with staged_dir(out_dir, overwrite=overwrite) as staging:
        params = merge_params(checkpoints, specs, operator, dtype=dtype)
        merge_seconds = time.perf_counter() - start
        save_params(staging / CHECKPOINT_DIR, params)
        dtype_label = dtype or _dtype_label({spec[0] for spec in specs.values()})
        write_json(
            staging / MERGE_JSON,
            {
                **operator.describe(),
                **record,
                "dtype": dtype_label,
                "num_parameters": _count(specs),
                "merge_seconds": round(merge_seconds, 3),
                "seconds": round(time.perf_counter() - start, 3),
                "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
                "tool_version": __version__,
            },
        )
    return params, dtype_label


def merge_checkpoints(
    checkpoints: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    weights: str | Sequence[float] = "uniform",
    dtype: str | None = None,
    method: str = "linear",
    overwrite: bool = False,
) -> MergeResult:
    """Merge orbax parameter checkpoints into ``out_dir``/final with ``out_dir``/merge.json.

    ``weights`` is ``"uniform"`` or one number per checkpoint (summing to 1).
    Every checkpoint must have the same leaves, shapes and dtypes; all
    differences are raised together as one MergeError.
    """
    start = time.perf_counter()
    paths = [Path(c).absolute() for c in checkpoints]
    out_path = Path(out_dir).absolute()
    check_output_dir(out_path, overwrite=overwrite)
    merge_weights, weighting = resolve_weights(weights, num_models=len(paths))
    operator = make_operator(method, weights=merge_weights)
    output_dtype(dtype)

    problems, trees = [], []
    for path in paths:
        try:
            trees.append(checkpoint_leaves(path))
        except (FileNotFoundError, ValueError) as error:
            problems.append(str(error))
    if not problems:
        problems = tree_problems(trees, [str(p) for p in paths])
    if problems:
        raise MergeError("the checkpoints cannot be merged", problems)

    record = {"weighting": weighting, "checkpoints": [str(p) for p in paths]}
    _, dtype_label = write_merge_output(
        out_path,
        paths,
        trees[0],
        operator,
        dtype=dtype,
        record=record,
        overwrite=overwrite,
        start=start,
    )
    return MergeResult(
        out_dir=out_path,
        checkpoint_dir=out_path / CHECKPOINT_DIR,
        weights=tuple(float(w) for w in merge_weights),
        weighting=weighting,
        dtype=dtype_label,
        num_parameters=_count(trees[0]),
        seconds=time.perf_counter() - start,
    )
