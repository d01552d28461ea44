"""TrainConfig validation, the learning-rate schedule, sharding rules and device carving."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from merit_jax.train.config import TrainConfig
from merit_jax.train.mesh import carve_submeshes, param_partition_spec
from merit_jax.train.step import learning_rate_schedule


def test_default_config_is_valid():
    config = TrainConfig()
    assert config.micro_batch_size == 8
    assert TrainConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"learning_rate": 0.0}, "learning_rate=0.0 must be a positive number"),
        ({"learning_rate": math.nan}, "learning_rate=nan"),
        ({"schedule": "step"}, "schedule='step' is unknown"),
        (
            {"batch_size": 6, "micro_batches": 4},
            "batch_size=6 is not a multiple of micro_batches=4",
        ),
        ({"seq_len": 1}, "seq_len=1 must be at least 2"),
        ({"warmup_fraction": 1.5}, r"warmup_fraction=1.5 must lie in \[0, 1\]"),
        ({"adam_b2": 1.0}, r"adam_b2=1.0 must lie in \[0, 1\)"),
        ({"clip_norm": -1.0}, "clip_norm=-1.0 must be a positive number or None"),
        ({"checkpoint_every": -1}, "checkpoint_every=-1 must be a non-negative integer"),
        ({"param_dtype": "float64"}, "unknown dtype 'float64'"),
        ({"devices_per_branch": 3, "model_parallel": 2}, "devices_per_branch=3 is not a multiple"),
        ({"batch_size": True}, "batch_size=True must be a positive integer"),
    ],
)
def test_invalid_config_raises(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


def test_invalid_config_lists_every_problem():
    with pytest.raises(ValueError) as error:
        TrainConfig(learning_rate=-1.0, seq_len=0, schedule="nope")
    text = str(error.value)
    assert "learning_rate=-1.0" in text
    assert "seq_len=0" in text
    assert "schedule='nope'" in text


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lr'\]"):
        TrainConfig.from_dict({"lr": 1e-3})


def test_warmup_length():
    assert TrainConfig(warmup_fraction=0.1).warmup_for(95) == 10
    assert TrainConfig(warmup_steps=7).warmup_for(100) == 7
    assert TrainConfig(warmup_steps=70).warmup_for(50) == 50


def hand_schedule(kind: str, step: int, *, peak: float, end: float, warmup: int, total: int):
    if step < warmup:
        return peak * step / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    if kind == "cosine":
        return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "linear":
        return peak + (end - peak) * progress
    return peak


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_matches_hand_formula(kind):
    config = TrainConfig(
        learning_rate=3e-4, warmup_steps=4, schedule=kind, min_learning_rate_ratio=0.1
    )
    schedule = learning_rate_schedule(config, 20)
    for step in [0, 1, 3, 4, 5, 11, 19, 20, 25]:
        expected = hand_schedule(kind, step, peak=3e-4, end=3e-5, warmup=4, total=20)
        np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-6, atol=1e-12)


def test_cosine_schedule_endpoints():
    schedule = learning_rate_schedule(TrainConfig(learning_rate=1.0, warmup_steps=0), 10)
    assert float(schedule(0)) == pytest.approx(1.0)
    assert float(schedule(5)) == pytest.approx(0.5)
    assert float(schedule(10)) == pytest.approx(0.0, abs=1e-7)


def test_partition_spec_rules():
    # Replicated unless a flag turns sharding on.
    assert param_partition_spec((61, 16), data_size=4, model_size=1, fsdp=False) == P(None, None)
    # FSDP: the largest axis that the data size divides (61 is prime).
    assert param_partition_spec((61, 16), data_size=4, model_size=1, fsdp=True) == P(None, "data")
    assert param_partition_spec((2, 16, 24), data_size=4, model_size=1, fsdp=True) == P(
        None, None, "data"
    )
    # Ties go to the first axis.
    assert param_partition_spec((8, 8), data_size=2, model_size=1, fsdp=True) == P("data", None)
    # The model axis claims first, then data takes the largest remaining axis.
    assert param_partition_spec((2, 16, 24), data_size=2, model_size=2, fsdp=True) == P(
        None, "data", "model"
    )
    # Nothing divisible: replicated.
    assert param_partition_spec((61,), data_size=2, model_size=1, fsdp=True) == P(None)
    assert param_partition_spec((), data_size=2, model_size=1, fsdp=True) == P()


def test_carve_one_device_runs_branches_in_waves(caplog):
    device = jax.devices()[0]
    with caplog.at_level("WARNING", logger="merit_jax.train.mesh"):
        placements = carve_submeshes(3, [device])
    assert [p.wave for p in placements] == [0, 1, 2]
    assert [p.slot for p in placements] == [0, 0, 0]
    assert all(p.device_ids == frozenset({device.id}) for p in placements)
    assert all(dict(p.mesh.shape) == {"data": 1, "model": 1} for p in placements)
    assert "3 waves" in caplog.text


def test_carve_rejects_impossible_requests():
    devices = jax.devices()[:1]
    with pytest.raises(ValueError, match="needs 2 devices"):
        carve_submeshes(1, devices, devices_per_branch=2)
    with pytest.raises(ValueError, match="num_branches=0"):
        carve_submeshes(0, devices)
    with pytest.raises(ValueError, match="without repeats"):
        carve_submeshes(1, devices + devices)
