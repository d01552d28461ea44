"""merit run end to end on a tiny random model and a fake BIG-bench tarball."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from flax import nnx

from merit_jax.conflict.gradients import state_sha256
from merit_jax.conflict.plan import load_plan
from merit_jax.data.bigbench import BigBenchArchive
from merit_jax.data.testing import chatml_byte_tokenizer, write_bigbench_tarball
from merit_jax.models.decoder import init_decoder
from merit_jax.models.pretrained import Pretrained
from merit_jax.report.run import evaluate_run_dir, joint_plan, run_pipeline
from merit_jax.report.rundir import RunLayout, config_yaml, load_run_config, train_config_of
from merit_jax.runconfig import ConfigError, config_from_dict
from merit_jax.train.testing import tiny_model_config

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "rock", "fish"]


def generative_task(name: str, offset: int) -> dict:
    examples = [
        {"input": f"{WORDS[i % 10]} {i + offset}", "target": WORDS[(i + offset) % 10]}
        for i in range(12)
    ]
    return {"name": name, "description": f"Answer task {name}.", "examples": examples}


def choice_task(name: str) -> dict:
    examples = [
        {"input": f"Is {WORDS[i]} a word?", "target_scores": {"yes": 1, "no": 0}} for i in range(6)
    ]
    return {"name": name, "description": "Pick.", "examples": examples}


TRAIN_TASKS = ["alpha", "beta", "gamma", "delta"]


def run_config_dict(out_dir: Path, **train_overrides) -> dict:
    return {
        "seed": 3,
        "output_dir": str(out_dir),
        "model": {"ref": "unused-in-tests"},
        "data": {
            "max_length": 64,
            "mixture": {
                "defaults": {"budget": {"tokens": 120}, "max_samples": 8, "held_out": 2},
                "datasets": [f"bigbench:{name}" for name in TRAIN_TASKS],
            },
            "eval_tasks": ["choice"],
        },
        "plan": {
            "calibration_size": 2,
            "sketch_dim": None,
            "pca_dim": 1,
            "micro_batch_size": 1,
            "seq_len": 64,
        },
        "train": {
            "learning_rate": 1e-3,
            "batch_size": 2,
            "checkpoint_every": 0,
            **train_overrides,
        },
        "merge": {"weights": "token"},
        "eval": {"num_examples": 4, "held_out_examples": 2},
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    tasks = {name: generative_task(name, index) for index, name in enumerate(TRAIN_TASKS)}
    tasks["choice"] = choice_task("choice")
    tarball = write_bigbench_tarball(root / "bigbench-1.0.0.tar.gz", tasks)
    archive = BigBenchArchive(tarball=tarball, cache_root=root / "cache")
    tokenizer = chatml_byte_tokenizer()
    config = tiny_model_config(vocab_size=len(tokenizer))
    model = init_decoder(config, seed=0)
    theta0 = Pretrained(
        model=model,
        config=config,
        tokenizer=tokenizer,
        source=root,
        weight_files=[],
        weights_sha256=state_sha256(nnx.state(model)),
    )
    return {"root": root, "archive": archive, "theta0": theta0}


def run(world, out: Path, **kwargs):
    config = config_from_dict(run_config_dict(out, **kwargs.pop("train", {})), where="test config")
    return run_pipeline(
        config,
        progress=False,
        theta0=world["theta0"],
        archive=world["archive"],
        **kwargs,
    )


@pytest.fixture(scope="module")
def finished(world):
    out = world["root"] / "finished"
    outcome = run(world, out)
    return out, outcome


def test_run_writes_every_stage(finished):
    out, outcome = finished
    layout = RunLayout(out.absolute())
    plan = load_plan(layout.plan_file)
    assert plan.num_groups == 2
    for k in range(2):
        assert (layout.branch_dir(k) / "branch.json").is_file()
    assert (layout.merged_dir / "merge.json").is_file()
    assert (layout.joint_dir / "branches" / "0" / "branch.json").is_file()
    assert (layout.eval_dir / "results.json").is_file()
    assert outcome.report.is_file()
    assert outcome.results.is_file()
    assert (layout.root / "figures" / "loss_curves.png").is_file()


def test_results_contain_every_model(finished):
    _, outcome = finished
    results = json.loads(outcome.results.read_text())
    models = results["eval"]["models"]
    assert list(models) == ["theta0", "branch_0", "branch_1", "merged", "joint"]
    for name in ("merged", "joint", "theta0"):
        assert models[name]["held_out_pooled_loss"] > 0
        assert set(models[name]["held_out"]) == set(TRAIN_TASKS)
        assert models[name]["mc_mean"]["acc"] >= 0
    assert results["eval"]["chance"] == {"choice": 0.5}
    assert set(results["training"]) == {"branch_0", "branch_1", "joint"}
    report = outcome.report.read_text()
    header = "| task | group | theta0 | branch_0 | branch_1 | merged | joint | own branch |"
    assert header in report
    assert "| task | n | chance | theta0 | branch_0 | branch_1 | merged | joint |" in report


def test_joint_trains_the_total_budget(finished):
    out, _ = finished
    layout = RunLayout(out.absolute())
    plan = load_plan(layout.plan_file)
    joint = load_plan(layout.joint_plan_file)
    assert joint.num_groups == 1
    assert joint.settings.partitioner == "joint"
    assert joint.groups[0].tokens == sum(group.tokens for group in plan.groups)
    assert joint.theta0_sha256 == plan.theta0_sha256
    assert joint == joint_plan(plan)
    trained = json.loads((layout.joint_dir / "branches" / "0" / "branch.json").read_text())
    assert trained["budgets"] == {task.name: task.tokens for task in plan.tasks}


def test_stage_times_recorded(finished):
    out, outcome = finished
    state = json.loads((out / "run.json").read_text())
    assert list(state["stages"]) == ["plan", "branches", "merge", "joint", "eval", "report"]
    assert all(value["seconds"] > 0 for value in state["stages"].values())
    assert "total" in outcome.stage_table


def test_finished_run_rejected(world, finished):
    out, _ = finished
    with pytest.raises(FileExistsError, match="--overwrite"):
        run(world, out)


def test_config_copy_loads(finished):
    out, _ = finished
    layout = RunLayout(out.absolute())
    config = load_run_config(layout.plan_file)
    assert config.data.eval_tasks == ("choice",)
    assert train_config_of(config).learning_rate == 1e-3
    assert train_config_of(config).seq_len == 64


def test_resume_skips_finished_stages(world):
    out = world["root"] / "resumed"
    assert run(world, out, stop_after="merge") is None
    layout = RunLayout(out.absolute())
    plan_bytes = layout.plan_file.read_bytes()
    branch_info = (layout.branch_dir(0) / "branch.json").read_bytes()
    merge_json = (layout.merged_dir / "merge.json").read_bytes()
    assert not layout.joint_dir.exists()

    outcome = run(world, out)
    state = json.loads((out / "run.json").read_text())["stages"]
    assert [state[name]["status"] for name in ("plan", "branches", "merge")] == ["earlier"] * 3
    assert [state[name]["status"] for name in ("joint", "eval", "report")] == ["ran"] * 3
    assert layout.plan_file.read_bytes() == plan_bytes
    assert (layout.branch_dir(0) / "branch.json").read_bytes() == branch_info
    assert (layout.merged_dir / "merge.json").read_bytes() == merge_json
    assert outcome is not None and outcome.report.is_file()


def test_resume_with_other_config_rejected(world):
    out = world["root"] / "changed"
    run(world, out, stop_after="plan")
    with pytest.raises(ConfigError, match=r"train\.learning_rate: 0\.001 -> 0\.01"):
        run(world, out, train={"learning_rate": 1e-2})


def test_overwrite_restarts(world):
    out = world["root"] / "overwritten"
    run(world, out, stop_after="plan")
    marker = out / "branches" / "stale"
    marker.mkdir(parents=True)
    run(world, out, stop_after="plan", overwrite=True)
    assert not marker.exists()
    assert (out / "plan" / "plan.json").is_file()


def test_foreign_directory_rejected(world, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="contains no run"):
        run(world, tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_unknown_stop_stage_rejected(world, tmp_path):
    with pytest.raises(ValueError, match="not a stage"):
        run(world, tmp_path / "x", stop_after="training")


def test_eval_command_reuses_and_limits(world, finished, tmp_path):
    out, _ = finished
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    theta0_record = (copy / "eval" / "models" / "theta0.json").read_bytes()
    config = load_run_config(copy / "plan" / "plan.json")
    changed = dataclasses.replace(config, eval={**config.eval, "branches_multiple_choice": False})
    config_path = copy / "changed.yaml"
    config_path.write_text(config_yaml(changed))

    summary = evaluate_run_dir(
        copy,
        models=["theta0", "branch_1"],
        config_path=config_path,
        theta0=world["theta0"],
        archive=world["archive"],
    )
    assert "branch_1" in summary
    results = json.loads((copy / "eval" / "results.json").read_text())
    assert list(results["models"]) == ["theta0", "branch_1"]
    assert results["models"]["branch_1"]["multiple_choice"] == {}
    assert set(results["models"]["branch_1"]["held_out"]) == set(TRAIN_TASKS)
    # theta0 was evaluated under the same settings before, so its record is reused.
    assert (copy / "eval" / "models" / "theta0.json").read_bytes() == theta0_record


def test_eval_rejects_unknown_model(world, finished):
    out, _ = finished
    with pytest.raises(ConfigError, match="branch_2"):
        evaluate_run_dir(out, models=["branch_2"])


def test_run_resumes_a_plan_directory(world, finished, tmp_path):
    out, _ = finished
    plan_only = tmp_path / "plan_only"
    shutil.copytree(out / "plan", plan_only / "plan")
    (plan_only / "plan" / "config.yaml").unlink()
    plan_bytes = (plan_only / "plan" / "plan.json").read_bytes()
    run(world, plan_only, stop_after="plan")
    assert (plan_only / "plan" / "plan.json").read_bytes() == plan_bytes
    stages = json.loads((plan_only / "run.json").read_text())["stages"]
    assert stages["plan"]["status"] == "earlier"


def test_plan_of_other_settings_rejected(world, finished, tmp_path):
    out, _ = finished
    other = tmp_path / "other"
    shutil.copytree(out / "plan", other / "plan")
    (other / "plan" / "config.yaml").unlink()
    config = config_from_dict(run_config_dict(other), where="test config")
    config = dataclasses.replace(config, plan=dataclasses.replace(config.plan, calibration_size=3))
    with pytest.raises(ConfigError, match="other plan settings"):
        run_pipeline(config, progress=False, theta0=world["theta0"], archive=world["archive"])
