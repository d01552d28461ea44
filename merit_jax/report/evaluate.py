"""The eval stage of a run: every model of the run scored on the same held-out examples.

The models are theta0, each branch (``branch_<k>``), the merged model and the
joint baseline, read from the run directory. They are scored on

* the held-out examples of every training task (``held_out`` in the mixture,
  at most ``eval.held_out_examples`` per task): mean loss per response token,
  tokenized with the run's chat template settings, as in training;
* the multiple-choice tasks of ``data.eval_tasks``, which no model trained on:
  zero-shot log-likelihood accuracy beside its chance level (the branches
  only with ``eval.branches_multiple_choice``).

Each model's results are saved to ``eval/models/<name>.json`` as soon as it is
done, so an interrupted eval resumes with the next model. results.json and
results.md (``merit_jax.eval.runner`` layout) are written at the end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from merit_jax.conflict.artifacts import write_atomic
from merit_jax.report.report import branch_model_name, json_ready
from merit_jax.report.settings import EvalSettings

logger = logging.getLogger(__name__)

MODELS_DIR = "models"


def model_names(groups: Sequence[str], num_branches: int) -> list[str]:
    """Expand ``eval.models`` groups into model names; "branches" gives branch_0..branch_{K-1}."""
    names: list[str] = []
    for group in groups:
        if group == "branches":
            names += [branch_model_name(k) for k in range(num_branches)]
        else:
            names.append(group)
    return names


def build_eval_spec(config: Any, settings: EvalSettings, archive: Any) -> Any:
    """Return the EvalSpec of a run config: its held-out examples and evaluation tasks.

    The held-out examples come from the same seeded split the planner and the
    branches use, so no model has trained on them.
    """
    from merit_jax.data.mixture import load_mixture
    from merit_jax.eval.runner import EvalSpec

    splits = load_mixture(config.data.mixture, seed=config.seed, archive=archive)
    limit = settings.held_out_examples
    held_out = {
        split.train.name: split.held_out[:limit] if limit is not None else split.held_out
        for split in splits
        if split.held_out
    }
    tasks = archive.load_multiple_choice_tasks(config.data.eval_tasks)
    if not held_out and not tasks:
        raise ValueError(
            f"{config.source}: nothing to evaluate; set held_out > 0 for the training datasets "
            "or list multiple-choice tasks in data.eval_tasks"
        )
    return EvalSpec(
        multiple_choice=tuple(tasks),
        held_out=held_out,
        num_examples=settings.num_examples,
        seed=settings.seed,
        max_length=settings.max_length or config.data.max_length,
        batch_tokens=settings.batch_tokens,
        held_out_batch_size=settings.held_out_batch_size,
        system=config.data.system,
        truncation=config.data.truncation,
    )


def model_loader(layout: Any, name: str, theta0: Any) -> Callable[[], Any]:
    """Return a function that builds the Decoder of model ``name`` of the run.

    theta0 is the loaded model itself. Checkpoints are read as float32
    parameters into theta0's architecture and compute dtype.
    """

    def load() -> Any:
        from merit_jax.merge.checkpoint import decoder_from_params, load_params

        if name == "theta0":
            return theta0.model
        directory = layout.final_dir(name)
        if not directory.is_dir():
            raise FileNotFoundError(
                f"model {name}: checkpoint {directory} not found; train or merge it first"
            )
        config = theta0.config.replace(param_dtype="float32")
        return decoder_from_params(config, load_params(directory))

    return load


def _spec_record(spec: Any) -> dict[str, Any]:
    return json.loads(json.dumps(spec.settings()))


def evaluate_run(
    layout: Any, resources: Any, settings: EvalSettings, names: Sequence[str]
) -> dict[str, Any]:
    """Evaluate the models ``names`` of the run and write eval/; return the results mapping."""
    from merit_jax.eval.runner import RESULTS_FORMAT, evaluate_model

    theta0 = resources.theta0
    spec = build_eval_spec(resources.config, settings, resources.archive)
    branch_spec = spec
    if not settings.branches_multiple_choice and spec.held_out:
        branch_spec = dataclasses.replace(spec, multiple_choice=())
    models_dir = layout.eval_dir / MODELS_DIR
    report: dict[str, Any] = {
        "format": RESULTS_FORMAT,
        "spec": _spec_record(spec),
        "chance": spec.chance(),
        "models": {},
    }
    held_out_data = None
    for name in names:
        model_spec = branch_spec if name.startswith("branch_") else spec
        record = _spec_record(model_spec)
        path = models_dir / f"{name}.json"
        if path.is_file():
            stored = json.loads(path.read_text(encoding="utf-8"))
            if stored.get("spec") == record:
                logger.info("model %s: already evaluated (%s)", name, path)
                report["models"][name] = stored["results"]
                continue
            logger.warning("model %s: %s was written for other eval settings, redoing", name, path)
        if held_out_data is None and spec.held_out:
            from merit_jax.eval.held_out import prepare_held_out

            held_out_data = prepare_held_out(
                theta0.tokenizer,
                spec.held_out,
                seq_len=spec.max_length,
                batch_size=spec.held_out_batch_size,
                system=spec.system,
                truncation=spec.truncation,
            )
        start = time.perf_counter()
        model = model_loader(layout, name, theta0)()
        results = evaluate_model(model, theta0.tokenizer, model_spec, held_out_data=held_out_data)
        del model
        logger.info("model %s: evaluated in %.1f s", name, time.perf_counter() - start)
        text = json.dumps({"spec": record, "results": results}, indent=2, allow_nan=True)
        write_atomic(path, text.encode("utf-8"), overwrite=True)
        report["models"][name] = json.loads(text)["results"]
    json_path = write_eval_files(report, layout.eval_dir)
    return json.loads(json_path.read_text(encoding="utf-8"))


def write_eval_files(report: dict[str, Any], eval_dir: Any) -> Any:
    """Write results.json and results.md; return the path of results.json.

    ``merit_jax.eval.runner.format_markdown`` expects every model to have every
    multiple-choice task. When some models (branches without multiple choice)
    have none, results.md gets the held-out table of every model, then the
    multiple-choice table of the models that have it.
    """
    from merit_jax.eval.runner import format_markdown, write_results

    chance = report.get("chance", {})
    complete = {
        name: result
        for name, result in report["models"].items()
        if set(chance) <= set(result["multiple_choice"])
    }
    if len(complete) == len(report["models"]):
        json_path, _ = write_results(report, eval_dir)
        return json_path
    json_path, markdown_path = write_results({**report, "chance": {}}, eval_dir)
    json_path.write_text(json.dumps(json_ready(report), indent=2, allow_nan=False) + "\n")
    if complete and chance:
        choice_only = {
            "chance": chance,
            "spec": {"held_out": {}, "exact_match": {}},
            "models": complete,
        }
        tables = format_markdown(choice_only).split("\n", 2)[2]  # without the title
        markdown_path.write_text(markdown_path.read_text() + "\n" + tables)
    return json_path
