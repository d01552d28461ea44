"""Smoke test of ``merit plan`` on the real SmolLM2 GGUF and real BIG-bench tasks.

Needs the cached model and tarball (`merit fetch`) and skips without them.
Four short-answer and short long-form tasks with four calibration examples
each keep it near a minute on a 2-core CPU.
"""

from __future__ import annotations

import math

import pytest
import yaml

from merit_jax.cli import main
from merit_jax.conflict.artifacts import load_plan_arrays
from merit_jax.conflict.plan import load_plan

pytestmark = [pytest.mark.real, pytest.mark.slow]

TASKS = ["arithmetic/3_digit_addition", "word_unscrambling", "qa_wikidata", "gem/common_gen"]


def test_merit_plan_on_real_model(tmp_path, real_gguf, real_bigbench_tarball, capsys):
    config = {
        "seed": 0,
        "output_dir": str(tmp_path / "run"),
        "model": {"ref": str(real_gguf)},
        "data": {
            "max_length": 320,
            "mixture": {
                "defaults": {"budget": {"tokens": 1024}, "max_samples": 32, "held_out": 4},
                "datasets": [f"bigbench:{name}" for name in TASKS],
            },
            "eval_tasks": ["navigate"],
        },
        "plan": {"calibration_size": 4, "pca_dim": 1, "seq_len": 320, "micro_batch_size": 1},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))

    assert main(["plan", str(path), "--no-progress"]) == 0
    output = capsys.readouterr().out
    assert "plan: 4 tasks in 2 groups" in output
    assert "explained variance" in output

    plan_dir = tmp_path / "run" / "plan"
    plan = load_plan(plan_dir)
    assert [task.name for task in plan.tasks] == TASKS
    assert plan.num_groups == 2
    assert all(len(group.tasks) == 2 for group in plan.groups)
    arrays = load_plan_arrays(plan_dir, num_tasks=4)
    assert arrays.sketches.shape == (4, 65536)
    off_diagonal = [arrays.similarity[i, j] for i in range(4) for j in range(4) if i != j]
    assert all(math.isfinite(c) and -1.0 <= c < 0.99 for c in off_diagonal)
    for name in ("similarity.png", "pca.png"):
        assert (plan_dir / name).stat().st_size > 1000
