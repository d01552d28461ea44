"""The train, merge and eval sections of a run config, as validated settings.

A run config keeps these three sections as plain mappings (``RunConfig.train``,
``.merge``, ``.eval``). This module turns them into settings objects and
raises ``ValueError`` naming the field, the value and the fix:

* ``train``: the fields of :class:`merit_jax.train.config.TrainConfig`.
  Fields the section leaves out follow the rest of the run config:
  ``seq_len`` is ``data.max_length`` (so branches tokenize their examples as
  the planner did), ``seed`` is the run's seed, and ``param_dtype``,
  ``compute_dtype``, ``scan_layers`` and ``remat`` come from ``model``.
* ``merge``: :class:`MergeSettings`.
* ``eval``: :class:`EvalSettings`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from merit_jax.train.config import TrainConfig

MERGE_WEIGHTINGS: tuple[str, ...] = ("token", "uniform")
MERGE_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
# The model groups that ``eval.models`` can list. "joint" also makes the run
# train the joint baseline.
EVAL_MODEL_GROUPS: tuple[str, ...] = ("theta0", "branches", "merged", "joint")

# TrainConfig fields that default to the model section of the run config.
_MODEL_FIELDS: tuple[str, ...] = ("param_dtype", "compute_dtype", "scan_layers", "remat")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _reject_unknown(where: str, data: Mapping[str, Any], cls: type) -> None:
    known = [field.name for field in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {', '.join(known)}")


def train_config_from_section(
    section: Mapping[str, Any],
    *,
    model: Any,
    max_length: int,
    seed: int,
    where: str = "train",
) -> TrainConfig:
    """Build the TrainConfig of a run from its ``train`` section (see the module doc).

    ``model`` is the run config's model section (``ModelSettings``).
    """
    if not isinstance(section, Mapping):
        raise ValueError(f"{where} must be a mapping, got {section!r}")
    values = dict(section)
    values.setdefault("seq_len", max_length)
    values.setdefault("seed", seed)
    for field in _MODEL_FIELDS:
        values.setdefault(field, getattr(model, field))
    config = TrainConfig.from_dict(values, where=where)
    if config.seq_len < max_length:
        raise ValueError(
            f"{where}.seq_len={config.seq_len} is shorter than data.max_length={max_length}: "
            "branches would tokenize their examples differently from the plan; set "
            f"{where}.seq_len >= {max_length} or lower data.max_length"
        )
    return config


@dataclasses.dataclass(frozen=True)
class MergeSettings:
    """Merge settings of ``merit run``: theta_bar = sum_k w_k theta_k."""

    weights: str | tuple[float, ...] = "token"  # "token" (N_k / sum N_j), "uniform" or numbers
    dtype: str | None = None  # merged parameter dtype; None keeps the branches' dtype
    method: str = "linear"  # merge operator (merit_jax.merge.operators.MERGE_OPERATORS)
    export_hf: bool = False  # also export the merged model to <run>/merged_hf

    def __post_init__(self) -> None:
        weights = self.weights
        if isinstance(weights, str):
            if weights not in MERGE_WEIGHTINGS:
                raise ValueError(
                    f"merge.weights={weights!r} is invalid; use one of {list(MERGE_WEIGHTINGS)} "
                    "or a list of numbers, one per branch"
                )
        elif isinstance(weights, Sequence) and weights:
            if not all(_is_int(w) or isinstance(w, float) for w in weights):
                raise ValueError(f"merge.weights={list(weights)!r} must contain numbers only")
            object.__setattr__(self, "weights", tuple(float(w) for w in weights))
        else:
            raise ValueError(
                f"merge.weights={weights!r} is invalid; use 'token', 'uniform' or a list of numbers"
            )
        if self.dtype is not None and self.dtype not in MERGE_DTYPES:
            raise ValueError(
                f"merge.dtype={self.dtype!r} is invalid; use one of {list(MERGE_DTYPES)} or null"
            )
        from merit_jax.merge.operators import MERGE_OPERATORS

        if self.method not in MERGE_OPERATORS:
            raise ValueError(
                f"merge.method={self.method!r} is unknown; use one of {sorted(MERGE_OPERATORS)}"
            )
        if not isinstance(self.export_hf, bool):
            raise ValueError(f"merge.export_hf={self.export_hf!r} must be true or false")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "merge") -> MergeSettings:
        if not isinstance(data, Mapping):
            raise ValueError(f"{where} must be a mapping, got {data!r}")
        _reject_unknown(where, data, cls)
        values = dict(data)
        if isinstance(values.get("weights"), list):
            values["weights"] = tuple(values["weights"])
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """Evaluation settings of ``merit run`` and ``merit eval``: the models and the example counts.

    Every listed model is scored on the same examples: the held-out examples
    of every training task (mean loss per response token) and the
    multiple-choice evaluation tasks (``data.eval_tasks``, zero-shot
    log-likelihood accuracy beside its chance level).
    """

    # theta0, branches (each branch k as "branch_k"), merged, joint. Listing
    # "joint" makes the run train the joint baseline.
    models: tuple[str, ...] = EVAL_MODEL_GROUPS
    # Score the branches on the multiple-choice tasks too. Every model gets the
    # held-out loss either way.
    branches_multiple_choice: bool = True
    num_examples: int | None = 50  # multiple-choice examples per task; None: all
    held_out_examples: int | None = None  # held-out examples per training task; None: all
    seed: int | None = None  # None: the first examples in file order; else a seeded draw
    max_length: int | None = None  # tokens per request and held-out row; None: data.max_length
    batch_tokens: int = 4096  # tokens per multiple-choice forward pass (rows x length)
    held_out_batch_size: int = 4  # packed rows per held-out forward pass

    def __post_init__(self) -> None:
        models = self.models
        if isinstance(models, str) or not isinstance(models, Sequence) or not models:
            raise ValueError(
                f"eval.models={models!r} must be a non-empty list drawn from "
                f"{list(EVAL_MODEL_GROUPS)}"
            )
        unknown = [name for name in models if name not in EVAL_MODEL_GROUPS]
        if unknown:
            raise ValueError(
                f"eval.models lists unknown model(s) {unknown}; use names from "
                f"{list(EVAL_MODEL_GROUPS)}"
            )
        repeated = sorted({name for name in models if list(models).count(name) > 1})
        if repeated:
            raise ValueError(f"eval.models lists {repeated} more than once; keep one each")
        object.__setattr__(self, "models", tuple(models))
        for field in ("num_examples", "held_out_examples", "max_length"):
            value = getattr(self, field)
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"eval.{field}={value!r} must be a positive integer or null")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise ValueError(f"eval.seed={self.seed!r} must be an integer >= 0 or null")
        for field in ("batch_tokens", "held_out_batch_size"):
            value = getattr(self, field)
            if not _is_int(value) or value < 1:
                raise ValueError(f"eval.{field}={value!r} must be a positive integer")
        if not isinstance(self.branches_multiple_choice, bool):
            raise ValueError(
                f"eval.branches_multiple_choice={self.branches_multiple_choice!r} must be true "
                "or false"
            )

    @property
    def trains_joint(self) -> bool:
        """Whether the run trains the joint baseline."""
        return "joint" in self.models

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "eval") -> EvalSettings:
        if not isinstance(data, Mapping):
            raise ValueError(f"{where} must be a mapping, got {data!r}")
        _reject_unknown(where, data, cls)
        values = dict(data)
        if isinstance(values.get("models"), list):
            values["models"] = tuple(values["models"])
        return cls(**values)
