"""Decoder-only transformer for the Llama and Qwen2 families, in Flax NNX.

Axis letters, used in einsum strings, array names and shape comments:

    B  batch                 T  query sequence        S  key/cache sequence
    D  model (hidden)        N  query heads           K  key/value heads
    G  query heads per key/value head (N = K * G)     H  head dim
    F  MLP hidden            V  vocabulary            L  layers

The layer stack is stored stacked: every layer parameter has a leading L axis,
whether the forward pass runs it with ``nnx.scan`` (``scan_layers=True``) or
as an unrolled Python loop. Checkpoints therefore have one layout for both.

Masking: ``segment_ids`` [B, T] mark packed sequences (1, 2, ...) and padding
(0). A query attends to a key when the key is at or before it, in the same
segment, and not padding. ``positions`` [B, T] feed RoPE and restart at 0 in
each packed segment. With a KV cache, causality is by cache slot: slots are
written left to right, so slot order is time order.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from merit_jax.models.config import ModelConfig, RopeScaling, to_dtype

_INIT_STD = 0.02


# --------------------------------------------------------------------------- RoPE


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> jax.Array:
    """Return the H/2 RoPE inverse frequencies, with llama3 scaling when given.

    llama3 scaling (Llama 3.1) keeps high frequencies, divides low frequencies by
    ``factor`` and interpolates smoothly between the two wavelength bands.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq
    low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x_btnh: jax.Array, positions_bt: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate ``x`` by position, in Hugging Face's rotate-half layout.

    The first and second halves of the head dimension form the (real, imaginary)
    pairs, as in transformers' Llama; llama.cpp's GGUF files use interleaved
    pairs, and the GGUF reader un-permutes them into this layout.
    """
    angles_bth = positions_bt[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
    angles_bth = jnp.concatenate([angles_bth, angles_bth], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles_bth), jnp.sin(angles_bth)
    x32 = x_btnh.astype(jnp.float32)
    half = x32.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x_btnh.dtype)


# --------------------------------------------------------------------------- layers


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Any) -> nnx.Param:
    return nnx.Param(_INIT_STD * jax.random.normal(rngs.params(), shape, dtype=dtype))


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, computed in float32 as transformers does."""

    def __init__(self, dim: int, eps: float, *, param_dtype: Any):
        self.scale = nnx.Param(jnp.ones((dim,), dtype=param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE and an optional KV cache."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        dtype = to_dtype(config.param_dtype)
        d, n, k, h = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.q_kernel = _normal(rngs, (d, n, h), dtype)  # [D, N, H]
        self.k_kernel = _normal(rngs, (d, k, h), dtype)  # [D, K, H]
        self.v_kernel = _normal(rngs, (d, k, h), dtype)  # [D, K, H]
        self.o_kernel = _normal(rngs, (n, h, d), dtype)  # [N, H, D]
        if config.attention_bias:
            self.q_bias = nnx.Param(jnp.zeros((n, h), dtype))
            self.k_bias = nnx.Param(jnp.zeros((k, h), dtype))
            self.v_bias = nnx.Param(jnp.zeros((k, h), dtype))
        self.config = config

    def __call__(
        self,
        x_btd: jax.Array,
        positions_bt: jax.Array,
        segment_ids_bt: jax.Array,
        inv_freq: jax.Array,
        cache: tuple[jax.Array, jax.Array, jax.Array, jax.Array] | None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        cfg = self.config
        cdt = to_dtype(cfg.compute_dtype)
        q_btnh = jnp.einsum("btd,dnh->btnh", x_btd, self.q_kernel[...].astype(cdt))
        k_btkh = jnp.einsum("btd,dkh->btkh", x_btd, self.k_kernel[...].astype(cdt))
        v_btkh = jnp.einsum("btd,dkh->btkh", x_btd, self.v_kernel[...].astype(cdt))
        if cfg.attention_bias:
            q_btnh = q_btnh + self.q_bias[...].astype(cdt)
            k_btkh = k_btkh + self.k_bias[...].astype(cdt)
            v_btkh = v_btkh + self.v_bias[...].astype(cdt)
        q_btnh = apply_rope(q_btnh, positions_bt, inv_freq)
        k_btkh = apply_rope(k_btkh, positions_bt, inv_freq)

        b, t = segment_ids_bt.shape
        if cache is None:
            keys_bskh, values_bskh = k_btkh, v_btkh
            key_segments_bs = segment_ids_bt
            query_slots_t = jnp.arange(t)
            key_slots_s = jnp.arange(t)
            new_kv = None
        else:
            # Write the new keys and values at slots [end, end + T), then attend to all S slots.
            cache_k, cache_v, cache_segments_bs, end = cache
            keys_bskh = jax.lax.dynamic_update_slice(
                cache_k, k_btkh.astype(cache_k.dtype), (0, end, 0, 0)
            )
            values_bskh = jax.lax.dynamic_update_slice(
                cache_v, v_btkh.astype(cache_v.dtype), (0, end, 0, 0)
            )
            key_segments_bs = jax.lax.dynamic_update_slice(
                cache_segments_bs, segment_ids_bt, (0, end)
            )
            query_slots_t = end + jnp.arange(t)
            key_slots_s = jnp.arange(cache_k.shape[1])
            new_kv = (keys_bskh, values_bskh)

        mask_bts = (
            (key_slots_s[None, None, :] <= query_slots_t[None, :, None])
            & (key_segments_bs[:, None, :] == segment_ids_bt[:, :, None])
            & (key_segments_bs[:, None, :] != 0)
        )

        # Group the N query heads as K groups of G so each key/value head is read once.
        k_heads = cfg.num_key_value_heads
        q_btkgh = q_btnh.reshape(b, t, k_heads, -1, cfg.head_dim)
        scores_bkgts = jnp.einsum(
            "btkgh,bskh->bkgts", q_btkgh, keys_bskh.astype(cdt), preferred_element_type=jnp.float32
        ) / math.sqrt(cfg.head_dim)
        scores_bkgts = jnp.where(mask_bts[:, None, None, :, :], scores_bkgts, -1e30)
        probs_bkgts = jax.nn.softmax(scores_bkgts, axis=-1)
        # A fully masked row (a padding query) would average all keys; zero it instead.
        probs_bkgts = jnp.where(mask_bts.any(-1)[:, None, None, :, None], probs_bkgts, 0.0)
        out_btkgh = jnp.einsum(
            "bkgts,bskh->btkgh", probs_bkgts.astype(cdt), values_bskh.astype(cdt)
        )
        out_btnh = out_btkgh.reshape(b, t, cfg.num_attention_heads, cfg.head_dim)
        out_btd = jnp.einsum("btnh,nhd->btd", out_btnh, self.o_kernel[...].astype(cdt))
        return out_btd, new_kv


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        dtype = to_dtype(config.param_dtype)
        d, f = config.hidden_size, config.intermediate_size
        self.gate_kernel = _normal(rngs, (d, f), dtype)  # [D, F]
        self.up_kernel = _normal(rngs, (d, f), dtype)  # [D, F]
        self.down_kernel = _normal(rngs, (f, d), dtype)  # [F, D]
        self.compute_dtype = to_dtype(config.compute_dtype)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        cdt = self.compute_dtype
        b, t, d = x_btd.shape
        # Matmuls on [B*T, D] rows: with [B, T, D] einsums, XLA:CPU wrote the [B, T, F]
        # gradients transposed to contract over B and T, which made a float32 training
        # step of the 135M model about 15% slower on a 2-core CPU.
        x_rd = x_btd.reshape(b * t, d)  # R = B*T rows
        gate_rf = x_rd @ self.gate_kernel[...].astype(cdt)
        up_rf = x_rd @ self.up_kernel[...].astype(cdt)
        out_rd = (jax.nn.silu(gate_rf) * up_rf) @ self.down_kernel[...].astype(cdt)
        return out_rd.reshape(b, t, d)


class Block(nnx.Module):
    """One pre-norm transformer layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        dtype = to_dtype(config.param_dtype)
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=dtype)
        self.attn = Attention(config, rngs=rngs)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=dtype)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x_btd, positions_bt, segment_ids_bt, inv_freq, cache):
        attn_out, new_kv = self.attn(
            self.attn_norm(x_btd), positions_bt, segment_ids_bt, inv_freq, cache
        )
        x_btd = x_btd + attn_out
        x_btd = x_btd + self.mlp(self.mlp_norm(x_btd))
        return x_btd, new_kv


# --------------------------------------------------------------------------- cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer for incremental decoding.

    ``end`` is the number of slots already written; all rows share it, so
    left-padded prompts mark their padding with segment id 0.
    """

    keys: jax.Array  # [L, B, S, K, H]
    values: jax.Array  # [L, B, S, K, H]
    segment_ids: jax.Array  # [B, S], 0 for empty or padding slots
    end: jax.Array  # int32 scalar

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> KVCache:
        dtype = dtype or to_dtype(config.compute_dtype)
        shape = (
            config.num_hidden_layers,
            batch,
            max_len,
            config.num_key_value_heads,
            config.head_dim,
        )
        return cls(
            keys=jnp.zeros(shape, dtype),
            values=jnp.zeros(shape, dtype),
            segment_ids=jnp.zeros((batch, max_len), jnp.int32),
            end=jnp.zeros((), jnp.int32),
        )


# --------------------------------------------------------------------------- model


class Decoder(nnx.Module):
    """Causal language model: embeddings, L stacked blocks, final norm, LM head."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        dtype = to_dtype(config.param_dtype)
        self.config = config
        self.embed = _normal(rngs, (config.vocab_size, config.hidden_size), dtype)  # [V, D]

        @nnx.split_rngs(splits=config.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(layer_rngs: nnx.Rngs) -> Block:
            return Block(config, rngs=layer_rngs)

        self.layers = make_layers(rngs)
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=dtype)
        if not config.tie_word_embeddings:
            self.lm_head = _normal(rngs, (config.hidden_size, config.vocab_size), dtype)  # [D, V]

    def __call__(
        self,
        tokens_bt: jax.Array,
        *,
        positions_bt: jax.Array | None = None,
        segment_ids_bt: jax.Array | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
    ) -> tuple[jax.Array, KVCache | None]:
        """Return float32 logits [B, T, V] (or final hidden states [B, T, D]) and the new cache."""
        cfg = self.config
        cdt = to_dtype(cfg.compute_dtype)
        b, t = tokens_bt.shape
        if segment_ids_bt is None:
            segment_ids_bt = jnp.ones((b, t), jnp.int32)
        if positions_bt is None:
            start = 0 if cache is None else cache.end
            positions_bt = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        inv_freq = rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

        x_btd = jnp.take(self.embed[...], tokens_bt, axis=0).astype(cdt)
        x_btd, new_cache = self._run_layers(x_btd, positions_bt, segment_ids_bt, inv_freq, cache)
        x_btd = self.final_norm(x_btd)
        if return_hidden:
            return x_btd, new_cache
        return self.logits(x_btd), new_cache

    def logits(self, x_btd: jax.Array) -> jax.Array:
        """Project final hidden states to float32 vocabulary logits [B, T, V]."""
        cdt = to_dtype(self.config.compute_dtype)
        if self.config.tie_word_embeddings:
            return jnp.einsum(
                "btd,vd->btv",
                x_btd,
                self.embed[...].astype(cdt),
                preferred_element_type=jnp.float32,
            )
        return jnp.einsum(
            "btd,dv->btv", x_btd, self.lm_head[...].astype(cdt), preferred_element_type=jnp.float32
        )

    def _run_layers(self, x_btd, positions_bt, segment_ids_bt, inv_freq, cache):
        cfg = self.config
        layer_cache = None if cache is None else (cache.keys, cache.values)

        def step(x_btd, block, kv):
            full = None if kv is None else (kv[0], kv[1], cache.segment_ids, cache.end)
            return block(x_btd, positions_bt, segment_ids_bt, inv_freq, full)

        if cfg.scan_layers:

            def body(x_btd, block, kv):
                x_btd, new_kv = step(x_btd, block, kv)
                return x_btd, new_kv

            if cfg.remat:
                body = nnx.remat(body)
            scanned = nnx.scan(body, in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0))
            x_btd, new_kv = scanned(x_btd, self.layers, layer_cache)
        else:
            graphdef, state = nnx.split(self.layers)
            # Unstack every parameter once: its gradient is then one stack. Indexing a[i]
            # per layer made the backward pass build and add a zero-padded [L, ...]
            # gradient per layer (135M model: about 4x the step time and 12 GB).
            leaves, treedef = jax.tree.flatten(state)
            layer_leaves = [jnp.unstack(leaf) for leaf in leaves]
            new_k, new_v = [], []
            for i in range(cfg.num_hidden_layers):
                layer_state = jax.tree.unflatten(treedef, [per[i] for per in layer_leaves])
                block = nnx.merge(graphdef, layer_state)
                kv = None if layer_cache is None else (layer_cache[0][i], layer_cache[1][i])
                run = nnx.remat(step) if cfg.remat else step
                x_btd, kv_out = run(x_btd, block, kv)
                if kv_out is not None:
                    new_k.append(kv_out[0])
                    new_v.append(kv_out[1])
            new_kv = (jnp.stack(new_k), jnp.stack(new_v)) if new_k else None

        if cache is None:
            return x_btd, None
        t = segment_ids_bt.shape[1]
        new_cache = KVCache(
            keys=new_kv[0],
            values=new_kv[1],
            segment_ids=jax.lax.dynamic_update_slice(
                cache.segment_ids, segment_ids_bt, (0, cache.end)
            ),
            end=cache.end + t,
        )
        return x_btd, new_cache


def init_decoder(config: ModelConfig, seed: int = 0) -> Decoder:
    """Build a decoder with random weights (normal, std 0.02; norms at 1)."""
    return Decoder(config, rngs=nnx.Rngs(params=seed))


def abstract_decoder(config: ModelConfig) -> Decoder:
    """Build a decoder whose parameters are shape/dtype placeholders, for loading into."""
    return nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(params=0)))
