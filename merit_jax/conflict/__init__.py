"""Conflict-aware planning: sketches, cosine matrix, PCA, partitioners and the Plan.

Steps 1 to 3 of MERIT and the manifest they produce:

    sketch       count-sketch of a gradient pytree inside jax.jit (imports JAX)
    similarity   normalized sketches and the cosine matrix C, with incremental update
    pca          column-centred PCA of C and the task embedding z
    partition    the MERIT median split and the baseline partitioners
    plan         plan.json: groups, counts, merge weights, settings, hashes
    artifacts    atomic writes, SHA-256 of files and trees, the saved arrays
    theory       predicted merging gain of the local quadratic model

This package imports only numpy; import ``merit_jax.conflict.sketch`` for the
JAX part.
"""

from merit_jax.conflict.artifacts import (
    PlanArrays,
    load_plan_arrays,
    save_plan_arrays,
    sha256_path,
)
from merit_jax.conflict.partition import (
    PARTITIONERS,
    Groups,
    PartitionError,
    get_partitioner,
    partition_tasks,
)
from merit_jax.conflict.pca import PCAResult, conflict_pca
from merit_jax.conflict.plan import (
    Plan,
    PlanError,
    PlanSettings,
    build_plan,
    load_plan,
    save_plan,
)
from merit_jax.conflict.similarity import (
    cosine_matrix,
    extend_cosine_matrix,
    normalize_sketches,
)
from merit_jax.conflict.theory import merged_point, predicted_merging_gain

__all__ = [
    "PARTITIONERS",
    "Groups",
    "PCAResult",
    "PartitionError",
    "Plan",
    "PlanArrays",
    "PlanError",
    "PlanSettings",
    "build_plan",
    "conflict_pca",
    "cosine_matrix",
    "extend_cosine_matrix",
    "get_partitioner",
    "load_plan",
    "load_plan_arrays",
    "merged_point",
    "normalize_sketches",
    "partition_tasks",
    "predicted_merging_gain",
    "save_plan",
    "save_plan_arrays",
    "sha256_path",
]
