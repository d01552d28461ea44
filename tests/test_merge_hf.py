"""Safetensors reading and writing, and the merge of Hugging Face model directories."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from merit_jax.merge import hf as hf_module
from merit_jax.merge.errors import MergeError
from merit_jax.merge.hf import merge_hf_dirs
from merit_jax.merge.operators import MERGE_OPERATORS, register_operator
from merit_jax.merge.safetensors_io import (
    SafetensorsFile,
    SafetensorsFormatError,
    SafetensorsWriter,
    read_header,
)

SHAPES = {
    "model.embed_tokens.weight": (11, 6),
    "model.layers.0.self_attn.q_proj.weight": (6, 6),
    "model.layers.0.mlp.down_proj.weight": (6, 9),
    "model.layers.0.input_layernorm.weight": (6,),
    "model.norm.weight": (6,),
}
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 6}


def random_tensors(seed, dtype=np.float32, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return {key: rng.standard_normal(shape).astype(dtype) for key, shape in shapes.items()}


def write_model(directory, tensors, *, config=CONFIG, shards=None):
    """Write a model directory; ``shards`` maps file name -> keys (an index is written)."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "tokenizer.json").write_text('{"model": "word-level"}')
    (directory / "generation_config.json").write_text('{"eos_token_id": 2}')
    if shards is None:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory
    for name, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(directory / name))
    weight_map = {key: name for name, keys in shards.items() for key in keys}
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def read_model(directory):
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def reference(models, weights):
    return {
        key: sum(w * m[key].astype(np.float64) for w, m in zip(weights, models, strict=True))
        for key in models[0]
    }


@pytest.fixture()
def three_models(tmp_path):
    tensors = [random_tensors(seed) for seed in range(3)]
    dirs = [write_model(tmp_path / f"in{k}", t) for k, t in enumerate(tensors)]
    return dirs, tensors


# --------------------------------------------------------------------------- safetensors I/O


def mixed_tensors():
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f16": rng.standard_normal((4,)).astype(np.float16),
        "bf16": rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16),
        "i64": np.arange(7, dtype=np.int64),
        "bool": np.array([True, False, True]),
        "scalar": np.array(3.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }


def test_reader_views_equal_safetensors(tmp_path):
    tensors = mixed_tensors()
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    expected = load_file(str(tmp_path / "x.safetensors"))

    with SafetensorsFile(tmp_path / "x.safetensors") as file:
        assert file.metadata == {"format": "pt"}
        assert set(file.tensors) == set(tensors)
        for key, array in expected.items():
            view = file.view(key)
            assert view.dtype == array.dtype, key
            assert view.shape == array.shape, key
            np.testing.assert_array_equal(view, array)
        assert not file.view("f32").flags.writeable


def test_writer_output_loads_in_safetensors(tmp_path):
    tensors = mixed_tensors()
    specs = {key: (array.dtype, array.shape) for key, array in tensors.items()}
    with SafetensorsWriter(tmp_path / "y.safetensors", specs, metadata={"format": "pt"}) as out:
        for key, array in tensors.items():
            out.write(key, array)

    loaded = load_file(str(tmp_path / "y.safetensors"))
    for key, array in tensors.items():
        assert loaded[key].dtype == array.dtype, key
        np.testing.assert_array_equal(loaded[key], array)
    with safe_open(str(tmp_path / "y.safetensors"), framework="np") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_writer_rejects_out_of_order_and_misshapen(tmp_path):
    specs = {"a": (np.float32, (2,)), "b": (np.float32, (3,))}
    with SafetensorsWriter(tmp_path / "z.safetensors", specs) as out:
        with pytest.raises(ValueError, match="expected 'a' next"):
            out.write("b", np.zeros(3, np.float32))
        with pytest.raises(ValueError, match="declares float32 \\[2\\]"):
            out.write("a", np.zeros(3, np.float32))
        out.write("a", np.zeros(2, np.float32))
        out.write("b", np.zeros(3, np.float32))


def test_writer_raises_when_incomplete(tmp_path):
    specs = {"a": (np.float32, (2,)), "b": (np.float32, (3,))}
    with pytest.raises(RuntimeError, match="never written"):
        with SafetensorsWriter(tmp_path / "z.safetensors", specs) as out:
            out.write("a", np.zeros(2, np.float32))


def test_reader_rejects_truncated_file(tmp_path):
    save_file(mixed_tensors(), str(tmp_path / "x.safetensors"))
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    (tmp_path / "tiny.safetensors").write_bytes(data[:5])

    with pytest.raises(SafetensorsFormatError, match="cut.safetensors.*data_offsets"):
        read_header(tmp_path / "cut.safetensors")
    with pytest.raises(SafetensorsFormatError, match="tiny.safetensors.*fewer than"):
        read_header(tmp_path / "tiny.safetensors")


# --------------------------------------------------------------------------- merge


def test_explicit_weights_match_float64_reference(three_models, tmp_path):
    dirs, tensors = three_models
    weights = [0.2, 0.5, 0.3]

    result = merge_hf_dirs(dirs, tmp_path / "out", weights=weights)

    merged = read_model(tmp_path / "out")
    expected = reference(tensors, weights)
    assert set(merged) == set(expected)
    for key in expected:
        assert merged[key].dtype == np.float32
        np.testing.assert_allclose(merged[key], expected[key], rtol=1e-6, atol=1e-7)
    assert result.num_tensors == len(SHAPES)
    assert result.num_parameters == sum(a.size for a in tensors[0].values())


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_chunked_merge_equals_whole_tensor_merge(three_models, tmp_path, monkeypatch, dtype):
    dirs, _ = three_models
    weights = [0.2, 0.5, 0.3]
    merge_hf_dirs(dirs, tmp_path / "whole", weights=weights, dtype=dtype)
    # 7 divides none of the tensor sizes, so every tensor ends in a partial slice.
    monkeypatch.setattr(hf_module, "CHUNK_ELEMENTS", 7)

    merge_hf_dirs(dirs, tmp_path / "chunked", weights=weights, dtype=dtype)

    whole = read_model(tmp_path / "whole")
    chunked = read_model(tmp_path / "chunked")
    for key in whole:
        np.testing.assert_array_equal(chunked[key], whole[key])


def test_whole_tensor_operator_gets_whole_tensors(three_models, tmp_path):
    dirs, tensors = three_models
    shapes = []

    @register_operator("test-whole")
    class WholeMean:
        name = "test-whole"
        elementwise = False

        def __init__(self, weights):
            self.count = len(weights)

        def merge_leaf(self, read, out):
            shapes.append(out.shape)
            out[...] = np.mean([read(k) for k in range(self.count)], axis=0)

        def describe(self):
            return {"method": self.name}

    try:
        merge_hf_dirs(dirs, tmp_path / "out", method="test-whole")
    finally:
        MERGE_OPERATORS.pop("test-whole", None)

    assert sorted(shapes) == sorted(SHAPES.values())
    merged = read_model(tmp_path / "out")
    for key, value in reference(tensors, [1 / 3] * 3).items():
        np.testing.assert_allclose(merged[key], value, rtol=1e-6, atol=1e-7)


def test_uniform_weights_match_reference(three_models, tmp_path):
    dirs, tensors = three_models

    merge_hf_dirs(dirs, tmp_path / "out", weights="uniform")

    merged = read_model(tmp_path / "out")
    expected = reference(tensors, [1 / 3] * 3)
    for key in expected:
        np.testing.assert_allclose(merged[key], expected[key], rtol=1e-6, atol=1e-7)


def test_bfloat16_output(three_models, tmp_path):
    dirs, _ = three_models
    weights = [0.2, 0.5, 0.3]
    merge_hf_dirs(dirs, tmp_path / "f32", weights=weights)

    merge_hf_dirs(dirs, tmp_path / "bf16", weights=weights, dtype="bfloat16")

    full = read_model(tmp_path / "f32")
    half = read_model(tmp_path / "bf16")
    for key in full:
        assert half[key].dtype == ml_dtypes.bfloat16
        # The float32 merge rounded once to bfloat16, not a bfloat16 accumulation.
        np.testing.assert_array_equal(half[key], full[key].astype(ml_dtypes.bfloat16))
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    assert config["dtype"] == "bfloat16"


def test_bfloat16_inputs_keep_dtype(tmp_path):
    tensors = [random_tensors(seed, ml_dtypes.bfloat16) for seed in range(2)]
    dirs = [write_model(tmp_path / f"in{k}", t) for k, t in enumerate(tensors)]

    merge_hf_dirs(dirs, tmp_path / "out", weights=[0.75, 0.25])

    merged = read_model(tmp_path / "out")
    expected = reference(tensors, [0.75, 0.25])
    for key in expected:
        assert merged[key].dtype == ml_dtypes.bfloat16
        rounded = expected[key].astype(np.float32).astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(merged[key], rounded)


def test_sharded_inputs_keep_shard_layout(tmp_path):
    keys = list(SHAPES)
    shards = {
        "model-00001-of-00002.safetensors": keys[:2],
        "model-00002-of-00002.safetensors": keys[2:],
    }
    tensors = [random_tensors(seed) for seed in range(2)]
    dirs = [write_model(tmp_path / f"in{k}", t, shards=shards) for k, t in enumerate(tensors)]

    merge_hf_dirs(dirs, tmp_path / "out", weights=[0.4, 0.6])

    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {k: n for n, ks in shards.items() for k in ks}
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors[0].values())
    for name, shard_keys in shards.items():
        assert sorted(load_file(str(tmp_path / "out" / name))) == sorted(shard_keys)
    merged = read_model(tmp_path / "out")
    expected = reference(tensors, [0.4, 0.6])
    for key in expected:
        np.testing.assert_allclose(merged[key], expected[key], rtol=1e-6, atol=1e-7)


def test_output_files_and_merge_json(three_models, tmp_path):
    dirs, _ = three_models

    merge_hf_dirs(dirs, tmp_path / "out", weights=[0.2, 0.5, 0.3])

    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "merge.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert json.loads((out / "config.json").read_text()) == CONFIG
    record = json.loads((out / "merge.json").read_text())
    assert record["method"] == "linear"
    assert record["weighting"] == "explicit"
    assert record["weights"] == [0.2, 0.5, 0.3]
    assert record["inputs"] == [str(d) for d in dirs]
    assert record["dtype"] is None


def test_mismatches_listed_together(tmp_path):
    base = random_tensors(0)
    missing = random_tensors(1)
    del missing["model.norm.weight"]
    extra = {**random_tensors(2), "model.extra.weight": np.zeros(3, np.float32)}
    shapes = {**SHAPES, "model.layers.0.mlp.down_proj.weight": (6, 10)}
    misshapen = random_tensors(3, shapes=shapes)
    retyped = random_tensors(4)
    retyped["model.norm.weight"] = retyped["model.norm.weight"].astype(np.float16)
    dirs = [
        write_model(tmp_path / "base", base),
        write_model(tmp_path / "missing", missing),
        write_model(tmp_path / "extra", extra),
        write_model(tmp_path / "misshapen", misshapen, config={**CONFIG, "hidden_size": 7}),
        write_model(tmp_path / "retyped", retyped),
    ]

    with pytest.raises(MergeError) as raised:
        merge_hf_dirs(dirs, tmp_path / "out")

    text = "\n".join(raised.value.problems)
    assert len(raised.value.problems) == 5, text
    assert "missing: tensor model.norm.weight is missing" in text
    assert "extra: unexpected tensor model.extra.weight" in text
    assert "misshapen: tensor model.layers.0.mlp.down_proj.weight has shape [6, 10]" in text
    assert "misshapen: config.json hidden_size = 7" in text
    assert "retyped: tensor model.norm.weight is float16, expected float32" in text
    assert not (tmp_path / "out").exists()


def test_integer_tensor_rejected(tmp_path):
    tensors = [{**random_tensors(k), "counter": np.arange(3)} for k in range(2)]
    dirs = [write_model(tmp_path / f"in{k}", t) for k, t in enumerate(tensors)]

    with pytest.raises(MergeError, match="counter is int64, not a float"):
        merge_hf_dirs(dirs, tmp_path / "out")


def test_refuses_to_overwrite(three_models, tmp_path):
    dirs, tensors = three_models
    merge_hf_dirs(dirs, tmp_path / "out", weights="uniform")

    with pytest.raises(FileExistsError, match="overwrite=True"):
        merge_hf_dirs(dirs, tmp_path / "out", weights=[1.0, 0.0, 0.0])

    merge_hf_dirs(dirs, tmp_path / "out", weights=[1.0, 0.0, 0.0], overwrite=True)
    merged = read_model(tmp_path / "out")
    for key, array in tensors[0].items():
        np.testing.assert_array_equal(merged[key], array)


def test_failed_merge_leaves_no_output(three_models, tmp_path, monkeypatch):
    dirs, _ = three_models
    calls = []
    original = hf_module.SafetensorsWriter.write_chunks

    def failing_write(self, name, chunks):
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError("simulated crash mid-merge")
        original(self, name, chunks)

    monkeypatch.setattr(hf_module.SafetensorsWriter, "write_chunks", failing_write)

    with pytest.raises(RuntimeError, match="simulated crash"):
        merge_hf_dirs(dirs, tmp_path / "out")

    assert len(calls) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in0", "in1", "in2"]


def test_missing_weights_reported(tmp_path):
    directory = tmp_path / "empty"
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    (directory / "pytorch_model.bin").write_bytes(b"")

    with pytest.raises(FileNotFoundError, match="no safetensors weights"):
        merge_hf_dirs([directory], tmp_path / "out")
