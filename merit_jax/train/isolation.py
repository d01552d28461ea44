"""Proof from compiled executables that branches share no device and no collective.

Each branch's step is compiled for its own mesh. Two facts show isolation:

1. the device set of every executable equals its branch's submesh, and the
   sets of branches that run together are pairwise disjoint;
2. every collective in every executable's optimized HLO has its replica
   groups (or source-target pairs) inside that branch's devices.

Collectives name devices by logical id: with SPMD partitioning and one
replica, id i is the i-th device of the executable's device assignment
(``runtime_executable().local_devices()``, in mesh order). The HLO printer
writes replica groups in three forms, all parsed here:

    {{0,1,2,3},{4,5,6,7}}                       explicit lists
    [2,4]<=[8]   or   [4,2]<=[2,4]T(1,0)        iota: reshape(transpose(
                                                reshape(arange(n), dims), perm), groups)
    mesh['a'=2,'b'=4] {'b'}                     mesh axes: groups vary 'b' and fix 'a';
      with an optional device_ids=(...) order   sub-axes are written 'a':(pre)size
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

COLLECTIVE_OPS = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "ragged-all-to-all",
    "collective-permute",
    "collective-broadcast",
)

_OP = re.compile(r"\s(" + "|".join(re.escape(op) for op in COLLECTIVE_OPS) + r")(?:-start)?\(")
_NAME = r"'?([A-Za-z_][\w.]*)'?"


class HloParseError(ValueError):
    """A collective's device groups are written in a form this parser does not know."""


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of an HLO module and its device groups (logical ids)."""

    op: str
    groups: tuple[tuple[int, ...], ...]  # empty: every device of the module
    line: str


def _ints(text: str) -> list[int]:
    return [int(value) for value in re.findall(r"-?\d+", text)]


def _iota(dims: Sequence[int], source_dims: Sequence[int], perm: Sequence[int]) -> np.ndarray:
    """Return reshape(transpose(reshape(arange(n), source_dims), perm), dims)."""
    total = math.prod(source_dims)
    array = np.arange(total).reshape(source_dims)
    if perm:
        array = array.transpose(perm)
    return array.reshape(dims)


def _take_balanced(text: str, start: int, open_char: str, close_char: str) -> int:
    """Return the index after the bracket that closes the one at ``text[start]``."""
    depth = 0
    for index in range(start, len(text)):
        if text[index] == open_char:
            depth += 1
        elif text[index] == close_char:
            depth -= 1
            if depth == 0:
                return index + 1
    raise HloParseError(f"unbalanced {open_char}{close_char} in {text[start : start + 200]!r}")


def _parse_iota_text(text: str) -> np.ndarray:
    """Parse ``[dims]<=[source dims]`` with an optional ``T(perm)``."""
    match = re.fullmatch(r"\[([\d,\s]*)\]<=\[([\d,\s]*)\](?:T\(([\d,\s]*)\))?", text.strip())
    if match is None:
        raise HloParseError(f"not an iota device list: {text!r}")
    dims, source, perm = _ints(match.group(1)), _ints(match.group(2)), _ints(match.group(3) or "")
    return _iota(dims, source, perm)


def _mesh_device_array(sizes: list[int], device_ids: str | None) -> np.ndarray:
    total = math.prod(sizes)
    if device_ids is None:
        return np.arange(total).reshape(sizes)
    text = device_ids.strip()
    if "<=" in text:
        return _parse_iota_text(text).reshape(sizes)
    iota = re.fullmatch(r"\[([\d,\s]*)\](?:T\(([\d,\s]*)\))?", text)
    values = _ints(text)
    if iota is not None and len(_ints(iota.group(1))) < total:
        # [4,2]T(1,0): an iota over ``total`` ids reshaped to the bracketed dims
        # and transposed; a plain list would need ``total`` entries.
        dims = _ints(iota.group(1))
        perm = _ints(iota.group(2) or "")
        if math.prod(dims) != total:
            raise HloParseError(f"device_ids {text!r} do not cover the {total} mesh devices")
        return _iota(sizes, dims, perm)
    if len(values) != total:
        raise HloParseError(f"device_ids {text!r} list {len(values)} ids for {total} devices")
    return np.asarray(values).reshape(sizes)


def _parse_mesh_groups(text: str) -> list[list[int]]:
    """Parse ``mesh[axes](, device_ids=(...))? {grouped axes}`` into device groups."""
    match = re.match(r"@?mesh\s*[\[<](.*?)[\]>]", text)
    if match is None:
        raise HloParseError(f"not a mesh replica-group list: {text!r}")
    axis_pattern = _NAME + r"\s*=\s*(\d+)"
    axes = [(m.group(1), int(m.group(2))) for m in re.finditer(axis_pattern, match.group(1))]
    if not axes:
        raise HloParseError(f"mesh without axes: {text!r}")
    names = [name for name, _ in axes]
    sizes = [size for _, size in axes]
    rest = text[match.end() :]
    device_ids = None
    ids_match = re.match(r"\s*,?\s*(?:device_ids\s*=\s*)?\(", rest)
    if ids_match is not None:
        open_at = ids_match.end() - 1
        close_at = _take_balanced(rest, open_at, "(", ")")
        device_ids = rest[open_at + 1 : close_at - 1]
        rest = rest[close_at:]
    braces = re.search(r"\{(.*)\}", rest)
    if braces is None:
        raise HloParseError(f"mesh replica groups without grouped axes: {text!r}")
    devices = _mesh_device_array(sizes, device_ids)

    # Split each mesh axis into sub-axes where a grouped axis names part of it,
    # then move the grouped (sub-)axes last and cut into groups.
    refs: dict[int, list[tuple[int, int]]] = {}
    for ref in re.finditer(_NAME + r"(?::\((\d+)\)(\d+))?", braces.group(1)):
        name = ref.group(1)
        if name not in names:
            raise HloParseError(f"grouped axis {name!r} is not a mesh axis in {text!r}")
        axis = names.index(name)
        if ref.group(2) is None:
            refs.setdefault(axis, []).append((1, sizes[axis]))
        else:
            refs.setdefault(axis, []).append((int(ref.group(2)), int(ref.group(3))))
    reshape: list[int] = []
    grouped: list[int] = []
    for axis, size in enumerate(sizes):
        # Sub-axis (pre, size) of an axis of length n: the axis reshaped to
        # [pre, size, n / (pre * size)], major to minor.
        pieces = sorted(refs.get(axis, []))
        covered = 1
        for pre, sub in pieces:
            if pre != covered:
                reshape.append(pre // covered)
                covered = pre
            grouped.append(len(reshape))
            reshape.append(sub)
            covered *= sub
        if covered != size:
            reshape.append(size // covered)
    order = [dim for dim in range(len(reshape)) if dim not in grouped] + grouped
    group_size = math.prod(reshape[dim] for dim in grouped)
    arranged = devices.reshape(reshape).transpose(order).reshape(-1, group_size)
    return arranged.tolist()


def parse_replica_groups(text: str) -> list[list[int]]:
    """Return the device groups (logical ids) of a ``replica_groups=`` value."""
    text = text.strip()
    if text.startswith("{"):
        return [_ints(group) for group in re.findall(r"\{([\d,\s]*)\}", text[1:-1])]
    if text.startswith("["):
        array = _parse_iota_text(text)
        return array.reshape(array.shape[0], -1).tolist()
    if text.startswith(("mesh", "@mesh")):
        return _parse_mesh_groups(text)
    raise HloParseError(f"unknown replica-group format: {text[:200]!r}")


def _attribute(line: str, key: str) -> str | None:
    """Return the value text of ``key=`` in an HLO instruction line, brackets balanced."""
    at = line.find(f"{key}=")
    if at < 0:
        return None
    start = at + len(key) + 1
    if line.startswith(("mesh", "@mesh"), start):
        # mesh[...](, device_ids=(...))? {...}: the value ends after the braces.
        braces = line.find("{", start)
        return line[start : _take_balanced(line, braces, "{", "}")]
    if line[start] == "{":
        return line[start : _take_balanced(line, start, "{", "}")]
    end = line.find(", ", start)
    return line[start : end if end >= 0 else len(line)]


def collectives(hlo_text: str) -> list[Collective]:
    """Return every collective instruction of an HLO module with its device groups."""
    found = []
    for line in hlo_text.splitlines():
        match = _OP.search(line)
        if match is None or "=" not in line[: match.start() + 1]:
            continue
        op = match.group(1)
        if op == "collective-permute":
            pairs = _attribute(line, "source_target_pairs")
            groups = [] if pairs is None else parse_replica_groups(pairs)
        else:
            value = _attribute(line, "replica_groups")
            groups = [] if value in (None, "{}") else parse_replica_groups(value)
        found.append(Collective(op=op, groups=tuple(tuple(g) for g in groups), line=line.strip()))
    return found


def executable_devices(compiled: Any) -> list[Any]:
    """Return the devices of a compiled function, in device-assignment order."""
    return list(compiled.runtime_executable().local_devices())


@dataclasses.dataclass(frozen=True)
class IsolationReport:
    """Devices and collective groups (as device ids) of one compiled branch step."""

    device_ids: frozenset[int]
    collective_device_groups: tuple[tuple[str, frozenset[int]], ...]  # (op, device ids)


def branch_isolation_report(compiled: Any) -> IsolationReport:
    """Map every collective group of ``compiled`` to device ids.

    Raises HloParseError when a group names a logical id beyond the
    executable's devices, which would mean a collective reaches outside them.
    """
    devices = executable_devices(compiled)
    ids = [int(device.id) for device in devices]
    groups = []
    for collective in collectives(compiled.as_text()):
        members = collective.groups or (tuple(range(len(ids))),)
        for group in members:
            outside = [i for i in group if not 0 <= i < len(ids)]
            if outside:
                raise HloParseError(
                    f"{collective.op} names logical ids {outside}, but the executable has only "
                    f"{len(ids)} devices: {collective.line[:300]}"
                )
            groups.append((collective.op, frozenset(ids[i] for i in group)))
    return IsolationReport(device_ids=frozenset(ids), collective_device_groups=tuple(groups))


def check_isolation(compiled_steps: Sequence[Any], meshes: Sequence[Any]) -> list[IsolationReport]:
    """Raise RuntimeError unless the compiled steps are isolated on their meshes.

    ``compiled_steps[k]`` is branch k's compiled step and ``meshes[k]`` its
    mesh; all of them run at the same time. Checks both facts of the module
    doc and returns the reports.
    """
    reports = [branch_isolation_report(compiled) for compiled in compiled_steps]
    problems = []
    for k, (report, mesh) in enumerate(zip(reports, meshes, strict=True)):
        expected = frozenset(int(device.id) for device in mesh.devices.flat)
        if report.device_ids != expected:
            problems.append(
                f"branch {k} compiled for devices {sorted(report.device_ids)}, "
                f"but its mesh contains {sorted(expected)}"
            )
        for op, group in report.collective_device_groups:
            if not group <= expected:
                problems.append(f"branch {k}: {op} over devices {sorted(group)} leaves its mesh")
    for a in range(len(reports)):
        for b in range(a + 1, len(reports)):
            shared = reports[a].device_ids & reports[b].device_ids
            if shared:
                problems.append(f"branches {a} and {b} share devices {sorted(shared)}")
    if problems:
        raise RuntimeError("branch isolation check failed:\n" + "\n".join(problems))
    return reports
