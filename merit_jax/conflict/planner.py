"""``merit plan``: MERIT steps 1 to 3 from a run config to a plan directory.

    config -> theta0 (load_pretrained) -> training tasks (eval tasks excluded)
           -> tokenization, s_t and n_t -> calibration micro-batches
           -> g_t per task (sketched inside jit, saved as each task finishes)
           -> cosine matrix C -> PCA (r axes) -> partition (K = 2^r) -> Plan

The plan directory contains plan.json, sketches.npy, similarity.npy, pca.npz,
gradients/ (one file per task, for resuming) and the figures that the
command line draws (similarity.png, pca.png).
Every step is deterministic given the config, theta0 and the data, so two
runs write byte-identical plan.json files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from merit_jax.conflict.artifacts import PlanArrays, save_plan_arrays
from merit_jax.conflict.gradients import (
    LOSS_CONVENTION,
    GradientEngine,
    GradientSettings,
    GradientStore,
    TaskInput,
    calibration_batches,
    compute_gradients,
    state_sha256,
    target_capacity,
)
from merit_jax.conflict.partition import partition_tasks
from merit_jax.conflict.pca import conflict_pca
from merit_jax.conflict.plan import PLAN_FILENAME, Plan, PlanSettings, build_plan, save_plan
from merit_jax.conflict.similarity import cosine_matrix, normalize_sketches
from merit_jax.conflict.sketch import SketchConfig
from merit_jax.data.bigbench import BigBenchArchive
from merit_jax.data.format import TokenizedExample, TokenizedTask, tokenize_task
from merit_jax.data.mixture import TaskSplit, load_mixture, with_token_budgets
from merit_jax.data.sampling import calibration_indices
from merit_jax.data.spec import MixtureSpec
from merit_jax.data.task import Task, task_fingerprint
from merit_jax.runconfig import RunConfig

logger = logging.getLogger(__name__)

GRADIENTS_DIRNAME = "gradients"


@dataclasses.dataclass
class Theta0:
    """The model at theta0 with its tokenizer and content hash."""

    model: Any  # merit_jax.models.decoder.Decoder
    tokenizer: Any  # a transformers tokenizer with a chat template
    sha256: str

    @property
    def pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(pad) if pad is not None else 0


@dataclasses.dataclass(frozen=True)
class PreparedTask:
    """A training task with s_t and n_t resolved, and its calibration examples."""

    task: Task
    tokenized: TokenizedTask
    calibration: tuple[TokenizedExample, ...]


@dataclasses.dataclass(frozen=True)
class PlanOutcome:
    """The result of ``run_plan``: the plan, its arrays, losses, files and phase times."""

    plan: Plan
    arrays: PlanArrays
    losses: dict[str, float]  # mean loss per target token at theta0, by task name
    out_dir: Path
    files: tuple[Path, ...]
    seconds: dict[str, float]


# --------------------------------------------------------------------------- inputs


def load_theta0(config: RunConfig) -> Theta0:
    """Load the model named by ``config.model`` with its tokenizer and weights hash."""
    from merit_jax.models.pretrained import load_pretrained

    settings = config.model
    pretrained = load_pretrained(
        settings.ref,
        param_dtype=settings.param_dtype,
        compute_dtype=settings.compute_dtype,
        scan_layers=settings.scan_layers,
        remat=settings.remat,
    )
    return Theta0(pretrained.model, pretrained.tokenizer, pretrained.weights_sha256)


def theta0_from_model(model: Any, tokenizer: Any) -> Theta0:
    """Wrap a model without weight files (such as a random test model), hashing its state."""
    from flax import nnx

    return Theta0(model, tokenizer, state_sha256(nnx.state(model)))


def load_training_splits(
    config: RunConfig, mixture: MixtureSpec, *, archive: BigBenchArchive | None
) -> list[TaskSplit]:
    """Load the training tasks of ``mixture`` and check that none is an evaluation task."""
    splits = load_mixture(mixture, seed=config.seed, archive=archive)
    overlap = sorted({s.train.name for s in splits} & set(config.data.eval_tasks))
    if overlap:
        raise ValueError(
            f"training tasks {overlap} are also listed in data.eval_tasks; held-out evaluation "
            "tasks must not be trained on, so remove them from one list"
        )
    return splits


def prepare_tasks(
    splits: Sequence[TaskSplit], tokenizer: Any, config: RunConfig, *, calibration_size: int
) -> list[PreparedTask]:
    """Tokenize every training task, resolve s_t and n_t, and draw the calibration examples.

    Calibration examples are drawn (by seed and task name) from the examples
    that survive tokenization, so every task gets exactly ``calibration_size``
    of them unless ``plan.allow_fewer``.
    """
    start = time.perf_counter()
    data = config.data
    tokenized = [
        tokenize_task(
            tokenizer,
            split.train,
            max_length=data.max_length,
            system=data.system,
            truncation=data.truncation,  # type: ignore[arg-type]
        )
        for split in splits
    ]
    tasks = with_token_budgets(splits, tokenized)
    prepared = []
    for task, tokens in zip(tasks, tokenized, strict=True):
        usable = task.with_examples([task.examples[i] for i in tokens.source_indices])
        indices = calibration_indices(
            usable, calibration_size, seed=config.seed, allow_fewer=config.plan.allow_fewer
        )
        calibration = tuple(tokens.examples[i] for i in indices)
        prepared.append(PreparedTask(task=task, tokenized=tokens, calibration=calibration))
    logger.info(
        "tokenized %d tasks (%d examples, %d tokens) in %.1f s",
        len(prepared),
        sum(len(p.tokenized.examples) for p in prepared),
        sum(p.tokenized.total_tokens for p in prepared),
        time.perf_counter() - start,
    )
    return prepared


def gradient_settings(
    config: RunConfig, *, calibration_size: int | None = None
) -> GradientSettings:
    """Return the gradient settings of ``config`` (the sketch hash seed is the run seed)."""
    plan = config.plan
    return GradientSettings(
        calibration_size=calibration_size or plan.calibration_size,
        trainable=plan.trainable,
        sketch=SketchConfig(dim=plan.sketch_dim, seed=config.seed),
        micro_batch_size=plan.micro_batch_size,
        seq_len=plan.seq_len,
        packing=plan.packing,
        compute_dtype=config.model.compute_dtype,
    )


def task_inputs(
    named_examples: Sequence[tuple[str, Sequence[TokenizedExample]]],
    settings: GradientSettings,
    pad_id: int,
) -> list[TaskInput]:
    """Lay every task's calibration examples into the fixed [B, T] micro-batches."""
    return [
        TaskInput(
            name,
            tuple(
                calibration_batches(
                    examples,
                    micro_batch_size=settings.micro_batch_size,
                    seq_len=settings.seq_len,
                    pad_id=pad_id,
                    packing=settings.packing,
                )
            ),
        )
        for name, examples in named_examples
    ]


def make_engine(theta0: Theta0, settings: GradientSettings, inputs: Sequence[TaskInput]):
    """Build the gradient engine with a target capacity that fits every row of ``inputs``."""
    capacity = target_capacity([b for task in inputs for b in task.batches], settings.seq_len)
    return GradientEngine(theta0.model, settings, capacity=capacity)


def data_sha256(tasks: Sequence[Task]) -> str:
    """Return the SHA-256 over the tasks' names and example fingerprints, in task order."""
    digest = hashlib.sha256()
    for task in tasks:
        digest.update(f"{task.name}\0{task_fingerprint(task)}\n".encode())
    return digest.hexdigest()


def loss_convention(config: RunConfig) -> str:
    """Return the loss description stored in plan.json, with the tokenization it depends on."""
    data = config.data
    system = "none" if data.system is None else repr(data.system)
    return (
        f"{LOSS_CONVENTION} Tokenization: max_length={data.max_length}, "
        f"truncation={data.truncation}, system message {system}; "
        f"compute dtype {config.model.compute_dtype}."
    )


# --------------------------------------------------------------------------- plan


def plan_settings_of(config: RunConfig) -> PlanSettings:
    """Return the settings that plan.json records for ``config``."""
    return PlanSettings(
        partitioner=config.plan.partitioner,
        pca_dim=config.plan.pca_dim,
        sketch_dim=config.plan.sketch_dim,
        calibration_size=config.plan.calibration_size,
        trainable_parameter_patterns=config.plan.trainable,
        loss_convention=loss_convention(config),
    )


def assemble_plan(
    config: RunConfig,
    tasks: Sequence[Task],
    sketches: np.ndarray,
    *,
    theta0_sha256: str,
    similarity: np.ndarray | None = None,
) -> tuple[Plan, PlanArrays]:
    """Turn sketches [T, d] into C, the PCA, the partition and the Plan.

    ``similarity`` is used instead of recomputing C from the sketches when
    given (the incremental update).
    """
    plan_settings = config.plan
    names = [task.name for task in tasks]
    if similarity is None:
        similarity = cosine_matrix(normalize_sketches(sketches))
    r = plan_settings.pca_dim
    if r > len(tasks):
        raise ValueError(
            f"plan.pca_dim={r} needs at least {r} tasks for the PCA, got {len(tasks)}; lower "
            "plan.pca_dim or add datasets"
        )
    pca = conflict_pca(similarity, r)
    samples = [int(task.s_t or len(task.examples)) for task in tasks]
    tokens = [int(task.n_t or 0) for task in tasks]
    groups = partition_tasks(
        plan_settings.partitioner,
        weights=samples,
        embedding=pca.embedding,
        similarity=similarity,
        r=r,
        seed=config.seed,
    )
    plan = build_plan(
        task_names=names,
        samples=samples,
        tokens=tokens,
        groups=groups,
        embedding=pca.embedding,
        settings=plan_settings_of(config),
        seed=config.seed,
        theta0_sha256=theta0_sha256,
        data_sha256=data_sha256(tasks),
    )
    return plan, PlanArrays(sketches=sketches, similarity=similarity, pca=pca)


PlotWriter = Callable[[Path, Plan, PlanArrays], list[Path]]


def write_plan_dir(
    out_dir: Path,
    plan: Plan,
    arrays: PlanArrays,
    *,
    overwrite: bool,
    plotter: PlotWriter | None = None,
) -> list[Path]:
    """Write plan.json, the arrays and, with ``plotter``, the figures; return the files."""
    save_plan_arrays(
        out_dir,
        sketches=arrays.sketches,
        similarity=arrays.similarity,
        pca=arrays.pca,
        overwrite=overwrite,
    )
    files = [out_dir / name for name in ("sketches.npy", "similarity.npy", "pca.npz")]
    files.append(save_plan(plan, out_dir / PLAN_FILENAME, overwrite=overwrite))
    if plotter is not None:
        files.extend(plotter(out_dir, plan, arrays))
    return files


def _check_outputs_free(out_dir: Path, overwrite: bool) -> None:
    existing = [
        name
        for name in (PLAN_FILENAME, "sketches.npy", "similarity.npy", "pca.npz")
        if (out_dir / name).exists()
    ]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out_dir} already contains {existing}: pass --overwrite to replace them (stored "
            "task gradients are reused when their settings match), or choose another --out"
        )


def run_plan(
    config: RunConfig,
    *,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    theta0: Theta0 | None = None,
    archive: BigBenchArchive | None = None,
    plotter: PlotWriter | None = None,
) -> PlanOutcome:
    """Run MERIT steps 1 to 3 for ``config`` and write the plan directory.

    ``theta0`` and ``archive`` replace the model named by the config and the
    default BIG-bench archive (tests pass a tiny model and a fake tarball).
    ``plotter`` draws the figures; the command line passes
    ``merit_jax.report.plan_plots.write_plan_plots``, because this package does
    not import the report package.
    """
    out = Path(out_dir) if out_dir is not None else config.plan_dir
    _check_outputs_free(out, overwrite)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    if theta0 is None:
        theta0 = load_theta0(config)
    seconds["load model"] = time.perf_counter() - clock

    clock = time.perf_counter()
    splits = load_training_splits(config, config.data.mixture, archive=archive)
    prepared = prepare_tasks(
        splits, theta0.tokenizer, config, calibration_size=config.plan.calibration_size
    )
    settings = gradient_settings(config)
    inputs = task_inputs([(p.task.name, p.calibration) for p in prepared], settings, theta0.pad_id)
    seconds["load data"] = time.perf_counter() - clock

    clock = time.perf_counter()
    engine = make_engine(theta0, settings, inputs)
    gradients = compute_gradients(
        engine,
        inputs,
        store=GradientStore(out / GRADIENTS_DIRNAME),
        key=settings.key(theta0.sha256),
        progress=progress,
    )
    seconds["gradients"] = time.perf_counter() - clock

    clock = time.perf_counter()
    sketches = np.stack([g.vector for g in gradients]).astype(np.float32)
    tasks = [p.task for p in prepared]
    plan, arrays = assemble_plan(config, tasks, sketches, theta0_sha256=theta0.sha256)
    files = write_plan_dir(out, plan, arrays, overwrite=overwrite, plotter=plotter)
    seconds["plan and plots"] = time.perf_counter() - clock
    losses = {task.name: g.mean_loss for task, g in zip(tasks, gradients, strict=True)}
    return PlanOutcome(plan, arrays, losses, out, tuple(files), seconds)


# --------------------------------------------------------------------------- adding tasks


def added_datasets(config: RunConfig, extra: str | Path) -> MixtureSpec:
    """Return the datasets that ``extra`` adds to ``config``'s mixture.

    ``extra`` is a mixture YAML (every dataset must be new) or a run config
    whose model, plan, seed and tokenization equal ``config``'s, and whose
    mixture may repeat ``config``'s datasets (only the others are added).
    """
    import yaml

    from merit_jax.runconfig import ConfigError, load_config

    path = Path(extra)
    if not path.is_file():
        raise FileNotFoundError(f"--add file {path} not found")
    raw = yaml.safe_load(path.read_text())
    base_names = {spec.task_name for spec in config.data.mixture.datasets}
    if isinstance(raw, dict) and "data" in raw:
        other = load_config(path)
        mismatched = [
            name
            for name in ("model", "plan", "seed")
            if getattr(other, name) != getattr(config, name)
        ]
        for name in ("max_length", "system", "truncation"):
            if getattr(other.data, name) != getattr(config.data, name):
                mismatched.append(f"data.{name}")
        if mismatched:
            raise ConfigError(
                f"{path} differs from {config.source} in {mismatched}; an extended plan must use "
                "the same model, seed, plan and tokenization settings, so make them equal"
            )
        new = [s for s in other.data.mixture.datasets if s.task_name not in base_names]
    else:
        mixture = MixtureSpec.from_yaml(path)
        repeated = sorted(s.task_name for s in mixture.datasets if s.task_name in base_names)
        if repeated:
            raise ConfigError(
                f"{path} lists {repeated}, which {config.source} already contains; list only "
                "the datasets to add"
            )
        new = list(mixture.datasets)
    if not new:
        raise ConfigError(f"{path} adds no dataset that {config.source} does not already contain")
    return MixtureSpec(datasets=tuple(new))


def _check_base_plan(plan: Plan, config: RunConfig, tasks: Sequence[Task], theta0: Theta0) -> None:
    problems = []
    names = [task.name for task in tasks]
    if [task.name for task in plan.tasks] != names:
        problems.append(f"its tasks {[t.name for t in plan.tasks]} are not the config's {names}")
    elif plan.data_sha256 != data_sha256(tasks):
        problems.append("its data hash differs from the config's data (examples, split or seed)")
    if plan.theta0_sha256 != theta0.sha256:
        problems.append(f"it was computed at theta0 {plan.theta0_sha256}, not at {theta0.sha256}")
    if plan.seed != config.seed:
        problems.append(f"its seed is {plan.seed}, not {config.seed}")
    if plan.settings != plan_settings_of(config):
        problems.append(f"its settings {plan.settings} differ from the config's plan section")
    if problems:
        raise ValueError(
            f"the existing plan does not match {config.source}: " + "; ".join(problems) + ". "
            "Extend a plan with the config that made it, or rerun `merit plan --overwrite`."
        )


def run_plan_add(
    config: RunConfig,
    extra: str | Path,
    *,
    out_dir: str | Path | None = None,
    progress: bool = True,
    theta0: Theta0 | None = None,
    archive: BigBenchArchive | None = None,
    plotter: PlotWriter | None = None,
) -> PlanOutcome:
    """Extend the plan in ``out_dir`` (made from ``config``) with the datasets of ``extra``.

    Only the new tasks' gradients are computed. C grows by the incremental
    update (``extend_cosine_matrix``); the PCA, partition and plan are
    recomputed for all tasks. The new tasks come after the existing ones.
    """
    from merit_jax.conflict.artifacts import load_plan_arrays
    from merit_jax.conflict.plan import load_plan
    from merit_jax.conflict.similarity import extend_cosine_matrix

    out = Path(out_dir) if out_dir is not None else config.plan_dir
    existing = load_plan(out)
    arrays = load_plan_arrays(out, num_tasks=len(existing.tasks))
    new_mixture = added_datasets(config, extra)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    if theta0 is None:
        theta0 = load_theta0(config)
    seconds["load model"] = time.perf_counter() - clock

    clock = time.perf_counter()
    size = config.plan.calibration_size
    base = prepare_tasks(
        load_training_splits(config, config.data.mixture, archive=archive),
        theta0.tokenizer,
        config,
        calibration_size=size,
    )
    _check_base_plan(existing, config, [p.task for p in base], theta0)
    added = prepare_tasks(
        load_training_splits(config, new_mixture, archive=archive),
        theta0.tokenizer,
        config,
        calibration_size=size,
    )
    clashes = sorted({p.task.name for p in base} & {p.task.name for p in added})
    if clashes:
        raise ValueError(f"tasks {clashes} are already in the plan; label the added datasets")
    settings = gradient_settings(config)
    inputs = task_inputs([(p.task.name, p.calibration) for p in added], settings, theta0.pad_id)
    seconds["load data"] = time.perf_counter() - clock

    clock = time.perf_counter()
    store = GradientStore(out / GRADIENTS_DIRNAME)
    key = settings.key(theta0.sha256)
    gradients = compute_gradients(
        make_engine(theta0, settings, inputs), inputs, store=store, key=key, progress=progress
    )
    seconds["gradients"] = time.perf_counter() - clock

    clock = time.perf_counter()
    new_sketches = np.stack([g.vector for g in gradients]).astype(np.float32)
    similarity, _ = extend_cosine_matrix(
        arrays.similarity, normalize_sketches(arrays.sketches), new_sketches
    )
    sketches = np.concatenate([arrays.sketches, new_sketches], axis=0)
    tasks = [p.task for p in base] + [p.task for p in added]
    plan, all_arrays = assemble_plan(
        config, tasks, sketches, theta0_sha256=theta0.sha256, similarity=similarity
    )
    files = write_plan_dir(out, plan, all_arrays, overwrite=True, plotter=plotter)
    seconds["plan and plots"] = time.perf_counter() - clock
    losses = {p.task.name: g.mean_loss for p, g in zip(added, gradients, strict=True)}
    base_inputs = task_inputs([(p.task.name, p.calibration) for p in base], settings, theta0.pad_id)
    for task in base_inputs:
        stored = store.load(task.name, key=key, data_sha256=task.data_sha256)
        if stored is not None:
            losses[task.name] = stored.mean_loss
    return PlanOutcome(plan, all_arrays, losses, out, tuple(files), seconds)


# --------------------------------------------------------------------------- summaries


def format_summary(outcome: PlanOutcome, *, axes: int = 4) -> str:
    """Return the groups table (tasks, S_k, N_k, w_k), explained variance and phase times."""
    plan = outcome.plan
    losses = outcome.losses
    lines = [f"plan: {len(plan.tasks)} tasks in {plan.num_groups} groups -> {outcome.out_dir}"]
    lines.append(f"{'group':>5}  {'S_k':>7}  {'N_k':>9}  {'w_k':>6}  tasks (loss at theta0)")
    for group in plan.groups:
        members = ", ".join(
            f"{name} ({losses[name]:.2f})" if name in losses else name for name in group.tasks
        )
        lines.append(
            f"{group.index:>5}  {group.samples:>7}  {group.tokens:>9}  {group.weight:>6.3f}  "
            f"{members}"
        )
    ratio = outcome.arrays.pca.explained_variance_ratio[:axes]
    explained = ", ".join(f"{100 * value:.1f}%" for value in ratio)
    lines.append(f"explained variance of PCA axes 1-{len(ratio)}: {explained}")
    c = outcome.arrays.similarity
    off_diagonal = c[~np.eye(c.shape[0], dtype=bool)]
    if off_diagonal.size:
        lines.append(
            f"off-diagonal cosines: mean {off_diagonal.mean():.3f}, min {off_diagonal.min():.3f}, "
            f"max {off_diagonal.max():.3f}"
        )
    lines.append(
        "time: " + ", ".join(f"{name} {value:.1f} s" for name, value in outcome.seconds.items())
    )
    return "\n".join(lines)
