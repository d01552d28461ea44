"""GGUF reading: tensor names, layouts, the llama.cpp Q/K row permutation, dequantization."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from merit_jax.models.config import ModelConfig
from merit_jax.models.gguf import read_gguf, read_gguf_metadata, unpermute_rope_rows

# A tiny model whose rows are all multiples of 32, the Q8_0 block size.
TINY = dict(V=48, D=32, F=64, N=4, K=2, H=8, L=2)

LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
}


def interleave_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's Q/K storage order, written as an explicit row gather.

    Within each head of H rows, stored row 2i is HF row i and stored row 2i + 1 is
    HF row i + H/2, so that adjacent-pair RoPE on the stored rows equals HF's
    rotate_half RoPE on the original rows.
    """
    head_dim = weight.shape[0] // num_heads
    order = []
    for head in range(num_heads):
        for i in range(head_dim // 2):
            order += [head * head_dim + i, head * head_dim + head_dim // 2 + i]
    return weight[np.array(order)]


def hf_state_dict(
    rng: np.random.Generator, *, tied: bool = True, bias: bool = False
) -> dict[str, np.ndarray]:
    V, D, F, N, K, H, L = (TINY[k] for k in "VDFNKHL")
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (V, D),
        "model.norm.weight": (D,),
    }
    for i in range(L):
        prefix = f"model.layers.{i}."
        shapes[prefix + "input_layernorm.weight"] = (D,)
        shapes[prefix + "self_attn.q_proj.weight"] = (N * H, D)
        shapes[prefix + "self_attn.k_proj.weight"] = (K * H, D)
        shapes[prefix + "self_attn.v_proj.weight"] = (K * H, D)
        shapes[prefix + "self_attn.o_proj.weight"] = (D, N * H)
        shapes[prefix + "post_attention_layernorm.weight"] = (D,)
        shapes[prefix + "mlp.gate_proj.weight"] = (F, D)
        shapes[prefix + "mlp.up_proj.weight"] = (F, D)
        shapes[prefix + "mlp.down_proj.weight"] = (D, F)
        if bias:
            shapes[prefix + "self_attn.q_proj.bias"] = (N * H,)
            shapes[prefix + "self_attn.k_proj.bias"] = (K * H,)
            shapes[prefix + "self_attn.v_proj.bias"] = (K * H,)
    if not tied:
        shapes["lm_head.weight"] = (V, D)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def gguf_name(hf_name: str) -> str:
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, suffix = hf_name.split(".", 3)
    reverse = {v: k for k, v in LAYER_NAMES.items()}
    return f"blk.{layer}.{reverse[suffix]}"


def write_gguf(
    path: Path,
    hf: dict[str, np.ndarray],
    *,
    arch: str = "llama",
    permute: bool = True,
    qtypes: dict[str, gguf.GGMLQuantizationType] | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
    metadata: dict[str, Any] | None = None,
    rope_theta: float = 100000.0,
) -> Path:
    """Write HF tensors as llama.cpp's converter would: renamed, Q/K rows interleaved."""
    N, K, H, L = TINY["N"], TINY["K"], TINY["H"], TINY["L"]
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(L)
    writer.add_context_length(256)
    writer.add_embedding_length(TINY["D"])
    writer.add_feed_forward_length(TINY["F"])
    writer.add_head_count(N)
    writer.add_head_count_kv(K)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(rope_theta)
    writer.add_rope_dimension_count(H)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    for name, array in hf.items():
        if permute and ".q_proj." in name:
            array = interleave_rope_rows(array, N)
        elif permute and ".k_proj." in name:
            array = interleave_rope_rows(array, K)
        qtype = (qtypes or {}).get(name)
        if qtype is None:
            writer.add_tensor(gguf_name(name), array)
        else:
            data = gguf.quants.quantize(array, qtype)
            writer.add_tensor(gguf_name(name), data, raw_dtype=qtype)
    for name, array in (extra_tensors or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


# --- the Q/K row permutation -------------------------------------------------------


@pytest.mark.parametrize("num_heads", [1, 2, 3, 9])
def test_unpermute_inverts_interleaving(num_heads: int, rng: np.random.Generator) -> None:
    head_dim = 8
    weight = rng.standard_normal((num_heads * head_dim, 5)).astype(np.float32)
    bias = rng.standard_normal(num_heads * head_dim).astype(np.float32)

    stored = interleave_rope_rows(weight, num_heads)
    np.testing.assert_array_equal(unpermute_rope_rows(stored, num_heads), weight)
    np.testing.assert_array_equal(
        unpermute_rope_rows(interleave_rope_rows(bias, num_heads), num_heads), bias
    )
    assert not np.array_equal(stored, weight)


def test_unpermute_rejects_odd_rows() -> None:
    with pytest.raises(ValueError, match="multiple of 2 \\* num_heads"):
        unpermute_rope_rows(np.zeros((12, 4), np.float32), num_heads=4)


def rope_rotate_half(x: np.ndarray, position: int, theta: float) -> np.ndarray:
    """HF RoPE: pairs (x[i], x[i + H/2]) rotated by position * theta^(-2i/H)."""
    half = x.shape[-1] // 2
    angle = position * theta ** (-np.arange(half) * 2.0 / x.shape[-1])
    first, second = x[..., :half], x[..., half:]
    return np.concatenate(
        [
            first * np.cos(angle) - second * np.sin(angle),
            second * np.cos(angle) + first * np.sin(angle),
        ],
        axis=-1,
    )


def rope_adjacent_pairs(x: np.ndarray, position: int, theta: float) -> np.ndarray:
    """GGML's default RoPE: pairs (x[2i], x[2i + 1]) rotated by the same angles."""
    half = x.shape[-1] // 2
    angle = position * theta ** (-np.arange(half) * 2.0 / x.shape[-1])
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * np.cos(angle) - odd * np.sin(angle)
    out[..., 1::2] = odd * np.cos(angle) + even * np.sin(angle)
    return out


def test_interleaving_matches_rope_conventions(rng: np.random.Generator) -> None:
    # The reason llama.cpp permutes: adjacent-pair RoPE on stored rows equals
    # rotate_half RoPE on HF rows, up to the same row order.
    num_heads, head_dim, dim = 3, 8, 10
    weight = rng.standard_normal((num_heads * head_dim, dim))
    x = rng.standard_normal(dim)
    hf_q = (weight @ x).reshape(num_heads, head_dim)
    stored_q = (interleave_rope_rows(weight, num_heads) @ x).reshape(num_heads, head_dim)

    hf_rotated = rope_rotate_half(hf_q, position=5, theta=100.0)
    stored_rotated = rope_adjacent_pairs(stored_q, position=5, theta=100.0)
    restored = unpermute_rope_rows(stored_rotated.reshape(-1), num_heads).reshape(hf_q.shape)
    np.testing.assert_allclose(restored, hf_rotated, rtol=1e-12, atol=1e-12)
    wrong = rope_rotate_half(stored_q, position=5, theta=100.0)
    assert not np.allclose(
        unpermute_rope_rows(wrong.reshape(-1), num_heads), hf_rotated.reshape(-1)
    )


# --- reading files -----------------------------------------------------------------


def test_read_llama_tied_roundtrip(tmp_path: Path, rng: np.random.Generator) -> None:
    hf = hf_state_dict(rng)
    checkpoint = read_gguf(write_gguf(tmp_path / "tiny.gguf", hf))

    assert sorted(checkpoint.tensors) == sorted(hf)
    for name, expected in hf.items():
        actual = checkpoint.tensors[name]
        assert actual.dtype == np.float32, name
        np.testing.assert_array_equal(actual, expected, err_msg=name)
    assert checkpoint.tensor_types["model.embed_tokens.weight"] == "F32"
    assert "lm_head.weight" not in checkpoint.tensors


def test_read_llama_config(tmp_path: Path, rng: np.random.Generator) -> None:
    checkpoint = read_gguf(write_gguf(tmp_path / "tiny.gguf", hf_state_dict(rng)))
    hf = checkpoint.hf_config

    assert hf["architectures"] == ["LlamaForCausalLM"]
    assert hf["model_type"] == "llama"
    assert hf["vocab_size"] == TINY["V"]
    assert hf["hidden_size"] == TINY["D"]
    assert hf["intermediate_size"] == TINY["F"]
    assert hf["num_hidden_layers"] == TINY["L"]
    assert hf["num_attention_heads"] == TINY["N"]
    assert hf["num_key_value_heads"] == TINY["K"]
    assert hf["head_dim"] == TINY["H"]
    assert hf["rms_norm_eps"] == 1e-5
    assert hf["rope_theta"] == 100000.0
    assert hf["max_position_embeddings"] == 256
    assert hf["tie_word_embeddings"] is True
    assert hf["attention_bias"] is False
    assert hf["bos_token_id"] == 1
    assert hf["eos_token_id"] == 2
    assert "rope_scaling" not in hf
    config = ModelConfig.from_hf_dict(hf)
    assert config.num_key_value_heads == TINY["K"]
    assert config.tie_word_embeddings


def test_read_untied_has_lm_head(tmp_path: Path, rng: np.random.Generator) -> None:
    hf = hf_state_dict(rng, tied=False)
    checkpoint = read_gguf(write_gguf(tmp_path / "tiny.gguf", hf))

    assert checkpoint.hf_config["tie_word_embeddings"] is False
    np.testing.assert_array_equal(checkpoint.tensors["lm_head.weight"], hf["lm_head.weight"])


def test_read_llama_bias_unpermuted(tmp_path: Path, rng: np.random.Generator) -> None:
    hf = hf_state_dict(rng, bias=True)
    checkpoint = read_gguf(write_gguf(tmp_path / "tiny.gguf", hf))

    assert checkpoint.hf_config["attention_bias"] is True
    for name in ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"):
        np.testing.assert_array_equal(
            checkpoint.tensors[f"model.layers.1.{name}"], hf[f"model.layers.1.{name}"]
        )
    assert ModelConfig.from_hf_dict(checkpoint.hf_config).attention_bias


def test_read_qwen2_not_unpermuted(tmp_path: Path, rng: np.random.Generator) -> None:
    hf = hf_state_dict(rng, tied=False, bias=True)
    checkpoint = read_gguf(write_gguf(tmp_path / "qwen.gguf", hf, arch="qwen2", permute=False))

    assert checkpoint.hf_config["architectures"] == ["Qwen2ForCausalLM"]
    assert checkpoint.hf_config["model_type"] == "qwen2"
    for name, expected in hf.items():
        np.testing.assert_array_equal(checkpoint.tensors[name], expected, err_msg=name)
    config = ModelConfig.from_hf_dict(checkpoint.hf_config)
    assert config.model_type == "qwen2"
    assert config.attention_bias


def test_read_qwen2_requires_bias(tmp_path: Path, rng: np.random.Generator) -> None:
    path = write_gguf(tmp_path / "qwen.gguf", hf_state_dict(rng), arch="qwen2", permute=False)
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj.bias"):
        read_gguf(path)


def test_q8_0_and_f16_dequantized(tmp_path: Path, rng: np.random.Generator) -> None:
    hf = hf_state_dict(rng)
    q8_name = "model.layers.0.self_attn.q_proj.weight"
    f16_name = "model.layers.1.mlp.down_proj.weight"
    q8_stored = interleave_rope_rows(hf[q8_name], TINY["N"])
    path = write_gguf(
        tmp_path / "quant.gguf",
        hf,
        qtypes={
            q8_name: gguf.GGMLQuantizationType.Q8_0,
            f16_name: gguf.GGMLQuantizationType.F16,
        },
    )
    checkpoint = read_gguf(path)

    assert checkpoint.tensor_types[q8_name] == "Q8_0"
    assert checkpoint.tensor_types[f16_name] == "F16"
    # F16 is exact up to float16 rounding.
    np.testing.assert_array_equal(
        checkpoint.tensors[f16_name], hf[f16_name].astype(np.float16).astype(np.float32)
    )
    # Q8_0: blocks of 32 values share one scale max|x| / 127; each value is off by at
    # most half a step (plus the float16 rounding of the scale).
    blocks = q8_stored.reshape(-1, 32)
    step = np.abs(blocks).max(axis=1, keepdims=True) / 127
    error = np.abs(
        interleave_rope_rows(checkpoint.tensors[q8_name], TINY["N"]).reshape(-1, 32) - blocks
    )
    assert checkpoint.tensors[q8_name].dtype == np.float32
    assert np.all(error <= 0.5 * step + 2e-3 * np.abs(blocks) + 1e-7)
    assert error.max() > 0  # really quantized


def llama3_rope_factors(head_dim: int, theta: float, factor: float) -> np.ndarray:
    """The per-frequency factors llama.cpp writes to rope_freqs.weight for Llama 3.1+."""
    low_freq_factor, high_freq_factor, old_context = 1.0, 4.0, 8192
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old_context / high_freq_factor:
            factors.append(1.0)
        elif wavelen > old_context / low_freq_factor:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low_freq_factor) / (
                high_freq_factor - low_freq_factor
            )
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def test_llama3_rope_freqs_to_config(tmp_path: Path, rng: np.random.Generator) -> None:
    factors = llama3_rope_factors(TINY["H"], 500000.0, factor=32.0)
    assert len(set(np.round(factors, 4))) == 3  # covers all three frequency bands
    path = write_gguf(
        tmp_path / "llama3.gguf",
        hf_state_dict(rng),
        extra_tensors={"rope_freqs.weight": factors},
        rope_theta=500000.0,
    )
    checkpoint = read_gguf(path)

    assert checkpoint.hf_config["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert "rope_freqs.weight" not in checkpoint.tensors
    scaling = ModelConfig.from_hf_dict(checkpoint.hf_config).rope_scaling
    assert scaling is not None
    assert scaling.factor == 32.0


def test_unknown_rope_freqs_rejected(tmp_path: Path, rng: np.random.Generator) -> None:
    factors = np.array([1.0, 2.0, 3.0, 5.0], dtype=np.float32)
    path = write_gguf(
        tmp_path / "odd.gguf", hf_state_dict(rng), extra_tensors={"rope_freqs.weight": factors}
    )
    with pytest.raises(ValueError, match="does not match llama3 RoPE scaling"):
        read_gguf(path)


def test_linear_rope_scaling_metadata(tmp_path: Path, rng: np.random.Generator) -> None:
    path = write_gguf(
        tmp_path / "linear.gguf",
        hf_state_dict(rng),
        metadata={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0},
    )
    assert read_gguf(path).hf_config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}


def test_metadata_only_read(tmp_path: Path, rng: np.random.Generator) -> None:
    path = write_gguf(tmp_path / "tiny.gguf", hf_state_dict(rng))
    metadata = read_gguf_metadata(path)
    assert metadata["general.architecture"] == "llama"
    assert metadata["llama.block_count"] == TINY["L"]


# --- errors ------------------------------------------------------------------------


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        read_gguf(tmp_path / "nothing.gguf")


def test_not_gguf_raises(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_text("{}")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        read_gguf(path)


def test_truncated_gguf_raises(tmp_path: Path, rng: np.random.Generator) -> None:
    path = write_gguf(tmp_path / "tiny.gguf", hf_state_dict(rng))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a valid GGUF file"):
        read_gguf(path)


def test_unsupported_architecture_raises(tmp_path: Path, rng: np.random.Generator) -> None:
    path = write_gguf(tmp_path / "phi.gguf", hf_state_dict(rng), arch="phi3")
    with pytest.raises(ValueError, match="'phi3'") as info:
        read_gguf(path)
    assert "['llama', 'qwen2']" in str(info.value)


def test_mixture_of_experts_rejected(tmp_path: Path, rng: np.random.Generator) -> None:
    path = write_gguf(tmp_path / "moe.gguf", hf_state_dict(rng), metadata={"llama.expert_count": 8})
    with pytest.raises(ValueError, match="mixture-of-experts"):
        read_gguf(path)


def test_missing_tensors_listed_together(tmp_path: Path, rng: np.random.Generator) -> None:
    hf = hf_state_dict(rng)
    del hf["model.layers.0.mlp.up_proj.weight"]
    del hf["model.layers.1.self_attn.k_proj.weight"]
    path = write_gguf(tmp_path / "partial.gguf", hf)
    with pytest.raises(ValueError, match="missing tensors") as info:
        read_gguf(path)
    message = str(info.value)
    assert "model.layers.0.mlp.up_proj.weight" in message
    assert "model.layers.1.self_attn.k_proj.weight" in message


def test_unexpected_and_misshapen_tensors(tmp_path: Path, rng: np.random.Generator) -> None:
    hf = hf_state_dict(rng)
    hf["model.layers.0.mlp.gate_proj.weight"] = np.zeros((TINY["F"] + 2, TINY["D"]), np.float32)
    path = write_gguf(
        tmp_path / "odd.gguf",
        hf,
        extra_tensors={"blk.0.attn_q_norm.weight": np.ones(TINY["H"], np.float32)},
    )
    with pytest.raises(ValueError) as info:
        read_gguf(path)
    message = str(info.value)
    assert "blk.0.attn_q_norm.weight" in message
    assert "blk.0.ffn_gate.weight" in message
    assert f"expected ({TINY['F']}, {TINY['D']})" in message


# --- the real SmolLM2 checkpoint ---------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(real_gguf: Path) -> Any:
    return read_gguf(real_gguf)


@pytest.mark.real
def test_real_smollm2_config(smollm2: Any) -> None:
    hf = smollm2.hf_config
    assert hf["model_type"] == "llama"
    assert hf["num_hidden_layers"] == 30
    assert hf["hidden_size"] == 576
    assert hf["num_attention_heads"] == 9
    assert hf["num_key_value_heads"] == 3
    assert hf["head_dim"] == 64
    assert hf["intermediate_size"] == 1536
    assert hf["vocab_size"] == 49152
    assert hf["rope_theta"] == 1e5
    assert hf["rms_norm_eps"] == 1e-5
    assert hf["tie_word_embeddings"] is True
    assert "lm_head.weight" not in smollm2.tensors
    assert len(smollm2.tensors) == 2 + 30 * 9
    assert smollm2.tensors["model.embed_tokens.weight"].shape == (49152, 576)
    assert smollm2.tensors["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert smollm2.tensors["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
    ModelConfig.from_hf_dict(hf)


@pytest.mark.real
def test_real_smollm2_matches_transformers(smollm2: Any, real_gguf: Path) -> None:
    # transformers' own GGUF loader (PyTorch) is the independent reference for names,
    # layouts and the Q/K un-permutation.
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(real_gguf.parent, gguf_file=real_gguf.name)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    reference = load_gguf_checkpoint(str(real_gguf), return_tensors=True, model_to_load=skeleton)
    tensors = reference["tensors"]

    assert sorted(tensors) == sorted(smollm2.tensors)
    for name, expected in tensors.items():
        np.testing.assert_allclose(
            smollm2.tensors[name], expected.float().numpy(), rtol=0, atol=1e-6, err_msg=name
        )
