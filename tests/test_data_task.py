"""Task units: validation messages, the multiple-choice convention and fingerprints."""

from __future__ import annotations

import hashlib
import json

import pytest

from merit_jax.data.task import (
    Example,
    MultipleChoiceExample,
    MultipleChoiceTask,
    Task,
    task_fingerprint,
)


def test_example_user_message():
    assert Example(instruction="Do", input="this", response="ok").user_message == "Do\n\nthis"
    assert Example(instruction="Do", response="ok").user_message == "Do"


def test_example_blank_input_becomes_none():
    assert Example(instruction="Do", input="  \n", response="ok").input is None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"instruction": "", "response": "r"}, ValueError, "instruction is empty"),
        ({"instruction": "i", "response": "  "}, ValueError, "response is empty"),
        ({"instruction": 3, "response": "r"}, TypeError, "instruction must be a string, got int 3"),
        ({"instruction": "i", "response": "r", "input": 5}, TypeError, "input must be a string"),
    ],
)
def test_example_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        Example(**kwargs)


def test_task_defaults_and_budget():
    examples = (Example(instruction="i", response="a"), Example(instruction="i", response="b"))
    task = Task(name="t", source="test", examples=list(examples))  # type: ignore[arg-type]
    assert task.examples == examples
    assert task.s_t == 2
    assert task.n_t is None
    assert task.with_budget(500).n_t == 500
    assert task.with_examples(examples[:1]).s_t == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": " t"}, "task name ' t' is invalid"),
        ({"examples": ()}, "task 't' \\(test\\) has no examples"),
        ({"s_t": 3}, "s_t=3 must be an integer between 1 and the number of examples \\(2\\)"),
        ({"s_t": 0}, "s_t=0"),
        ({"n_t": 0}, "n_t=0 must be a positive integer"),
        ({"n_t": 1.5}, "n_t=1.5"),
    ],
)
def test_task_validation(kwargs, match):
    values = {
        "name": "t",
        "source": "test",
        "examples": (
            Example(instruction="i", response="a"),
            Example(instruction="i", response="b"),
        ),
    }
    values.update(kwargs)
    with pytest.raises(ValueError, match=match):
        Task(**values)


def test_task_rejects_wrong_example_type():
    with pytest.raises(TypeError, match="examples\\[0\\] is a dict"):
        Task(name="t", source="test", examples=({"instruction": "i"},))  # type: ignore[arg-type]


def test_multiple_choice_context_and_gold():
    example = MultipleChoiceExample(
        input="2+2?",
        choices=("3", "4", "four"),
        target_scores=(0, 1, 1),
        task_prefix="Math.\n",
        input_prefix="Q: ",
        output_prefix="\nA:",
    )
    assert example.context == "Math.\nQ: 2+2?\nA:"
    assert example.gold_indices == (1, 2)
    assert example.target_scores == (0.0, 1.0, 1.0)
    task = MultipleChoiceTask(name="m", source="test", examples=(example,))
    assert task.chance_accuracy == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"choices": ("a",), "target_scores": (1,)},
            "1 choice\\(s\\) \\['a'\\]; it needs at least 2",
        ),
        ({"choices": ("a", "b"), "target_scores": (1,)}, "2 choices but 1 target scores"),
        ({"choices": ("a", "a"), "target_scores": (1, 0)}, "duplicate choices"),
        ({"choices": ("a", "b"), "target_scores": (1, float("nan"))}, "non-finite"),
    ],
)
def test_multiple_choice_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultipleChoiceExample(input="q", **kwargs)


def test_fingerprint_reference():
    examples = (Example(instruction="i", input="x", response="a"),)
    task = Task(name="t", source="test", examples=examples)
    record = {"instruction": "i", "input": "x", "response": "a"}
    expected = hashlib.sha256(b"t\0" + json.dumps(record, sort_keys=True).encode()).hexdigest()
    assert task_fingerprint(task) == expected
    assert task_fingerprint(task.with_budget(10)) == expected
    changed = Task(name="t", source="test", examples=(Example(instruction="i", response="b"),))
    assert task_fingerprint(changed) != expected
