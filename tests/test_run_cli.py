"""The pipeline subcommands on a tiny Hugging Face model directory and JSONL datasets.

`merit plan`, `train-branch`, `merge` and `eval` run one after another as on
separate machines, then `merit run` on the same directory resumes: it skips
what the single steps made and adds the joint baseline and the report.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from merit_jax import cli
from merit_jax.conflict.plan import PlanSettings, build_plan, save_plan
from merit_jax.data.testing import chatml_byte_tokenizer
from merit_jax.models.decoder import init_decoder
from merit_jax.models.export import export_hf
from merit_jax.train.testing import tiny_model_config


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tokenizer = chatml_byte_tokenizer()
    model = init_decoder(tiny_model_config(vocab_size=len(tokenizer)), seed=0)
    model_dir = export_hf(model, tokenizer, root / "theta0")
    datasets = []
    for name, op in (("add", "+"), ("sub", "-"), ("mul", "*"), ("div", "/")):
        records = [
            {"instruction": f"Compute a {op} b.", "input": f"{a} {op} {a + 2}", "response": "ok"}
            for a in range(8)
        ]
        datasets.append({"source": "jsonl", "path": write_jsonl(root / f"{name}.jsonl", records)})
    config = {
        "seed": 1,
        "output_dir": str(root / "run"),
        "model": {"ref": str(model_dir)},
        "data": {
            "max_length": 48,
            "mixture": {
                "defaults": {"budget": {"tokens": 100}, "held_out": 2},
                "datasets": datasets,
            },
        },
        "plan": {"calibration_size": 2, "sketch_dim": None, "pca_dim": 1, "seq_len": 48},
        "train": {"learning_rate": 1e-3, "batch_size": 2, "checkpoint_every": 0},
        "eval": {"held_out_examples": 2},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def merit(*args: str) -> int:
    return cli.main([*args])


def test_steps_then_run(config_file, capsys):
    run = config_file.parent / "run"
    plan = run / "plan" / "plan.json"
    assert merit("plan", str(config_file), "--no-progress") == 0
    assert (run / "plan" / "config.yaml").is_file()

    for branch in ("0", "1"):
        assert merit("train-branch", "--plan", str(plan), "--branch", branch, "--no-progress") == 0
        assert (run / "branches" / branch / "branch.json").is_file()
    assert "finished at step" in capsys.readouterr().out

    assert merit("merge", "--plan", str(plan)) == 0
    assert "token weights" in capsys.readouterr().out
    assert (run / "merged" / "merge.json").is_file()

    assert merit("eval", "--run", str(run), "--models", "theta0,merged,branch_1") == 0
    printed = capsys.readouterr().out
    assert "branch_1" in printed
    results = json.loads((run / "eval" / "results.json").read_text())
    assert list(results["models"]) == ["theta0", "merged", "branch_1"]

    assert merit("run", str(config_file), "--no-progress") == 0
    printed = capsys.readouterr().out
    assert "report:" in printed
    stages = json.loads((run / "run.json").read_text())["stages"]
    assert stages["plan"]["status"] == "earlier"
    assert stages["branches"]["status"] == "earlier"
    assert stages["merge"]["status"] == "earlier"
    assert stages["joint"]["status"] == "ran"
    results = json.loads((run / "results.json").read_text())
    models = results["eval"]["models"]
    assert list(models) == ["theta0", "branch_0", "branch_1", "merged", "joint"]
    assert results["eval"]["own_branch"]["held_out_pooled_loss"] > 0


def test_run_dry_run_loads_nothing(config_file, tmp_path, capsys):
    out = tmp_path / "dry"
    assert merit("run", str(config_file), "--out", str(out), "--dry-run") == 0
    printed = capsys.readouterr().out
    assert "joint baseline: every task in one group" in printed
    assert "learning_rate=0.001" in printed
    assert not out.exists()


def test_run_invalid_train_section(config_file, tmp_path, capsys):
    out = tmp_path / "bad"
    code = merit("run", str(config_file), "--out", str(out), "--set", "train.lr=0.1")
    assert code == 1
    assert "unknown key(s) ['lr']" in capsys.readouterr().err
    assert not out.exists()


def test_train_branch_without_plan(tmp_path, capsys):
    code = merit("train-branch", "--plan", str(tmp_path / "plan.json"), "--branch", "0")
    assert code == 1
    assert "not found" in capsys.readouterr().err


def test_train_branch_without_config(tmp_path, capsys):
    plan = build_plan(
        task_names=["a", "b"],
        samples=[4, 4],
        tokens=[10, 10],
        groups=((0,), (1,)),
        embedding=None,
        settings=PlanSettings(
            partitioner="merit",
            pca_dim=1,
            sketch_dim=None,
            calibration_size=2,
            trainable_parameter_patterns=(".*",),
            loss_convention="response tokens",
        ),
        seed=0,
        theta0_sha256="1" * 64,
        data_sha256="2" * 64,
    )
    save_plan(plan, tmp_path / "plan" / "plan.json")
    code = merit("train-branch", "--plan", str(tmp_path / "plan"), "--branch", "0")
    assert code == 1
    assert "--config CONFIG" in capsys.readouterr().err


def test_merge_weights_argument(capsys):
    with pytest.raises(SystemExit):
        merit("merge", "--plan", "plan.json", "--weights", "tokens")
    assert "'token', 'uniform' or comma-separated numbers" in capsys.readouterr().err
