"""Loading a mixture: specs to training tasks, held-out examples and token budgets.

The order of operations for every task is fixed so that a plan is
reproducible from (mixture, seed): load all examples, hold out ``held_out``
of them at random, keep at most ``max_samples`` of the rest at random
(s_t = the number kept), and, once tokenized, resolve the token budget n_t
from the spec's budget.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from merit_jax.data.bigbench import BigBenchArchive
from merit_jax.data.format import TokenizedTask
from merit_jax.data.sampling import split_held_out, subsample
from merit_jax.data.sources import load_hf_tasks, load_jsonl_tasks
from merit_jax.data.spec import DatasetSpec, MixtureSpec
from merit_jax.data.task import Example, Task

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TaskSplit:
    """A training task, its held-out examples and the spec it came from."""

    train: Task
    held_out: tuple[Example, ...]
    spec: DatasetSpec


def load_spec_tasks(
    spec: DatasetSpec,
    *,
    archive: BigBenchArchive | None = None,
    hf_cache_dir: str | Path | None = None,
) -> list[Task]:
    """Load every example of one spec, as one task (or one per group_by value)."""
    if spec.source == "bigbench":
        assert spec.name is not None
        task = (archive or BigBenchArchive()).load_instruction_task(spec.name)
        if spec.label and spec.label != task.name:
            task = dataclasses.replace(task, name=spec.label)
        return [task]
    if spec.source == "jsonl":
        return load_jsonl_tasks(spec)
    return load_hf_tasks(spec, cache_dir=hf_cache_dir)


def check_mixture(mixture: MixtureSpec, *, archive: BigBenchArchive | None = None) -> None:
    """Check every BIG-bench name of ``mixture`` against the task index, raising once for all.

    Local files are checked for existence. Hub ids are not checked, because
    that needs the network.
    """
    problems = []
    names = [spec.name for spec in mixture.datasets if spec.source == "bigbench" and spec.name]
    if names:
        try:
            (archive or BigBenchArchive()).check_names(names, kind="generative")
        except ValueError as error:
            problems.append(str(error))
    for spec in mixture.datasets:
        if (
            spec.path is not None
            and not any(ch in spec.path for ch in "*?[")
            and not Path(spec.path).exists()
        ):
            problems.append(f"dataset {spec.task_name!r}: path {spec.path} not found")
    if problems:
        raise ValueError("invalid mixture:\n" + "\n".join(problems))


def load_mixture(
    mixture: MixtureSpec,
    *,
    seed: int,
    archive: BigBenchArchive | None = None,
    hf_cache_dir: str | Path | None = None,
) -> list[TaskSplit]:
    """Load, split and subsample every dataset of ``mixture`` (see the module doc).

    Task names must be unique across the mixture, which is checked here
    because group_by can create clashes that the spec cannot see. All
    BIG-bench tasks are read in one pass over the tarball.
    """
    archive = archive or BigBenchArchive()
    check_mixture(mixture, archive=archive)
    bigbench_names = [s.name for s in mixture.datasets if s.source == "bigbench" and s.name]
    if bigbench_names:
        archive.prepare(bigbench_names, kind="generative")

    start = time.perf_counter()
    splits: list[TaskSplit] = []
    for spec in mixture.datasets:
        for task in load_spec_tasks(spec, archive=archive, hf_cache_dir=hf_cache_dir):
            train, held_out = split_held_out(task, spec.held_out, seed=seed)
            train = subsample(train, spec.max_samples, seed=seed)
            splits.append(TaskSplit(train=train, held_out=held_out, spec=spec))

    names = [split.train.name for split in splits]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(
            f"the mixture yields duplicate task names {duplicates}; set a label on the "
            "datasets that produce them"
        )
    logger.info(
        "loaded %d tasks (%d training examples, %d held out) in %.1f s",
        len(splits),
        sum(split.train.s_t or 0 for split in splits),
        sum(len(split.held_out) for split in splits),
        time.perf_counter() - start,
    )
    return splits


def with_token_budgets(
    splits: Sequence[TaskSplit], tokenized: Sequence[TokenizedTask]
) -> list[Task]:
    """Return the training tasks with n_t resolved from each spec's budget.

    ``tokenized[i]`` is the tokenized training task of ``splits[i]``. s_t
    becomes the number of tokenized examples, and an epoch budget counts their
    tokens.
    """
    if len(splits) != len(tokenized):
        raise ValueError(f"{len(splits)} task splits but {len(tokenized)} tokenized tasks")
    tasks = []
    for split, tokens in zip(splits, tokenized, strict=True):
        if split.train.name != tokens.name:
            raise ValueError(
                f"tokenized task {tokens.name!r} does not match task {split.train.name!r}; "
                "pass them in the same order"
            )
        n_t = split.spec.budget.resolve(tokens.total_tokens)
        # s_t counts the examples that training uses, so examples skipped by tokenization
        # (a response longer than max_length) are not counted.
        tasks.append(dataclasses.replace(split.train, s_t=len(tokens.examples), n_t=n_t))
    return tasks
