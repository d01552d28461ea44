"""Count-sketch tests against a pure-Python MurmurHash3 and a naive numpy sketch."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from merit_jax.conflict.sketch import (
    SketchConfig,
    count_sketch,
    flatten_exact,
    murmur3_index_hash,
    parameter_layout,
    sketch_gradient,
    sketch_leaf,
    sketch_size,
)

# --------------------------------------------------------------------------- references


def murmur3_32_reference(data: bytes, seed: int) -> int:
    """MurmurHash3_x86_32 written from the algorithm, on Python integers."""
    mask = 0xFFFFFFFF
    c1, c2 = 0xCC9E2D51, 0x1B873593
    h = seed & mask
    blocks = len(data) // 4
    for i in range(blocks):
        k = struct.unpack_from("<I", data, 4 * i)[0]
        k = (k * c1) & mask
        k = ((k << 15) | (k >> 17)) & mask
        k = (k * c2) & mask
        h ^= k
        h = ((h << 13) | (h >> 19)) & mask
        h = (h * 5 + 0xE6546B64) & mask
    tail = data[4 * blocks :]
    if tail:
        k = int.from_bytes(tail, "little")
        k = (k * c1) & mask
        k = ((k << 15) | (k >> 17)) & mask
        k = (k * c2) & mask
        h ^= k
    h ^= len(data)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & mask
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & mask
    h ^= h >> 16
    return h


def naive_bucket_sign(index: int, dim: int, seed: int) -> tuple[int, float]:
    h = murmur3_32_reference(index.to_bytes(8, "little"), seed)
    return (h & 0x7FFFFFFF) % dim, (-1.0 if h >> 31 else 1.0)


def naive_sketch(vector: np.ndarray, dim: int, seed: int, offset: int = 0) -> np.ndarray:
    out = np.zeros(dim, dtype=np.float64)
    for j, value in enumerate(vector):
        bucket, sign = naive_bucket_sign(offset + j, dim, seed)
        out[bucket] += sign * float(value)
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def small_tree(key: int = 0) -> dict:
    keys = jax.random.split(jax.random.key(key), 4)
    return {
        "layers": [
            {"w": jax.random.normal(keys[0], (3, 5))},
            {"w": jax.random.normal(keys[1], (3, 5))},
        ],
        "embed": jax.random.normal(keys[2], (7,)).astype(jnp.bfloat16),
        "norm": {"scale": jax.random.normal(keys[3], (2, 1, 3))},
    }


# --------------------------------------------------------------------------- hash


@pytest.mark.parametrize(
    "data, seed, expected",
    [
        (b"", 0, 0x00000000),
        (b"", 1, 0x514E28B7),
        (b"", 0xFFFFFFFF, 0x81F16F39),
        (b"\0\0\0\0", 0, 0x2362F9DE),
        (b"aaaa", 0x9747B28C, 0x5A97808A),
        (b"Hello, world!", 1234, 0xFAF6CDB3),
    ],
)
def test_reference_murmur3_known_vectors(data, seed, expected):
    assert murmur3_32_reference(data, seed) == expected


def test_index_hash_matches_reference():
    indices = [0, 1, 2, 255, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 2**40 + 12345]
    for seed in (0, 1, 0xDEADBEEF, 2**32 - 1):
        lo = jnp.array([i & 0xFFFFFFFF for i in indices], dtype=jnp.uint32)
        hi = jnp.array([i >> 32 for i in indices], dtype=jnp.uint32)
        got = np.asarray(murmur3_index_hash(lo, hi, seed)).tolist()
        expected = [murmur3_32_reference(i.to_bytes(8, "little"), seed) for i in indices]
        assert got == expected, f"seed {seed}"


# --------------------------------------------------------------------------- layout


def test_layout_sorts_integer_keys_numerically():
    tree = {"layers": {10: jnp.zeros(2), 2: jnp.zeros(3)}, "a": jnp.zeros(4)}
    layout = parameter_layout(tree)
    assert [s.path for s in layout] == ["a", "layers/2", "layers/10"]
    assert [s.offset for s in layout] == [0, 4, 7]
    assert [s.size for s in layout] == [4, 3, 2]


def test_layout_same_for_nnx_state_and_pure_dict():
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    _, state = nnx.split(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    state_layout = parameter_layout(state)
    pure_layout = parameter_layout(pure)
    assert [(s.offset, s.size) for s in state_layout] == [(s.offset, s.size) for s in pure_layout]
    np.testing.assert_array_equal(
        count_sketch(state, dim=16, seed=3), count_sketch(pure, dim=16, seed=3)
    )


# --------------------------------------------------------------------------- values


def test_sketch_equals_naive_numpy():
    tree = small_tree()
    dim, seed = 11, 42
    exact = np.asarray(flatten_exact(tree), np.float64)
    expected = naive_sketch(exact, dim, seed)
    got = np.asarray(jax.jit(lambda t: count_sketch(t, dim=dim, seed=seed))(tree))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_exact_order_follows_layout():
    tree = small_tree()
    pieces = [
        np.asarray(tree["embed"], np.float32).ravel(),
        np.asarray(tree["layers"][0]["w"]).ravel(),
        np.asarray(tree["layers"][1]["w"]).ravel(),
        np.asarray(tree["norm"]["scale"]).ravel(),
    ]
    np.testing.assert_array_equal(np.asarray(flatten_exact(tree)), np.concatenate(pieces))
    assert [s.path for s in parameter_layout(tree)] == [
        "embed",
        "layers/0/w",
        "layers/1/w",
        "norm/scale",
    ]


def test_leaf_offset_across_32_bit_boundary():
    values = np.arange(1, 8, dtype=np.float32)
    offset = 2**32 - 3  # global indices 2^32 - 3 .. 2^32 + 3 carry into the high word
    got = np.asarray(sketch_leaf(jnp.asarray(values), offset, dim=5, seed=9))
    np.testing.assert_allclose(got, naive_sketch(values, 5, 9, offset), rtol=1e-6)


def test_sketch_is_deterministic():
    tree = small_tree(3)
    jitted = jax.jit(lambda t: count_sketch(t, dim=64, seed=7))
    first = np.asarray(jitted(tree))
    np.testing.assert_array_equal(first, np.asarray(jitted(tree)))
    np.testing.assert_array_equal(first, np.asarray(count_sketch(tree, dim=64, seed=7)))
    other_seed = np.asarray(count_sketch(tree, dim=64, seed=8))
    assert not np.array_equal(first, other_seed)


def test_sketch_is_linear():
    a, b = small_tree(1), small_tree(2)
    a = jax.tree.map(lambda x: x.astype(jnp.float32), a)
    b = jax.tree.map(lambda x: x.astype(jnp.float32), b)
    total = jax.tree.map(lambda x, y: 2.0 * x - 3.0 * y, a, b)
    lhs = count_sketch(total, dim=32, seed=5)
    rhs = 2.0 * count_sketch(a, dim=32, seed=5) - 3.0 * count_sketch(b, dim=32, seed=5)
    np.testing.assert_allclose(np.asarray(lhs), np.asarray(rhs), rtol=1e-5, atol=1e-5)


def test_batched_matches_single_sketches():
    trees = [small_tree(k) for k in range(3)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
    batched = jax.jit(lambda t: count_sketch(t, dim=16, seed=1, num_batch_dims=1))(stacked)
    vmapped = jax.vmap(lambda t: count_sketch(t, dim=16, seed=1))(stacked)
    assert batched.shape == (3, 16)
    for k, tree in enumerate(trees):
        single = np.asarray(count_sketch(tree, dim=16, seed=1))
        np.testing.assert_allclose(np.asarray(batched[k]), single, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(vmapped[k]), single, rtol=1e-6, atol=1e-6)


def test_batched_layout_ignores_batch_axis():
    stacked = {"a": jnp.zeros((4, 2, 3)), "b": jnp.zeros((4, 5))}
    layout = parameter_layout(stacked, num_batch_dims=1)
    assert [(s.path, s.offset, s.size, s.shape) for s in layout] == [
        ("a", 0, 6, (2, 3)),
        ("b", 6, 5, (5,)),
    ]


def test_batched_rejects_mismatched_batch():
    with pytest.raises(ValueError, match="same leading batch shape"):
        count_sketch(
            {"a": jnp.zeros((4, 2)), "b": jnp.zeros((3, 2))}, dim=4, seed=0, num_batch_dims=1
        )


# --------------------------------------------------------------------------- JL accuracy


def correlated_pair(rng: np.random.Generator, size: int, rho: float) -> tuple[np.ndarray, ...]:
    base = rng.standard_normal(size)
    noise = rng.standard_normal(size)
    # Heavy-tailed scales make a few coordinates dominate, as in real gradients.
    scale = rng.standard_t(3, size)
    return base * scale, (rho * base + np.sqrt(1 - rho**2) * noise) * scale


def test_sketch_cosines_within_jl_tolerance():
    dim = 4096
    size = 60_000
    tolerance = 3.0 / np.sqrt(dim)
    rng = np.random.default_rng(0)
    sketch = jax.jit(lambda x: count_sketch({"g": x}, dim=dim, seed=11))
    errors = []
    for rho in (-0.8, -0.3, 0.0, 0.1, 0.5, 0.9, 0.99):
        for _ in range(3):
            a, b = correlated_pair(rng, size, rho)
            exact = cosine(a, b)
            estimate = cosine(
                sketch(jnp.asarray(a, jnp.float32)), sketch(jnp.asarray(b, jnp.float32))
            )
            assert abs(estimate - exact) <= tolerance, (rho, exact, estimate)
            errors.append(estimate - exact)
    # Unbiased: the mean error over 21 pairs shrinks like 1/sqrt(21 d).
    assert abs(np.mean(errors)) <= 3.0 / np.sqrt(len(errors) * dim)


def test_sketch_norm_preserved_on_large_leaf():
    size = 30_000_000
    leaf = jax.random.normal(jax.random.key(5), (size,), jnp.float32)
    sketched = jax.jit(lambda t: count_sketch(t, dim=65536, seed=2))({"w": leaf})
    ratio = float(jnp.linalg.norm(sketched) / jnp.linalg.norm(leaf))
    assert abs(ratio - 1.0) < 3.0 / np.sqrt(65536)


def test_temporary_memory_bounded_by_largest_leaf():
    n = 1_000_000
    tree = {f"w{i}": jax.ShapeDtypeStruct((n,), jnp.float32) for i in range(4)}
    compiled = jax.jit(lambda t: count_sketch(t, dim=4096, seed=1)).lower(tree).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        pytest.skip("this backend reports no memory analysis")
    # A few arrays of one leaf's size (indices, products), not of the tree's.
    assert analysis.temp_size_in_bytes <= 3 * 4 * n


# --------------------------------------------------------------------------- config and errors


def test_exact_mode_returns_flat_vector():
    tree = small_tree()
    config = SketchConfig(dim=None)
    vector = sketch_gradient(tree, config)
    assert config.exact
    assert vector.dtype == jnp.float32
    assert vector.shape == (sketch_size(tree, config),) == (7 + 15 + 15 + 6,)


def test_exact_mode_rejects_large_tree():
    with pytest.raises(ValueError, match="max_exact_size=10"):
        sketch_gradient(small_tree(), SketchConfig(dim=None, max_exact_size=10))


@pytest.mark.parametrize("kwargs", [{"dim": 0}, {"dim": 2**31}, {"seed": -1}, {"seed": 2**32}])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError, match="out of range"):
        SketchConfig(**kwargs)


def test_integer_leaf_rejected():
    with pytest.raises(TypeError, match="'step'"):
        count_sketch({"step": jnp.zeros(3, jnp.int32)}, dim=4, seed=0)
