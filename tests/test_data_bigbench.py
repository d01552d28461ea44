"""BIG-bench reading from a fake sdist tarball, and from the real one (marked real)."""

from __future__ import annotations

import collections
import json
import logging
import re
from pathlib import Path

import pytest

from merit_jax.data.bigbench import BigBenchArchive, UnknownTaskError, list_tasks
from merit_jax.data.task import MultipleChoiceTask, Task
from merit_jax.data.testing import BIGBENCH_TASKS_ROOT, write_bigbench_tarball

ROOT = BIGBENCH_TASKS_ROOT

FAKE_TASKS: dict[str, dict] = {
    "natural_instructions": {"name": "natural_instructions", "description": "collection"},
    "natural_instructions/subtask001_fake_answer": {
        "name": "subtask001_fake_answer",
        "description": "Definition: short",
        "task_prefix": "Definition: Answer the question. Prompt: Answer.",
        "examples": [
            {"input": "Fact: a. \nQuestion: b?", "target": ["first answer.", "second answer."]},
            {"input": "Fact: c. \nQuestion: d?", "target": ["only answer."]},
            {"input": "Fact: e. \nQuestion: f?", "target": []},
            {"input": "Fact: g. \nQuestion: h?", "target": "  plain answer  "},
        ],
    },
    "gem": {"name": "gem", "description": "collection"},
    "gem/fake_e2e": {
        "name": "fake_e2e",
        "description": "Describe a thing",
        "task_prefix": "",
        "example_input_prefix": "\nattributes: ",
        "example_output_prefix": "\nDescription: ",
        "examples": [
            {"input": "name: A, color: red", "target": "A is red."},
            {"input": "name: B", "target": ["B.", "It is B."]},
        ],
    },
    "arith/2_digit_addition": {
        "name": "2_digit_addition",
        "description": "2-digit addition.",
        "examples": [
            {"input": "What is 10 plus 22?", "target": "32", "target_scores": {"31": 0, "32": 1}},
            {"input": "What is 40 plus 1?", "target": "41", "target_scores": {"41": 1, "5": 0}},
        ],
    },
    "arith": {"name": "arith", "description": "collection"},
    "fake_choice": {
        "name": "fake_choice",
        "description": "Pick",
        "task_prefix": "Choose wisely.\n",
        "example_input_prefix": "\nQ: ",
        "example_output_prefix": "\nA: ",
        "examples": [
            {"input": "Is it?", "target_scores": {"Yes": 0, "No": 1}},
            {"input": "Tie?", "target_scores": {"a": 1, "b": 1, "c": 0}},
            {"input": "One choice", "target_scores": {"only": 1}},
        ],
    },
}


def write_tarball(
    path: Path, tasks: dict[str, dict], extra: dict[str, bytes] | None = None
) -> Path:
    members = {f"{ROOT}/fake_choice/README.md": b"readme", **(extra or {})}
    return write_bigbench_tarball(path, tasks, members)


@pytest.fixture
def fake_archive(tmp_path) -> BigBenchArchive:
    tarball = write_tarball(tmp_path / "bigbench-1.0.0.tar.gz", FAKE_TASKS)
    return BigBenchArchive(tarball=tarball, cache_root=tmp_path / "cache")


def test_listing_kinds(fake_archive):
    infos = {info.name: info for info in fake_archive.list_tasks()}
    assert sorted(infos) == sorted(FAKE_TASKS)
    assert infos["gem/fake_e2e"].kind == "generative"
    assert infos["fake_choice"].kind == "multiple_choice"
    assert infos["arith/2_digit_addition"].kind == "both"
    assert infos["gem"].kind == "collection"
    assert infos["gem"].subtasks == ("gem/fake_e2e",)
    assert infos["natural_instructions/subtask001_fake_answer"].num_generative == 4
    assert infos["fake_choice"].num_multiple_choice == 3

    generative = [info.name for info in fake_archive.list_tasks("generative")]
    assert generative == [
        "arith/2_digit_addition",
        "gem/fake_e2e",
        "natural_instructions/subtask001_fake_answer",
    ]
    choice = [info.name for info in fake_archive.list_tasks("multiple_choice")]
    assert choice == ["arith/2_digit_addition", "fake_choice"]
    assert list_tasks("collection", archive=fake_archive)[0].name == "arith"
    with pytest.raises(ValueError, match="unknown task kind 'mc'"):
        fake_archive.list_tasks("mc")


def test_natural_instructions_task(fake_archive, caplog):
    with caplog.at_level(logging.WARNING):
        task = fake_archive.load_instruction_task("natural_instructions/subtask001_fake_answer")
    assert isinstance(task, Task)
    assert task.source == "bigbench:natural_instructions/subtask001_fake_answer"
    assert task.s_t == 3  # the empty target list is skipped
    assert "skipped 1 example" in caplog.text
    first = task.examples[0]
    assert first.instruction == "Definition: Answer the question. Prompt: Answer."
    assert first.input == "Fact: a. \nQuestion: b?"
    assert first.response == "first answer."  # the first of several references
    assert task.examples[2].response == "plain answer"


def test_gem_task_uses_description_and_prefixes(fake_archive):
    task = fake_archive.load_instruction_task("gem/fake_e2e")
    assert [example.instruction for example in task.examples] == ["Describe a thing"] * 2
    assert task.examples[0].input == "attributes: name: A, color: red\nDescription:"
    assert task.examples[1].response == "B."


def test_task_with_both_kinds(fake_archive):
    task = fake_archive.load_instruction_task("arith/2_digit_addition")
    assert [example.response for example in task.examples] == ["32", "41"]
    assert task.examples[0].instruction == "2-digit addition."
    choices = fake_archive.load_multiple_choice_task("arith/2_digit_addition")
    assert choices.examples[0].choices == ("31", "32")
    assert choices.examples[0].gold_indices == (1,)


def test_multiple_choice_context_convention(fake_archive, caplog):
    with caplog.at_level(logging.WARNING):
        task = fake_archive.load_multiple_choice_task("fake_choice")
    assert isinstance(task, MultipleChoiceTask)
    assert len(task.examples) == 2  # the single-choice example is skipped
    assert "skipped 1 multiple-choice" in caplog.text
    first = task.examples[0]
    assert first.context == "Choose wisely.\n\nQ: Is it?\nA: "
    assert first.choices == ("Yes", "No")
    assert first.target_scores == (0.0, 1.0)
    assert first.gold_indices == (1,)
    assert task.examples[1].gold_indices == (0, 1)
    assert task.chance_accuracy == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_unknown_name_suggests(fake_archive):
    with pytest.raises(UnknownTaskError, match="did you mean 'gem/fake_e2e'"):
        fake_archive.load_instruction_task("gem/fake_e2")
    with pytest.raises(
        UnknownTaskError, match="did you mean 'natural_instructions/subtask001_fake_answer'"
    ):
        fake_archive.load_instruction_task("subtask001_fake_answer")
    with pytest.raises(UnknownTaskError, match="unknown BIG-bench task 'zzz'\\. Names are"):
        fake_archive.load_instruction_task("zzz")


def test_wrong_kind_and_collection_errors(fake_archive):
    with pytest.raises(UnknownTaskError, match="'fake_choice' has no generative examples"):
        fake_archive.load_instruction_task("fake_choice")
    with pytest.raises(UnknownTaskError, match="'gem/fake_e2e' has no multiple-choice"):
        fake_archive.load_multiple_choice_task("gem/fake_e2e")
    with pytest.raises(UnknownTaskError, match="'gem' is a collection .*gem/fake_e2e"):
        fake_archive.load_instruction_task("gem")


def test_check_names_reports_all(fake_archive):
    with pytest.raises(UnknownTaskError) as raised:
        fake_archive.check_names(["nope", "gem/fake_e2e", "fake_choice"], kind="generative")
    message = str(raised.value)
    assert "'nope'" in message
    assert "'fake_choice'" in message
    assert "'gem/fake_e2e'" not in message.split("did you mean")[0]


def test_invalid_name_rejected(fake_archive):
    with pytest.raises(UnknownTaskError, match="invalid BIG-bench task name '../x'"):
        fake_archive.ensure_extracted(["../x"])


def test_one_pass_then_cache(tmp_path, monkeypatch):
    tarball = write_tarball(tmp_path / "bigbench-1.0.0.tar.gz", FAKE_TASKS)
    archive = BigBenchArchive(tarball=tarball, cache_root=tmp_path / "cache")
    scans = collections.Counter()
    original = BigBenchArchive._scan

    def counting_scan(self, **kwargs):
        scans["count"] += 1
        return original(self, **kwargs)

    monkeypatch.setattr(BigBenchArchive, "_scan", counting_scan)
    names = [
        "gem/fake_e2e",
        "arith/2_digit_addition",
        "natural_instructions/subtask001_fake_answer",
    ]
    tasks = archive.load_instruction_tasks(names)
    assert scans["count"] == 1  # index and the three files in one pass
    assert [task.name for task in tasks] == names
    assert (tmp_path / "cache/bigbench/bigbench-1.0.0/index.json").is_file()
    for name in names:
        assert archive.task_path(name).is_file()
    assert not list((tmp_path / "cache").rglob("*.part"))

    # A fresh archive reads the cached index and files without the tarball.
    tarball.unlink()
    again = BigBenchArchive(tarball=tarball, cache_root=tmp_path / "cache")
    assert again.load_instruction_tasks(names) == tasks
    assert scans["count"] == 1
    with pytest.raises(FileNotFoundError, match="merit fetch bigbench"):
        again.load_multiple_choice_task("fake_choice")


def test_unreadable_index_rebuilt(fake_archive, caplog):
    fake_archive.list_tasks()
    fake_archive.index_path.write_text("{not json")
    fresh = BigBenchArchive(
        tarball=fake_archive.tarball(), cache_root=fake_archive.cache.parent.parent
    )
    with caplog.at_level(logging.WARNING):
        assert len(fresh.list_tasks()) == len(FAKE_TASKS)
    assert "ignoring unreadable BIG-bench index" in caplog.text
    assert json.loads(fake_archive.index_path.read_text())["format"] == 1


def test_truncated_tarball_raises(tmp_path):
    tarball = write_tarball(tmp_path / "bigbench-1.0.0.tar.gz", FAKE_TASKS)
    tarball.write_bytes(tarball.read_bytes()[:200])
    archive = BigBenchArchive(tarball=tarball, cache_root=tmp_path / "cache")
    with pytest.raises(OSError, match="merit fetch bigbench --force"):
        archive.list_tasks()


def test_not_bigbench_tarball_raises(tmp_path):
    tarball = write_tarball(tmp_path / "other.tar.gz", {})
    archive = BigBenchArchive(tarball=tarball, cache_root=tmp_path / "cache")
    with pytest.raises(ValueError, match="not a BIG-bench sdist"):
        archive.list_tasks()


def test_invalid_task_json_names_file(tmp_path):
    tarball = write_tarball(
        tmp_path / "bigbench-1.0.0.tar.gz", {}, extra={f"{ROOT}/broken/task.json": b"{oops"}
    )
    archive = BigBenchArchive(tarball=tarball, cache_root=tmp_path / "cache")
    with pytest.raises(ValueError, match="broken/task.json is not valid JSON"):
        archive.list_tasks()


# ------------------------------------------------------------------ real data


@pytest.fixture(scope="module")
def real_archive(request) -> BigBenchArchive:
    tarball = request.getfixturevalue("real_bigbench_tarball")
    return BigBenchArchive(tarball=tarball)


@pytest.mark.real
def test_real_listing(real_archive):
    infos = real_archive.list_tasks()
    assert len(infos) == 1041
    kinds = collections.Counter(info.kind for info in infos)
    assert kinds == {"generative": 681, "multiple_choice": 286, "both": 34, "collection": 40}
    names = [info.name for info in infos]
    assert sum(name.startswith("natural_instructions/subtask") for name in names) == 61
    assert sum(name.startswith("gem/") for name in names) == 13


@pytest.mark.real
def test_real_instruction_tasks(real_archive):
    names = [
        "natural_instructions/subtask041_qasc_answer_generation",
        "gem/e2e_nlg",
        "arithmetic/3_digit_addition",
    ]
    natural, gem, addition = real_archive.load_instruction_tasks(names)

    raw = real_archive.read_task_json(names[0])
    assert natural.s_t == len(raw["examples"])
    assert natural.examples[0].instruction == raw["task_prefix"].strip()
    assert natural.examples[0].response == raw["examples"][0]["target"][0].strip()

    raw = real_archive.read_task_json(names[1])
    assert gem.s_t == len(raw["examples"])
    assert gem.examples[0].instruction == raw["description"].strip()
    assert gem.examples[0].input.endswith(raw["example_output_prefix"].strip())

    assert addition.s_t == 1000
    for example in addition.examples:
        left, right = map(int, re.findall(r"\d+", example.input))
        assert example.response == str(left + right)


@pytest.mark.real
def test_real_multiple_choice_task(real_archive):
    task = real_archive.load_multiple_choice_task("anachronisms")
    raw = real_archive.read_task_json("anachronisms")
    assert len(task.examples) == len(raw["examples"])
    first = task.examples[0]
    assert first.context == (
        raw.get("task_prefix", "")
        + raw.get("example_input_prefix", "")
        + raw["examples"][0]["input"]
        + raw.get("example_output_prefix", "")
    )
    assert set(first.choices) == set(raw["examples"][0]["target_scores"])
    assert task.chance_accuracy == pytest.approx(0.5)
