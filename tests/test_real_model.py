"""The real SmolLM2-135M-Instruct GGUF: plausible loss, and an HF export that transformers runs.

These tests need the cached GGUF (`merit fetch smollm2-135m-instruct`) and skip
without it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from merit_jax.models.export import export_hf
from merit_jax.models.pretrained import load_pretrained
from merit_jax.models.weights import decoder_from_hf, hf_from_decoder

pytestmark = pytest.mark.real

# Plain encyclopedic English, about 120 words, written for this test.
PARAGRAPH = (
    "The Danube is the second-longest river in Europe, after the Volga. It rises in the "
    "Black Forest of southwestern Germany and flows for about 2,850 kilometres to the Black "
    "Sea, passing through or along the borders of ten countries. Four capital cities lie on "
    "its banks: Vienna, Bratislava, Budapest and Belgrade. For centuries the river formed a "
    "frontier of the Roman Empire, and later it became an important route for trade between "
    "central Europe and the east. Today large ships carry grain, ore and fuel along much of "
    "its length, and a canal links it with the Rhine and the North Sea. The delta in Romania "
    "and Ukraine is one of the largest wetlands on the continent and is home to many species "
    "of birds and fish."
)


@pytest.fixture(scope="module")
def smollm2(real_gguf):
    return load_pretrained(real_gguf)


def paragraph_loss(model, token_ids: list[int]) -> float:
    """Mean next-token negative log-likelihood in nats per token."""
    tokens = jnp.asarray([token_ids])
    logits, _ = model(tokens)
    log_probs = jax.nn.log_softmax(logits[0, :-1], axis=-1)
    picked = jnp.take_along_axis(log_probs, tokens[0, 1:, None], axis=-1)
    return float(-picked.mean())


def test_gguf_loads_with_expected_shape(smollm2):
    config = smollm2.config
    assert config.model_type == "llama"
    assert config.num_hidden_layers == 30
    assert config.hidden_size == 576
    assert config.num_attention_heads == 9
    assert config.num_key_value_heads == 3
    assert config.vocab_size == 49152
    assert config.tie_word_embeddings
    assert config.rope_theta == pytest.approx(1e5)
    assert len(smollm2.weights_sha256) == 64
    assert smollm2.weight_files == [smollm2.source]


def test_paragraph_loss_is_plausible(smollm2):
    """Check the loss against bounds that a wrong Q/K RoPE layout (next test) breaks.

    Measured on this paragraph: 2.34 nats/token (float32, CPU).
    """
    token_ids = smollm2.tokenizer(PARAGRAPH)["input_ids"]
    assert 110 < len(token_ids) < 220

    loss = paragraph_loss(smollm2.model, token_ids)

    print(f"SmolLM2-135M-Instruct Q4_1 loss on the test paragraph: {loss:.4f} nats/token")
    assert 1.5 < loss < 3.0


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Reorder Q or K rows per head the way llama.cpp's converter stores them."""
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, 2, half, -1).swapaxes(1, 2).reshape(weight.shape)


def test_wrong_rope_layout_fails_loss_bound(smollm2):
    """Applying rotate-half RoPE to llama.cpp's row order must push the loss past the bound."""
    config = smollm2.config
    tensors = hf_from_decoder(smollm2.model)
    for i in range(config.num_hidden_layers):
        q_key = f"model.layers.{i}.self_attn.q_proj.weight"
        k_key = f"model.layers.{i}.self_attn.k_proj.weight"
        tensors[q_key] = llama_cpp_permute(tensors[q_key], config.num_attention_heads)
        tensors[k_key] = llama_cpp_permute(tensors[k_key], config.num_key_value_heads)
    permuted = decoder_from_hf(config, tensors)

    loss = paragraph_loss(permuted, smollm2.tokenizer(PARAGRAPH)["input_ids"])

    print(f"loss with llama.cpp row order under rotate-half RoPE: {loss:.4f} nats/token")
    assert loss > 3.0


def test_hf_export_matches_transformers(smollm2, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = export_hf(smollm2.model, smollm2.tokenizer, tmp_path / "smollm2")

    torch_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    token_ids = smollm2.tokenizer(PARAGRAPH)["input_ids"]
    assert tokenizer(PARAGRAPH)["input_ids"] == token_ids
    messages = [{"role": "user", "content": "Where does the Danube rise?"}]
    assert tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    ) == smollm2.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    short = np.asarray([token_ids[:24]])
    with torch.no_grad():
        expected = torch_model(input_ids=torch.from_numpy(short).long()).logits.numpy()
    ours, _ = smollm2.model(jnp.asarray(short))

    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-3, rtol=0)
