"""Chat formatting, the response-only loss mask and truncation, on a byte-level ChatML tokenizer."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from merit_jax.data.format import (
    ChatTemplateError,
    TokenizedExample,
    build_messages,
    tokenize_example,
    tokenize_task,
)
from merit_jax.data.task import Example, Task
from merit_jax.data.testing import CHATML_TEMPLATE, chatml_byte_tokenizer

IM_START, IM_END = 1, 2
NEWLINE = 201  # byte-level symbol "Ċ"


def byte_ids(text: str) -> list[int]:
    """Token ids of printable ASCII text and newlines in the test tokenizer, computed by hand."""
    ids = []
    for char in text:
        if char == "\n":
            ids.append(NEWLINE)
        else:
            assert 33 <= ord(char) <= 126, char
            ids.append(ord(char) - 30)  # ids 3.. follow the 94 printable ASCII symbols in order
    return ids


@pytest.fixture(scope="module")
def tokenizer():
    return chatml_byte_tokenizer()


def test_byte_ids_match_tokenizer(tokenizer):
    text = "user\nHi~!"
    assert tokenizer.encode(text, add_special_tokens=False) == byte_ids(text)


def test_chatml_loss_mask_hand_checked(tokenizer):
    example = Example(instruction="Hi", response="Yo")
    result = tokenize_example(tokenizer, example, max_length=64, system="S")
    assert result is not None

    expected = (
        [IM_START] + byte_ids("system\nS") + [IM_END, NEWLINE]
        + [IM_START] + byte_ids("user\nHi") + [IM_END, NEWLINE]
        + [IM_START] + byte_ids("assistant\nYo") + [IM_END]
    )  # fmt: skip
    assert result.tokens.tolist() == expected
    assert result.tokens.dtype == np.int32
    # Positions 0-10 system turn, 11-20 user turn, 21-31 "<|im_start|>assistant\n",
    # 32-33 "Yo", 34 "<|im_end|>". The trailing newline after <|im_end|> is dropped.
    assert len(expected) == 35
    assert np.flatnonzero(result.loss_mask).tolist() == [32, 33, 34]
    assert result.tokens[34] == IM_END
    assert not result.truncated


def test_input_joined_with_blank_line(tokenizer):
    example = Example(instruction="Add", input="1+1", response="2")
    result = tokenize_example(tokenizer, example, max_length=64)
    assert result is not None
    user_turn = [IM_START] + byte_ids("user\nAdd\n\n1+1") + [IM_END, NEWLINE]
    assistant_turn = [IM_START] + byte_ids("assistant\n2") + [IM_END]
    assert result.tokens.tolist() == user_turn + assistant_turn
    assert np.flatnonzero(result.loss_mask).tolist() == [
        len(result.tokens) - 2,
        len(result.tokens) - 1,
    ]


def test_build_messages_roles():
    messages = build_messages("Do it", "now", "done", system="Be brief")
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[1]["content"] == "Do it\n\nnow"
    assert build_messages("Do it", None, "done")[0] == {"role": "user", "content": "Do it"}


def _response_text(tokenizer, result: TokenizedExample) -> str:
    return tokenizer.decode(result.tokens[result.loss_mask].tolist())


def _minimal_length(tokenizer, instruction_char: str, response: str) -> int:
    text = (
        f"<|im_start|>user\n{instruction_char}<|im_end|>\n"
        f"<|im_start|>assistant\n{response}<|im_end|>"
    )
    return len(tokenizer.encode(text, add_special_tokens=False))


@pytest.mark.parametrize("truncation", ["middle", "left"])
def test_truncation_never_drops_response(tokenizer, truncation):
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    for trial in range(40):
        instruction = "Task " + "".join(rng.choice(letters, size=int(rng.integers(1, 40))))
        input_text = "".join(rng.choice(letters, size=int(rng.integers(0, 80)))) or None
        response = "R" + "".join(rng.choice(letters, size=int(rng.integers(0, 30))))
        example = Example(instruction=instruction, input=input_text, response=response)
        full = tokenize_example(tokenizer, example, max_length=10_000)
        assert full is not None
        max_length = int(rng.integers(20, full.length + 5))

        result = tokenize_example(tokenizer, example, max_length=max_length, truncation=truncation)

        first_char = instruction[0] if truncation == "middle" else instruction[-1]
        if _minimal_length(tokenizer, first_char, response) > max_length:
            assert result is None, (trial, max_length)
            continue
        assert result is not None, (trial, max_length)
        assert result.length <= max_length
        assert _response_text(tokenizer, result) == response + "<|im_end|>"
        assert result.truncated == (full.length > max_length)
        if full.length <= max_length:
            assert result.tokens.tolist() == full.tokens.tolist()


def test_middle_truncation_keeps_start_and_end(tokenizer):
    example = Example(instruction="Sum", input="A" * 30 + "m" * 30 + "Z" * 30, response="ok")
    full = tokenize_example(tokenizer, example, max_length=1000)
    assert full is not None
    result = tokenize_example(tokenizer, example, max_length=full.length - 40)
    assert result is not None
    assert result.length == full.length - 40
    text = tokenizer.decode(result.tokens.tolist())
    user = text.split("\n\n", 1)[1].split("<|im_end|>")[0]
    assert user.startswith("A" * 25)
    assert user.endswith("Z" * 25)
    assert len(user) == 50


def test_left_truncation_keeps_end(tokenizer):
    example = Example(instruction="Sum", input="A" * 30 + "Z" * 30, response="ok")
    full = tokenize_example(tokenizer, example, max_length=1000)
    assert full is not None
    result = tokenize_example(tokenizer, example, max_length=full.length - 40, truncation="left")
    assert result is not None
    user = tokenizer.decode(result.tokens.tolist()).split("\n\n", 1)[1].split("<|im_end|>")[0]
    assert user == "Z" * 20


def test_instruction_truncated_after_input_dropped(tokenizer):
    example = Example(instruction="I" * 40, input="x" * 10, response="ok")
    full = tokenize_example(tokenizer, example, max_length=1000)
    assert full is not None
    result = tokenize_example(tokenizer, example, max_length=full.length - 30)
    assert result is not None
    text = tokenizer.decode(result.tokens.tolist())
    assert "x" not in text.split("assistant")[0].replace("<|im_start|>", "")
    assert text.count("I") == 40 - 30 + 12  # 12 input tokens ("\n\n" + 10) went first
    assert _response_text(tokenizer, result) == "ok<|im_end|>"


def test_response_too_long_skipped(tokenizer):
    example = Example(instruction="Q", response="r" * 50)
    assert tokenize_example(tokenizer, example, max_length=40) is None


def test_tokenize_task_counts_skips(tokenizer, caplog):
    examples = (
        Example(instruction="Q", response="short"),
        Example(instruction="Q", response="r" * 80),
        Example(instruction="Q", input="i" * 80, response="fine"),
    )
    task = Task(name="mixed", source="test", examples=examples)
    with caplog.at_level(logging.WARNING):
        result = tokenize_task(tokenizer, task, max_length=60)
    assert result.num_skipped == 1
    assert result.num_truncated == 1
    assert result.source_indices == (0, 2)
    assert result.total_tokens == sum(example.length for example in result.examples)
    assert "skipped 1 of 3" in caplog.text


def test_tokenize_task_all_skipped_raises(tokenizer):
    task = Task(name="long", source="test", examples=(Example(instruction="Q", response="r" * 80),))
    with pytest.raises(ValueError, match="'long'.*max_length=30"):
        tokenize_task(tokenizer, task, max_length=30)


def test_boundary_merge_raises():
    merging = chatml_byte_tokenizer(merges=[("Ċ", "H")])
    with pytest.raises(ChatTemplateError, match="merges tokens across the prompt boundary"):
        tokenize_example(merging, Example(instruction="x", response="Hi"), max_length=64)


def test_template_without_end_marker_raises():
    template = CHATML_TEMPLATE.replace(
        "message['content'] + '<|im_end|>' + '\n'",
        "message['content'] + ('' if message['role'] == 'assistant' else '<|im_end|>\n')",
    )
    assert template != CHATML_TEMPLATE
    tokenizer = chatml_byte_tokenizer(chat_template=template)
    with pytest.raises(ChatTemplateError, match="no end-of-turn"):
        tokenize_example(tokenizer, Example(instruction="x", response="y"), max_length=64)


def test_template_stripping_response_raises():
    template = CHATML_TEMPLATE.replace("message['content']", "(message['content'] | trim)")
    tokenizer = chatml_byte_tokenizer(chat_template=template)
    with pytest.raises(ChatTemplateError, match="changes the assistant text"):
        tokenize_example(tokenizer, Example(instruction="x", response=" y"), max_length=64)


def test_template_with_different_generation_prompt_raises():
    template = CHATML_TEMPLATE.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant\n\n'")
    tokenizer = chatml_byte_tokenizer(chat_template=template)
    with pytest.raises(ChatTemplateError, match="renders the prompt differently"):
        tokenize_example(tokenizer, Example(instruction="x", response="y"), max_length=64)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"max_length": 1}, "max_length=1"), ({"max_length": 64, "truncation": "right"}, "right")],
)
def test_bad_arguments_raise(tokenizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tokenize_example(tokenizer, Example(instruction="x", response="y"), **kwargs)


def test_tokenized_example_validation():
    with pytest.raises(ValueError, match="loss_mask\\[0\\]"):
        TokenizedExample(tokens=np.array([1, 2, 3]), loss_mask=np.array([True, True, False]))
    with pytest.raises(ValueError, match="no target"):
        TokenizedExample(tokens=np.array([1, 2, 3]), loss_mask=np.zeros(3, bool))
    with pytest.raises(ValueError, match="same length"):
        TokenizedExample(tokens=np.array([1, 2, 3]), loss_mask=np.array([False, True]))


@pytest.mark.real
def test_real_smollm2_chatml_mask(real_gguf):
    from merit_jax.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(real_gguf)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    example = Example(instruction="What is 12 plus 34?", response="46")
    result = tokenize_example(tokenizer, example, max_length=512)
    assert result is not None

    assert result.tokens[-1] == im_end
    assert _response_text(tokenizer, result) == "46<|im_end|>"
    # SmolLM2 splits digits: "4", "6", then the end-of-turn token.
    assert result.num_targets == 3
    prompt = tokenizer.decode(result.tokens[~result.loss_mask].tolist())
    assert prompt.endswith(
        "<|im_start|>user\nWhat is 12 plus 34?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompt.startswith("<|im_start|>system\n")  # the template's default system prompt
