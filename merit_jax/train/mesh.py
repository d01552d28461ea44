"""Branch submeshes and parameter sharding rules.

The devices are carved into pairwise disjoint slots of ``devices_per_branch``
devices each, and each slot becomes a ``("data", "model")`` mesh built with
``jax.make_mesh(..., devices=subset)``. Branch k runs on slot ``k % S`` in
wave ``k // S``, where S is the number of slots: the branches of one wave run
at the same time on disjoint devices, and the waves run one after another. So
with fewer devices than branches, branches share devices only across waves,
never within one.

Sharding inside a branch: the batch rows are split over "data" (data
parallelism). Parameters are replicated by default. With ``model_parallel >
1`` each parameter's largest axis divisible by the "model" size is split over
"model", and with ``fsdp`` its largest remaining axis divisible by the "data"
size is split over "data" (fully sharded data parallelism). XLA's SPMD
partitioner inserts the collectives these layouts need, all inside the
branch's mesh.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

logger = logging.getLogger(__name__)

DATA_AXIS = "data"
MODEL_AXIS = "model"
AXIS_NAMES = (DATA_AXIS, MODEL_AXIS)


@dataclasses.dataclass(frozen=True)
class BranchPlacement:
    """Placement of one branch: its mesh, its device slot and its wave."""

    branch: int  # position of the branch in the list given to carve_submeshes
    mesh: Mesh
    slot: int  # index of the device slot; branches in one wave have distinct slots
    wave: int  # branches of wave w run together, after every branch of wave w - 1

    @property
    def device_ids(self) -> frozenset[int]:
        return frozenset(int(device.id) for device in self.mesh.devices.flat)

    @property
    def data_size(self) -> int:
        return int(self.mesh.shape[DATA_AXIS])

    @property
    def model_size(self) -> int:
        return int(self.mesh.shape[MODEL_AXIS])


def carve_submeshes(
    num_branches: int,
    devices: Sequence[Any] | None = None,
    *,
    devices_per_branch: int | None = None,
    model_parallel: int = 1,
) -> list[BranchPlacement]:
    """Assign every branch a mesh on its own devices, in waves when devices run short.

    ``devices`` defaults to ``jax.devices()``. ``devices_per_branch`` defaults
    to an equal share, ``len(devices) // num_branches`` rounded down to a
    multiple of ``model_parallel``. With fewer devices than branches it
    defaults to all devices, so the branches run one after another. Devices
    beyond ``S * devices_per_branch`` stay idle. Raises ValueError when a
    branch cannot get ``model_parallel`` devices.
    """
    if not isinstance(num_branches, int) or num_branches < 1:
        raise ValueError(f"num_branches={num_branches!r} must be a positive integer")
    if model_parallel < 1:
        raise ValueError(f"model_parallel={model_parallel} must be a positive integer")
    devices = list(jax.devices() if devices is None else devices)
    if len({id(d) for d in devices}) != len(devices) or not devices:
        raise ValueError(f"devices must be a non-empty list without repeats, got {devices}")
    count = len(devices)

    per = devices_per_branch
    if per is None:
        share = count // num_branches if count >= num_branches else count
        per = share - share % model_parallel
        if per == 0:
            per = model_parallel
    if per % model_parallel:
        raise ValueError(
            f"devices_per_branch={per} is not a multiple of model_parallel={model_parallel}"
        )
    if per > count:
        raise ValueError(
            f"a branch needs {per} devices (devices_per_branch={devices_per_branch}, "
            f"model_parallel={model_parallel}) but only {count} are available; lower them"
        )

    slots = min(count // per, num_branches)
    meshes = [
        jax.make_mesh(
            (per // model_parallel, model_parallel),
            AXIS_NAMES,
            devices=devices[slot * per : (slot + 1) * per],
            # Auto axes: XLA's sharding propagation chooses the layout of
            # intermediates, so model code needs no sharding annotations.
            axis_types=(AxisType.Auto, AxisType.Auto),
        )
        for slot in range(slots)
    ]
    placements = [
        BranchPlacement(branch=k, mesh=meshes[k % slots], slot=k % slots, wave=k // slots)
        for k in range(num_branches)
    ]
    waves = -(-num_branches // slots)
    idle = count - slots * per
    if waves > 1:
        logger.warning(
            "%d branches but room for only %d at a time (%d devices, %d per branch): the "
            "branches run in %d waves one after another, sharing devices only across waves",
            num_branches,
            slots,
            count,
            per,
            waves,
        )
    logger.info(
        "carved %d device slot(s) of %d device(s) (data %d x model %d)%s",
        slots,
        per,
        per // model_parallel,
        model_parallel,
        f"; {idle} device(s) idle" if idle else "",
    )
    for placement in placements:
        logger.debug(
            "branch %d: wave %d, slot %d, devices %s",
            placement.branch,
            placement.wave,
            placement.slot,
            sorted(placement.device_ids),
        )
    return placements


def param_partition_spec(shape: Sequence[int], *, data_size: int, model_size: int, fsdp: bool) -> P:
    """Return the PartitionSpec of one parameter under the rules in the module doc.

    The "model" axis takes the largest dimension divisible by ``model_size``
    (the first one on ties), and with ``fsdp`` the "data" axis takes the
    largest other dimension divisible by ``data_size``. A dimension that no
    axis divides stays whole, so a parameter may end up replicated.
    """
    spec: list[str | None] = [None] * len(shape)

    def claim(axis: str, size: int) -> None:
        candidates = [
            dim for dim in range(len(shape)) if spec[dim] is None and shape[dim] % size == 0
        ]
        if candidates:
            # max() keeps the first of equal sizes.
            spec[max(candidates, key=lambda dim: shape[dim])] = axis

    if model_size > 1:
        claim(MODEL_AXIS, model_size)
    if fsdp and data_size > 1:
        claim(DATA_AXIS, data_size)
    return P(*spec)


def param_shardings(params: Any, mesh: Mesh, *, fsdp: bool) -> Any:
    """Return a tree of NamedShardings for ``params`` (arrays or ShapeDtypeStructs)."""
    data_size = int(mesh.shape[DATA_AXIS])
    model_size = int(mesh.shape[MODEL_AXIS])
    return jax.tree.map(
        lambda leaf: NamedSharding(
            mesh,
            param_partition_spec(
                np.shape(leaf), data_size=data_size, model_size=model_size, fsdp=fsdp
            ),
        ),
        params,
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """Return the sharding that keeps a full copy on every device of ``mesh``."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Return the sharding of [M, B/M, T] micro-batched arrays: rows split over "data"."""
    return NamedSharding(mesh, P(None, DATA_AXIS))
