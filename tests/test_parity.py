"""Logits and gradient parity with transformers' PyTorch Llama and Qwen2 models.

Each case builds a tiny random PyTorch model with odd sizes and grouped-query
attention, saves it with ``save_pretrained`` (safetensors), loads the directory
with ``load_pretrained`` and compares float32 logits at model-parity tolerance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from merit_jax.models.pretrained import load_pretrained  # noqa: E402
from merit_jax.models.weights import KEY_MAP, decoder_from_hf, hf_from_decoder  # noqa: E402

ATOL = 1e-4

# Odd vocabulary, hidden and MLP sizes; 6 query heads share 2 key/value heads.
TINY = dict(
    vocab_size=101,
    hidden_size=36,
    intermediate_size=71,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
)
# Wavelengths of the three RoPE frequencies (head_dim 6, theta 5e5) are about 6,
# 500 and 39,000 positions. With these bounds (128 and 512) they land in the
# kept, interpolated and scaled bands of llama3 scaling.
LLAMA3_SCALING = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=512,
)

CASES = {
    "llama_untied": ("llama", dict(tie_word_embeddings=False)),
    "llama_tied": ("llama", dict(tie_word_embeddings=True, rope_theta=1e5)),
    "llama3_rope_scaling": (
        "llama",
        dict(tie_word_embeddings=False, rope_theta=5e5, rope_scaling=LLAMA3_SCALING),
    ),
    "qwen2_tied": ("qwen2", dict(tie_word_embeddings=True, rope_theta=1e6)),
    "qwen2_untied": ("qwen2", dict(tie_word_embeddings=False)),
}


def make_torch_model(family: str, **overrides):
    """Build a random float32 PyTorch model whose every parameter differs from its default init."""
    torch.manual_seed(0)
    fields = {**TINY, **overrides}
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**fields))
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Norm scales away from 1 and non-zero biases, so a swapped or dropped
            # tensor changes the logits.
            if "norm" in name:
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.5 * torch.randn_like(param))
            else:
                param.copy_(0.15 * torch.randn_like(param))
    return model.float().eval()


def save_and_load(model, tmp_path, **load_options):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    return load_pretrained(tmp_path, with_tokenizer=False, **load_options)


def torch_logits(model, tokens: np.ndarray, **kwargs) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(tokens).long(), **kwargs)
    return out.logits.float().numpy()


def random_tokens(batch: int, length: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, TINY["vocab_size"], (batch, length))


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    family, overrides = CASES[case]
    torch_model = make_torch_model(family, **overrides)
    loaded = save_and_load(torch_model, tmp_path)
    assert loaded.config.model_type == family
    assert loaded.config.tie_word_embeddings == overrides["tie_word_embeddings"]
    tokens = random_tokens(2, 13)

    ours, _ = loaded.model(jnp.asarray(tokens))
    expected = torch_logits(torch_model, tokens)

    assert ours.shape == expected.shape
    np.testing.assert_allclose(np.asarray(ours), expected, atol=ATOL, rtol=0)


def test_llama3_scaling_at_large_positions(tmp_path):
    """Far positions make the scaled low frequencies matter; plain RoPE must not match."""
    torch_model = make_torch_model("llama", **CASES["llama3_rope_scaling"][1])
    loaded = save_and_load(torch_model, tmp_path)
    assert loaded.config.rope_scaling is not None
    tokens = random_tokens(1, 11)
    positions = 3000 + np.arange(11)[None, :]

    ours, _ = loaded.model(jnp.asarray(tokens), positions_bt=jnp.asarray(positions))
    expected = torch_logits(torch_model, tokens, position_ids=torch.from_numpy(positions))
    np.testing.assert_allclose(np.asarray(ours), expected, atol=ATOL, rtol=0)

    unscaled = decoder_from_hf(
        loaded.config.replace(rope_scaling=None), hf_from_decoder(loaded.model)
    )
    plain, _ = unscaled(jnp.asarray(tokens), positions_bt=jnp.asarray(positions))
    assert np.abs(np.asarray(plain) - expected).max() > 100 * ATOL


@pytest.mark.parametrize("case", ["llama_untied", "qwen2_tied"])
def test_right_padding_matches_attention_mask(case, tmp_path):
    family, overrides = CASES[case]
    torch_model = make_torch_model(family, **overrides)
    loaded = save_and_load(torch_model, tmp_path)
    tokens = random_tokens(3, 9, seed=2)
    mask = np.ones((3, 9), np.int64)
    mask[1, 6:] = 0
    mask[2, 3:] = 0

    ours, _ = loaded.model(jnp.asarray(tokens), segment_ids_bt=jnp.asarray(mask, jnp.int32))
    expected = torch_logits(torch_model, tokens, attention_mask=torch.from_numpy(mask))

    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[real], expected[real], atol=ATOL, rtol=0)


def test_packed_segments_match_separate_sequences(tmp_path):
    torch_model = make_torch_model("qwen2", **CASES["qwen2_untied"][1])
    loaded = save_and_load(torch_model, tmp_path)
    first, second = random_tokens(1, 5, seed=3), random_tokens(1, 7, seed=4)
    packed = np.concatenate([first, second, np.zeros((1, 2), np.int64)], axis=1)
    segments = np.array([[1] * 5 + [2] * 7 + [0] * 2], np.int32)
    positions = np.array([list(range(5)) + list(range(7)) + [0, 0]], np.int32)

    ours, _ = loaded.model(
        jnp.asarray(packed),
        segment_ids_bt=jnp.asarray(segments),
        positions_bt=jnp.asarray(positions),
    )
    ours = np.asarray(ours)

    np.testing.assert_allclose(ours[:, :5], torch_logits(torch_model, first), atol=ATOL, rtol=0)
    np.testing.assert_allclose(ours[:, 5:12], torch_logits(torch_model, second), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "options",
    [
        dict(scan_layers=False),
        dict(scan_layers=True, remat=True),
        dict(scan_layers=False, remat=True),
    ],
    ids=["unrolled", "scan_remat", "unrolled_remat"],
)
def test_layer_modes_give_same_logits(options, tmp_path):
    torch_model = make_torch_model("llama", **CASES["llama_untied"][1])
    reference = save_and_load(torch_model, tmp_path)
    variant = load_pretrained(tmp_path, with_tokenizer=False, **options)
    assert variant.config.scan_layers == options["scan_layers"]
    assert variant.config.remat == options.get("remat", False)
    tokens = jnp.asarray(random_tokens(2, 10))

    expected, _ = reference.model(tokens)
    ours, _ = variant.model(tokens)

    np.testing.assert_allclose(np.asarray(ours), np.asarray(expected), atol=1e-5, rtol=0)


def _jax_loss_and_grads(model, tokens: np.ndarray):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params):
        logits, _ = nnx.merge(graphdef, params, rest)(jnp.asarray(tokens[:, :-1]))
        logp = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(logp, jnp.asarray(tokens[:, 1:])[..., None], axis=-1)
        return -picked.mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    flat = {
        tuple(str(p) for p in path): np.asarray(v.get_value())
        for path, v in nnx.to_flat_state(grads)
    }
    return float(loss), flat


@pytest.mark.parametrize("options", [dict(), dict(remat=True)], ids=["plain", "remat"])
def test_gradients_match_torch_autograd(options, tmp_path):
    family, overrides = CASES["qwen2_tied"]
    torch_model = make_torch_model(family, **overrides)
    loaded = save_and_load(torch_model, tmp_path, **options)
    config = loaded.config
    tokens = random_tokens(2, 12, seed=5)

    loss, grads = _jax_loss_and_grads(loaded.model, tokens)

    logits = torch_model(input_ids=torch.from_numpy(tokens[:, :-1]).long()).logits
    torch_loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), torch.from_numpy(tokens[:, 1:]).reshape(-1).long()
    )
    torch_loss.backward()
    torch_grads = {name: p.grad.numpy() for name, p in torch_model.named_parameters()}

    assert loss == pytest.approx(torch_loss.item(), abs=1e-5)
    rules = {rule.hf_key: rule for rule in KEY_MAP}
    checked = {
        "model.layers.{i}.self_attn.q_proj.weight": 1,
        "model.layers.{i}.self_attn.k_proj.bias": 0,
        "model.layers.{i}.mlp.down_proj.weight": 2,
        "model.embed_tokens.weight": None,  # tied: gradient of embedding and LM head
    }
    for pattern, layer in checked.items():
        rule = rules[pattern]
        ours = grads[rule.param] if layer is None else grads[rule.param][layer]
        expected = rule.to_param(torch_grads[pattern.format(i=layer)], config)
        scale = np.abs(expected).max()
        assert scale > 0, pattern
        np.testing.assert_allclose(ours, expected, atol=1e-4 * scale, rtol=0, err_msg=pattern)
