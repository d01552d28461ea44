"""Instruction tasks from JSONL files and Hugging Face ``datasets``.

Both sources turn records (mappings) into :class:`~merit_jax.data.task.Task`
objects through a :class:`~merit_jax.data.spec.FieldMapping`. With
``group_by`` every distinct value of that field becomes its own task, named
``<task name>/<value>`` and ordered by value, so one file can hold a whole
mixture. Records whose response is empty are skipped and counted; a missing
field or a value of the wrong type raises an error naming the record.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from merit_jax.data.spec import DatasetSpec, FieldMapping
from merit_jax.data.task import Example, Task

logger = logging.getLogger(__name__)

_BUILDER_BY_SUFFIX = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
    ".txt": "text",
}


def _field(record: Mapping[str, Any], key: str, role: str, where: str) -> Any:
    if key not in record:
        raise ValueError(
            f"{where}: field {key!r} (the {role}) is missing; the record has fields "
            f"{sorted(record)}. Set fields.{role} in the dataset spec to the right name"
        )
    return record[key]


def _text(value: Any, key: str, role: str, where: str, *, optional: bool) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise TypeError(
            f"{where}: field {key!r} (the {role}) must be a string, got "
            f"{type(value).__name__} {repr(value)[:80]}"
        )
    return value


def records_to_tasks(
    records: Iterable[Mapping[str, Any]],
    *,
    fields: FieldMapping,
    task_name: str,
    source: str,
    instruction: str | None = None,
    group_by: str | None = None,
) -> list[Task]:
    """Map records to one task, or one task per ``group_by`` value.

    ``instruction`` is the fixed instruction used when ``fields.instruction``
    is None. Records with an empty response are skipped (and logged); a
    group left without examples raises ValueError.
    """
    groups: dict[str, list[Example]] = {}
    skipped: dict[str, int] = {}
    for index, record in enumerate(records):
        where = f"{source} record {index}"
        if not isinstance(record, Mapping):
            raise TypeError(f"{where} is a {type(record).__name__}, expected a JSON object")
        group = ""
        if group_by is not None:
            value = _field(record, group_by, "group_by", where)
            if value is None or isinstance(value, dict | list):
                raise ValueError(
                    f"{where}: group_by field {group_by!r} must be a string or number, "
                    f"got {value!r}"
                )
            group = str(value)
        if fields.instruction is not None:
            raw = _field(record, fields.instruction, "instruction", where)
            task_instruction = _text(raw, fields.instruction, "instruction", where, optional=False)
        else:
            task_instruction = instruction
        input_text = None
        if fields.input is not None:
            # A missing input field is allowed: many instruction datasets omit empty inputs.
            raw = record.get(fields.input)
            input_text = _text(raw, fields.input, "input", where, optional=True)
        response = _text(
            _field(record, fields.response, "response", where),
            fields.response,
            "response",
            where,
            optional=False,
        )
        assert response is not None
        if not response.strip():
            skipped[group] = skipped.get(group, 0) + 1
            groups.setdefault(group, [])
            continue
        if not task_instruction or not task_instruction.strip():
            raise ValueError(
                f"{where}: the instruction is empty; fill field {fields.instruction!r} or set "
                "fields.instruction to null with a fixed instruction in the dataset spec"
            )
        groups.setdefault(group, []).append(
            Example(instruction=task_instruction, input=input_text, response=response)
        )

    if not groups:
        raise ValueError(f"{source} contains no records")
    tasks = []
    for group in sorted(groups):
        name = task_name if group_by is None else f"{task_name}/{group}"
        if skipped.get(group):
            logger.warning("%s: skipped %d record(s) with an empty response", name, skipped[group])
        if not groups[group]:
            raise ValueError(f"task {name!r} from {source} has no record with a non-empty response")
        tasks.append(Task(name=name, source=source, examples=tuple(groups[group])))
    return tasks


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read one JSON object per non-blank line; errors name the file and line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file {path} not found")
    records = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number} is not valid JSON: {error}") from error
            if not isinstance(record, dict):
                raise ValueError(
                    f"{path}:{line_number} must be a JSON object, got {type(record).__name__}"
                )
            records.append(record)
    return records


def load_jsonl_tasks(spec: DatasetSpec) -> list[Task]:
    """Load the tasks of a ``source: jsonl`` spec."""
    if spec.source != "jsonl" or spec.path is None:
        raise ValueError(f"load_jsonl_tasks needs a jsonl spec with a path, got {spec}")
    return records_to_tasks(
        read_jsonl(spec.path),
        fields=spec.fields,
        task_name=spec.task_name,
        source=f"jsonl:{spec.path}",
        instruction=spec.instruction,
        group_by=spec.group_by,
    )


def _builder_for(path: str) -> str:
    suffixes = Path(path.removesuffix(".gz").removesuffix(".bz2").removesuffix(".zst")).suffix
    builder = _BUILDER_BY_SUFFIX.get(suffixes.lower())
    if builder is None:
        raise ValueError(
            f"cannot tell the file format of {path!r} from its suffix; set name to a datasets "
            f"builder ({', '.join(sorted(set(_BUILDER_BY_SUFFIX.values())))})"
        )
    return builder


def load_hf_tasks(spec: DatasetSpec, *, cache_dir: str | Path | None = None) -> list[Task]:
    """Load the tasks of a ``source: hf`` spec with ``datasets.load_dataset``.

    ``name`` is a hub id, which needs network access to the Hugging Face hub,
    or a builder for the local ``path``. With ``path`` alone the builder
    follows its suffix. ``cache_dir`` is passed to ``load_dataset`` (None
    means the datasets default cache).
    """
    if spec.source != "hf":
        raise ValueError(f"load_hf_tasks needs an hf spec, got source={spec.source!r}")
    import datasets  # imported here: it is slow to import and only this source needs it

    builder = spec.name if spec.name else _builder_for(spec.path or "")
    kwargs: dict[str, Any] = {"split": spec.split}
    if spec.path is not None:
        kwargs["data_files"] = spec.path
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    described = f"load_dataset({builder!r}, {spec.subset!r}, {kwargs})"
    try:
        dataset = datasets.load_dataset(builder, spec.subset, **kwargs)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{described} found no data: {error}") from error
    except Exception as error:
        # datasets raises many exception types (hub, network, builder errors); add which
        # spec failed and keep the original as the cause.
        raise RuntimeError(
            f"{described} failed: {type(error).__name__}: {error}. A hub id needs network "
            "access to the Hugging Face hub; local files need path (and a builder name when "
            "the suffix is unusual)"
        ) from error
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            f"{described} returned {type(dataset).__name__}; set split to one split name"
        )
    return records_to_tasks(
        iter(dataset),
        fields=spec.fields,
        task_name=spec.task_name,
        source=f"hf:{spec.name or spec.path}" + (f"[{spec.split}]" if spec.split else ""),
        instruction=spec.instruction,
        group_by=spec.group_by,
    )
