"""Export a Decoder as a Hugging Face model directory that transformers loads.

The directory contains config.json, generation_config.json, the tokenizer files
(with the chat template) and the weights as safetensors: one
``model.safetensors`` when they fit in ``max_shard_size``, else shards
``model-00001-of-0000N.safetensors`` with ``model.safetensors.index.json``.
Everything is written into a temporary sibling directory that is renamed into
place at the end, so an interrupted export never leaves a half-written model
under ``out_dir``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from merit_jax.models.decoder import Decoder
from merit_jax.models.weights import INDEX_FILE, SINGLE_FILE, hf_from_decoder

logger = logging.getLogger(__name__)

EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}

# Decimal units as in transformers' max_shard_size ("2GB" = 2 * 10**9 bytes);
# binary units for "GiB" and friends.
_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")


def parse_size(size: int | str) -> int:
    """Return a byte count for an int or a string such as ``"2GB"``, ``"500MB"`` or ``"1GiB"``."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size={size} must be a positive number of bytes")
        return size
    match = _SIZE.fullmatch(str(size))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(
            f"max_shard_size={size!r} is not a size. Use bytes as an int or a string such as "
            "'2GB', '500MB' or '1GiB'"
        )
    count = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if count <= 0:
        raise ValueError(f"max_shard_size={size!r} must be larger than zero bytes")
    return count


def plan_shards(tensors: dict[str, np.ndarray], max_bytes: int) -> list[list[str]]:
    """Group keys, in order, into shards of at most ``max_bytes`` each.

    A tensor larger than ``max_bytes`` gets a shard of its own.
    """
    shards: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for key, array in tensors.items():
        if current and current_bytes + array.nbytes > max_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(key)
        current_bytes += array.nbytes
    if current:
        shards.append(current)
    return shards


def _write_shard(path: Path, tensors: dict[str, np.ndarray]) -> None:
    # transformers writes {"format": "pt"} metadata, and older releases check for it.
    save_file(tensors, str(path), metadata={"format": "pt"})


def write_safetensors(
    tensors: dict[str, np.ndarray], directory: Path, *, max_shard_size: int | str
) -> list[Path]:
    """Write tensors as one file or as shards with an index; return the files written."""
    shards = plan_shards(tensors, parse_size(max_shard_size))
    if len(shards) == 1:
        path = directory / SINGLE_FILE
        _write_shard(path, tensors)
        return [path]

    weight_map: dict[str, str] = {}
    files = []
    for number, keys in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(directory / name, {key: tensors[key] for key in keys})
        weight_map.update({key: name for key in keys})
        files.append(directory / name)
    index = {
        "metadata": {"total_size": int(sum(array.nbytes for array in tensors.values()))},
        "weight_map": weight_map,
    }
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return files


def _generation_config(model: Decoder, tokenizer: Any) -> dict[str, Any]:
    config = model.config
    bos = config.bos_token_id
    eos = config.eos_token_id
    if tokenizer is not None:
        bos = bos if bos is not None else tokenizer.bos_token_id
        eos = eos if eos is not None else tokenizer.eos_token_id
    generation: dict[str, Any] = {"_from_model_config": True}
    if bos is not None:
        generation["bos_token_id"] = bos
    if eos is not None:
        generation["eos_token_id"] = eos
    return generation


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"export target {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"export directory {out_dir} already exists and is not empty. Choose another "
            "directory or pass overwrite=True to replace it."
        )


def export_hf(
    model: Decoder,
    tokenizer: Any,
    out_dir: str | os.PathLike[str],
    *,
    dtype: str = "float32",
    max_shard_size: int | str = "2GB",
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (and ``tokenizer``, unless None) as a Hugging Face model directory.

    ``dtype`` is the stored weight dtype (float32, bfloat16 or float16) and goes
    into config.json as ``torch_dtype``. A non-empty ``out_dir`` raises
    FileExistsError unless ``overwrite=True``, which replaces it whole. Returns
    ``out_dir``.
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported. Use one of {sorted(EXPORT_DTYPES)}.")
    max_bytes = parse_size(max_shard_size)
    out_dir = Path(out_dir).expanduser().absolute()
    _check_target(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    tensors = {
        key: np.ascontiguousarray(array.astype(EXPORT_DTYPES[dtype], copy=False))
        for key, array in hf_from_decoder(model).items()
    }
    hf_config = model.config.to_hf_dict()
    hf_config["torch_dtype"] = dtype
    hf_config["dtype"] = dtype  # the key transformers 5 reads and writes

    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.export-"))
    try:
        files = write_safetensors(tensors, staging, max_shard_size=max_bytes)
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        generation = _generation_config(model, tokenizer)
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        else:
            logger.warning("exporting %s without tokenizer files (tokenizer=None)", out_dir)
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    logger.info(
        "exported %d tensors (%.1f MB, %s) in %d file(s) to %s in %.1f s",
        len(tensors),
        sum(array.nbytes for array in tensors.values()) / 1e6,
        dtype,
        len(files),
        out_dir,
        time.perf_counter() - start,
    )
    return out_dir


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Rename ``staging`` to ``out_dir``, replacing an existing ``out_dir`` only once done."""
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return
    # Move the old directory aside first: a rename cannot replace a non-empty directory.
    old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
    os.rename(out_dir, old / out_dir.name)
    try:
        os.rename(staging, out_dir)
    except BaseException:
        os.rename(old / out_dir.name, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
