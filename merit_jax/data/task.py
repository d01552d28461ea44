"""Task units: the datasets D_1..D_T that MERIT splits, and multiple-choice evaluation tasks.

A :class:`Task` is one training dataset: instruction/response examples plus the
two numbers the method needs, the sample count s_t (weights of the balanced
median split) and the token budget n_t (how many training tokens the task
contributes, which sets the branch lengths and the merge weights
w_k = N_k / sum_j N_j). A :class:`MultipleChoiceTask` is an evaluation task
scored by log-likelihood under the BIG-bench convention described on
:class:`MultipleChoiceExample`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence


def _check_text(owner: str, field: str, value: object, *, fix: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{owner}: {field} must be a string, got {type(value).__name__} {value!r}")
    if not value.strip():
        raise ValueError(f"{owner}: {field} is empty ({value!r}); {fix}")


def _check_name(kind: str, name: object) -> None:
    if not isinstance(name, str) or not name or name != name.strip() or "\n" in name:
        raise ValueError(
            f"{kind} name {name!r} is invalid; use a non-empty single-line string without "
            "leading or trailing whitespace, such as 'gem/e2e_nlg'"
        )


@dataclasses.dataclass(frozen=True)
class Example:
    """One instruction-tuning example.

    The user turn is ``instruction + "\\n\\n" + input`` when ``input`` is set and
    ``instruction`` alone otherwise; the assistant turn is ``response``. An
    empty or whitespace-only ``input`` is stored as None.
    """

    instruction: str
    response: str
    input: str | None = None

    def __post_init__(self) -> None:
        _check_text(
            "example", "instruction", self.instruction, fix="give every example an instruction"
        )
        _check_text(
            "example",
            "response",
            self.response,
            fix="skip examples without a response when building the task",
        )
        if self.input is not None:
            if not isinstance(self.input, str):
                raise TypeError(
                    f"example: input must be a string or None, got {type(self.input).__name__} "
                    f"{self.input!r}"
                )
            if not self.input.strip():
                object.__setattr__(self, "input", None)

    @property
    def user_message(self) -> str:
        """The user turn: instruction, then a blank line and the input when there is one."""
        if self.input is None:
            return self.instruction
        return f"{self.instruction}\n\n{self.input}"


@dataclasses.dataclass(frozen=True)
class Task:
    """One training dataset of the mixture.

    ``s_t`` is the number of examples the run uses (defaults to all of them).
    ``n_t`` is the token budget: the number of training tokens the task
    contributes, counting the prompt and response tokens of every formatted
    example seen, over all epochs. ``n_t`` is None until a budget is resolved, because an
    epoch budget needs the tokenizer (see ``merit_jax.data.sampling``).
    """

    name: str
    source: (
        str  # where the examples came from, e.g. "bigbench:gem/e2e_nlg" or "jsonl:/data/a.jsonl"
    )
    examples: tuple[Example, ...]
    s_t: int | None = None
    n_t: int | None = None

    def __post_init__(self) -> None:
        _check_name("task", self.name)
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"task {self.name!r}: source must be a non-empty string")
        examples = tuple(self.examples)
        object.__setattr__(self, "examples", examples)
        if not examples:
            raise ValueError(
                f"task {self.name!r} ({self.source}) has no examples; check the field mapping, "
                "the split and max_samples of its dataset spec"
            )
        for index, example in enumerate(examples):
            if not isinstance(example, Example):
                raise TypeError(
                    f"task {self.name!r}: examples[{index}] is a {type(example).__name__}, "
                    "expected merit_jax.data.Example"
                )
        if self.s_t is None:
            object.__setattr__(self, "s_t", len(examples))
        s_t = self.s_t
        if not isinstance(s_t, int) or isinstance(s_t, bool) or not 1 <= s_t <= len(examples):
            raise ValueError(
                f"task {self.name!r}: s_t={s_t!r} must be an integer between 1 and the number of "
                f"examples ({len(examples)}); leave it unset to use all examples"
            )
        n_t = self.n_t
        if n_t is not None and (not isinstance(n_t, int) or isinstance(n_t, bool) or n_t < 1):
            raise ValueError(
                f"task {self.name!r}: n_t={n_t!r} must be a positive integer number of tokens, "
                "or None while the budget is not resolved"
            )

    def with_budget(self, n_t: int) -> Task:
        """Return a copy with the token budget ``n_t`` set."""
        return dataclasses.replace(self, n_t=n_t)

    def with_examples(self, examples: Sequence[Example]) -> Task:
        """Return a copy with ``examples`` and s_t reset to their number."""
        return dataclasses.replace(self, examples=tuple(examples), s_t=None)


@dataclasses.dataclass(frozen=True)
class MultipleChoiceExample:
    """One multiple-choice example, scored zero-shot by log-likelihood.

    BIG-bench convention of this project: the context is
    ``task_prefix + input_prefix + input + output_prefix``, where each prefix is
    the task.json field (``task_prefix``, ``example_input_prefix``,
    ``example_output_prefix``) or "" where the task does not define it, and the
    choices are not appended to the input. Choice i is scored as the
    continuation ``" " + choices[i]``. The gold set is every choice whose
    target score is maximal.
    """

    input: str
    choices: tuple[str, ...]
    target_scores: tuple[float, ...]
    task_prefix: str = ""
    input_prefix: str = ""
    output_prefix: str = ""

    def __post_init__(self) -> None:
        for field in ("input", "task_prefix", "input_prefix", "output_prefix"):
            value = getattr(self, field)
            if not isinstance(value, str):
                raise TypeError(
                    f"multiple-choice example: {field} must be a string, got "
                    f"{type(value).__name__} {value!r}"
                )
        choices = tuple(self.choices)
        scores = tuple(float(score) for score in self.target_scores)
        object.__setattr__(self, "choices", choices)
        object.__setattr__(self, "target_scores", scores)
        if len(choices) < 2:
            raise ValueError(
                f"multiple-choice example has {len(choices)} choice(s) {list(choices)!r}; "
                "it needs at least 2"
            )
        if len(scores) != len(choices):
            raise ValueError(
                f"multiple-choice example has {len(choices)} choices but {len(scores)} target "
                "scores; give one score per choice"
            )
        for index, choice in enumerate(choices):
            if not isinstance(choice, str):
                raise TypeError(
                    f"multiple-choice example: choices[{index}] must be a string, got "
                    f"{type(choice).__name__} {choice!r}"
                )
        if len(set(choices)) != len(choices):
            raise ValueError(f"multiple-choice example has duplicate choices {list(choices)!r}")
        if not all(math.isfinite(score) for score in scores):
            raise ValueError(f"multiple-choice example has non-finite target scores {scores!r}")

    @property
    def context(self) -> str:
        """The scored context: task prefix, input prefix, input, output prefix."""
        return self.task_prefix + self.input_prefix + self.input + self.output_prefix

    @property
    def gold_indices(self) -> tuple[int, ...]:
        """Indices of the choices with the maximal target score, in choice order."""
        best = max(self.target_scores)
        return tuple(i for i, score in enumerate(self.target_scores) if score == best)


@dataclasses.dataclass(frozen=True)
class MultipleChoiceTask:
    """One multiple-choice evaluation task."""

    name: str
    source: str
    examples: tuple[MultipleChoiceExample, ...]

    def __post_init__(self) -> None:
        _check_name("multiple-choice task", self.name)
        examples = tuple(self.examples)
        object.__setattr__(self, "examples", examples)
        if not examples:
            raise ValueError(f"multiple-choice task {self.name!r} ({self.source}) has no examples")
        for index, example in enumerate(examples):
            if not isinstance(example, MultipleChoiceExample):
                raise TypeError(
                    f"multiple-choice task {self.name!r}: examples[{index}] is a "
                    f"{type(example).__name__}, expected MultipleChoiceExample"
                )

    @property
    def chance_accuracy(self) -> float:
        """Expected accuracy of a uniformly random pick: mean of |gold| / |choices|."""
        total = sum(len(ex.gold_indices) / len(ex.choices) for ex in self.examples)
        return total / len(self.examples)


def task_fingerprint(task: Task | MultipleChoiceTask) -> str:
    """Return the sha256 hex digest of a task's name and examples, in order.

    Two tasks with the same digest contain the same examples, so a plan can record
    which data it was computed on. Budgets (s_t, n_t) are not part of the digest.
    """
    digest = hashlib.sha256()
    digest.update(task.name.encode())
    for example in task.examples:
        record = dataclasses.asdict(example)
        digest.update(b"\0")
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode())
    return digest.hexdigest()
