"""Tokenizers from GGUF metadata and model directories, and chat formatting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from merit_jax.models.tokenizer import (
    apply_chat_template,
    load_tokenizer,
    token_id,
    tokenizer_from_gguf_metadata,
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog 12 times in 2024.",
    "def add(a, b):\n    return a + b  # sum\n",
    "Café au lait, naïve résumé, 東京タワー, emoji 🎉🚀.",
    "Numbers 0123456789 and 3.14159, tabs\tand  double  spaces.",
] * 20
SAMPLES = [
    "Hello, world!",
    "Prices rose 12.5% in 2023 (from 1,024 to 1,152).",
    "naïve café — 日本語のテキスト and 中文 😀👍🏽",
    "for i in range(10):\n\tprint(i)  \n\n    x = {'a': [1, 2]}",
    "  leading and trailing spaces  ",
    "<|im_start|>user\nHi<|im_end|>\n",
    "",
]
CONVERSATION = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hi"},
]


def train_tiny_tokenizer() -> Tokenizer:
    """A byte-level BPE with SmolLM2's pre-tokenizer (individual digits, then GPT-2 split)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def gguf_tokenizer_metadata(tokenizer: Tokenizer, **overrides: Any) -> dict[str, Any]:
    """The tokenizer fields llama.cpp's converter writes for a byte-level BPE."""
    vocab = tokenizer.get_vocab()
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    metadata: dict[str, Any] = {
        "general.architecture": "llama",
        "llama.context_length": 512,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if token in SPECIAL_TOKENS else 1 for token in tokens],
        "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in merges],
        "tokenizer.ggml.bos_token_id": vocab["<|im_start|>"],
        "tokenizer.ggml.eos_token_id": vocab["<|im_end|>"],
        "tokenizer.ggml.unknown_token_id": vocab["<|endoftext|>"],
        "tokenizer.ggml.padding_token_id": vocab["<|im_end|>"],
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHATML,
    }
    metadata.update(overrides)
    return metadata


def write_tokenizer_gguf(path: Path, metadata: dict[str, Any]) -> Path:
    writer = gguf.GGUFWriter(path, metadata["general.architecture"])
    writer.add_context_length(metadata["llama.context_length"])
    writer.add_tokenizer_model(metadata["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(metadata["tokenizer.ggml.pre"])
    writer.add_token_list(metadata["tokenizer.ggml.tokens"])
    writer.add_token_types(metadata["tokenizer.ggml.token_type"])
    writer.add_token_merges(metadata["tokenizer.ggml.merges"])
    writer.add_bos_token_id(metadata["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(metadata["tokenizer.ggml.eos_token_id"])
    writer.add_unk_token_id(metadata["tokenizer.ggml.unknown_token_id"])
    writer.add_pad_token_id(metadata["tokenizer.ggml.padding_token_id"])
    writer.add_add_bos_token(metadata["tokenizer.ggml.add_bos_token"])
    writer.add_chat_template(metadata["tokenizer.chat_template"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny() -> Tokenizer:
    return train_tiny_tokenizer()


@pytest.fixture
def tiny_gguf(tmp_path: Path, tiny: Tokenizer) -> Path:
    return write_tokenizer_gguf(tmp_path / "tok.gguf", gguf_tokenizer_metadata(tiny))


@pytest.fixture
def tiny_dir(tmp_path: Path, tiny: Tokenizer) -> Path:
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tiny,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
        chat_template=CHATML,
    )
    wrapped.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


# --- tiny tokenizers ---------------------------------------------------------------


def test_gguf_tokenizer_matches_source(tiny_gguf: Path, tiny: Tokenizer) -> None:
    tokenizer = load_tokenizer(tiny_gguf)

    for text in SAMPLES:
        expected = tiny.encode(text, add_special_tokens=False).ids
        assert tokenizer.encode(text, add_special_tokens=False) == expected, text
        assert tokenizer.encode(text) == expected, text  # no BOS: add_bos_token is False
        assert tokenizer.decode(expected) == text, text
    assert len(tokenizer) == tiny.get_vocab_size()


def test_gguf_tokenizer_special_tokens(tiny_gguf: Path, tiny: Tokenizer) -> None:
    tokenizer = load_tokenizer(tiny_gguf)
    vocab = tiny.get_vocab()

    assert tokenizer.bos_token == "<|im_start|>"
    assert tokenizer.eos_token_id == vocab["<|im_end|>"]
    assert tokenizer.unk_token_id == vocab["<|endoftext|>"]
    assert tokenizer.pad_token_id == vocab["<|im_end|>"]
    assert token_id(tokenizer, "<|im_end|>") == vocab["<|im_end|>"]
    assert tokenizer.model_max_length == 512
    ids = tokenizer.encode("a<|im_end|>b")
    assert ids.count(vocab["<|im_end|>"]) == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab"
    with pytest.raises(KeyError, match="<not_a_token>"):
        token_id(tokenizer, "<not_a_token>")


def test_gguf_add_bos_token(tiny: Tokenizer) -> None:
    tokenizer = tokenizer_from_gguf_metadata(
        gguf_tokenizer_metadata(tiny, **{"tokenizer.ggml.add_bos_token": True})
    )
    bos = tiny.get_vocab()["<|im_start|>"]
    plain = tiny.encode("Hello", add_special_tokens=False).ids

    assert tokenizer.encode("Hello") == [bos, *plain]
    assert tokenizer.encode("Hello", add_special_tokens=False) == plain

    both = tokenizer_from_gguf_metadata(
        gguf_tokenizer_metadata(
            tiny, **{"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True}
        )
    )
    eos = tiny.get_vocab()["<|im_end|>"]
    assert both.encode("Hello") == [bos, *plain, eos]
    assert both.encode("Hello", "Hi") == [bos, *plain, eos, bos, *tiny.encode("Hi").ids, eos]


@pytest.mark.parametrize(
    ("pre", "text", "pieces"),
    [
        ("smollm", "ab 12345", ["ab", "Ġ", "1", "2", "3", "4", "5"]),
        ("gpt2", "ab 12345", ["ab", "Ġ12345"]),
        ("llama-bpe", "ab 12345", ["ab", "Ġ", "123", "45"]),
        ("qwen2", "ab 12345", ["ab", "Ġ", "1", "2", "3", "4", "5"]),
        ("llama-bpe", "I'M here\n\n x", ["I", "'M", "Ġhere", "ĊĊ", "Ġx"]),
    ],
)
def test_pre_tokenizer_per_gguf_pre(
    tiny: Tokenizer, pre: str, text: str, pieces: list[str]
) -> None:
    tokenizer = tokenizer_from_gguf_metadata(
        gguf_tokenizer_metadata(tiny, **{"tokenizer.ggml.pre": pre})
    )
    split = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
    assert [piece for piece, _ in split] == pieces


def test_unsupported_pre_tokenizer_raises(tiny: Tokenizer) -> None:
    metadata = gguf_tokenizer_metadata(tiny, **{"tokenizer.ggml.pre": "deepseek-llm"})
    with pytest.raises(ValueError, match="'deepseek-llm' is not supported") as info:
        tokenizer_from_gguf_metadata(metadata)
    assert "smollm" in str(info.value)


def test_sentencepiece_gguf_rejected(tiny: Tokenizer) -> None:
    metadata = gguf_tokenizer_metadata(tiny, **{"tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match="tokenizer.ggml.model='llama' is not supported"):
        tokenizer_from_gguf_metadata(metadata)


def test_duplicate_tokens_rejected(tiny: Tokenizer) -> None:
    metadata = gguf_tokenizer_metadata(tiny)
    tokens = list(metadata["tokenizer.ggml.tokens"])
    tokens[-1] = tokens[-2]
    with pytest.raises(ValueError, match="same token under several ids"):
        tokenizer_from_gguf_metadata({**metadata, "tokenizer.ggml.tokens": tokens})


def test_embedded_huggingface_json_used(tiny: Tokenizer) -> None:
    metadata = gguf_tokenizer_metadata(
        tiny,
        **{"tokenizer.ggml.model": "llama", "tokenizer.huggingface.json": tiny.to_str()},
    )
    tokenizer = tokenizer_from_gguf_metadata(metadata)
    for text in SAMPLES:
        assert tokenizer.encode(text) == tiny.encode(text).ids, text
    assert tokenizer.eos_token == "<|im_end|>"


def test_directory_tokenizer_loads(tiny_dir: Path, tiny: Tokenizer) -> None:
    from transformers import AutoTokenizer

    tokenizer = load_tokenizer(tiny_dir)
    reference = AutoTokenizer.from_pretrained(tiny_dir)

    for text in SAMPLES:
        assert tokenizer.encode(text) == reference.encode(text), text
        assert tokenizer.encode(text) == tiny.encode(text).ids, text
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_template == CHATML


def test_directory_with_one_gguf(tmp_path: Path, tiny: Tokenizer) -> None:
    write_tokenizer_gguf(tmp_path / "only.gguf", gguf_tokenizer_metadata(tiny))
    assert load_tokenizer(tmp_path).encode("Hello") == tiny.encode("Hello").ids


def test_tokenizer_path_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        load_tokenizer(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        load_tokenizer(tmp_path)
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello")
    with pytest.raises(ValueError, match="neither a GGUF file nor a directory"):
        load_tokenizer(text_file)


def test_tokenizer_loads_without_torch(tiny_gguf: Path, tiny_dir: Path) -> None:
    script = (
        "import sys\n"
        "from merit_jax.models.tokenizer import apply_chat_template, load_tokenizer\n"
        f"for source in ({str(tiny_gguf)!r}, {str(tiny_dir)!r}):\n"
        "    tokenizer = load_tokenizer(source)\n"
        "    apply_chat_template(tokenizer, [{'role': 'user', 'content': 'x'}],\n"
        "                        add_generation_prompt=True)\n"
        "loaded = sorted(m for m in ('torch', 'jax') if m in sys.modules)\n"
        "print(loaded)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


# --- chat formatting ---------------------------------------------------------------


def test_chat_template_chatml(tiny_gguf: Path, tiny: Tokenizer) -> None:
    tokenizer = load_tokenizer(tiny_gguf)
    encoding = apply_chat_template(tokenizer, CONVERSATION, add_generation_prompt=True)

    expected = (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert encoding.text == expected
    assert encoding.token_ids == tiny.encode(expected, add_special_tokens=False).ids
    text, ids = apply_chat_template(tokenizer, CONVERSATION, add_generation_prompt=False)
    assert text == expected.removesuffix("<|im_start|>assistant\n")
    assert ids == encoding.token_ids[: len(ids)]


def test_chat_template_missing_raises(tiny: Tokenizer) -> None:
    metadata = gguf_tokenizer_metadata(tiny)
    del metadata["tokenizer.chat_template"]
    tokenizer = tokenizer_from_gguf_metadata(metadata, name_or_path="plain.gguf")
    with pytest.raises(ValueError, match="'plain.gguf' has no chat template"):
        apply_chat_template(tokenizer, CONVERSATION, add_generation_prompt=True)


@pytest.mark.parametrize(
    ("messages", "error", "match"),
    [
        ([{"role": "tool", "content": "x"}], ValueError, "messages\\[0\\] has role 'tool'"),
        ([{"role": "user", "content": 3}], ValueError, "content must be a string"),
        (["hello"], TypeError, "messages\\[0\\] must be a dict"),
        ("hello", TypeError, "messages must be a list"),
    ],
)
def test_chat_messages_validated(
    tiny_gguf: Path, messages: Any, error: type[Exception], match: str
) -> None:
    tokenizer = load_tokenizer(tiny_gguf)
    with pytest.raises(error, match=match):
        apply_chat_template(tokenizer, messages, add_generation_prompt=True)


# --- the real SmolLM2 tokenizer ----------------------------------------------------

REAL_SAMPLES = [
    *SAMPLES,
    "Ünïcödé àccénts: façade, jalapeño, Straße, ÆØÅ æøå",
    "CJK: 你好，世界！こんにちは世界 안녕하세요",
    "Emoji: 👩‍👩‍👧‍👦 🇫🇷 ❤️ 🤖",
    "Digits: 3.14159265358979 1,000,000 2024-06-01 0x1F",
    "class Foo:\n    def bar(self) -> int:\n        return 42\n\n\n# end\r\n",
    "Mixed\u00a0nbsp and zero\u200bwidth and trailing whitespace \t \n",
    "<|im_start|>system\nYou are a helpful AI.<|im_end|>\n<|endoftext|>",
]


@pytest.fixture(scope="module")
def smollm2_tokenizer(real_gguf: Path) -> PreTrainedTokenizerFast:
    return load_tokenizer(real_gguf)


@pytest.fixture(scope="module")
def transformers_reference(real_gguf: Path) -> Any:
    # transformers' own conversion of the GGUF tokenizer is the independent reference.
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_gguf.parent, gguf_file=real_gguf.name)


@pytest.mark.real
def test_real_round_trip_exact(smollm2_tokenizer: PreTrainedTokenizerFast) -> None:
    for text in REAL_SAMPLES:
        ids = smollm2_tokenizer.encode(text, add_special_tokens=False)
        assert smollm2_tokenizer.decode(ids) == text, text


@pytest.mark.real
def test_real_ids_match_transformers(
    smollm2_tokenizer: PreTrainedTokenizerFast, transformers_reference: Any
) -> None:
    for text in REAL_SAMPLES:
        assert smollm2_tokenizer.encode(text) == transformers_reference.encode(text), text
    assert len(smollm2_tokenizer) == len(transformers_reference) == 49152


@pytest.mark.real
def test_real_digits_split_individually(smollm2_tokenizer: PreTrainedTokenizerFast) -> None:
    ids = smollm2_tokenizer.encode("2024", add_special_tokens=False)
    assert smollm2_tokenizer.convert_ids_to_tokens(ids) == ["2", "0", "2", "4"]


@pytest.mark.real
def test_real_special_ids(smollm2_tokenizer: PreTrainedTokenizerFast) -> None:
    assert token_id(smollm2_tokenizer, "<|endoftext|>") == 0
    assert token_id(smollm2_tokenizer, "<|im_start|>") == 1
    assert token_id(smollm2_tokenizer, "<|im_end|>") == 2
    assert smollm2_tokenizer.eos_token == "<|im_end|>"
    assert smollm2_tokenizer.eos_token_id == 2
    assert smollm2_tokenizer.bos_token_id == 1
    assert smollm2_tokenizer.pad_token_id == 2
    assert smollm2_tokenizer.encode("Hi") == smollm2_tokenizer.encode(
        "Hi", add_special_tokens=False
    )  # SmolLM2 adds no BOS


@pytest.mark.real
def test_real_chat_matches_transformers(
    smollm2_tokenizer: PreTrainedTokenizerFast, transformers_reference: Any
) -> None:
    conversations = [
        CONVERSATION,
        [{"role": "user", "content": "What is 2 + 2?"}],  # the template adds a system turn
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of 日本?"},
        ],
    ]
    assert smollm2_tokenizer.chat_template == transformers_reference.chat_template
    for messages in conversations:
        for add_generation_prompt in (True, False):
            text, ids = apply_chat_template(
                smollm2_tokenizer, messages, add_generation_prompt=add_generation_prompt
            )
            expected_text = transformers_reference.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            expected_ids = transformers_reference.encode(expected_text, add_special_tokens=False)
            assert text == expected_text
            assert ids == expected_ids


@pytest.mark.real
def test_real_chatml_string(smollm2_tokenizer: PreTrainedTokenizerFast) -> None:
    text, ids = apply_chat_template(smollm2_tokenizer, CONVERSATION, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ids[0] == 1
    assert ids.count(1) == 3  # three <|im_start|>
    assert ids.count(2) == 2  # two <|im_end|>
