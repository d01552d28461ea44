"""Branch checkpoints, resume, and the final weights that the merge step reads.

Layout of one branch's directory ``<out>/branches/<k>/``::

    checkpoints/<step>/          orbax CheckpointManager steps, the newest
        state/                   ``keep_checkpoints`` kept: TrainState as a
                                 PyTree (params, opt_state, step, rng)
        meta/                    JSON: step, data cursor (rows consumed),
                                 tokens and targets seen, wall time, the data
                                 fingerprint and the TrainConfig
    final/                       orbax PyTree checkpoint of the trained
                                 parameters only: a nested dict of arrays
                                 keyed by nnx parameter path, e.g.
                                 {"embed": [V, D], "final_norm": {"scale": [D]},
                                  "layers": {"attn": {"q_kernel": [L, D, N, H],
                                  ...}, ...}}; layer parameters are stacked on
                                 a leading L axis
    branch.json                  branch index, tasks, steps, tokens, theta0
                                 and plan hashes, wall time; written last
    metrics.jsonl, tensorboard/  training metrics (see loop.py)

``branch.json`` is written atomically, and only after ``final/`` is
complete, so its presence is the signal that a branch is done. A reader can
stream ``final/`` one leaf at a time: :func:`final_param_shapes` lists the
leaves from the checkpoint metadata without reading arrays, and
:func:`read_final_leaf` restores one of them as a numpy array with orbax's
partial restore. Both work on any machine, whatever devices wrote them.

Resume: the newest step in ``checkpoints/`` is restored onto the branch's
mesh, and training continues at that step. Because the batch of step s is a
pure function of (seed, s) (``data.py``) and the step is deterministic, a
run that is stopped and resumed on CPU ends with the same bytes as one that
never stopped. The data fingerprint and the result-changing TrainConfig
fields are checked on resume.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from merit_jax.conflict.artifacts import write_atomic
from merit_jax.train.config import RESULT_FIELDS

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
BRANCH_INFO_FILE = "branch.json"


def branch_dir(out_dir: str | Path, branch: int) -> Path:
    """Return ``<out>/branches/<branch>``."""
    return Path(out_dir) / "branches" / str(branch)


class BranchCheckpointer:
    """Periodic TrainState checkpoints of one branch with an orbax CheckpointManager."""

    def __init__(self, directory: str | Path, *, keep: int):
        self.directory = Path(directory).absolute() / CHECKPOINTS_DIR
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=("state", "meta"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: Mapping[str, Any]) -> None:
        """Start saving ``state`` at ``step``; the arrays are copied to host before it returns."""
        start = time.perf_counter()
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(_state_tree(state)),
                meta=ocp.args.JsonSave(dict(meta)),
            ),
            force=True,
        )
        logger.info(
            "checkpoint of step %d started in %s (%.2f s blocking)",
            step,
            self.directory,
            time.perf_counter() - start,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore the state tree (placed by ``abstract_state``'s shardings) and the meta."""
        start = time.perf_counter()
        tree = _state_tree(abstract_state)
        restore_args = jax.tree.map(lambda leaf: ocp.ArrayRestoreArgs(sharding=leaf.sharding), tree)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=tree, restore_args=restore_args),
                meta=ocp.args.JsonRestore(),
            ),
        )
        logger.info(
            "restored step %d from %s in %.1f s", step, self.directory, time.perf_counter() - start
        )
        return restored.state, restored.meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _state_tree(state: Any) -> dict[str, Any]:
    return {
        "params": state.params,
        "opt_state": state.opt_state,
        "step": state.step,
        "rng": state.rng,
    }


def check_resume_meta(
    meta: Mapping[str, Any], *, fingerprint: str, config: Mapping[str, Any], where: Path
) -> None:
    """Raise ValueError when a checkpoint was written for other data or other settings."""
    problems = []
    if meta.get("data_fingerprint") != fingerprint:
        problems.append(
            "the branch's data (tasks, budgets, tokenization, seed or batch layout) differs "
            "from the data the checkpoint was trained on"
        )
    saved = meta.get("config", {})
    for field in RESULT_FIELDS:
        if saved.get(field) != config.get(field):
            problems.append(f"{field} was {saved.get(field)!r}, now {config.get(field)!r}")
    if problems:
        raise ValueError(
            f"cannot resume from {where}:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + "\nRestore the original settings, or write to a new output directory."
        )


# --------------------------------------------------------------------------- final weights


def write_final(directory: str | Path, params: Any, info: Mapping[str, Any]) -> Path:
    """Save ``params`` to ``<directory>/final`` and then ``branch.json``; return final/.

    An incomplete ``final/`` left by an interrupted run (no branch.json) is
    replaced.
    """
    directory = Path(directory).absolute()
    final = directory / FINAL_DIR
    info_path = directory / BRANCH_INFO_FILE
    if info_path.exists():
        raise FileExistsError(f"{info_path} exists: branch {directory.name} is already finished")
    if final.exists() and jax.process_index() == 0:
        logger.warning("removing the incomplete final weights %s of an interrupted run", final)
        shutil.rmtree(final)
    start = time.perf_counter()
    # PyTreeCheckpointer saves synchronously: final/ is complete when save returns.
    # Uncompressed, because the merge reads every branch's final/ leaf by leaf and
    # zstd decompression dominated its time (benchmarks/merge.py).
    ocp.PyTreeCheckpointer(use_compression=False).save(final, args=ocp.args.PyTreeSave(params))
    if jax.process_index() == 0:
        text = json.dumps(dict(info), indent=2, sort_keys=True, allow_nan=False) + "\n"
        write_atomic(info_path, text.encode("utf-8"), overwrite=False)
    logger.info("wrote final weights and %s in %.1f s", info_path, time.perf_counter() - start)
    return final


def read_branch_info(directory: str | Path) -> dict[str, Any] | None:
    """Return the parsed branch.json of a finished branch, or None when it is unfinished."""
    path = Path(directory) / BRANCH_INFO_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def final_param_shapes(final_dir: str | Path) -> dict[tuple[str, ...], tuple[tuple[int, ...], Any]]:
    """Return {parameter path: (shape, dtype)} for every leaf of ``final/``, reading no arrays.

    Paths are tuples of dict keys such as ("layers", "attn", "q_kernel"), in
    the tree's flattening order (sorted keys).
    """
    metadata = ocp.PyTreeCheckpointer().metadata(Path(final_dir).absolute())
    leaves = jax.tree_util.tree_leaves_with_path(metadata.item_metadata.tree)
    return {
        tuple(str(key.key) for key in path): (tuple(leaf.shape), np.dtype(leaf.dtype))
        for path, leaf in leaves
    }


def read_final_leaf(final_dir: str | Path, path: tuple[str, ...]) -> np.ndarray:
    """Restore the single parameter at ``path`` (e.g. ("layers", "attn", "q_kernel")) as numpy.

    Uses orbax's partial restore, so only that leaf is read from disk.
    """
    if not path:
        raise ValueError("path must name one parameter, e.g. ('embed',)")
    item: Any = 0
    restore: Any = ocp.RestoreArgs(restore_type=np.ndarray)
    for key in reversed(path):
        item = {key: item}
        restore = {key: restore}
    restored = ocp.PyTreeCheckpointer().restore(
        Path(final_dir).absolute(),
        args=ocp.args.PyTreeRestore(item=item, restore_args=restore, partial_restore=True),
    )
    leaf = restored
    for key in path:
        leaf = leaf[key]
    return np.asarray(leaf)
