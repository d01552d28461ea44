"""The run report: results.json contents, plain statements, markdown, curves and settings."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from merit_jax.conflict.plan import PlanSettings, build_plan
from merit_jax.report.curves import moving_average, plot_loss_curves, read_metrics
from merit_jax.report.report import build_results, format_report, summarize, write_report
from merit_jax.report.settings import EvalSettings, MergeSettings, train_config_from_section
from merit_jax.runconfig import ModelSettings

TASKS = ["a", "b", "c"]


def make_plan():
    return build_plan(
        task_names=TASKS,
        samples=[10, 20, 30],
        tokens=[100, 200, 300],
        groups=[[0, 2], [1]],
        embedding=[[0.5], [-0.5], [0.1]],
        settings=PlanSettings(
            partitioner="merit",
            pca_dim=1,
            sketch_dim=None,
            calibration_size=4,
            trainable_parameter_patterns=(".*",),
            loss_convention="response tokens",
        ),
        seed=0,
        theta0_sha256="1" * 64,
        data_sha256="2" * 64,
    )


def model_result(losses, accs, stderr=0.1):
    return {
        "held_out": {
            task: {"loss": loss, "num_targets": targets}
            for task, loss, targets in zip(TASKS, losses, [10, 30, 60], strict=True)
        },
        "held_out_pooled_loss": sum(loss * t for loss, t in zip(losses, [10, 30, 60], strict=True))
        / 100,
        "multiple_choice": {
            task: {
                "acc": acc,
                "acc_stderr": stderr,
                "acc_norm": acc,
                "acc_norm_stderr": stderr,
                "chance": 0.5,
                "n": 20,
            }
            for task, acc in zip(["mc1", "mc2"], accs, strict=True)
        },
        "seconds": 1.0,
    }


def eval_report():
    return {
        "format": 1,
        "chance": {"mc1": 0.5, "mc2": 0.25},
        "models": {
            "theta0": model_result([2.0, 2.0, 2.0], [0.5, 0.25]),
            "branch_0": model_result([1.0, 3.0, 1.2], [0.55, 0.3]),
            "branch_1": model_result([3.0, 1.5, 3.0], [0.5, 0.3]),
            "merged": model_result([1.4, 1.8, 1.65], [0.6, 0.35]),
            "joint": model_result([1.5, 1.6, 1.6], [0.55, 0.3]),
        },
    }


@pytest.fixture
def results():
    return build_results(
        plan=make_plan(),
        eval_report=eval_report(),
        training={
            "branch_0": {"steps": 3, "tokens": 410, "final_loss": 1.25, "wall_time_s": 2.0},
            "branch_1": {"steps": 2, "tokens": 205, "final_loss": 1.5, "wall_time_s": 1.0},
            "joint": {"steps": 5, "tokens": 615, "final_loss": 1.4, "wall_time_s": 3.0},
        },
        merge={"method": "linear", "weights": [2 / 3, 1 / 3], "weighting": "token"},
        stages={
            "plan": {"seconds": 3.0, "status": "ran"},
            "eval": {"seconds": 1.0, "status": "ran"},
        },
        files={"loss_curves": "figures/loss_curves.png"},
    )


def test_results_plan_groups(results):
    groups = results["plan"]["groups"]
    assert [g["tasks"] for g in groups] == [["a", "c"], ["b"]]
    assert [g["tokens"] for g in groups] == [400, 200]
    assert groups[0]["weight"] == pytest.approx(2 / 3)
    assert results["time"]["total_seconds"] == 4.0


def test_own_branch_losses(results):
    own = results["eval"]["own_branch"]
    # a and c are group 0's tasks, b is group 1's.
    assert own["held_out"] == {"a": 1.0, "b": 1.5, "c": 1.2}
    assert own["held_out_pooled_loss"] == pytest.approx((1.0 * 10 + 1.5 * 30 + 1.2 * 60) / 100)


def test_mc_mean_and_stderr(results):
    mean = results["eval"]["models"]["merged"]["mc_mean"]
    assert mean["acc"] == pytest.approx(0.475)
    # The stderr of a mean of two independent estimates: sqrt(0.1^2 + 0.1^2) / 2.
    assert mean["acc_stderr"] == pytest.approx(math.sqrt(0.02) / 2)
    assert results["eval"]["mc_mean_chance"] == pytest.approx(0.375)


def test_statements_compare_merged_and_joint(results):
    text = "\n".join(results["summary"])
    merged = (1.4 * 10 + 1.8 * 30 + 1.65 * 60) / 100
    joint = (1.5 * 10 + 1.6 * 30 + 1.6 * 60) / 100
    assert merged > joint
    assert f"higher than the joint baseline's by {merged - joint:.4f}" in text
    assert "lower held-out loss on 1 of 3 tasks and the joint baseline on 2." in text
    kept = 100 * (2.0 - merged) / (2.0 - joint)
    assert f"keeps {kept:.0f}% of the joint baseline's improvement" in text
    assert "merging cost" in text
    assert "The lowest is joint." in text


def test_statements_mc_noise(results):
    text = "\n".join(results["summary"])
    # merged - theta0 = 0.1, and 2 standard errors of the difference are 2 * 0.1 = 0.2.
    assert "merged minus theta0: +0.100 (within noise" in text
    assert "chance is 0.375" in text


def test_statement_when_training_did_not_help():
    report = eval_report()
    report["models"]["joint"] = model_result([2.5, 2.5, 2.5], [0.5, 0.25])
    results = build_results(
        plan=make_plan(), eval_report=report, training={}, merge=None, stages={}
    )
    assert any("did not lower the pooled held-out loss" in s for s in results["summary"])


def test_statement_counts_ties():
    report = eval_report()
    report["models"]["merged"] = model_result([1.5, 1.0, 1.7], [0.5, 0.25])
    results = build_results(
        plan=make_plan(), eval_report=report, training={}, merge=None, stages={}
    )
    assert any(
        "on 1 of 3 tasks and the joint baseline on 1; 1 are tied." in s for s in results["summary"]
    )


def test_summary_without_eval():
    results = build_results(plan=make_plan(), eval_report=None, training={}, merge=None, stages={})
    assert summarize(results) == ["No model was evaluated."]


def test_markdown_tables(results):
    text = format_report(results)
    assert "| 0 | 40 | 400 | 0.667 | 3 | 410 | 1.250 | a, c |" in text
    assert "| joint | 60 | 600 | – | 5 | 615 | 1.400 | every task |" in text
    # The best loss of task a (branch_0, 1.0) is bold.
    assert "| a | 0 | 2.0000 | **1.0000** | 3.0000 | 1.4000 | 1.5000 | 1.0000 |" in text
    assert "| **pooled** |  | 2.0000 |" in text
    assert "| mc2 | 20 | 0.250 |" in text
    assert "![loss_curves](figures/loss_curves.png)" in text
    assert "| **total** | 4.0 | 100% |  |" in text


def test_write_report_files(results, tmp_path):
    markdown, json_path = write_report(results, tmp_path)
    assert markdown.read_text().startswith("# MERIT run report")
    stored = json.loads(json_path.read_text())
    assert stored["eval"]["models"]["joint"]["held_out"]["b"] == 1.6


# --------------------------------------------------------------------------- curves


def test_moving_average_matches_reference():
    values = np.random.default_rng(0).normal(size=23)
    window = 5
    expected = [values[max(0, i - window + 1) : i + 1].mean() for i in range(len(values))]
    np.testing.assert_allclose(moving_average(values, window), expected, rtol=1e-12)


def test_moving_average_rejects_zero_window():
    with pytest.raises(ValueError, match="window=0"):
        moving_average([1.0], 0)


def test_read_metrics_skips_broken_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        json.dumps({"step": 2, "loss": 1.0}) + "\n" + json.dumps({"step": 1, "loss": 2.0}) + "\n"
        '{"step": 3, "lo'
    )
    assert [record["step"] for record in read_metrics(path)] == [1, 2]
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_plot_loss_curves(tmp_path):
    curves = {
        "branch 0": [
            {"step": i, "loss": 3.0 - 0.1 * i, "tokens_seen": 100 * i} for i in range(1, 9)
        ],
        "joint": [
            {"step": i, "loss": 3.0 - 0.05 * i, "tokens_seen": 100 * i} for i in range(1, 17)
        ],
    }
    path = plot_loss_curves(curves, tmp_path / "figures" / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no metrics"):
        plot_loss_curves({"joint": []}, tmp_path / "empty.png")


# --------------------------------------------------------------------------- settings


def test_train_section_defaults_follow_run():
    model = ModelSettings(compute_dtype="bfloat16", remat=True)
    config = train_config_from_section({"learning_rate": 1e-4}, model=model, max_length=256, seed=7)
    assert config.seq_len == 256
    assert config.seed == 7
    assert config.compute_dtype == "bfloat16"
    assert config.remat is True
    explicit = train_config_from_section(
        {"seq_len": 512, "compute_dtype": "float32", "seed": 1},
        model=model,
        max_length=256,
        seed=7,
    )
    assert (explicit.seq_len, explicit.compute_dtype, explicit.seed) == (512, "float32", 1)


def test_train_section_errors():
    model = ModelSettings()
    with pytest.raises(ValueError, match=r"train\.seq_len=128 is shorter than data\.max_length"):
        train_config_from_section({"seq_len": 128}, model=model, max_length=256, seed=0)
    with pytest.raises(ValueError, match="unknown key"):
        train_config_from_section({"lr": 1.0}, model=model, max_length=256, seed=0)


def test_merge_settings():
    assert MergeSettings.from_dict({}).weights == "token"
    assert MergeSettings.from_dict({"weights": [0.25, 0.75]}).weights == (0.25, 0.75)
    with pytest.raises(ValueError, match="merge.weights='tokens' is invalid"):
        MergeSettings.from_dict({"weights": "tokens"})
    with pytest.raises(ValueError, match="merge.dtype='int8'"):
        MergeSettings.from_dict({"dtype": "int8"})
    with pytest.raises(ValueError, match="merge.method='ties' is unknown"):
        MergeSettings.from_dict({"method": "ties"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['weight'\]"):
        MergeSettings.from_dict({"weight": "token"})


def test_eval_settings():
    settings = EvalSettings.from_dict({"models": ["theta0", "merged"], "num_examples": None})
    assert settings.models == ("theta0", "merged")
    assert not settings.trains_joint
    assert EvalSettings().trains_joint
    with pytest.raises(ValueError, match=r"unknown model\(s\) \['branch_0'\]"):
        EvalSettings.from_dict({"models": ["branch_0"]})
    with pytest.raises(ValueError, match="more than once"):
        EvalSettings.from_dict({"models": ["merged", "merged"]})
    with pytest.raises(ValueError, match="eval.num_examples=0"):
        EvalSettings.from_dict({"num_examples": 0})
    with pytest.raises(ValueError, match="eval.branches_multiple_choice='no'"):
        EvalSettings.from_dict({"branches_multiple_choice": "no"})
