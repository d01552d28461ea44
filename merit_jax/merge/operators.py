"""Merge operators and merge weights.

An operator combines one leaf (one parameter tensor) across K models at a time.
It receives a reader ``read(k)`` for the leaf of model k and writes the merged
value into a float32 (or float64) buffer. The linear operator reads one model
at a time, so it keeps only the accumulator and one input leaf in memory. An
operator that needs all K values at once (TIES' sign election, for example)
can read them all.

Operators are looked up by name in ``MERGE_OPERATORS``; ``register_operator``
adds one. Only the linear operator exists today:

    theta_bar = sum_k w_k theta_k

with the MERIT token weights w_k = N_k / sum_j N_j from the plan (MERIT's
merge rule; Choi & Kim, "Decentralized Instruction Tuning: Conflict-Aware
Splitting and Weight Merging", arXiv 2606.01717), uniform weights w_k = 1/K
(a model soup), or weights given explicitly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from merit_jax.conflict.plan import Plan

LeafReader = Callable[[int], np.ndarray]

WEIGHTINGS = ("token", "uniform")
OUTPUT_DTYPES = ("float32", "bfloat16", "float16")
WEIGHT_SUM_TOLERANCE = 1e-6


class MergeOperator(Protocol):
    """Combines one leaf of K models into ``out``.

    ``read(k)`` returns either a read-only view or a fresh array that no one
    else uses; an operator may overwrite a writable one in place.
    """

    name: str
    # True when each output element depends only on the same element of the inputs,
    # so callers may merge a leaf in slices (the linear merge). An operator that needs
    # whole-tensor statistics, such as TIES' magnitude trimming, sets it False.
    elementwise: bool

    def merge_leaf(self, read: LeafReader, out: np.ndarray) -> None:
        """Write the merged leaf into ``out``; ``read(k)`` returns model k's leaf."""
        ...

    def describe(self) -> dict[str, Any]:
        """Return the JSON-ready settings recorded in merge.json."""
        ...


MERGE_OPERATORS: dict[str, Callable[..., MergeOperator]] = {}


def register_operator(name: str) -> Callable[[Callable[..., MergeOperator]], Any]:
    """Register a merge operator factory under ``name`` (a class decorator)."""

    def decorate(factory: Callable[..., MergeOperator]) -> Callable[..., MergeOperator]:
        if name in MERGE_OPERATORS:
            raise ValueError(f"merge operator {name!r} is already registered")
        MERGE_OPERATORS[name] = factory
        return factory

    return decorate


def make_operator(name: str, **settings: Any) -> MergeOperator:
    """Build the registered operator ``name`` with its settings (for linear: ``weights``)."""
    if name not in MERGE_OPERATORS:
        raise ValueError(f"unknown merge method {name!r}: use one of {sorted(MERGE_OPERATORS)}")
    return MERGE_OPERATORS[name](**settings)


def output_dtype(dtype: str | None) -> np.dtype | None:
    """Return the numpy dtype for an output dtype name; None means "keep the input dtype"."""
    if dtype is None:
        return None
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported: use one of {list(OUTPUT_DTYPES)}")
    if dtype == "bfloat16":
        # Imported here: importing ml_dtypes takes about 0.7 s on a 2-core machine.
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def is_float_dtype(dtype: Any) -> bool:
    """Return whether ``dtype`` is a float type, the ml_dtypes ones (bfloat16, float8) included."""
    dtype = np.dtype(dtype)
    # ml_dtypes types are not np.floating subtypes, but their names start with "float"
    # or "bfloat".
    return np.issubdtype(dtype, np.floating) or dtype.name.startswith(("bfloat", "float"))


def accumulation_dtype(dtype: Any) -> np.dtype:
    """Return the accumulator dtype for inputs of ``dtype``: float32, or float64 for float64."""
    return np.promote_types(np.dtype(dtype), np.float32)


@register_operator("linear")
class LinearMerge:
    """theta_bar = sum_k w_k theta_k, accumulated in float32 (float64 for float64 inputs).

    The terms are added in model order, each as one float32 product w_k * theta_k
    rounded to the accumulator dtype.
    """

    name = "linear"
    elementwise = True

    def __init__(self, weights: Sequence[float]):
        self.weights = np.asarray(weights, dtype=np.float64)
        if self.weights.ndim != 1 or self.weights.size == 0:
            raise ValueError(f"weights must be a non-empty list of numbers, got {weights!r}")
        self._scratch = np.empty(0, np.float32)

    def _scratch_like(self, out: np.ndarray) -> np.ndarray:
        # One buffer reused across leaves: a fresh temporary per leaf would fault in
        # new pages every time.
        if self._scratch.dtype != out.dtype or self._scratch.size < out.size:
            self._scratch = np.empty(out.size, out.dtype)
        return self._scratch[: out.size].reshape(out.shape)

    def merge_leaf(self, read: LeafReader, out: np.ndarray) -> None:
        for k, weight in enumerate(self.weights):
            leaf = read(k)
            if leaf.shape != out.shape:
                raise ValueError(f"model {k} leaf has shape {leaf.shape}, expected {out.shape}")
            w = out.dtype.type(weight)
            if k == 0:
                np.multiply(leaf, w, out=out, dtype=out.dtype)
                continue
            if leaf.flags.writeable and leaf.dtype == out.dtype:
                product = leaf  # a fresh array: scale it in place, no scratch needed
            else:
                product = self._scratch_like(out)
            np.multiply(leaf, w, out=product, dtype=out.dtype)
            np.add(out, product, out=out)

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "weights": [float(w) for w in self.weights]}


def check_weights(weights: Sequence[float], num_models: int) -> np.ndarray:
    """Validate explicit merge weights: one finite number per model, summing to 1."""
    values = [float(w) for w in weights]
    if len(values) != num_models:
        raise ValueError(
            f"got {len(values)} merge weights {values} for {num_models} models: pass one "
            "weight per model"
        )
    if not all(math.isfinite(w) for w in values):
        raise ValueError(f"merge weights {values} must be finite numbers")
    total = math.fsum(values)
    if abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise ValueError(
            f"merge weights {values} sum to {total!r}, not 1. A linear merge with weights that "
            "do not sum to 1 rescales every parameter, norm scales included; divide the "
            "weights by their sum"
        )
    return np.asarray(values, dtype=np.float64)


def resolve_weights(
    weights: str | Sequence[float], *, num_models: int, plan: Plan | None = None
) -> tuple[np.ndarray, str]:
    """Return the merge weights w [K] (float64) and how they were chosen.

    ``weights`` is ``"token"`` (w_k = N_k / sum_j N_j from ``plan``),
    ``"uniform"`` (w_k = 1/K) or one explicit number per model. The second value
    is ``"token"``, ``"uniform"`` or ``"explicit"``.
    """
    if isinstance(weights, str):
        if weights == "uniform":
            return np.full(num_models, 1.0 / num_models), "uniform"
        if weights == "token":
            if plan is None:
                raise ValueError(
                    "weights='token' takes w_k = N_k / sum_j N_j from a plan, but no plan was "
                    "given: pass the plan, or use weights='uniform' or explicit weights"
                )
            if plan.num_groups != num_models:
                raise ValueError(
                    f"the plan has {plan.num_groups} groups but {num_models} models are merged"
                )
            return plan.merge_weights.copy(), "token"
        raise ValueError(
            f"weights={weights!r} is not a weighting: use one of {list(WEIGHTINGS)} or a list "
            "of numbers, one per model"
        )
    return check_weights(weights, num_models), "explicit"
