"""YAML dataset specs and loading a whole mixture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from merit_jax.data.bigbench import BigBenchArchive
from merit_jax.data.format import tokenize_task
from merit_jax.data.mixture import check_mixture, load_mixture, with_token_budgets
from merit_jax.data.spec import Budget, DatasetSpec, FieldMapping, MixtureSpec
from merit_jax.data.testing import chatml_byte_tokenizer, write_bigbench_tarball

FAKE_TASKS = {
    "gem": {"name": "gem", "description": "collection"},
    "gem/fake_e2e": {
        "name": "fake_e2e",
        "description": "Describe a thing",
        "example_input_prefix": "\nattributes: ",
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
    "fake_choice": {
        "name": "fake_choice",
        "description": "Pick",
        "examples": [{"input": "Is it?", "target_scores": {"Yes": 0, "No": 1}}],
    },
}


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_mixture_yaml_with_defaults(tmp_path):
    path = write_yaml(
        tmp_path / "mix.yaml",
        """
defaults:
  budget: {tokens: 5000}
  held_out: 1
datasets:
  - bigbench:gem/fake_e2e
  - source: bigbench
    name: arith/2_digit_addition
    budget: {epochs: 2}
  - source: jsonl
    path: data.jsonl
    fields: {instruction: q, input: null, response: a}
    group_by: kind
    max_samples: 10
""",
    )
    mixture = MixtureSpec.from_yaml(path)
    first, second, third = mixture.datasets
    assert first == DatasetSpec(
        source="bigbench", name="gem/fake_e2e", budget=Budget(tokens=5000), held_out=1
    )
    assert second.budget == Budget(epochs=2)
    assert third.fields == FieldMapping(instruction="q", input=None, response="a")
    assert third.task_name == "data"
    assert third.max_samples == 10


def test_mixture_plain_list():
    mixture = MixtureSpec.from_dict(["bigbench:a", {"source": "bigbench", "name": "b"}])
    assert [spec.task_name for spec in mixture.datasets] == ["a", "b"]
    assert mixture.datasets[0].budget == Budget(epochs=1.0)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (
            {"datasets": [{"source": "bigbench", "nme": "x"}]},
            "unknown key\\(s\\) \\['nme'\\]; valid keys",
        ),
        ({"datasets": ["gem/x"]}, "'gem/x' is not a valid shorthand"),
        ({"dataset": []}, "unknown key\\(s\\) \\['dataset'\\]"),
        ({"datasets": []}, "at least one dataset"),
        ({"datasets": "bigbench:x"}, "datasets must be a list"),
        (["bigbench:x", "bigbench:x"], "duplicate task names 'x'"),
        (
            [{"source": "web", "name": "x"}],
            "source='web' is invalid; expected one of bigbench, hf, jsonl",
        ),
        ([{"source": "bigbench"}], "needs name"),
        ([{"source": "bigbench", "name": "x", "group_by": "y"}], "\\['group_by'\\] do not apply"),
        ([{"source": "jsonl"}], "needs path"),
        ([{"source": "hf"}], "needs name"),
        ([{"source": "jsonl", "path": "a", "fields": {"instruction": None}}], "set instruction"),
        ([{"source": "jsonl", "path": "a", "instruction": "Do"}], "either fields.instruction or"),
        ([{"source": "jsonl", "path": "a", "fields": {"output": "o"}}], "fields: unknown key"),
        (
            [{"source": "bigbench", "name": "x", "budget": {"tokens": 5, "epochs": 1}}],
            "set only one",
        ),
        ([{"source": "bigbench", "name": "x", "budget": {"tokens": -5}}], "budget.tokens=-5"),
        ([{"source": "bigbench", "name": "x", "budget": {"epochs": 0}}], "budget.epochs=0"),
        ([{"source": "bigbench", "name": "x", "budget": 100}], "budget must be a mapping"),
        ([{"source": "bigbench", "name": "x", "max_samples": 0}], "max_samples=0"),
        ([{"source": "bigbench", "name": "x", "held_out": -1}], "held_out=-1"),
    ],
)
def test_mixture_errors(data, match):
    with pytest.raises(ValueError, match=match):
        MixtureSpec.from_dict(data)


def test_yaml_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.yaml not found"):
        MixtureSpec.from_yaml(tmp_path / "absent.yaml")
    with pytest.raises(ValueError, match="bad.yaml is not valid YAML"):
        MixtureSpec.from_yaml(write_yaml(tmp_path / "bad.yaml", "datasets: [\n"))


def test_budget_resolve():
    assert Budget(tokens=123).resolve(10_000) == 123
    assert Budget(epochs=2.5).resolve(1000) == 2500
    assert Budget().resolve(777) == 777
    assert Budget(epochs=1e-9).resolve(10) == 1


@pytest.fixture
def mixture_setup(tmp_path):
    tarball = write_bigbench_tarball(tmp_path / "bigbench-1.0.0.tar.gz", FAKE_TASKS)
    archive = BigBenchArchive(tarball=tarball, cache_root=tmp_path / "cache")
    records = [
        {"q": f"question {i}", "a": f"answer {i}", "kind": "odd" if i % 2 else "even"}
        for i in range(30)
    ]
    data = tmp_path / "local.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    mixture = MixtureSpec.from_dict(
        {
            "datasets": [
                "bigbench:gem/fake_e2e",
                {"source": "bigbench", "name": "arith/2_digit_addition", "budget": {"tokens": 999}},
                {
                    "source": "jsonl",
                    "path": str(data),
                    "fields": {"instruction": "q", "input": None, "response": "a"},
                    "group_by": "kind",
                    "held_out": 3,
                    "max_samples": 5,
                    "budget": {"epochs": 2},
                },
            ]
        }
    )
    return archive, mixture


def test_load_mixture_end_to_end(mixture_setup, tmp_path):
    archive, mixture = mixture_setup
    splits = load_mixture(mixture, seed=0, archive=archive)
    assert [split.train.name for split in splits] == [
        "gem/fake_e2e",
        "arith/2_digit_addition",
        "local/even",
        "local/odd",
    ]
    even = splits[2]
    assert len(even.held_out) == 3
    assert even.train.s_t == 5
    assert set(even.held_out).isdisjoint(even.train.examples)
    again = load_mixture(mixture, seed=0, archive=archive)
    assert [split.train for split in again] == [split.train for split in splits]
    other = load_mixture(mixture, seed=1, archive=archive)
    assert other[2].train != even.train

    tokenizer = chatml_byte_tokenizer()
    tokenized = [tokenize_task(tokenizer, split.train, max_length=256) for split in splits]
    tasks = with_token_budgets(splits, tokenized)
    assert tasks[0].n_t == tokenized[0].total_tokens  # default: one epoch
    assert tasks[1].n_t == 999
    assert tasks[2].n_t == 2 * tokenized[2].total_tokens
    assert [task.s_t for task in tasks] == [2, 2, 5, 5]
    with pytest.raises(ValueError, match="does not match task"):
        with_token_budgets(splits[:2], tokenized[1::-1])


def test_check_mixture_reports_everything(mixture_setup, tmp_path):
    archive, _ = mixture_setup
    mixture = MixtureSpec.from_dict(
        [
            "bigbench:gem/fake_e",
            "bigbench:fake_choice",
            {"source": "jsonl", "path": str(tmp_path / "nowhere.jsonl")},
        ]
    )
    with pytest.raises(ValueError) as raised:
        check_mixture(mixture, archive=archive)
    message = str(raised.value)
    assert "did you mean 'gem/fake_e2e'" in message
    assert "'fake_choice' has no generative examples" in message
    assert "nowhere.jsonl not found" in message


def test_load_mixture_duplicate_group_names(tmp_path):
    data = tmp_path / "x.jsonl"
    data.write_text(json.dumps({"instruction": "i", "response": "r", "g": "a"}) + "\n")
    mixture = MixtureSpec.from_dict(
        [
            {"source": "jsonl", "path": str(data), "group_by": "g", "label": "x"},
            {"source": "jsonl", "path": str(data), "label": "x/a"},
        ]
    )
    with pytest.raises(ValueError, match="duplicate task names \\['x/a'\\]"):
        load_mixture(mixture, seed=0, archive=BigBenchArchive(cache_root=tmp_path))
