"""Model shapes shared by the benchmark scripts."""

from typing import Any

# SmolLM2-135M (Llama): 30 layers, D 576, 9 query and 3 key/value heads of 64,
# F 1536, V 49152, tied embeddings; 134.5M parameters.
SMOLLM2_135M: dict[str, Any] = dict(
    model_type="llama",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    rms_norm_eps=1e-5,
    rope_theta=1e5,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
)
