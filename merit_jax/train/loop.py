"""Communication-free training of several branches from one host.

A branch is a group of tasks, each with its token budget n_t, trained from
theta0 on its own devices (``mesh.py``) with its own compiled step
(``step.py``). Joint training is the same code with one branch that
contains every task.

:func:`train_branches` runs the branches wave by wave. Inside a wave, one
controller thread dispatches one step of every unfinished branch in turn
(round-robin). JAX dispatch is asynchronous, so the steps of different
branches can overlap on their disjoint devices while the controller lays
out the next batches. Python threads that each drive a submesh are not used: with
collectives they deadlock in XLA:CPU's rendezvous.

Metrics, written by process 0 to each branch directory:

    metrics.jsonl    one JSON object per step: step (updates done), loss (mean
                     over counted targets), grad_norm (before clipping),
                     learning_rate, tokens (non-padding tokens of the step),
                     targets, tokens_seen, tokens_per_second, wall_time_s
    tensorboard/     the same scalars under "train/", for TensorBoard

tokens_per_second divides the step's tokens by the wall time since the
branch's previous step finished. Branches of one wave share the controller,
so it is each branch's throughput while the others run too.

NOTE: the code builds every array with ``jax.make_array_from_callback`` and
writes files from process 0 only, so that one branch can span the processes
of a ``jax.distributed`` job, but only single-process runs are tested.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from merit_jax import __version__
from merit_jax.data.format import TokenizedTask
from merit_jax.models.config import to_dtype
from merit_jax.models.decoder import Decoder, abstract_decoder
from merit_jax.train.checkpoint import (
    BranchCheckpointer,
    branch_dir,
    check_resume_meta,
    read_branch_info,
    write_final,
)
from merit_jax.train.config import TrainConfig
from merit_jax.train.data import BranchData, build_branch_data
from merit_jax.train.isolation import check_isolation
from merit_jax.train.mesh import BranchPlacement, carve_submeshes
from merit_jax.train.step import (
    BranchStep,
    Params,
    TrainState,
    compile_branch_step,
    init_state,
    place_batch,
    split_params,
)

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


@dataclasses.dataclass(frozen=True)
class BranchSpec:
    """One branch: its index k, its tokenized tasks and their token budgets n_t."""

    index: int  # k; the branch directory is <out>/branches/<k>
    tasks: tuple[TokenizedTask, ...]
    budgets: Mapping[str, int]  # task name -> n_t
    pad_id: int
    # Provenance copied into branch.json, e.g. theta0_sha256 and plan_sha256.
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"branch-{self.index}"


@dataclasses.dataclass(frozen=True)
class BranchResult:
    """Outcome of one train_branches call for one branch."""

    index: int
    directory: Path
    finished: bool  # final/ and branch.json are written
    steps: int  # steps done so far
    num_steps: int  # steps of the whole branch
    tokens: int  # non-padding tokens trained on so far
    loss: float | None  # loss of the last step this call ran (None when it ran none)


class _BranchRun:
    """The live state of one branch inside a wave."""

    def __init__(
        self,
        spec: BranchSpec,
        placement: BranchPlacement,
        data: BranchData,
        branch_step: BranchStep,
        config: TrainConfig,
        out_dir: Path,
        stop_at_step: int | None,
    ):
        self.spec = spec
        self.placement = placement
        self.data = data
        self.branch_step = branch_step
        self.config = config
        self.directory = branch_dir(out_dir, spec.index)
        self.num_steps = branch_step_count(data, config)
        self.stop = self.num_steps if stop_at_step is None else min(stop_at_step, self.num_steps)
        self.checkpointer = BranchCheckpointer(self.directory, keep=config.keep_checkpoints)
        self.state: TrainState | None = None
        self.step = 0
        self.tokens_seen = 0
        self.targets_seen = 0
        self.wall_time_before = 0.0  # wall time of earlier runs, from the checkpoint
        self.started = time.perf_counter()
        self.last_finished = self.started
        self.last_loss: float | None = None
        self.pending: dict[str, jax.Array] | None = None
        self.next_batch: dict[str, np.ndarray] | None = None
        self.writer: Any = None
        self.is_writer = jax.process_index() == 0
        self.closed = False

    # ---------------------------------------------------------------- setup

    def start(self, host_params: Params) -> None:
        latest = self.checkpointer.latest_step()
        if latest is None:
            self.state = init_state(self.branch_step, host_params, seed=self.config.seed)
            logger.info("%s: starting from theta0, %d steps", self.spec.name, self.num_steps)
        else:
            abstract = self.branch_step.abstract_state(host_params)
            tree, meta = self.checkpointer.restore(latest, abstract)
            check_resume_meta(
                meta,
                fingerprint=self.data.fingerprint,
                config=self.config.to_dict(),
                where=self.checkpointer.directory / str(latest),
            )
            self.state = TrainState(**tree)
            self.step = int(meta["step"])
            self.tokens_seen = int(meta["tokens_seen"])
            self.targets_seen = int(meta["targets_seen"])
            self.wall_time_before = float(meta["wall_time_s"])
            logger.info(
                "%s: resumed at step %d of %d (%d tokens seen)",
                self.spec.name,
                self.step,
                self.num_steps,
                self.tokens_seen,
            )
        if self.is_writer:
            self._open_metrics()
        if self.step < self.stop:
            self.next_batch = self.data.batch(self.step).as_dict()

    def _open_metrics(self) -> None:
        from tensorboardX import SummaryWriter

        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / METRICS_FILE
        if path.exists():
            # Steps after the restored checkpoint are trained again, so their old lines
            # go, and so does a last line cut short by a killed run.
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    logger.warning("%s: dropping an incomplete line of %s", self.spec.name, path)
                    continue
                if record["step"] <= self.step:
                    kept.append(line)
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self.metrics_file = path.open("a", encoding="utf-8")
        self.writer = SummaryWriter(
            str(self.directory / TENSORBOARD_DIR), purge_step=self.step + 1 if self.step else None
        )

    # ---------------------------------------------------------------- stepping

    @property
    def active(self) -> bool:
        return self.step < self.stop

    def dispatch(self) -> None:
        """Queue one step on the branch's devices and lay out the next batch meanwhile."""
        assert self.state is not None and self.next_batch is not None
        batch = place_batch(self.branch_step, self.next_batch)
        self.state, self.pending = self.branch_step(self.state, batch)
        following = self.step + 1
        self.next_batch = self.data.batch(following).as_dict() if following < self.stop else None

    def collect(self) -> None:
        """Wait for the dispatched step, record its metrics, and checkpoint when due."""
        assert self.pending is not None
        metrics = {key: value.item() for key, value in jax.device_get(self.pending).items()}
        self.pending = None
        now = time.perf_counter()
        elapsed = now - self.last_finished
        self.last_finished = now
        self.step += 1
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"{self.spec.name}: the loss is {loss} at step {self.step}; lower "
                f"learning_rate (now {self.config.learning_rate}) or set clip_norm"
            )
        self.last_loss = loss
        self.tokens_seen += int(metrics["tokens"])
        self.targets_seen += int(metrics["targets"])
        record = {
            "step": self.step,
            "loss": loss,
            "grad_norm": float(metrics["grad_norm"]),
            "learning_rate": float(metrics["learning_rate"]),
            "tokens": int(metrics["tokens"]),
            "targets": int(metrics["targets"]),
            "tokens_seen": self.tokens_seen,
            "tokens_per_second": int(metrics["tokens"]) / max(elapsed, 1e-9),
            "wall_time_s": self.wall_time(),
        }
        if self.is_writer:
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()
            for key in ("loss", "grad_norm", "learning_rate", "tokens_per_second", "tokens_seen"):
                self.writer.add_scalar(f"train/{key}", record[key], self.step)

        every = self.config.checkpoint_every
        periodic = every > 0 and self.step % every == 0 and self.step < self.num_steps
        if periodic or self.step == self.stop:
            self.save_checkpoint()

    def wall_time(self) -> float:
        return self.wall_time_before + time.perf_counter() - self.started

    def save_checkpoint(self) -> None:
        meta = {
            "step": self.step,
            "rows_consumed": min(self.step * self.data.batch_size, len(self.data.rows)),
            "tokens_seen": self.tokens_seen,
            "targets_seen": self.targets_seen,
            "wall_time_s": self.wall_time(),
            "data_fingerprint": self.data.fingerprint,
            "config": self.config.to_dict(),
        }
        self.checkpointer.save(self.step, self.state, meta)

    # ---------------------------------------------------------------- end

    def finish(self) -> BranchResult:
        """Wait for checkpoints; write final/ and branch.json when every step is done."""
        self.checkpointer.wait()
        finished = self.step == self.num_steps
        if finished:
            assert self.state is not None
            info = {
                "branch": self.spec.index,
                "tasks": [task.name for task in self.spec.tasks],
                "budgets": dict(self.spec.budgets),
                "steps": self.step,
                "tokens": self.tokens_seen,
                "targets": self.targets_seen,
                "final_loss": self.last_loss,
                "wall_time_s": self.wall_time(),
                "data_fingerprint": self.data.fingerprint,
                "train_config": self.config.to_dict(),
                "devices": sorted(self.placement.device_ids),
                "mesh": dict(self.placement.mesh.shape),
                "jax_version": jax.__version__,
                "tool_version": __version__,
                **dict(self.spec.info),
            }
            write_final(self.directory, self.state.params, info)
            logger.info(
                "%s: finished %d steps, %d tokens, final loss %s, %.1f s",
                self.spec.name,
                self.step,
                self.tokens_seen,
                self.last_loss,
                info["wall_time_s"],
            )
        else:
            logger.info(
                "%s: stopped at step %d of %d; run again to resume",
                self.spec.name,
                self.step,
                self.num_steps,
            )
        self.close()
        return BranchResult(
            index=self.spec.index,
            directory=self.directory,
            finished=finished,
            steps=self.step,
            num_steps=self.num_steps,
            tokens=self.tokens_seen,
            loss=self.last_loss,
        )

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.checkpointer.close()
        if self.writer is not None:
            self.writer.close()
            self.metrics_file.close()
            self.writer = None
        self.state = None


def branch_step_count(data: BranchData, config: TrainConfig) -> int:
    """Return the steps a branch trains: one pass over its rows, capped by max_steps."""
    if config.max_steps is None:
        return data.num_steps
    return min(data.num_steps, config.max_steps)


def _training_params(model: Decoder, config: TrainConfig) -> tuple[nnx.GraphDef, Params]:
    """Return the graphdef for the config's numerics and theta0 as host numpy arrays."""
    train_model_config = model.config.replace(
        param_dtype=config.param_dtype,
        compute_dtype=config.compute_dtype,
        scan_layers=config.scan_layers,
        remat=config.remat,
    )
    graphdef, abstract = split_params(abstract_decoder(train_model_config))
    _, params = split_params(model)
    expected, found = jax.tree.structure(abstract), jax.tree.structure(params)
    if expected != found:  # type: ignore[operator]
        raise ValueError(
            f"the model's parameters do not match its config: expected {expected}, got {found}"
        )
    dtype = to_dtype(config.param_dtype)
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)).astype(dtype), params)
    return graphdef, host


def train_branches(
    branches: Sequence[BranchSpec],
    model: Decoder,
    out_dir: str | Path,
    config: TrainConfig,
    *,
    devices: Sequence[Any] | None = None,
    stop_at_step: int | None = None,
    progress: bool = True,
) -> list[BranchResult]:
    """Train every branch from the weights of ``model`` (theta0); see the module doc.

    A branch whose branch.json exists is skipped; one with checkpoints resumes
    from the newest. ``stop_at_step`` stops every branch once it has taken
    that many steps, after a checkpoint, as a preempted job would; a later
    call resumes. Raises FloatingPointError on a non-finite loss and
    RuntimeError when the compiled steps of a wave are not isolated.
    """
    indices = [spec.index for spec in branches]
    if len(set(indices)) != len(indices):
        raise ValueError(f"branch indices {indices} repeat; each branch needs its own directory")
    if stop_at_step is not None and stop_at_step < 0:
        raise ValueError(f"stop_at_step={stop_at_step} must be >= 0")
    out_dir = Path(out_dir)
    start = time.perf_counter()
    graphdef, host_params = _training_params(model, config)
    placements = carve_submeshes(
        len(branches),
        devices,
        devices_per_branch=config.devices_per_branch,
        model_parallel=config.model_parallel,
    )
    results: dict[int, BranchResult] = {}
    for wave in sorted({placement.wave for placement in placements}):
        members = [
            (spec, placement)
            for spec, placement in zip(branches, placements, strict=True)
            if placement.wave == wave
        ]
        for spec, result in _run_wave(
            members, graphdef, host_params, out_dir, config, stop_at_step, progress, wave
        ):
            results[spec.index] = result
    logger.info(
        "trained %d branch(es) in %.1f s: %s",
        len(branches),
        time.perf_counter() - start,
        ", ".join(f"{r.index}: {r.steps}/{r.num_steps} steps" for r in results.values()),
    )
    return [results[spec.index] for spec in branches]


def _run_wave(
    members: list[tuple[BranchSpec, BranchPlacement]],
    graphdef: nnx.GraphDef,
    host_params: Params,
    out_dir: Path,
    config: TrainConfig,
    stop_at_step: int | None,
    progress: bool,
    wave: int,
) -> list[tuple[BranchSpec, BranchResult]]:
    done: list[tuple[BranchSpec, BranchResult]] = []
    runs: list[_BranchRun] = []
    for spec, placement in members:
        directory = branch_dir(out_dir, spec.index)
        info = read_branch_info(directory)
        if info is not None:
            logger.info("%s: already finished (%s exists), skipping", spec.name, directory)
            done.append((spec, _finished_result(spec, directory, info)))
            continue
        data = build_branch_data(
            spec.name,
            spec.tasks,
            spec.budgets,
            seed=config.seed,
            batch_size=config.batch_size,
            seq_len=config.seq_len,
            pad_id=spec.pad_id,
            packing=config.packing,
        )
        branch_step = compile_branch_step(
            graphdef, host_params, placement.mesh, config, branch_step_count(data, config)
        )
        runs.append(_BranchRun(spec, placement, data, branch_step, config, out_dir, stop_at_step))
    if not runs:
        return done

    check_isolation(
        [run.branch_step.compiled for run in runs], [run.placement.mesh for run in runs]
    )
    logger.info(
        "wave %d: %d branch(es) on disjoint devices; no collective crosses a branch",
        wave,
        len(runs),
    )
    try:
        for run in runs:
            run.start(host_params)
        total = sum(run.stop - run.step for run in runs)
        bar = tqdm(total=total, desc=f"wave {wave}", unit="step", disable=not progress)
        with bar:
            while True:
                active = [run for run in runs if run.active]
                if not active:
                    break
                for run in active:
                    run.dispatch()
                for run in active:
                    run.collect()
                bar.update(len(active))
                bar.set_postfix({f"loss{run.spec.index}": f"{run.last_loss:.3f}" for run in active})
        for run in runs:
            done.append((run.spec, run.finish()))
    finally:
        for run in runs:
            run.close()
    return done


def _finished_result(spec: BranchSpec, directory: Path, info: Mapping[str, Any]) -> BranchResult:
    return BranchResult(
        index=spec.index,
        directory=directory,
        finished=True,
        steps=int(info["steps"]),
        num_steps=int(info["steps"]),
        tokens=int(info["tokens"]),
        loss=info.get("final_loss"),
    )
