"""Zero-copy safetensors reading and streaming safetensors writing with numpy.

A safetensors file is an 8-byte little-endian header length n, n bytes of JSON
header, then the raw tensor bytes::

    {"__metadata__": {...}, "<name>": {"dtype": "F32", "shape": [...],
                                       "data_offsets": [begin, end]}, ...}

where offsets count from the first byte after the header. ``SafetensorsFile``
maps a file and returns numpy views into the mapping, so reading a tensor
costs no copy and no private memory: its pages belong to the page cache.
(``safe_open(...).get_tensor`` copies every tensor into a fresh array.)
``SafetensorsWriter`` writes the header for all tensors first and then each
tensor as it becomes ready. A writer therefore keeps one tensor in memory at a
time, where ``safetensors.numpy.save_file`` needs them all at once.

Both assume a little-endian host, as safetensors itself stores little-endian data.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

_NUMPY_CODES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}
# Codes whose numpy dtypes come from ml_dtypes. It is imported only when one of
# them appears, because importing it takes about 0.7 s on a 2-core machine.
_ML_DTYPES_CODES: dict[str, str] = {
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
SAFETENSORS_CODES = tuple(sorted({**_NUMPY_CODES, **_ML_DTYPES_CODES}))
_CODE_OF_NAME = {name: code for code, name in {**_NUMPY_CODES, **_ML_DTYPES_CODES}.items()}

# The safetensors library rejects headers above 100 MB; so does this reader.
MAX_HEADER_BYTES = 100_000_000
_ALIGNMENT = 8  # the safetensors library pads the header to a multiple of 8 bytes


class SafetensorsFormatError(ValueError):
    """A file that is not valid safetensors, or a dtype that safetensors cannot store."""


def numpy_dtype(code: str) -> np.dtype:
    """Return the numpy dtype of a safetensors dtype code such as ``"BF16"``."""
    if code in _NUMPY_CODES:
        return np.dtype(_NUMPY_CODES[code])
    if code in _ML_DTYPES_CODES:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, _ML_DTYPES_CODES[code]))
    raise SafetensorsFormatError(
        f"unknown safetensors dtype {code!r}: known codes are {list(SAFETENSORS_CODES)}"
    )


def safetensors_code(dtype: Any) -> str:
    """Return the safetensors dtype code (``"F32"``, ``"BF16"``, ...) of a numpy dtype."""
    code = _CODE_OF_NAME.get(np.dtype(dtype).name)
    if code is None:
        raise SafetensorsFormatError(
            f"dtype {np.dtype(dtype)} has no safetensors code; use one of {sorted(_CODE_OF_NAME)}"
        )
    return code


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Location, dtype and shape of one tensor in a safetensors file."""

    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    nbytes: int


def _header_problem(path: Path, detail: str) -> SafetensorsFormatError:
    return SafetensorsFormatError(
        f"{path} is not a valid safetensors file: {detail}. The file is probably truncated or "
        "corrupt; write or download it again."
    )


def _parse_entry(path: Path, name: str, entry: Any, data_bytes: int, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise _header_problem(path, f"header entry {name!r} lacks dtype, shape or data_offsets")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if code not in SAFETENSORS_CODES:
        raise _header_problem(
            path, f"tensor {name!r} has unknown dtype {code!r} (known: {list(SAFETENSORS_CODES)})"
        )
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _header_problem(path, f"tensor {name!r} has invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_bytes
    ):
        raise _header_problem(
            path,
            f"tensor {name!r} has data_offsets {offsets!r} outside the {data_bytes} data bytes",
        )
    dtype = numpy_dtype(code)
    expected = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != expected:
        raise _header_problem(
            path,
            f"tensor {name!r} ({code}, shape {shape}) needs {expected} bytes but its "
            f"data_offsets span {offsets[1] - offsets[0]}",
        )
    return TensorInfo(dtype, tuple(shape), data_start + offsets[0], expected)


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse a safetensors header; return {name: TensorInfo} in file order and the metadata."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise _header_problem(path, f"it has {size} bytes, fewer than the 8-byte header length")
        (header_bytes,) = struct.unpack("<Q", prefix)
        if header_bytes > min(MAX_HEADER_BYTES, size - 8):
            raise _header_problem(
                path, f"the header length {header_bytes} exceeds the file size ({size} bytes)"
            )
        raw = handle.read(header_bytes)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _header_problem(path, f"the header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise _header_problem(path, "the header is not a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_bytes
    data_bytes = size - data_start
    infos = {
        name: _parse_entry(path, name, entry, data_bytes, data_start)
        for name, entry in header.items()
    }
    ordered = dict(sorted(infos.items(), key=lambda item: item[1].begin))
    return ordered, {str(k): str(v) for k, v in dict(metadata).items()}


class SafetensorsFile:
    """A memory-mapped safetensors file whose tensors are read as read-only numpy views.

    Use as a context manager. Views returned by ``view`` are valid until ``close``.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.tensors, self.metadata = read_header(self.path)
        self._handle: BinaryIO | None = self.path.open("rb")
        self._map: mmap.mmap | None = None
        if any(info.nbytes for info in self.tensors.values()):
            self._map = mmap.mmap(self._handle.fileno(), 0, access=mmap.ACCESS_READ)

    def view(self, name: str) -> np.ndarray:
        """Return tensor ``name`` as a read-only array backed by the file mapping."""
        info = self.tensors.get(name)
        if info is None:
            raise KeyError(f"tensor {name!r} not found in {self.path}")
        if info.nbytes == 0 or self._map is None:
            return np.zeros(info.shape, info.dtype)
        flat = np.frombuffer(
            self._map, dtype=info.dtype, count=info.nbytes // info.dtype.itemsize, offset=info.begin
        )
        return flat.reshape(info.shape)

    def close(self) -> None:
        """Unmap the file. A mapping that views still reference is freed with the last view."""
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                # A view survives, for example in the traceback of an error raised
                # mid-merge. Closing would fail, and dropping our reference is enough.
                pass
            self._map = None
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class SafetensorsWriter:
    """Write a safetensors file one tensor at a time, in the order of ``specs``.

    ``specs`` maps each name to (dtype, shape); the header is written on entry,
    and ``write`` must then receive every tensor exactly once, in that order.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        specs: Mapping[str, tuple[Any, Sequence[int]]],
        *,
        metadata: Mapping[str, str] | None = None,
    ):
        self.path = Path(path)
        self._order = list(specs)
        self._specs = {
            name: (np.dtype(dtype), tuple(int(d) for d in shape))
            for name, (dtype, shape) in specs.items()
        }
        self._next = 0
        self._handle: BinaryIO | None = None
        self._metadata = dict(metadata or {})

    def _header(self) -> bytes:
        header: dict[str, Any] = {}
        if self._metadata:
            header["__metadata__"] = self._metadata
        position = 0
        for name in self._order:
            dtype, shape = self._specs[name]
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {
                "dtype": safetensors_code(dtype),
                "shape": list(shape),
                "data_offsets": [position, position + nbytes],
            }
            position += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        return encoded + b" " * (-len(encoded) % _ALIGNMENT)

    def __enter__(self) -> SafetensorsWriter:
        header = self._header()
        self._handle = self.path.open("wb")
        self._handle.write(struct.pack("<Q", len(header)))
        self._handle.write(header)
        return self

    def _check_next(self, name: str) -> tuple[np.dtype, tuple[int, ...]]:
        if self._handle is None:
            raise RuntimeError("SafetensorsWriter.write called outside its `with` block")
        if self._next >= len(self._order) or self._order[self._next] != name:
            expected = self._order[self._next] if self._next < len(self._order) else "nothing"
            raise ValueError(f"wrote tensor {name!r} to {self.path}, expected {expected!r} next")
        return self._specs[name]

    def _append(self, array: np.ndarray) -> None:
        assert self._handle is not None
        if array.size:
            # A uint8 view gives a plain buffer for every dtype, bf16 included.
            self._handle.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)

    def write(self, name: str, array: np.ndarray) -> None:
        """Append tensor ``name``; it must be the next one in order, with its dtype and shape."""
        dtype, shape = self._check_next(name)
        if array.dtype != dtype or tuple(array.shape) != shape:
            raise ValueError(
                f"tensor {name!r} is {array.dtype} {list(array.shape)}, but the header of "
                f"{self.path} declares {dtype} {list(shape)}"
            )
        self._append(array)
        self._next += 1

    def write_chunks(self, name: str, chunks: Iterable[np.ndarray]) -> None:
        """Append tensor ``name`` as consecutive pieces of its flattened (C-order) data."""
        dtype, shape = self._check_next(name)
        written = 0
        for chunk in chunks:
            if chunk.dtype != dtype:
                raise ValueError(f"a chunk of tensor {name!r} is {chunk.dtype}, not {dtype}")
            self._append(chunk)
            written += chunk.size
        if written != math.prod(shape):
            raise ValueError(
                f"chunks of tensor {name!r} hold {written} elements, its shape {list(shape)} "
                f"needs {math.prod(shape)}"
            )
        self._next += 1

    def __exit__(self, exc_type: object, *exc_info: object) -> None:
        assert self._handle is not None
        self._handle.close()
        self._handle = None
        if exc_type is None and self._next != len(self._order):
            missing = self._order[self._next :]
            raise RuntimeError(
                f"{self.path} is incomplete: tensors {missing[:5]} were never written"
            )
