"""Evaluate one or several models on the same held-out tasks and write the results.

:class:`EvalSpec` fixes what every model is evaluated on: multiple-choice tasks
(log-likelihood, see ``merit_jax.eval.multiple_choice``), held-out instruction
examples (mean token loss, see ``merit_jax.eval.held_out``) and optional
short-answer tasks (greedy exact match). :func:`evaluate_models` runs one spec
over named models (theta0, the branches, the merged model, a joint baseline)
and writes ``results.json`` and ``results.md`` into the eval directory.

results.json layout::

    {"format": 1,
     "spec": {...settings...},
     "chance": {mc task: chance accuracy},
     "models": {model name: {"multiple_choice": {task: {acc, acc_stderr, acc_norm,
                                                         acc_norm_stderr, chance, n, ...}},
                             "held_out": {task: {loss, num_targets, ...}},
                             "held_out_pooled_loss": float or null,
                             "exact_match": {task: {exact_match, exact_match_stderr, n, ...}},
                             "seconds": float}}}
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from merit_jax.data.format import TRUNCATION_MODES, Truncation
from merit_jax.data.task import Example, MultipleChoiceTask
from merit_jax.eval.generation import evaluate_exact_match
from merit_jax.eval.held_out import HeldOutData, held_out_losses, pooled_loss, prepare_held_out
from merit_jax.eval.multiple_choice import evaluate_multiple_choice, select_examples
from merit_jax.models.decoder import Decoder

logger = logging.getLogger(__name__)

RESULTS_FORMAT = 1
RESULTS_JSON = "results.json"
RESULTS_MARKDOWN = "results.md"

# A model, or a function that loads it. A loader runs just before the model's
# evaluation and its model is released afterwards, so loaded models never
# share memory.
ModelSource = Decoder | Callable[[], Decoder]


def _positive(owner: str, field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {field}={value!r} must be a positive integer")


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """The tasks and settings that every evaluated model shares."""

    multiple_choice: tuple[MultipleChoiceTask, ...] = ()
    # task name -> held-out instruction examples, scored by mean token loss
    held_out: Mapping[str, tuple[Example, ...]] = dataclasses.field(default_factory=dict)
    # task name -> short-answer examples, scored by greedy exact match
    exact_match: Mapping[str, tuple[Example, ...]] = dataclasses.field(default_factory=dict)
    num_examples: int | None = None  # multiple-choice examples per task (None: all)
    seed: int | None = None  # None: the first num_examples in file order; else a seeded draw
    max_length: int = 1024  # tokens per multiple-choice request and per packed held-out row
    batch_tokens: int = 4096  # B * T of one multiple-choice forward pass
    held_out_batch_size: int = 4  # packed rows per held-out batch
    system: str | None = None  # system turn of the chat template (held-out and exact match)
    truncation: Truncation = "middle"  # how held-out prompts are shortened to fit max_length
    max_new_tokens: int = 32  # exact-match reply length limit
    generation_batch_size: int = 16

    def __post_init__(self) -> None:
        object.__setattr__(self, "multiple_choice", tuple(self.multiple_choice))
        for field in ("held_out", "exact_match"):
            mapping = {name: tuple(examples) for name, examples in getattr(self, field).items()}
            object.__setattr__(self, field, mapping)

        if not (self.multiple_choice or self.held_out or self.exact_match):
            raise ValueError(
                "eval spec has no tasks; give multiple_choice tasks, held_out examples or "
                "exact_match examples"
            )
        names = [task.name for task in self.multiple_choice]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"eval spec: duplicate multiple-choice task names {duplicates}")

        if self.num_examples is not None:
            _positive("eval spec", "num_examples", self.num_examples)
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"eval spec: seed={self.seed!r} must be an integer or None")
        for field in (
            "batch_tokens",
            "held_out_batch_size",
            "max_new_tokens",
            "generation_batch_size",
        ):
            _positive("eval spec", field, getattr(self, field))

        _positive("eval spec", "max_length", self.max_length)
        if self.max_length < 2:
            raise ValueError(f"eval spec: max_length={self.max_length} must be at least 2 tokens")
        if self.truncation not in TRUNCATION_MODES:
            raise ValueError(
                f"eval spec: truncation={self.truncation!r} is invalid; expected one of "
                f"{', '.join(TRUNCATION_MODES)}"
            )

    def settings(self) -> dict[str, Any]:
        """Return the JSON-ready description of the spec (task names and settings)."""
        return {
            "multiple_choice": [task.name for task in self.multiple_choice],
            "held_out": {name: len(examples) for name, examples in self.held_out.items()},
            "exact_match": {name: len(examples) for name, examples in self.exact_match.items()},
            "num_examples": self.num_examples,
            "seed": self.seed,
            "max_length": self.max_length,
            "batch_tokens": self.batch_tokens,
            "held_out_batch_size": self.held_out_batch_size,
            "system": self.system,
            "truncation": self.truncation,
            "max_new_tokens": self.max_new_tokens,
        }

    def chance(self) -> dict[str, float]:
        """Return the chance accuracy of every multiple-choice task over its evaluated examples."""
        chance = {}
        for task in self.multiple_choice:
            indices = select_examples(task, self.num_examples, seed=self.seed)
            fractions = [
                len(task.examples[i].gold_indices) / len(task.examples[i].choices) for i in indices
            ]
            chance[task.name] = sum(fractions) / len(fractions)
        return chance


def _prepare_held_out(tokenizer: Any, spec: EvalSpec) -> HeldOutData | None:
    if not spec.held_out:
        return None
    return prepare_held_out(
        tokenizer,
        spec.held_out,
        seq_len=spec.max_length,
        batch_size=spec.held_out_batch_size,
        system=spec.system,
        truncation=spec.truncation,
    )


def evaluate_model(
    model: Decoder,
    tokenizer: Any,
    eval_spec: EvalSpec,
    *,
    held_out_data: HeldOutData | None = None,
) -> dict[str, Any]:
    """Evaluate one model on ``eval_spec``; return its JSON-ready results (see the module doc).

    ``held_out_data`` reuses examples already tokenized and packed for this spec.
    """
    start = time.perf_counter()
    results: dict[str, Any] = {
        "multiple_choice": {},
        "held_out": {},
        "held_out_pooled_loss": None,
        "exact_match": {},
    }
    if eval_spec.multiple_choice:
        scored = evaluate_multiple_choice(
            model,
            tokenizer,
            eval_spec.multiple_choice,
            num_examples=eval_spec.num_examples,
            seed=eval_spec.seed,
            max_length=eval_spec.max_length,
            batch_tokens=eval_spec.batch_tokens,
        )
        results["multiple_choice"] = {name: result.summary() for name, result in scored.items()}
    if eval_spec.held_out:
        data = held_out_data or _prepare_held_out(tokenizer, eval_spec)
        assert data is not None
        losses = held_out_losses(model, data)
        results["held_out"] = {name: result.summary() for name, result in losses.items()}
        results["held_out_pooled_loss"] = pooled_loss(losses)
    if eval_spec.exact_match:
        matched = evaluate_exact_match(
            model,
            tokenizer,
            eval_spec.exact_match,
            max_new_tokens=eval_spec.max_new_tokens,
            max_prompt_length=eval_spec.max_length,
            batch_size=eval_spec.generation_batch_size,
            system=eval_spec.system,
        )
        results["exact_match"] = {name: result.summary() for name, result in matched.items()}
    results["seconds"] = time.perf_counter() - start
    return results


def evaluate_models(
    models: Mapping[str, ModelSource],
    tokenizer: Any,
    eval_spec: EvalSpec,
    *,
    out_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Evaluate every named model on ``eval_spec``; write results.json and results.md.

    The files go to ``out_dir`` when it is given.

    ``models`` maps names (``"theta0"``, ``"branch_0"``, ``"merged"``, ...) to
    models or to functions that load them. All models share one tokenizer, and the
    held-out examples are tokenized once.
    """
    if not models:
        raise ValueError("no models to evaluate; pass at least one name -> model")
    held_out_data = _prepare_held_out(tokenizer, eval_spec)
    report: dict[str, Any] = {
        "format": RESULTS_FORMAT,
        "spec": eval_spec.settings(),
        "chance": eval_spec.chance(),
        "models": {},
    }
    for name, source in models.items():
        logger.info("evaluating model %s", name)
        model = source if isinstance(source, Decoder) else source()
        report["models"][name] = evaluate_model(
            model, tokenizer, eval_spec, held_out_data=held_out_data
        )
        del model
    if out_dir is not None:
        write_results(report, out_dir)
    return report


def _json_ready(value: Any) -> Any:
    """Replace non-finite floats by None, which JSON can represent."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    return value


def write_results(report: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``report`` as results.json and its tables as results.md; return both paths."""
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / RESULTS_JSON
    markdown_path = directory / RESULTS_MARKDOWN
    json_path.write_text(json.dumps(_json_ready(report), indent=2, allow_nan=False) + "\n")
    markdown_path.write_text(format_markdown(report))
    logger.info("wrote %s and %s", json_path, markdown_path)
    return json_path, markdown_path


def _score_cell(value: float | None, stderr: float | None) -> str:
    if value is None:
        return "–"
    if stderr is None:
        return f"{value:.3f}"
    return f"{value:.3f} ± {stderr:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return lines


def format_markdown(report: Mapping[str, Any]) -> str:
    """Render the report as markdown tables: task rows, one column per model, chance beside."""
    names = list(report["models"])
    models = [report["models"][name] for name in names]
    lines = ["# Evaluation results", ""]

    mc_tasks = list(report.get("chance", {}))
    if mc_tasks:
        lines += [
            "## Multiple choice (log-likelihood, zero-shot)",
            "",
            "acc / acc_norm ± standard error; chance is the expected accuracy of a uniform "
            "random pick on the same examples.",
            "",
        ]
        rows = []
        for task in mc_tasks:
            for metric in ("acc", "acc_norm"):
                cells = [task, metric, f"{report['chance'][task]:.3f}"]
                for model in models:
                    entry = model["multiple_choice"].get(task)
                    if entry is None:
                        cells.append("–")
                    else:
                        cells.append(_score_cell(entry[metric], entry[f"{metric}_stderr"]))
                rows.append(cells)
        for metric in ("acc", "acc_norm"):
            mean_chance = sum(report["chance"].values()) / len(mc_tasks)
            cells = ["**mean**", metric, f"{mean_chance:.3f}"]
            for model in models:
                values = [model["multiple_choice"][task][metric] for task in mc_tasks]
                cells.append(f"{sum(values) / len(values):.3f}")
            rows.append(cells)
        lines += _table(["task", "metric", "chance", *names], rows) + [""]

    held_out_tasks = list(report.get("spec", {}).get("held_out", {}))
    if held_out_tasks:
        lines += ["## Held-out loss (nats per response token, lower is better)", ""]
        rows = []
        for task in held_out_tasks:
            cells = [task]
            for model in models:
                entry = model["held_out"].get(task)
                cells.append("–" if entry is None else f"{entry['loss']:.4f}")
            rows.append(cells)
        pooled = [model.get("held_out_pooled_loss") for model in models]
        rows.append(["**pooled**"] + ["–" if p is None else f"{p:.4f}" for p in pooled])
        lines += _table(["task", *names], rows) + [""]

    exact_tasks = list(report.get("spec", {}).get("exact_match", {}))
    if exact_tasks:
        lines += ["## Exact match (greedy generation)", ""]
        rows = []
        for task in exact_tasks:
            cells = [task]
            for model in models:
                entry = model["exact_match"].get(task)
                if entry is None:
                    cells.append("–")
                else:
                    cells.append(_score_cell(entry["exact_match"], entry["exact_match_stderr"]))
            rows.append(cells)
        lines += _table(["task", *names], rows) + [""]
    return "\n".join(lines)
