"""Tokenizers and chat formatting for Hugging Face model directories and GGUF files.

``load_tokenizer`` returns a transformers ``PreTrainedTokenizerFast`` without importing
PyTorch. For a GGUF file it rebuilds the tokenizer from the file's metadata with the
``tokenizers`` library. The byte-level BPE comes from ``tokenizer.ggml.tokens`` and
``tokenizer.ggml.merges``, and the pre-tokenizer is the one ``tokenizer.ggml.pre``
names. Control and user-defined tokens come from ``tokenizer.ggml.token_type``,
special tokens from the bos/eos/unk/pad ids, and the chat template from
``tokenizer.chat_template``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)
from transformers import PreTrainedTokenizerFast

from merit_jax.models.gguf import GGUF_MAGIC, read_gguf_metadata

logger = logging.getLogger(__name__)

CHAT_ROLES = ("system", "user", "assistant")

# llama.cpp's token types (gguf.TokenType).
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# Pre-tokenizer regexes as in the models' own tokenizer.json files (and llama.cpp's
# llama-vocab.cpp, which lists the same patterns per tokenizer.ggml.pre value).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split_then_bytes(pattern: str) -> Callable[[bool], pre_tokenizers.PreTokenizer]:
    def build(add_prefix_space: bool) -> pre_tokenizers.PreTokenizer:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False),
            ]
        )

    return build


def _gpt2_bytes(add_prefix_space: bool) -> pre_tokenizers.PreTokenizer:
    # ByteLevel's built-in split is GPT-2's regex:
    # 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)
    return pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)


def _digits_then_gpt2_bytes(add_prefix_space: bool) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True),
        ]
    )


class _PreTokenization(NamedTuple):
    build: Callable[[bool], pre_tokenizers.PreTokenizer]
    ignore_merges: bool = False  # a word found whole in the vocab skips BPE (Llama 3)
    nfc: bool = False  # NFC-normalize the text first (Qwen2)


# tokenizer.ggml.pre -> how the model's tokenizer.json splits text before BPE.
_PRE_TOKENIZERS: dict[str, _PreTokenization] = {
    "gpt2": _PreTokenization(_gpt2_bytes),
    "smollm": _PreTokenization(_digits_then_gpt2_bytes),
    "starcoder": _PreTokenization(_digits_then_gpt2_bytes),
    "llama-bpe": _PreTokenization(_split_then_bytes(_LLAMA3_SPLIT), ignore_merges=True),
    "qwen2": _PreTokenization(_split_then_bytes(_QWEN2_SPLIT), nfc=True),
}


class ChatEncoding(NamedTuple):
    """A conversation rendered by the chat template, and its token ids."""

    text: str
    token_ids: list[int]


def _is_gguf_file(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    with path.open("rb") as f:
        return f.read(4) == GGUF_MAGIC


def load_tokenizer(source: str | os.PathLike[str]) -> PreTrainedTokenizerFast:
    """Load the tokenizer of a GGUF file, a model directory or a Hugging Face hub id.

    A ``.gguf`` file (or a directory whose only tokenizer source is one ``.gguf``
    file) is rebuilt from its metadata. A directory with ``tokenizer.json``, or a hub
    id, loads through ``PreTrainedTokenizerFast.from_pretrained``, which also reads
    ``tokenizer_config.json`` and the chat template. A directory with only a slow
    tokenizer (``tokenizer.model``, ``vocab.json``) goes through ``AutoTokenizer``,
    which imports PyTorch when it is installed.
    """
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_file():
        if not _is_gguf_file(path):
            raise ValueError(
                f"{path} is neither a GGUF file nor a directory; pass a .gguf file, a model "
                "directory with tokenizer.json, or a Hugging Face hub id"
            )
        return tokenizer_from_gguf(path)
    if path.is_dir():
        return _load_from_directory(path)
    if path.suffix.lower() == ".gguf" or text.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"tokenizer source not found: {path}")
    try:
        return PreTrainedTokenizerFast.from_pretrained(text)
    except OSError as err:
        raise OSError(
            f"could not load a tokenizer for {text!r} from the Hugging Face hub: {err}. "
            "Without hub access, pass a local model directory or a GGUF file."
        ) from err


def _load_from_directory(path: Path) -> PreTrainedTokenizerFast:
    if (path / "tokenizer.json").is_file():
        # AutoTokenizer would import PyTorch (transformers 5.x loads it through its
        # config module). NOTE: a model-specific tokenizer class that changes
        # tokenizer.json's behavior in Python is not applied on this path.
        return PreTrainedTokenizerFast.from_pretrained(path)
    slow_files = ("tokenizer_config.json", "tokenizer.model", "vocab.json")
    if any((path / name).is_file() for name in slow_files):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        if not isinstance(tokenizer, PreTrainedTokenizerFast):
            raise ValueError(
                f"{path} holds a {type(tokenizer).__name__}, which has no fast (Rust) "
                "version; save the tokenizer with tokenizer.json"
            )
        return tokenizer
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return tokenizer_from_gguf(ggufs[0])
    found = sorted(p.name for p in path.iterdir())[:20]
    raise FileNotFoundError(
        f"no tokenizer in {path}: expected tokenizer.json (or tokenizer_config.json with "
        f"tokenizer.model / vocab.json), or exactly one .gguf file; found {found}"
    )


def tokenizer_from_gguf(path: str | os.PathLike[str]) -> PreTrainedTokenizerFast:
    """Rebuild the tokenizer stored in a GGUF file's metadata."""
    start = time.perf_counter()
    metadata = read_gguf_metadata(path)
    tokenizer = tokenizer_from_gguf_metadata(metadata, name_or_path=os.fspath(path))
    logger.info(
        "built tokenizer from %s: %d tokens, pre-tokenizer %r, in %.1f s",
        path,
        len(tokenizer),
        metadata.get("tokenizer.ggml.pre"),
        time.perf_counter() - start,
    )
    return tokenizer


def _build_bpe(metadata: Mapping[str, Any], tokens: list[str], source: str) -> Tokenizer:
    pre_name = metadata.get("tokenizer.ggml.pre", "gpt2")
    if pre_name not in _PRE_TOKENIZERS:
        raise ValueError(
            f"{source}: tokenizer.ggml.pre={pre_name!r} is not supported; supported: "
            f"{sorted(_PRE_TOKENIZERS)}. Load the tokenizer from the model's Hugging Face "
            "directory instead."
        )
    pre = _PRE_TOKENIZERS[pre_name]

    vocab: dict[str, int] = {}
    duplicates: list[str] = []
    for index, token in enumerate(tokens):
        if token in vocab:
            duplicates.append(f"{token!r} (ids {vocab[token]} and {index})")
        vocab.setdefault(token, index)
    if duplicates:
        raise ValueError(
            f"{source}: tokenizer.ggml.tokens lists the same token under several ids, which "
            f"a Hugging Face tokenizer cannot represent: {duplicates[:10]}"
        )

    merges: list[tuple[str, str]] = []
    for line in metadata.get("tokenizer.ggml.merges") or []:
        pair = line.split(" ")
        if len(pair) != 2:
            raise ValueError(
                f"{source}: tokenizer.ggml.merges entry {line!r} is not two tokens "
                "separated by one space"
            )
        merges.append((pair[0], pair[1]))

    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, ignore_merges=pre.ignore_merges, fuse_unk=False)
    )
    if pre.nfc:
        tokenizer.normalizer = normalizers.NFC()
    add_prefix_space = bool(metadata.get("tokenizer.ggml.add_space_prefix", False))
    tokenizer.pre_tokenizer = pre.build(add_prefix_space)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _special_token(metadata: Mapping[str, Any], key: str, tokens: list[str]) -> str | None:
    token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
    if token_id is None:
        return None
    if not 0 <= int(token_id) < len(tokens):
        raise ValueError(
            f"tokenizer.ggml.{key}_token_id={token_id} is outside the vocabulary of "
            f"{len(tokens)} tokens"
        )
    return tokens[int(token_id)]


def _post_processor(
    metadata: Mapping[str, Any], bos: str | None, eos: str | None, vocab: dict[str, int]
) -> processors.PostProcessor:
    """Wrap each sequence in BOS/EOS as ``tokenizer.ggml.add_bos/eos_token`` request."""
    start = bos if metadata.get("tokenizer.ggml.add_bos_token") else None
    end = eos if metadata.get("tokenizer.ggml.add_eos_token") else None
    if start is None and end is None:
        return processors.ByteLevel(trim_offsets=False)

    def wrap(sequence: str, type_id: int) -> str:
        pieces = [f"{token}:{type_id}" for token in (start,) if token is not None]
        pieces.append(f"{sequence}:{type_id}")
        pieces += [f"{token}:{type_id}" for token in (end,) if token is not None]
        return " ".join(pieces)

    special = {token: vocab[token] for token in (start, end) if token is not None}
    return processors.TemplateProcessing(
        single=wrap("$A", 0),
        pair=f"{wrap('$A', 0)} {wrap('$B', 1)}",
        special_tokens=list(special.items()),
    )


def tokenizer_from_gguf_metadata(
    metadata: Mapping[str, Any], *, name_or_path: str = ""
) -> PreTrainedTokenizerFast:
    """Build a ``PreTrainedTokenizerFast`` from decoded GGUF metadata.

    Supports ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE, used by Llama 3,
    Qwen2 and SmolLM2) and files that embed ``tokenizer.huggingface.json``.
    """
    source = name_or_path or "GGUF metadata"
    model = metadata.get("tokenizer.ggml.model")
    tokens = list(metadata.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise ValueError(f"{source} has no tokenizer.ggml.tokens; it stores no tokenizer")
    if "tokenizer.huggingface.json" in metadata:
        backend = Tokenizer.from_str(metadata["tokenizer.huggingface.json"])
    elif model == "gpt2":
        backend = _build_bpe(metadata, tokens, source)
    else:
        raise ValueError(
            f"{source}: tokenizer.ggml.model={model!r} is not supported; only 'gpt2' "
            "(byte-level BPE) can be rebuilt from GGUF metadata. Load the tokenizer from "
            "the model's Hugging Face directory instead."
        )

    token_types = list(metadata.get("tokenizer.ggml.token_type") or [])
    added = [
        AddedToken(token, special=kind == _TOKEN_TYPE_CONTROL, normalized=False)
        for token, kind in zip(tokens, token_types, strict=False)
        if kind in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)
    ]
    backend.add_tokens(added)

    bos = _special_token(metadata, "bos", tokens)
    eos = _special_token(metadata, "eos", tokens)
    unk = _special_token(metadata, "unknown", tokens)
    pad = _special_token(metadata, "padding", tokens)
    for token in (bos, eos, unk, pad):
        if token is not None and not any(t.content == token for t in added):
            # The HF tokenizer matches special tokens whole in text, as llama.cpp does.
            backend.add_special_tokens([AddedToken(token, special=True, normalized=False)])
    if "tokenizer.huggingface.json" not in metadata:
        backend.post_processor = _post_processor(metadata, bos, eos, backend.get_vocab())

    mismatched = [
        f"{token!r}: id {index} in the file, {backend.token_to_id(token)} in the tokenizer"
        for index, token in enumerate(tokens)
        if backend.token_to_id(token) != index
    ]
    if mismatched or backend.get_vocab_size() != len(tokens):
        raise ValueError(
            f"{source}: the rebuilt tokenizer does not reproduce the file's token ids "
            f"({backend.get_vocab_size()} tokens for {len(tokens)} in the file): {mismatched[:10]}"
        )

    context = metadata.get(f"{metadata.get('general.architecture')}.context_length")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad,
        chat_template=metadata.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
        model_max_length=int(context) if context else None,
        name_or_path=name_or_path,
    )


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(
            f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}"
        )
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"messages[{index}] must be a dict, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{index}] has role {role!r}; use one of {CHAT_ROLES}")
        if not isinstance(content, str):
            raise ValueError(
                f"messages[{index}] content must be a string, got {type(content).__name__}"
            )
        checked.append({"role": role, "content": content})
    return checked


def apply_chat_template(
    tokenizer: PreTrainedTokenizerFast,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool,
) -> ChatEncoding:
    """Render system/user/assistant turns with the tokenizer's chat template.

    The token ids are those of the rendered text with no special tokens added, as
    transformers' ``apply_chat_template(tokenize=True)`` produces them: a template that
    wants a BOS token writes it itself. ``add_generation_prompt`` appends the header
    of an assistant turn (ChatML: ``<|im_start|>assistant\\n``).
    """
    checked = _check_messages(messages)
    if not tokenizer.chat_template:
        raise ValueError(
            f"the tokenizer loaded from {tokenizer.name_or_path!r} has no chat template; "
            "use a checkpoint that ships one, or set tokenizer.chat_template to a Jinja "
            "template first"
        )
    text = tokenizer.apply_chat_template(
        checked, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    if not isinstance(text, str):
        raise TypeError(f"the chat template rendered {type(text).__name__}, expected str")
    token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ChatEncoding(text=text, token_ids=list(token_ids))


def token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    """Return the id of one whole token, such as ``"<|im_end|>"``.

    Raises KeyError when the vocabulary lacks it.
    """
    index = tokenizer.backend_tokenizer.token_to_id(token)
    if index is None:
        raise KeyError(f"token {token!r} is not in the vocabulary of {tokenizer.name_or_path!r}")
    return index
