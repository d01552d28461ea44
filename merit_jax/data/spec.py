"""Dataset specs: which data a run trains on, loadable from YAML.

A mixture is a list of dataset specs, written in YAML either as a list or as a
mapping with ``datasets`` and optional ``defaults`` (keys applied to every
entry that does not set them)::

    defaults:
      budget: {tokens: 50000}
      max_samples: 2000
      held_out: 50
    datasets:
      - bigbench:gem/e2e_nlg                      # shorthand for a BIG-bench task
      - source: bigbench
        name: arithmetic/3_digit_addition
        budget: {epochs: 2}
      - source: jsonl
        path: data/support.jsonl
        fields: {instruction: question, input: null, response: answer}
      - source: hf
        name: json                                # a hub id, or a builder for local files
        path: data/mix.parquet                    # data_files; the builder follows the suffix
        group_by: category                        # one task per distinct value

Unknown keys raise an error that lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

SOURCES: tuple[str, ...] = ("bigbench", "hf", "jsonl")


def _reject_unknown(where: str, data: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {', '.join(allowed)}")


def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(field.name for field in dataclasses.fields(cls))


@dataclasses.dataclass(frozen=True)
class FieldMapping:
    """Names of the record fields (JSONL keys or dataset columns) of each example part."""

    instruction: str | None = "instruction"  # None: every example uses DatasetSpec.instruction
    input: str | None = "input"  # None: the data has no input field
    response: str = "response"

    def __post_init__(self) -> None:
        for field in ("instruction", "input", "response"):
            value = getattr(self, field)
            if value is None and field != "response":
                continue
            if not isinstance(value, str) or not value:
                raise ValueError(
                    f"fields.{field}={value!r} must be a non-empty column name"
                    + ("" if field == "response" else " or null")
                )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "fields") -> FieldMapping:
        if not isinstance(data, Mapping):
            raise ValueError(f"{where} must be a mapping, got {data!r}")
        _reject_unknown(where, data, _field_names(cls))
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class Budget:
    """A task's token budget n_t: a token count, or a number of epochs over its examples.

    Exactly one of ``tokens`` and ``epochs`` is set; the default is one epoch.
    """

    tokens: int | None = None
    epochs: float | None = None

    def __post_init__(self) -> None:
        if self.tokens is None and self.epochs is None:
            object.__setattr__(self, "epochs", 1.0)
        if self.tokens is not None and self.epochs is not None:
            raise ValueError(
                f"budget sets both tokens={self.tokens} and epochs={self.epochs}; set only one"
            )
        if self.tokens is not None and (
            not isinstance(self.tokens, int) or isinstance(self.tokens, bool) or self.tokens < 1
        ):
            raise ValueError(f"budget.tokens={self.tokens!r} must be a positive integer")
        if self.epochs is not None:
            if isinstance(self.epochs, bool) or not isinstance(self.epochs, int | float):
                raise ValueError(f"budget.epochs={self.epochs!r} must be a positive number")
            if not math.isfinite(self.epochs) or self.epochs <= 0:
                raise ValueError(f"budget.epochs={self.epochs!r} must be a positive number")

    def resolve(self, epoch_tokens: int) -> int:
        """Return n_t for a task whose examples contain ``epoch_tokens`` tokens in one pass."""
        if self.tokens is not None:
            return self.tokens
        assert self.epochs is not None
        return max(1, round(self.epochs * epoch_tokens))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "budget") -> Budget:
        if not isinstance(data, Mapping):
            raise ValueError(f"{where} must be a mapping such as {{tokens: 50000}}, got {data!r}")
        _reject_unknown(where, data, _field_names(cls))
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One entry of a mixture: a data source, its field mapping and its budget.

    ``source`` is one of:

    * "bigbench": ``name`` is a task path such as ``gem/e2e_nlg``;
    * "jsonl": ``path`` is a .jsonl file;
    * "hf": ``name`` is a hub dataset id, or a builder such as "json" or
      "parquet" when ``path`` gives local data files. With ``path`` alone the
      builder follows the file suffix.
    """

    source: str
    name: str | None = None
    path: str | None = None
    split: str = "train"  # hf only
    subset: str | None = None  # hf only: the dataset configuration name
    fields: FieldMapping = FieldMapping()  # jsonl and hf
    instruction: str | None = None  # fixed instruction when fields.instruction is null
    group_by: str | None = None  # jsonl and hf: one task per distinct value of this field
    label: str | None = None  # task name; defaults to the BIG-bench name, hub id or file stem
    budget: Budget = Budget()
    max_samples: int | None = None  # examples kept after the held-out split, drawn by seed
    held_out: int = 0  # examples per task kept out of training for held-out loss

    def __post_init__(self) -> None:
        where = f"dataset {self.label or self.name or self.path or '?'}"
        if self.source not in SOURCES:
            raise ValueError(
                f"{where}: source={self.source!r} is invalid; expected one of {', '.join(SOURCES)}"
            )
        if self.source == "bigbench":
            if not self.name:
                raise ValueError(f"{where}: a bigbench dataset needs name, e.g. 'gem/e2e_nlg'")
            extra = [
                key
                for key in ("path", "subset", "group_by", "instruction")
                if getattr(self, key) is not None
            ]
            if extra or self.fields != FieldMapping():
                not_applicable = extra + (["fields"] if self.fields != FieldMapping() else [])
                raise ValueError(
                    f"{where}: {not_applicable} do not apply to bigbench datasets; remove them"
                )
        if self.source == "jsonl" and not self.path:
            raise ValueError(f"{where}: a jsonl dataset needs path, the .jsonl file to read")
        if self.source == "hf" and not (self.name or self.path):
            raise ValueError(f"{where}: an hf dataset needs name (hub id or builder) or path")
        if self.source != "bigbench":
            if self.fields.instruction is None and not self.instruction:
                raise ValueError(
                    f"{where}: fields.instruction is null, so set instruction, the text every "
                    "example uses as its instruction"
                )
            if self.fields.instruction is not None and self.instruction is not None:
                raise ValueError(f"{where}: set either fields.instruction or instruction, not both")
        if self.max_samples is not None and (
            not isinstance(self.max_samples, int) or self.max_samples < 1
        ):
            raise ValueError(
                f"{where}: max_samples={self.max_samples!r} must be a positive integer"
            )
        if not isinstance(self.held_out, int) or self.held_out < 0:
            raise ValueError(f"{where}: held_out={self.held_out!r} must be a non-negative integer")
        if self.label is not None and (not self.label or self.label != self.label.strip()):
            raise ValueError(f"{where}: label={self.label!r} must be a non-empty name")

    @property
    def task_name(self) -> str:
        """The name of the task (the prefix of the task names, with group_by)."""
        if self.label:
            return self.label
        if self.source == "hf" and self.name and not (self.path and self.name in _BUILDERS):
            return self.name
        if self.path:
            return _file_stem(self.path)
        assert self.name is not None
        return self.name

    @classmethod
    def from_dict(cls, data: Any, where: str = "dataset") -> DatasetSpec:
        """Build a spec from a YAML mapping, or from the shorthand string "bigbench:<name>"."""
        if isinstance(data, str):
            source, sep, name = data.partition(":")
            if not sep or source != "bigbench" or not name:
                raise ValueError(
                    f"{where}: {data!r} is not a valid shorthand; write 'bigbench:<task name>' "
                    "or a mapping with source and name or path"
                )
            return cls(source="bigbench", name=name)
        if not isinstance(data, Mapping):
            raise ValueError(f"{where} must be a mapping or 'bigbench:<name>', got {data!r}")
        _reject_unknown(where, data, _field_names(cls))
        values = dict(data)
        if "fields" in values:
            values["fields"] = FieldMapping.from_dict(values["fields"], f"{where}.fields")
        if "budget" in values:
            values["budget"] = Budget.from_dict(values["budget"], f"{where}.budget")
        return cls(**values)


_BUILDERS = ("json", "parquet", "csv", "text", "arrow")


def _file_stem(path: str) -> str:
    name = Path(path).name
    for suffix in (".jsonl", ".json", ".parquet", ".csv", ".gz", ".bz2", ".zst"):
        name = name.removesuffix(suffix)
    return name or path


@dataclasses.dataclass(frozen=True)
class MixtureSpec:
    """The datasets D_1..D_T of a run, in order."""

    datasets: tuple[DatasetSpec, ...]

    def __post_init__(self) -> None:
        datasets = tuple(self.datasets)
        object.__setattr__(self, "datasets", datasets)
        if not datasets:
            raise ValueError("a mixture needs at least one dataset")
        seen: dict[str, int] = {}
        duplicates = []
        for index, spec in enumerate(datasets):
            if not isinstance(spec, DatasetSpec):
                raise TypeError(f"datasets[{index}] is a {type(spec).__name__}, not a DatasetSpec")
            name = spec.task_name
            if name in seen:
                duplicates.append(f"{name!r} (datasets[{seen[name]}] and datasets[{index}])")
            seen.setdefault(name, index)
        if duplicates:
            raise ValueError(
                f"duplicate task names {', '.join(duplicates)}; give one of each pair a label"
            )

    @classmethod
    def from_dict(cls, data: Any, where: str = "mixture") -> MixtureSpec:
        """Build a mixture from a YAML list of datasets or a mapping with datasets and defaults."""
        defaults: Mapping[str, Any] = {}
        if isinstance(data, Mapping):
            _reject_unknown(where, data, ("datasets", "defaults"))
            defaults = data.get("defaults") or {}
            if not isinstance(defaults, Mapping):
                raise ValueError(f"{where}.defaults must be a mapping, got {defaults!r}")
            _reject_unknown(f"{where}.defaults", defaults, _field_names(DatasetSpec))
            data = data.get("datasets")
        if not isinstance(data, list):
            raise ValueError(f"{where}: datasets must be a list, got {type(data).__name__}")
        specs = []
        for index, entry in enumerate(data):
            entry_where = f"{where}.datasets[{index}]"
            if defaults:
                if isinstance(entry, str):
                    entry = DatasetSpec.from_dict(entry, entry_where)
                    entry = {"source": entry.source, "name": entry.name}
                if isinstance(entry, Mapping):
                    entry = {**defaults, **entry}
            specs.append(DatasetSpec.from_dict(entry, entry_where))
        return cls(datasets=tuple(specs))

    @classmethod
    def from_yaml(cls, path: str | Path) -> MixtureSpec:
        """Load a mixture from a YAML file (see the module doc for the format)."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"mixture file {path} not found") from None
        except yaml.YAMLError as error:
            raise ValueError(f"{path} is not valid YAML: {error}") from error
        return cls.from_dict(data, where=str(path))
