"""``merit run``: the whole MERIT pipeline on one host, resumable stage by stage.

    plan -> train every branch -> merge -> joint baseline -> eval -> report

Run directory layout::

    <run>/plan/          plan.json, arrays, figures (``merit plan``), and
                         config.yaml: the resolved run config, so that
                         ``merit train-branch --plan <run>/plan/plan.json``
                         finds the mixture and training settings
    <run>/branches/<k>/  branch k (``merit train-branch``)
    <run>/merged/        the merged parameters and merge.json (``merit merge``)
    <run>/joint/plan/    the one-group plan of the joint baseline, and config.yaml
    <run>/joint/branches/0/  the joint baseline: every task in one group, trained
                         by the same code with the same total budget sum_k N_k
    <run>/eval/          results.json and results.md of every model, and
                         models/<name>.json as each model finishes
    <run>/figures/       loss_curves.png
    <run>/report.md, <run>/results.json   the run report
    <run>/run.json       the wall time of every finished stage

Every stage writes its outputs so that their presence marks it finished, and a
rerun skips finished stages: branch.json for a branch, merge.json for the
merge, eval/models/<name>.json for one evaluated model. An interrupted branch
resumes from its last checkpoint. A run whose report exists is finished, and
running it again needs ``overwrite``, which deletes the directory first. A
run directory started with another config is rejected.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from merit_jax.conflict.plan import Plan, build_plan, load_plan, save_plan
from merit_jax.report.report import branch_model_name, build_results, write_report
from merit_jax.report.rundir import (
    JOINT_MODEL,
    STAGES,
    RunLayout,
    StageClock,
    eval_settings_of,
    load_run_config,
    merge_settings_of,
    prepare_run_dir,
    train_config_of,
    write_config_copy,
)
from merit_jax.report.settings import EvalSettings, MergeSettings
from merit_jax.runconfig import ConfigError, RunConfig
from merit_jax.train.config import TrainConfig

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- resources


class Resources:
    """theta0 and the BIG-bench archive, loaded on first use and shared by every stage.

    Tests pass ``theta0`` (a ``Pretrained`` with a tokenizer) and ``archive``.
    """

    def __init__(
        self,
        config: RunConfig,
        clock: StageClock,
        *,
        theta0: Any = None,
        archive: Any = None,
    ):
        self.config = config
        self.clock = clock
        self._theta0 = theta0
        self._archive = archive

    @property
    def theta0(self) -> Any:
        """theta0 as a ``merit_jax.models.pretrained.Pretrained`` with its tokenizer."""
        return self.load_theta0()

    def load_theta0(self) -> Any:
        """Load theta0 unless loaded (timed as the stage "load model"); return it.

        Stages call this before starting their own clock, so that loading the
        model is not counted as their time.
        """
        if self._theta0 is None:
            from merit_jax.models.pretrained import load_pretrained

            settings = self.config.model
            with self.clock.stage("load model"):
                self._theta0 = load_pretrained(
                    settings.ref,
                    param_dtype=settings.param_dtype,
                    compute_dtype=settings.compute_dtype,
                    scan_layers=settings.scan_layers,
                    remat=settings.remat,
                )
        return self._theta0

    @property
    def archive(self) -> Any:
        if self._archive is None:
            from merit_jax.data.bigbench import BigBenchArchive

            self._archive = BigBenchArchive()
        return self._archive


# --------------------------------------------------------------------------- stages


def run_plan_stage(layout: RunLayout, resources: Resources, *, progress: bool) -> Plan:
    """Make the plan unless plan.json exists; return the plan."""
    from merit_jax.conflict import planner

    if layout.plan_file.is_file():
        plan = load_plan(layout.plan_file)
        config = resources.config
        if plan.settings != planner.plan_settings_of(config) or plan.seed != config.seed:
            raise ConfigError(
                f"{layout.plan_file} was made with other plan settings or another seed than "
                f"{config.source}; pass --overwrite to plan again, or choose another output "
                "directory"
            )
        resources.clock.skip("plan", f"{layout.plan_file} exists")
        return plan
    from merit_jax.report.plan_plots import write_plan_plots

    pretrained = resources.theta0
    theta0 = planner.Theta0(pretrained.model, pretrained.tokenizer, pretrained.weights_sha256)
    with resources.clock.stage("plan"):
        # plan.json is missing, so any plan files present are from an interrupted
        # plan: replace them (stored task gradients are still reused).
        outcome = planner.run_plan(
            resources.config,
            out_dir=layout.plan_dir,
            overwrite=True,
            progress=progress,
            theta0=theta0,
            archive=resources.archive,
            plotter=write_plan_plots,
        )
    print(planner.format_summary(outcome), flush=True)
    return outcome.plan


def _branch_finished(directory: Path) -> bool:
    from merit_jax.train.checkpoint import BRANCH_INFO_FILE

    return (directory / BRANCH_INFO_FILE).is_file()


def train_plan_branches(
    plan_file: Path,
    run_dir: Path,
    resources: Resources,
    train_config: TrainConfig,
    *,
    progress: bool,
) -> None:
    """Train every branch of the plan at ``plan_file`` into ``run_dir/branches/``."""
    from merit_jax.train.branch import train_branch

    plan = load_plan(plan_file)
    for index in range(plan.num_groups):
        if _branch_finished(run_dir / "branches" / str(index)):
            logger.info("branch %d of %s: already finished", index, plan_file)
            continue
        result = train_branch(
            plan_file,
            index,
            run_dir,
            train_config,
            model=resources.theta0,
            mixture=resources.config.data.mixture,
            archive=resources.archive,
            progress=progress,
        )
        if not result.finished:
            raise RuntimeError(
                f"branch {index} stopped at step {result.steps} of {result.num_steps}; run again "
                "to resume it"
            )


def run_branches_stage(
    layout: RunLayout,
    resources: Resources,
    plan: Plan,
    train_config: TrainConfig,
    *,
    progress: bool,
) -> None:
    if all(_branch_finished(layout.branch_dir(k)) for k in range(plan.num_groups)):
        resources.clock.skip("branches", "every branch.json exists")
        return
    resources.load_theta0()
    with resources.clock.stage("branches"):
        train_plan_branches(
            layout.plan_file, layout.root, resources, train_config, progress=progress
        )


def run_merge_stage(layout: RunLayout, resources: Resources, settings: MergeSettings) -> None:
    from merit_jax.merge import merge_run
    from merit_jax.merge.staging import MERGE_JSON

    if (layout.merged_dir / MERGE_JSON).is_file():
        resources.clock.skip("merge", f"{layout.merged_dir / MERGE_JSON} exists")
        return
    if settings.export_hf:
        resources.load_theta0()  # the export takes theta0's config and tokenizer
    with resources.clock.stage("merge"):
        export = layout.merged_hf_dir if settings.export_hf else None
        merge_run(
            layout.plan_file,
            run_dir=layout.root,
            weights=settings.weights,
            dtype=settings.dtype,
            method=settings.method,
            out_dir=layout.merged_dir,
            export_hf=export,
            theta0=resources.theta0 if export is not None else None,
            # A merge interrupted before its staging directory moved into place left
            # no merge.json, so replacing what is there loses nothing finished.
            overwrite=True,
        )


def joint_plan(plan: Plan) -> Plan:
    """Return the joint baseline's plan: one group of every task with the same budgets n_t.

    Its one group's N equals sum_k N_k of ``plan``, and it keeps the plan's
    theta0, data hash, seed and settings (partitioner "joint").
    """
    embedding = [task.embedding for task in plan.tasks]
    return build_plan(
        task_names=[task.name for task in plan.tasks],
        samples=[task.samples for task in plan.tasks],
        tokens=[task.tokens for task in plan.tasks],
        groups=(tuple(range(len(plan.tasks))),),
        embedding=embedding if all(embedding) else None,
        settings=dataclasses.replace(plan.settings, partitioner="joint"),
        seed=plan.seed,
        theta0_sha256=plan.theta0_sha256,
        data_sha256=plan.data_sha256,
        tool_version=plan.tool_version,
    )


def write_joint_plan(layout: RunLayout, plan: Plan, config: RunConfig) -> Path:
    """Write the joint baseline's plan.json and config.yaml (once); return plan.json."""
    path = layout.joint_plan_file
    expected = joint_plan(plan)
    if path.is_file():
        if load_plan(path) != expected:
            raise ValueError(
                f"{path} is not the joint plan of {layout.plan_file}; delete {layout.joint_dir} "
                "to train the joint baseline again"
            )
    else:
        save_plan(expected, path)
    write_config_copy(config, path.parent)
    return path


def run_joint_stage(
    layout: RunLayout,
    resources: Resources,
    plan: Plan,
    train_config: TrainConfig,
    *,
    progress: bool,
) -> None:
    if _branch_finished(layout.joint_dir / "branches" / "0"):
        resources.clock.skip("joint", "the joint baseline's branch.json exists")
        return
    resources.load_theta0()
    with resources.clock.stage("joint"):
        plan_file = write_joint_plan(layout, plan, resources.config)
        train_plan_branches(plan_file, layout.joint_dir, resources, train_config, progress=progress)


def run_eval_stage(
    layout: RunLayout, resources: Resources, plan: Plan, settings: EvalSettings
) -> dict[str, Any]:
    from merit_jax.report.evaluate import evaluate_run, model_names

    names = model_names(settings.models, plan.num_groups)
    done = layout.eval_dir / "results.json"
    if done.is_file():
        report = json.loads(done.read_text(encoding="utf-8"))
        if set(names) <= set(report.get("models", {})):
            resources.clock.skip("eval", f"{done} covers every model")
            return report
    resources.load_theta0()
    with resources.clock.stage("eval"):
        return evaluate_run(layout, resources, settings, names)


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_run_report(
    layout: RunLayout,
    config: RunConfig,
    plan: Plan,
    eval_report: Mapping[str, Any] | None,
    clock: StageClock,
) -> tuple[Path, Path]:
    """Draw the loss curves and write report.md and results.json into the run directory."""
    from merit_jax.report.curves import LOSS_CURVES_PLOT, plot_loss_curves, read_metrics
    from merit_jax.report.plan_plots import PCA_PLOT, SIMILARITY_PLOT

    training: dict[str, dict[str, Any]] = {}
    curves: dict[str, list[dict[str, Any]]] = {}
    directories = {branch_model_name(k): layout.branch_dir(k) for k in range(plan.num_groups)}
    directories[JOINT_MODEL] = layout.joint_dir / "branches" / "0"
    for name, directory in directories.items():
        info = _read_json(directory / "branch.json")
        if info is not None:
            training[name] = info
            label = "joint" if name == JOINT_MODEL else name.replace("_", " ")
            curves[label] = read_metrics(directory / "metrics.jsonl")

    files: dict[str, str] = {}
    for key, figure in (("similarity", SIMILARITY_PLOT), ("pca", PCA_PLOT)):
        if (layout.plan_dir / figure).is_file():
            files[key] = f"plan/{figure}"
    if any(curves.values()):
        plot_loss_curves(curves, layout.figures_dir / LOSS_CURVES_PLOT)
        files["loss_curves"] = f"figures/{LOSS_CURVES_PLOT}"
    if eval_report is not None:
        files["eval_results"] = "eval/results.md"

    from merit_jax.merge.staging import MERGE_JSON

    results = build_results(
        plan=plan,
        eval_report=eval_report,
        training=training,
        merge=_read_json(layout.merged_dir / MERGE_JSON),
        stages=clock.ordered(),
        config=config.to_dict(),
        files=files,
    )
    return write_report(results, layout.root)


# --------------------------------------------------------------------------- the run


@dataclasses.dataclass(frozen=True)
class RunOutcome:
    """The outputs of ``run_pipeline``: the run layout, the report files and the stage times."""

    layout: RunLayout
    report: Path
    results: Path
    stage_table: str


def run_pipeline(
    config: RunConfig,
    *,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    theta0: Any = None,
    archive: Any = None,
    stop_after: str | None = None,
) -> RunOutcome | None:
    """Run every stage of ``config`` into ``out_dir`` (default: ``config.output_dir``).

    ``theta0`` (a ``Pretrained`` with tokenizer) and ``archive`` replace the
    model and BIG-bench archive the config names (tests pass tiny ones).
    ``stop_after`` ends the run after the named stage, as an interrupted run
    would, and returns None. Every setting is validated before any work starts.
    """
    if stop_after is not None and stop_after not in STAGES:
        raise ValueError(f"stop_after={stop_after!r} is not a stage; use one of {list(STAGES)}")
    train_config = train_config_of(config)
    merge_settings = merge_settings_of(config)
    eval_settings = eval_settings_of(config)
    if train_config.max_steps is not None and eval_settings.trains_joint:
        logger.warning(
            "train.max_steps=%d caps the joint baseline too, so it may train on fewer tokens "
            "than sum_k N_k; the report lists the tokens every model trained on",
            train_config.max_steps,
        )
    root = Path(out_dir if out_dir is not None else config.output_dir).absolute()
    if str(root) != config.output_dir:
        config = dataclasses.replace(config, output_dir=str(root))
    layout = RunLayout(root)
    prepare_run_dir(layout, config, overwrite=overwrite)

    clock = StageClock(layout.state_file)
    resources = Resources(config, clock, theta0=theta0, archive=archive)
    steps: list[tuple[str, Callable[[], Any]]] = []
    state: dict[str, Any] = {}

    def plan_step() -> None:
        state["plan"] = run_plan_stage(layout, resources, progress=progress)

    steps.append(("plan", plan_step))
    steps.append(
        (
            "branches",
            lambda: run_branches_stage(
                layout, resources, state["plan"], train_config, progress=progress
            ),
        )
    )
    steps.append(("merge", lambda: run_merge_stage(layout, resources, merge_settings)))
    if eval_settings.trains_joint:
        steps.append(
            (
                "joint",
                lambda: run_joint_stage(
                    layout, resources, state["plan"], train_config, progress=progress
                ),
            )
        )

    def eval_step() -> None:
        state["eval"] = run_eval_stage(layout, resources, state["plan"], eval_settings)

    steps.append(("eval", eval_step))
    for name, step in steps:
        step()
        if name == stop_after:
            logger.info("stopping after stage %s (stop_after)", name)
            return None

    with clock.stage("report"):
        report, results = write_run_report(layout, config, state["plan"], state.get("eval"), clock)
    # The report was written before the report stage's own time was known: write it
    # again so that its time table is complete.
    report, results = write_run_report(layout, config, state["plan"], state.get("eval"), clock)
    return RunOutcome(layout, report, results, clock.table())


def format_outcome(outcome: RunOutcome) -> str:
    """Return the summary lines printed at the end of ``merit run``."""
    results = json.loads(outcome.results.read_text(encoding="utf-8"))
    lines = ["", *[f"- {statement}" for statement in results["summary"]], ""]
    lines.append(outcome.stage_table)
    lines.append(f"report: {outcome.report}")
    lines.append(f"results: {outcome.results}")
    return "\n".join(lines)


def describe_run(config: RunConfig, *, out_dir: str | Path | None = None) -> str:
    """Return what ``merit run`` would do for ``config``; loads no model and no data."""
    from merit_jax.runconfig import describe

    root = Path(out_dir if out_dir is not None else config.output_dir)
    train_config = train_config_of(config)
    merge_settings = merge_settings_of(config)
    eval_settings = eval_settings_of(config)
    lines = [
        describe(config, out_dir=root / "plan"),
        f"run directory: {root}",
        f"branches: {train_config}",
        f"merge: {merge_settings}",
        f"eval: {eval_settings}",
        "joint baseline: "
        + (
            "every task in one group, the same total budget" if eval_settings.trains_joint else "no"
        ),
    ]
    return "\n".join(lines)


def resolve_model_names(requested: Sequence[str], num_branches: int) -> list[str]:
    """Expand and check model names: theta0, branches, branch_<k>, merged, joint."""
    from merit_jax.report.evaluate import model_names

    names: list[str] = []
    problems = []
    for name in requested:
        if name.startswith("branch_"):
            index = name.removeprefix("branch_")
            if not index.isdigit() or int(index) >= num_branches:
                problems.append(f"{name!r} (the plan has branch_0 to branch_{num_branches - 1})")
                continue
            names.append(name)
        elif name in ("theta0", "branches", "merged", "joint"):
            names += model_names([name], num_branches)
        else:
            problems.append(repr(name))
    if problems:
        raise ConfigError(
            f"unknown model(s) {', '.join(problems)}; use theta0, branches, branch_<k>, merged "
            "or joint"
        )
    return list(dict.fromkeys(names))


def evaluate_run_dir(
    run_dir: str | Path,
    *,
    models: Sequence[str] | None = None,
    config_path: str | Path | None = None,
    theta0: Any = None,
    archive: Any = None,
    **overrides: Any,
) -> str:
    """Evaluate models of a finished or partial run into ``run_dir/eval``; return a summary.

    ``overrides`` replace fields of the config's eval settings, such as
    ``num_examples``. ``models`` defaults to the config's ``eval.models``.
    ``theta0`` and ``archive`` are as in :func:`run_pipeline`.
    """
    layout = RunLayout(Path(run_dir).absolute())
    config = load_run_config(layout.plan_file, config_path)
    settings = eval_settings_of(config)
    try:
        settings = dataclasses.replace(settings, **overrides)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    plan = load_plan(layout.plan_file)
    names = resolve_model_names(models or settings.models, plan.num_groups)
    resources = Resources(config, StageClock(None), theta0=theta0, archive=archive)
    from merit_jax.report.evaluate import evaluate_run

    report = evaluate_run(layout, resources, settings, names)
    lines = [f"{'model':<10} {'held-out loss':>13} {'MC acc':>7}"]
    chance = report.get("chance", {})
    for name, result in report["models"].items():
        pooled = result.get("held_out_pooled_loss")
        accuracies = [entry["acc"] for entry in result["multiple_choice"].values()]
        accuracy = sum(accuracies) / len(accuracies) if accuracies else None
        lines.append(
            f"{name:<10} {'-' if pooled is None else f'{pooled:.4f}':>13} "
            f"{'-' if accuracy is None else f'{accuracy:.3f}':>7}"
        )
    if chance:
        lines.append(f"{'chance':<10} {'':>13} {sum(chance.values()) / len(chance):>7.3f}")
    lines.append(f"wrote {layout.eval_dir / 'results.json'} and {layout.eval_dir / 'results.md'}")
    return "\n".join(lines)
