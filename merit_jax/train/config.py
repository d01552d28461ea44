"""Training settings of one branch: optimizer, schedule, batching, checkpoints and numerics.

One frozen dataclass, validated in ``__post_init__``. Every branch of a run
uses the same TrainConfig; only its data (and so its number of steps)
differs. The learning-rate schedule is stretched over each branch's own
number of steps.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from merit_jax.models.config import to_dtype

SCHEDULES: tuple[str, ...] = ("cosine", "linear", "constant")

# Fields that change the trained weights. A checkpoint written under other
# values of these fields cannot be resumed (see ``checkpoint.py``).
RESULT_FIELDS: tuple[str, ...] = (
    "learning_rate",
    "warmup_steps",
    "warmup_fraction",
    "schedule",
    "min_learning_rate_ratio",
    "weight_decay",
    "adam_b1",
    "adam_b2",
    "adam_eps",
    "clip_norm",
    "batch_size",
    "micro_batches",
    "seq_len",
    "packing",
    "max_steps",
    "seed",
    "param_dtype",
    "compute_dtype",
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters and layout of branch training.

    Batch terms: one optimizer step consumes ``batch_size`` rows of
    ``seq_len`` tokens (the global batch of the branch), split into
    ``micro_batches`` micro-batches whose gradients are accumulated. Each
    micro-batch's rows are sharded over the "data" axis of the branch's mesh,
    so ``batch_size / micro_batches`` must be a multiple of that axis size.
    """

    # Optimizer: AdamW (decoupled weight decay on kernels and embeddings only),
    # after clipping the gradient to a global L2 norm of ``clip_norm``.
    learning_rate: float = 2e-5  # peak learning rate
    warmup_steps: int | None = None  # linear warmup from 0; None: warmup_fraction of the steps
    warmup_fraction: float = 0.03  # used when warmup_steps is None
    schedule: str = "cosine"  # decay after warmup: "cosine", "linear" or "constant"
    min_learning_rate_ratio: float = 0.0  # final learning rate / peak (cosine and linear)
    weight_decay: float = 0.01
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    clip_norm: float | None = 1.0  # None: no clipping

    # Batching.
    batch_size: int = 8  # rows per optimizer step
    micro_batches: int = 1  # gradient-accumulation steps per optimizer step
    seq_len: int = 512  # T; examples are tokenized with max_length = seq_len
    packing: bool = True  # several examples per row (segment ids) instead of one padded example
    max_steps: int | None = None  # cap on the steps of every branch (the budget is cut short)

    # Checkpoints and logging.
    checkpoint_every: int = 500  # steps between checkpoints; 0: only at the end
    keep_checkpoints: int = 2  # most recent checkpoints kept on disk
    seed: int = 0  # data order and the RNG state (the plan's seed fixes the data split)

    # Numerics and layout.
    param_dtype: str = "float32"  # parameters and optimizer state
    compute_dtype: str = "float32"  # activations and matmul inputs
    scan_layers: bool = True  # nnx.scan over the layer stack (faster compile)
    remat: bool = False  # recompute layer activations in the backward pass
    vocab_chunk_size: int | None = None  # loss over vocabulary chunks, never building [B, T, V]

    # Devices of one branch: a ("data", "model") mesh.
    devices_per_branch: int | None = None  # None: an equal share of the devices (see mesh.py)
    model_parallel: int = 1  # size of the "model" axis, which shards parameters
    fsdp: bool = False  # also shard each parameter's largest axis over "data"

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise ValueError("invalid TrainConfig:\n" + "\n".join(f"  - {p}" for p in problems))

    @property
    def micro_batch_size(self) -> int:
        """Rows per micro-batch: batch_size / micro_batches."""
        return self.batch_size // self.micro_batches

    def warmup_for(self, num_steps: int) -> int:
        """Return the warmup length of a branch that trains for ``num_steps`` steps."""
        if self.warmup_steps is not None:
            return min(self.warmup_steps, num_steps)
        return min(round(self.warmup_fraction * num_steps), num_steps)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "train config") -> TrainConfig:
        """Build a config from a mapping such as a YAML section; unknown keys raise."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**data)


def _problems(config: TrainConfig) -> list[str]:
    problems: list[str] = []

    def positive_int(name: str, *, allow_none: bool = False, allow_zero: bool = False) -> bool:
        value = getattr(config, name)
        if value is None and allow_none:
            return True
        low = 0 if allow_zero else 1
        if not _is_int(value) or value < low:
            kind = "a non-negative integer" if allow_zero else "a positive integer"
            suffix = " or None" if allow_none else ""
            problems.append(f"{name}={value!r} must be {kind}{suffix}")
            return False
        return True

    if not _is_number(config.learning_rate) or config.learning_rate <= 0:
        problems.append(f"learning_rate={config.learning_rate!r} must be a positive number")
    positive_int("warmup_steps", allow_none=True, allow_zero=True)
    if not _is_number(config.warmup_fraction) or not 0 <= config.warmup_fraction <= 1:
        problems.append(f"warmup_fraction={config.warmup_fraction!r} must lie in [0, 1]")
    if config.schedule not in SCHEDULES:
        problems.append(f"schedule={config.schedule!r} is unknown; use one of {list(SCHEDULES)}")
    ratio = config.min_learning_rate_ratio
    if not _is_number(ratio) or not 0 <= ratio <= 1:
        problems.append(f"min_learning_rate_ratio={ratio!r} must lie in [0, 1]")
    if not _is_number(config.weight_decay) or config.weight_decay < 0:
        problems.append(f"weight_decay={config.weight_decay!r} must be a number >= 0")
    for name in ("adam_b1", "adam_b2"):
        value = getattr(config, name)
        if not _is_number(value) or not 0 <= value < 1:
            problems.append(f"{name}={value!r} must lie in [0, 1)")
    if not _is_number(config.adam_eps) or config.adam_eps <= 0:
        problems.append(f"adam_eps={config.adam_eps!r} must be a positive number")
    if config.clip_norm is not None and (not _is_number(config.clip_norm) or config.clip_norm <= 0):
        problems.append(f"clip_norm={config.clip_norm!r} must be a positive number or None")

    batch_ok = positive_int("batch_size") & positive_int("micro_batches")
    if batch_ok and config.batch_size % config.micro_batches:
        problems.append(
            f"batch_size={config.batch_size} is not a multiple of "
            f"micro_batches={config.micro_batches}; every micro-batch needs the same rows"
        )
    if positive_int("seq_len") and config.seq_len < 2:
        problems.append(f"seq_len={config.seq_len} must be at least 2 tokens")
    if not isinstance(config.packing, bool):
        problems.append(f"packing={config.packing!r} must be true or false")
    positive_int("max_steps", allow_none=True)
    positive_int("checkpoint_every", allow_zero=True)
    positive_int("keep_checkpoints")
    positive_int("seed", allow_zero=True)

    for name in ("param_dtype", "compute_dtype"):
        try:
            to_dtype(getattr(config, name))
        except ValueError as error:
            problems.append(f"{name}: {error}")
    for name in ("scan_layers", "remat", "fsdp"):
        if not isinstance(getattr(config, name), bool):
            problems.append(f"{name}={getattr(config, name)!r} must be true or false")
    positive_int("vocab_chunk_size", allow_none=True)
    if positive_int("devices_per_branch", allow_none=True) & positive_int("model_parallel"):
        per = config.devices_per_branch
        if per is not None and per % config.model_parallel:
            problems.append(
                f"devices_per_branch={per} is not a multiple of "
                f"model_parallel={config.model_parallel}; the mesh is data x model"
            )
    return problems
