"""Step 5 of MERIT: merge the branch weights, theta_bar = sum_k w_k theta_k.

    hf             ``merge_hf_dirs``: tensor-by-tensor merge of Hugging Face
                   safetensors directories (no JAX needed)
    operators      merge operators (linear) and weightings (token, uniform, explicit)
    safetensors_io zero-copy safetensors reader and streaming writer
    staging        output directories that appear only when complete
"""

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

__all__ = [
    "HFMergeResult",
    "LinearMerge",
    "MERGE_OPERATORS",
    "MergeError",
    "MergeOperator",
    "make_operator",
    "merge_hf_dirs",
    "register_operator",
    "resolve_weights",
]
