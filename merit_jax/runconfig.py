"""The YAML run config: model, data, planning settings, and the later steps' sections.

A run config is one YAML mapping::

    extends: presets/base.yaml     # optional: the file this one overrides
    seed: 0                        # held-out split, subsampling, calibration, sketch, partition
    output_dir: runs/quickstart    # plan/, branches/, merged/ and eval/ go below it
    model:   {ref, param_dtype, compute_dtype, scan_layers, remat}
    data:    {mixture, eval_tasks, max_length, system, truncation}
    plan:    {calibration_size, allow_fewer, sketch_dim, trainable, pca_dim, partitioner,
              micro_batch_size, seq_len, packing}
    train:   {...}                 # kept verbatim; the training step validates it
    merge:   {...}                 # kept verbatim; the merge step validates it
    eval:    {...}                 # kept verbatim; the evaluation step validates it

``data.mixture`` has the format of :class:`merit_jax.data.spec.MixtureSpec`.
``extends`` chains are merged before validation: mappings merge key by key,
and any other value (lists included) replaces the inherited one. Relative
paths inside the config (``output_dir``, dataset paths) are relative to the
current directory, as on the command line. Only ``extends`` is relative to
the file that names it. Unknown keys raise an error that lists the valid keys.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from merit_jax.conflict.partition import PARTITIONERS
from merit_jax.data.format import TRUNCATION_MODES
from merit_jax.data.spec import MixtureSpec

DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
OPAQUE_SECTIONS: tuple[str, ...] = ("train", "merge", "eval")
TOP_LEVEL_KEYS: tuple[str, ...] = (
    "extends",
    "seed",
    "output_dir",
    "model",
    "data",
    "plan",
    *OPAQUE_SECTIONS,
)
_MAX_EXTENDS_DEPTH = 16


class ConfigError(ValueError):
    """An invalid run config; the message names the file, the field and the fix."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(field.name for field in dataclasses.fields(cls))


def _reject_unknown(where: str, data: Mapping[str, Any], allowed: Sequence[str]) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {', '.join(allowed)}")


def _check_bool(where: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}={value!r} must be true or false")


def _check_positive_int(where: str, value: Any, *, minimum: int = 1) -> None:
    if not _is_int(value) or value < minimum:
        raise ConfigError(f"{where}={value!r} must be an integer >= {minimum}")


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """The checkpoint theta0 and the numerics to run it with."""

    ref: str = "smollm2-135m-instruct"  # registry name, .gguf file, HF model dir or hub id
    param_dtype: str = "float32"  # parameters (and the gradients at theta0)
    compute_dtype: str = "float32"  # activations and matmul inputs
    scan_layers: bool = True  # nnx.scan over the layer stack (about 3x faster compile)
    remat: bool = False  # recompute layer activations in the backward pass (less memory)

    def __post_init__(self) -> None:
        if not isinstance(self.ref, str) or not self.ref.strip():
            raise ConfigError(
                f"model.ref={self.ref!r} must name a model: a registry name such as "
                "'smollm2-135m-instruct', a .gguf file, a model directory or a hub id"
            )
        for field in ("param_dtype", "compute_dtype"):
            value = getattr(self, field)
            if value not in DTYPES:
                raise ConfigError(f"model.{field}={value!r} is invalid; use one of {list(DTYPES)}")
        _check_bool("model.scan_layers", self.scan_layers)
        _check_bool("model.remat", self.remat)


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """The training mixture, the held-out evaluation tasks and the tokenization shared by all steps.

    ``max_length`` is the longest formatted example in tokens: longer prompts
    are truncated (``truncation``), and examples whose response alone does not
    fit are skipped. The gradients at theta0 and branch training must tokenize
    with the same value, so that both use the same loss.
    """

    mixture: MixtureSpec
    eval_tasks: tuple[str, ...] = ()  # BIG-bench multiple-choice tasks, never trained on
    max_length: int = 512
    system: str | None = None  # system message of every formatted example
    truncation: str = "middle"

    def __post_init__(self) -> None:
        if not isinstance(self.mixture, MixtureSpec):
            raise ConfigError("data.mixture must be a MixtureSpec")
        eval_tasks = tuple(self.eval_tasks)
        object.__setattr__(self, "eval_tasks", eval_tasks)
        for index, name in enumerate(eval_tasks):
            if not isinstance(name, str) or not name.strip() or name != name.strip():
                raise ConfigError(
                    f"data.eval_tasks[{index}]={name!r} must be a BIG-bench task name such as "
                    "'navigate'"
                )

        duplicates = sorted({name for name in eval_tasks if eval_tasks.count(name) > 1})
        if duplicates:
            raise ConfigError(f"data.eval_tasks lists {duplicates} more than once; keep one each")
        training = {spec.task_name for spec in self.mixture.datasets}
        training |= {
            spec.name for spec in self.mixture.datasets if spec.source == "bigbench" and spec.name
        }
        overlap = sorted(training.intersection(eval_tasks))
        if overlap:
            raise ConfigError(
                f"data.eval_tasks {overlap} are also training datasets in data.mixture; held-out "
                "evaluation tasks must share no task with training, so remove them from one list"
            )

        _check_positive_int("data.max_length", self.max_length, minimum=2)
        if self.system is not None and not isinstance(self.system, str):
            raise ConfigError(f"data.system={self.system!r} must be a string or null")
        if self.truncation not in TRUNCATION_MODES:
            raise ConfigError(
                f"data.truncation={self.truncation!r} is invalid; use one of "
                f"{list(TRUNCATION_MODES)}"
            )


@dataclasses.dataclass(frozen=True)
class PlanSection:
    """Settings of steps 1 to 3: gradients at theta0, PCA and partition.

    Every task's gradient uses the same ``calibration_size`` examples, the
    same trainable parameters and the same micro-batch shape
    [``micro_batch_size``, ``seq_len``], so one compiled function serves all
    tasks.
    """

    calibration_size: int = 16  # examples per task in g_t (the MERIT paper uses 200)
    allow_fewer: bool = False  # a task with fewer examples uses all of them instead of raising
    sketch_dim: int | None = 65536  # count-sketch dimension d; null keeps exact gradients
    trainable: tuple[str, ...] = (".*",)  # regexes searched in parameter paths such as
    # "layers/attn/q_kernel"; a parameter is trainable when any pattern matches
    pca_dim: int = 2  # r: K = 2^r branches
    partitioner: str = "merit"
    micro_batch_size: int = 1  # rows per micro-batch; a multiple of the local device count
    seq_len: int = 512  # tokens per row; at least data.max_length
    packing: bool = True  # several calibration examples per row instead of one padded example

    def __post_init__(self) -> None:
        _check_positive_int("plan.calibration_size", self.calibration_size)
        _check_bool("plan.allow_fewer", self.allow_fewer)
        if self.sketch_dim is not None:
            _check_positive_int("plan.sketch_dim", self.sketch_dim)
        trainable = self.trainable
        if isinstance(trainable, str) or not isinstance(trainable, Sequence) or not trainable:
            raise ConfigError(
                f"plan.trainable={trainable!r} must be a non-empty list of regular expressions, "
                "such as ['.*'] for every parameter"
            )
        object.__setattr__(self, "trainable", tuple(trainable))

        for index, pattern in enumerate(self.trainable):
            if not isinstance(pattern, str):
                raise ConfigError(f"plan.trainable[{index}]={pattern!r} must be a string")
            try:
                re.compile(pattern)
            except re.error as error:
                raise ConfigError(
                    f"plan.trainable[{index}]={pattern!r} is not a valid regular expression: "
                    f"{error}"
                ) from None

        _check_positive_int("plan.pca_dim", self.pca_dim)
        if self.partitioner not in PARTITIONERS:
            raise ConfigError(
                f"plan.partitioner={self.partitioner!r} is unknown; use one of "
                f"{sorted(PARTITIONERS)}"
            )
        _check_positive_int("plan.micro_batch_size", self.micro_batch_size)
        _check_positive_int("plan.seq_len", self.seq_len, minimum=2)
        _check_bool("plan.packing", self.packing)

    @property
    def num_groups(self) -> int:
        """K: 2^r, or 1 for the joint partitioner."""
        return 1 if self.partitioner == "joint" else 2**self.pca_dim


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole run; ``train``, ``merge`` and ``eval`` are kept as parsed from YAML."""

    model: ModelSettings
    data: DataSettings
    plan: PlanSection = PlanSection()
    seed: int = 0
    output_dir: str = "runs/default"
    train: dict[str, Any] = dataclasses.field(default_factory=dict)
    merge: dict[str, Any] = dataclasses.field(default_factory=dict)
    eval: dict[str, Any] = dataclasses.field(default_factory=dict)
    source: str | None = None  # the YAML file, for messages

    def __post_init__(self) -> None:
        if not _is_int(self.seed) or not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed={self.seed!r} must be an integer in [0, 2^32)")
        if not isinstance(self.output_dir, str) or not self.output_dir.strip():
            raise ConfigError(f"output_dir={self.output_dir!r} must be a directory path")
        for name in OPAQUE_SECTIONS:
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"{name} must be a mapping, got {getattr(self, name)!r}")
        if self.plan.seq_len < self.data.max_length:
            raise ConfigError(
                f"plan.seq_len={self.plan.seq_len} is shorter than data.max_length="
                f"{self.data.max_length}, so the longest example would not fit one row; raise "
                "plan.seq_len or lower data.max_length"
            )

    @property
    def plan_dir(self) -> Path:
        """Where ``merit plan`` writes: ``output_dir/plan``."""
        return Path(self.output_dir) / "plan"

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as plain YAML-ready values (the mixture as dataset entries)."""
        data = dataclasses.asdict(self)
        data.pop("source")
        data["data"]["mixture"] = {"datasets": [_spec_dict(s) for s in self.data.mixture.datasets]}
        data["data"]["eval_tasks"] = list(self.data.eval_tasks)
        data["plan"]["trainable"] = list(self.plan.trainable)
        return data


def _spec_dict(spec: Any) -> dict[str, Any]:
    values = dataclasses.asdict(spec)
    return {key: value for key, value in values.items() if value is not None}


# --------------------------------------------------------------------------- parsing


def _section(data: Mapping[str, Any], name: str, where: str) -> Mapping[str, Any]:
    section = data.get(name) or {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where}: {name} must be a mapping, got {section!r}")
    return section


def _build(cls: type, section: Mapping[str, Any], name: str, where: str) -> Any:
    _reject_unknown(f"{where}: {name}", section, _field_names(cls))
    try:
        return cls(**section)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def config_from_dict(data: Any, where: str = "run config") -> RunConfig:
    """Build a RunConfig from a parsed YAML mapping (``extends`` already resolved)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a YAML mapping, got {type(data).__name__}")
    _reject_unknown(where, data, TOP_LEVEL_KEYS)
    if "extends" in data:
        raise ConfigError(f"{where}: extends must be resolved first; use load_config")

    data_section = dict(_section(data, "data", where))
    if "mixture" not in data_section:
        raise ConfigError(
            f"{where}: data.mixture is missing; list the training datasets there, e.g. "
            "data: {mixture: {datasets: ['bigbench:gem/e2e_nlg']}}"
        )
    _reject_unknown(f"{where}: data", data_section, _field_names(DataSettings))
    try:
        data_section["mixture"] = MixtureSpec.from_dict(
            data_section["mixture"], where=f"{where}: data.mixture"
        )
    except ValueError as error:
        message = str(error)
        if not message.startswith(where):
            message = f"{where}: data.mixture: {message}"
        raise ConfigError(message) from None
    if "eval_tasks" in data_section and not isinstance(data_section["eval_tasks"], list):
        raise ConfigError(
            f"{where}: data.eval_tasks={data_section['eval_tasks']!r} must be a list of names"
        )
    data_settings = _build(DataSettings, data_section, "data", where)

    plan_section = dict(_section(data, "plan", where))
    if "trainable" in plan_section and not isinstance(plan_section["trainable"], list):
        raise ConfigError(
            f"{where}: plan.trainable={plan_section['trainable']!r} must be a list of regular "
            "expressions, such as ['.*']"
        )
    values: dict[str, Any] = {
        "model": _build(ModelSettings, _section(data, "model", where), "model", where),
        "data": data_settings,
        "plan": _build(PlanSection, plan_section, "plan", where),
        "source": where,
    }
    for key in ("seed", "output_dir"):
        if key in data:
            values[key] = data[key]
    for name in OPAQUE_SECTIONS:
        values[name] = copy.deepcopy(dict(_section(data, name, where)))
    try:
        return RunConfig(**values)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def merge_overrides(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated by ``override``: mappings merge recursively, other values replace."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_overrides(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _read_yaml(path: Path, referenced_by: str | None) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        hint = f" (named by extends in {referenced_by})" if referenced_by else ""
        raise FileNotFoundError(f"run config {path} not found{hint}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from error


def resolve_extends(path: str | Path) -> dict[str, Any]:
    """Read a config file and the chain of files it extends; return the merged mapping."""
    chain: list[Path] = []
    current: Path | None = Path(path)
    referenced_by: str | None = None
    layers: list[dict[str, Any]] = []
    while current is not None:
        resolved = current.resolve()
        if resolved in chain:
            cycle = " -> ".join(str(p) for p in [*chain, resolved])
            raise ConfigError(f"extends forms a cycle: {cycle}; remove one of the extends keys")
        if len(chain) >= _MAX_EXTENDS_DEPTH:
            raise ConfigError(f"extends chain of {path} is deeper than {_MAX_EXTENDS_DEPTH} files")
        chain.append(resolved)
        data = _read_yaml(current, referenced_by)
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{current} must contain a YAML mapping, got {type(data).__name__}")
        _reject_unknown(str(current), data, TOP_LEVEL_KEYS)
        layer = dict(data)
        parent = layer.pop("extends", None)
        layers.append(layer)
        if parent is None:
            current = None
        elif not isinstance(parent, str) or not parent:
            raise ConfigError(f"{current}: extends={parent!r} must be the path of a YAML file")
        else:
            referenced_by = str(current)
            current = (current.parent / parent) if not Path(parent).is_absolute() else Path(parent)
    merged: dict[str, Any] = {}
    for layer in reversed(layers):
        merged = merge_overrides(merged, layer)
    return merged


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``KEY.PATH=VALUE`` (VALUE in YAML syntax) into the key path and the value."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(
            f"override {text!r} is invalid; write KEY=VALUE, e.g. plan.calibration_size=8"
        )
    parts = key.strip().split(".")
    if any(not part for part in parts):
        raise ConfigError(f"override key {key!r} has an empty part; write e.g. plan.pca_dim=2")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({error})") from None
    return parts, parsed


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return ``data`` with every ``KEY.PATH=VALUE`` override set (see :func:`parse_override`)."""
    result = copy.deepcopy(dict(data))
    for text in overrides:
        parts, value = parse_override(text)
        node: dict[str, Any] = result
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"override {text!r}: {where} is not a mapping")
            node = child
        node[parts[-1]] = value
    return result


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a run config file, resolve ``extends``, apply ``overrides`` and validate."""
    merged = resolve_extends(path)
    merged = apply_overrides(merged, overrides)
    return config_from_dict(merged, where=str(path))


# --------------------------------------------------------------------------- summary


def describe(config: RunConfig, *, out_dir: str | Path | None = None) -> str:
    """Return a readable summary of what ``merit plan`` runs for ``config``; loads nothing."""
    plan = config.plan
    out = Path(out_dir) if out_dir is not None else config.plan_dir
    datasets = config.data.mixture.datasets
    sketch = "exact gradients" if plan.sketch_dim is None else f"count-sketch d={plan.sketch_dim}"
    lines = [
        f"config: {config.source}",
        f"model: {config.model.ref} (params {config.model.param_dtype}, compute "
        f"{config.model.compute_dtype}, scan_layers={config.model.scan_layers}, "
        f"remat={config.model.remat})",
        f"training datasets ({len(datasets)}):",
    ]

    for spec in datasets:
        where = spec.name if spec.source == "bigbench" else (spec.name or spec.path)
        extra = f", one task per {spec.group_by!r}" if spec.group_by else ""
        budget = (
            f"{spec.budget.tokens} tokens"
            if spec.budget.tokens is not None
            else f"{spec.budget.epochs:g} epoch(s)"
        )
        lines.append(
            f"  {spec.task_name}  [{spec.source}: {where}{extra}; budget {budget}; "
            f"max_samples {spec.max_samples}; held_out {spec.held_out}]"
        )

    eval_tasks = ", ".join(config.data.eval_tasks) or "none"
    lines.append(f"evaluation tasks ({len(config.data.eval_tasks)}): {eval_tasks}")
    lines.append(
        f"gradients at theta0: {plan.calibration_size} examples per task, "
        f"trainable {list(plan.trainable)}, {sketch}, "
        f"micro-batches [{plan.micro_batch_size}, {plan.seq_len}] "
        f"({'packed' if plan.packing else 'padded'}), max_length {config.data.max_length}"
    )
    lines.append(
        f"partition: {plan.partitioner}, r={plan.pca_dim} -> K={plan.num_groups} branches, "
        f"seed {config.seed}"
    )
    lines.append(f"output: {out}")

    for name in ("train", "merge", "eval"):
        section = getattr(config, name)
        if section:
            lines.append(f"{name}: {section}")
    return "\n".join(lines)
