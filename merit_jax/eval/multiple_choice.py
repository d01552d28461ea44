"""Zero-shot log-likelihood multiple choice under the project's BIG-bench convention.

For every example and choice i:

* context = ``example.context`` (task prefix, input prefix, input, output
  prefix, each prefix only where task.json defines it); the choices are not
  shown in the context;
* continuation = ``" " + choice_i``. As lm-evaluation-harness (v0.4,
  ``_encode_pair``) does, trailing whitespace of the context moves to the
  front of the continuation. The context tokens are tokenize(context), and the
  continuation tokens are those of tokenize(context + continuation) after the
  first len(context tokens) tokens. The model reads the context tokens
  followed by the continuation tokens. No BOS is added, except that a context
  with no tokens at all starts with the tokenizer's BOS (or EOS) token, as the
  harness does, so that some position predicts the first continuation token;
* score_i = summed log-probability of the continuation tokens;
* acc = 1 when argmax_i score_i lies in the gold set (the choices with the
  maximal target score); acc_norm uses score_i / len(choice_i) in characters.
  np.argmax takes the first index on ties.

Each task evaluates its first n examples in file order, or n examples drawn
with a seed and kept in file order. The chance level, the expected accuracy
of a uniform random pick, is reported beside every score, because a model that
always picks one answer only tracks the label split.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from merit_jax.data.sampling import task_rng
from merit_jax.data.task import MultipleChoiceExample, MultipleChoiceTask
from merit_jax.eval.loglikelihood import LoglikelihoodRequest, score_requests
from merit_jax.models.decoder import Decoder

logger = logging.getLogger(__name__)

CHOICE_DELIMITER = " "


def move_trailing_whitespace(context: str, continuation: str) -> tuple[str, str]:
    """Move the trailing whitespace of ``context`` to the front of ``continuation``."""
    stripped = context.rstrip()
    return stripped, context[len(stripped) :] + continuation


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _start_token(tokenizer: Any) -> int:
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError(
        "a multiple-choice context is empty and the tokenizer has neither a BOS nor an EOS "
        "token to start it with; give the task a prefix or use a tokenizer with a BOS token"
    )


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Return (context tokens, continuation tokens) by the rule in the module doc."""
    context, continuation = move_trailing_whitespace(context, continuation)
    context_ids = _encode(tokenizer, context)
    whole_ids = _encode(tokenizer, context + continuation)
    continuation_ids = whole_ids[len(context_ids) :]
    if not context_ids:
        context_ids = [_start_token(tokenizer)]
    return context_ids, continuation_ids


def select_examples(
    task: MultipleChoiceTask, num_examples: int | None, *, seed: int | None = None
) -> tuple[int, ...]:
    """Return the indices of the evaluated examples, in file order.

    ``num_examples=None`` takes all. Otherwise the first ``num_examples``, or,
    with a ``seed``, that many drawn at random from the seed and the task name.
    """
    count = len(task.examples)
    if num_examples is None or num_examples >= count:
        return tuple(range(count))
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"num_examples={num_examples!r} must be a positive integer or None")
    if seed is None:
        return tuple(range(num_examples))
    drawn = task_rng(seed, task.name, "eval").permutation(count)[:num_examples]
    return tuple(int(i) for i in np.sort(drawn))


def choose(scores: Sequence[float] | np.ndarray, choices: Sequence[str]) -> tuple[int, int]:
    """Return the predicted choice by raw score and by score per character of the choice."""
    scores_c = np.asarray(scores, np.float64)
    lengths_c = np.array([len(choice) for choice in choices], np.float64)
    return int(np.argmax(scores_c)), int(np.argmax(scores_c / lengths_c))


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """Return the mean and its standard error, sample std (ddof=1) / sqrt(n).

    The standard error is None for fewer than two values.
    """
    array = np.asarray(values, np.float64)
    if array.size == 0:
        raise ValueError("cannot average an empty list of values")
    if array.size < 2:
        return float(array.mean()), None
    return float(array.mean()), float(array.std(ddof=1) / math.sqrt(array.size))


@dataclasses.dataclass(frozen=True)
class MultipleChoiceResult:
    """Scores of one task; ``chance`` is over the same evaluated examples."""

    task: str
    acc: float
    acc_stderr: float | None
    acc_norm: float
    acc_norm_stderr: float | None
    chance: float
    n: int  # evaluated examples
    num_requests: int  # (example, choice) pairs scored
    num_truncated: int  # requests whose context lost tokens on the left to fit max_length
    example_indices: tuple[int, ...]  # index of each evaluated example in the task
    choice_scores: tuple[tuple[float, ...], ...]  # summed log-probability of every choice
    predictions: tuple[int, ...]  # argmax choice per example
    predictions_norm: tuple[int, ...]  # argmax of score / len(choice) per example

    def summary(self) -> dict[str, Any]:
        """Return the task-level numbers, without per-example details."""
        return {
            "acc": self.acc,
            "acc_stderr": self.acc_stderr,
            "acc_norm": self.acc_norm,
            "acc_norm_stderr": self.acc_norm_stderr,
            "chance": self.chance,
            "n": self.n,
            "num_requests": self.num_requests,
            "num_truncated": self.num_truncated,
        }


def build_requests(
    tokenizer: Any, task: MultipleChoiceTask, example_indices: Sequence[int]
) -> list[LoglikelihoodRequest]:
    """Return one request per (example, choice), examples in order, then choices in order."""
    requests = []
    for index in example_indices:
        example = task.examples[index]
        for choice_index, choice in enumerate(example.choices):
            if not choice:
                raise ValueError(
                    f"task {task.name!r}, example {index}: choice {choice_index} is empty, so "
                    "acc_norm cannot divide its score by its length; drop the example"
                )
            context_ids, continuation_ids = encode_pair(
                tokenizer, example.context, CHOICE_DELIMITER + choice
            )
            if not continuation_ids:
                raise ValueError(
                    f"task {task.name!r}, example {index}: choice {choice!r} tokenizes to no "
                    "tokens after its context, so it cannot be scored"
                )
            requests.append(LoglikelihoodRequest(tuple(context_ids), tuple(continuation_ids)))
    return requests


def task_result(
    task: MultipleChoiceTask,
    example_indices: Sequence[int],
    scores: np.ndarray,
    truncated: np.ndarray,
) -> MultipleChoiceResult:
    """Aggregate per-request scores into the result of one task.

    ``scores`` and ``truncated`` are [num_requests], ordered as
    :func:`build_requests` orders them for ``example_indices``.
    """
    expected = sum(len(task.examples[i].choices) for i in example_indices)
    if len(scores) != expected or len(truncated) != expected:
        raise ValueError(
            f"task {task.name!r}: got {len(scores)} scores and {len(truncated)} truncation "
            f"flags for {expected} (example, choice) pairs"
        )
    examples: list[MultipleChoiceExample] = [task.examples[i] for i in example_indices]
    correct, correct_norm, predictions, predictions_norm, all_scores = [], [], [], [], []
    position = 0
    for example in examples:
        example_scores = scores[position : position + len(example.choices)]
        position += len(example.choices)
        prediction, prediction_norm = choose(example_scores, example.choices)
        gold = example.gold_indices
        correct.append(float(prediction in gold))
        correct_norm.append(float(prediction_norm in gold))
        predictions.append(prediction)
        predictions_norm.append(prediction_norm)
        all_scores.append(tuple(float(s) for s in example_scores))
    acc, acc_stderr = mean_and_stderr(correct)
    acc_norm, acc_norm_stderr = mean_and_stderr(correct_norm)
    chance = float(np.mean([len(ex.gold_indices) / len(ex.choices) for ex in examples]))
    return MultipleChoiceResult(
        task=task.name,
        acc=acc,
        acc_stderr=acc_stderr,
        acc_norm=acc_norm,
        acc_norm_stderr=acc_norm_stderr,
        chance=chance,
        n=len(examples),
        num_requests=len(scores),
        num_truncated=int(truncated.sum()),
        example_indices=tuple(example_indices),
        choice_scores=tuple(all_scores),
        predictions=tuple(predictions),
        predictions_norm=tuple(predictions_norm),
    )


def evaluate_multiple_choice(
    model: Decoder,
    tokenizer: Any,
    tasks: Sequence[MultipleChoiceTask],
    *,
    num_examples: int | None = None,
    seed: int | None = None,
    max_length: int = 1024,
    batch_tokens: int = 4096,
) -> dict[str, MultipleChoiceResult]:
    """Score ``tasks`` by log-likelihood; return one result per task name.

    The requests of all tasks run together, so the tasks share padded batches.
    See :func:`~merit_jax.eval.loglikelihood.score_requests` for
    ``max_length`` and ``batch_tokens``.
    """
    names = [task.name for task in tasks]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"multiple-choice task names must be unique, got duplicates {duplicates}")

    selections: list[tuple[MultipleChoiceTask, tuple[int, ...], int]] = []
    requests: list[LoglikelihoodRequest] = []
    for task in tasks:
        indices = select_examples(task, num_examples, seed=seed)
        task_requests = build_requests(tokenizer, task, indices)
        selections.append((task, indices, len(task_requests)))
        requests.extend(task_requests)

    scored = score_requests(model, requests, max_length=max_length, batch_tokens=batch_tokens)
    results: dict[str, MultipleChoiceResult] = {}
    start = 0
    for task, indices, count in selections:
        stop = start + count
        scores, truncated = scored.scores[start:stop], scored.truncated[start:stop]
        result = task_result(task, indices, scores, truncated)
        results[task.name] = result
        if result.num_truncated:
            logger.warning(
                "task %s: %d of %d requests lost context tokens to fit max_length=%d",
                task.name,
                result.num_truncated,
                count,
                max_length,
            )
        start = stop
    return results
