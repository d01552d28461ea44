"""The pipeline subcommands of ``merit``: run, train-branch, merge and eval.

Each subcommand has ``add_<name>_parser`` and ``cmd_<name>``, listed in
``merit_jax.cli._SUBCOMMANDS``. This module imports only the standard
library at import time, so ``merit --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

MERGE_DTYPES = ("float32", "bfloat16", "float16")


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _merge_weights(text: str) -> str | list[float]:
    if text in ("token", "uniform"):
        return text
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be 'token', 'uniform' or comma-separated numbers such as 0.5,0.5, got {text!r}"
        ) from None


def guarded(command: str, body: Callable[[], int]) -> int:
    """Run ``body``; print errors about the user's input without a traceback.

    Those errors name the value and the fix. Any other exception is a bug and
    keeps its traceback.
    """
    from merit_jax.conflict.partition import PartitionError
    from merit_jax.conflict.plan import PlanError
    from merit_jax.data.bigbench import UnknownTaskError
    from merit_jax.merge.errors import MergeError
    from merit_jax.runconfig import ConfigError

    try:
        return body()
    except (
        ConfigError,
        PlanError,
        PartitionError,
        UnknownTaskError,
        MergeError,
        FileExistsError,
        FileNotFoundError,
    ) as error:
        print(f"merit {command}: error: {error}", file=sys.stderr)
        return 1


# --- run ---------------------------------------------------------------------


def add_run_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "run",
        help="plan, train every branch, merge, train the joint baseline, evaluate and report",
        description=(
            "Run every MERIT step of CONFIG on this host: the plan, the K branches, their merge, "
            "the joint baseline (every task in one group, with the same total token budget), the "
            "evaluation of every model, and the report (report.md and results.json in the run "
            "directory). An interrupted run resumes: finished stages are skipped and a branch "
            "continues from its last checkpoint. Prints the wall time of every stage."
        ),
    )
    parser.add_argument(
        "config", metavar="CONFIG", help="run config YAML, e.g. configs/quickstart.yaml"
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="run directory (default: the config's output_dir)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. train.learning_rate=1e-4 (repeatable)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the earlier run in the run directory and start again",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config and print what would run, without loading model or data",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    return guarded("run", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from merit_jax.report.run import describe_run, format_outcome, run_pipeline
    from merit_jax.runconfig import load_config

    config = load_config(args.config, args.overrides)
    if args.dry_run:
        print(describe_run(config, out_dir=args.out))
        return 0
    outcome = run_pipeline(
        config, out_dir=args.out, overwrite=args.overwrite, progress=not args.no_progress
    )
    assert outcome is not None
    print(format_outcome(outcome))
    return 0


# --- train-branch ------------------------------------------------------------


def add_train_branch_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train-branch",
        help="train one branch of a plan from theta0",
        description=(
            "Train group K of PLAN from theta0 on the group's datasets and write "
            "RUN/branches/K/ (checkpoints, final weights, branch.json, metrics.jsonl). Needs "
            "only the plan, theta0 and the group's data, so every branch can run on its own "
            "machine. The run config (mixture and train section) is read from config.yaml next "
            "to plan.json, which `merit run` and `merit plan` write there. A stopped branch "
            "resumes from its last checkpoint; a finished one is skipped."
        ),
    )
    parser.add_argument("--plan", required=True, metavar="PLAN", help="plan.json or its directory")
    parser.add_argument(
        "--branch", required=True, type=_non_negative_int, metavar="K", help="group index k"
    )
    parser.add_argument(
        "--config",
        metavar="CONFIG",
        default=None,
        help="run config YAML (default: config.yaml next to plan.json)",
    )
    parser.add_argument(
        "--out",
        metavar="RUN",
        default=None,
        help="run directory that receives branches/K/ (default: the plan directory's parent)",
    )
    parser.add_argument(
        "--model",
        metavar="MODEL",
        default=None,
        help="theta0: registry name, .gguf file, model directory or hub id (default: the "
        "config's model.ref); its weights must hash to the plan's theta0",
    )
    parser.add_argument(
        "--stop-at-step",
        type=_positive_int,
        default=None,
        metavar="N",
        help="stop after N steps with a checkpoint; run again to resume",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def cmd_train_branch(args: argparse.Namespace) -> int:
    return guarded("train-branch", lambda: _train_branch(args))


def _train_branch(args: argparse.Namespace) -> int:
    from merit_jax.report.rundir import (
        load_run_config,
        plan_file_of,
        run_dir_of_plan,
        train_config_of,
    )
    from merit_jax.train.branch import train_branch

    plan_file = plan_file_of(args.plan)
    if not plan_file.is_file():
        raise FileNotFoundError(f"plan file {plan_file} not found: run `merit plan` first")
    config = load_run_config(plan_file, args.config)
    out = Path(args.out) if args.out is not None else run_dir_of_plan(plan_file)
    result = train_branch(
        plan_file,
        args.branch,
        out,
        train_config_of(config),
        model=args.model or config.model.ref,
        mixture=config.data.mixture,
        stop_at_step=args.stop_at_step,
        progress=not args.no_progress,
    )
    state = "finished" if result.finished else "stopped"
    print(
        f"branch {result.index}: {state} at step {result.steps} of {result.num_steps}, "
        f"{result.tokens} tokens -> {result.directory}"
    )
    return 0


# --- merge -------------------------------------------------------------------


def add_merge_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "merge",
        help="merge the trained branches of a plan: theta_bar = sum_k w_k theta_k",
        description=(
            "Check every branch of PLAN (finished, same theta0, same plan) and merge them leaf "
            "by leaf into RUN/merged/ (final/ and merge.json). With --export-hf, also write a "
            "Hugging Face model directory."
        ),
    )
    parser.add_argument("--plan", required=True, metavar="PLAN", help="plan.json or its directory")
    parser.add_argument(
        "--run",
        metavar="DIR",
        default=None,
        help="run directory with branches/ (default: the plan's directory or its parent)",
    )
    parser.add_argument(
        "--weights",
        type=_merge_weights,
        default="token",
        metavar="token|uniform|W,W,...",
        help="w_k: 'token' (N_k / sum_j N_j from the plan), 'uniform' (1/K) or one number per "
        "branch, summing to 1 (default: token)",
    )
    parser.add_argument(
        "--dtype",
        choices=MERGE_DTYPES,
        default=None,
        help="dtype of the merged parameters (default: the branches' dtype)",
    )
    parser.add_argument(
        "--out", metavar="DIR", default=None, help="output directory (default: RUN/merged)"
    )
    parser.add_argument(
        "--export-hf", metavar="DIR", default=None, help="also write a Hugging Face model here"
    )
    parser.add_argument(
        "--theta0",
        metavar="MODEL",
        default=None,
        help="the model the branches were trained from, for the export's config and tokenizer "
        "(default: model.ref of config.yaml next to plan.json)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing merged model or export"
    )
    return parser


def cmd_merge(args: argparse.Namespace) -> int:
    return guarded("merge", lambda: _merge(args))


def _merge(args: argparse.Namespace) -> int:
    from merit_jax.merge import merge_run
    from merit_jax.report.rundir import CONFIG_FILE, plan_file_of
    from merit_jax.runconfig import load_config

    plan_file = plan_file_of(args.plan)
    theta0 = args.theta0
    if theta0 is None and args.export_hf is not None:
        config_path = plan_file.parent / CONFIG_FILE
        if config_path.is_file():
            theta0 = load_config(config_path).model.ref
    result = merge_run(
        plan_file,
        run_dir=args.run,
        weights=args.weights,
        dtype=args.dtype,
        out_dir=args.out,
        export_hf=args.export_hf,
        theta0=theta0,
        overwrite=args.overwrite,
    )
    weights = ", ".join(f"{w:.4f}" for w in result.weights)
    print(
        f"merged {result.num_parameters / 1e6:.1f}M parameters ({result.dtype}, "
        f"{result.weighting} weights {weights}) into {result.checkpoint_dir} in "
        f"{result.seconds:.1f} s"
    )
    if result.hf_dir is not None:
        print(f"Hugging Face export: {result.hf_dir}")
    return 0


# --- eval --------------------------------------------------------------------


def add_eval_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate the models of a run and write RUN/eval/",
        description=(
            "Score models of a run on the held-out examples of every training task (loss per "
            "response token) and on the multiple-choice evaluation tasks (accuracy beside "
            "chance), with the run config's eval settings. Writes RUN/eval/results.json and "
            "results.md; a model already evaluated with the same settings is not redone."
        ),
    )
    parser.add_argument("--run", required=True, metavar="DIR", help="run directory")
    parser.add_argument(
        "--models",
        metavar="NAMES",
        default=None,
        help="comma-separated models: theta0, branches (every branch), branch_K, merged, joint "
        "(default: the config's eval.models)",
    )
    parser.add_argument(
        "--config",
        metavar="CONFIG",
        default=None,
        help="run config YAML (default: DIR/plan/config.yaml)",
    )
    parser.add_argument(
        "--num-examples",
        type=_positive_int,
        default=None,
        metavar="N",
        help="multiple-choice examples per task (default: the config's eval.num_examples)",
    )
    parser.add_argument(
        "--held-out-examples",
        type=_positive_int,
        default=None,
        metavar="N",
        help="held-out examples per training task (default: the config's eval.held_out_examples)",
    )
    return parser


def cmd_eval(args: argparse.Namespace) -> int:
    return guarded("eval", lambda: _eval(args))


def _eval(args: argparse.Namespace) -> int:
    from merit_jax.report.run import evaluate_run_dir

    overrides = {}
    if args.num_examples is not None:
        overrides["num_examples"] = args.num_examples
    if args.held_out_examples is not None:
        overrides["held_out_examples"] = args.held_out_examples
    models = None
    if args.models is not None:
        models = [name.strip() for name in args.models.split(",") if name.strip()]
    print(evaluate_run_dir(args.run, models=models, config_path=args.config, **overrides))
    return 0
