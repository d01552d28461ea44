"""``merit plan`` end to end on a tiny random model and a fake BIG-bench tarball."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from merit_jax.cli import main
from merit_jax.conflict import planner
from merit_jax.conflict.artifacts import load_plan_arrays
from merit_jax.conflict.calibration import (
    chunk_bounds,
    curve_from_sketches,
    format_curve,
    run_calibration_curve,
)
from merit_jax.conflict.gradients import GradientEngine, state_sha256
from merit_jax.conflict.plan import load_plan
from merit_jax.conflict.similarity import cosine_matrix, normalize_sketches
from merit_jax.data.bigbench import BigBenchArchive
from merit_jax.data.testing import chatml_byte_tokenizer, write_bigbench_tarball
from merit_jax.models.config import ModelConfig
from merit_jax.models.decoder import Decoder
from merit_jax.report.plan_plots import _group_order, pca_coordinates, write_plan_plots
from merit_jax.runconfig import ConfigError, config_from_dict

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "rock", "fish", "bird"]


def make_task(name: str, description: str, make_example, count: int = 14) -> dict:
    return {
        "name": name,
        "description": description,
        "examples": [make_example(i) for i in range(count)],
    }


FAKE_TASKS = {
    "add": make_task("add", "Add.", lambda i: {"input": f"{i}+{i + 3}", "target": str(2 * i + 3)}),
    "double": make_task("double", "Double.", lambda i: {"input": f"{i}", "target": str(2 * i)}),
    "copy": make_task(
        "copy",
        "Copy the words.",
        lambda i: {
            "input": " ".join(WORDS[i % 7 : i % 7 + 4]),
            "target": " ".join(WORDS[i % 7 : i % 7 + 4]),
        },
    ),
    "reverse": make_task(
        "reverse",
        "Reverse the words.",
        lambda i: {
            "input": " ".join(WORDS[i % 5 : i % 5 + 3]),
            "target": " ".join(reversed(WORDS[i % 5 : i % 5 + 3])),
        },
    ),
    "describe": make_task(
        "describe",
        "Write a sentence.",
        lambda i: {
            "input": WORDS[i % 11],
            "target": f"The {WORDS[i % 11]} is next to the {WORDS[(i + 3) % 11]}.",
        },
    ),
    "pick": {
        "name": "pick",
        "description": "Pick one.",
        "examples": [{"input": "Is it?", "target_scores": {"Yes": 1, "No": 0}}],
    },
}
BASE = ["add", "double", "copy"]
EXTRA = ["reverse", "describe"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("bigbench")
    tarball = write_bigbench_tarball(root / "bigbench-1.0.0.tar.gz", FAKE_TASKS)
    return BigBenchArchive(tarball, cache_root=root / "cache")


@pytest.fixture(scope="module")
def theta0():
    tokenizer = chatml_byte_tokenizer()
    config = ModelConfig(
        model_type="llama",
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=4,
        tie_word_embeddings=True,
    )
    return planner.theta0_from_model(Decoder(config, rngs=nnx.Rngs(0)), tokenizer)


def run_config(tasks, **plan_overrides) -> dict:
    plan = dict(calibration_size=4, sketch_dim=512, pca_dim=1, micro_batch_size=1, seq_len=160)
    plan.update(plan_overrides)
    return {
        "seed": 5,
        "data": {
            "max_length": 160,
            "mixture": {
                "defaults": {"budget": {"tokens": 300}, "max_samples": 10, "held_out": 2},
                "datasets": [f"bigbench:{name}" for name in tasks],
            },
            "eval_tasks": ["pick"],
        },
        "plan": plan,
    }


def plan_into(directory, theta0, archive, tasks=BASE, **overrides):
    config = config_from_dict(run_config(tasks, **overrides), where="test config")
    return planner.run_plan(
        config, out_dir=directory, progress=False, theta0=theta0, archive=archive
    )


def test_plan_is_byte_identical_across_runs(tmp_path, theta0, archive):
    first = plan_into(tmp_path / "a", theta0, archive)
    second = plan_into(tmp_path / "b", theta0, archive)
    assert (tmp_path / "a" / "plan.json").read_bytes() == (
        tmp_path / "b" / "plan.json"
    ).read_bytes()
    assert (tmp_path / "a" / "sketches.npy").read_bytes() == (
        tmp_path / "b" / "sketches.npy"
    ).read_bytes()
    assert first.plan == second.plan


def test_plan_contents(tmp_path, theta0, archive):
    outcome = plan_into(tmp_path, theta0, archive)
    plan = load_plan(tmp_path)
    assert plan == outcome.plan
    assert [task.name for task in plan.tasks] == BASE
    assert plan.num_groups == 2
    assert all(task.samples == 10 and task.tokens == 300 for task in plan.tasks)
    assert sum(group.weight for group in plan.groups) == pytest.approx(1.0)
    assert plan.theta0_sha256 == state_sha256(nnx.state(theta0.model))
    assert plan.seed == 5
    assert plan.settings.calibration_size == 4
    assert plan.settings.sketch_dim == 512
    assert "end-of-turn token included" in plan.settings.loss_convention
    assert "max_length=160" in plan.settings.loss_convention

    arrays = load_plan_arrays(tmp_path, num_tasks=3)
    assert arrays.sketches.shape == (3, 512)
    expected = cosine_matrix(normalize_sketches(arrays.sketches))
    np.testing.assert_allclose(arrays.similarity, expected, atol=1e-12)
    assert sorted(p.name for p in (tmp_path / "gradients").iterdir()) == [
        "add.json",
        "add.npy",
        "copy.json",
        "copy.npy",
        "double.json",
        "double.npy",
    ]
    assert set(outcome.losses) == set(BASE)
    summary = planner.format_summary(outcome)
    assert "S_k" in summary
    assert "w_k" in summary
    assert "explained variance" in summary


def test_rerun_reuses_stored_gradients(tmp_path, theta0, archive, monkeypatch):
    plan_into(tmp_path, theta0, archive)
    original = (tmp_path / "plan.json").read_bytes()

    def fail(self, batches):
        raise AssertionError("a stored task gradient was recomputed")

    monkeypatch.setattr(GradientEngine, "task_gradient", fail)
    config = config_from_dict(run_config(BASE), where="test config")
    planner.run_plan(
        config, out_dir=tmp_path, overwrite=True, progress=False, theta0=theta0, archive=archive
    )
    assert (tmp_path / "plan.json").read_bytes() == original


def test_existing_plan_needs_overwrite(tmp_path, theta0, archive):
    plan_into(tmp_path, theta0, archive)
    with pytest.raises(FileExistsError, match="--overwrite"):
        plan_into(tmp_path, theta0, archive)


def test_too_few_tasks_for_pca_dim_raises(tmp_path, theta0, archive):
    with pytest.raises(ValueError, match="plan.pca_dim=2 needs at least"):
        plan_into(tmp_path, theta0, archive, tasks=["add"], pca_dim=2)


def write_extra_mixture(path, names):
    lines = ["defaults:", "  budget: {tokens: 300}", "  max_samples: 10", "  held_out: 2"]
    lines += ["datasets:"] + [f"  - bigbench:{name}" for name in names]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_add_equals_full_recompute(tmp_path, theta0, archive):
    base_config = config_from_dict(run_config(BASE), where="base")
    planner.run_plan(
        base_config, out_dir=tmp_path / "inc", progress=False, theta0=theta0, archive=archive
    )
    extra = write_extra_mixture(tmp_path / "extra.yaml", EXTRA)
    added = planner.run_plan_add(
        base_config, extra, out_dir=tmp_path / "inc", progress=False, theta0=theta0, archive=archive
    )
    assert set(added.losses) == set(BASE + EXTRA)
    full = plan_into(tmp_path / "full", theta0, archive, tasks=BASE + EXTRA)

    assert [t.name for t in added.plan.tasks] == BASE + EXTRA
    np.testing.assert_array_equal(added.arrays.sketches, full.arrays.sketches)
    np.testing.assert_allclose(added.arrays.similarity, full.arrays.similarity, atol=1e-12)
    np.testing.assert_allclose(added.arrays.pca.embedding, full.arrays.pca.embedding, atol=1e-9)
    assert [t.group for t in added.plan.tasks] == [t.group for t in full.plan.tasks]
    assert added.plan.groups == full.plan.groups
    assert added.plan.data_sha256 == full.plan.data_sha256
    assert load_plan(tmp_path / "inc") == added.plan


def test_add_with_run_config_adds_only_new_datasets(tmp_path, theta0, archive):
    import yaml

    base_config = config_from_dict(run_config(BASE), where="base")
    planner.run_plan(base_config, out_dir=tmp_path, progress=False, theta0=theta0, archive=archive)
    extended = tmp_path / "extended.yaml"
    extended.write_text(yaml.safe_dump(run_config(BASE + ["reverse"])))
    added = planner.run_plan_add(
        base_config, extended, out_dir=tmp_path, progress=False, theta0=theta0, archive=archive
    )
    assert [t.name for t in added.plan.tasks] == BASE + ["reverse"]


def test_add_rejects_repeated_or_mismatched_input(tmp_path, theta0, archive):
    import yaml

    base_config = config_from_dict(run_config(BASE), where="base")
    planner.run_plan(base_config, out_dir=tmp_path, progress=False, theta0=theta0, archive=archive)
    repeated = write_extra_mixture(tmp_path / "repeated.yaml", ["add", "reverse"])
    with pytest.raises(ConfigError, match=r"lists \['add'\]"):
        planner.added_datasets(base_config, repeated)
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(run_config(BASE + ["reverse"], calibration_size=3)))
    with pytest.raises(ConfigError, match=r"differs .* \['plan'\]"):
        planner.added_datasets(base_config, other)
    changed = config_from_dict(run_config(BASE, calibration_size=3), where="changed")
    extra = write_extra_mixture(tmp_path / "extra.yaml", ["reverse"])
    with pytest.raises(ValueError, match="does not match"):
        planner.run_plan_add(
            changed, extra, out_dir=tmp_path, progress=False, theta0=theta0, archive=archive
        )


def test_plots_are_written(tmp_path, theta0, archive):
    outcome = plan_into(tmp_path, theta0, archive)
    files = write_plan_plots(tmp_path, outcome.plan, outcome.arrays)
    assert [f.name for f in files] == ["similarity.png", "pca.png"]
    for file in files:
        assert file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    coords = pca_coordinates(outcome.arrays.similarity, outcome.arrays.pca)
    np.testing.assert_allclose(coords[:, :1], outcome.arrays.pca.embedding, atol=1e-12)


def test_group_order_keeps_task_order_within_groups():
    assert _group_order([1, 0, 1, 0, 2]).tolist() == [1, 3, 0, 2, 4]


def test_curve_from_sketches_matches_numpy():
    rng = np.random.default_rng(0)
    chunks = rng.standard_normal((3, 4, 20))  # 3 tasks: reference + 3 chunks
    curve = curve_from_sketches(chunks, [1, 2, 4], 8, ["a", "b", "c"])
    for t in range(3):
        for column in range(3):
            estimate = chunks[t, 1 : column + 2].sum(axis=0)
            reference = chunks[t, 0]
            expected = estimate @ reference / np.linalg.norm(estimate) / np.linalg.norm(reference)
            assert curve.cosines[t, column] == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(curve.mean, curve.cosines.mean(axis=0))
    assert "worst task" in format_curve(curve)


def test_chunk_bounds_are_disjoint_and_nested():
    assert chunk_bounds([2, 4, 8], 16) == [(0, 16), (16, 18), (18, 20), (20, 24)]


def test_calibration_curve_on_tiny_model(tmp_path, theta0, archive):
    config = config_from_dict(run_config(BASE), where="test config")
    curve, out = run_calibration_curve(
        config,
        sizes=[1, 3],
        reference=4,
        out_dir=tmp_path,
        progress=False,
        theta0=theta0,
        archive=archive,
    )
    assert curve.cosines.shape == (3, 2)
    assert np.all(np.abs(curve.cosines) <= 1.0 + 1e-9)
    assert (out / "curve.json").is_file()
    with pytest.raises(ValueError, match="calibration size"):
        run_calibration_curve(
            config,
            sizes=[4],
            reference=8,
            out_dir=tmp_path,
            progress=False,
            theta0=theta0,
            archive=archive,
        )


def test_cli_dry_run_prints_the_plan(tmp_path, capsys):
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_config(BASE)))
    assert main(["plan", str(path), "--dry-run", "--set", "plan.pca_dim=2"]) == 0
    output = capsys.readouterr().out
    assert "training datasets (3)" in output
    assert "K=4 branches" in output
    assert "evaluation tasks (1): pick" in output


def test_cli_reports_config_errors_without_traceback(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("data: {mixture: {datasets: ['bigbench:add']}}\nplan: {pca_dim: 0}\n")
    assert main(["plan", str(path), "--dry-run"]) == 1
    error = capsys.readouterr().err
    assert "merit plan: error:" in error
    assert "plan.pca_dim=0" in error
    assert main(["plan", str(tmp_path / "missing.yaml")]) == 1
    assert "not found" in capsys.readouterr().err
