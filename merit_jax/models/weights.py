"""Hugging Face checkpoint tensors to Decoder parameters and back.

Axis letters as in ``decoder.py``: D model, N query heads, K key/value heads,
H head dim, F MLP hidden, V vocabulary, L layers.

``KEY_MAP`` is the single table that both directions use. Each rule maps one
Hugging Face key pattern to one parameter path and contains the transform and its
inverse. Hugging Face ``nn.Linear`` weights are [out, in], and ours are
[in, ...] with the heads split out::

    q_proj.weight [N*H, D]   <->  layers.attn.q_kernel [L, D, N, H]
    k_proj.weight [K*H, D]   <->  layers.attn.k_kernel [L, D, K, H]   (v_proj alike)
    o_proj.weight [D, N*H]   <->  layers.attn.o_kernel [L, N, H, D]
    q_proj.bias   [N*H]      <->  layers.attn.q_bias   [L, N, H]      (k, v: [L, K, H])
    gate_proj.weight [F, D]  <->  layers.mlp.gate_kernel [L, D, F]    (up_proj alike)
    down_proj.weight [D, F]  <->  layers.mlp.down_kernel [L, F, D]
    lm_head.weight [V, D]    <->  lm_head [D, V]   (untied embeddings only)

Per-layer tensors (``model.layers.{i}.…``) are stacked on a leading L axis.
Safetensors files are read with ``safe_open(framework="np")``; pickle files
(``.bin``, ``.pt``) are never opened.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

# Importing ml_dtypes registers "bfloat16" with numpy. Without it, safetensors
# cannot return bf16 tensors as numpy arrays ("data type 'bfloat16' not understood").
import ml_dtypes  # noqa: F401
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from merit_jax.models.config import ModelConfig, to_dtype
from merit_jax.models.decoder import Decoder, abstract_decoder

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

Transform = Callable[[np.ndarray, ModelConfig], np.ndarray]
ParamPath = tuple[str, ...]


class WeightsError(ValueError):
    """Mismatch between a checkpoint and its model config, with every problem in the message."""


# --------------------------------------------------------------------------- key map


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """One Hugging Face key pattern, its parameter path and the transforms between them."""

    hf_key: str  # "{i}" stands for the layer index
    param: ParamPath
    hf_shape: Callable[[ModelConfig], tuple[int, ...]]
    to_param: Transform  # Hugging Face layout -> ours, one layer at a time
    to_hf: Transform  # exact inverse of to_param
    applies: Callable[[ModelConfig], bool] = lambda config: True

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf_key

    def hf_keys(self, config: ModelConfig) -> list[str]:
        if not self.per_layer:
            return [self.hf_key]
        return [self.hf_key.format(i=i) for i in range(config.num_hidden_layers)]


def _identity(x: np.ndarray, config: ModelConfig) -> np.ndarray:
    del config
    return x


def _transpose(x: np.ndarray, config: ModelConfig) -> np.ndarray:
    del config
    return np.ascontiguousarray(x.T)


def _split_heads_in(heads_field: str) -> tuple[Transform, Transform]:
    """Transforms between an input projection [heads*H, D] and a kernel [D, heads, H]."""

    def to_param(w: np.ndarray, config: ModelConfig) -> np.ndarray:
        heads = getattr(config, heads_field)
        return np.ascontiguousarray(w.T.reshape(config.hidden_size, heads, config.head_dim))

    def to_hf(kernel: np.ndarray, config: ModelConfig) -> np.ndarray:
        heads = getattr(config, heads_field)
        return np.ascontiguousarray(kernel.reshape(config.hidden_size, heads * config.head_dim).T)

    return to_param, to_hf


def _split_heads_bias(heads_field: str) -> tuple[Transform, Transform]:
    """Transforms between a bias [heads*H] and [heads, H]."""

    def to_param(b: np.ndarray, config: ModelConfig) -> np.ndarray:
        return b.reshape(getattr(config, heads_field), config.head_dim)

    def to_hf(b: np.ndarray, config: ModelConfig) -> np.ndarray:
        del config
        return b.reshape(-1)

    return to_param, to_hf


def _o_to_param(w: np.ndarray, config: ModelConfig) -> np.ndarray:
    n, h, d = config.num_attention_heads, config.head_dim, config.hidden_size
    return np.ascontiguousarray(w.T.reshape(n, h, d))  # [D, N*H] -> [N, H, D]


def _o_to_hf(kernel: np.ndarray, config: ModelConfig) -> np.ndarray:
    n, h, d = config.num_attention_heads, config.head_dim, config.hidden_size
    return np.ascontiguousarray(kernel.reshape(n * h, d).T)  # [N, H, D] -> [D, N*H]


def _has_bias(config: ModelConfig) -> bool:
    return config.attention_bias


def _untied(config: ModelConfig) -> bool:
    return not config.tie_word_embeddings


def _q_out(c: ModelConfig) -> int:
    return c.num_attention_heads * c.head_dim


def _kv_out(c: ModelConfig) -> int:
    return c.num_key_value_heads * c.head_dim


_ATTN = "model.layers.{i}.self_attn"
_MLP = "model.layers.{i}.mlp"

KEY_MAP: tuple[KeyRule, ...] = (
    KeyRule(
        "model.embed_tokens.weight",
        ("embed",),
        lambda c: (c.vocab_size, c.hidden_size),
        _identity,
        _identity,
    ),
    KeyRule(
        "model.layers.{i}.input_layernorm.weight",
        ("layers", "attn_norm", "scale"),
        lambda c: (c.hidden_size,),
        _identity,
        _identity,
    ),
    KeyRule(
        f"{_ATTN}.q_proj.weight",
        ("layers", "attn", "q_kernel"),
        lambda c: (_q_out(c), c.hidden_size),
        *_split_heads_in("num_attention_heads"),
    ),
    KeyRule(
        f"{_ATTN}.k_proj.weight",
        ("layers", "attn", "k_kernel"),
        lambda c: (_kv_out(c), c.hidden_size),
        *_split_heads_in("num_key_value_heads"),
    ),
    KeyRule(
        f"{_ATTN}.v_proj.weight",
        ("layers", "attn", "v_kernel"),
        lambda c: (_kv_out(c), c.hidden_size),
        *_split_heads_in("num_key_value_heads"),
    ),
    KeyRule(
        f"{_ATTN}.q_proj.bias",
        ("layers", "attn", "q_bias"),
        lambda c: (_q_out(c),),
        *_split_heads_bias("num_attention_heads"),
        applies=_has_bias,
    ),
    KeyRule(
        f"{_ATTN}.k_proj.bias",
        ("layers", "attn", "k_bias"),
        lambda c: (_kv_out(c),),
        *_split_heads_bias("num_key_value_heads"),
        applies=_has_bias,
    ),
    KeyRule(
        f"{_ATTN}.v_proj.bias",
        ("layers", "attn", "v_bias"),
        lambda c: (_kv_out(c),),
        *_split_heads_bias("num_key_value_heads"),
        applies=_has_bias,
    ),
    KeyRule(
        f"{_ATTN}.o_proj.weight",
        ("layers", "attn", "o_kernel"),
        lambda c: (c.hidden_size, _q_out(c)),
        _o_to_param,
        _o_to_hf,
    ),
    KeyRule(
        "model.layers.{i}.post_attention_layernorm.weight",
        ("layers", "mlp_norm", "scale"),
        lambda c: (c.hidden_size,),
        _identity,
        _identity,
    ),
    KeyRule(
        f"{_MLP}.gate_proj.weight",
        ("layers", "mlp", "gate_kernel"),
        lambda c: (c.intermediate_size, c.hidden_size),
        _transpose,
        _transpose,
    ),
    KeyRule(
        f"{_MLP}.up_proj.weight",
        ("layers", "mlp", "up_kernel"),
        lambda c: (c.intermediate_size, c.hidden_size),
        _transpose,
        _transpose,
    ),
    KeyRule(
        f"{_MLP}.down_proj.weight",
        ("layers", "mlp", "down_kernel"),
        lambda c: (c.hidden_size, c.intermediate_size),
        _transpose,
        _transpose,
    ),
    KeyRule(
        "model.norm.weight",
        ("final_norm", "scale"),
        lambda c: (c.hidden_size,),
        _identity,
        _identity,
    ),
    KeyRule(
        "lm_head.weight",
        ("lm_head",),
        lambda c: (c.vocab_size, c.hidden_size),
        _transpose,
        _transpose,
        applies=_untied,
    ),
)

# Buffers that older checkpoints store but that the model recomputes.
_IGNORED_KEYS = (re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),)


def _expected_keys(config: ModelConfig) -> dict[str, tuple[KeyRule, tuple[int, ...]]]:
    """Return every Hugging Face key the config needs, with its rule and [out, in] shape."""
    expected = {}
    for rule in KEY_MAP:
        if rule.applies(config):
            for key in rule.hf_keys(config):
                expected[key] = (rule, rule.hf_shape(config))
    return expected


def _is_ignorable(key: str, config: ModelConfig, tensors: Mapping[str, Any]) -> bool:
    if any(pattern.fullmatch(key) for pattern in _IGNORED_KEYS):
        return True
    # Some exporters write the tied head as a copy of the embedding. Only an
    # identical copy is safe to drop.
    if key == "lm_head.weight" and config.tie_word_embeddings:
        embed = tensors.get("model.embed_tokens.weight")
        head = tensors[key]
        return embed is not None and embed.shape == head.shape and np.array_equal(embed, head)
    return False


# --------------------------------------------------------------------------- load and save


def _describe(config: ModelConfig) -> str:
    return (
        f"model_type={config.model_type}, num_hidden_layers={config.num_hidden_layers}, "
        f"hidden_size={config.hidden_size}, num_attention_heads={config.num_attention_heads}, "
        f"num_key_value_heads={config.num_key_value_heads}, head_dim={config.head_dim}, "
        f"intermediate_size={config.intermediate_size}, vocab_size={config.vocab_size}, "
        f"tie_word_embeddings={config.tie_word_embeddings}, "
        f"attention_bias={config.attention_bias}"
    )


def check_tensors(
    config: ModelConfig,
    tensors: Mapping[str, Any],
    *,
    source: str | os.PathLike[str] | None = None,
    key_files: Mapping[str, str | os.PathLike[str]] | None = None,
) -> None:
    """Raise WeightsError listing every missing, unexpected and misshapen key at once."""
    key_files = key_files or {}

    def where(key: str) -> str:
        return f" in {Path(key_files[key]).name}" if key in key_files else ""

    expected = _expected_keys(config)
    problems = []
    for key, (_, shape) in expected.items():
        if key not in tensors:
            problems.append(f"missing key {key} (expected shape {list(shape)})")
        elif tuple(tensors[key].shape) != shape:
            problems.append(
                f"key {key}{where(key)} has shape {list(tensors[key].shape)}, "
                f"expected {list(shape)}"
            )
    for key in tensors:
        if key not in expected and not _is_ignorable(key, config, tensors):
            problems.append(
                f"unexpected key {key}{where(key)} with shape {list(tensors[key].shape)}"
            )
    if not problems:
        return

    listing = "\n  ".join(problems)
    raise WeightsError(
        f"checkpoint {source or '(in-memory tensors)'} does not match its model config "
        f"({_describe(config)}); {len(problems)} problem(s):\n  {listing}\n"
        "Fix: check that config.json (or the GGUF metadata) belongs to these weights and "
        "describes the same layer count, sizes, head counts and embedding tying. If keys "
        "are missing while the config is right, download the checkpoint again."
    )


def decoder_from_hf(
    config: ModelConfig,
    tensors: Mapping[str, Any],
    *,
    source: str | os.PathLike[str] | None = None,
    key_files: Mapping[str, str | os.PathLike[str]] | None = None,
) -> Decoder:
    """Build a Decoder from Hugging Face-named tensors, cast to ``config.param_dtype``.

    ``tensors`` maps keys such as ``model.layers.0.self_attn.q_proj.weight`` to
    arrays in Hugging Face layout. ``source`` and ``key_files`` (key -> file)
    only name the origin in error messages. Every problem is collected first and
    raised once as a WeightsError.
    """
    check_tensors(config, tensors, source=source, key_files=key_files)
    dtype = to_dtype(config.param_dtype)

    values: dict[ParamPath, jax.Array] = {}
    for rule in KEY_MAP:
        if not rule.applies(config):
            continue
        parts = [rule.to_param(np.asarray(tensors[key]), config) for key in rule.hf_keys(config)]
        stacked = np.stack(parts) if rule.per_layer else parts[0]
        values[rule.param] = jnp.asarray(stacked, dtype=dtype)

    graphdef, abstract_state = nnx.split(abstract_decoder(config))
    filled: dict[Any, Any] = {}
    # The checks below guard KEY_MAP against drifting from the decoder's parameters.
    for raw_path, variable in nnx.to_flat_state(abstract_state):
        path = tuple(str(part) for part in raw_path)
        name = ".".join(path)
        if path not in values:
            raise RuntimeError(f"KEY_MAP has no rule for decoder parameter {name}")
        value = values.pop(path)
        expected_shape = tuple(variable.get_value().shape)
        if value.shape != expected_shape:
            raise RuntimeError(
                f"KEY_MAP produced shape {value.shape} for {name}, "
                f"the decoder expects {expected_shape}"
            )
        filled[path] = variable.replace(value)
    if values:
        raise RuntimeError(f"KEY_MAP fills parameters the decoder lacks: {sorted(values)}")
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def hf_from_decoder(model: Decoder) -> dict[str, np.ndarray]:
    """Convert the parameters to Hugging Face-named numpy arrays, inverting decoder_from_hf.

    Arrays keep the parameter dtype. Keys come in layer order: the embedding, then
    every tensor of layer 0, layer 1, ..., then the final norm and the LM head.
    Tied embeddings produce no ``lm_head.weight``.
    """
    config = model.config
    params = {
        tuple(str(part) for part in path): variable
        for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }

    def fetch(rule: KeyRule) -> np.ndarray:
        # NOTE: np.asarray gathers a sharded array onto this host. That works in one
        # process but not for arrays spread over several hosts.
        return np.asarray(jax.device_get(params[rule.param].get_value()))

    rules = [rule for rule in KEY_MAP if rule.applies(config)]
    layer_rules = [rule for rule in rules if rule.per_layer]
    out: dict[str, np.ndarray] = {}
    layers_written = False
    for rule in rules:
        if not rule.per_layer:
            out[rule.hf_key] = rule.to_hf(fetch(rule), config)
        elif not layers_written:
            # All layer tensors go where the first per-layer rule sits, layer by layer.
            stacked = {layer_rule.param: fetch(layer_rule) for layer_rule in layer_rules}
            for i in range(config.num_hidden_layers):
                for layer_rule in layer_rules:
                    key = layer_rule.hf_key.format(i=i)
                    out[key] = layer_rule.to_hf(stacked[layer_rule.param][i], config)
            layers_written = True
    return out


# --------------------------------------------------------------------------- safetensors


@dataclasses.dataclass
class HFCheckpoint:
    """A Hugging Face model directory read into memory."""

    source: Path  # the directory
    hf_config: dict[str, Any]  # contents of config.json
    tensors: dict[str, np.ndarray]  # Hugging Face names, dtypes as stored (bf16 via ml_dtypes)
    files: list[Path]  # the safetensors files, in shard order
    key_files: dict[str, Path]  # which file each tensor came from


def _open_safetensors(path: Path) -> Any:
    try:
        return safe_open(str(path), framework="np")
    except SafetensorError as err:
        raise WeightsError(
            f"{path} is not a valid safetensors file ({err}). It is probably truncated or "
            "corrupt. Delete it and download the checkpoint again."
        ) from err


def read_safetensors_file(
    path: str | os.PathLike[str], keys: list[str] | None = None
) -> dict[str, np.ndarray]:
    """Read tensors (all, or ``keys``) from one safetensors file as numpy arrays."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file not found: {path}")
    out = {}
    with _open_safetensors(path) as f:
        available = set(f.keys())
        wanted = sorted(available) if keys is None else keys
        absent = [key for key in wanted if key not in available]
        if absent:
            raise WeightsError(
                f"{path} lacks tensors {absent[:10]}{' ...' if len(absent) > 10 else ''} that "
                f"{INDEX_FILE} assigns to it; the shards and the index come from different "
                "downloads. Download the checkpoint again."
            )
        for key in wanted:
            try:
                out[key] = f.get_tensor(key)
            except (SafetensorError, TypeError, ValueError) as err:
                raise WeightsError(
                    f"failed to read tensor {key} from {path} ({err}). The file may be corrupt "
                    "(download it again) or use a dtype that numpy cannot represent."
                ) from err
    return out


def _pickle_error(directory: Path, pickles: list[Path]) -> WeightsError:
    names = ", ".join(p.name for p in pickles[:5]) + (" ..." if len(pickles) > 5 else "")
    return WeightsError(
        f"{directory} has only PyTorch pickle weights ({names}) and no .safetensors files. "
        "merit-jax never loads pickle files, because unpickling can run arbitrary code. "
        "Download the model's .safetensors files instead, or convert the checkpoint once in "
        "an environment you trust:\n"
        '  python -c "from transformers import AutoModelForCausalLM; '
        f"AutoModelForCausalLM.from_pretrained('{directory}')"
        f".save_pretrained('{directory}-safetensors')\"\n"
        "and load the new directory."
    )


def safetensors_files(directory: str | os.PathLike[str]) -> tuple[list[Path], dict[str, str]]:
    """Return the weight files of a Hugging Face dir and the key -> file name map.

    Uses ``model.safetensors.index.json`` when present (every shard it names must
    exist), else ``model.safetensors``. Raises WeightsError for a dir with only
    pickle weights or none at all.
    """
    directory = Path(directory)
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise WeightsError(
                f"{index_path} is not a valid safetensors index ({err!r}). It needs a "
                '"weight_map" object from tensor name to shard file. Download it again.'
            ) from err
        shard_names = list(dict.fromkeys(weight_map.values()))
        missing = [name for name in shard_names if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{index_path} names {len(shard_names)} shard(s) but {len(missing)} are not in "
                f"{directory}: {missing}. Download the missing shards (or the whole checkpoint) "
                "again."
            )
        return [directory / name for name in shard_names], dict(weight_map)

    single = directory / SINGLE_FILE
    if single.is_file():
        return [single], {}

    others = sorted(directory.glob("*.safetensors"))
    if len(others) == 1:
        return others, {}
    if others:
        raise WeightsError(
            f"{directory} has {len(others)} .safetensors files ({[p.name for p in others]}) "
            f"but no {INDEX_FILE} to say which tensors each holds; add the index file "
            "from the original checkpoint."
        )
    pickles = sorted(p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise _pickle_error(directory, pickles)
    raise FileNotFoundError(
        f"no weights found in {directory}: expected {SINGLE_FILE} or {INDEX_FILE} with its "
        "shards. Check the path, or download the model's .safetensors files into it."
    )


def read_safetensors_dir(path: str | os.PathLike[str]) -> HFCheckpoint:
    """Read config.json and every safetensors shard of a Hugging Face model dir."""
    directory = Path(path).expanduser()
    if not directory.exists():
        raise FileNotFoundError(f"model directory not found: {directory}")
    if not directory.is_dir():
        raise NotADirectoryError(f"{directory} is not a directory. Pass a Hugging Face model dir.")
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{directory} has no {CONFIG_FILE}. A Hugging Face model dir needs the model's "
            f"{CONFIG_FILE} next to its weights."
        )
    try:
        hf_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from err

    files, weight_map = safetensors_files(directory)
    tensors: dict[str, np.ndarray] = {}
    key_files: dict[str, Path] = {}
    for file in files:
        keys = [k for k, name in weight_map.items() if name == file.name] if weight_map else None
        for key, array in read_safetensors_file(file, keys).items():
            tensors[key] = array
            key_files[key] = file
    total_bytes = sum(a.nbytes for a in tensors.values())
    logger.info(
        "read %d tensors (%.1f MB) from %d file(s) in %s",
        len(tensors),
        total_bytes / 1e6,
        len(files),
        directory,
    )
    return HFCheckpoint(directory, hf_config, tensors, files, key_files)
