"""Files of the plan directory: atomic writes, content hashes and the planning arrays.

Arrays saved next to plan.json (T tasks, d sketch dimension, r PCA axes):

    sketches.npy    [T, d]  task gradient sketches as computed (float32)
    similarity.npy  [T, T]  cosine matrix C (float64)
    pca.npz                 the fields of ``pca.PCAResult``: column_mean [T],
                            eigenvalues [T], eigenvectors [T, T], embedding [T, r],
                            explained_variance_ratio [T]

Rows follow the task order of plan.json. The .npz archive is written with a
fixed timestamp and member order, so equal arrays give equal bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from merit_jax.conflict.pca import PCAResult

SKETCHES_FILENAME = "sketches.npy"
SIMILARITY_FILENAME = "similarity.npy"
PCA_FILENAME = "pca.npz"

_PCA_FIELDS = tuple(f.name for f in dataclasses.fields(PCAResult))
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_CHUNK_BYTES = 1 << 20


def write_atomic(path: Path, data: bytes, *, overwrite: bool) -> None:
    """Write ``data`` to a temporary file in the target directory, then rename it to ``path``.

    Readers see the old file or the complete new one, never a partial write.
    Raises FileExistsError when ``path`` exists and ``overwrite`` is false.
    """
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} already exists: pass overwrite=True (--overwrite) to replace it, "
            "or choose another output directory"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_path(path: str | Path) -> str:
    """Return the SHA-256 hex digest of a file, or of a directory tree.

    For a directory, the digest covers every regular file below it (symbolic
    links to files are followed), sorted by POSIX relative path: one line
    ``<relative path> NUL <file sha256> LF`` per file. Names and contents
    count; timestamps and permissions do not.
    """
    root = Path(path)
    if root.is_file():
        return _file_sha256(root)
    if not root.is_dir():
        raise FileNotFoundError(f"cannot hash {root}: no such file or directory")
    files = sorted(
        (p for p in root.rglob("*") if p.is_file()), key=lambda p: p.relative_to(root).as_posix()
    )
    digest = hashlib.sha256()
    for file in files:
        relative = file.relative_to(root).as_posix()
        digest.update(f"{relative}\0{_file_sha256(file)}\n".encode())
    return digest.hexdigest()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            archive.writestr(info, _npy_bytes(arrays[name]))
    return buffer.getvalue()


@dataclasses.dataclass(frozen=True, eq=False)
class PlanArrays:
    """The arrays behind a plan: sketches [T, d], cosine matrix [T, T] and the PCA."""

    sketches: np.ndarray
    similarity: np.ndarray
    pca: PCAResult


def _array_problems(sketches: np.ndarray, similarity: np.ndarray, pca: PCAResult) -> list[str]:
    problems = []
    if sketches.ndim != 2:
        problems.append(f"sketches must be 2-D [T, d], got shape {sketches.shape}")
        return problems
    t = sketches.shape[0]
    if similarity.shape != (t, t):
        problems.append(f"similarity has shape {similarity.shape}, expected [T, T] = [{t}, {t}]")
    expected = {
        "column_mean": (t,),
        "eigenvalues": (t,),
        "eigenvectors": (t, t),
        "explained_variance_ratio": (t,),
    }
    for name, shape in expected.items():
        actual = getattr(pca, name).shape
        if actual != shape:
            problems.append(f"pca.{name} has shape {actual}, expected {shape} for T = {t} tasks")
    if pca.embedding.ndim != 2 or pca.embedding.shape[0] != t:
        problems.append(
            f"pca.embedding has shape {pca.embedding.shape}, expected [T, r] with T = {t}"
        )
    for name, array in [("sketches", sketches), ("similarity", similarity)] + [
        (f"pca.{f}", getattr(pca, f)) for f in _PCA_FIELDS
    ]:
        if not np.isfinite(array).all():
            problems.append(f"{name} contains NaN or inf")
    return problems


def save_plan_arrays(
    directory: str | Path,
    *,
    sketches: ArrayLike,
    similarity: ArrayLike,
    pca: PCAResult,
    overwrite: bool = False,
) -> None:
    """Write sketches.npy, similarity.npy and pca.npz into ``directory``, each atomically.

    Checks all three files for existence first, so a refused call writes nothing.
    """
    root = Path(directory)
    sketch_array = np.asarray(sketches)
    similarity_array = np.asarray(similarity, dtype=np.float64)
    problems = _array_problems(sketch_array, similarity_array, pca)
    if problems:
        raise ValueError("cannot save the plan arrays: " + "; ".join(problems))
    names = (SKETCHES_FILENAME, SIMILARITY_FILENAME, PCA_FILENAME)
    existing = [name for name in names if (root / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{existing} already exist in {root}: pass overwrite=True (--overwrite) to "
            "replace them, or choose another output directory"
        )
    write_atomic(root / SKETCHES_FILENAME, _npy_bytes(sketch_array), overwrite=True)
    write_atomic(root / SIMILARITY_FILENAME, _npy_bytes(similarity_array), overwrite=True)
    fields = {name: np.asarray(getattr(pca, name)) for name in _PCA_FIELDS}
    write_atomic(root / PCA_FILENAME, _npz_bytes(fields), overwrite=True)


def load_plan_arrays(directory: str | Path, *, num_tasks: int | None = None) -> PlanArrays:
    """Read and cross-check the arrays in ``directory``; ``num_tasks`` checks T against a plan."""
    root = Path(directory)
    missing = [
        name
        for name in (SKETCHES_FILENAME, SIMILARITY_FILENAME, PCA_FILENAME)
        if not (root / name).is_file()
    ]
    if missing:
        raise FileNotFoundError(f"{missing} not found in {root}: run `merit plan` to create them")
    sketches = np.load(root / SKETCHES_FILENAME, allow_pickle=False)
    similarity = np.load(root / SIMILARITY_FILENAME, allow_pickle=False)
    with np.load(root / PCA_FILENAME, allow_pickle=False) as archive:
        absent = sorted(set(_PCA_FIELDS) - set(archive.files))
        if absent:
            raise ValueError(
                f"{root / PCA_FILENAME} lacks arrays {absent}: rerun `merit plan` to rewrite it"
            )
        pca = PCAResult(**{name: archive[name] for name in _PCA_FIELDS})
    problems = _array_problems(sketches, similarity, pca)
    if num_tasks is not None and sketches.ndim == 2 and sketches.shape[0] != num_tasks:
        problems.append(
            f"the arrays have {sketches.shape[0]} task rows but the plan has {num_tasks} tasks"
        )
    if problems:
        raise ValueError(f"invalid plan arrays in {root}: " + "; ".join(problems))
    return PlanArrays(sketches=sketches, similarity=similarity, pca=pca)
