"""The jitted training step of one branch: accumulated gradients, clipping, AdamW.

Axis letters: M micro-batches, B rows per micro-batch, T sequence.

One step over a global batch of M micro-batches [M, B, T]:

    sum_loss = sum_m L_m,  count = sum_m C_m,  g = (sum_m grad L_m) / count

where L_m is the summed token loss of micro-batch m and C_m its number of
counted targets (``merit_jax.models.loss``). The loss and gradient are
therefore exactly those of the mean over every target of the global batch,
however the rows are split into micro-batches. The gradient is clipped to a
global L2 norm of ``clip_norm`` and applied with AdamW; weight decay applies
to kernels and embeddings, not to norm scales or biases.

The step is ``jax.jit`` over the parameters as a nested dict of arrays (the
pure form of the ``nnx.split`` state), with the whole TrainState donated, so
parameters and optimizer state are updated in place. The model is rebuilt
with ``nnx.merge`` inside the traced function, which costs trace time only.
The branch's number of steps and warmup steps are an argument, not compiled
constants, so branches that run one after another on the same devices share
one executable.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from merit_jax.models.decoder import Decoder
from merit_jax.models.loss import masked_lm_loss
from merit_jax.train.config import TrainConfig
from merit_jax.train.mesh import batch_sharding, param_shardings, replicated

logger = logging.getLogger(__name__)

BATCH_KEYS = ("tokens", "loss_mask", "segment_ids", "positions")
_BATCH_DTYPES = {
    "tokens": np.int32,
    "loss_mask": np.bool_,
    "segment_ids": np.int32,
    "positions": np.int32,
}

Params = dict[str, Any]
Schedule = Callable[[jax.Array], jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything a step updates and a checkpoint stores."""

    # The same class also stores the shardings or ShapeDtypeStructs of a state,
    # so the fields are typed Any.
    params: Any  # nested dict of arrays, keyed by nnx parameter path
    opt_state: Any  # optax state of ``make_optimizer``
    step: Any  # int32 scalar: optimizer steps taken
    # uint32 [2] PRNG key data. The decoder has no stochastic layers, so the
    # step leaves it unchanged; it is checkpointed for layers that will need it.
    rng: Any


def split_params(model: Decoder) -> tuple[nnx.GraphDef, Params]:
    """Split a decoder into its graph definition and its parameters as a nested dict.

    Raises ValueError when the model has state other than nnx.Param, because
    the step would silently drop it.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]
    if jax.tree.leaves(rest):
        raise ValueError(
            "the model has non-parameter state, which the training step does not carry: "
            f"{jax.tree.map(np.shape, rest)}"
        )
    return graphdef, nnx.to_pure_dict(params)


def learning_rate(config: TrainConfig, step: Any, num_steps: Any, warmup: Any) -> jax.Array:
    """Return the float32 learning rate of ``step``: linear warmup, then the decay.

    With w warmup steps and n steps in all: lr(s) = peak * s / w for s < w;
    after warmup, with p = min((s - w) / max(n - w, 1), 1) and
    end = peak * min_learning_rate_ratio,

        cosine:   end + (peak - end) * (1 + cos(pi * p)) / 2
        linear:   peak + (end - peak) * p
        constant: peak

    ``step``, ``num_steps`` and ``warmup`` may be traced, so one compiled step
    serves branches of any length.
    """
    peak = float(config.learning_rate)
    end = peak * float(config.min_learning_rate_ratio)
    s = jnp.asarray(step, jnp.float32)
    n = jnp.asarray(num_steps, jnp.float32)
    w = jnp.asarray(warmup, jnp.float32)
    warm = peak * s / jnp.maximum(w, 1.0)
    progress = jnp.clip((s - w) / jnp.maximum(n - w, 1.0), 0.0, 1.0)
    if config.schedule == "cosine":
        decayed = end + (peak - end) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    elif config.schedule == "linear":
        decayed = peak + (end - peak) * progress
    else:
        decayed = jnp.full_like(s, peak)
    return jnp.where(s < w, warm, decayed)


def learning_rate_schedule(config: TrainConfig, num_steps: int) -> Schedule:
    """Return lr(step) of a branch that trains ``num_steps`` steps; see :func:`learning_rate`."""
    warmup = config.warmup_for(num_steps)
    return lambda step: learning_rate(config, step, num_steps, warmup)


def decay_mask(params: Params) -> Params:
    """Return True for the parameters that get weight decay: all but norm scales and biases."""

    def decays(path: tuple[Any, ...], _: Any) -> bool:
        name = str(getattr(path[-1], "key", path[-1]))
        return not (name == "scale" or name.endswith("_bias"))

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Return global-norm clipping (when set) and AdamW, without the learning rate.

    These are the transforms of ``optax.adamw`` except its last one, the
    scaling by -lr: the step applies that itself with :func:`learning_rate`,
    so the branch length is an argument instead of a compiled constant.
    """
    transforms = [
        optax.scale_by_adam(b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps),
        optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
    ]
    if config.clip_norm is not None:
        transforms.insert(0, optax.clip_by_global_norm(config.clip_norm))
    return optax.chain(*transforms)


def make_step_fn(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    config: TrainConfig,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """Return the (unjitted) step ``(state, batch, schedule) -> (state, metrics)``.

    ``batch`` maps each of BATCH_KEYS to an [M, B, T] array, and ``schedule``
    is int32 [2]: the branch's number of steps and warmup steps. ``metrics`` contains
    float32 scalars ``loss`` (mean over counted targets), ``grad_norm``
    (before clipping) and ``learning_rate`` (the one this update used), and
    int32 scalars ``targets`` and ``tokens`` (non-padding tokens).
    """

    def micro_loss(params: Params, micro: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        model = nnx.merge(graphdef, params)
        return masked_lm_loss(
            model,
            micro["tokens"],
            micro["loss_mask"],
            segment_ids_bt=micro["segment_ids"],
            positions_bt=micro["positions"],
            vocab_chunk_size=config.vocab_chunk_size,
        )

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(
        state: TrainState, batch: dict[str, jax.Array], schedule: jax.Array
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        params = state.params

        def accumulate(carry, micro):
            grad_sum, loss_sum, count = carry
            (loss, micro_count), grads = grad_fn(params, micro)
            # Accumulate in float32 whatever the parameter dtype.
            grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
            return (grad_sum, loss_sum + loss, count + micro_count), None

        init = (
            jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
            jnp.zeros((), jnp.float32),
            jnp.zeros((), jnp.int32),
        )
        (grad_sum, loss_sum, count), _ = jax.lax.scan(accumulate, init, batch)
        # A batch without targets (only possible with hand-made data) gives a zero gradient.
        denominator = jnp.maximum(count, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g, p: (g / denominator).astype(p.dtype), grad_sum, params)

        updates, opt_state = optimizer.update(grads, state.opt_state, params)
        lr = learning_rate(config, state.step, schedule[0], schedule[1])
        # As optax.scale_by_learning_rate does: cast -lr to each update's dtype.
        updates = jax.tree.map(lambda u: jnp.asarray(-lr, u.dtype) * u, updates)
        new_params = optax.apply_updates(params, updates)
        metrics = {
            "loss": loss_sum / denominator,
            "grad_norm": optax.tree.norm(grads).astype(jnp.float32),
            "learning_rate": lr,
            "targets": count,
            "tokens": jnp.sum(batch["segment_ids"] != 0).astype(jnp.int32),
        }
        new_state = TrainState(
            params=new_params, opt_state=opt_state, step=state.step + 1, rng=state.rng
        )
        return new_state, metrics

    return step


@dataclasses.dataclass
class BranchStep:
    """The compiled step of one branch on its mesh, with the shardings it expects."""

    mesh: Mesh
    optimizer: optax.GradientTransformation
    state_shardings: TrainState
    batch_sharding: NamedSharding
    micro_batches: int
    micro_batch_size: int
    seq_len: int
    compiled: Any  # jax.stages.Compiled, shared by branches with the same program
    schedule: Any = None  # int32 [2] on the mesh: the branch's steps and warmup steps

    def __call__(
        self, state: TrainState, batch: dict[str, jax.Array]
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        return self.compiled(state, batch, self.schedule)

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        shape = (self.micro_batches, self.micro_batch_size, self.seq_len)
        return {
            key: jax.ShapeDtypeStruct(shape, _BATCH_DTYPES[key], sharding=self.batch_sharding)
            for key in BATCH_KEYS
        }

    def abstract_state(self, params: Params) -> TrainState:
        """Return the ShapeDtypeStructs (with shardings) of the state for ``params``."""
        opt_state = jax.eval_shape(self.optimizer.init, params)
        shapes = TrainState(
            params=jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params),
            opt_state=opt_state,
            step=jax.ShapeDtypeStruct((), jnp.int32),
            rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
        )
        return jax.tree.map(
            lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
            shapes,
            self.state_shardings,
        )


def state_shardings_for(
    params: Params, optimizer: optax.GradientTransformation, mesh: Mesh, *, fsdp: bool
) -> TrainState:
    """Return the TrainState of shardings: parameter rules, optimizer moments alike."""
    shardings = param_shardings(params, mesh, fsdp=fsdp)
    abstract_opt = jax.eval_shape(optimizer.init, params)
    # Optimizer leaves shaped like the parameters (Adam's moments) follow their
    # parameter; scalars such as the step count are replicated.
    opt_shardings = optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        abstract_opt,
        shardings,
        transform_non_params=lambda _: replicated(mesh),
    )
    return TrainState(
        params=shardings,
        opt_state=opt_shardings,
        step=replicated(mesh),
        rng=replicated(mesh),
    )


# Compiled steps by program: branches that run one after another on the same
# mesh with the same settings reuse one executable. Bounded, because each
# entry keeps an executable alive.
_COMPILED: collections.OrderedDict[Any, BranchStep] = collections.OrderedDict()
_COMPILED_MAX = 8

# TrainConfig fields that do not change the compiled program.
_HOST_FIELDS = dict(
    warmup_steps=None,
    warmup_fraction=0.0,
    max_steps=None,
    packing=True,
    checkpoint_every=0,
    keep_checkpoints=1,
    seed=0,
    devices_per_branch=None,
)


def compile_branch_step(
    graphdef: nnx.GraphDef,
    params: Params,
    mesh: Mesh,
    config: TrainConfig,
    num_steps: int,
) -> BranchStep:
    """Return the compiled step of a branch of ``num_steps`` steps on ``mesh``.

    ``params`` may be arrays or ShapeDtypeStructs; only shapes and dtypes are
    used. The number of steps and the warmup are arguments of the compiled
    step, so a branch reuses the executable of an earlier branch with the
    same program (graph, parameter shapes, mesh and optimizer settings).
    Raises ValueError when the micro-batch rows do not split evenly over the
    mesh's "data" axis.
    """
    signature = tuple(
        (jax.tree_util.keystr(path), np.shape(leaf), str(leaf.dtype))
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    )
    key = (graphdef, signature, mesh, config.replace(**_HOST_FIELDS))
    cached = _COMPILED.get(key)
    if cached is None:
        cached = _compile(graphdef, params, mesh, config)
        _COMPILED[key] = cached
        if len(_COMPILED) > _COMPILED_MAX:
            _COMPILED.popitem(last=False)
    else:
        _COMPILED.move_to_end(key)
        logger.info("reusing the compiled step for devices %s", _device_ids(mesh))
    schedule = np.array([num_steps, config.warmup_for(num_steps)], dtype=np.int32)
    return dataclasses.replace(cached, schedule=_place(schedule, replicated(mesh)))


def _compile(graphdef: nnx.GraphDef, params: Params, mesh: Mesh, config: TrainConfig) -> BranchStep:
    data_size = int(mesh.shape["data"])
    if config.micro_batch_size % data_size:
        raise ValueError(
            f"a micro-batch has batch_size / micro_batches = {config.micro_batch_size} rows, "
            f"which the {data_size} devices of the data axis cannot split evenly; make it a "
            "multiple of the data-axis size (or lower devices_per_branch)"
        )
    optimizer = make_optimizer(config)
    shardings = state_shardings_for(params, optimizer, mesh, fsdp=config.fsdp)
    batch_shard = batch_sharding(mesh)
    jitted = jax.jit(
        make_step_fn(graphdef, optimizer, config),
        in_shardings=(shardings, batch_shard, replicated(mesh)),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=(0,),
    )
    branch_step = BranchStep(
        mesh=mesh,
        optimizer=optimizer,
        state_shardings=shardings,
        batch_sharding=batch_shard,
        micro_batches=config.micro_batches,
        micro_batch_size=config.micro_batch_size,
        seq_len=config.seq_len,
        compiled=None,
    )
    start = time.perf_counter()
    branch_step.compiled = jitted.lower(
        branch_step.abstract_state(params),
        branch_step.abstract_batch(),
        jax.ShapeDtypeStruct((2,), jnp.int32, sharding=replicated(mesh)),
    ).compile()
    logger.info(
        "compiled the step for devices %s in %.1f s",
        _device_ids(mesh),
        time.perf_counter() - start,
    )
    return branch_step


def init_state(branch_step: BranchStep, params: Params, *, seed: int) -> TrainState:
    """Place host ``params`` on the branch's mesh and initialize the optimizer state.

    Every array is built from host data by ``jax.make_array_from_callback``, so
    two branches never share a buffer (the step donates its input) and each
    process only materializes its own shards.
    """
    shardings = branch_step.state_shardings
    placed = jax.tree.map(_place, params, shardings.params)
    opt_state = jax.jit(branch_step.optimizer.init, out_shardings=shardings.opt_state)(placed)
    return TrainState(
        params=placed,
        opt_state=opt_state,
        step=_place(np.zeros((), np.int32), shardings.step),
        rng=_place(np.asarray(jax.random.key_data(jax.random.key(seed))), shardings.rng),
    )


def place_batch(branch_step: BranchStep, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Reshape host [M * B, T] arrays to [M, B, T] and place them on the branch's mesh."""
    shape = (branch_step.micro_batches, branch_step.micro_batch_size, branch_step.seq_len)
    placed = {}
    for key in BATCH_KEYS:
        array: np.ndarray = np.asarray(arrays[key], dtype=_BATCH_DTYPES[key])
        if array.size != math.prod(shape):
            raise ValueError(
                f"batch {key} has shape {array.shape}, expected "
                f"[{shape[0] * shape[1]}, {shape[2]}] (batch_size x seq_len)"
            )
        placed[key] = _place(array.reshape(shape), branch_step.batch_sharding)
    return placed


def _device_ids(mesh: Mesh) -> list[int]:
    return sorted(int(i) for i in mesh.device_ids.flat)


def _place(array: Any, sharding: NamedSharding) -> jax.Array:
    host = np.asarray(array)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
