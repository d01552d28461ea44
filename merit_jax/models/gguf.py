"""Read GGUF checkpoints (llama.cpp's file format) into a Hugging Face-style state dict.

``read_gguf`` returns HF parameter names mapped to float32 numpy arrays in HF/PyTorch
layout (``[out_features, in_features]`` for linear weights), plus a ``config.json``-like
dict and the raw metadata key/values (the tokenizer lives there).

Axis letters: V vocab, D model, N query heads, K kv heads, H head dim, F MLP hidden.

Two format details matter:

- GGUF lists tensor dimensions fastest-varying first (``ne[0]`` is the row length),
  so a GGUF shape ``[D, V]`` is the numpy/PyTorch shape ``[V, D]``. The ``gguf``
  package already returns arrays in numpy order; only the reported shape is reversed.
- For the ``llama`` architecture, llama.cpp's converter (``convert_hf_to_gguf.py``,
  ``LlamaModel.permute``) reorders the rows of ``q_proj`` and ``k_proj`` (and their
  biases) inside each head so that GGML's RoPE, which rotates adjacent pairs
  ``(x[2i], x[2i+1])``, computes what HF's ``rotate_half`` computes on
  ``(x[i], x[i + H/2])``. ``unpermute_rope_rows`` restores HF order. The ``qwen2``
  converter does not permute, because llama.cpp runs Qwen2 with NeoX-style RoPE on
  half-offset pairs (``llama_model_rope_type`` in ``src/llama-model.cpp``), so Qwen2
  rows are used as stored.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"

# general.architecture -> Hugging Face architecture class name.
SUPPORTED_GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}

# Per-layer tensors: GGUF suffix after "blk.{i}." -> HF suffix after "model.layers.{i}.".
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_BIASES = {
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
}
_OUTPUT = "output.weight"  # lm_head; absent when the embeddings are tied
_ROPE_FREQS = "rope_freqs.weight"  # llama3 RoPE scaling factors, folded into the config

# Llama 3.1+ RoPE scaling constants. A GGUF stores only the resulting per-frequency
# factors (rope_freqs.weight), so these are checked against them, not read.
_LLAMA3_LOW_FREQ_FACTOR = 1.0
_LLAMA3_HIGH_FREQ_FACTOR = 4.0
_LLAMA3_ORIGINAL_CONTEXT = 8192


@dataclasses.dataclass(frozen=True)
class GGUFCheckpoint:
    """A GGUF file read into Hugging Face form."""

    path: Path
    hf_config: dict[str, Any]  # config.json-like dict, see ``hf_config_from_metadata``
    tensors: dict[str, np.ndarray]  # HF parameter name -> float32 array in HF layout
    metadata: dict[str, Any]  # every GGUF key/value, decoded (strings, numbers, lists)
    tensor_types: dict[str, str]  # HF parameter name -> GGUF storage type, e.g. "Q4_1"


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row interleaving of a Q or K projection (weight or bias).

    llama.cpp stores ``w.reshape(num_heads, 2, H/2, ...).swapaxes(1, 2)``: within each
    head, row ``i`` of the first half and row ``i`` of the second half become rows
    ``2i`` and ``2i + 1``. This applies the inverse. ``num_heads`` is N for q_proj and
    K for k_proj.
    """
    rows = weight.shape[0]
    if num_heads <= 0 or rows % (2 * num_heads):
        raise ValueError(
            f"cannot un-permute {rows} rows into {num_heads} heads: the row count must be "
            "a multiple of 2 * num_heads"
        )
    half = rows // num_heads // 2
    return (
        weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _check_gguf_file(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise ValueError(f"{path} is not a file; pass the path of a .gguf file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(
            f"{path} is not a GGUF file: it starts with {magic!r}, not {GGUF_MAGIC!r}. "
            "Pass a llama.cpp .gguf checkpoint, or a Hugging Face model directory to the "
            "safetensors loader."
        )


def _open_reader(path: Path) -> Any:
    import gguf

    _check_gguf_file(path)
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as err:
        raise ValueError(f"{path} is not a valid GGUF file: {err}") from err


def _decode_metadata(reader: Any) -> dict[str, Any]:
    return {name: field.contents() for name, field in reader.fields.items()}


def read_gguf_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read the key/value metadata of a GGUF file without dequantizing any tensor."""
    return _decode_metadata(_open_reader(Path(path)))


def _float32_value(value: float) -> float:
    # GGUF stores floats as float32: 1e-5 reads back as 9.999999747378752e-06. The
    # shortest decimal that rounds to the same float32 gives back the value written.
    return float(str(np.float32(value)))


def _required(metadata: dict[str, Any], key: str, path: Path | str) -> Any:
    if key not in metadata:
        raise ValueError(f"{path} is missing the GGUF metadata key {key!r}")
    return metadata[key]


def _llama3_rope_scaling(
    freq_factors: np.ndarray, *, head_dim: int, rope_theta: float, path: Path | str
) -> dict[str, Any] | None:
    """Recover HF's llama3 ``rope_scaling`` from llama.cpp's per-frequency RoPE factors."""
    factors = np.asarray(freq_factors, dtype=np.float64).reshape(-1)
    if factors.shape != (head_dim // 2,):
        raise ValueError(
            f"{path}: {_ROPE_FREQS} has {factors.size} values, expected head_dim / 2 = "
            f"{head_dim // 2}"
        )
    if np.allclose(factors, 1.0):
        return None

    factor = float(factors.max())
    inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    low, high, context = (
        _LLAMA3_LOW_FREQ_FACTOR,
        _LLAMA3_HIGH_FREQ_FACTOR,
        _LLAMA3_ORIGINAL_CONTEXT,
    )
    smooth = (context / wavelen - low) / (high - low)
    expected = np.where(
        wavelen < context / high,
        1.0,
        np.where(wavelen > context / low, factor, 1.0 / ((1 - smooth) / factor + smooth)),
    )
    if not np.allclose(factors, expected, rtol=1e-4, atol=1e-6):
        raise ValueError(
            f"{path}: {_ROPE_FREQS} does not match llama3 RoPE scaling with "
            f"factor={factor}, low_freq_factor={low}, high_freq_factor={high}, "
            f"original_max_position_embeddings={context}; other RoPE frequency factors "
            "are not supported. Load the model from its Hugging Face directory instead."
        )
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": context,
    }


def _metadata_rope_scaling(metadata: dict[str, Any], arch: str) -> dict[str, Any] | None:
    kind = metadata.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": kind}
    factor = metadata.get(f"{arch}.rope.scaling.factor")
    if factor is not None:
        scaling["factor"] = _float32_value(factor)
    original = metadata.get(f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _eos_token_ids(metadata: dict[str, Any]) -> int | list[int] | None:
    # Chat models stop on end-of-turn (eot) or end-of-message (eom) as well as eos.
    ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = metadata.get(f"tokenizer.ggml.{key}")
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else ids


def hf_config_from_metadata(
    metadata: dict[str, Any],
    *,
    vocab_size: int,
    tie_word_embeddings: bool,
    attention_bias: bool,
    rope_freqs: np.ndarray | None = None,
    path: Path | str = "<gguf>",
) -> dict[str, Any]:
    """Build a ``config.json``-like dict from GGUF metadata.

    ``vocab_size`` is the row count of the embedding (the tokenizer list can be
    shorter), ``tie_word_embeddings`` is True when the file has no ``output.weight``,
    and ``rope_freqs`` is the optional llama3 RoPE factor tensor.
    """
    arch = _required(metadata, "general.architecture", path)
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(
            f"{path}: unsupported GGUF architecture {arch!r}; merit-jax reads "
            f"{sorted(SUPPORTED_GGUF_ARCHITECTURES)} (Llama and Qwen2 families)"
        )
    experts = metadata.get(f"{arch}.expert_count")
    if experts:
        raise ValueError(
            f"{path}: {arch}.expert_count={experts}; mixture-of-experts models are not supported"
        )

    hidden_size = int(_required(metadata, f"{arch}.embedding_length", path))
    num_heads = int(_required(metadata, f"{arch}.attention.head_count", path))
    num_kv_heads = int(metadata.get(f"{arch}.attention.head_count_kv", num_heads))
    head_dim = int(metadata.get(f"{arch}.attention.key_length", hidden_size // num_heads))
    value_dim = int(metadata.get(f"{arch}.attention.value_length", head_dim))
    rope_dim = int(metadata.get(f"{arch}.rope.dimension_count", head_dim))
    if value_dim != head_dim or rope_dim != head_dim:
        raise ValueError(
            f"{path}: key_length={head_dim}, value_length={value_dim}, "
            f"rope.dimension_count={rope_dim}; merit-jax needs all three equal (full "
            "rotary embedding over one head dimension)"
        )
    rope_theta = _float32_value(metadata.get(f"{arch}.rope.freq_base", 10000.0))

    rope_scaling = _metadata_rope_scaling(metadata, arch)
    if rope_freqs is not None:
        if rope_scaling is not None:
            raise ValueError(
                f"{path}: the file has both {arch}.rope.scaling.type="
                f"{rope_scaling['rope_type']!r} and a {_ROPE_FREQS} tensor; only one "
                "RoPE scaling can be applied"
            )
        rope_scaling = _llama3_rope_scaling(
            rope_freqs, head_dim=head_dim, rope_theta=rope_theta, path=path
        )

    hf: dict[str, Any] = {
        "architectures": [SUPPORTED_GGUF_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": int(_required(metadata, f"{arch}.feed_forward_length", path)),
        "num_hidden_layers": int(_required(metadata, f"{arch}.block_count", path)),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _float32_value(
            _required(metadata, f"{arch}.attention.layer_norm_rms_epsilon", path)
        ),
        "rope_theta": rope_theta,
        "max_position_embeddings": int(metadata.get(f"{arch}.context_length", 2048)),
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": _eos_token_ids(metadata),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
    }
    if arch == "llama":
        hf["attention_bias"] = attention_bias
        hf["mlp_bias"] = False
    if rope_scaling is not None:
        hf["rope_scaling"] = rope_scaling
    return hf


def _expected_hf_shapes(hf: dict[str, Any], *, with_bias: bool) -> dict[str, tuple[int, ...]]:
    """Return every HF tensor name the checkpoint must contain, with its HF shape."""
    V, D, F = hf["vocab_size"], hf["hidden_size"], hf["intermediate_size"]
    N, K, H = hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]
    per_layer = {
        "input_layernorm.weight": (D,),
        "self_attn.q_proj.weight": (N * H, D),
        "self_attn.k_proj.weight": (K * H, D),
        "self_attn.v_proj.weight": (K * H, D),
        "self_attn.o_proj.weight": (D, N * H),
        "post_attention_layernorm.weight": (D,),
        "mlp.gate_proj.weight": (F, D),
        "mlp.up_proj.weight": (F, D),
        "mlp.down_proj.weight": (D, F),
    }
    if with_bias:
        per_layer["self_attn.q_proj.bias"] = (N * H,)
        per_layer["self_attn.k_proj.bias"] = (K * H,)
        per_layer["self_attn.v_proj.bias"] = (K * H,)
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    for i in range(hf["num_hidden_layers"]):
        for suffix, shape in per_layer.items():
            shapes[f"model.layers.{i}.{suffix}"] = shape
    if not hf["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (V, D)
    return shapes


def _gguf_to_hf_name(name: str) -> str | None:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    if name == _OUTPUT:
        return "lm_head.weight"
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        suffix = _LAYER_TENSORS.get(parts[2]) or _LAYER_BIASES.get(parts[2])
        if suffix is not None:
            return f"model.layers.{parts[1]}.{suffix}"
    return None


def _rope_permuted_heads(hf_name: str, hf: dict[str, Any]) -> int | None:
    """Return the head count whose rows llama.cpp permuted in this tensor, or None."""
    if hf["model_type"] != "llama":
        return None
    if ".self_attn.q_proj." in hf_name:
        return hf["num_attention_heads"]
    if ".self_attn.k_proj." in hf_name:
        return hf["num_key_value_heads"]
    return None


def _numpy_shape(tensor: Any) -> tuple[int, ...]:
    # GGUF lists dimensions fastest-varying first; numpy lists them slowest first.
    return tuple(int(n) for n in reversed(tensor.shape))


def read_gguf(path: str | os.PathLike[str]) -> GGUFCheckpoint:
    """Read a Llama or Qwen2 GGUF file into HF-named float32 tensors and a config dict.

    Quantized tensors are dequantized with ``gguf.quants.dequantize``; Q and K rows of
    ``llama`` files are un-permuted (see the module docstring). Raises
    FileNotFoundError for a missing file and ValueError for a file that is not GGUF,
    an unsupported architecture, or missing, unexpected or misshapen tensors (all
    listed in one message).
    """
    import gguf

    path = Path(path)
    start = time.perf_counter()
    reader = _open_reader(path)
    metadata = _decode_metadata(reader)
    by_name = {tensor.name: tensor for tensor in reader.tensors}

    if "token_embd.weight" not in by_name:
        raise ValueError(f"{path} has no token_embd.weight tensor; it is not a decoder LM")
    rope_freqs = None
    if _ROPE_FREQS in by_name:
        freq_tensor = by_name[_ROPE_FREQS]
        rope_freqs = gguf.quants.dequantize(freq_tensor.data, freq_tensor.tensor_type)
    hf = hf_config_from_metadata(
        metadata,
        vocab_size=_numpy_shape(by_name["token_embd.weight"])[0],
        tie_word_embeddings=_OUTPUT not in by_name,
        attention_bias=any(name.endswith(".attn_q.bias") for name in by_name),
        rope_freqs=rope_freqs,
        path=path,
    )
    with_bias = hf["model_type"] == "qwen2" or hf.get("attention_bias", False)
    expected = _expected_hf_shapes(hf, with_bias=with_bias)

    hf_to_gguf: dict[str, str] = {}
    unexpected: list[str] = []
    for name in by_name:
        hf_name = _gguf_to_hf_name(name)
        if hf_name is not None and hf_name in expected:
            hf_to_gguf[hf_name] = name
        elif name != _ROPE_FREQS:
            unexpected.append(name)
    missing = [name for name in expected if name not in hf_to_gguf]
    misshapen = [
        f"{hf_to_gguf[name]} ({name}): shape {_numpy_shape(by_name[hf_to_gguf[name]])}, "
        f"expected {shape}"
        for name, shape in expected.items()
        if name in hf_to_gguf and _numpy_shape(by_name[hf_to_gguf[name]]) != shape
    ]
    if missing or unexpected or misshapen:
        problems = []
        if missing:
            problems.append(f"missing tensors (HF names) {missing}")
        if unexpected:
            problems.append(f"unexpected GGUF tensors {sorted(unexpected)}")
        if misshapen:
            problems.append("tensors with the wrong shape: " + "; ".join(misshapen))
        raise ValueError(
            f"{path} does not match a {hf['model_type']} model with {hf['num_hidden_layers']} "
            f"layers: " + ". ".join(problems)
        )

    tensors: dict[str, np.ndarray] = {}
    tensor_types: dict[str, str] = {}
    for hf_name, shape in expected.items():
        source = by_name[hf_to_gguf[hf_name]]
        # np.array copies: F32 tensors dequantize to a read-only view of the mapped file.
        array = np.array(
            gguf.quants.dequantize(source.data, source.tensor_type), dtype=np.float32
        ).reshape(shape)
        heads = _rope_permuted_heads(hf_name, hf)
        if heads is not None:
            array = unpermute_rope_rows(array, heads)
        tensors[hf_name] = array
        tensor_types[hf_name] = source.tensor_type.name

    count = sum(array.size for array in tensors.values())
    logger.info(
        "read %s: %s, %d tensors, %.1fM parameters (%s) in %.1f s",
        path,
        hf["architectures"][0],
        len(tensors),
        count / 1e6,
        ", ".join(sorted(set(tensor_types.values()))),
        time.perf_counter() - start,
    )
    return GGUFCheckpoint(
        path=path, hf_config=hf, tensors=tensors, metadata=metadata, tensor_types=tensor_types
    )
