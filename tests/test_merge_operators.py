"""Merge weights and the linear operator against float64 numpy references."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from merit_jax.merge import operators
from merit_jax.merge.operators import (
    MERGE_OPERATORS,
    LinearMerge,
    make_operator,
    output_dtype,
    register_operator,
    resolve_weights,
)


class FakePlan:
    """The two attributes of a Plan that resolve_weights reads."""

    def __init__(self, tokens):
        self.num_groups = len(tokens)
        self.merge_weights = np.asarray(tokens, np.float64) / sum(tokens)


def leaves(shape, count, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(shape) * (k + 1)).astype(dtype) for k in range(count)]


def reference(arrays, weights):
    return sum(w * a.astype(np.float64) for w, a in zip(weights, arrays, strict=True))


# --------------------------------------------------------------------------- weights


def test_token_weights_come_from_plan():
    weights, weighting = resolve_weights("token", num_models=3, plan=FakePlan([100, 300, 600]))
    assert weighting == "token"
    np.testing.assert_array_equal(weights, [0.1, 0.3, 0.6])


def test_uniform_weights():
    weights, weighting = resolve_weights("uniform", num_models=4)
    assert weighting == "uniform"
    np.testing.assert_array_equal(weights, [0.25] * 4)


def test_explicit_weights():
    weights, weighting = resolve_weights([0.5, 0.25, 0.25], num_models=3)
    assert weighting == "explicit"
    np.testing.assert_array_equal(weights, [0.5, 0.25, 0.25])


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([0.5, 0.5], "one weight per model"),
        ([0.5, 0.5, float("nan")], "finite"),
        ([0.5, 0.5, 0.5], "divide the weights by their sum"),
        ("tokens", "not a weighting"),
    ],
)
def test_bad_weights_rejected(weights, message):
    with pytest.raises(ValueError, match=message):
        resolve_weights(weights, num_models=3)


def test_token_weights_need_plan():
    with pytest.raises(ValueError, match="no plan was given"):
        resolve_weights("token", num_models=2)


def test_token_weights_need_matching_group_count():
    with pytest.raises(ValueError, match="2 groups but 3 models"):
        resolve_weights("token", num_models=3, plan=FakePlan([1, 2]))


def test_negative_weights_allowed_when_summing_to_one():
    weights, _ = resolve_weights([1.5, -0.5], num_models=2)
    np.testing.assert_array_equal(weights, [1.5, -0.5])


# --------------------------------------------------------------------------- linear


@pytest.mark.parametrize("shape", [(7, 5), (3,), (), (2, 3, 5)])
def test_linear_matches_float64_reference(shape):
    arrays = leaves(shape, 4)
    weights = [0.1, 0.2, 0.3, 0.4]
    out = np.empty(shape, np.float32)

    LinearMerge(weights).merge_leaf(lambda k: arrays[k].copy(), out)

    np.testing.assert_allclose(out, reference(arrays, weights), rtol=1e-6, atol=1e-7)


def test_linear_keeps_read_only_inputs():
    arrays = leaves((6, 4), 3, seed=1)
    for array in arrays:
        array.flags.writeable = False
    originals = [array.copy() for array in arrays]
    weights = [0.2, 0.3, 0.5]
    out = np.empty((6, 4), np.float32)

    LinearMerge(weights).merge_leaf(lambda k: arrays[k], out)

    for array, original in zip(arrays, originals, strict=True):
        np.testing.assert_array_equal(array, original)
    np.testing.assert_allclose(out, reference(arrays, weights), rtol=1e-6, atol=1e-7)


def test_linear_bfloat16_inputs_accumulate_in_float32():
    arrays = leaves((33,), 3, seed=2, dtype=ml_dtypes.bfloat16)
    weights = [0.25, 0.25, 0.5]
    out = np.empty((33,), np.float32)

    LinearMerge(weights).merge_leaf(lambda k: arrays[k], out)

    # The float64 reference of the bf16 values: float32 accumulation loses far less
    # than the 2**-8 precision of a bf16 result would.
    np.testing.assert_allclose(out, reference(arrays, weights), rtol=1e-6, atol=1e-7)


def test_linear_float64_inputs_stay_float64():
    arrays = leaves((9, 2), 3, seed=3, dtype=np.float64)
    weights = [0.6, 0.3, 0.1]
    assert operators.accumulation_dtype(np.float64) == np.float64
    out = np.empty((9, 2), np.float64)

    LinearMerge(weights).merge_leaf(lambda k: arrays[k].copy(), out)

    np.testing.assert_allclose(out, reference(arrays, weights), rtol=1e-14, atol=1e-15)


def test_linear_rejects_wrong_leaf_shape():
    out = np.empty((3,), np.float32)
    with pytest.raises(ValueError, match="shape"):
        LinearMerge([0.5, 0.5]).merge_leaf(lambda k: np.ones(3 + k, np.float32), out)


def test_linear_reuses_scratch_across_sizes():
    merge = LinearMerge([0.5, 0.5])
    for shape in [(4,), (50,), (3, 3)]:
        arrays = leaves(shape, 2, seed=len(shape))
        for array in arrays:
            array.flags.writeable = False
        out = np.empty(shape, np.float32)
        merge.merge_leaf(lambda k, arrays=arrays: arrays[k], out)
        np.testing.assert_allclose(out, reference(arrays, [0.5, 0.5]), rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- registry


def test_registry_has_linear():
    operator = make_operator("linear", weights=[1.0])
    assert isinstance(operator, LinearMerge)
    assert operator.describe() == {"method": "linear", "weights": [1.0]}


def test_unknown_method_rejected():
    with pytest.raises(ValueError, match="unknown merge method 'ties'"):
        make_operator("ties", weights=[1.0])


def test_register_custom_operator():
    @register_operator("test-max")
    class MaxMerge:
        name = "test-max"

        def __init__(self, weights):
            self.count = len(weights)

        def merge_leaf(self, read, out):
            out[...] = np.max([read(k) for k in range(self.count)], axis=0)

        def describe(self):
            return {"method": self.name}

    try:
        operator = make_operator("test-max", weights=[0.5, 0.5])
        out = np.empty(2, np.float32)
        operator.merge_leaf(lambda k: np.array([k, -k], np.float32), out)
        np.testing.assert_array_equal(out, [1.0, 0.0])
        with pytest.raises(ValueError, match="already registered"):
            register_operator("test-max")(MaxMerge)
    finally:
        MERGE_OPERATORS.pop("test-max", None)


def test_output_dtype_names():
    assert output_dtype(None) is None
    assert output_dtype("float32") == np.float32
    assert output_dtype("bfloat16") == ml_dtypes.bfloat16
    with pytest.raises(ValueError, match="float64"):
        output_dtype("float64")


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (np.float32, True),
        (np.float16, True),
        (ml_dtypes.bfloat16, True),
        (ml_dtypes.float8_e4m3fn, True),
        (np.int64, False),
        (np.uint8, False),
        (np.bool_, False),
    ],
)
def test_is_float_dtype(dtype, expected):
    assert operators.is_float_dtype(dtype) is expected
