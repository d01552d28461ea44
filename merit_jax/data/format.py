"""Chat formatting and tokenization with a response-only loss mask.

An :class:`~merit_jax.data.task.Example` becomes the chat-template rendering of
the messages ``[system (optional)], user = example.user_message, assistant =
example.response``, tokenized without extra special tokens (the template
already writes any BOS it wants, as ``apply_chat_template(tokenize=True)`` does).

Loss-mask convention, shared with ``merit_jax.models.loss``: ``loss_mask[t]``
is True exactly for the *target tokens* that count, i.e. the tokens of the
assistant response **including the end-of-turn marker** the template writes
after it (``<|im_end|>`` for ChatML). Token t is predicted by the logits at
position t - 1, so ``loss_mask[0]`` is always False. The end-of-turn token is
trained because knowing when to stop is part of what instruction tuning
teaches. In responses of a few tokens it carries a large share of the loss,
and the conflict gradients at theta0 use this same loss. Text that the template
writes after the end-of-turn marker (ChatML's trailing newline) is dropped,
because it is never a target.

The boundary between prompt and response is found by tokenizing the
conversation three ways: the prompt with the generation prompt, the prompt
plus the response plus the end-of-turn marker, and the full conversation.
Each must be a token prefix of the next; a template or tokenizer that merges
tokens across the boundary raises :class:`ChatTemplateError` instead of
guessing.

Truncation never cuts the response: an over-long example loses tokens from
its input first (``truncation="middle"`` keeps its start and end,
``"left"`` keeps its end), then from its instruction; an example whose
response and template alone exceed ``max_length`` is skipped and counted.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from merit_jax.data.task import Example, Task

logger = logging.getLogger(__name__)

Truncation = Literal["middle", "left"]
TRUNCATION_MODES: tuple[str, ...] = ("middle", "left")


class ChatTemplateError(ValueError):
    """The chat template cannot be split into a prompt and a trainable response."""


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
    """One formatted example: token ids [T] and its loss mask [T] (see the module doc)."""

    tokens: np.ndarray  # int32 [T]
    loss_mask: np.ndarray  # bool [T]: token t is a response target (end-of-turn included)
    truncated: bool = False  # the prompt was shortened to fit max_length

    def __post_init__(self) -> None:
        tokens = np.asarray(self.tokens)
        mask = np.asarray(self.loss_mask)
        if tokens.ndim != 1 or mask.shape != tokens.shape:
            raise ValueError(
                f"tokens and loss_mask must be 1-D of the same length; got shapes "
                f"{tokens.shape} and {mask.shape}"
            )
        if tokens.size < 2:
            raise ValueError(f"a tokenized example needs at least 2 tokens, got {tokens.size}")
        if not np.issubdtype(tokens.dtype, np.integer):
            raise TypeError(f"tokens must be integers, got dtype {tokens.dtype}")
        mask = mask.astype(bool)
        if mask[0]:
            raise ValueError("loss_mask[0] is set, but no position predicts the first token")
        if not mask.any():
            raise ValueError("loss_mask has no target token; the example would teach nothing")
        object.__setattr__(self, "tokens", tokens.astype(np.int32))
        object.__setattr__(self, "loss_mask", mask)

    @property
    def length(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_targets(self) -> int:
        return int(self.loss_mask.sum())


@dataclasses.dataclass(frozen=True)
class TokenizedTask:
    """The tokenized examples of one task and what tokenization dropped or shortened."""

    name: str
    examples: tuple[TokenizedExample, ...]
    source_indices: tuple[int, ...]  # index in Task.examples of each tokenized example
    num_skipped: int  # examples whose response did not fit max_length
    num_truncated: int  # examples whose prompt was shortened

    @property
    def lengths(self) -> np.ndarray:
        """Token count of every example, int64 [num_examples]."""
        return np.array([example.length for example in self.examples], dtype=np.int64)

    @property
    def total_tokens(self) -> int:
        """Tokens of one pass over the examples (prompt and response tokens)."""
        return int(self.lengths.sum())


@dataclasses.dataclass(frozen=True)
class _Encoded:
    ids: list[int]  # prompt + response + end-of-turn marker
    response_start: int  # first response token


def build_messages(
    instruction: str, input_text: str | None, response: str, *, system: str | None = None
) -> list[dict[str, str]]:
    """Return the chat messages of one example: optional system, user, assistant."""
    user = instruction if input_text is None else f"{instruction}\n\n{input_text}"
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": user})
    messages.append({"role": "assistant", "content": response})
    return messages


def _render(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    if not isinstance(text, str):
        raise ChatTemplateError(
            f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str"
        )
    return text


def _encode_text(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _encode_conversation(
    tokenizer: Any, instruction: str, input_text: str | None, response: str, system: str | None
) -> _Encoded:
    messages = build_messages(instruction, input_text, response, system=system)
    prompt_text = _render(tokenizer, messages[:-1], add_generation_prompt=True)
    full_text = _render(tokenizer, messages, add_generation_prompt=False)
    if not full_text.startswith(prompt_text):
        raise ChatTemplateError(
            "the chat template renders the prompt differently when the assistant message "
            f"follows, so the response boundary is unknown.\nprompt: {prompt_text[-200:]!r}\n"
            f"full conversation: {full_text[: len(prompt_text) + 40][-240:]!r}\n"
            "Use a template whose generation prompt is a prefix of the full conversation."
        )
    rest = full_text[len(prompt_text) :]
    if not rest.startswith(response):
        raise ChatTemplateError(
            "the chat template changes the assistant text (for example by stripping "
            f"whitespace): expected it to start with {response[:80]!r}, got {rest[:80]!r}. "
            "Strip responses before formatting or use a template that keeps them verbatim."
        )
    end_marker = rest[len(response) :].rstrip()
    if not end_marker:
        raise ChatTemplateError(
            "the chat template writes no end-of-turn text after the assistant message, so the "
            "loss would not teach the model to stop; use a template with an end-of-turn token"
        )

    prompt_ids = _encode_text(tokenizer, prompt_text)
    through_ids = _encode_text(tokenizer, prompt_text + response + end_marker)
    full_ids = _encode_text(tokenizer, full_text)
    for shorter, longer, what in (
        (prompt_ids, through_ids, "prompt"),
        (through_ids, full_ids, "end-of-turn marker"),
    ):
        if longer[: len(shorter)] != shorter:
            mismatch = next(
                (i for i, (a, b) in enumerate(zip(shorter, longer, strict=False)) if a != b),
                min(len(shorter), len(longer)),
            )
            raise ChatTemplateError(
                f"tokenizing the conversation merges tokens across the {what} boundary at token "
                f"{mismatch} ({shorter[mismatch : mismatch + 3]} alone vs "
                f"{longer[mismatch : mismatch + 3]} in context), so the response tokens cannot be "
                "separated exactly. Use a template whose generation prompt and end-of-turn "
                "marker end in tokens that never merge with the text after them."
            )
    if len(through_ids) <= len(prompt_ids):
        raise ChatTemplateError(f"the response {response[:80]!r} tokenizes to no tokens")
    return _Encoded(ids=through_ids, response_start=len(prompt_ids))


def _shorten(tokenizer: Any, text: str, keep: int, truncation: Truncation) -> str:
    """Return ``text`` cut to about ``keep`` tokens: its end ("left") or its start and end."""
    ids = _encode_text(tokenizer, text)
    if truncation == "left":
        kept = ids[len(ids) - keep :] if keep > 0 else []
    else:
        head = (keep + 1) // 2
        tail = keep - head
        kept = ids[:head] + (ids[len(ids) - tail :] if tail > 0 else [])
    return tokenizer.decode(kept, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def tokenize_example(
    tokenizer: Any,
    example: Example,
    *,
    max_length: int,
    system: str | None = None,
    truncation: Truncation = "middle",
) -> TokenizedExample | None:
    """Format and tokenize one example; return None when its response cannot fit.

    ``tokenizer`` is a transformers tokenizer with a chat template. The result
    has at most ``max_length`` tokens. See the module doc for the loss mask and
    the truncation order.
    """
    if max_length < 2:
        raise ValueError(f"max_length={max_length} must be at least 2 tokens")
    if truncation not in TRUNCATION_MODES:
        raise ValueError(
            f"truncation={truncation!r} is invalid; expected one of {', '.join(TRUNCATION_MODES)}"
        )
    instruction, input_text, response = example.instruction, example.input, example.response
    encoded = _encode_conversation(tokenizer, instruction, input_text, response, system)
    truncated = False

    # Shorten the input, then the instruction, a few tokens at a time until the whole
    # conversation fits. Re-rendering after every cut keeps the template text and the
    # response boundary exact even when tokens merge differently at the cut.
    for field in ("input", "instruction"):
        previous_keep: int | None = None
        while len(encoded.ids) > max_length:
            text = input_text if field == "input" else instruction
            if text is None:
                break
            truncated = True
            overflow = len(encoded.ids) - max_length
            keep = len(_encode_text(tokenizer, text)) - overflow
            if previous_keep is not None:
                keep = min(keep, previous_keep - 1)
            previous_keep = keep
            if field == "input":
                input_text = _shorten(tokenizer, text, keep, truncation) if keep > 0 else None
                if input_text is not None and not input_text.strip():
                    input_text = None
            elif keep < 1:
                return None
            else:
                instruction = _shorten(tokenizer, text, keep, truncation)
            encoded = _encode_conversation(tokenizer, instruction, input_text, response, system)
            if field == "input" and input_text is None:
                break

    if len(encoded.ids) > max_length:
        return None
    tokens = np.asarray(encoded.ids, dtype=np.int32)
    loss_mask = np.zeros(tokens.shape, dtype=bool)
    loss_mask[encoded.response_start :] = True
    return TokenizedExample(tokens=tokens, loss_mask=loss_mask, truncated=truncated)


def tokenize_task(
    tokenizer: Any,
    task: Task,
    *,
    max_length: int,
    system: str | None = None,
    truncation: Truncation = "middle",
    indices: Sequence[int] | None = None,
) -> TokenizedTask:
    """Tokenize the examples of ``task`` (or those at ``indices``), skipping any that cannot fit.

    Raises ValueError when every example is skipped, naming the task and the
    response lengths, because an empty task would silently leave the mixture.
    """
    chosen = range(len(task.examples)) if indices is None else indices
    kept: list[TokenizedExample] = []
    kept_indices: list[int] = []
    skipped = 0
    for index in chosen:
        tokenized = tokenize_example(
            tokenizer,
            task.examples[index],
            max_length=max_length,
            system=system,
            truncation=truncation,
        )
        if tokenized is None:
            skipped += 1
            continue
        kept.append(tokenized)
        kept_indices.append(index)
    num_truncated = sum(example.truncated for example in kept)
    if skipped:
        logger.warning(
            "task %s: skipped %d of %d example(s) whose response does not fit max_length=%d",
            task.name,
            skipped,
            len(chosen),
            max_length,
        )
    if num_truncated:
        logger.info(
            "task %s: shortened the prompt of %d example(s) to fit max_length=%d",
            task.name,
            num_truncated,
            max_length,
        )
    if not kept:
        raise ValueError(
            f"task {task.name!r}: all {len(chosen)} examples were skipped because their response "
            f"and chat template alone exceed max_length={max_length}; raise max_length or drop "
            "the task"
        )
    return TokenizedTask(
        name=task.name,
        examples=tuple(kept),
        source_indices=tuple(kept_indices),
        num_skipped=skipped,
        num_truncated=num_truncated,
    )
