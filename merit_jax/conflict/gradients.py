"""Per-task gradients at theta0 (MERIT step 1), reduced to sketches inside ``jax.jit``.

Axis letters: B rows of a micro-batch, T sequence, M target slots of a row,
D model, V vocabulary, d sketch dimension.

For every task t the gradient is

    g_t = sum over the calibration examples of task t of grad L(theta0; example)

where L is the summed next-token cross-entropy over the response tokens
(see ``LOSS_CONVENTION``), taken with respect to the trainable parameters
only. Every task uses the same number of calibration examples, the same
trainable parameters and the same [B, T] micro-batch shape, so one compiled
function serves every task. The examples are laid into [B, T] rows
(packed or padded) and the gradient of each micro-batch's summed loss is
added into a float32 accumulator, so the result is the exact gradient of the
sum over all micro-batches. The accumulated gradient is then reduced, inside
a second jitted function, to a count-sketch of dimension d or to the exact
flattened vector (``merit_jax.conflict.sketch``). Only the direction of g_t
matters downstream (cosines), so summing instead of averaging changes
nothing.

Micro-batch rows are sharded over the "data" axis of a mesh of all local
devices, and the parameters are replicated, so B must be a multiple of the
local device count.

Results are saved per task as ``<dir>/<quoted task name>.npy`` plus a JSON
sidecar with the loss at theta0 and the settings key. A rerun with the same
key (theta0, settings and calibration tokens) reuses them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import re
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from merit_jax.conflict.artifacts import write_atomic
from merit_jax.conflict.sketch import SketchConfig, sketch_gradient
from merit_jax.data.batching import Batch, pack_rows, packed_batch, pad_rows
from merit_jax.data.format import TokenizedExample
from merit_jax.models.loss import masked_lm_loss, target_weights, token_losses

logger = logging.getLogger(__name__)

LOSS_CONVENTION = (
    "sum over calibration examples of the next-token cross-entropy of the assistant response "
    "tokens, end-of-turn token included (chat template, response-only loss mask of "
    "merit_jax.data.format); prompt tokens, padding and the first token of every packed "
    "segment are not targets. This is the loss branch training minimizes, summed instead of "
    "averaged (only the direction of g_t is used)."
)

DATA_AXIS = "data"
GRADIENT_FORMAT = 1


# --------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class GradientSettings:
    """Everything that fixes g_t besides theta0 and the data; identical for every task."""

    calibration_size: int  # examples per task
    trainable: tuple[str, ...]  # regexes searched in parameter paths
    sketch: SketchConfig  # count-sketch dimension and seed, or exact
    micro_batch_size: int  # B
    seq_len: int  # T
    packing: bool  # several examples per row
    compute_dtype: str  # matmul inputs and activations; parameters stay as loaded

    def __post_init__(self) -> None:
        if self.calibration_size < 1:
            raise ValueError(f"calibration_size={self.calibration_size} must be >= 1")
        if self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={self.micro_batch_size} must be >= 1")
        if self.seq_len < 2:
            raise ValueError(f"seq_len={self.seq_len} must be >= 2")
        if not self.trainable:
            raise ValueError("trainable must list at least one parameter path pattern")

    def key(self, theta0_sha256: str) -> str:
        """Return the SHA-256 of theta0's hash and the settings that change g_t's values.

        The micro-batch shape and packing are left out: they change only the
        float32 summation order, not the gradient.
        """
        record = {
            "format": GRADIENT_FORMAT,
            "theta0_sha256": theta0_sha256,
            "calibration_size": self.calibration_size,
            "trainable": list(self.trainable),
            "sketch_dim": self.sketch.dim,
            "sketch_seed": self.sketch.seed,
            "compute_dtype": self.compute_dtype,
            "loss": LOSS_CONVENTION,
        }
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- parameters


def _path_string(path: Sequence[Any]) -> str:
    return "/".join(str(getattr(key, "key", key)) for key in path)


def trainable_filter(patterns: Sequence[str]) -> Callable[[Sequence[Any], Any], bool]:
    """Return an NNX filter that selects the ``nnx.Param`` whose path matches any pattern.

    Paths join the attribute names with "/", e.g. "layers/attn/q_kernel" or
    "embed". Layers are stacked along a leading L axis, so a pattern selects a
    parameter of every layer at once.
    """
    compiled = [re.compile(pattern) for pattern in patterns]

    def is_trainable(path: Sequence[Any], value: Any) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        name = _path_string(path)
        return any(pattern.search(name) for pattern in compiled)

    return is_trainable


def split_trainable(model: nnx.Module, patterns: Sequence[str]) -> tuple[Any, Any, Any]:
    """Return (graphdef, trainable state, frozen state); raise when no parameter matches."""
    parts: tuple[Any, ...] = nnx.split(model, trainable_filter(patterns), ...)
    graphdef, trainable, frozen = parts
    if not jax.tree.leaves(trainable):
        names = sorted(
            {_path_string(path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        )
        raise ValueError(
            f"plan.trainable={list(patterns)} matches no parameter; parameter paths are "
            f"{names}. Use '.*' for all parameters."
        )
    return graphdef, trainable, frozen


def parameter_paths(state: Any) -> list[tuple[str, int]]:
    """Return (path, size) of every leaf of an NNX state, in flat-state order."""
    return [(_path_string(path), int(np.size(leaf))) for path, leaf in nnx.to_flat_state(state)]


def state_sha256(state: Any) -> str:
    """Return the SHA-256 of a state's leaf paths, dtypes, shapes and bytes, in path order.

    Identifies a theta0 that has no weight files, such as a random test model.
    """
    digest = hashlib.sha256()
    for path, leaf in sorted(nnx.to_flat_state(state), key=lambda item: _path_string(item[0])):
        array = np.asarray(leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf)
        digest.update(f"{_path_string(path)}\0{array.dtype}\0{array.shape}\n".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- batches


def calibration_batches(
    examples: Sequence[TokenizedExample],
    *,
    micro_batch_size: int,
    seq_len: int,
    pad_id: int,
    packing: bool,
) -> list[Batch]:
    """Lay one task's calibration examples into [micro_batch_size, seq_len] batches.

    With ``packing``, the examples fill rows first fit, longest first. Without
    it, each example gets its own right-padded row. All-padding rows complete
    the last batch.
    """
    if not examples:
        raise ValueError("a task needs at least one calibration example")
    if packing:
        # First fit decreasing: longest examples first fills rows better than file order,
        # and the order of a sum does not change the gradient.
        by_length = sorted(examples, key=lambda example: -example.length)
        rows = pack_rows(by_length, seq_len=seq_len)
    else:
        rows = [[example] for example in examples]
    batches = []
    for start in range(0, len(rows), micro_batch_size):
        chunk = rows[start : start + micro_batch_size]
        if packing:
            batches.append(
                packed_batch(chunk, seq_len=seq_len, pad_id=pad_id, batch_size=micro_batch_size)
            )
        else:
            batches.append(
                pad_rows(
                    [row[0] for row in chunk],
                    seq_len=seq_len,
                    pad_id=pad_id,
                    batch_size=micro_batch_size,
                )
            )
    return batches


def max_targets_per_row(batches: Sequence[Batch]) -> int:
    """Return the largest number of loss targets in one row over ``batches``."""
    return max(int(batch.loss_mask.sum(axis=1).max()) for batch in batches)


def target_capacity(batches: Sequence[Batch], seq_len: int, *, multiple: int = 32) -> int:
    """Return M: the max targets per row rounded up to ``multiple``, at most seq_len - 1."""
    needed = max_targets_per_row(batches)
    return min(seq_len - 1, max(multiple, -(-needed // multiple) * multiple))


# --------------------------------------------------------------------------- loss


def response_loss(
    model: Any,
    tokens_bt: jax.Array,
    loss_mask_bt: jax.Array,
    segment_ids_bt: jax.Array,
    positions_bt: jax.Array,
    *,
    capacity: int | None,
) -> tuple[jax.Array, jax.Array]:
    """Return (summed loss, target count), equal to ``masked_lm_loss`` on the same batch.

    With ``capacity`` M, the LM head runs only on M positions per row: the
    positions with a counted target, moved to the front in order, then
    positions whose weight is 0. That skips the [B, T, V] logits of prompt
    tokens, which are most of them in short-answer tasks. Every row must have
    at most M targets (the caller checks). ``capacity=None`` calls
    ``masked_lm_loss`` itself.
    """
    if capacity is None:
        return masked_lm_loss(
            model, tokens_bt, loss_mask_bt, segment_ids_bt=segment_ids_bt, positions_bt=positions_bt
        )
    hidden_btd, _ = model(
        tokens_bt, positions_bt=positions_bt, segment_ids_bt=segment_ids_bt, return_hidden=True
    )
    targets_bt, weights_bt = target_weights(tokens_bt, loss_mask_bt, segment_ids_bt)  # [B, T-1]
    # A stable sort of "is not a target" puts the counted positions first, in order.
    slots_bm = jnp.argsort(weights_bt == 0, axis=1, stable=True)[:, :capacity]
    # Gather with a one-hot matmul: XLA:CPU runs the scatter-add that a gather's
    # gradient needs far slower than this small [M, T] x [T, D] product.
    select_bmt = jax.nn.one_hot(slots_bm, weights_bt.shape[1], dtype=hidden_btd.dtype)
    hidden_bmd = jnp.einsum("bmt,btd->bmd", select_bmt, hidden_btd[:, :-1])
    targets_bm = jnp.take_along_axis(targets_bt, slots_bm, axis=1)
    weights_bm = jnp.take_along_axis(weights_bt, slots_bm, axis=1)
    losses_bm = token_losses(model.logits(hidden_bmd), targets_bm)
    sum_loss = jnp.sum(jnp.where(weights_bm > 0, losses_bm, 0.0))
    return sum_loss, jnp.sum(weights_bt).astype(jnp.int32)


# --------------------------------------------------------------------------- engine


@dataclasses.dataclass(frozen=True)
class TaskGradient:
    """The reduced gradient of one task and what it was computed from."""

    vector: np.ndarray  # float32 [d] (sketch) or [P] (exact)
    loss_sum: float  # summed loss at theta0 over the calibration examples
    num_targets: int  # loss tokens
    num_examples: int
    num_tokens: int  # non-padding tokens
    num_batches: int
    seconds: float

    @property
    def mean_loss(self) -> float:
        """Loss per target token at theta0."""
        return self.loss_sum / max(self.num_targets, 1)


def local_data_mesh() -> Mesh:
    """Return a one-axis ("data") mesh over every local device."""
    devices = jax.local_devices()
    return jax.make_mesh(
        (len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices
    )


class GradientEngine:
    """Compiled functions that turn [B, T] micro-batches into one task's reduced gradient.

    Three jitted functions over the ``nnx.split`` state: a zero accumulator,
    one accumulation step (the accumulator is donated and updated in place),
    and the reduction to a sketch or exact vector. All see the same shapes
    for every task, so each compiles once.
    """

    def __init__(
        self,
        model: nnx.Module,
        settings: GradientSettings,
        *,
        capacity: int | None = None,
        mesh: Mesh | None = None,
    ):
        self.settings = settings
        self.capacity = capacity
        self.mesh = mesh or local_data_mesh()
        num_devices = self.mesh.devices.size
        if settings.micro_batch_size % num_devices:
            raise ValueError(
                f"plan.micro_batch_size={settings.micro_batch_size} is not a multiple of the "
                f"{num_devices} local devices that share each micro-batch; use a multiple of "
                f"{num_devices}"
            )
        if capacity is not None and not 1 <= capacity <= settings.seq_len - 1:
            raise ValueError(f"capacity={capacity} must lie in [1, seq_len - 1]")
        graphdef, trainable, frozen = split_trainable(model, settings.trainable)
        self.replicated = NamedSharding(self.mesh, P())
        self.row_sharding = NamedSharding(self.mesh, P(DATA_AXIS))
        self.trainable = jax.device_put(trainable, self.replicated)
        self.frozen = jax.device_put(frozen, self.replicated)
        self.num_parameters = sum(int(np.size(leaf)) for leaf in jax.tree.leaves(trainable))
        sketch = settings.sketch

        def zeros(trainable):
            return jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, jnp.float32), trainable)

        def accumulate(trainable, frozen, grad_sum, loss_sum, count, batch):
            def loss_fn(trainable):
                # Rebuild the frozen state inside the traced function: nnx.scan rejects
                # parameter objects created outside the current trace, and a tree_map
                # creates new ones around the same arrays.
                model = nnx.merge(graphdef, trainable, jax.tree.map(lambda x: x, frozen))
                return response_loss(
                    model,
                    batch["tokens"],
                    batch["loss_mask"],
                    batch["segment_ids"],
                    batch["positions"],
                    capacity=capacity,
                )

            (loss, num), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
            grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
            return grad_sum, loss_sum + loss, count + num

        def reduce(grad_sum):
            return sketch_gradient(grad_sum, sketch)

        self._zeros = jax.jit(zeros, out_shardings=self.replicated)
        self._accumulate = jax.jit(accumulate, donate_argnums=(2,))
        self._reduce = jax.jit(reduce, out_shardings=self.replicated)

    def _check_batch(self, batch: Batch) -> None:
        expected = (self.settings.micro_batch_size, self.settings.seq_len)
        if batch.shape != expected:
            raise ValueError(
                f"micro-batch has shape {batch.shape}, expected {expected}: build it with "
                "calibration_batches and the same settings"
            )
        if self.capacity is not None:
            most = int(batch.loss_mask.sum(axis=1).max())
            if most > self.capacity:
                raise ValueError(
                    f"a row has {most} loss targets, more than the target capacity "
                    f"{self.capacity}; build the engine with target_capacity of all batches"
                )

    def _device_batch(self, batch: Batch) -> dict[str, jax.Array]:
        return {
            name: jax.device_put(array, self.row_sharding)
            for name, array in batch.as_dict().items()
        }

    def accumulate(self, batches: Sequence[Batch]) -> tuple[Any, jax.Array, jax.Array]:
        """Return the summed gradient pytree, summed loss and target count over ``batches``."""
        grad_sum = self._zeros(self.trainable)
        loss_sum = jnp.zeros((), jnp.float32)
        count = jnp.zeros((), jnp.int32)
        for batch in batches:
            self._check_batch(batch)
            grad_sum, loss_sum, count = self._accumulate(
                self.trainable, self.frozen, grad_sum, loss_sum, count, self._device_batch(batch)
            )
        return grad_sum, loss_sum, count

    def task_gradient(self, batches: Sequence[Batch]) -> TaskGradient:
        """Return the reduced gradient of the summed loss over ``batches``."""
        if not batches:
            raise ValueError("a task gradient needs at least one micro-batch")
        start = time.perf_counter()
        grad_sum, loss_sum, count = self.accumulate(batches)
        vector = np.asarray(self._reduce(grad_sum))
        loss, targets = float(loss_sum), int(count)
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"the loss at theta0 is {loss}; check the checkpoint and the compute dtype"
            )
        return TaskGradient(
            vector=vector,
            loss_sum=loss,
            num_targets=targets,
            num_examples=sum(batch.num_examples for batch in batches),
            num_tokens=sum(batch.num_tokens for batch in batches),
            num_batches=len(batches),
            seconds=time.perf_counter() - start,
        )


# --------------------------------------------------------------------------- storage


def batches_sha256(batches: Sequence[Batch]) -> str:
    """Return the SHA-256 of the tokens and loss masks of ``batches``, in order.

    Two task inputs with equal digests contain the same token rows, so this
    identifies the calibration data, the tokenizer and the chat template at once.
    """
    digest = hashlib.sha256()
    for batch in batches:
        for name in ("tokens", "loss_mask", "segment_ids"):
            array = np.ascontiguousarray(getattr(batch, name))
            digest.update(f"{name}\0{array.dtype}\0{array.shape}\n".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


class GradientStore:
    """Per-task gradient files in one directory, for resuming an interrupted plan.

    ``<quoted name>.npy`` contains the vector and ``<quoted name>.json`` the
    task name, the settings key, the data digest and the loss at theta0. The
    JSON is written after the array, so a task counts as done only when both
    exist and the JSON matches.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def _stem(self, name: str) -> str:
        return urllib.parse.quote(name, safe="")

    def paths(self, name: str) -> tuple[Path, Path]:
        stem = self._stem(name)
        return self.directory / f"{stem}.npy", self.directory / f"{stem}.json"

    def load(self, name: str, *, key: str, data_sha256: str) -> TaskGradient | None:
        """Return the stored gradient of ``name`` if it was computed with ``key`` on this data."""
        array_path, meta_path = self.paths(name)
        if not (array_path.is_file() and meta_path.is_file()):
            return None
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            logger.warning("ignoring unreadable gradient metadata %s: %s", meta_path, error)
            return None
        if meta.get("task") != name or meta.get("key") != key:
            logger.info("recomputing %s: theta0 or gradient settings changed", name)
            return None
        if meta.get("data_sha256") != data_sha256:
            logger.info("recomputing %s: its calibration tokens changed", name)
            return None
        vector = np.load(array_path, allow_pickle=False)
        if vector.shape != (meta["size"],):
            logger.warning("recomputing %s: %s has shape %s", name, array_path, vector.shape)
            return None
        return TaskGradient(
            vector=vector,
            loss_sum=meta["loss_sum"],
            num_targets=meta["num_targets"],
            num_examples=meta["num_examples"],
            num_tokens=meta["num_tokens"],
            num_batches=meta["num_batches"],
            seconds=meta["seconds"],
        )

    def save(self, name: str, gradient: TaskGradient, *, key: str, data_sha256: str) -> None:
        """Write the vector, then its metadata, each atomically."""
        array_path, meta_path = self.paths(name)
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(gradient.vector, dtype=np.float32))
        write_atomic(array_path, buffer.getvalue(), overwrite=True)
        meta = {
            "task": name,
            "key": key,
            "data_sha256": data_sha256,
            "size": int(gradient.vector.shape[0]),
            "loss_sum": gradient.loss_sum,
            "num_targets": gradient.num_targets,
            "num_examples": gradient.num_examples,
            "num_tokens": gradient.num_tokens,
            "num_batches": gradient.num_batches,
            "seconds": gradient.seconds,
        }
        write_atomic(meta_path, (json.dumps(meta, indent=1) + "\n").encode(), overwrite=True)


@dataclasses.dataclass(frozen=True)
class TaskInput:
    """The micro-batches of one task's calibration examples."""

    name: str
    batches: tuple[Batch, ...]

    @property
    def data_sha256(self) -> str:
        return batches_sha256(self.batches)


def compute_gradients(
    engine: GradientEngine,
    tasks: Sequence[TaskInput],
    *,
    store: GradientStore | None,
    key: str,
    progress: bool = True,
) -> list[TaskGradient]:
    """Return every task's gradient, reusing stored ones and saving each new one as it finishes."""
    from tqdm import tqdm

    results: list[TaskGradient | None] = [None] * len(tasks)
    digests = [task.data_sha256 for task in tasks]
    if store is not None:
        for index, task in enumerate(tasks):
            results[index] = store.load(task.name, key=key, data_sha256=digests[index])
    reused = sum(result is not None for result in results)
    if reused:
        assert store is not None
        logger.info("reusing %d stored task gradient(s) from %s", reused, store.directory)
    todo = [index for index, result in enumerate(results) if result is None]
    total_batches = sum(len(tasks[index].batches) for index in todo)
    bar = tqdm(
        total=total_batches, unit="batch", desc="gradients", disable=not progress or not todo
    )
    start = time.perf_counter()
    tokens = 0
    for index in todo:
        task = tasks[index]
        bar.set_postfix_str(task.name[-40:])
        gradient = engine.task_gradient(task.batches)
        if store is not None:
            store.save(task.name, gradient, key=key, data_sha256=digests[index])
        results[index] = gradient
        tokens += gradient.num_tokens
        bar.update(len(task.batches))
        logger.debug(
            "task %s: %d examples, %d tokens, loss %.3f, %.1f s",
            task.name,
            gradient.num_examples,
            gradient.num_tokens,
            gradient.mean_loss,
            gradient.seconds,
        )
    bar.close()
    if todo:
        elapsed = time.perf_counter() - start
        logger.info(
            "computed %d task gradient(s) in %.1f s (%d tokens, %.0f tokens/s)",
            len(todo),
            elapsed,
            tokens,
            tokens / max(elapsed, 1e-9),
        )
    return [result for result in results if result is not None]
