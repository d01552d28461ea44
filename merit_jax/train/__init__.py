"""Communication-free branch training: meshes, the jitted step, the branch loop, checkpoints.

Step 4 of MERIT: every group of the plan is trained from theta0 on its own
devices, with no collective and no step shared with another group.

Modules:

* ``config``: :class:`TrainConfig`, the validated training settings;
* ``mesh``: disjoint branch submeshes and parameter sharding rules;
* ``step``: the jitted step (micro-batch accumulation, clipping, AdamW);
* ``data``: a branch's batches as a pure function of (seed, step);
* ``isolation``: the proof, from compiled executables, that branches are isolated;
* ``checkpoint``: orbax checkpoints, resume, and the final/ weights layout;
* ``loop``: :func:`train_branches`, round-robin over branches from one thread;
* ``branch``: :func:`train_branch`, one group of a plan (``merit train-branch``).
"""

from merit_jax.train.branch import group_mixture, load_group_tasks, train_branch
from merit_jax.train.checkpoint import (
    BRANCH_INFO_FILE,
    FINAL_DIR,
    branch_dir,
    final_param_shapes,
    read_branch_info,
    read_final_leaf,
)
from merit_jax.train.config import TrainConfig
from merit_jax.train.isolation import check_isolation, parse_replica_groups
from merit_jax.train.loop import BranchResult, BranchSpec, train_branches
from merit_jax.train.mesh import BranchPlacement, carve_submeshes

__all__ = [
    "BRANCH_INFO_FILE",
    "FINAL_DIR",
    "BranchPlacement",
    "BranchResult",
    "BranchSpec",
    "TrainConfig",
    "branch_dir",
    "carve_submeshes",
    "check_isolation",
    "final_param_shapes",
    "group_mixture",
    "load_group_tasks",
    "parse_replica_groups",
    "read_branch_info",
    "read_final_leaf",
    "train_branch",
    "train_branches",
]
