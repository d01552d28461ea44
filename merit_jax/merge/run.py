"""The merge step of a MERIT run: check the branches, merge them, optionally export.

Run directory layout read and written here::

    <run>/branches/<k>/final/       orbax parameter checkpoint of branch k
    <run>/branches/<k>/branch.json  {"branch": k, "tokens": ..., "theta0_sha256": ...,
                                     "plan_sha256": ..., ...}
    <run>/merged/final/             the merged parameters, in the same layout
    <run>/merged/merge.json         method, weights, branches, dtype, hashes, time

branch.json's hashes may also be spelled ``theta0_hash`` and ``plan_hash``.
``theta0_sha256`` must equal the plan's ``theta0_sha256`` and ``plan_sha256``
the SHA-256 of the plan.json bytes, so that only branches trained from the
same initialization under the same plan are merged.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from merit_jax.conflict.artifacts import sha256_path
from merit_jax.conflict.plan import Plan, load_plan
from merit_jax.merge.checkpoint import (
    LeafPath,
    LeafSpec,
    checkpoint_leaves,
    decoder_from_params,
    flatten,
    is_orbax_checkpoint,
    leaf_name,
    tree_problems,
)
from merit_jax.merge.errors import MergeError
from merit_jax.merge.operators import make_operator, output_dtype, resolve_weights
from merit_jax.merge.staging import check_output_dir
from merit_jax.merge.streaming import (
    CHECKPOINT_DIR,
    MergeResult,
    write_merge_output,
)

logger = logging.getLogger(__name__)

BRANCHES_DIR = "branches"
BRANCH_JSON = "branch.json"
MERGED_DIR = "merged"

# Warn when a branch's trained token count differs from its budget N_k by more
# than this fraction (packing and the last batch make small differences normal).
TOKEN_WARNING_FRACTION = 0.01

# branch.json keys: each entry lists the accepted spellings of one field.
_BRANCH_KEYS = {
    "branch": ("branch",),
    "tokens": ("tokens",),
    "theta0": ("theta0_sha256", "theta0_hash"),
    "plan": ("plan_sha256", "plan_hash"),
}


def merged_checkpoint_dir(run_dir: str | os.PathLike[str]) -> Path:
    """Return ``<run>/merged/final``, where ``merge_run`` writes the merged parameters."""
    return Path(run_dir) / MERGED_DIR / CHECKPOINT_DIR


# --------------------------------------------------------------------------- run checks


def find_run_dir(plan_path: Path) -> Path:
    """Return the run directory of a plan: the first of its directory and that one's parent
    that contains ``branches/``."""
    for candidate in (plan_path.parent, plan_path.parent.parent):
        if (candidate / BRANCHES_DIR).is_dir():
            return candidate
    raise FileNotFoundError(
        f"no {BRANCHES_DIR}/ directory in {plan_path.parent} or {plan_path.parent.parent}: "
        "pass the run directory (--run DIR) that contains the trained branches"
    )


def _branch_field(info: Mapping[str, Any], field: str) -> tuple[str | None, Any]:
    for key in _BRANCH_KEYS[field]:
        if key in info:
            return key, info[key]
    return None, None


def _branch_json_problems(
    path: Path, k: int, plan: Plan, plan_sha256: str
) -> tuple[list[str], Mapping[str, Any]]:
    where = f"branch {k} ({path})"
    if not path.is_file():
        return [f"{where}: not found; the branch is unfinished or was never trained"], {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return [f"{where}: not valid JSON ({error})"], {}
    if not isinstance(info, dict):
        return [f"{where}: not a JSON object"], {}

    problems = []
    values = {}
    for field, spellings in _BRANCH_KEYS.items():
        key, value = _branch_field(info, field)
        if key is None:
            problems.append(f"{where}: missing key {' or '.join(spellings)}")
        values[field] = value
    if values["branch"] is not None and values["branch"] != k:
        problems.append(
            f"{where}: records branch {values['branch']!r}, but it lies in {BRANCHES_DIR}/{k}"
        )
    if values["theta0"] is not None and values["theta0"] != plan.theta0_sha256:
        problems.append(
            f"{where}: trained from theta0 {values['theta0']!r}, but the plan was made at "
            f"theta0 {plan.theta0_sha256!r}; branches from different initializations do not merge"
        )
    if values["plan"] is not None and values["plan"] != plan_sha256:
        problems.append(
            f"{where}: trained under plan {values['plan']!r}, but this plan.json has SHA-256 "
            f"{plan_sha256!r}; merge with the plan the branches were trained from"
        )
    tokens = values["tokens"]
    if tokens is not None and (not isinstance(tokens, int) or isinstance(tokens, bool)):
        problems.append(f"{where}: tokens = {tokens!r} is not an integer")
    return problems, info


def check_branches(
    run_dir: Path, plan: Plan, plan_sha256: str
) -> tuple[list[Path], dict[LeafPath, LeafSpec], list[dict[str, Any]]]:
    """Check every branch of the plan and return its checkpoints, the leaf specs and records.

    Raises one MergeError that lists every missing branch, bad branch.json,
    theta0 or plan hash mismatch, and leaf difference between branches.
    """
    problems: list[str] = []
    checkpoints: list[Path] = []
    trees: list[dict[LeafPath, LeafSpec]] = []
    names: list[str] = []
    records: list[dict[str, Any]] = []
    for k in range(plan.num_groups):
        branch_dir = run_dir / BRANCHES_DIR / str(k)
        checkpoint = branch_dir / CHECKPOINT_DIR
        checkpoints.append(checkpoint)
        json_problems, info = _branch_json_problems(branch_dir / BRANCH_JSON, k, plan, plan_sha256)
        problems += json_problems
        if not is_orbax_checkpoint(checkpoint):
            problems.append(f"branch {k}: {checkpoint} is not an orbax checkpoint or is missing")
        else:
            try:
                trees.append(checkpoint_leaves(checkpoint))
                names.append(f"branch {k}")
            except (OSError, ValueError) as error:
                problems.append(f"branch {k}: cannot read the metadata of {checkpoint}: {error}")
        planned = plan.groups[k].tokens
        trained = info.get("tokens")
        if isinstance(trained, int) and abs(trained - planned) > TOKEN_WARNING_FRACTION * planned:
            logger.warning(
                "branch %d trained on %d tokens, but its plan budget N_k is %d; the token "
                "weights use the plan's N_k",
                k,
                trained,
                planned,
            )
        records.append(
            {"branch": k, "checkpoint": str(checkpoint), "tokens": trained, "plan_tokens": planned}
        )
    if trees:
        problems += tree_problems(trees, names)

    planned_names = {str(k) for k in range(plan.num_groups)}
    branches_dir = run_dir / BRANCHES_DIR
    extra = []
    if branches_dir.is_dir():
        extra = sorted(p.name for p in branches_dir.iterdir() if p.is_dir())
        extra = [name for name in extra if name not in planned_names]
    if extra:
        logger.warning(
            "ignoring %s in %s: the plan has branches 0..%d only",
            extra,
            branches_dir,
            plan.num_groups - 1,
        )
    if problems:
        raise MergeError(f"the branches of {run_dir} cannot be merged", problems)
    return checkpoints, trees[0], records


# --------------------------------------------------------------------------- export


def load_reference(theta0: Any) -> tuple[Any, Any, str | None]:
    """Return (ModelConfig, tokenizer, weights SHA-256 or None) of the theta0 reference.

    ``theta0`` is a ``Pretrained`` or any reference ``load_pretrained`` accepts.
    A Hugging Face directory is read without its weights, so it gives no hash.
    A GGUF file or hub id is loaded whole, because its config depends on its tensors.
    """
    from merit_jax import assets
    from merit_jax.models.config import ModelConfig
    from merit_jax.models.pretrained import Pretrained, load_pretrained
    from merit_jax.models.tokenizer import load_tokenizer

    if isinstance(theta0, Pretrained):
        return theta0.config, theta0.tokenizer, theta0.weights_sha256
    location = assets.resolve_model(theta0)
    if isinstance(location, Path) and location.is_dir() and (location / "config.json").is_file():
        return ModelConfig.from_json(location / "config.json"), load_tokenizer(location), None
    pretrained = load_pretrained(theta0, with_tokenizer=True)
    return pretrained.config, pretrained.tokenizer, pretrained.weights_sha256


def _config_problems(config: Any, specs: Mapping[LeafPath, LeafSpec]) -> list[str]:
    """List differences between the parameters a config implies and the branch leaves."""
    from flax import nnx

    from merit_jax.models.decoder import abstract_decoder

    expected = {
        tuple(str(part) for part in path): tuple(variable.get_value().shape)
        for path, variable in nnx.to_flat_state(nnx.state(abstract_decoder(config), nnx.Param))
    }
    problems = []
    for leaf in sorted(expected.keys() - specs.keys()):
        problems.append(f"theta0 config: parameter {leaf_name(leaf)} is not in the branches")
    for leaf in sorted(specs.keys() - expected.keys()):
        problems.append(f"theta0 config: branch leaf {leaf_name(leaf)} is not a model parameter")
    for leaf in sorted(expected.keys() & specs.keys()):
        if expected[leaf] != specs[leaf][1]:
            problems.append(
                f"theta0 config: parameter {leaf_name(leaf)} has shape {list(expected[leaf])}, "
                f"the branches have {list(specs[leaf][1])}"
            )
    return problems


def _export_dtype(dtype_label: str) -> str:
    return dtype_label if dtype_label in ("float32", "bfloat16", "float16") else "float32"


# --------------------------------------------------------------------------- merge_run


def merge_run(
    plan: str | os.PathLike[str],
    *,
    run_dir: str | os.PathLike[str] | None = None,
    weights: str | Sequence[float] = "token",
    dtype: str | None = None,
    method: str = "linear",
    out_dir: str | os.PathLike[str] | None = None,
    export_hf: str | os.PathLike[str] | None = None,
    theta0: Any = None,
    overwrite: bool = False,
) -> MergeResult:
    """Merge the branches of a MERIT run: theta_bar = sum_k w_k theta_k.

    Args:
        plan: plan.json (or the directory that contains it).
        run_dir: the run directory with ``branches/<k>/``; default: the plan's
            directory or its parent, whichever contains ``branches/``.
        weights: ``"token"`` (w_k = N_k / sum_j N_j from the plan), ``"uniform"``
            (1/K) or one number per branch, summing to 1.
        dtype: float32, bfloat16 or float16 for the merged parameters; None keeps
            the branches' dtype. Sums are accumulated in float32 either way.
        method: registered merge operator (``operators.MERGE_OPERATORS``).
        out_dir: output directory; default ``<run>/merged``.
        export_hf: also write a Hugging Face model directory here.
        theta0: the initialization (a ``Pretrained``, a registry name, a .gguf
            file or a model directory); required with ``export_hf``, for its
            ModelConfig and tokenizer.
        overwrite: replace existing outputs instead of raising FileExistsError.

    Raises MergeError listing every problem found in the branches at once.
    """
    start = time.perf_counter()
    plan_path = Path(plan).expanduser().absolute()
    if plan_path.is_dir():
        plan_path = plan_path / "plan.json"
    loaded_plan = load_plan(plan_path)
    plan_sha256 = sha256_path(plan_path)
    run_path = (
        Path(run_dir).expanduser().absolute() if run_dir is not None else find_run_dir(plan_path)
    )
    out_path = Path(out_dir).absolute() if out_dir is not None else run_path / MERGED_DIR
    export_path = Path(export_hf).expanduser().absolute() if export_hf is not None else None

    # Every cheap check runs before the merge, so a bad option fails in seconds.
    check_output_dir(out_path, overwrite=overwrite)
    if export_path is not None:
        check_output_dir(export_path, overwrite=overwrite, description="export directory")
        if theta0 is None:
            raise ValueError(
                "export_hf needs theta0 (the model the branches were trained from) for the "
                "model config and tokenizer: pass theta0 (--theta0)"
            )
    output_dtype(dtype)
    merge_weights, weighting = resolve_weights(
        weights, num_models=loaded_plan.num_groups, plan=loaded_plan
    )
    operator = make_operator(method, weights=merge_weights)
    checkpoints, specs, records = check_branches(run_path, loaded_plan, plan_sha256)

    reference = None
    if export_path is not None:
        config, tokenizer, theta0_sha256 = load_reference(theta0)
        problems = _config_problems(config, specs)
        if problems:
            raise MergeError(f"theta0 {theta0} does not match the branches", problems)
        if theta0_sha256 is not None and theta0_sha256 != loaded_plan.theta0_sha256:
            logger.warning(
                "theta0 %s has weights SHA-256 %s, the plan's theta0 is %s; the export takes "
                "only its config and tokenizer",
                theta0,
                theta0_sha256,
                loaded_plan.theta0_sha256,
            )
        reference = (config, tokenizer)

    logger.info(
        "merging %d branches of %s (%s weights %s) into %s",
        len(checkpoints),
        run_path,
        weighting,
        [round(float(w), 6) for w in merge_weights],
        out_path,
    )
    record = {
        "weighting": weighting,
        "branches": records,
        "plan": str(plan_path),
        "plan_sha256": plan_sha256,
        "theta0_sha256": loaded_plan.theta0_sha256,
    }
    params, dtype_label = write_merge_output(
        out_path,
        checkpoints,
        specs,
        operator,
        dtype=dtype,
        record=record,
        overwrite=overwrite,
        start=start,
    )
    num_parameters = sum(int(a.size) for a in flatten(params).values())
    logger.info(
        "merged %.1fM parameters (%s) into %s in %.1f s",
        num_parameters / 1e6,
        dtype_label,
        out_path,
        time.perf_counter() - start,
    )

    if export_path is not None and reference is not None:
        from merit_jax.models.export import export_hf as write_hf

        config, tokenizer = reference
        export_dtype = _export_dtype(dtype_label)
        model = decoder_from_params(config.replace(param_dtype=export_dtype), params)
        del params
        write_hf(model, tokenizer, export_path, dtype=export_dtype, overwrite=overwrite)

    return MergeResult(
        out_dir=out_path,
        checkpoint_dir=out_path / CHECKPOINT_DIR,
        weights=tuple(float(w) for w in merge_weights),
        weighting=weighting,
        dtype=dtype_label,
        num_parameters=num_parameters,
        seconds=time.perf_counter() - start,
        hf_dir=export_path,
    )
