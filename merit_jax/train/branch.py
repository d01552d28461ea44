"""Train one branch of a plan: the function behind ``merit train-branch``.

Branch k needs only plan.json, theta0 and the datasets of group k. The
datasets are loaded from the mixture spec the plan was made from, with the
plan's seed, so the held-out splits and subsamples are the planner's. Only
the specs that produce group k's tasks are loaded. Each task trains on its
budget n_t from the plan, and the branch writes ``<out>/branches/<k>/``
(layout in ``checkpoint.py``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from merit_jax.conflict.artifacts import sha256_path
from merit_jax.conflict.plan import PLAN_FILENAME, Plan, load_plan
from merit_jax.data.bigbench import BigBenchArchive
from merit_jax.data.format import TokenizedTask, tokenize_task
from merit_jax.data.mixture import load_mixture
from merit_jax.data.spec import MixtureSpec
from merit_jax.models.pretrained import Pretrained, load_pretrained
from merit_jax.train.config import TrainConfig
from merit_jax.train.loop import BranchResult, BranchSpec, train_branches

logger = logging.getLogger(__name__)


def group_mixture(mixture: MixtureSpec, task_names: Sequence[str]) -> MixtureSpec:
    """Return the specs of ``mixture`` that produce any of ``task_names``.

    A spec produces the task named by its ``task_name``, or, with
    ``group_by``, tasks named ``<task_name>/<value>``. Raises ValueError
    listing the names no spec produces.
    """
    wanted = set(task_names)
    kept = []
    produced: set[str] = set()
    for spec in mixture.datasets:
        prefix = spec.task_name + "/"
        names = {
            name
            for name in wanted
            if name == spec.task_name or (spec.group_by and name.startswith(prefix))
        }
        if names:
            kept.append(spec)
            produced |= names
    missing = sorted(wanted - produced)
    if missing:
        raise ValueError(
            f"no dataset of the mixture produces the tasks {missing}; pass the mixture the plan "
            "was made from"
        )
    return MixtureSpec(datasets=tuple(kept))


def load_group_tasks(
    plan: Plan,
    group: int,
    mixture: MixtureSpec,
    tokenizer: Any,
    *,
    seq_len: int,
    archive: BigBenchArchive | None = None,
    hf_cache_dir: str | Path | None = None,
) -> list[TokenizedTask]:
    """Load and tokenize the tasks of ``group``, in the plan's task order."""
    entries = plan.group_tasks(group)
    names = [entry.name for entry in entries]
    splits = load_mixture(
        group_mixture(mixture, names), seed=plan.seed, archive=archive, hf_cache_dir=hf_cache_dir
    )
    by_name = {split.train.name: split for split in splits}
    tokenized = []
    for entry in entries:
        task = tokenize_task(tokenizer, by_name[entry.name].train, max_length=seq_len)
        if len(task.examples) != entry.samples:
            logger.warning(
                "task %s: %d examples after tokenizing with max_length=%d, but the plan "
                "counted s_t=%d; the data or the maximum length differs from planning",
                entry.name,
                len(task.examples),
                seq_len,
                entry.samples,
            )
        tokenized.append(task)
    return tokenized


def train_branch(
    plan_path: str | os.PathLike[str],
    branch: int,
    out_dir: str | os.PathLike[str],
    train_config: TrainConfig,
    *,
    model: str | os.PathLike[str] | Pretrained,
    mixture: MixtureSpec | str | os.PathLike[str],
    tokenizer: Any = None,
    archive: BigBenchArchive | None = None,
    hf_cache_dir: str | Path | None = None,
    devices: Sequence[Any] | None = None,
    stop_at_step: int | None = None,
    check_theta0: bool = True,
    progress: bool = True,
) -> BranchResult:
    """Train group ``branch`` of the plan at ``plan_path`` and write ``<out_dir>/branches/<k>/``.

    Args:
        plan_path: plan.json, or the directory that contains it.
        branch: group index k of the plan.
        out_dir: run directory; the branch writes only below branches/<k>/.
        train_config: optimizer, batching, checkpoint and device settings.
        model: theta0 as a reference for ``load_pretrained`` (registry name,
            .gguf file, model directory, hub id) or an already loaded model.
        mixture: the MixtureSpec (or its YAML file) the plan was made from.
        tokenizer: overrides the model's tokenizer, which must have a chat template.
        archive: BIG-bench archive for bigbench datasets (default: the cached one).
        hf_cache_dir: cache directory for Hugging Face datasets.
        devices: devices of the branch's mesh (default: all of ``jax.devices()``).
        stop_at_step: stop after this many steps with a checkpoint; a later call resumes.
        check_theta0: raise when the weights' SHA-256 differs from the plan's theta0.
        progress: show a progress bar.

    Returns the BranchResult. Resumes from the newest checkpoint of the branch
    and skips a branch that is already finished.
    """
    plan_file = Path(plan_path)
    if plan_file.is_dir():
        plan_file = plan_file / PLAN_FILENAME
    plan = load_plan(plan_file)
    if not 0 <= branch < plan.num_groups:
        raise ValueError(
            f"branch={branch} is not a group of {plan_file}; it has groups 0..{plan.num_groups - 1}"
        )
    if not isinstance(mixture, MixtureSpec):
        mixture = MixtureSpec.from_yaml(Path(mixture))

    if isinstance(model, Pretrained):
        pretrained = model
    else:
        pretrained = load_pretrained(
            model,
            param_dtype=train_config.param_dtype,
            compute_dtype=train_config.compute_dtype,
            scan_layers=train_config.scan_layers,
            remat=train_config.remat,
            with_tokenizer=tokenizer is None,
        )
    if check_theta0 and pretrained.weights_sha256 != plan.theta0_sha256:
        raise ValueError(
            f"theta0 mismatch: the weights from {pretrained.source} have SHA-256 "
            f"{pretrained.weights_sha256}, but {plan_file} was planned at theta0 "
            f"{plan.theta0_sha256}. Pass the model the plan was made from (or disable the "
            "theta0 check to train from other weights on purpose)."
        )
    tokenizer = tokenizer if tokenizer is not None else pretrained.tokenizer
    if tokenizer is None:
        raise ValueError("no tokenizer: load the model with its tokenizer or pass tokenizer=")

    tasks = load_group_tasks(
        plan,
        branch,
        mixture,
        tokenizer,
        seq_len=train_config.seq_len,
        archive=archive,
        hf_cache_dir=hf_cache_dir,
    )
    budgets = {entry.name: entry.tokens for entry in plan.group_tasks(branch)}
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    spec = BranchSpec(
        index=branch,
        tasks=tuple(tasks),
        budgets=budgets,
        pad_id=int(pad_id),
        info={
            "theta0_sha256": pretrained.weights_sha256,
            "plan_sha256": sha256_path(plan_file),
            "plan_theta0_sha256": plan.theta0_sha256,
            # NOTE: the data hash is copied from the plan, not recomputed here.
            "plan_data_sha256": plan.data_sha256,
            "plan_seed": plan.seed,
            "merge_weight": plan.groups[branch].weight,
        },
    )
    # This one branch gets every device unless devices_per_branch is set.
    (result,) = train_branches(
        [spec],
        pretrained.model,
        Path(out_dir),
        train_config,
        devices=devices,
        stop_at_step=stop_at_step,
        progress=progress,
    )
    return result
