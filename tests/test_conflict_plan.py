"""Plan and plan-array tests: building, byte-stable saving, validation on load."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np
import pytest

from merit_jax.conflict.artifacts import (
    PCA_FILENAME,
    load_plan_arrays,
    save_plan_arrays,
    sha256_path,
)
from merit_jax.conflict.partition import merit_partition
from merit_jax.conflict.pca import conflict_pca
from merit_jax.conflict.plan import (
    SCHEMA_VERSION,
    Plan,
    PlanError,
    PlanSettings,
    build_plan,
    load_plan,
    plan_to_json,
    save_plan,
)
from merit_jax.conflict.similarity import cosine_matrix, normalize_sketches

HASH_A = "a" * 64
HASH_B = "0123456789abcdef" * 4
NAMES = ["qasc", "multirc", "winogrande", "addition", "unscramble", "e2e"]
SAMPLES = [200, 150, 180, 90, 120, 60]
TOKENS = [5_000, 4_000, 6_000, 1_000, 3_000, 7_000]


def settings(**overrides) -> PlanSettings:
    values = dict(
        partitioner="merit",
        pca_dim=1,
        sketch_dim=4096,
        calibration_size=16,
        trainable_parameter_patterns=("layers/.*",),
        loss_convention="mean cross-entropy over assistant tokens, end-of-turn token included",
    )
    values.update(overrides)
    return PlanSettings(**values)


def planning_arrays(seed: int = 0):
    rng = np.random.default_rng(seed)
    sketches = rng.standard_normal((len(NAMES), 32)).astype(np.float32)
    similarity = cosine_matrix(normalize_sketches(sketches))
    return sketches, similarity, conflict_pca(similarity, 1)


def make_plan(seed: int = 0) -> Plan:
    _, _, pca = planning_arrays(seed)
    groups = merit_partition(weights=SAMPLES, embedding=pca.embedding, r=1)
    return build_plan(
        task_names=NAMES,
        samples=SAMPLES,
        tokens=TOKENS,
        groups=groups,
        embedding=pca.embedding,
        settings=settings(),
        seed=seed,
        theta0_sha256=HASH_A,
        data_sha256=HASH_B,
        tool_version="0.1.0",
    )


def plan_dict() -> dict:
    return json.loads(plan_to_json(make_plan()))


def write_json(path, data) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


# --------------------------------------------------------------------------- building


def test_build_plan_totals_and_weights():
    plan = make_plan()
    assert plan.schema_version == SCHEMA_VERSION
    assert plan.num_groups == 2
    for group in plan.groups:
        members = [NAMES.index(name) for name in group.tasks]
        assert group.samples == sum(SAMPLES[t] for t in members)
        assert group.tokens == sum(TOKENS[t] for t in members)
        assert group.weight == group.tokens / sum(TOKENS)
    assert plan.merge_weights.sum() == pytest.approx(1.0, abs=1e-15)
    for task in plan.tasks:
        assert task.name in plan.groups[task.group].tasks
        assert len(task.embedding) == 1


def test_group_tasks_in_task_order():
    plan = make_plan()
    for k in range(plan.num_groups):
        names = [t.name for t in plan.group_tasks(k)]
        assert names == list(plan.groups[k].tasks)
        assert names == [n for n in NAMES if n in names]
    with pytest.raises(IndexError, match="groups 0..1"):
        plan.group_tasks(2)


def test_build_plan_without_embedding():
    plan = build_plan(
        task_names=NAMES,
        samples=SAMPLES,
        tokens=TOKENS,
        groups=(tuple(range(6)),),
        embedding=None,
        settings=settings(partitioner="joint", pca_dim=0, sketch_dim=None),
        seed=0,
        theta0_sha256=HASH_A,
        data_sha256=HASH_A,
    )
    assert plan.merge_weights.tolist() == [1.0]
    assert all(t.embedding == () for t in plan.tasks)


def test_build_plan_rejects_uncovered_task():
    with pytest.raises(ValueError, match=r"\['e2e'\] are in no group"):
        build_plan(
            task_names=NAMES,
            samples=SAMPLES,
            tokens=TOKENS,
            groups=((0, 1, 2), (3, 4)),
            embedding=None,
            settings=settings(pca_dim=1),
            seed=0,
            theta0_sha256=HASH_A,
            data_sha256=HASH_A,
        )


def test_invalid_plan_in_memory_rejected():
    plan = make_plan()
    with pytest.raises(PlanError, match="theta0_sha256"):
        dataclasses.replace(plan, theta0_sha256="not-a-hash")


# --------------------------------------------------------------------------- saving


def test_save_load_round_trip(tmp_path):
    plan = make_plan()
    path = save_plan(plan, tmp_path / "plan.json")
    assert load_plan(path) == plan
    assert load_plan(tmp_path) == plan  # a directory means directory/plan.json


def test_saved_bytes_identical_across_runs(tmp_path):
    first = save_plan(make_plan(), tmp_path / "a" / "plan.json")
    second = save_plan(make_plan(), tmp_path / "b" / "plan.json")
    assert first.read_bytes() == second.read_bytes()
    text = first.read_text()
    assert text.endswith("\n")
    assert list(json.loads(text)) == sorted(json.loads(text))


def test_save_refuses_overwrite(tmp_path):
    path = save_plan(make_plan(0), tmp_path / "plan.json")
    original = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_plan(make_plan(1), path)
    assert path.read_bytes() == original
    save_plan(make_plan(1), path, overwrite=True)
    assert load_plan(path).seed == 1
    assert sorted(os.listdir(tmp_path)) == ["plan.json"]  # no temporary files left


# --------------------------------------------------------------------------- validation on load


def load_dict(tmp_path, data) -> Plan:
    path = tmp_path / "plan.json"
    write_json(path, data)
    return load_plan(path)


def test_unknown_schema_version(tmp_path):
    data = plan_dict()
    data["schema_version"] = 99
    with pytest.raises(PlanError, match="schema_version = 99 is unknown"):
        load_dict(tmp_path, data)


def test_weights_must_sum_to_one(tmp_path):
    data = plan_dict()
    data["groups"][0]["weight"] += 0.1
    with pytest.raises(PlanError) as info:
        load_dict(tmp_path, data)
    text = str(info.value)
    assert "sum to" in text
    assert "groups[0].weight" in text
    assert "build_plan" in text


def test_groups_must_be_disjoint(tmp_path):
    data = plan_dict()
    moved = data["groups"][1]["tasks"][0]
    data["groups"][0]["tasks"].append(moved)
    with pytest.raises(PlanError, match=f"task '{moved}' is in groups 0 and 1"):
        load_dict(tmp_path, data)


def test_groups_must_cover_tasks(tmp_path):
    data = plan_dict()
    dropped = data["groups"][1]["tasks"].pop()
    with pytest.raises(PlanError, match=rf"tasks \['{dropped}'\] are in no group"):
        load_dict(tmp_path, data)


def test_group_tokens_must_match_tasks(tmp_path):
    data = plan_dict()
    data["tasks"][0]["tokens"] += 1
    with pytest.raises(PlanError, match="N_k = sum of n_t"):
        load_dict(tmp_path, data)


def test_task_group_field_must_match(tmp_path):
    data = plan_dict()
    data["tasks"][0]["group"] = 1 - data["tasks"][0]["group"]
    with pytest.raises(PlanError, match="its own group field"):
        load_dict(tmp_path, data)


def test_group_count_must_match_partitioner(tmp_path):
    data = plan_dict()
    data["settings"]["pca_dim"] = 2
    with pytest.raises(PlanError, match=r"2\^r = 4 groups, but the plan has 2"):
        load_dict(tmp_path, data)


def test_type_and_key_problems_collected(tmp_path):
    data = plan_dict()
    data["seed"] = "zero"
    data["tasks"][1]["samples"] = 1.5
    del data["settings"]["loss_convention"]
    data["extra"] = True
    with pytest.raises(PlanError) as info:
        load_dict(tmp_path, data)
    problems = info.value.problems
    assert any(p.startswith("seed = 'zero'") for p in problems)
    assert any("tasks[1].samples" in p for p in problems)
    assert any("missing keys ['loss_convention']" in p for p in problems)
    assert any("unexpected keys ['extra']" in p for p in problems)


def test_bad_hash_and_partitioner(tmp_path):
    data = plan_dict()
    data["data_sha256"] = "ABC"
    data["settings"]["partitioner"] = "spectral"
    with pytest.raises(PlanError) as info:
        load_dict(tmp_path, data)
    text = str(info.value)
    assert "data_sha256 = 'ABC' must be 64 lowercase hex digits" in text
    assert "'spectral' is unknown" in text


def test_embedding_length_checked(tmp_path):
    data = plan_dict()
    data["tasks"][2]["embedding"] = [0.1, 0.2]
    with pytest.raises(PlanError, match=r"tasks\[2\].*embedding has 2 values"):
        load_dict(tmp_path, data)


def test_invalid_json(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        load_plan(path)


def test_missing_plan_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="merit plan"):
        load_plan(tmp_path / "plan.json")


# --------------------------------------------------------------------------- arrays


def test_arrays_round_trip(tmp_path):
    sketches, similarity, pca = planning_arrays()
    save_plan_arrays(tmp_path, sketches=sketches, similarity=similarity, pca=pca)
    loaded = load_plan_arrays(tmp_path, num_tasks=len(NAMES))
    np.testing.assert_array_equal(loaded.sketches, sketches)
    assert loaded.sketches.dtype == np.float32
    np.testing.assert_array_equal(loaded.similarity, similarity)
    for name in ("column_mean", "eigenvalues", "eigenvectors", "embedding"):
        np.testing.assert_array_equal(getattr(loaded.pca, name), getattr(pca, name))
    np.testing.assert_array_equal(loaded.pca.explained_variance_ratio, pca.explained_variance_ratio)


def test_arrays_bytes_identical(tmp_path):
    sketches, similarity, pca = planning_arrays()
    save_plan_arrays(tmp_path / "a", sketches=sketches, similarity=similarity, pca=pca)
    save_plan_arrays(tmp_path / "b", sketches=sketches, similarity=similarity, pca=pca)
    for name in ("sketches.npy", "similarity.npy", PCA_FILENAME):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_arrays_refuse_overwrite(tmp_path):
    sketches, similarity, pca = planning_arrays()
    save_plan_arrays(tmp_path, sketches=sketches, similarity=similarity, pca=pca)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_plan_arrays(tmp_path, sketches=sketches, similarity=similarity, pca=pca)
    save_plan_arrays(tmp_path, sketches=sketches, similarity=similarity, pca=pca, overwrite=True)


def test_arrays_shape_mismatch_rejected(tmp_path):
    sketches, similarity, pca = planning_arrays()
    with pytest.raises(ValueError, match=r"similarity has shape \(5, 5\)"):
        save_plan_arrays(tmp_path, sketches=sketches, similarity=similarity[:5, :5], pca=pca)


def test_arrays_task_count_checked(tmp_path):
    sketches, similarity, pca = planning_arrays()
    save_plan_arrays(tmp_path, sketches=sketches, similarity=similarity, pca=pca)
    with pytest.raises(ValueError, match="6 task rows but the plan has 7 tasks"):
        load_plan_arrays(tmp_path, num_tasks=7)


def test_arrays_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="sketches.npy"):
        load_plan_arrays(tmp_path)


# --------------------------------------------------------------------------- hashes


def test_sha256_of_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"theta0")
    assert sha256_path(path) == hashlib.sha256(b"theta0").hexdigest()


def test_sha256_of_directory(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "a.json").write_text("A")
    (root / "sub" / "b.json").write_text("B")
    lines = "".join(
        f"{name}\0{hashlib.sha256(content).hexdigest()}\n"
        for name, content in [("a.json", b"A"), ("sub/b.json", b"B")]
    )
    digest = sha256_path(root)
    assert digest == hashlib.sha256(lines.encode()).hexdigest()
    os.utime(root / "a.json", (0, 0))
    assert sha256_path(root) == digest
    (root / "sub" / "b.json").rename(root / "sub" / "c.json")
    assert sha256_path(root) != digest


def test_sha256_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot hash"):
        sha256_path(tmp_path / "absent")
