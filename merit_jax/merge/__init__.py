"""Step 5 of MERIT: merge the branch weights, theta_bar = sum_k w_k theta_k.

    run            ``merge_run``: check a run's branches against its plan, merge
                   them into ``<run>/merged/``, optionally export to Hugging Face
    streaming      ``merge_checkpoints``: leaf-by-leaf merge of orbax checkpoints
    hf             ``merge_hf_dirs``: tensor-by-tensor merge of Hugging Face
                   safetensors directories (no JAX needed)
    operators      merge operators (linear) and weightings (token, uniform, explicit)
    checkpoint     orbax parameter checkpoints: metadata, partial restore, Decoder
    safetensors_io zero-copy safetensors reader and streaming writer
    staging        output directories that appear only when complete

Importing this package imports neither JAX nor orbax; the functions that
need them import them when called.
"""

from merit_jax.merge.checkpoint import decoder_from_params, load_params, save_params
from merit_jax.merge.errors import MergeError
from merit_jax.merge.hf import HFMergeResult, merge_hf_dirs
from merit_jax.merge.operators import (
    MERGE_OPERATORS,
    LinearMerge,
    MergeOperator,
    make_operator,
    register_operator,
    resolve_weights,
)
from merit_jax.merge.run import (
    BRANCH_JSON,
    BRANCHES_DIR,
    MERGED_DIR,
    check_branches,
    merge_run,
    merged_checkpoint_dir,
)
from merit_jax.merge.streaming import CHECKPOINT_DIR, MergeResult, merge_checkpoints

__all__ = [
    "BRANCHES_DIR",
    "BRANCH_JSON",
    "CHECKPOINT_DIR",
    "HFMergeResult",
    "LinearMerge",
    "MERGED_DIR",
    "MERGE_OPERATORS",
    "MergeError",
    "MergeOperator",
    "MergeResult",
    "check_branches",
    "decoder_from_params",
    "load_params",
    "make_operator",
    "merge_checkpoints",
    "merge_hf_dirs",
    "merge_run",
    "merged_checkpoint_dir",
    "register_operator",
    "resolve_weights",
    "save_params",
]
