"""Greedy-generation exact match for short-answer instruction tasks.

The prompt is the chat-template rendering of the example's user turn (after an
optional system turn) with the assistant header appended, as in training. The
model decodes greedily until an end-of-turn or EOS token or ``max_new_tokens``.
A prediction matches when the decoded reply, without special tokens and
surrounding whitespace, equals the reference response without surrounding
whitespace. Case and inner whitespace count.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from merit_jax.data.task import Example
from merit_jax.eval.multiple_choice import mean_and_stderr
from merit_jax.models.decoder import Decoder
from merit_jax.models.generate import generate
from merit_jax.models.tokenizer import apply_chat_template

logger = logging.getLogger(__name__)

END_OF_TURN_TOKEN = "<|im_end|>"


@dataclasses.dataclass(frozen=True)
class ExactMatchResult:
    """Exact-match accuracy of one task."""

    task: str
    exact_match: float
    exact_match_stderr: float | None
    n: int
    num_truncated: int  # prompts that lost tokens on the left to fit max_prompt_length
    predictions: tuple[str, ...]

    def summary(self) -> dict[str, Any]:
        """Return the task-level numbers, without the predictions."""
        return {
            "exact_match": self.exact_match,
            "exact_match_stderr": self.exact_match_stderr,
            "n": self.n,
            "num_truncated": self.num_truncated,
        }


def stop_token_ids(model: Decoder, tokenizer: Any) -> list[int]:
    """Return the config's EOS ids, the tokenizer's EOS id and ChatML's end-of-turn id."""
    ids = set(model.config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    end_of_turn = tokenizer.backend_tokenizer.token_to_id(END_OF_TURN_TOKEN)
    if end_of_turn is not None:
        ids.add(int(end_of_turn))
    if not ids:
        raise ValueError(
            "neither the model config nor the tokenizer defines an EOS token, so generation "
            "cannot stop early; set eos_token_id in the model config"
        )
    return sorted(ids)


def is_exact_match(prediction: str, reference: str) -> bool:
    """Return whether the two texts are equal after stripping surrounding whitespace."""
    return prediction.strip() == reference.strip()


def evaluate_exact_match(
    model: Decoder,
    tokenizer: Any,
    tasks: Mapping[str, Sequence[Example]],
    *,
    max_new_tokens: int = 32,
    max_prompt_length: int = 1024,
    batch_size: int = 16,
    system: str | None = None,
) -> dict[str, ExactMatchResult]:
    """Generate greedily for every example of ``tasks`` and score exact match per task.

    ``tasks`` maps task names to examples. A prompt longer than
    ``max_prompt_length`` tokens keeps its last ``max_prompt_length`` tokens and
    is counted as truncated.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be a positive integer")
    if max_prompt_length < 1:
        raise ValueError(f"max_prompt_length={max_prompt_length} must be a positive integer")
    eos_ids = stop_token_ids(model, tokenizer)
    results = {}
    for name, examples in tasks.items():
        if not examples:
            raise ValueError(f"task {name!r} has no examples for exact-match evaluation")
        start = time.perf_counter()
        prompts, num_truncated = [], 0
        for example in examples:
            messages = [] if system is None else [{"role": "system", "content": system}]
            messages.append({"role": "user", "content": example.user_message})
            ids = apply_chat_template(tokenizer, messages, add_generation_prompt=True).token_ids
            if len(ids) > max_prompt_length:
                ids = ids[len(ids) - max_prompt_length :]
                num_truncated += 1
            prompts.append(ids)

        predictions: list[str] = []
        for first in range(0, len(prompts), batch_size):
            chunk = prompts[first : first + batch_size]
            # Pad the last chunk to batch_size rows (with copies of a prompt) so every
            # chunk reuses one compiled shape.
            padded = chunk + [chunk[0]] * (batch_size - len(chunk))
            replies = generate(
                model, padded, max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=0
            )
            for reply in replies[: len(chunk)]:
                predictions.append(tokenizer.decode(reply, skip_special_tokens=True))

        matches = [
            float(is_exact_match(prediction, example.response))
            for prediction, example in zip(predictions, examples, strict=True)
        ]
        exact_match, stderr = mean_and_stderr(matches)
        results[name] = ExactMatchResult(
            task=name,
            exact_match=exact_match,
            exact_match_stderr=stderr,
            n=len(examples),
            num_truncated=num_truncated,
            predictions=tuple(predictions),
        )
        logger.info(
            "exact match of %s: %.3f over %d examples in %.1f s",
            name,
            exact_match,
            len(examples),
            time.perf_counter() - start,
        )
    return results
