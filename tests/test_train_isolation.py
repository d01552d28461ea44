"""Branch isolation from compiled executables, HLO replica-group parsing, data parallelism.

The multi-device tests run this file as a script in a subprocess with 8
forced CPU devices (XLA_FLAGS must be set before JAX starts, and the main
test process already runs JAX on one device). The child prints one JSON line
of results, and the assertions stay here in the parent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from merit_jax.train.isolation import (
    HloParseError,
    branch_isolation_report,
    collectives,
    parse_replica_groups,
)

NUM_DEVICES = 8
REPO_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "groups"),
    [
        ("{{0,1,2,3},{4,5,6,7}}", [[0, 1, 2, 3], [4, 5, 6, 7]]),
        ("{{0},{1}}", [[0], [1]]),
        ("[2,4]<=[8]", [[0, 1, 2, 3], [4, 5, 6, 7]]),
        ("[4,2]<=[2,4]T(1,0)", [[0, 4], [1, 5], [2, 6], [3, 7]]),
        ("[1,4]<=[4]", [[0, 1, 2, 3]]),
        ("mesh['axis_0'=2,'axis_1'=2] {'axis_1'}", [[0, 1], [2, 3]]),
        ("mesh['axis_0'=2,'axis_1'=2] {'axis_0'}", [[0, 2], [1, 3]]),
        ("mesh['axis_0'=4] {'axis_0'}", [[0, 1, 2, 3]]),
        ("mesh['a'=2,'b'=2,'c'=2] {'a','c'}", [[0, 1, 4, 5], [2, 3, 6, 7]]),
        # The mesh's devices in another order, written as a transposed iota.
        (
            "mesh['axis_0'=2,'axis_1'=4], device_ids=([4,2]T(1,0)) {'axis_1'}",
            [[0, 2, 4, 6], [1, 3, 5, 7]],
        ),
        # The same order as an explicit list, in the newer printer's syntax.
        ("@mesh<a=2,b=4>([0,2,4,6,1,3,5,7]) {b}", [[0, 2, 4, 6], [1, 3, 5, 7]]),
        # Sub-axis a:(2)2 of an 8-device axis: the middle factor of 2 x 2 x 2.
        ("@mesh<a=8> {a:(2)2}", [[0, 2], [1, 3], [4, 6], [5, 7]]),
    ],
)
def test_parse_replica_groups(text, groups):
    assert parse_replica_groups(text) == groups


def test_parse_unknown_format_raises():
    with pytest.raises(HloParseError, match="unknown replica-group format"):
        parse_replica_groups("replicas(0..3)")
    with pytest.raises(HloParseError, match="not a mesh axis"):
        parse_replica_groups("mesh['x'=2] {'y'}")


HLO = "\n".join(
    [
        "ENTRY %main {",
        "  %ar = f32[] all-reduce-start(f32[] %p), channel_id=1, replica_groups=[2,2]<=[4], "
        "use_global_device_ids=true, to_apply=%add",
        "  %ag = f32[8]{0} all-gather(f32[4]{0} %q), channel_id=2, "
        "replica_groups={{0,2},{1,3}}, dimensions={0}",
        "  %rs = f32[2]{0} reduce-scatter(f32[4]{0} %q), channel_id=3, "
        "replica_groups=mesh['x'=2,'y'=2] {'x'}, dimensions={0}",
        "  %cp = f32[4]{0} collective-permute(f32[4]{0} %q), channel_id=4, "
        "source_target_pairs={{0,1},{1,0}}",
        "  %all-reduce.7 = f32[] add(f32[] %a, f32[] %b)",
        "  ROOT %done = f32[] all-reduce-done(f32[] %ar)",
        "}",
    ]
)


def test_collectives_are_found_with_groups():
    found = collectives(HLO)
    assert [c.op for c in found] == [
        "all-reduce",
        "all-gather",
        "reduce-scatter",
        "collective-permute",
    ]
    assert found[0].groups == ((0, 1), (2, 3))
    assert found[1].groups == ((0, 2), (1, 3))
    assert found[2].groups == ((0, 2), (1, 3))
    assert found[3].groups == ((0, 1), (1, 0))


def fake_compiled(text: str, device_ids: list[int]):
    devices = [SimpleNamespace(id=i) for i in device_ids]
    executable = SimpleNamespace(local_devices=lambda: devices)
    return SimpleNamespace(as_text=lambda: text, runtime_executable=lambda: executable)


def test_report_maps_logical_ids_to_devices():
    report = branch_isolation_report(fake_compiled(HLO, [6, 4, 7, 5]))
    assert report.device_ids == frozenset({4, 5, 6, 7})
    groups = {(op, tuple(sorted(g))) for op, g in report.collective_device_groups}
    # Logical id i is the i-th device of the executable: 0 -> 6, 1 -> 4, 2 -> 7, 3 -> 5.
    assert ("all-reduce", (4, 6)) in groups
    assert ("all-reduce", (5, 7)) in groups
    assert ("all-gather", (6, 7)) in groups


def test_report_rejects_ids_beyond_the_executable():
    text = "  %x = f32[] all-reduce(f32[] %p), replica_groups={{0,1,2,3,4}}, to_apply=%add"
    with pytest.raises(HloParseError, match=r"names logical ids \[4\]"):
        branch_isolation_report(fake_compiled(text, [0, 1, 2, 3]))


# --------------------------------------------------------------------------- subprocess


def run_child(mode: str, tmp_path: Path) -> dict:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={NUM_DEVICES}"
    completed = subprocess.run(
        [sys.executable, __file__, mode, str(tmp_path)],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if completed.returncode != 0:
        pytest.fail(f"child {mode} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_branch_steps_are_isolated(tmp_path):
    results = run_child("isolation", tmp_path)
    assert set(results) == {"k2_data2_model2_fsdp", "k4_data2"}
    for name, branches in results.items():
        meshes = [frozenset(b["mesh"]) for b in branches]
        executables = [frozenset(b["executable"]) for b in branches]
        assert executables == meshes, name
        assert frozenset().union(*meshes) == frozenset(range(NUM_DEVICES)), name
        for a in range(len(meshes)):
            for b in range(a + 1, len(meshes)):
                assert not meshes[a] & meshes[b], (name, a, b)
        for k, branch in enumerate(branches):
            # Data parallelism reduces gradients, so every step has collectives.
            assert branch["groups"], (name, k)
            for op, group in branch["groups"]:
                assert set(group) <= meshes[k], (name, k, op, group)
                for other, mesh in enumerate(meshes):
                    if other != k:
                        assert not set(group) & mesh, (name, k, op, group)
    assert "share devices" in results["k4_data2"][0]["negative_check"]


@pytest.mark.slow
def test_data_parallel_step_matches_one_device(tmp_path):
    results = run_child("data_parallel", tmp_path)
    assert set(results["diffs"]) == {"data2", "data2_fsdp", "data2_model2_fsdp"}
    for name, diff in results["diffs"].items():
        assert diff["params"] < 1e-6, name
        assert diff["loss"] < 1e-6, name
    # The steps changed the parameters, so equal results are not trivially equal.
    assert results["moved"] > 1e-3


def test_concurrent_branch_matches_branch_alone(tmp_path):
    results = run_child("concurrent", tmp_path)
    assert results["devices"] == [[0], [1]]
    assert results["identical"] is True
    assert results["num_leaves"] > 0


# --------------------------------------------------------------------------- child side


def _child_isolation(tmp: Path) -> dict:
    import jax
    import numpy as np

    from merit_jax.models.decoder import init_decoder
    from merit_jax.train.config import TrainConfig
    from merit_jax.train.isolation import check_isolation, collectives
    from merit_jax.train.mesh import carve_submeshes
    from merit_jax.train.step import compile_branch_step, split_params
    from merit_jax.train.testing import tiny_model_config

    graphdef, params = split_params(init_decoder(tiny_model_config(), seed=0))
    host = jax.tree.map(np.asarray, params)
    results = {}
    for name, k, model_parallel, fsdp in (
        ("k2_data2_model2_fsdp", 2, 2, True),
        ("k4_data2", 4, 1, False),
    ):
        placements = carve_submeshes(k, jax.devices(), model_parallel=model_parallel)
        config = TrainConfig(
            batch_size=4, micro_batches=2, seq_len=8, model_parallel=model_parallel, fsdp=fsdp
        )
        steps = [compile_branch_step(graphdef, host, p.mesh, config, 10) for p in placements]
        reports = check_isolation([s.compiled for s in steps], [p.mesh for p in placements])
        entries = []
        for placement, step, report in zip(placements, steps, reports, strict=True):
            entries.append(
                {
                    "mesh": sorted(placement.device_ids),
                    "executable": sorted(report.device_ids),
                    "groups": [
                        [op, sorted(group)] for op, group in report.collective_device_groups
                    ],
                    "num_collectives": len(collectives(step.compiled.as_text())),
                }
            )
        try:
            check_isolation([steps[0].compiled] * 2, [placements[0].mesh] * 2)
            entries[0]["negative_check"] = "no error"
        except RuntimeError as error:
            entries[0]["negative_check"] = str(error)
        results[name] = entries
    return results


def _child_data_parallel(tmp: Path) -> dict:
    import jax
    import numpy as np

    from merit_jax.data.batching import packed_batch
    from merit_jax.models.decoder import init_decoder
    from merit_jax.train.config import TrainConfig
    from merit_jax.train.mesh import carve_submeshes
    from merit_jax.train.step import compile_branch_step, init_state, place_batch, split_params
    from merit_jax.train.testing import random_task, tiny_model_config

    graphdef, params = split_params(init_decoder(tiny_model_config(), seed=0))
    host = jax.tree.map(np.asarray, params)
    task = random_task("t", 16, seed=1, max_length=10)
    batches = [
        packed_batch(
            [[example] for example in task.examples[i : i + 8]],
            seq_len=10,
            pad_id=0,
            batch_size=8,
        ).as_dict()
        for i in (0, 8)
    ]

    def train(devices, **layout):
        config = TrainConfig(
            learning_rate=1e-2, warmup_steps=0, adam_eps=1e-3, batch_size=8, micro_batches=2,
            seq_len=10, **layout,
        )  # fmt: skip
        mesh = carve_submeshes(1, devices, model_parallel=config.model_parallel)[0].mesh
        step = compile_branch_step(graphdef, host, mesh, config, 10)
        state = init_state(step, host, seed=0)
        losses = []
        for batch in batches:
            state, metrics = step(state, place_batch(step, batch))
            losses.append(float(metrics["loss"]))
        return jax.tree.leaves(jax.device_get(state.params)), losses

    devices = jax.devices()
    reference, reference_losses = train(devices[:1])
    diffs = {}
    for name, subset, layout in (
        ("data2", devices[:2], {}),
        ("data2_fsdp", devices[2:4], {"fsdp": True}),
        ("data2_model2_fsdp", devices[4:8], {"fsdp": True, "model_parallel": 2}),
    ):
        leaves, losses = train(subset, **layout)
        diffs[name] = {
            "params": max(
                float(np.max(np.abs(a - b))) for a, b in zip(leaves, reference, strict=True)
            ),
            "loss": max(abs(a - b) for a, b in zip(losses, reference_losses, strict=True)),
        }
    moved = max(
        float(np.max(np.abs(a - b))) for a, b in zip(reference, jax.tree.leaves(host), strict=True)
    )
    return {"diffs": diffs, "moved": moved}


def _child_concurrent(tmp: Path) -> dict:
    import jax
    import numpy as np

    from merit_jax.models.decoder import init_decoder
    from merit_jax.train.checkpoint import final_param_shapes, read_final_leaf
    from merit_jax.train.config import TrainConfig
    from merit_jax.train.loop import BranchSpec, train_branches
    from merit_jax.train.testing import random_task, tiny_model_config

    model = init_decoder(tiny_model_config(), seed=0)
    specs = [
        BranchSpec(0, (random_task("a", 6, seed=1),), {"a": 200}, pad_id=0),
        BranchSpec(1, (random_task("b", 6, seed=2),), {"b": 150}, pad_id=0),
    ]
    config = TrainConfig(learning_rate=1e-2, batch_size=2, seq_len=12, checkpoint_every=0)
    devices = jax.devices()
    together = train_branches(specs, model, tmp / "together", config, devices=devices[:2])
    alone = train_branches(specs[1:], model, tmp / "alone", config, devices=devices[:1])
    final_together = together[1].directory / "final"
    final_alone = alone[0].directory / "final"
    paths = list(final_param_shapes(final_together))
    identical = all(
        np.array_equal(read_final_leaf(final_together, p), read_final_leaf(final_alone, p))
        for p in paths
    )
    branch_devices = [
        json.loads((r.directory / "branch.json").read_text())["devices"] for r in together
    ]
    return {"identical": identical, "num_leaves": len(paths), "devices": branch_devices}


def _child_main() -> None:
    mode, tmp = sys.argv[1], Path(sys.argv[2])
    import jax

    if len(jax.devices()) != NUM_DEVICES:
        raise SystemExit(f"expected {NUM_DEVICES} CPU devices, got {jax.devices()}")
    jax.config.update("jax_default_matmul_precision", "float32")
    run = {
        "isolation": _child_isolation,
        "data_parallel": _child_data_parallel,
        "concurrent": _child_concurrent,
    }[mode]
    print(json.dumps(run(tmp)))


if __name__ == "__main__":
    _child_main()
