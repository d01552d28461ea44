"""Merge Hugging Face model directories (config.json plus safetensors) tensor by tensor.

This path needs neither JAX nor a model class. It maps every input shard,
merges one tensor at a time in float32 from zero-copy views of the input
files, and streams each merged tensor into the output file. The linear merge
works on slices of ``CHUNK_ELEMENTS``, so private memory stays at a few
slice-sized buffers, whatever the model size. The input pages belong to the
page cache.

The output directory has the shard layout of the first input (the same file
names, with the same tensors in each), its config.json with the output dtype,
its other non-weight files (tokenizer, chat template, generation config) and
a merge.json that records the weights and inputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from merit_jax import __version__
from merit_jax.merge.errors import MergeError
from merit_jax.merge.operators import (
    MergeOperator,
    accumulation_dtype,
    is_float_dtype,
    make_operator,
    output_dtype,
    resolve_weights,
)
from merit_jax.merge.safetensors_io import (
    SafetensorsFile,
    SafetensorsFormatError,
    SafetensorsWriter,
    read_header,
)
from merit_jax.merge.staging import MERGE_JSON, check_output_dir, staged_dir, write_json

logger = logging.getLogger(__name__)

# File names as transformers writes them (the same as in merit_jax.models.weights,
# which this module does not import, because it imports JAX).
CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# Elementwise operators merge a tensor in slices of this many elements (4 MiB in
# float32): the accumulator then stays small and in cache while the K inputs stream by.
CHUNK_ELEMENTS = 2**20

# config.json keys that may differ between models with the same architecture.
_CONFIG_KEYS_ALLOWED_TO_DIFFER = ("_name_or_path", "transformers_version", "torch_dtype", "dtype")


@dataclasses.dataclass
class HFModelFiles:
    """The config and the safetensors layout of one Hugging Face model directory."""

    directory: Path
    config: dict[str, Any]
    files: list[Path]  # safetensors files, in shard order
    file_keys: dict[Path, list[str]]  # tensor names of each file, in file order
    tensors: dict[str, tuple[Path, np.dtype, tuple[int, ...]]]  # name -> (file, dtype, shape)


@dataclasses.dataclass(frozen=True)
class HFMergeResult:
    """Output directory, weights and sizes of a finished ``merge_hf_dirs``."""

    out_dir: Path
    weights: tuple[float, ...]
    dtype: str | None  # None: every tensor kept its input dtype
    num_tensors: int
    num_parameters: int
    seconds: float


def safetensors_layout(directory: Path) -> tuple[list[Path], dict[str, str]]:
    """Return the safetensors files of a model directory and the index's name -> file map.

    The map is empty for a single-file model.
    """
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            raise SafetensorsFormatError(
                f"{index_path} is not a valid safetensors index ({error!r}): it needs a "
                '"weight_map" object from tensor name to shard file'
            ) from error
        missing = [name for name in names if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{index_path} names shards {missing} that are not in {directory}: copy or "
                "download the missing shards"
            )
        return [directory / name for name in names], dict(weight_map)
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE], {}
    others = sorted(directory.glob("*.safetensors"))
    if len(others) == 1:
        return others, {}
    if others:
        raise SafetensorsFormatError(
            f"{directory} has {len(others)} .safetensors files but no {INDEX_FILE} that maps "
            "tensor names to files: add the index of the original checkpoint"
        )
    raise FileNotFoundError(
        f"no safetensors weights in {directory}: expected {SINGLE_FILE} or {INDEX_FILE} with "
        "its shards (pickle weights such as .bin are never read)"
    )


def read_hf_model_files(directory: str | os.PathLike[str]) -> HFModelFiles:
    """Read config.json and the safetensors headers (not the tensors) of a model directory."""
    directory = Path(directory).expanduser().absolute()
    if not directory.is_dir():
        raise FileNotFoundError(
            f"model directory {directory} not found: pass a Hugging Face model directory"
        )
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}: it is not a model directory")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from error

    files, weight_map = safetensors_layout(directory)
    file_keys: dict[Path, list[str]] = {}
    tensors: dict[str, tuple[Path, np.dtype, tuple[int, ...]]] = {}
    for file in files:
        infos, _ = read_header(file)
        if weight_map:
            assigned = {key for key, name in weight_map.items() if name == file.name}
            if assigned != set(infos):
                unassigned = sorted(set(infos) - assigned)[:5]
                absent = sorted(assigned - set(infos))[:5]
                raise SafetensorsFormatError(
                    f"{file} contains tensors {unassigned} that {INDEX_FILE} does not assign to "
                    f"it, or lacks {absent} that it does: the shards and the index come from "
                    "different downloads"
                )
        file_keys[file] = list(infos)
        for key, info in infos.items():
            if key in tensors:
                raise SafetensorsFormatError(
                    f"tensor {key} appears in both {tensors[key][0].name} and {file.name} of "
                    f"{directory}"
                )
            tensors[key] = (file, info.dtype, info.shape)
    return HFModelFiles(directory, config, files, file_keys, tensors)


def hf_input_problems(models: Sequence[HFModelFiles]) -> list[str]:
    """Return every config, tensor name, shape and dtype difference from the first model."""
    reference = models[0]
    problems = []
    for key, (_, dtype, _) in reference.tensors.items():
        if not is_float_dtype(dtype):
            problems.append(
                f"{reference.directory}: tensor {key} is {dtype}, not a float: only float "
                "tensors can be merged"
            )
    ref_config = {
        k: v for k, v in reference.config.items() if k not in _CONFIG_KEYS_ALLOWED_TO_DIFFER
    }
    for model in models[1:]:
        where = str(model.directory)
        config = {k: v for k, v in model.config.items() if k not in _CONFIG_KEYS_ALLOWED_TO_DIFFER}
        for key in sorted(ref_config.keys() | config.keys()):
            if ref_config.get(key, "<absent>") != config.get(key, "<absent>"):
                problems.append(
                    f"{where}: config.json {key} = {config.get(key, '<absent>')!r}, but "
                    f"{reference.directory} has {ref_config.get(key, '<absent>')!r}"
                )
        for key in reference.tensors.keys() - model.tensors.keys():
            problems.append(f"{where}: tensor {key} is missing")
        for key in model.tensors.keys() - reference.tensors.keys():
            problems.append(f"{where}: unexpected tensor {key} (not in {reference.directory})")
        for key in reference.tensors.keys() & model.tensors.keys():
            _, ref_dtype, ref_shape = reference.tensors[key]
            _, dtype, shape = model.tensors[key]
            if shape != ref_shape:
                problems.append(
                    f"{where}: tensor {key} has shape {list(shape)}, expected {list(ref_shape)}"
                )
            if dtype != ref_dtype:
                problems.append(f"{where}: tensor {key} is {dtype}, expected {ref_dtype}")
    return sorted(problems)


def _copy_extra_files(source: Path, target: Path) -> None:
    """Copy the non-weight files (tokenizer, generation config, ...) of the first input."""
    skip = {CONFIG_FILE, INDEX_FILE, MERGE_JSON}
    for path in sorted(source.iterdir()):
        if (
            not path.is_file()
            or path.name.startswith(".")
            or path.name in skip
            or path.suffix in (".safetensors", *PICKLE_SUFFIXES)
        ):
            continue
        shutil.copy2(path, target / path.name)


class _Buffers:
    """Reusable flat buffers, so each tensor does not fault in fresh pages."""

    def __init__(self) -> None:
        self._flat: dict[np.dtype, np.ndarray] = {}

    def get(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        size = math.prod(shape)
        flat = self._flat.get(dtype)
        if flat is None or flat.size < size:
            flat = np.empty(size, dtype)
            self._flat[dtype] = flat
        return flat[:size].reshape(shape)


def _merged_pieces(
    operator: MergeOperator,
    views: Sequence[np.ndarray],
    target_dtype: np.dtype,
    buffers: _Buffers,
) -> Iterator[np.ndarray]:
    """Yield the merged tensor in ``target_dtype``: in slices of ``CHUNK_ELEMENTS`` when
    the operator is elementwise, else whole."""
    accumulator_dtype = accumulation_dtype(views[0].dtype)
    if operator.elementwise:
        flat = [view.reshape(-1) for view in views]
        step = CHUNK_ELEMENTS
    else:
        flat = list(views)
        step = max(views[0].size, 1)
    size = views[0].size
    for start in range(0, size, step):
        stop = min(size, start + step)
        parts = [array[start:stop] for array in flat] if operator.elementwise else flat
        merged = buffers.get(accumulator_dtype, parts[0].shape)
        operator.merge_leaf(parts.__getitem__, merged)
        if merged.dtype != target_dtype:
            cast = buffers.get(target_dtype, merged.shape)
            np.copyto(cast, merged, casting="unsafe")
            merged = cast
        yield merged


def merge_hf_dirs(
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    weights: str | Sequence[float] = "uniform",
    dtype: str | None = None,
    method: str = "linear",
    overwrite: bool = False,
) -> HFMergeResult:
    """Merge K Hugging Face model directories into ``out_dir``: theta = sum_k w_k theta_k.

    ``weights`` is ``"uniform"`` or one number per input (summing to 1; pass a
    plan's ``merge_weights`` for MERIT's token weights). ``dtype`` (float32,
    bfloat16 or float16) casts every merged tensor; None keeps each tensor's
    input dtype. Sums are accumulated in float32. All inputs must have the same
    config, tensor names, shapes and dtypes; every difference is listed in one
    MergeError. A non-empty ``out_dir`` raises FileExistsError unless
    ``overwrite``; the output appears only once it is complete.
    """
    start = time.perf_counter()
    if len(inputs) < 1:
        raise ValueError("merge_hf_dirs needs at least one input directory")
    out_path = Path(out_dir).expanduser().absolute()
    check_output_dir(out_path, overwrite=overwrite)
    out_dtype = output_dtype(dtype)
    merge_weights, weighting = resolve_weights(weights, num_models=len(inputs))
    operator = make_operator(method, weights=merge_weights)

    models = [read_hf_model_files(directory) for directory in inputs]
    problems = hf_input_problems(models)
    if problems:
        raise MergeError("the models cannot be merged", problems)
    reference = models[0]
    logger.info(
        "merging %d models (%d tensors each, weights %s) into %s",
        len(models),
        len(reference.tensors),
        [round(float(w), 6) for w in merge_weights],
        out_path,
    )

    num_parameters = 0
    with staged_dir(out_path, overwrite=overwrite) as staging, contextlib.ExitStack() as stack:
        handles = {
            (k, file): stack.enter_context(SafetensorsFile(file))
            for k, model in enumerate(models)
            for file in model.files
        }
        buffers = _Buffers()
        output_sizes: dict[str, int] = {}
        for file in reference.files:
            keys = reference.file_keys[file]
            specs = {}
            for key in keys:
                _, in_dtype, shape = reference.tensors[key]
                specs[key] = (out_dtype or in_dtype, shape)
            with SafetensorsWriter(staging / file.name, specs, metadata={"format": "pt"}) as out:
                for key in keys:
                    views = [
                        handles[(k, m.tensors[key][0])].view(key) for k, m in enumerate(models)
                    ]
                    target_dtype = specs[key][0]
                    pieces = _merged_pieces(operator, views, target_dtype, buffers)
                    out.write_chunks(key, pieces)
                    del views
                    output_sizes[key] = math.prod(specs[key][1]) * target_dtype.itemsize
                    num_parameters += math.prod(specs[key][1])
        if len(reference.files) > 1:
            weight_map = {
                key: file.name for file in reference.files for key in reference.file_keys[file]
            }
            index = {
                "metadata": {"total_size": sum(output_sizes.values())},
                "weight_map": weight_map,
            }
            (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

        _copy_extra_files(reference.directory, staging)
        config = dict(reference.config)
        if dtype is not None:
            config["torch_dtype"] = dtype
            config["dtype"] = dtype
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        seconds = time.perf_counter() - start
        write_json(
            staging / MERGE_JSON,
            {
                **operator.describe(),
                "weighting": weighting,
                "inputs": [str(model.directory) for model in models],
                "dtype": dtype,
                "num_parameters": num_parameters,
                "seconds": round(seconds, 3),
                "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
                "tool_version": __version__,
            },
        )
    seconds = time.perf_counter() - start
    logger.info(
        "merged %d tensors (%.1fM parameters) into %s in %.2f s",
        len(reference.tensors),
        num_parameters / 1e6,
        out_path,
        seconds,
    )
    return HFMergeResult(
        out_dir=out_path,
        weights=tuple(float(w) for w in merge_weights),
        dtype=dtype,
        num_tensors=len(reference.tensors),
        num_parameters=num_parameters,
        seconds=seconds,
    )
