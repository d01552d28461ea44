"""`merit run configs/smoke.yaml` end to end on the real SmolLM2 GGUF and BIG-bench data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from merit_jax import cli

SMOKE_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml"


@pytest.mark.real
@pytest.mark.slow
def test_smoke_run_end_to_end(real_gguf, real_bigbench_tarball, tmp_path, capsys):
    del real_gguf, real_bigbench_tarball  # fetched into the cache, which the run reads
    out = tmp_path / "smoke"
    assert cli.main(["run", str(SMOKE_CONFIG), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "total" in printed

    report = (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())
    models = results["eval"]["models"]
    assert list(models) == ["theta0", "merged", "joint"]
    for name in models:
        assert models[name]["held_out_pooled_loss"] > 0
        assert len(models[name]["held_out"]) == 4
        assert set(models[name]["multiple_choice"]) == {"sports_understanding", "navigate"}
        assert all(entry["n"] == 5 for entry in models[name]["multiple_choice"].values())
    assert results["plan"]["num_groups"] == 2
    assert set(results["training"]) == {"branch_0", "branch_1", "joint"}
    joint_budget = sum(group["tokens"] for group in results["plan"]["groups"])
    assert results["training"]["joint"]["tokens"] >= joint_budget
    assert "merged" in report.split("## Held-out loss")[1]
    assert "joint" in report.split("## Multiple-choice")[1]

    # A second invocation refuses to overwrite the finished run.
    assert cli.main(["run", str(SMOKE_CONFIG), "--out", str(out), "--no-progress"]) == 1
    assert "--overwrite" in capsys.readouterr().err
