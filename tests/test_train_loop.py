"""Branch loop: exact resume, the final/ layout, branch.json, metrics and the data order."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from merit_jax.models.decoder import init_decoder
from merit_jax.train.checkpoint import (
    BRANCH_INFO_FILE,
    FINAL_DIR,
    final_param_shapes,
    read_final_leaf,
)
from merit_jax.train.config import TrainConfig
from merit_jax.train.data import build_branch_data
from merit_jax.train.loop import BranchSpec, train_branches
from merit_jax.train.step import split_params
from merit_jax.train.testing import random_task, tiny_model_config

TASKS = (random_task("alpha", 7, seed=11), random_task("beta", 5, seed=12))
BUDGETS = {"alpha": 220, "beta": 160}
CONFIG = TrainConfig(
    learning_rate=5e-3,
    warmup_steps=2,
    batch_size=4,
    micro_batches=2,
    seq_len=16,
    checkpoint_every=3,
    keep_checkpoints=2,
)
SPEC = BranchSpec(index=3, tasks=TASKS, budgets=BUDGETS, pad_id=0, info={"plan_sha256": "ab" * 32})


def theta0():
    return init_decoder(tiny_model_config(), seed=4)


def final_leaves(directory: Path) -> dict[tuple[str, ...], np.ndarray]:
    final = directory / FINAL_DIR
    return {path: read_final_leaf(final, path) for path in final_param_shapes(final)}


def metric_steps(directory: Path) -> list[int]:
    lines = (directory / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    (result,) = train_branches([SPEC], theta0(), out, CONFIG, progress=False)
    return result


def test_uninterrupted_run_writes_every_step(uninterrupted):
    assert uninterrupted.finished
    assert uninterrupted.steps == uninterrupted.num_steps >= 6
    assert metric_steps(uninterrupted.directory) == list(range(1, uninterrupted.num_steps + 1))
    assert uninterrupted.directory.name == "3"
    # keep_checkpoints=2: the periodic checkpoints and the last one, newest two kept.
    kept = sorted(int(p.name) for p in (uninterrupted.directory / "checkpoints").iterdir())
    assert kept[-1] == uninterrupted.num_steps
    assert len(kept) == 2


def test_resume_is_byte_identical(uninterrupted, tmp_path):
    stopped = train_branches([SPEC], theta0(), tmp_path, CONFIG, stop_at_step=5, progress=False)
    assert not stopped[0].finished
    assert stopped[0].steps == 5
    assert not (stopped[0].directory / FINAL_DIR).exists()
    assert not (stopped[0].directory / BRANCH_INFO_FILE).exists()

    (resumed,) = train_branches([SPEC], theta0(), tmp_path, CONFIG, progress=False)
    assert resumed.finished
    assert resumed.tokens == uninterrupted.tokens
    expected = final_leaves(uninterrupted.directory)
    got = final_leaves(resumed.directory)
    assert got.keys() == expected.keys()
    for path, array in expected.items():
        assert got[path].dtype == array.dtype, path
        assert got[path].tobytes() == array.tobytes(), path
    assert metric_steps(resumed.directory) == list(range(1, resumed.num_steps + 1))


def test_resume_after_kill_between_checkpoints(uninterrupted, tmp_path):
    train_branches([SPEC], theta0(), tmp_path, CONFIG, stop_at_step=5, progress=False)
    # A crash after step 5 but before its checkpoint: only the step-3 checkpoint survives.
    checkpoints = tmp_path / "branches" / "3" / "checkpoints"
    shutil.rmtree(checkpoints / "5")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["3"]

    (resumed,) = train_branches([SPEC], theta0(), tmp_path, CONFIG, progress=False)
    expected = final_leaves(uninterrupted.directory)
    got = final_leaves(resumed.directory)
    for path, array in expected.items():
        assert got[path].tobytes() == array.tobytes(), path
    # Steps 4 and 5 ran twice; their first metrics lines were dropped on resume.
    assert metric_steps(resumed.directory) == list(range(1, resumed.num_steps + 1))


def test_waves_match_branch_alone(uninterrupted, tmp_path, caplog):
    other = BranchSpec(index=0, tasks=TASKS[:1], budgets={"alpha": 100}, pad_id=0)
    with caplog.at_level("INFO", logger="merit_jax.train"):
        results = train_branches([other, SPEC], theta0(), tmp_path, CONFIG, progress=False)
    assert "2 waves" in caplog.text
    # The second wave runs on the same device with the same program.
    assert "reusing the compiled step" in caplog.text
    assert [r.index for r in results] == [0, 3]
    assert all(r.finished for r in results)
    assert results[0].num_steps < results[1].num_steps
    expected = final_leaves(uninterrupted.directory)
    got = final_leaves(results[1].directory)
    for path, array in expected.items():
        assert got[path].tobytes() == array.tobytes(), path


def test_resume_with_other_settings_raises(tmp_path):
    train_branches([SPEC], theta0(), tmp_path, CONFIG, stop_at_step=3, progress=False)
    changed = CONFIG.replace(learning_rate=1e-3)
    with pytest.raises(ValueError, match="learning_rate was 0.005, now 0.001"):
        train_branches([SPEC], theta0(), tmp_path, changed, progress=False)
    other_data = BranchSpec(index=3, tasks=TASKS, budgets={"alpha": 300, "beta": 160}, pad_id=0)
    with pytest.raises(ValueError, match="the branch's data"):
        train_branches([other_data], theta0(), tmp_path, CONFIG, progress=False)


def test_finished_branch_is_skipped(uninterrupted):
    before = (uninterrupted.directory / "metrics.jsonl").read_text()
    (again,) = train_branches([SPEC], theta0(), uninterrupted.directory.parent.parent, CONFIG)
    assert again.finished
    assert again.steps == uninterrupted.steps
    assert again.tokens == uninterrupted.tokens
    assert (uninterrupted.directory / "metrics.jsonl").read_text() == before


def test_final_layout_is_readable_leaf_by_leaf(uninterrupted):
    model = theta0()
    _, params = split_params(model)
    expected_paths = {
        tuple(str(key.key) for key in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    }
    shapes = final_param_shapes(uninterrupted.directory / FINAL_DIR)
    assert set(shapes) == set(expected_paths)
    assert ("layers", "attn", "q_kernel") in shapes
    assert ("embed",) in shapes
    for path, (shape, dtype) in shapes.items():
        assert shape == expected_paths[path].shape, path
        assert dtype == np.float32, path

    q_kernel = read_final_leaf(uninterrupted.directory / FINAL_DIR, ("layers", "attn", "q_kernel"))
    assert isinstance(q_kernel, np.ndarray)
    assert q_kernel.shape == (2, 16, 4, 4)  # [L, D, N, H]
    assert not np.array_equal(q_kernel, np.asarray(params["layers"]["attn"]["q_kernel"]))
    with pytest.raises(ValueError, match="must name one parameter"):
        read_final_leaf(uninterrupted.directory / FINAL_DIR, ())


def test_branch_info(uninterrupted):
    info = json.loads((uninterrupted.directory / BRANCH_INFO_FILE).read_text())
    assert info["branch"] == 3
    assert info["tasks"] == ["alpha", "beta"]
    assert info["budgets"] == BUDGETS
    assert info["steps"] == uninterrupted.num_steps
    assert info["tokens"] == uninterrupted.tokens
    assert info["tokens"] >= sum(BUDGETS.values())
    assert info["plan_sha256"] == "ab" * 32
    assert info["train_config"] == CONFIG.to_dict()
    assert info["mesh"] == {"data": 1, "model": 1}
    assert info["wall_time_s"] > 0


def test_metrics_records(uninterrupted):
    lines = (uninterrupted.directory / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert set(records[0]) == {
        "step",
        "loss",
        "grad_norm",
        "learning_rate",
        "tokens",
        "targets",
        "tokens_seen",
        "tokens_per_second",
        "wall_time_s",
    }
    assert records[0]["learning_rate"] == 0.0  # linear warmup from 0
    assert records[1]["learning_rate"] == pytest.approx(2.5e-3)
    assert np.cumsum([r["tokens"] for r in records]).tolist() == [r["tokens_seen"] for r in records]
    assert records[-1]["tokens_seen"] == uninterrupted.tokens
    assert list((uninterrupted.directory / "tensorboard").iterdir())


# --------------------------------------------------------------------------- data order


def build(seed: int = 0, packing: bool = True, budgets=None):
    return build_branch_data(
        "branch-3",
        TASKS,
        budgets or BUDGETS,
        seed=seed,
        batch_size=4,
        seq_len=16,
        pad_id=0,
        packing=packing,
    )


def test_data_order_is_deterministic():
    first, second = build(), build()
    assert first.fingerprint == second.fingerprint
    for step in (0, first.num_steps - 1):
        a, b = first.batch(step).as_dict(), second.batch(step).as_dict()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert build(seed=1).fingerprint != first.fingerprint
    assert build(packing=False).fingerprint != first.fingerprint
    with pytest.raises(IndexError, match="outside the"):
        first.batch(first.num_steps)


def test_data_spends_each_budget():
    data = build()
    lengths = {name: [] for name in BUDGETS}
    for task_index, example_index in data.schedule:
        task = TASKS[task_index]
        lengths[task.name].append(task.examples[example_index].length)
    for name, budget in BUDGETS.items():
        total = sum(lengths[name])
        # The last example may overshoot the budget, by less than one example.
        assert budget <= total < budget + max(lengths[name]), name
    assert data.num_tokens == sum(sum(values) for values in lengths.values())
    assert sum(len(row) for row in data.rows) == len(data.schedule)


def test_padded_rows_hold_one_example():
    data = build(packing=False)
    assert all(len(row) == 1 for row in data.rows)
    batch = data.batch(0)
    assert batch.segment_ids.max() == 1
    assert build().batch(0).segment_ids.max() > 1  # packing puts several examples in a row


def test_data_rejects_unknown_budget():
    with pytest.raises(ValueError, match=r"budgets name tasks \['gamma'\]"):
        build(budgets={**BUDGETS, "gamma": 10})
