"""Decoder configuration, built from a Hugging Face ``config.json``.

One frozen dataclass covers the Llama family (SmolLM2, Llama 3.x with llama3
RoPE scaling) and the Qwen2 family (Qwen2.5: q/k/v bias, tied or untied
embeddings). Field names follow transformers' config names where one exists.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def to_dtype(name: str) -> Any:
    """Return the jnp dtype for a name such as ``"bfloat16"``."""
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """llama3 RoPE frequency scaling (Llama 3.1+); ``None`` in ModelConfig means plain RoPE."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of one decoder-only transformer."""

    model_type: str  # "llama" or "qwen2"
    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F
    num_hidden_layers: int  # L
    num_attention_heads: int  # N
    num_key_value_heads: int  # K; N must be a multiple of K (grouped-query attention)
    head_dim: int  # H
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projection bias (True for Qwen2)
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None  # a list in config.json is stored as a tuple
    # Numerics and layout switches; not part of the checkpoint.
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    scan_layers: bool = True  # nnx.scan over the layer stack (faster compile)
    remat: bool = False  # recompute layer activations in the backward pass

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_ARCHITECTURES.values():
            raise ValueError(
                f"model_type={self.model_type!r} is not supported; "
                f"use one of {sorted(SUPPORTED_ARCHITECTURES.values())}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}; grouped-query attention "
                "needs every key/value head shared by the same number of query heads"
            )
        to_dtype(self.param_dtype)
        to_dtype(self.compute_dtype)
        # A list would make the config, and every NNX GraphDef holding it, unhashable,
        # which breaks its use as a static jax.jit argument.
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, int):
            return [self.eos_token_id]
        return list(self.eos_token_id)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **overrides: Any) -> ModelConfig:
        """Build a config from the contents of a Hugging Face ``config.json``."""
        architectures = hf.get("architectures") or []
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES.values():
            known = [
                SUPPORTED_ARCHITECTURES[a] for a in architectures if a in SUPPORTED_ARCHITECTURES
            ]
            if not known:
                raise ValueError(
                    f"unsupported architecture: model_type={model_type!r}, "
                    f"architectures={architectures!r}; merit-jax supports "
                    f"{sorted(SUPPORTED_ARCHITECTURES)} (Llama and Qwen2 families)"
                )
            model_type = known[0]
        missing = [
            k
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
            )
            if k not in hf
        ]
        if missing:
            raise ValueError(f"config.json is missing required fields {missing}")

        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        rope_scaling = None
        # transformers 5 writes the scaling (and rope_theta) as "rope_parameters".
        scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "llama3":
                rope_scaling = RopeScaling(
                    factor=float(scaling["factor"]),
                    low_freq_factor=float(scaling["low_freq_factor"]),
                    high_freq_factor=float(scaling["high_freq_factor"]),
                    original_max_position_embeddings=int(
                        scaling["original_max_position_embeddings"]
                    ),
                )
            elif kind not in (None, "default"):
                raise ValueError(
                    f"rope_scaling type {kind!r} is not supported; only 'llama3' and "
                    "plain RoPE are implemented"
                )
        rope_theta = hf.get("rope_theta")
        if rope_theta is None:
            # transformers 5 moved rope_theta into rope_parameters.
            rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)

        fields: dict[str, Any] = dict(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v bias; Llama has it only when attention_bias is set.
            attention_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_json(cls, path: str | Path, **overrides: Any) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        return cls.from_hf_dict(hf, **overrides)

    def to_hf_dict(self) -> dict[str, Any]:
        """Return a ``config.json`` dict that transformers reads back to the same model."""
        architecture = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}[self.model_type]
        hf: dict[str, Any] = {
            "architectures": [architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (
                list(self.eos_token_id)
                if isinstance(self.eos_token_id, tuple)
                else self.eos_token_id
            ),
            "torch_dtype": self.param_dtype,
        }
        if self.model_type == "llama":
            hf["attention_bias"] = self.attention_bias
            hf["mlp_bias"] = False
        if self.rope_scaling is not None:
            hf["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        return hf
