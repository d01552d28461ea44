"""Test helpers: a tiny ChatML tokenizer and fake BIG-bench tarballs, built offline.

The tokenizer is a byte-level BPE without pre-tokenizer splits: with no merges every byte is one
token, so token positions in a formatted conversation can be checked by hand.
The special tokens are ``<|endoftext|>`` (id 0, also padding), ``<|im_start|>``
(1) and ``<|im_end|>`` (2, the end-of-turn and EOS token). Byte tokens follow
from id 3, sorted by their symbol in ``tokenizers``' byte-level alphabet.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BIGBENCH_TASKS_ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks"


def chatml_byte_tokenizer(
    merges: Sequence[tuple[str, str]] = (), *, chat_template: str = CHATML_TEMPLATE
):  # -> transformers.PreTrainedTokenizerFast
    """Return a PreTrainedTokenizerFast with one token per byte plus ``merges``.

    ``merges`` are pairs of byte-level symbols (``"Ċ"`` is the newline), e.g.
    ``[("Ċ", "H")]`` makes a newline followed by "H" one token, which the
    boundary checks of ``merit_jax.data.format`` must reject.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(alphabet):
        vocab[symbol] = len(vocab)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    model = models.BPE(vocab=vocab, merges=list(merges))
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=chat_template,
    )


def write_bigbench_tarball(
    path: str | Path,
    tasks: Mapping[str, Mapping[str, Any]],
    extra: Mapping[str, bytes] | None = None,
) -> Path:
    """Write a .tar.gz laid out like the bigbench sdist, with ``tasks`` as task.json files.

    ``tasks`` maps task names (e.g. ``"gem/e2e"``) to task.json contents;
    ``extra`` maps further member paths to their bytes.
    """
    path = Path(path)
    files = {
        f"{BIGBENCH_TASKS_ROOT}/{name}/task.json": json.dumps(data).encode()
        for name, data in tasks.items()
    }
    files["bigbench-1.0.0/setup.py"] = b"pass\n"
    files.update(extra or {})
    with tarfile.open(path, "w:gz") as archive:
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return path
