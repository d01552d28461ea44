"""Load a pretrained decoder (and its tokenizer) from any supported reference.

A reference is one of:

- a registry name such as ``"smollm2-135m-instruct"`` (a GGUF file in the
  merit-jax cache, fetched on first use);
- a local ``.gguf`` file;
- a local Hugging Face model directory (config.json plus safetensors);
- a Hugging Face hub id such as ``"HuggingFaceTB/SmolLM2-135M-Instruct"``,
  downloaded with ``huggingface_hub.snapshot_download`` (json, safetensors and
  tokenizer files only, never pickle weights).

``Pretrained.weights_sha256`` identifies the weights by content, so a plan can
record which theta0 its gradients were taken at.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from merit_jax import assets
from merit_jax.models.config import ModelConfig
from merit_jax.models.decoder import Decoder
from merit_jax.models.weights import decoder_from_hf, read_safetensors_dir

logger = logging.getLogger(__name__)

# Files fetched from the hub: configs, safetensors weights and every tokenizer
# file transformers may need (tokenizer.json, tokenizer_config.json,
# special_tokens_map.json, vocab.json, merges.txt, tokenizer.model,
# chat_template.jinja).
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "tokenizer*"]

# "name" or "owner/name", as the hub spells repository ids.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


@dataclasses.dataclass
class Pretrained:
    """A loaded decoder with its config, tokenizer and provenance."""

    model: Decoder
    config: ModelConfig
    tokenizer: Any  # transformers.PreTrainedTokenizerFast, or None when not requested
    source: Path  # the GGUF file or the model directory the weights came from
    weight_files: list[Path]
    # sha256 over the sha256 digests of weight_files, in shard order: the same
    # bytes give the same hash wherever the files lie.
    weights_sha256: str


def weights_content_hash(files: list[Path]) -> str:
    """Return the hex sha256 of the concatenated hex sha256 digests of ``files``, in order."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(assets.sha256_file(file).encode("ascii"))
    return digest.hexdigest()


def _looks_like_hub_id(text: str) -> bool:
    if text.startswith((".", "~", "/")) or text.endswith((".gguf", ".safetensors", ".json")):
        return False
    return _HUB_ID.fullmatch(text) is not None


def download_from_hub(repo_id: str) -> Path:
    """Download the config, safetensors and tokenizer files of a hub model; return the dir."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    logger.info("downloading %s from the Hugging Face hub (%s)", repo_id, HUB_ALLOW_PATTERNS)
    try:
        local = snapshot_download(repo_id=repo_id, allow_patterns=HUB_ALLOW_PATTERNS)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as err:
        registry = ", ".join(sorted(n for n, a in assets.ASSETS.items() if a.is_model))
        raise FileNotFoundError(
            f"failed to load model {repo_id!r}: it is neither a registry name ({registry}) nor a "
            f"local path, and downloading it as a Hugging Face hub id failed ({err}). "
            "Check the spelling, pass a local .gguf file or model directory, or make the hub "
            "reachable."
        ) from err
    return Path(local)


def _locate(ref: str | os.PathLike[str]) -> Path:
    """Turn a reference into a local GGUF file or model directory."""
    location = assets.resolve_model(ref)
    if isinstance(location, Path):
        return location
    if not _looks_like_hub_id(location):
        raise FileNotFoundError(
            f"model path not found: {location}. Pass an existing .gguf file or Hugging Face "
            "model directory, a registry name such as "
            f"{assets.SMOLLM2!r}, or a hub id such as 'owner/name'."
        )
    return download_from_hub(location)


def load_pretrained(
    ref: str | os.PathLike[str],
    *,
    param_dtype: str = "float32",
    compute_dtype: str = "float32",
    scan_layers: bool = True,
    remat: bool = False,
    with_tokenizer: bool = True,
) -> Pretrained:
    """Load a decoder from a registry name, a .gguf file, a model dir or a hub id.

    Weights are cast to ``param_dtype``; ``compute_dtype``, ``scan_layers`` and
    ``remat`` go into the ModelConfig unchanged. Raises FileNotFoundError for a
    reference that names nothing loadable and WeightsError when the weights do not
    match the config.
    """
    start = time.perf_counter()
    source = _locate(ref)
    overrides = dict(
        param_dtype=param_dtype, compute_dtype=compute_dtype, scan_layers=scan_layers, remat=remat
    )

    if source.is_file():
        if source.suffix.lower() != ".gguf":
            raise ValueError(
                f"{source} is a file but not a .gguf checkpoint. Pass a .gguf file or a "
                "Hugging Face model directory (with config.json and safetensors weights)."
            )
        from merit_jax.models.gguf import read_gguf

        gguf_checkpoint = read_gguf(source)
        hf_config, tensors = gguf_checkpoint.hf_config, gguf_checkpoint.tensors
        weight_files, key_files = [source], None
    elif source.is_dir():
        if not (source / "config.json").exists():
            ggufs = sorted(source.glob("*.gguf"))
            if ggufs:
                raise FileNotFoundError(
                    f"{source} has no config.json but contains GGUF files "
                    f"({[p.name for p in ggufs]}). Pass the .gguf file itself."
                )
        checkpoint = read_safetensors_dir(source)
        hf_config, tensors = checkpoint.hf_config, checkpoint.tensors
        weight_files, key_files = checkpoint.files, checkpoint.key_files
    else:
        raise FileNotFoundError(f"model path not found: {source}")

    config = ModelConfig.from_hf_dict(hf_config, **overrides)
    model = decoder_from_hf(config, tensors, source=source, key_files=key_files)
    del tensors
    weights_sha256 = weights_content_hash(weight_files)

    tokenizer = None
    if with_tokenizer:
        from merit_jax.models.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(source)

    logger.info(
        "loaded %s (%s, %d layers, %s parameters) from %s in %.1f s",
        config.model_type,
        param_dtype,
        config.num_hidden_layers,
        f"{sum(x.size for x in _param_leaves(model)) / 1e6:.1f}M",
        source,
        time.perf_counter() - start,
    )
    return Pretrained(
        model=model,
        config=config,
        tokenizer=tokenizer,
        source=source,
        weight_files=weight_files,
        weights_sha256=weights_sha256,
    )


def _param_leaves(model: Decoder) -> list[Any]:
    import jax
    from flax import nnx

    return jax.tree.leaves(nnx.state(model, nnx.Param))
