"""The Plan: the manifest that assigns tasks to branches and fixes the merge weights.

plan.json (schema version 1) contains:

    schema_version, tool_version, seed, theta0_sha256, data_sha256
    settings: partitioner, pca_dim (r), sketch_dim (null: exact gradients),
              calibration_size, trainable_parameter_patterns, loss_convention
    tasks[t]:  name, samples (s_t), tokens (n_t), group, embedding (z_t, r floats
               or empty when no PCA was run)
    groups[k]: index (k), tasks (names), samples (S_k = sum of s_t),
               tokens (N_k = sum of n_t), weight (w_k = N_k / sum_j N_j)

Tasks are listed in task-index order t = 0..T-1, the row order of the arrays
saved next to the plan, and the tasks of a group in that order too.
``save_plan`` writes sorted keys, two-space indentation and Python's shortest
round-trip float repr, so the same plan always gives the same bytes.
``load_plan`` checks every field and every cross-field rule and raises one
PlanError that lists all problems.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from merit_jax import __version__
from merit_jax.conflict.artifacts import write_atomic
from merit_jax.conflict.partition import PARTITIONERS, Groups

SCHEMA_VERSION = 1
KNOWN_SCHEMA_VERSIONS = (1,)
PLAN_FILENAME = "plan.json"

_WEIGHT_TOLERANCE = 1e-9


class PlanError(ValueError):
    """An invalid plan; ``problems`` lists every problem found."""

    def __init__(self, source: str, problems: Sequence[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid plan {source}:\n{lines}")


@dataclasses.dataclass(frozen=True)
class TaskEntry:
    """One dataset of the mixture.

    Attributes:
        name: unique task name.
        samples: s_t, number of training samples.
        tokens: n_t, token budget of the task.
        group: index of the branch that trains on it.
        embedding: z_t, its PCA coordinates (r floats, or empty).
    """

    name: str
    samples: int
    tokens: int
    group: int
    embedding: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class GroupEntry:
    """One branch: its tasks, their total samples and tokens, and its merge weight.

    Attributes:
        index: k.
        tasks: task names, in task-index order.
        samples: S_k.
        tokens: N_k.
        weight: w_k = N_k / sum_j N_j.
    """

    index: int
    tasks: tuple[str, ...]
    samples: int
    tokens: int
    weight: float


@dataclasses.dataclass(frozen=True)
class PlanSettings:
    """Settings that produced the plan; branches and later steps must reuse them.

    Attributes:
        partitioner: registry name in ``partition.PARTITIONERS``.
        pca_dim: r, number of PCA axes (K = 2^r groups, except joint: K = 1).
        sketch_dim: count-sketch dimension d, or None for exact gradients.
        calibration_size: number of samples per task in the gradient at theta0.
        trainable_parameter_patterns: patterns of the parameters whose gradients
            were used, stored verbatim.
        loss_convention: plain-text description of the loss the gradients used.
    """

    partitioner: str
    pca_dim: int
    sketch_dim: int | None
    calibration_size: int
    trainable_parameter_patterns: tuple[str, ...]
    loss_convention: str


@dataclasses.dataclass(frozen=True)
class Plan:
    """A validated plan; the constructor raises PlanError listing every problem.

    Attributes:
        tasks: one entry per task, in task-index order.
        groups: one entry per branch, in group-index order.
        settings: how the gradients, the PCA and the partition were computed.
        seed: the run's seed: the seed of the random partitioners and the
            sketch hash seed (``SketchConfig.seed``).
        theta0_sha256: SHA-256 of the initial checkpoint (see ``sha256_path``).
        data_sha256: SHA-256 of the task data.
        tool_version: merit-jax version that wrote the plan.
        schema_version: plan.json layout version.
    """

    tasks: tuple[TaskEntry, ...]
    groups: tuple[GroupEntry, ...]
    settings: PlanSettings
    seed: int
    theta0_sha256: str
    data_sha256: str
    tool_version: str
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        problems = plan_problems(self)
        if problems:
            raise PlanError("(in memory)", problems)

    @property
    def num_groups(self) -> int:
        """Number K of groups (branches)."""
        return len(self.groups)

    @property
    def merge_weights(self) -> np.ndarray:
        """w [K] float64, in group order."""
        return np.array([g.weight for g in self.groups], dtype=np.float64)

    def group_tasks(self, index: int) -> tuple[TaskEntry, ...]:
        """Return the tasks of group ``index``, in task-index order."""
        if not 0 <= index < self.num_groups:
            raise IndexError(
                f"group {index} does not exist: this plan has groups 0..{self.num_groups - 1}"
            )
        return tuple(t for t in self.tasks if t.group == index)

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready form of the plan."""
        data = dataclasses.asdict(self)
        data["settings"]["trainable_parameter_patterns"] = list(
            self.settings.trainable_parameter_patterns
        )
        return data


# --------------------------------------------------------------------------- building


def build_plan(
    *,
    task_names: Sequence[str],
    samples: Sequence[int],
    tokens: Sequence[int],
    groups: Groups,
    embedding: ArrayLike | None,
    settings: PlanSettings,
    seed: int,
    theta0_sha256: str,
    data_sha256: str,
    tool_version: str = __version__,
) -> Plan:
    """Assemble a Plan from a partition and per-task counts; computes S_k, N_k and w_k.

    ``groups`` contains task indices into ``task_names``. ``embedding`` is z [T, r]
    or None when no PCA was run.
    """
    num_tasks = len(task_names)
    if not len(samples) == len(tokens) == num_tasks:
        raise ValueError(
            f"got {num_tasks} task names, {len(samples)} sample counts and {len(tokens)} "
            "token counts: pass one of each per task"
        )
    group_of = {t: k for k, group in enumerate(groups) for t in group}
    missing = [task_names[t] for t in range(num_tasks) if t not in group_of]
    if missing:
        raise ValueError(f"tasks {missing} are in no group: the partition must cover every task")
    z = np.zeros((num_tasks, 0)) if embedding is None else np.asarray(embedding, np.float64)
    if z.shape[0] != num_tasks:
        raise ValueError(f"embedding has {z.shape[0]} rows for {num_tasks} tasks")

    tasks = tuple(
        TaskEntry(
            name=str(task_names[t]),
            samples=int(samples[t]),
            tokens=int(tokens[t]),
            group=group_of[t],
            embedding=tuple(float(v) for v in z[t]),
        )
        for t in range(num_tasks)
    )
    total_tokens = sum(int(n) for n in tokens)
    group_entries = []
    for k, group in enumerate(groups):
        members = sorted(group)
        group_tokens = sum(int(tokens[t]) for t in members)
        group_entries.append(
            GroupEntry(
                index=k,
                tasks=tuple(str(task_names[t]) for t in members),
                samples=sum(int(samples[t]) for t in members),
                tokens=group_tokens,
                weight=group_tokens / total_tokens if total_tokens > 0 else math.nan,
            )
        )
    return Plan(
        tasks=tasks,
        groups=tuple(group_entries),
        settings=settings,
        seed=int(seed),
        theta0_sha256=theta0_sha256,
        data_sha256=data_sha256,
        tool_version=tool_version,
    )


# --------------------------------------------------------------------------- validation


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_sha256(value: Any) -> bool:
    return (
        isinstance(value, str)
        and len(value) == 64
        and all(ch in "0123456789abcdef" for ch in value)
    )


def _settings_problems(settings: PlanSettings, num_groups: int) -> list[str]:
    problems = []
    if settings.partitioner not in PARTITIONERS:
        problems.append(
            f"settings.partitioner = {settings.partitioner!r} is unknown: use one of "
            f"{sorted(PARTITIONERS)}"
        )
    if not _is_int(settings.pca_dim) or settings.pca_dim < 0:
        problems.append(f"settings.pca_dim = {settings.pca_dim!r} must be an integer >= 0")
    elif settings.partitioner == "joint" and num_groups != 1:
        problems.append(f"the joint partitioner gives 1 group, but the plan has {num_groups}")
    elif settings.partitioner in PARTITIONERS and settings.partitioner != "joint":
        if settings.pca_dim < 1:
            problems.append(
                f"partitioner {settings.partitioner!r} needs pca_dim >= 1, got {settings.pca_dim}"
            )
        elif num_groups != 2**settings.pca_dim:
            problems.append(
                f"partitioner {settings.partitioner!r} with pca_dim r = {settings.pca_dim} "
                f"gives 2^r = {2**settings.pca_dim} groups, but the plan has {num_groups}"
            )
    if settings.sketch_dim is not None and (
        not _is_int(settings.sketch_dim) or settings.sketch_dim < 1
    ):
        problems.append(
            f"settings.sketch_dim = {settings.sketch_dim!r} must be an integer >= 1, or null "
            "for exact gradients"
        )
    if not _is_int(settings.calibration_size) or settings.calibration_size < 1:
        problems.append(
            f"settings.calibration_size = {settings.calibration_size!r} must be an integer >= 1"
        )
    if not all(isinstance(p, str) for p in settings.trainable_parameter_patterns):
        problems.append("settings.trainable_parameter_patterns must be a list of strings")
    if not isinstance(settings.loss_convention, str) or not settings.loss_convention.strip():
        problems.append("settings.loss_convention must be a non-empty description of the loss")
    return problems


def _task_problems(tasks: Sequence[TaskEntry], num_groups: int, pca_dim: int) -> list[str]:
    problems = []
    if not tasks:
        problems.append("the plan has no tasks")
    names = [t.name for t in tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(f"task names {duplicates} appear more than once: names must be unique")
    for i, task in enumerate(tasks):
        where = f"tasks[{i}] ({task.name!r})"
        if not isinstance(task.name, str) or not task.name:
            problems.append(f"tasks[{i}].name must be a non-empty string")
        if not _is_int(task.samples) or task.samples < 1:
            problems.append(f"{where}.samples = {task.samples!r} must be an integer >= 1")
        if not _is_int(task.tokens) or task.tokens < 1:
            problems.append(f"{where}.tokens = {task.tokens!r} must be an integer >= 1")
        if not _is_int(task.group) or not 0 <= task.group < num_groups:
            problems.append(
                f"{where}.group = {task.group!r} is not a group index in [0, {num_groups})"
            )
        if len(task.embedding) not in (0, pca_dim):
            problems.append(
                f"{where}.embedding has {len(task.embedding)} values: expected pca_dim = "
                f"{pca_dim} (or none)"
            )
        if not all(isinstance(v, float) and math.isfinite(v) for v in task.embedding):
            problems.append(f"{where}.embedding must contain finite numbers only")
    return problems


def _group_problems(plan: Plan) -> list[str]:
    problems = []
    by_name = {t.name: t for t in plan.tasks}
    seen: dict[str, int] = {}
    for k, group in enumerate(plan.groups):
        where = f"groups[{k}]"
        if group.index != k:
            problems.append(
                f"{where}.index = {group.index!r}: groups must be listed as 0, 1, 2, ..."
            )
        if not group.tasks:
            problems.append(f"{where} has no tasks: every group needs at least one")
        unknown = [n for n in group.tasks if n not in by_name]
        if unknown:
            problems.append(f"{where} lists unknown tasks {unknown}")
        for name in group.tasks:
            if name in seen:
                problems.append(
                    f"task {name!r} is in groups {seen[name]} and {k}: groups must be disjoint"
                )
            seen[name] = k
            if name in by_name and by_name[name].group != k:
                problems.append(
                    f"task {name!r} is listed in group {k} but its own group field is "
                    f"{by_name[name].group}"
                )
        known = [by_name[n] for n in group.tasks if n in by_name]
        expected_order = [t.name for t in plan.tasks if t.name in set(group.tasks)]
        if list(group.tasks) != expected_order:
            problems.append(f"{where}.tasks must be in task order: {expected_order}")
        if group.samples != sum(t.samples for t in known):
            problems.append(
                f"{where}.samples = {group.samples!r} but its tasks have "
                f"{sum(t.samples for t in known)} samples in total (S_k = sum of s_t)"
            )
        if group.tokens != sum(t.tokens for t in known):
            problems.append(
                f"{where}.tokens = {group.tokens!r} but its tasks have "
                f"{sum(t.tokens for t in known)} tokens in total (N_k = sum of n_t)"
            )
    missing = [t.name for t in plan.tasks if t.name not in seen]
    if missing:
        problems.append(f"tasks {missing} are in no group: every task needs a group")
    return problems


def _weight_problems(groups: Sequence[GroupEntry]) -> list[str]:
    problems = []
    weights = [g.weight for g in groups]
    if not all(isinstance(w, float) and math.isfinite(w) and w >= 0 for w in weights):
        return [f"group weights {weights} must be finite numbers >= 0"]
    if abs(sum(weights) - 1.0) > _WEIGHT_TOLERANCE:
        problems.append(f"group weights sum to {sum(weights)!r}, not 1")
    total = sum(g.tokens for g in groups if _is_int(g.tokens))
    for k, group in enumerate(groups):
        if total > 0 and _is_int(group.tokens):
            expected = group.tokens / total
            if abs(group.weight - expected) > _WEIGHT_TOLERANCE:
                problems.append(
                    f"groups[{k}].weight = {group.weight!r} but N_k / sum N_j = {expected!r}: "
                    "rebuild the plan with build_plan instead of editing weights by hand"
                )
    return problems


def _schema_problem(version: Any) -> str:
    return (
        f"schema_version = {version!r} is unknown to merit-jax {__version__}, which reads "
        f"versions {list(KNOWN_SCHEMA_VERSIONS)}: upgrade merit-jax or rebuild the plan"
    )


def plan_problems(plan: Plan) -> list[str]:
    """Return every rule ``plan`` breaks (empty when valid)."""
    if plan.schema_version not in KNOWN_SCHEMA_VERSIONS:
        return [_schema_problem(plan.schema_version)]
    problems = _settings_problems(plan.settings, len(plan.groups))
    problems += _task_problems(plan.tasks, len(plan.groups), plan.settings.pca_dim)
    problems += _group_problems(plan)
    problems += _weight_problems(plan.groups)
    if not _is_int(plan.seed) or plan.seed < 0:
        problems.append(f"seed = {plan.seed!r} must be an integer >= 0")
    for field in ("theta0_sha256", "data_sha256"):
        value = getattr(plan, field)
        if not _is_sha256(value):
            problems.append(
                f"{field} = {value!r} must be 64 lowercase hex digits (a SHA-256 digest)"
            )
    if not isinstance(plan.tool_version, str) or not plan.tool_version:
        problems.append("tool_version must be a non-empty string")
    return problems


# --------------------------------------------------------------------------- JSON


def plan_to_json(plan: Plan) -> str:
    """Serialize with sorted keys and shortest round-trip floats; ends with a newline."""
    return json.dumps(plan.to_dict(), sort_keys=True, indent=2, allow_nan=False) + "\n"


_FIELD_TYPES: dict[str, dict[str, str]] = {
    "the plan": {
        "schema_version": "int",
        "tool_version": "str",
        "seed": "int",
        "theta0_sha256": "str",
        "data_sha256": "str",
        "settings": "object",
        "tasks": "list",
        "groups": "list",
    },
    "settings": {
        "partitioner": "str",
        "pca_dim": "int",
        "sketch_dim": "int or null",
        "calibration_size": "int",
        "trainable_parameter_patterns": "list[str]",
        "loss_convention": "str",
    },
    "task": {
        "name": "str",
        "samples": "int",
        "tokens": "int",
        "group": "int",
        "embedding": "list[number]",
    },
    "group": {
        "index": "int",
        "tasks": "list[str]",
        "samples": "int",
        "tokens": "int",
        "weight": "number",
    },
}


def _has_type(value: Any, kind: str) -> bool:
    if kind.startswith("list[") and isinstance(value, list):
        return all(_has_type(item, kind[5:-1]) for item in value)
    return {
        "int": _is_int(value),
        "int or null": value is None or _is_int(value),
        "str": isinstance(value, str),
        "number": _is_int(value) or isinstance(value, float),
        "object": isinstance(value, dict),
        "list": isinstance(value, list),
    }.get(kind, False)


def _check_object(obj: Any, schema: str, where: str, problems: list[str]) -> bool:
    """Check the keys and JSON types of one object; return whether it can be parsed.

    ``where`` is the key path of the object, empty for the top level.
    """
    if not isinstance(obj, dict):
        problems.append(f"{where or 'the plan'} must be a JSON object, got {type(obj).__name__}")
        return False
    types = _FIELD_TYPES[schema]
    missing = sorted(types.keys() - obj.keys())
    unexpected = sorted(obj.keys() - types.keys())
    if missing:
        problems.append(f"{where or 'the plan'} is missing keys {missing}")
    if unexpected:
        problems.append(f"{where or 'the plan'} has unexpected keys {unexpected}")
    usable = not missing
    prefix = f"{where}." if where else ""
    for key, kind in types.items():
        if key in obj and not _has_type(obj[key], kind):
            problems.append(f"{prefix}{key} = {obj[key]!r} must be of JSON type {kind}")
            usable = False
    return usable


def _parse_settings(raw: dict[str, Any]) -> PlanSettings:
    return PlanSettings(
        **{**raw, "trainable_parameter_patterns": tuple(raw["trainable_parameter_patterns"])}
    )


def _parse_task(raw: dict[str, Any]) -> TaskEntry:
    return TaskEntry(**{**raw, "embedding": tuple(float(v) for v in raw["embedding"])})


def _parse_group(raw: dict[str, Any]) -> GroupEntry:
    return GroupEntry(**{**raw, "tasks": tuple(raw["tasks"]), "weight": float(raw["weight"])})


def plan_from_dict(data: Any, source: str = "(dict)") -> Plan:
    """Build a Plan from parsed JSON, raising one PlanError that lists every problem."""
    problems: list[str] = []
    top_ok = _check_object(data, "the plan", "", problems)
    if not isinstance(data, dict):
        raise PlanError(source, problems)
    if "schema_version" in data and data["schema_version"] not in KNOWN_SCHEMA_VERSIONS:
        raise PlanError(source, [_schema_problem(data["schema_version"])])

    # Check the nested objects too, so that one error lists every problem.
    settings_ok = isinstance(data.get("settings"), dict) and _check_object(
        data["settings"], "settings", "settings", problems
    )
    raw_tasks: list[Any] = data["tasks"] if isinstance(data.get("tasks"), list) else []
    raw_groups: list[Any] = data["groups"] if isinstance(data.get("groups"), list) else []
    tasks_ok = [
        _check_object(raw, "task", f"tasks[{i}]", problems) for i, raw in enumerate(raw_tasks)
    ]
    groups_ok = [
        _check_object(raw, "group", f"groups[{k}]", problems) for k, raw in enumerate(raw_groups)
    ]
    if problems or not (top_ok and settings_ok and all(tasks_ok) and all(groups_ok)):
        raise PlanError(source, problems)
    try:
        return Plan(
            tasks=tuple(_parse_task(raw) for raw in raw_tasks),
            groups=tuple(_parse_group(raw) for raw in raw_groups),
            settings=_parse_settings(data["settings"]),
            seed=data["seed"],
            theta0_sha256=data["theta0_sha256"],
            data_sha256=data["data_sha256"],
            tool_version=data["tool_version"],
            schema_version=data["schema_version"],
        )
    except PlanError as error:
        raise PlanError(source, error.problems) from None


def save_plan(plan: Plan, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``plan`` to ``path`` atomically (temporary file, then rename).

    Raises FileExistsError when ``path`` exists, unless ``overwrite`` is true.
    """
    target = Path(path)
    write_atomic(target, plan_to_json(plan).encode("utf-8"), overwrite=overwrite)
    return target


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan.json; a directory means ``directory / "plan.json"``."""
    source = Path(path)
    if source.is_dir():
        source = source / PLAN_FILENAME
    if not source.is_file():
        raise FileNotFoundError(f"plan file {source} not found: run `merit plan` first")
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise PlanError(str(source), [f"not valid JSON: {error}"]) from None
    return plan_from_dict(data, str(source))
