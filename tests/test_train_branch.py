"""train_branch end to end: plan.json, a JSONL mixture and a tiny HF model directory."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from merit_jax.conflict.plan import PlanSettings, build_plan, save_plan
from merit_jax.data.format import tokenize_task
from merit_jax.data.mixture import load_mixture
from merit_jax.data.spec import MixtureSpec
from merit_jax.data.testing import chatml_byte_tokenizer
from merit_jax.models.decoder import init_decoder
from merit_jax.models.export import export_hf
from merit_jax.models.pretrained import load_pretrained
from merit_jax.train.branch import group_mixture, train_branch
from merit_jax.train.checkpoint import BRANCH_INFO_FILE, FINAL_DIR, final_param_shapes
from merit_jax.train.config import TrainConfig
from merit_jax.train.testing import tiny_model_config

SEQ_LEN = 64
CONFIG = TrainConfig(
    learning_rate=1e-3, batch_size=2, seq_len=SEQ_LEN, checkpoint_every=0, max_steps=3
)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("branch")
    tokenizer = chatml_byte_tokenizer()
    model = init_decoder(tiny_model_config(vocab_size=len(tokenizer)), seed=0)
    model_dir = export_hf(model, tokenizer, root / "theta0")

    specs = []
    for name, op in (("add", "+"), ("sub", "-"), ("mul", "*")):
        records = [
            {"instruction": f"Compute a {op} b.", "input": f"{a} {op} {a + 1}", "response": "ok"}
            for a in range(6)
        ]
        specs.append({"source": "jsonl", "path": str(write_jsonl(root / f"{name}.jsonl", records))})
    mixture = MixtureSpec.from_dict({"datasets": specs, "defaults": {"held_out": 1}})

    splits = load_mixture(mixture, seed=7)
    tokenized = [tokenize_task(tokenizer, s.train, max_length=SEQ_LEN) for s in splits]
    names = [task.name for task in tokenized]
    pretrained = load_pretrained(model_dir, with_tokenizer=False)
    plan = build_plan(
        task_names=names,
        samples=[len(task.examples) for task in tokenized],
        tokens=[300, 200, 250],
        groups=[[0, 2], [1]],
        embedding=None,
        settings=PlanSettings(
            partitioner="merit",
            pca_dim=1,
            sketch_dim=None,
            calibration_size=2,
            trainable_parameter_patterns=(".*",),
            loss_convention="response tokens and end-of-turn token",
        ),
        seed=7,
        theta0_sha256=pretrained.weights_sha256,
        data_sha256="0" * 64,
    )
    plan_path = save_plan(plan, root / "plan" / "plan.json")
    return {
        "root": root,
        "model_dir": model_dir,
        "mixture": mixture,
        "plan": plan,
        "plan_path": plan_path,
        "theta0_sha256": pretrained.weights_sha256,
    }


def test_train_branch_end_to_end(setup, tmp_path):
    result = train_branch(
        setup["plan_path"].parent,
        0,
        tmp_path,
        CONFIG,
        model=setup["model_dir"],
        mixture=setup["mixture"],
        progress=False,
    )
    assert result.finished
    assert result.steps == 3
    assert result.directory == tmp_path / "branches" / "0"
    info = json.loads((result.directory / BRANCH_INFO_FILE).read_text())
    assert info["tasks"] == ["add", "mul"]
    assert info["budgets"] == {"add": 300, "mul": 250}
    assert info["theta0_sha256"] == setup["theta0_sha256"]
    assert info["plan_theta0_sha256"] == setup["theta0_sha256"]
    plan_bytes = setup["plan_path"].read_bytes()
    assert info["plan_sha256"] == hashlib.sha256(plan_bytes).hexdigest()
    assert info["plan_seed"] == 7
    assert info["merge_weight"] == pytest.approx(550 / 750)
    assert ("layers", "mlp", "down_kernel") in final_param_shapes(result.directory / FINAL_DIR)
    assert not (tmp_path / "branches" / "1").exists()


def test_train_branch_rejects_other_theta0(setup, tmp_path):
    other_dir = export_hf(
        init_decoder(tiny_model_config(vocab_size=259), seed=1),
        chatml_byte_tokenizer(),
        tmp_path / "other",
    )
    with pytest.raises(ValueError, match="theta0 mismatch"):
        train_branch(
            setup["plan_path"],
            1,
            tmp_path / "out",
            CONFIG,
            model=other_dir,
            mixture=setup["mixture"],
        )
    assert not (tmp_path / "out").exists()


def test_train_branch_rejects_unknown_group(setup, tmp_path):
    with pytest.raises(ValueError, match=r"branch=2 is not a group .* groups 0\.\.1"):
        train_branch(
            setup["plan_path"],
            2,
            tmp_path,
            CONFIG,
            model=setup["model_dir"],
            mixture=setup["mixture"],
        )


def test_group_mixture_keeps_only_needed_specs(setup):
    mixture = setup["mixture"]
    kept = group_mixture(mixture, ["mul"])
    assert [spec.task_name for spec in kept.datasets] == ["mul"]
    grouped = MixtureSpec.from_dict(
        [
            {"source": "jsonl", "path": "x.jsonl", "group_by": "kind"},
            {"source": "jsonl", "path": "y.jsonl"},
        ]
    )
    assert [s.task_name for s in group_mixture(grouped, ["x/a", "x/b"]).datasets] == ["x"]
    with pytest.raises(ValueError, match=r"produces the tasks \['z'\]"):
        group_mixture(mixture, ["add", "z"])
