"""JSONL files and Hugging Face datasets on local files, mapped to instruction tasks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from merit_jax.data.sources import load_hf_tasks, load_jsonl_tasks, read_jsonl, records_to_tasks
from merit_jax.data.spec import DatasetSpec, FieldMapping
from merit_jax.data.task import Example

RECORDS = [
    {"prompt": "Add", "context": "1 2", "answer": "3", "topic": "math"},
    {"prompt": "Greet", "answer": "Hello", "topic": "chat"},
    {"prompt": "Sub", "context": "5 2", "answer": "3", "topic": "math"},
    {"prompt": "Wave", "context": "", "answer": "Hi", "topic": "chat"},
    {"prompt": "Mul", "context": "2 2", "answer": "  ", "topic": "math"},
]
FIELDS = FieldMapping(instruction="prompt", input="context", response="answer")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_jsonl_single_task(tmp_path, caplog):
    path = write_jsonl(tmp_path / "mix.jsonl", RECORDS)
    spec = DatasetSpec(source="jsonl", path=str(path), fields=FIELDS)
    with caplog.at_level(logging.WARNING):
        (task,) = load_jsonl_tasks(spec)
    assert task.name == "mix"
    assert task.source == f"jsonl:{path}"
    assert task.examples == (
        Example(instruction="Add", input="1 2", response="3"),
        Example(instruction="Greet", input=None, response="Hello"),
        Example(instruction="Sub", input="5 2", response="3"),
        Example(instruction="Wave", input=None, response="Hi"),
    )
    assert "skipped 1 record(s) with an empty response" in caplog.text


def test_jsonl_group_by_and_fixed_instruction(tmp_path):
    path = write_jsonl(tmp_path / "mix.jsonl", RECORDS)
    spec = DatasetSpec(
        source="jsonl",
        path=str(path),
        fields=FieldMapping(instruction=None, input="prompt", response="answer"),
        instruction="Follow the request.",
        group_by="topic",
        label="support",
    )
    chat, math = load_jsonl_tasks(spec)
    assert chat.name == "support/chat"
    assert math.name == "support/math"
    assert [example.input for example in chat.examples] == ["Greet", "Wave"]
    assert [example.input for example in math.examples] == ["Add", "Sub"]
    assert {example.instruction for example in math.examples} == {"Follow the request."}


def test_jsonl_blank_lines_and_errors(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"instruction": "a", "response": "b"}\n\n')
    assert read_jsonl(path) == [{"instruction": "a", "response": "b"}]

    path.write_text('{"instruction": "a", "response": "b"}\n{broken\n')
    with pytest.raises(ValueError, match="data.jsonl:2 is not valid JSON"):
        read_jsonl(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="data.jsonl:1 must be a JSON object, got list"):
        read_jsonl(path)
    with pytest.raises(FileNotFoundError, match="missing.jsonl not found"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_records_missing_field_names_fix():
    with pytest.raises(ValueError, match="record 1: field 'answer' .*response.*fields.response"):
        records_to_tasks(
            [{"prompt": "a", "answer": "b"}, {"prompt": "c"}],
            fields=FIELDS,
            task_name="t",
            source="test",
        )


def test_records_wrong_type_names_value():
    with pytest.raises(TypeError, match="record 0: field 'answer' .*must be a string, got int 3"):
        records_to_tasks(
            [{"prompt": "a", "answer": 3}], fields=FIELDS, task_name="t", source="test"
        )


def test_records_empty_group_raises():
    records = [{"prompt": "a", "answer": "b", "g": "x"}, {"prompt": "c", "answer": "", "g": "y"}]
    with pytest.raises(ValueError, match="task 't/y' from test has no record"):
        records_to_tasks(records, fields=FIELDS, task_name="t", source="test", group_by="g")


def test_records_bad_group_value():
    with pytest.raises(ValueError, match="group_by field 'g' must be a string or number"):
        records_to_tasks(
            [{"prompt": "a", "answer": "b", "g": None}],
            fields=FIELDS,
            task_name="t",
            source="test",
            group_by="g",
        )


def test_hf_local_jsonl_group_by(tmp_path):
    path = write_jsonl(tmp_path / "mix.jsonl", RECORDS)
    spec = DatasetSpec(source="hf", path=str(path), fields=FIELDS, group_by="topic")
    chat, math = load_hf_tasks(spec, cache_dir=tmp_path / "hf")
    assert (chat.name, math.name) == ("mix/chat", "mix/math")
    assert chat.source == f"hf:{path}[train]"
    assert [example.response for example in math.examples] == ["3", "3"]
    # datasets fills a column missing from a record with None: no input.
    assert chat.examples[0] == Example(instruction="Greet", input=None, response="Hello")


def test_hf_local_parquet_with_builder(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "data.parquet"
    datasets.Dataset.from_list(RECORDS[:2]).to_parquet(str(path))
    spec = DatasetSpec(source="hf", name="parquet", path=str(path), fields=FIELDS, label="pq")
    (task,) = load_hf_tasks(spec, cache_dir=tmp_path / "hf")
    assert task.name == "pq"
    assert [example.instruction for example in task.examples] == ["Add", "Greet"]


def test_hf_unknown_suffix_raises(tmp_path):
    spec = DatasetSpec(source="hf", path=str(tmp_path / "data.bin"))
    with pytest.raises(ValueError, match="cannot tell the file format of .*data.bin"):
        load_hf_tasks(spec, cache_dir=tmp_path / "hf")


def test_hf_missing_file_raises(tmp_path):
    spec = DatasetSpec(source="hf", path=str(tmp_path / "absent.jsonl"))
    with pytest.raises((FileNotFoundError, RuntimeError), match="absent.jsonl"):
        load_hf_tasks(spec, cache_dir=tmp_path / "hf")


def test_hf_hub_failure_names_spec(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    spec = DatasetSpec(source="hf", name="someorg/somedata", fields=FIELDS)
    with pytest.raises(RuntimeError, match="load_dataset\\('someorg/somedata'.*network access"):
        load_hf_tasks(spec, cache_dir=tmp_path / "hf")
