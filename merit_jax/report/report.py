"""The run report: report.md and results.json of a ``merit run``.

:func:`build_results` gathers what a finished run produced into one
JSON-ready mapping. It contains the plan (groups, tasks, S_k, N_k, w_k), the
training records of every branch and of the joint baseline, the merge
record, the evaluation of every model, and the wall time of every stage.
:func:`summarize` turns the evaluation into plain statements (which model
has the lowest held-out loss, by how much, and whether multiple-choice
accuracy differs from chance by more than its standard error), whatever
the numbers are. :func:`format_report` renders everything as markdown.

Model names follow the eval step: ``theta0``, ``branch_<k>``, ``merged``
and ``joint``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from merit_jax.conflict.plan import Plan

RESULTS_FORMAT = 1
REPORT_MARKDOWN = "report.md"
RESULTS_JSON = "results.json"

# A difference counts as beyond noise when it exceeds this many standard errors.
NOISE_STDERRS = 2.0


def branch_model_name(index: int) -> str:
    """Return the eval name of branch ``index``: ``branch_<k>``."""
    return f"branch_{index}"


def plan_summary(plan: Plan) -> dict[str, Any]:
    """Return the plan's groups and tasks as JSON-ready values."""
    return {
        "num_tasks": len(plan.tasks),
        "num_groups": plan.num_groups,
        "partitioner": plan.settings.partitioner,
        "pca_dim": plan.settings.pca_dim,
        "calibration_size": plan.settings.calibration_size,
        "seed": plan.seed,
        "theta0_sha256": plan.theta0_sha256,
        "groups": [
            {
                "index": group.index,
                "tasks": list(group.tasks),
                "samples": group.samples,
                "tokens": group.tokens,
                "weight": group.weight,
            }
            for group in plan.groups
        ],
        "tasks": [
            {"name": task.name, "group": task.group, "samples": task.samples, "tokens": task.tokens}
            for task in plan.tasks
        ],
    }


def training_summary(info: Mapping[str, Any]) -> dict[str, Any]:
    """Return the numbers of one branch.json that the report shows."""
    keys = ("steps", "tokens", "targets", "final_loss", "wall_time_s")
    return {key: info.get(key) for key in keys}


def _mc_mean(entries: Mapping[str, Mapping[str, Any]], tasks: Sequence[str]) -> dict[str, Any]:
    """Return the mean acc over ``tasks`` and its standard error from the per-task errors."""
    values = [entries[task]["acc"] for task in tasks]
    errors = [entries[task].get("acc_stderr") for task in tasks]
    mean = sum(values) / len(values)
    stderr = None
    known = [float(error) for error in errors if error is not None]
    if len(known) == len(errors):
        stderr = math.sqrt(sum(error**2 for error in known)) / len(known)
    return {"acc": mean, "acc_stderr": stderr}


def own_branch_losses(
    models: Mapping[str, Mapping[str, Any]], plan: Plan
) -> dict[str, float] | None:
    """Return every task's held-out loss under the branch that trained on it.

    None when some branch was not evaluated on held-out examples.
    """
    losses = {}
    for task in plan.tasks:
        entry = models.get(branch_model_name(task.group), {}).get("held_out", {}).get(task.name)
        if entry is None:
            return None
        losses[task.name] = entry["loss"]
    return losses


def _pooled(losses: Mapping[str, float], targets: Mapping[str, int]) -> float:
    total = sum(losses[task] * targets[task] for task in losses)
    return total / sum(targets[task] for task in losses)


def eval_summary(eval_report: Mapping[str, Any], plan: Plan) -> dict[str, Any]:
    """Return the held-out and multiple-choice numbers per model, plus own-branch losses."""
    models = eval_report["models"]
    chance = dict(eval_report.get("chance", {}))
    mc_tasks = list(chance)
    summary: dict[str, Any] = {"chance": chance, "models": {}}
    if mc_tasks:
        summary["mc_mean_chance"] = sum(chance.values()) / len(mc_tasks)
    for name, result in models.items():
        entry: dict[str, Any] = {
            "held_out": {task: value["loss"] for task, value in result["held_out"].items()},
            "held_out_pooled_loss": result.get("held_out_pooled_loss"),
            "multiple_choice": {
                task: {
                    key: value.get(key)
                    for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "chance", "n")
                }
                for task, value in result["multiple_choice"].items()
            },
            "seconds": result.get("seconds"),
        }
        if mc_tasks and all(task in result["multiple_choice"] for task in mc_tasks):
            entry["mc_mean"] = _mc_mean(result["multiple_choice"], mc_tasks)
        summary["models"][name] = entry
    own = own_branch_losses(models, plan)
    if own is not None:
        targets = _held_out_targets(models)
        summary["own_branch"] = {
            "held_out": own,
            "held_out_pooled_loss": _pooled(own, targets) if targets else None,
        }
    return summary


def _held_out_targets(models: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
    """Return the number of held-out targets per task (the same for every model)."""
    for result in models.values():
        if result.get("held_out"):
            return {task: int(value["num_targets"]) for task, value in result["held_out"].items()}
    return {}


def build_results(
    *,
    plan: Plan,
    eval_report: Mapping[str, Any] | None,
    training: Mapping[str, Mapping[str, Any]],
    merge: Mapping[str, Any] | None,
    stages: Mapping[str, Mapping[str, Any]],
    config: Mapping[str, Any] | None = None,
    files: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Gather a run's outputs into the JSON-ready results mapping (see the module doc).

    Args:
        plan: the run's plan.
        eval_report: the eval step's results (``merit_jax.eval.runner`` layout), or None.
        training: branch.json contents by model name (``branch_<k>``, ``joint``).
        merge: the merged model's merge.json, or None.
        stages: per stage, ``{"seconds": float, "status": str}``.
        config: the run config as plain values.
        files: figure and table paths relative to the run directory, by name.
    """
    results: dict[str, Any] = {
        "format": RESULTS_FORMAT,
        "config": dict(config) if config is not None else None,
        "plan": plan_summary(plan),
        "training": {name: training_summary(info) for name, info in training.items()},
        "merge": dict(merge) if merge is not None else None,
        "eval": eval_summary(eval_report, plan) if eval_report is not None else None,
        "time": {
            "stages": {name: dict(value) for name, value in stages.items()},
            "total_seconds": sum(float(value["seconds"]) for value in stages.values()),
        },
        "files": dict(files or {}),
    }
    results["summary"] = summarize(results)
    return results


# --------------------------------------------------------------------------- statements


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _merged_against_joint(
    models: Mapping[str, Any], merged: float, joint: float, theta0: float | None
) -> list[str]:
    statements = []
    difference = merged - joint
    if difference == 0:
        statements.append("The merged model's pooled loss equals the joint baseline's.")
    else:
        relation = "higher" if difference > 0 else "lower"
        statements.append(
            f"The merged model's pooled loss is {relation} than the joint baseline's by "
            f"{abs(difference):.4f} ({100 * abs(difference) / joint:.1f}%)."
        )

    merged_tasks = models["merged"]["held_out"]
    joint_tasks = models["joint"]["held_out"]
    wins = sum(merged_tasks[task] < joint_tasks[task] for task in merged_tasks)
    losses = sum(merged_tasks[task] > joint_tasks[task] for task in merged_tasks)
    ties = len(merged_tasks) - wins - losses
    text = (
        f"Per task, the merged model has the lower held-out loss on {wins} of "
        f"{len(merged_tasks)} tasks and the joint baseline on {losses}"
    )
    statements.append(text + (f"; {ties} are tied." if ties else "."))

    if theta0 is None:
        return statements
    gain_joint, gain_merged = theta0 - joint, theta0 - merged
    if gain_joint > 0:
        statements.append(
            f"Against theta0, joint training lowered the pooled loss by {gain_joint:.4f} "
            f"and merging by {gain_merged:.4f}: the merged model keeps "
            f"{100 * gain_merged / gain_joint:.0f}% of the joint baseline's improvement."
        )
    else:
        statements.append(
            f"Joint training did not lower the pooled held-out loss below theta0's "
            f"({joint:.4f} against {theta0:.4f}), so the training budget is too small "
            "to show an improvement to compare against."
        )
    return statements


def _held_out_statements(evaluation: Mapping[str, Any]) -> list[str]:
    models = evaluation["models"]
    pooled = {
        name: entry["held_out_pooled_loss"]
        for name, entry in models.items()
        if entry.get("held_out_pooled_loss") is not None
    }
    if not pooled:
        return []
    listing = ", ".join(f"{name} {value:.4f}" for name, value in pooled.items())
    best = min(pooled, key=lambda name: pooled[name])
    statements = [
        f"Pooled held-out loss of the training tasks (nats per response token, lower is "
        f"better): {listing}. The lowest is {best}."
    ]

    merged, joint = pooled.get("merged"), pooled.get("joint")
    if merged is not None and joint is not None:
        statements += _merged_against_joint(models, merged, joint, pooled.get("theta0"))

    own = evaluation.get("own_branch")
    if own and own.get("held_out_pooled_loss") is not None and merged is not None:
        own_loss = own["held_out_pooled_loss"]
        if merged > own_loss:
            verdict = f"so merging cost {merged - own_loss:.4f} against the specialists"
        else:
            verdict = f"so merging gained {own_loss - merged:.4f} over the specialists"
        statements.append(
            f"Each task scored by the branch that trained on it gives a pooled loss of "
            f"{own_loss:.4f}, and the merged model {merged:.4f}, {verdict}."
        )
    return statements


def _mc_statements(evaluation: Mapping[str, Any]) -> list[str]:
    chance = evaluation.get("mc_mean_chance")
    means = {
        name: entry["mc_mean"] for name, entry in evaluation["models"].items() if "mc_mean" in entry
    }
    if chance is None or not means:
        return []
    listing = ", ".join(
        f"{name} {mean['acc']:.3f}"
        + (f" ± {mean['acc_stderr']:.3f}" if mean["acc_stderr"] is not None else "")
        for name, mean in means.items()
    )
    statements = [
        f"Mean multiple-choice accuracy over {len(evaluation['chance'])} held-out "
        f"evaluation task(s) (± standard error): {listing}; chance is {chance:.3f}."
    ]
    for name in ("merged", "joint"):
        if name not in means or "theta0" not in means:
            continue
        difference = means[name]["acc"] - means["theta0"]["acc"]
        errors = [means[name]["acc_stderr"], means["theta0"]["acc_stderr"]]
        if all(error is not None for error in errors):
            noise = NOISE_STDERRS * math.sqrt(sum(e**2 for e in errors))  # type: ignore[operator]
            verdict = (
                "within noise"
                if abs(difference) <= noise
                else ("above" if difference > 0 else "below") + " theta0 beyond noise"
            )
            statements.append(
                f"{name} minus theta0: {difference:+.3f} ({verdict}; {NOISE_STDERRS:g} standard "
                f"errors of the difference are {noise:.3f})."
            )
    for name, mean in means.items():
        if mean["acc_stderr"] is not None:
            margin = NOISE_STDERRS * mean["acc_stderr"]
            if abs(mean["acc"] - chance) <= margin:
                statements.append(
                    f"{name}'s mean accuracy is within {NOISE_STDERRS:g} standard errors of chance."
                )
    return statements


def summarize(results: Mapping[str, Any]) -> list[str]:
    """Return plain statements of what the evaluation shows, whatever it shows."""
    evaluation = results.get("eval")
    if not evaluation:
        return ["No model was evaluated."]
    statements = _held_out_statements(evaluation) + _mc_statements(evaluation)
    return statements or ["The evaluation produced no held-out or multiple-choice numbers."]


# --------------------------------------------------------------------------- markdown


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return lines + [""]


def _plan_section(results: Mapping[str, Any]) -> list[str]:
    plan = results["plan"]
    training = results["training"]
    lines = [
        "## Plan",
        "",
        f"{plan['num_tasks']} training tasks split into K = {plan['num_groups']} groups by the "
        f"{plan['partitioner']} partitioner (r = {plan['pca_dim']} PCA axes, "
        f"{plan['calibration_size']} calibration examples per task, seed {plan['seed']}). "
        "S_k: training samples, N_k: token budget, w_k = N_k / sum_j N_j: merge weight.",
        "",
    ]
    rows = []
    for group in plan["groups"]:
        record = training.get(branch_model_name(group["index"]), {})
        rows.append(
            [
                str(group["index"]),
                str(group["samples"]),
                str(group["tokens"]),
                f"{group['weight']:.3f}",
                str(record.get("steps", "–")),
                str(record.get("tokens", "–")),
                _fmt(record.get("final_loss"), 3),
                ", ".join(group["tasks"]),
            ]
        )
    joint = training.get("joint")
    if joint:
        total_samples = sum(group["samples"] for group in plan["groups"])
        total_tokens = sum(group["tokens"] for group in plan["groups"])
        rows.append(
            [
                "joint",
                str(total_samples),
                str(total_tokens),
                "–",
                str(joint.get("steps", "–")),
                str(joint.get("tokens", "–")),
                _fmt(joint.get("final_loss"), 3),
                "every task",
            ]
        )
    lines += _table(
        [
            "group",
            "S_k",
            "N_k",
            "w_k",
            "steps",
            "tokens trained",
            "last train loss",
            "tasks",
        ],
        rows,
    )
    files = results.get("files", {})
    figures = [
        f"![{name}]({files[name]})"
        for name in ("similarity", "pca", "loss_curves")
        if name in files
    ]
    if figures:
        lines += [
            "Task cosine matrix at theta0 (ordered by group), tasks on PCA axes 1-2, and the "
            "training loss curves:",
            "",
            *figures,
            "",
        ]
    return lines


def _model_order(evaluation: Mapping[str, Any]) -> list[str]:
    return list(evaluation["models"])


def _held_out_section(results: Mapping[str, Any]) -> list[str]:
    evaluation = results["eval"]
    models = evaluation["models"]
    names = [name for name in _model_order(evaluation) if models[name]["held_out"]]
    if not names:
        return []
    group_of = {task["name"]: task["group"] for task in results["plan"]["tasks"]}
    own = evaluation.get("own_branch")
    header = ["task", "group", *names] + (["own branch"] if own else [])
    rows = []
    tasks = list(models[names[0]]["held_out"])
    for task in tasks:
        values = {name: models[name]["held_out"].get(task) for name in names}
        best = min((v for v in values.values() if v is not None), default=None)
        cells = [task, str(group_of.get(task, "–"))]
        for name in names:
            text = _fmt(values[name])
            cells.append(
                f"**{text}**" if values[name] is not None and values[name] == best else text
            )
        if own:
            cells.append(_fmt(own["held_out"].get(task)))
        rows.append(cells)
    pooled = [_fmt(models[name]["held_out_pooled_loss"]) for name in names]
    rows.append(["**pooled**", ""] + pooled + ([_fmt(own["held_out_pooled_loss"])] if own else []))
    explanation = (
        "Mean loss per response token (nats, lower is better) on examples of each training task "
        "that no model trained on; the lowest of each row is bold."
    )
    if own:
        explanation += " 'own branch' scores each task with the branch that trained on it."
    return ["## Held-out loss of the training tasks", "", explanation, "", *_table(header, rows)]


def _mc_section(results: Mapping[str, Any]) -> list[str]:
    evaluation = results["eval"]
    chance = evaluation.get("chance", {})
    models = evaluation["models"]
    names = [name for name in _model_order(evaluation) if models[name]["multiple_choice"]]
    if not chance or not names:
        return []
    rows = []
    for task, level in chance.items():
        cells = [task, str(models[names[0]]["multiple_choice"][task]["n"]), f"{level:.3f}"]
        for name in names:
            entry = models[name]["multiple_choice"].get(task)
            if entry is None:
                cells.append("–")
            else:
                error = entry.get("acc_stderr")
                cells.append(
                    f"{entry['acc']:.3f}" + (f" ± {error:.3f}" if error is not None else "")
                )
        rows.append(cells)
    mean_cells = ["**mean**", "", f"{evaluation['mc_mean_chance']:.3f}"]
    for name in names:
        mean = models[name].get("mc_mean")
        mean_cells.append("–" if mean is None else f"{mean['acc']:.3f}")
    rows.append(mean_cells)
    return [
        "## Multiple-choice accuracy on held-out evaluation tasks",
        "",
        "Zero-shot log-likelihood accuracy ± standard error on BIG-bench tasks that no model "
        "trained on; chance is the expected accuracy of a uniform random pick on the same "
        "examples. acc_norm and per-request details are in eval/results.json.",
        "",
        *_table(["task", "n", "chance", *names], rows),
    ]


def _time_section(results: Mapping[str, Any]) -> list[str]:
    stages = results["time"]["stages"]
    total = results["time"]["total_seconds"]
    rows = [
        [
            name,
            f"{float(value['seconds']):.1f}",
            f"{100 * float(value['seconds']) / total:.0f}%" if total else "–",
            str(value.get("status", "")),
        ]
        for name, value in stages.items()
    ]
    rows.append(["**total**", f"{total:.1f}", "100%" if total else "–", ""])
    return [
        "## Time",
        "",
        "Wall time of each stage in seconds. A stage marked 'earlier' finished in an earlier "
        "invocation of `merit run` and was skipped in the last one.",
        "",
        *_table(["stage", "seconds", "share", "status"], rows),
    ]


def format_report(results: Mapping[str, Any]) -> str:
    """Render ``results`` (from :func:`build_results`) as the markdown report."""
    lines = ["# MERIT run report", "", "## Summary", ""]
    lines += [f"- {statement}" for statement in results["summary"]]
    lines.append("")
    lines += _plan_section(results)
    if results.get("eval"):
        lines += _held_out_section(results)
        lines += _mc_section(results)
    merge = results.get("merge")
    if merge:
        weights = merge.get("weights")
        lines += [
            "## Merge",
            "",
            f"{merge.get('method', 'linear')} merge with {merge.get('weighting', '?')} weights "
            f"{weights}, dtype {merge.get('dtype', '?')}.",
            "",
        ]
    lines += _time_section(results)
    return "\n".join(lines)


def write_report(results: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write report.md and results.json into ``out_dir``; return both paths."""
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / RESULTS_JSON
    markdown_path = directory / REPORT_MARKDOWN
    json_path.write_text(json.dumps(json_ready(results), indent=2, allow_nan=False) + "\n")
    markdown_path.write_text(format_report(results))
    return markdown_path, json_path


def json_ready(value: Any) -> Any:
    """Return ``value`` with non-finite floats replaced by None, which JSON can represent."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    return value
