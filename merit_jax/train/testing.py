"""Test helpers: a tiny decoder config and random tokenized tasks, built without files."""

from __future__ import annotations

from typing import Any

import numpy as np

from merit_jax.data.format import TokenizedExample, TokenizedTask
from merit_jax.models.config import ModelConfig


def tiny_model_config(**overrides: Any) -> ModelConfig:
    """Return a 2-layer Llama config small enough to compile and train in seconds on CPU."""
    fields: dict[str, Any] = dict(
        model_type="llama",
        vocab_size=61,  # prime, so no sharding rule divides it
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=4,
        tie_word_embeddings=True,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def random_task(
    name: str,
    num_examples: int,
    *,
    seed: int,
    vocab_size: int = 61,
    min_length: int = 4,
    max_length: int = 12,
) -> TokenizedTask:
    """Return a task of random token examples whose second half is the response."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(num_examples):
        length = int(rng.integers(min_length, max_length + 1))
        tokens = rng.integers(1, vocab_size, size=length)
        mask = np.zeros(length, dtype=bool)
        mask[length // 2 :] = True
        examples.append(TokenizedExample(tokens=tokens, loss_mask=mask))
    return TokenizedTask(
        name=name,
        examples=tuple(examples),
        source_indices=tuple(range(num_examples)),
        num_skipped=0,
        num_truncated=0,
    )
