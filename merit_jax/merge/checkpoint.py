"""Orbax parameter checkpoints: leaf metadata, partial restore, save, and a Decoder from them.

A parameter checkpoint is an orbax PyTree checkpoint (``ocp.StandardCheckpointer``
or ``ocp.PyTreeCheckpointer``) of a nested dict of arrays keyed by the Decoder's
nnx parameter paths::

    embed [V, D]
    layers/attn/{q,k,v,o}_kernel, layers/attn/{q,k,v}_bias (Qwen2 only)
    layers/{attn,mlp}_norm/scale, layers/mlp/{gate,up,down}_kernel   (stacked on L)
    final_norm/scale [D]
    lm_head [D, V]   (untied embeddings only)

Axis letters as in ``merit_jax.models.decoder``. Leaves are named by their path
as a tuple of keys, such as ``("layers", "attn", "q_kernel")``, or joined with
dots in messages.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from merit_jax.merge.operators import is_float_dtype

logger = logging.getLogger(__name__)

LeafPath = tuple[str, ...]
LeafSpec = tuple[np.dtype, tuple[int, ...]]  # dtype and shape

# Files that orbax writes into every PyTree checkpoint directory.
_ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA")


def leaf_name(path: LeafPath) -> str:
    """Return the dotted name of a leaf path, as in ``layers.attn.q_kernel``."""
    return ".".join(path)


def flatten(tree: Mapping[str, Any], prefix: LeafPath = ()) -> dict[LeafPath, Any]:
    """Flatten a nested dict into {leaf path: leaf}."""
    flat: dict[LeafPath, Any] = {}
    for key, value in tree.items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping):
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat


def unflatten(flat: Mapping[LeafPath, Any]) -> dict[str, Any]:
    """Build a nested dict from {leaf path: leaf}."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def is_orbax_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Return whether ``path`` is a directory with orbax's checkpoint metadata files."""
    path = Path(path)
    return path.is_dir() and any((path / marker).is_file() for marker in _ORBAX_MARKERS)


def checkpoint_leaves(path: str | os.PathLike[str]) -> dict[LeafPath, LeafSpec]:
    """Return {leaf path: (dtype, shape)} of an orbax checkpoint without reading any array."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if not is_orbax_checkpoint(path):
        raise FileNotFoundError(
            f"{path} is not an orbax checkpoint (no {' or '.join(_ORBAX_MARKERS)} file in it)"
        )
    metadata = ocp.PyTreeCheckpointer().metadata(path)
    # orbax 0.11+ wraps the tree metadata in a StepMetadata; older releases return it bare.
    metadata = getattr(metadata, "item_metadata", metadata)
    tree = getattr(metadata, "tree", metadata)
    if not isinstance(tree, Mapping):
        raise ValueError(
            f"{path} contains a {type(tree).__name__}, not a nested dict of parameters: write "
            "parameter checkpoints from nnx.State.to_pure_dict()"
        )
    return {
        leaf: (np.dtype(meta.dtype), tuple(int(d) for d in meta.shape))
        for leaf, meta in flatten(tree).items()
    }


class CheckpointReader:
    """Reads chosen leaves of one orbax checkpoint as numpy arrays (orbax partial restore)."""

    def __init__(self, path: str | os.PathLike[str]):
        import orbax.checkpoint as ocp

        self.path = Path(path).absolute()
        self._ocp = ocp
        self._checkpointer = ocp.PyTreeCheckpointer()

    def read(self, leaves: Iterable[LeafPath]) -> dict[LeafPath, np.ndarray]:
        """Restore only ``leaves``; every other leaf of the checkpoint stays on disk."""
        wanted = list(leaves)
        item = unflatten({leaf: 0 for leaf in wanted})
        restore_args = unflatten(
            {leaf: self._ocp.RestoreArgs(restore_type=np.ndarray) for leaf in wanted}
        )
        restored = self._checkpointer.restore(
            self.path,
            args=self._ocp.args.PyTreeRestore(
                item=item, restore_args=restore_args, partial_restore=True
            ),
        )
        flat = flatten(restored)
        return {leaf: np.asarray(flat[leaf]) for leaf in wanted}


def group_leaves(specs: Mapping[LeafPath, LeafSpec], max_bytes: int) -> list[list[LeafPath]]:
    """Group leaves, in order, into reads of at most ``max_bytes`` each.

    A leaf larger than ``max_bytes`` gets a group of its own.
    """
    groups: list[list[LeafPath]] = []
    current: list[LeafPath] = []
    current_bytes = 0
    for leaf, (dtype, shape) in specs.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if current and current_bytes + nbytes > max_bytes:
            groups.append(current)
            current, current_bytes = [], 0
        current.append(leaf)
        current_bytes += nbytes
    if current:
        groups.append(current)
    return groups


def save_params(path: str | os.PathLike[str], params: Mapping[str, Any]) -> Path:
    """Write a nested dict of arrays as an orbax checkpoint at ``path`` (which must not exist).

    The arrays are stored without compression: zstd shrinks float weights by
    about 12% but made saving 135M float32 parameters 2-6x slower (0.4 s against
    0.9-2.6 s, benchmarks/merge.py's machine) and cost one extra copy of the
    model in memory. Readers need no setting to read either form.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    # PyTreeCheckpointer saves synchronously: the checkpoint is complete on return.
    checkpointer = ocp.PyTreeCheckpointer(use_compression=False)
    checkpointer.save(path, args=ocp.args.PyTreeSave(dict(params)))
    return path


def load_params(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Restore a whole parameter checkpoint as a nested dict of numpy arrays."""
    specs = checkpoint_leaves(path)
    return unflatten(CheckpointReader(path).read(specs))


def decoder_from_params(config: Any, params: Mapping[str, Any]) -> Any:
    """Build a Decoder for ``config`` from a nested dict of parameters.

    Arrays are cast to ``config.param_dtype``. Missing, unexpected and
    misshapen leaves are collected and raised together as one ValueError.
    """
    import jax.numpy as jnp
    from flax import nnx

    from merit_jax.models.config import to_dtype
    from merit_jax.models.decoder import abstract_decoder

    values = flatten(params)
    graphdef, abstract_state = nnx.split(abstract_decoder(config))
    dtype = to_dtype(config.param_dtype)
    problems: list[str] = []
    filled: dict[Any, Any] = {}
    expected = set()
    for raw_path, variable in nnx.to_flat_state(abstract_state):
        path = tuple(str(part) for part in raw_path)
        expected.add(path)
        shape = tuple(variable.get_value().shape)
        if path not in values:
            problems.append(f"missing parameter {leaf_name(path)} (shape {list(shape)})")
            continue
        value = values[path]
        if tuple(value.shape) != shape:
            problems.append(
                f"parameter {leaf_name(path)} has shape {list(value.shape)}, the config "
                f"expects {list(shape)}"
            )
            continue
        filled[raw_path] = variable.replace(jnp.asarray(value, dtype=dtype))
    for path in sorted(values.keys() - expected):
        extra_shape = list(values[path].shape)
        problems.append(f"unexpected parameter {leaf_name(path)} (shape {extra_shape})")
    if problems:
        listing = "\n".join(f"  - {problem}" for problem in problems)
        raise ValueError(
            f"the parameters do not match the model config ({len(problems)} problem(s)):\n"
            f"{listing}\nPass the config of the model these parameters were trained from."
        )
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def tree_problems(trees: Sequence[Mapping[LeafPath, LeafSpec]], names: Sequence[str]) -> list[str]:
    """Return every missing, unexpected, misshapen or mistyped leaf against the first tree."""
    reference, reference_name = trees[0], names[0]
    problems = []
    for leaf, (dtype, _) in reference.items():
        if not is_float_dtype(dtype):
            problems.append(
                f"{reference_name}: leaf {leaf_name(leaf)} is {dtype}, not a float: only "
                "float parameters can be merged"
            )
    for tree, name in zip(trees[1:], names[1:], strict=True):
        for leaf in sorted(reference.keys() - tree.keys()):
            problems.append(f"{name}: leaf {leaf_name(leaf)} is missing")
        for leaf in sorted(tree.keys() - reference.keys()):
            problems.append(f"{name}: unexpected leaf {leaf_name(leaf)} (not in {reference_name})")
        for leaf in sorted(reference.keys() & tree.keys()):
            ref_dtype, ref_shape = reference[leaf]
            dtype, shape = tree[leaf]
            if shape != ref_shape:
                problems.append(
                    f"{name}: leaf {leaf_name(leaf)} has shape {list(shape)}, "
                    f"{reference_name} has {list(ref_shape)}"
                )
            if dtype != ref_dtype:
                problems.append(
                    f"{name}: leaf {leaf_name(leaf)} is {dtype}, {reference_name} has {ref_dtype}"
                )
    return problems
