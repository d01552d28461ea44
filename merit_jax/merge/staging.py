"""Atomic output directories for merges.

A merge writes into a hidden sibling ``.<name>.partial-XXXX`` of its output
directory and renames it to ``<name>`` only after the last byte is written.
Merge code that raises removes the partial directory. A process killed
mid-merge leaves the hidden directory behind, never a ``<name>`` that looks
complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PARTIAL_MARK = ".partial-"
MERGE_JSON = "merge.json"  # the record every merge writes into its output directory


def check_output_dir(out_dir: Path, *, overwrite: bool, description: str = "merge output") -> None:
    """Raise FileExistsError for a file, or for a non-empty directory unless ``overwrite``."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(
            f"{description} {out_dir} exists and is not a directory: remove it first"
        )
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{description} {out_dir} already exists and is not empty: choose another directory or "
            "pass overwrite=True (--overwrite) to replace it"
        )


def _warn_stale_partials(out_dir: Path) -> None:
    stale = sorted(out_dir.parent.glob(f".{out_dir.name}{PARTIAL_MARK}*"))
    if stale:
        logger.warning(
            "found %d partial output(s) of an earlier interrupted merge next to %s: %s. "
            "They are incomplete; delete them once no other merge writes there.",
            len(stale),
            out_dir,
            ", ".join(p.name for p in stale),
        )


@contextlib.contextmanager
def staged_dir(out_dir: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield an empty staging directory that becomes ``out_dir`` when the block succeeds.

    An existing ``out_dir`` is replaced only when ``overwrite`` is true, and only
    after the new one is complete.
    """
    out_dir = out_dir.absolute()
    check_output_dir(out_dir, overwrite=overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _warn_stale_partials(out_dir)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}{PARTIAL_MARK}"))
    try:
        yield staging
        # Checked again: another process may have created out_dir in the meantime.
        check_output_dir(out_dir, overwrite=overwrite)
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _move_into_place(staging: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return
    # A rename cannot replace a non-empty directory, so the old one moves aside first.
    aside = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
    os.rename(out_dir, aside / out_dir.name)
    try:
        os.rename(staging, out_dir)
    except BaseException:
        os.rename(aside / out_dir.name, out_dir)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON with sorted keys and a final newline."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")
