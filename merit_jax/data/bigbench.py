"""BIG-bench tasks read from the bigbench 1.0.0 sdist tarball, without installing it.

Task names are the paths of the task.json files below ``bigbench/benchmark_tasks/``
without the file name, e.g. ``arithmetic/3_digit_addition``,
``natural_instructions/subtask041_qasc_answer_generation`` or ``gem/e2e_nlg``.
A task.json without examples (e.g. ``arithmetic``) is a collection of its subtasks.

Cache layout, under ``<cache root>/bigbench/<tarball stem>/``::

    index.json                 every task: example counts by kind, subtasks
    tasks/<name>/task.json     task files extracted on first use

The first use streams the .tar.gz once, and later uses read the extracted
files. Decompressing takes a few seconds; building the index takes about 20 s
more on a 2-core CPU, because it parses every task.json. Every file is written to a temporary name
and renamed into place, so concurrent readers never see a partial file.

Conversion rules:

* Instruction tasks use the examples that have a ``target``. The instruction is
  the task's ``task_prefix`` (Natural Instructions v1 subtasks keep their
  crowdsourcing definition there) or, when that is empty, its ``description``.
  The input is ``example_input_prefix + input``, followed by a line with
  ``example_output_prefix`` when that is not blank, all stripped of surrounding
  whitespace. The response is the target, stripped; when the target is a list
  of references, the first one is used. Examples with an empty target are
  skipped and counted.
* Multiple-choice tasks use the examples that have ``target_scores``: choices
  are its keys in file order, and the prefixes are kept verbatim for the
  context (see ``MultipleChoiceExample``). Examples with fewer than two choices
  are skipped and counted.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import re
import tarfile
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from merit_jax import assets
from merit_jax.data.task import Example, MultipleChoiceExample, MultipleChoiceTask, Task

logger = logging.getLogger(__name__)

_TASKS_MARKER = "/benchmark_tasks/"
_TASK_FILE = "task.json"
_INDEX_FORMAT = 1
_NAME_PART = re.compile(r"^[A-Za-z0-9_.\-]+$")

TaskKind = Literal["generative", "multiple_choice", "both", "collection"]
KINDS: tuple[str, ...] = ("generative", "multiple_choice", "both", "collection")


class UnknownTaskError(ValueError):
    """A requested BIG-bench task does not exist or has no examples of the requested kind."""


@dataclasses.dataclass(frozen=True)
class BigBenchTaskInfo:
    """One entry of the task listing."""

    name: str
    num_generative: int  # examples with a "target"
    num_multiple_choice: int  # examples with "target_scores"
    subtasks: tuple[str, ...] = ()  # direct and nested subtasks, for a collection

    @property
    def kind(self) -> TaskKind:
        """ "generative", "multiple_choice", "both" (examples of each) or "collection"."""
        if self.num_generative and self.num_multiple_choice:
            return "both"
        if self.num_generative:
            return "generative"
        if self.num_multiple_choice:
            return "multiple_choice"
        return "collection"

    @property
    def is_generative(self) -> bool:
        return self.num_generative > 0

    @property
    def is_multiple_choice(self) -> bool:
        return self.num_multiple_choice > 0


def _task_name_from_member(member_name: str) -> str | None:
    """Map a tar member path to its task name, or None if it is not a task.json."""
    if not member_name.endswith("/" + _TASK_FILE) or _TASKS_MARKER not in member_name:
        return None
    relative = member_name.split(_TASKS_MARKER, 1)[1]
    name = relative[: -len("/" + _TASK_FILE)]
    parts = name.split("/")
    if not name or any(part in ("", ".", "..") or not _NAME_PART.match(part) for part in parts):
        return None
    return name


def _is_valid_name(name: str) -> bool:
    return _task_name_from_member(f"x{_TASKS_MARKER}{name}/{_TASK_FILE}") == name


def _count_examples(data: dict[str, Any]) -> tuple[int, int]:
    examples = data.get("examples") or []
    generative = sum(1 for ex in examples if isinstance(ex, dict) and "target" in ex)
    multiple_choice = sum(1 for ex in examples if isinstance(ex, dict) and "target_scores" in ex)
    return generative, multiple_choice


def _write_atomically(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


class BigBenchArchive:
    """Listing and loading of BIG-bench tasks from one sdist tarball.

    ``tarball`` defaults to the cached ``bigbench==1.0.0`` sdist. It is
    fetched (and checked against its pinned sha256) only when a task file or
    the index is not cached yet, because cached files are read without it.
    ``cache_root`` defaults to ``merit_jax.assets.cache_dir()``.
    """

    def __init__(self, tarball: Path | str | None = None, cache_root: Path | str | None = None):
        self._tarball = Path(tarball) if tarball is not None else None
        stem_source = (
            self._tarball.name if self._tarball else assets.get_asset(assets.BIGBENCH).filename
        )
        stem = stem_source.removesuffix(".tar.gz").removesuffix(".tgz")
        root = Path(cache_root) if cache_root is not None else assets.cache_dir()
        self.cache = root / "bigbench" / stem
        self._index: dict[str, BigBenchTaskInfo] | None = None

    # ----------------------------------------------------------------- paths

    @property
    def index_path(self) -> Path:
        return self.cache / "index.json"

    def task_path(self, name: str) -> Path:
        """Return where the extracted task.json of ``name`` lives (it may not exist yet)."""
        return self.cache / "tasks" / name / _TASK_FILE

    def tarball(self) -> Path:
        """Return the tarball path, fetching the default one when it is missing."""
        if self._tarball is None:
            self._tarball = assets.bigbench_tarball()
        if not self._tarball.is_file():
            raise FileNotFoundError(
                f"BIG-bench tarball {self._tarball} not found; run `merit fetch bigbench` or "
                "pass the path of bigbench-1.0.0.tar.gz"
            )
        return self._tarball

    # ----------------------------------------------------------------- index

    def index(self) -> dict[str, BigBenchTaskInfo]:
        """Return every task by name, building and caching the index on first use."""
        if self._index is None:
            self._index = self._read_index()
        if self._index is None:
            self._scan(extract=set(), build_index=True)
        assert self._index is not None
        return self._index

    def _read_index(self) -> dict[str, BigBenchTaskInfo] | None:
        if not self.index_path.is_file():
            return None
        try:
            payload = json.loads(self.index_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            logger.warning("ignoring unreadable BIG-bench index %s: %s", self.index_path, error)
            return None
        if payload.get("format") != _INDEX_FORMAT:
            return None
        return {
            entry["name"]: BigBenchTaskInfo(
                name=entry["name"],
                num_generative=entry["num_generative"],
                num_multiple_choice=entry["num_multiple_choice"],
                subtasks=tuple(entry["subtasks"]),
            )
            for entry in payload["tasks"]
        }

    def _write_index(self, counts: dict[str, tuple[int, int]]) -> None:
        names = sorted(counts)
        infos: dict[str, BigBenchTaskInfo] = {}
        for name in names:
            generative, multiple_choice = counts[name]
            subtasks: tuple[str, ...] = ()
            if generative == 0 and multiple_choice == 0:
                subtasks = tuple(other for other in names if other.startswith(name + "/"))
            infos[name] = BigBenchTaskInfo(name, generative, multiple_choice, subtasks)
        payload = {
            "format": _INDEX_FORMAT,
            "tarball": self.tarball().name,
            "tasks": [dataclasses.asdict(info) for info in infos.values()],
        }
        _write_atomically(self.index_path, json.dumps(payload, indent=1).encode())
        self._index = infos

    def _scan(self, *, extract: set[str], build_index: bool) -> None:
        """Stream the tarball once: extract the ``extract`` tasks and optionally build the index."""
        tarball = self.tarball()
        start = time.perf_counter()
        logger.info(
            "reading %s: extracting %d task file(s)%s",
            tarball,
            len(extract),
            ", building the task index" if build_index else "",
        )
        counts: dict[str, tuple[int, int]] = {}
        found: set[str] = set()
        try:
            with tarfile.open(tarball, mode="r|gz") as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    name = _task_name_from_member(member.name)
                    if name is None or not (build_index or name in extract):
                        continue
                    handle = archive.extractfile(member)
                    assert handle is not None
                    payload = handle.read()
                    if name in extract:
                        _write_atomically(self.task_path(name), payload)
                        found.add(name)
                    if build_index:
                        counts[name] = _count_examples(_parse_task_json(payload, member.name))
        except (tarfile.TarError, EOFError, OSError) as error:
            raise OSError(
                f"failed to read BIG-bench tarball {tarball}: {error}. The file may be truncated; "
                "run `merit fetch bigbench --force` to download it again"
            ) from error
        if build_index:
            if not counts:
                raise ValueError(
                    f"{tarball} contains no */benchmark_tasks/**/task.json files; "
                    "it is not a BIG-bench sdist"
                )
            self._write_index(counts)
        missing = extract - found
        if missing and not build_index:
            raise UnknownTaskError(f"tasks {sorted(missing)} are not in {tarball}")
        logger.info("read %s in %.1f s", tarball.name, time.perf_counter() - start)

    # --------------------------------------------------------------- listing

    def list_tasks(self, kind: str | None = None) -> list[BigBenchTaskInfo]:
        """Return the tasks sorted by name, optionally only those usable as ``kind``.

        ``kind="generative"`` keeps tasks with generative examples (kind
        "generative" or "both"), ``"multiple_choice"`` those with
        multiple-choice examples, ``"both"`` and ``"collection"`` match exactly.
        """
        if kind is not None and kind not in KINDS:
            raise ValueError(f"unknown task kind {kind!r}; expected one of {', '.join(KINDS)}")
        infos = sorted(self.index().values(), key=lambda info: info.name)
        if kind == "generative":
            return [info for info in infos if info.is_generative]
        if kind == "multiple_choice":
            return [info for info in infos if info.is_multiple_choice]
        if kind is not None:
            return [info for info in infos if info.kind == kind]
        return infos

    def info(
        self, name: str, *, kind: Literal["generative", "multiple_choice"] | None = None
    ) -> BigBenchTaskInfo:
        """Return the listing entry of ``name``; raise UnknownTaskError with suggestions.

        With ``kind``, the task must also have examples of that kind.
        """
        self.check_names([name], kind=kind)
        return self.index()[name]

    def check_names(
        self, names: Iterable[str], *, kind: Literal["generative", "multiple_choice"] | None = None
    ) -> None:
        """Raise one UnknownTaskError listing every name that is unknown or of the wrong kind."""
        index = self.index()
        problems = [
            problem for name in names if (problem := _name_problem(index, name, kind)) is not None
        ]
        if problems:
            raise UnknownTaskError("\n".join(problems))

    # --------------------------------------------------------------- loading

    def ensure_extracted(self, names: Iterable[str]) -> None:
        """Extract the task.json files of ``names`` that are not cached yet, in one pass."""
        requested = sorted(set(names))
        for name in requested:
            if not _is_valid_name(name):
                raise UnknownTaskError(
                    f"invalid BIG-bench task name {name!r}; names are paths below "
                    "bigbench/benchmark_tasks/ such as 'gem/e2e_nlg'"
                )
        missing = {name for name in requested if not self.task_path(name).is_file()}
        if missing:
            build_index = self._index is None and self._read_index() is None
            self._scan(extract=missing, build_index=build_index)

    def read_task_json(self, name: str) -> dict[str, Any]:
        """Return the parsed task.json of one task, extracting it on first use."""
        self.ensure_extracted([name])
        path = self.task_path(name)
        return _parse_task_json(path.read_bytes(), str(path))

    def prepare(
        self, names: Iterable[str], *, kind: Literal["generative", "multiple_choice"] | None = None
    ) -> None:
        """Check ``names`` against the index and extract their files, reading the tarball once.

        Without a cached index, one pass over the tarball builds the index and
        extracts the requested files together.
        """
        names = list(names)
        if self._index is None:
            self._index = self._read_index()
        if self._index is None:
            plausible = {name for name in names if _is_valid_name(name)}
            self._scan(extract=plausible, build_index=True)
        self.check_names(names, kind=kind)
        self.ensure_extracted(names)

    def load_instruction_task(self, name: str) -> Task:
        """Return the generative examples of ``name`` as an instruction/response Task."""
        self.prepare([name], kind="generative")
        data = self.read_task_json(name)
        return task_from_json(name, data, source=f"bigbench:{name}")

    def load_multiple_choice_task(self, name: str) -> MultipleChoiceTask:
        """Return the multiple-choice examples of ``name``."""
        self.prepare([name], kind="multiple_choice")
        data = self.read_task_json(name)
        return multiple_choice_task_from_json(name, data, source=f"bigbench:{name}")

    def load_instruction_tasks(self, names: Iterable[str]) -> list[Task]:
        """Load several instruction tasks, reading the tarball at most once."""
        names = list(names)
        self.prepare(names, kind="generative")
        return [self.load_instruction_task(name) for name in names]

    def load_multiple_choice_tasks(self, names: Iterable[str]) -> list[MultipleChoiceTask]:
        """Load several multiple-choice tasks, reading the tarball at most once."""
        names = list(names)
        self.prepare(names, kind="multiple_choice")
        return [self.load_multiple_choice_task(name) for name in names]


def _name_problem(index: dict[str, BigBenchTaskInfo], name: str, kind: str | None) -> str | None:
    info = index.get(name)
    if info is None:
        suggestions = suggest_names(name, index)
        hint = f"; did you mean {', '.join(repr(s) for s in suggestions)}?" if suggestions else "."
        return (
            f"unknown BIG-bench task {name!r}{hint} Names are paths below "
            "bigbench/benchmark_tasks/, such as 'arithmetic/3_digit_addition'; "
            "list them with BigBenchArchive().list_tasks()"
        )
    if info.kind == "collection":
        listed = ", ".join(info.subtasks[:8]) + (" ..." if len(info.subtasks) > 8 else "")
        return f"BIG-bench task {name!r} is a collection without examples; pick a subtask: {listed}"
    if kind == "generative" and not info.is_generative:
        return (
            f"BIG-bench task {name!r} has no generative examples (only multiple-choice ones); "
            "use it for evaluation, or pick a generative task for training"
        )
    if kind == "multiple_choice" and not info.is_multiple_choice:
        return (
            f"BIG-bench task {name!r} has no multiple-choice examples (target_scores); "
            "pick a multiple-choice task for log-likelihood evaluation"
        )
    return None


def suggest_names(name: str, index: Iterable[str], limit: int = 3) -> list[str]:
    """Return up to ``limit`` task names close to ``name``: same last part first, then similar."""
    names = sorted(index)
    leaf = name.rsplit("/", 1)[-1]
    same_leaf = [other for other in names if other.rsplit("/", 1)[-1] == leaf]
    close = difflib.get_close_matches(name, names, n=limit, cutoff=0.6)
    close_leaf = difflib.get_close_matches(
        leaf, {other.rsplit("/", 1)[-1]: other for other in names}, n=limit, cutoff=0.75
    )
    leaf_to_name = {other.rsplit("/", 1)[-1]: other for other in names}
    ordered = same_leaf + close + [leaf_to_name[item] for item in close_leaf]
    return list(dict.fromkeys(ordered))[:limit]


def _parse_task_json(payload: bytes, where: str) -> dict[str, Any]:
    try:
        data = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{where} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{where} must contain a JSON object, got {type(data).__name__}")
    return data


def _text_field(data: dict[str, Any], key: str, name: str) -> str:
    value = data.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(
            f"BIG-bench task {name!r}: field {key!r} must be a string, got {type(value).__name__}"
        )
    return value


def _first_target(target: object) -> str | None:
    """Return the target text: the string itself, or the first reference of a list."""
    if isinstance(target, str):
        return target
    if isinstance(target, list) and target and isinstance(target[0], str):
        return target[0]
    return None


def task_from_json(name: str, data: dict[str, Any], *, source: str) -> Task:
    """Convert the generative examples of a parsed task.json to a Task (rules in the module doc)."""
    instruction = _text_field(data, "task_prefix", name).strip()
    if not instruction:
        instruction = _text_field(data, "description", name).strip()
    if not instruction:
        raise ValueError(
            f"BIG-bench task {name!r} has neither a task_prefix nor a description to use as "
            "the instruction"
        )
    input_prefix = _text_field(data, "example_input_prefix", name).strip()
    output_prefix = _text_field(data, "example_output_prefix", name).strip()

    examples: list[Example] = []
    skipped = 0
    for raw in data.get("examples") or []:
        if not isinstance(raw, dict) or "target" not in raw:
            continue
        response = _first_target(raw["target"])
        if response is None or not response.strip():
            skipped += 1
            continue
        text = raw.get("input", "")
        if not isinstance(text, str):
            skipped += 1
            continue
        parts = [part for part in (input_prefix, text.strip()) if part]
        user_input = " ".join(parts)
        if output_prefix:
            user_input = f"{user_input}\n{output_prefix}" if user_input else output_prefix
        examples.append(
            Example(instruction=instruction, input=user_input or None, response=response.strip())
        )
    if skipped:
        logger.warning(
            "BIG-bench task %s: skipped %d example(s) with an empty target", name, skipped
        )
    if not examples:
        raise UnknownTaskError(f"BIG-bench task {name!r} has no usable generative examples")
    return Task(name=name, source=source, examples=tuple(examples))


def multiple_choice_task_from_json(
    name: str, data: dict[str, Any], *, source: str
) -> MultipleChoiceTask:
    """Convert the target_scores examples of a parsed task.json to a MultipleChoiceTask."""
    prefixes = {
        "task_prefix": _text_field(data, "task_prefix", name),
        "input_prefix": _text_field(data, "example_input_prefix", name),
        "output_prefix": _text_field(data, "example_output_prefix", name),
    }
    examples: list[MultipleChoiceExample] = []
    skipped = 0
    for raw in data.get("examples") or []:
        if not isinstance(raw, dict) or "target_scores" not in raw:
            continue
        scores = raw["target_scores"]
        text = raw.get("input")
        if not isinstance(scores, dict) or len(scores) < 2 or not isinstance(text, str):
            skipped += 1
            continue
        try:
            example = MultipleChoiceExample(
                input=text,
                choices=tuple(scores.keys()),
                target_scores=tuple(scores.values()),
                **prefixes,
            )
        except (TypeError, ValueError):
            skipped += 1
            continue
        examples.append(example)
    if skipped:
        logger.warning(
            "BIG-bench task %s: skipped %d multiple-choice example(s) with fewer than two valid "
            "choices",
            name,
            skipped,
        )
    if not examples:
        raise UnknownTaskError(f"BIG-bench task {name!r} has no usable multiple-choice examples")
    return MultipleChoiceTask(name=name, source=source, examples=tuple(examples))


def list_tasks(
    kind: str | None = None, *, archive: BigBenchArchive | None = None
) -> list[BigBenchTaskInfo]:
    """List the tasks of the default (or given) archive; see ``BigBenchArchive.list_tasks``."""
    return (archive or BigBenchArchive()).list_tasks(kind)
