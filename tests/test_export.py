"""Hugging Face export: transformers loads it and computes our logits, and writes are atomic."""

from __future__ import annotations

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from merit_jax.models import export as export_module
from merit_jax.models.config import ModelConfig, RopeScaling
from merit_jax.models.decoder import init_decoder
from merit_jax.models.export import export_hf, parse_size, plan_shards
from merit_jax.models.pretrained import load_pretrained
from merit_jax.models.weights import decoder_from_hf, hf_from_decoder, read_safetensors_dir

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away"]
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    vocab.update({word: i + 3 for i, word in enumerate(WORDS)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        chat_template=CHATML,
    )


def tiny_config(model_type: str = "llama", **changes) -> ModelConfig:
    fields = dict(
        model_type=model_type,
        vocab_size=41,
        hidden_size=28,
        intermediate_size=45,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        rms_norm_eps=1e-5,
        rope_theta=1e4,
        attention_bias=model_type == "qwen2",
        bos_token_id=1,
        eos_token_id=2,
    )
    fields.update(changes)
    return ModelConfig(**fields)


def random_model(config: ModelConfig, seed: int = 0):
    """A decoder whose weights are large enough for logits to differ between positions."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for key, array in hf_from_decoder(init_decoder(config)).items():
        if "norm" in key:
            tensors[key] = (1 + 0.3 * rng.standard_normal(array.shape)).astype(np.float32)
        else:
            tensors[key] = (0.15 * rng.standard_normal(array.shape)).astype(np.float32)
    return decoder_from_hf(config, tensors)


def torch_logits(directory, tokens: np.ndarray) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(tokens).long()).logits.numpy()


CASES = {
    "llama_tied": ("llama", dict(tie_word_embeddings=True)),
    "qwen2_untied": ("qwen2", dict(tie_word_embeddings=False, eos_token_id=[2, 0])),
    "llama3_rope_scaling": (
        "llama",
        dict(
            rope_theta=5e5,
            rope_scaling=RopeScaling(
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=512,
            ),
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_transformers_loads_export_with_same_logits(case, tmp_path):
    model_type, changes = CASES[case]
    model = random_model(tiny_config(model_type, **changes))
    out = export_hf(model, tiny_tokenizer(), tmp_path / "export")
    tokens = np.random.default_rng(1).integers(0, 41, (2, 11))
    positions = 1000 + np.arange(11)

    expected = torch_logits(out, tokens)
    ours, _ = model(jnp.asarray(tokens))

    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4, rtol=0)
    # Far positions check that the RoPE settings survived the export.
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        far = torch_model(
            input_ids=torch.from_numpy(tokens).long(),
            position_ids=torch.from_numpy(np.broadcast_to(positions, tokens.shape).copy()),
        ).logits.numpy()
    ours_far, _ = model(jnp.asarray(tokens), positions_bt=jnp.asarray(positions)[None, :])
    np.testing.assert_allclose(np.asarray(ours_far), far, atol=1e-4, rtol=0)


def test_export_files_and_tokenizer(tmp_path):
    # A llama config: for model_type qwen2, transformers 5's AutoTokenizer swaps in its
    # own Qwen2 pre-tokenizer, which does not fit this word-level test vocabulary.
    config = tiny_config("llama", tie_word_embeddings=True)
    tokenizer = tiny_tokenizer()
    out = export_hf(random_model(config), tokenizer, tmp_path / "export")

    assert (out / "model.safetensors").is_file()
    assert not (out / "model.safetensors.index.json").exists()
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["architectures"] == ["LlamaForCausalLM"]
    assert hf_config["torch_dtype"] == "float32"
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["bos_token_id"] == 1
    assert generation["eos_token_id"] == 2
    assert "lm_head.weight" not in read_safetensors_dir(out).tensors

    reloaded = transformers.AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "the cat sat"}]
    assert reloaded.chat_template == CHATML
    assert reloaded.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\nthe cat sat<|im_end|>\n"
    )
    assert reloaded("the dog ran far")["input_ids"] == tokenizer("the dog ran far")["input_ids"]
    assert reloaded.eos_token == "<|im_end|>"


def test_sharded_export_has_index(tmp_path):
    model = random_model(tiny_config("llama", tie_word_embeddings=False))
    out = export_hf(model, None, tmp_path / "export", max_shard_size="10KB")

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard_names = sorted(set(index["weight_map"].values()))
    assert len(shard_names) > 2
    assert shard_names[0] == f"model-00001-of-{len(shard_names):05d}.safetensors"
    assert all((out / name).stat().st_size <= 10_000 + 4_096 for name in shard_names)
    assert not (out / "model.safetensors").exists()
    tensors = hf_from_decoder(model)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values())
    assert set(index["weight_map"]) == set(tensors)

    tokens = np.random.default_rng(2).integers(0, 41, (1, 7))
    ours, _ = model(jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(ours), torch_logits(out, tokens), atol=1e-4, rtol=0)
    reloaded = load_pretrained(out, with_tokenizer=False)
    for key, array in hf_from_decoder(reloaded.model).items():
        np.testing.assert_array_equal(array, tensors[key], err_msg=key)


def test_bfloat16_export(tmp_path):
    model = random_model(tiny_config("llama"))
    out = export_hf(model, None, tmp_path / "export", dtype="bfloat16")

    stored = read_safetensors_dir(out).tensors
    assert stored["model.norm.weight"].dtype == ml_dtypes.bfloat16
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch_model.dtype == torch.bfloat16
    ours = hf_from_decoder(model)["model.layers.1.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(
        torch_model.model.layers[1].self_attn.q_proj.weight.float().detach().numpy(),
        ours.astype(ml_dtypes.bfloat16).astype(np.float32),
    )


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    model = random_model(tiny_config("llama"))
    calls = []
    real_write = export_module._write_shard

    def failing_write(path, tensors):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real_write(path, tensors)

    monkeypatch.setattr(export_module, "_write_shard", failing_write)
    with pytest.raises(OSError, match="disk full"):
        export_hf(model, None, tmp_path / "export", max_shard_size="10KB")

    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_old_export(tmp_path, monkeypatch):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("old")

    def failing_tokenizer_save(directory):
        raise RuntimeError("tokenizer save failed")

    tokenizer = tiny_tokenizer()
    monkeypatch.setattr(tokenizer, "save_pretrained", failing_tokenizer_save)
    with pytest.raises(RuntimeError, match="tokenizer save failed"):
        export_hf(random_model(tiny_config()), tokenizer, out, overwrite=True)

    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_refuses_to_overwrite(tmp_path):
    model = random_model(tiny_config("llama"))
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")

    with pytest.raises(FileExistsError) as info:
        export_hf(model, None, out)
    assert str(out) in str(info.value)
    assert "overwrite=True" in str(info.value)
    assert (out / "notes.txt").read_text() == "keep me"

    export_hf(model, None, out, overwrite=True)
    assert not (out / "notes.txt").exists()
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_empty_target_dir_is_used(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    export_hf(random_model(tiny_config()), None, out)
    assert (out / "config.json").is_file()


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1GiB") == 2**30
    assert parse_size("1.5 kb") == 1500
    assert parse_size(1234) == 1234
    for bad in ("two GB", "5XB", 0, "0MB", -3):
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_size(bad)


def test_plan_shards_keeps_order_and_limit():
    tensors = {
        name: np.zeros(n, np.float32) for name, n in [("a", 3), ("b", 3), ("c", 10), ("d", 1)]
    }
    assert plan_shards(tensors, 24) == [["a", "b"], ["c"], ["d"]]
    assert plan_shards(tensors, 1000) == [["a", "b", "c", "d"]]


def test_rejects_unknown_dtype(tmp_path):
    with pytest.raises(ValueError, match="dtype='int8'"):
        export_hf(random_model(tiny_config()), None, tmp_path / "x", dtype="int8")
