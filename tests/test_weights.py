"""Key map, safetensors reading and the errors of weight loading."""

from __future__ import annotations

import hashlib
import json
import re

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from merit_jax.models import pretrained as pretrained_module
from merit_jax.models.config import ModelConfig
from merit_jax.models.decoder import init_decoder
from merit_jax.models.pretrained import load_pretrained, weights_content_hash
from merit_jax.models.weights import (
    KEY_MAP,
    WeightsError,
    decoder_from_hf,
    hf_from_decoder,
    read_safetensors_dir,
)

TINY = dict(
    vocab_size=37,
    hidden_size=20,
    intermediate_size=29,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=6,
)


def tiny_config(model_type: str = "llama", **changes) -> ModelConfig:
    fields = dict(TINY, model_type=model_type, attention_bias=model_type == "qwen2")
    fields.update(changes)
    return ModelConfig(**fields)


def random_hf_tensors(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Hugging Face-named tensors of the right shapes, every value random."""
    tensors = hf_from_decoder(init_decoder(config, seed=seed))
    rng = np.random.default_rng(seed)
    return {key: rng.standard_normal(a.shape).astype(np.float32) for key, a in tensors.items()}


def write_hf_dir(directory, config: ModelConfig, tensors: dict[str, np.ndarray]):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config.to_hf_dict()))
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def flat_params(model) -> dict[tuple[str, ...], np.ndarray]:
    return {
        tuple(str(p) for p in path): np.asarray(v.get_value())
        for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


# --------------------------------------------------------------------------- key map


@pytest.mark.parametrize(
    "model_type,tied", [("llama", True), ("llama", False), ("qwen2", True), ("qwen2", False)]
)
def test_key_map_round_trip_is_exact(model_type, tied):
    config = tiny_config(model_type, tie_word_embeddings=tied)
    tensors = random_hf_tensors(config)

    model = decoder_from_hf(config, tensors)
    back = hf_from_decoder(model)

    assert list(back) == list(tensors)
    assert ("lm_head.weight" in back) == (not tied)
    assert ("model.layers.2.self_attn.q_proj.bias" in back) == (model_type == "qwen2")
    for key, array in tensors.items():
        np.testing.assert_array_equal(back[key], array, err_msg=key)


def test_key_map_layout_by_hand():
    config = tiny_config("qwen2", tie_word_embeddings=False)
    tensors = random_hf_tensors(config, seed=3)
    params = flat_params(decoder_from_hf(config, tensors))
    n, h = config.num_attention_heads, config.head_dim
    q_w = tensors["model.layers.1.self_attn.q_proj.weight"]  # [N*H, D]
    k_b = tensors["model.layers.2.self_attn.k_proj.bias"]  # [K*H]
    o_w = tensors["model.layers.0.self_attn.o_proj.weight"]  # [D, N*H]
    gate = tensors["model.layers.1.mlp.gate_proj.weight"]  # [F, D]
    head = tensors["lm_head.weight"]  # [V, D]

    for d, head_index, h_index in [(0, 0, 0), (5, 3, 4), (19, 2, 5)]:
        row = head_index * h + h_index
        assert params[("layers", "attn", "q_kernel")][1, d, head_index, h_index] == q_w[row, d]
        assert params[("layers", "attn", "o_kernel")][0, head_index, h_index, d] == o_w[d, row]
    assert params[("layers", "attn", "k_bias")][2, 1, 4] == k_b[1 * h + 4]
    assert params[("layers", "mlp", "gate_kernel")][1, 7, 11] == gate[11, 7]
    assert params[("lm_head",)][3, 30] == head[30, 3]
    assert params[("layers", "attn", "q_kernel")].shape == (3, 20, n, h)


def test_every_decoder_param_has_a_rule():
    for model_type in ("llama", "qwen2"):
        for tied in (True, False):
            config = tiny_config(model_type, tie_word_embeddings=tied)
            params = set(flat_params(init_decoder(config)))
            rules = {rule.param for rule in KEY_MAP if rule.applies(config)}
            assert params == rules


def test_loads_in_param_dtype():
    config = tiny_config("llama", param_dtype="bfloat16")
    tensors = random_hf_tensors(config)
    params = flat_params(decoder_from_hf(config, tensors))

    embed = params[("embed",)]
    assert embed.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(
        embed, tensors["model.embed_tokens.weight"].astype(ml_dtypes.bfloat16)
    )


# --------------------------------------------------------------------------- mismatches


def test_all_mismatches_listed_at_once():
    config = tiny_config("llama", tie_word_embeddings=False)
    tensors = random_hf_tensors(config)
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    tensors["model.layers.0.mlp.up_proj.weight"] = np.zeros((28, 20), np.float32)
    tensors["lm_head.weight"] = np.zeros((20, 37), np.float32)
    tensors["model.layers.0.self_attn.q_norm.weight"] = np.zeros((6,), np.float32)

    with pytest.raises(WeightsError) as info:
        decoder_from_hf(config, tensors, source="/ckpt/model.safetensors")
    message = str(info.value)

    assert "/ckpt/model.safetensors" in message
    assert "4 problem(s)" in message
    assert "missing key model.layers.1.self_attn.v_proj.weight (expected shape [12, 20])" in message
    assert "key model.layers.0.mlp.up_proj.weight has shape [28, 20], expected [29, 20]" in message
    assert "key lm_head.weight has shape [20, 37], expected [37, 20]" in message
    assert "unexpected key model.layers.0.self_attn.q_norm.weight with shape [6]" in message
    assert "Fix:" in message


def test_config_mismatch_names_shape_and_file(tmp_path):
    config = tiny_config("llama")
    write_hf_dir(tmp_path, config, random_hf_tensors(config))
    hf = config.to_hf_dict()
    hf["intermediate_size"] = 30
    (tmp_path / "config.json").write_text(json.dumps(hf))

    with pytest.raises(WeightsError) as info:
        load_pretrained(tmp_path, with_tokenizer=False)
    message = str(info.value)

    assert "9 problem(s)" in message  # gate, up and down in each of 3 layers
    for i in range(3):
        assert (
            f"key model.layers.{i}.mlp.down_proj.weight in model.safetensors has shape "
            "[20, 29], expected [20, 30]"
        ) in message
    assert "intermediate_size=30" in message


def test_tied_head_copy_accepted_only_if_identical():
    config = tiny_config("llama", tie_word_embeddings=True)
    tensors = random_hf_tensors(config)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(3, np.float32)
    decoder_from_hf(config, tensors)  # both extra keys are harmless

    tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1.0
    with pytest.raises(WeightsError, match=r"unexpected key lm_head\.weight"):
        decoder_from_hf(config, tensors)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["GPT2LMHeadModel"],
                "model_type": "gpt2",
                "vocab_size": 10,
                "n_embd": 8,
            }
        )
    )
    save_file({"wte.weight": np.zeros((10, 8), np.float32)}, str(tmp_path / "model.safetensors"))

    with pytest.raises(ValueError, match=r"unsupported architecture.*GPT2LMHeadModel"):
        load_pretrained(tmp_path, with_tokenizer=False)


# --------------------------------------------------------------------------- files


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "absent"))):
        read_safetensors_dir(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=r"model path not found: .*absent\.gguf"):
        load_pretrained(str(tmp_path / "absent.gguf"), with_tokenizer=False)
    with pytest.raises(FileNotFoundError, match=r"model path not found: \./absent-dir"):
        load_pretrained("./absent-dir", with_tokenizer=False)


def test_missing_config_and_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        read_safetensors_dir(tmp_path)
    config = tiny_config()
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    with pytest.raises(FileNotFoundError, match=r"no weights found in .*model\.safetensors"):
        read_safetensors_dir(tmp_path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"not weights")
    with pytest.raises(ValueError, match=r"not a \.gguf checkpoint"):
        load_pretrained(path, with_tokenizer=False)


def test_corrupt_header_names_file(tmp_path):
    config = tiny_config()
    write_hf_dir(tmp_path, config, random_hf_tensors(config))
    path = tmp_path / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"{not json at all, just garbage!!"
    path.write_bytes(bytes(data))

    with pytest.raises(WeightsError) as info:
        read_safetensors_dir(tmp_path)
    message = str(info.value)
    assert str(path) in message
    assert "download the checkpoint again" in message


def test_truncated_file_names_file(tmp_path):
    config = tiny_config()
    write_hf_dir(tmp_path, config, random_hf_tensors(config))
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])

    with pytest.raises(WeightsError, match=re.escape(str(path))):
        read_safetensors_dir(tmp_path)


def write_sharded(directory, config, tensors, shard_count: int) -> dict[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config.to_hf_dict()))
    keys = list(tensors)
    weight_map = {}
    for number, chunk in enumerate(np.array_split(np.arange(len(keys)), shard_count), start=1):
        name = f"model-{number:05d}-of-{shard_count:05d}.safetensors"
        save_file({keys[i]: tensors[keys[i]] for i in chunk}, str(directory / name))
        weight_map.update({keys[i]: name for i in chunk})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return weight_map


def test_sharded_dir_round_trip(tmp_path):
    config = tiny_config("qwen2", tie_word_embeddings=False)
    tensors = random_hf_tensors(config)
    weight_map = write_sharded(tmp_path, config, tensors, shard_count=3)

    checkpoint = read_safetensors_dir(tmp_path)
    assert [p.name for p in checkpoint.files] == sorted(set(weight_map.values()))
    assert checkpoint.key_files["lm_head.weight"].name == weight_map["lm_head.weight"]
    assert set(checkpoint.tensors) == set(tensors)

    loaded = load_pretrained(tmp_path, with_tokenizer=False)
    back = hf_from_decoder(loaded.model)
    for key, array in tensors.items():
        np.testing.assert_array_equal(back[key], array, err_msg=key)
    assert loaded.weight_files == checkpoint.files


def test_missing_shard_listed(tmp_path):
    config = tiny_config()
    write_sharded(tmp_path, config, random_hf_tensors(config), shard_count=3)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()

    with pytest.raises(FileNotFoundError, match=r"1 are not in .*model-00002-of-00003"):
        read_safetensors_dir(tmp_path)


def test_index_naming_absent_tensor(tmp_path):
    config = tiny_config()
    write_sharded(tmp_path, config, random_hf_tensors(config), shard_count=2)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.extra.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))

    with pytest.raises(WeightsError, match=r"model-00001-of-00002.*lacks tensors.*model\.extra"):
        read_safetensors_dir(tmp_path)


def test_only_pickle_weights_rejected(tmp_path):
    config = tiny_config()
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    # Never unpickled: any byte content must give the same error.
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 not read")

    with pytest.raises(WeightsError) as info:
        load_pretrained(tmp_path, with_tokenizer=False)
    message = str(info.value)
    assert "pytorch_model.bin" in message
    assert "never loads pickle" in message
    assert "save_pretrained" in message


def test_bf16_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=37,
        hidden_size=20,
        intermediate_size=29,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=6,
    )
    model = transformers.LlamaForCausalLM(hf_config).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    expected = {
        name: p.detach().float().numpy()
        for name, p in model.state_dict().items()
        if "rotary" not in name
    }

    checkpoint = read_safetensors_dir(tmp_path)
    embed = checkpoint.tensors["model.embed_tokens.weight"]
    assert embed.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(embed.astype(np.float32), expected["model.embed_tokens.weight"])

    for dtype, np_dtype in [("bfloat16", ml_dtypes.bfloat16), ("float32", np.float32)]:
        loaded = load_pretrained(tmp_path, param_dtype=dtype, with_tokenizer=False)
        back = hf_from_decoder(loaded.model)
        assert back["model.layers.1.mlp.down_proj.weight"].dtype == np_dtype
        for key, array in expected.items():
            np.testing.assert_array_equal(back[key].astype(np.float32), array, err_msg=key)


# --------------------------------------------------------------------------- pretrained


def test_weights_hash_is_content_based(tmp_path):
    config = tiny_config()
    tensors = random_hf_tensors(config)
    first = write_hf_dir(tmp_path / "a", config, tensors)
    second = write_hf_dir(tmp_path / "b", config, tensors)
    file_digest = hashlib.sha256((first / "model.safetensors").read_bytes()).hexdigest()

    loaded = load_pretrained(first, with_tokenizer=False)
    assert loaded.weights_sha256 == hashlib.sha256(file_digest.encode()).hexdigest()
    assert load_pretrained(second, with_tokenizer=False).weights_sha256 == loaded.weights_sha256

    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1
    write_hf_dir(tmp_path / "c", config, tensors)
    changed = weights_content_hash([tmp_path / "c" / "model.safetensors"])
    assert changed != loaded.weights_sha256


def test_hub_id_uses_snapshot_download(tmp_path, monkeypatch):
    import huggingface_hub

    config = tiny_config("qwen2")
    tensors = random_hf_tensors(config)
    local = write_hf_dir(tmp_path / "snapshot", config, tensors)
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    loaded = load_pretrained("someone/tiny-qwen", with_tokenizer=False)

    assert calls == [("someone/tiny-qwen", pretrained_module.HUB_ALLOW_PATTERNS)]
    assert "*.safetensors" in calls[0][1]
    assert not any(pattern.endswith((".bin", ".pt")) for pattern in calls[0][1])
    assert loaded.source == local
    assert loaded.config.model_type == "qwen2"
    np.testing.assert_array_equal(
        hf_from_decoder(loaded.model)["model.norm.weight"], tensors["model.norm.weight"]
    )


def test_hub_failure_explains_reference(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, allow_patterns=None, **kwargs):
        raise LocalEntryNotFoundError("cannot reach the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError) as info:
        load_pretrained("someone/absent-model", with_tokenizer=False)
    message = str(info.value)
    assert "'someone/absent-model'" in message
    assert "smollm2-135m-instruct" in message
    assert "cannot reach the hub" in message


def test_loaded_model_runs():
    config = tiny_config("llama")
    model = decoder_from_hf(config, random_hf_tensors(config))
    logits, _ = model(jax.numpy.zeros((1, 4), jax.numpy.int32))
    assert logits.shape == (1, 4, 37)
    assert np.isfinite(np.asarray(logits)).all()
