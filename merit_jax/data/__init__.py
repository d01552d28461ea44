"""The data step: task units, sources, chat formatting, batching and deterministic sampling.

Modules:

* ``task``: :class:`Task` (instruction examples with s_t and n_t) and the
  multiple-choice evaluation types;
* ``bigbench``, ``sources``: the offline BIG-bench tarball, JSONL files and
  Hugging Face ``datasets``;
* ``spec``, ``mixture``: YAML dataset specs and loading a whole mixture;
* ``format``: chat-template formatting with the response-only loss mask;
* ``batching``: fixed-shape padded or packed [B, T] batches;
* ``sampling``: seeds, held-out splits, calibration subsets and token budgets.
"""

from merit_jax.data.batching import (
    Batch,
    pack_rows,
    packed_batch,
    packed_batches,
    pad_rows,
    padded_batches,
)
from merit_jax.data.bigbench import BigBenchArchive, BigBenchTaskInfo, UnknownTaskError, list_tasks
from merit_jax.data.format import (
    ChatTemplateError,
    TokenizedExample,
    TokenizedTask,
    build_messages,
    tokenize_example,
    tokenize_task,
)
from merit_jax.data.mixture import (
    TaskSplit,
    check_mixture,
    load_mixture,
    load_spec_tasks,
    with_token_budgets,
)
from merit_jax.data.sampling import (
    budget_schedule,
    calibration_indices,
    calibration_subset,
    derive_seed,
    iterate_budget,
    mixture_schedule,
    split_held_out,
    subsample,
    task_rng,
)
from merit_jax.data.sources import load_hf_tasks, load_jsonl_tasks, read_jsonl, records_to_tasks
from merit_jax.data.spec import Budget, DatasetSpec, FieldMapping, MixtureSpec
from merit_jax.data.task import (
    Example,
    MultipleChoiceExample,
    MultipleChoiceTask,
    Task,
    task_fingerprint,
)

__all__ = [
    "Batch",
    "BigBenchArchive",
    "BigBenchTaskInfo",
    "Budget",
    "ChatTemplateError",
    "DatasetSpec",
    "Example",
    "FieldMapping",
    "MixtureSpec",
    "MultipleChoiceExample",
    "MultipleChoiceTask",
    "Task",
    "TaskSplit",
    "TokenizedExample",
    "TokenizedTask",
    "UnknownTaskError",
    "budget_schedule",
    "build_messages",
    "calibration_indices",
    "calibration_subset",
    "check_mixture",
    "derive_seed",
    "iterate_budget",
    "list_tasks",
    "load_hf_tasks",
    "load_jsonl_tasks",
    "load_mixture",
    "load_spec_tasks",
    "mixture_schedule",
    "pack_rows",
    "packed_batch",
    "packed_batches",
    "pad_rows",
    "padded_batches",
    "read_jsonl",
    "records_to_tasks",
    "split_held_out",
    "subsample",
    "task_fingerprint",
    "task_rng",
    "tokenize_example",
    "tokenize_task",
    "with_token_budgets",
]
