"""Count-sketch of a gradient pytree into a fixed-size vector, inside ``jax.jit``.

A count-sketch maps a parameter vector g of size P to a vector of size d:

    sketch[b] = sum over i with h(i) = b of s(i) * g[i]

with a bucket h(i) in [0, d) and a sign s(i) in {-1, +1} per global parameter
index i. The inner product of two sketches is an unbiased estimate of the
inner product of the full vectors. Its error on a cosine is of order
1/sqrt(d), so cosines between task gradients survive the reduction from P
to d coordinates.

Global parameter index: the leaves of the pytree are put in a fixed order by
their key path (see ``parameter_layout``). Each leaf gets an offset equal to
the number of elements of the leaves before it. Element j of the row-major
flattened leaf gets index offset + j. h and s come from one MurmurHash3
(x86, 32-bit) of the 8-byte little-endian key (index mod 2^32, index div 2^32)
under the sketch seed. Bit 31 of the hash gives the sign (set: -1) and bits
0..30 modulo d give the bucket, so the two are independent bits of one hash.
The assignment therefore depends only on the tree structure, shapes, d and
the seed: not on the machine, the backend, the sharding or the process count.

Every leaf is reduced with one scatter-add over its elements, and the leaves
are sketched one after another (see ``_offset_after``). The temporary memory
is therefore a few arrays of one leaf's size, not of the whole tree; a test
checks this on the CPU backend.

NOTE: the bucket and sign of every element are identical everywhere, but the
float32 sums inside a bucket run in an order that XLA chooses, so sketches from
different backends or shardings can differ in the last bits. XLA's GPU
scatter-add uses atomics, so GPU runs repeat bit for bit only with
XLA_FLAGS=--xla_gpu_deterministic_ops=true (not tested on GPU).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# MurmurHash3_x86_32 constants.
_C1 = np.uint32(0xCC9E2D51)
_C2 = np.uint32(0x1B873593)
_N = np.uint32(0xE6546B64)
_FMIX1 = np.uint32(0x85EBCA6B)
_FMIX2 = np.uint32(0xC2B2AE35)
_KEY_BYTES = np.uint32(8)

MAX_SKETCH_DIM = 2**31 - 1
"""Largest sketch dimension: buckets come from 31 hash bits."""

DEFAULT_MAX_EXACT_SIZE = 2**28
"""Default bound on the length of an exact (unsketched) gradient vector: 1 GiB in float32."""


@dataclasses.dataclass(frozen=True)
class SketchConfig:
    """Settings of the reduction of task gradients to vectors.

    Attributes:
        dim: sketch dimension d, or None for exact mode, which keeps the whole
            flattened gradient in float32.
        seed: hash seed in [0, 2^32). Gradients are only comparable when they
            were sketched with the same dim and seed.
        max_exact_size: exact mode raises when the gradient has more elements
            than this, because T such vectors are kept in memory at once.
    """

    dim: int | None = 2**16
    seed: int = 0
    max_exact_size: int = DEFAULT_MAX_EXACT_SIZE

    def __post_init__(self) -> None:
        if self.dim is not None and not 1 <= self.dim <= MAX_SKETCH_DIM:
            raise ValueError(
                f"SketchConfig.dim={self.dim} is out of range: use an integer in "
                f"[1, {MAX_SKETCH_DIM}], or None for exact gradients"
            )
        _check_seed(self.seed)
        if self.max_exact_size < 1:
            raise ValueError(f"SketchConfig.max_exact_size={self.max_exact_size} must be >= 1")

    @property
    def exact(self) -> bool:
        """Whether gradients are kept whole instead of sketched."""
        return self.dim is None


@dataclasses.dataclass(frozen=True)
class LeafSlot:
    """Place of one pytree leaf in the global parameter index.

    Attributes:
        path: key path, the key names joined with "/".
        offset: global index of the leaf's first element.
        size: number of elements.
        shape: leaf shape.
    """

    path: str
    offset: int
    size: int
    shape: tuple[int, ...]


def _key_name(key: Any) -> str | int:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            value = getattr(key, attribute)
            return value if isinstance(value, int) else str(value)
    return str(key)


def _sort_key(names: Sequence[str | int]) -> tuple[tuple[int, int, str], ...]:
    # Integers (list indices, NNX layer keys) sort numerically and before strings,
    # so "layers/2" comes before "layers/10" and mixed key types never compare.
    return tuple((0, n, "") if isinstance(n, int) else (1, 0, n) for n in names)


def _ordered_leaves(tree: Any) -> list[tuple[str, Any]]:
    """Return (path, leaf) pairs sorted by key path.

    Sorting by the tuple of key names (not by the joined string) keeps the order
    unchanged when every path gains the same suffix, such as the ``value``
    attribute of an NNX ``State`` compared to its pure-dict form.
    """
    with_path, _ = jax.tree_util.tree_flatten_with_path(tree)
    named = [([_key_name(k) for k in path], leaf) for path, leaf in with_path]
    named.sort(key=lambda item: _sort_key(item[0]))
    return [("/".join(str(n) for n in names), leaf) for names, leaf in named]


def _batch_shape(tree: Any, num_batch_dims: int) -> tuple[int, ...]:
    if num_batch_dims not in (0, 1):
        raise ValueError(f"num_batch_dims={num_batch_dims} is invalid: use 0 or 1")
    shapes = {path: tuple(np.shape(leaf))[:num_batch_dims] for path, leaf in _ordered_leaves(tree)}
    distinct = set(shapes.values())
    if len(distinct) > 1 or any(len(shape) < num_batch_dims for shape in distinct):
        raise ValueError(
            f"with num_batch_dims={num_batch_dims} every leaf needs the same leading batch "
            f"shape, got {shapes}"
        )
    return distinct.pop() if distinct else ()


def parameter_layout(tree: Any, *, num_batch_dims: int = 0) -> tuple[LeafSlot, ...]:
    """Return the global index layout of a pytree's leaves, in sketch order.

    Works on concrete arrays, tracers and ``jax.ShapeDtypeStruct`` leaves. With
    ``num_batch_dims=1`` the leading axis of every leaf is a batch axis and is
    left out of the shapes and sizes.
    """
    _batch_shape(tree, num_batch_dims)
    slots = []
    offset = 0
    for path, leaf in _ordered_leaves(tree):
        shape = tuple(int(n) for n in np.shape(leaf))[num_batch_dims:]
        size = math.prod(shape)
        slots.append(LeafSlot(path=path, offset=offset, size=size, shape=shape))
        offset += size
    return tuple(slots)


def _check_seed(seed: int) -> None:
    if not 0 <= seed < 2**32:
        raise ValueError(f"sketch seed={seed} is out of range: use an integer in [0, 2^32)")


def _check_floating(path: str, leaf: Any) -> None:
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
        raise TypeError(
            f"gradient leaf {path!r} has dtype {leaf.dtype}: sketches need floating-point "
            "leaves; filter integer and key leaves out of the tree first"
        )


def _rotl(x: jax.Array, r: int) -> jax.Array:
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def _mix_word(h: jax.Array, k: jax.Array) -> jax.Array:
    k = k * _C1
    k = _rotl(k, 15)
    k = k * _C2
    h = h ^ k
    h = _rotl(h, 13)
    return h * np.uint32(5) + _N


def _finalize(h: jax.Array) -> jax.Array:
    h = h ^ (h >> np.uint32(16))
    h = h * _FMIX1
    h = h ^ (h >> np.uint32(13))
    h = h * _FMIX2
    return h ^ (h >> np.uint32(16))


def murmur3_index_hash(index_lo: jax.Array, index_hi: jax.Array, seed: int) -> jax.Array:
    """Hash 64-bit indices given as two uint32 words with MurmurHash3_x86_32.

    The result equals MurmurHash3_x86_32 of the 8 bytes
    ``index_lo.to_bytes(4, "little") + index_hi.to_bytes(4, "little")`` with ``seed``.
    """
    _check_seed(seed)
    h = jnp.full(jnp.shape(index_lo), np.uint32(seed), dtype=jnp.uint32)
    h = _mix_word(h, index_lo.astype(jnp.uint32))
    h = _mix_word(h, index_hi.astype(jnp.uint32))
    h = h ^ _KEY_BYTES
    return _finalize(h)


def _split_offset(offset: int) -> jax.Array:
    return jnp.array([offset & 0xFFFFFFFF, offset >> 32], dtype=jnp.uint32)


def bucket_and_sign(
    offset: int | jax.Array, size: int, *, dim: int, seed: int
) -> tuple[jax.Array, jax.Array]:
    """Return buckets (int32) and signs (float32, +-1) of global indices [offset, offset+size).

    ``offset`` is a Python int or a uint32 array [2] holding (offset mod 2^32,
    offset div 2^32).
    """
    if size >= 2**32:
        raise ValueError(
            f"a leaf of {size} elements is too large: leaves must have < 2^32 elements"
        )
    words = _split_offset(offset) if isinstance(offset, int) else offset
    offset_lo, offset_hi = words[0], words[1]
    local = jax.lax.iota(jnp.uint32, size)
    index_lo = local + offset_lo  # wraps modulo 2^32
    carry = (index_lo < offset_lo).astype(jnp.uint32)
    index_hi = offset_hi + carry
    h = murmur3_index_hash(index_lo, index_hi, seed)
    bucket = ((h & np.uint32(0x7FFFFFFF)) % np.uint32(dim)).astype(jnp.int32)
    sign = jnp.where((h >> np.uint32(31)) == 0, 1.0, -1.0).astype(jnp.float32)
    return bucket, sign


def sketch_leaf(
    leaf: jax.Array, offset: int | jax.Array, *, dim: int, seed: int, num_batch_dims: int = 0
) -> jax.Array:
    """Count-sketch one leaf whose first element has global index ``offset``.

    Returns [d] float32, or [M, d] when ``num_batch_dims=1`` and ``leaf`` is [M, ...].
    """
    batch_shape = tuple(leaf.shape[:num_batch_dims])
    flat = jnp.reshape(leaf, batch_shape + (-1,)).astype(jnp.float32)
    bucket, sign = bucket_and_sign(offset, flat.shape[-1], dim=dim, seed=seed)
    out = jnp.zeros(batch_shape + (dim,), jnp.float32)
    return out.at[..., bucket].add(sign * flat, mode="promise_in_bounds")


def _offset_after(total: jax.Array, offset: int) -> tuple[jax.Array, jax.Array]:
    """Return ``total`` and the offset words of the next leaf, made to depend on ``total``.

    Left alone, XLA computes the hashes of all leaves first, because they do not
    depend on the gradient values, and keeps them alive together: temporary
    memory of twice the tree's size. Deriving a zero from the running total
    forces one leaf after another, so temporaries stay at a few arrays of one
    leaf's size. min(x, 0) = 0 for unsigned x, so the offset is unchanged.
    """
    total, probe = jax.lax.optimization_barrier((total, jnp.ravel(total)[0]))
    zero = jnp.minimum(jax.lax.bitcast_convert_type(probe, jnp.uint32), np.uint32(0))
    return total, _split_offset(offset) + zero


def count_sketch(tree: Any, *, dim: int, seed: int, num_batch_dims: int = 0) -> jax.Array:
    """Count-sketch a pytree of floating-point arrays into a [d] float32 vector.

    Traceable: call it inside ``jax.jit``; the layout only uses static shapes.
    The sketch is linear in the tree. To sketch M gradients at once, stack them
    along a new leading axis and pass ``num_batch_dims=1``: the result is
    [M, d] and the hashes are computed once (under ``jax.vmap`` they would be
    computed for every batch element).
    """
    if not 1 <= dim <= MAX_SKETCH_DIM:
        raise ValueError(
            f"sketch dim={dim} is out of range: use an integer in [1, {MAX_SKETCH_DIM}]"
        )
    _check_seed(seed)
    batch_shape = _batch_shape(tree, num_batch_dims)
    total = jnp.zeros(batch_shape + (dim,), jnp.float32)
    ordered = _ordered_leaves(tree)
    layout = parameter_layout(tree, num_batch_dims=num_batch_dims)
    for slot, (path, leaf) in zip(layout, ordered, strict=True):
        _check_floating(path, leaf)
        if not slot.size:
            continue
        total, offset = _offset_after(total, slot.offset)
        total = total + sketch_leaf(leaf, offset, dim=dim, seed=seed, num_batch_dims=num_batch_dims)
    return total


def flatten_exact(tree: Any, *, max_size: int = DEFAULT_MAX_EXACT_SIZE) -> jax.Array:
    """Concatenate a pytree's leaves, flattened in sketch order, into one float32 vector.

    Element i of the result is the element with global index i. Raises when the
    tree has more than ``max_size`` elements.
    """
    ordered = _ordered_leaves(tree)
    size = sum(math.prod(np.shape(leaf)) for _, leaf in ordered)
    if size > max_size:
        raise ValueError(
            f"exact gradients have {size} elements, more than max_exact_size={max_size}: "
            "use a sketch (SketchConfig.dim = an integer such as 65536) or raise max_exact_size"
        )
    for path, leaf in ordered:
        _check_floating(path, leaf)
    if not ordered:
        return jnp.zeros((0,), jnp.float32)
    return jnp.concatenate([jnp.ravel(leaf).astype(jnp.float32) for _, leaf in ordered])


def sketch_gradient(tree: Any, config: SketchConfig) -> jax.Array:
    """Reduce a gradient pytree to a float32 vector as set by ``config`` (count-sketch or exact)."""
    if config.dim is None:
        return flatten_exact(tree, max_size=config.max_exact_size)
    return count_sketch(tree, dim=config.dim, seed=config.seed)


def sketch_size(tree: Any, config: SketchConfig) -> int:
    """Return the length of ``sketch_gradient(tree, config)``."""
    if config.dim is None:
        return sum(slot.size for slot in parameter_layout(tree))
    return config.dim
