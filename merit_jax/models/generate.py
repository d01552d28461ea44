"""Autoregressive generation with a KV cache: greedy, temperature and nucleus (top-p) sampling.

Axis letters: B batch, P prompt (padded), S cache slots, V vocabulary.

A batch of prompts is left-padded to the longest one, so every row's last
prompt token sits in the same cache slot and each decode step writes one slot
for all rows. Padding has segment id 0, which the decoder never attends to,
and each row's positions start at 0 on its first real token, so a padded row
computes the same logits as the prompt alone (up to float rounding).

The prefill and the decode step are ``jax.jit`` functions of the model's
``nnx.split`` state. The decode step donates the cache buffers, so XLA updates
them in place.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from merit_jax.models.decoder import Decoder, KVCache

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- sampling


def nucleus_logits(logits_bv: jax.Array, top_p: jax.Array) -> jax.Array:
    """Set to -inf every logit outside the nucleus of probability mass ``top_p``.

    The nucleus is the smallest set of most probable tokens whose probabilities
    sum to at least ``top_p`` (Holtzman et al., 2020, "The Curious Case of
    Neural Text Degeneration"). The most probable token is always kept, so a
    tiny ``top_p`` leaves only the argmax (and tokens tied with it).
    """
    sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
    probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
    mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
    keep_bv = mass_before_bv < top_p
    # The smallest kept logit; keep_bv is a prefix of the sorted order, so it is the threshold.
    threshold_b = jnp.min(jnp.where(keep_bv, sorted_bv, jnp.inf), axis=-1)
    return jnp.where(logits_bv >= threshold_b[:, None], logits_bv, -jnp.inf)


def select_tokens(
    logits_bv: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    *,
    greedy: bool,
) -> jax.Array:
    """Pick the next token of every row: argmax when ``greedy``, else a top-p sample.

    Sampling draws from softmax(logits / temperature) restricted to the nucleus.
    """
    if greedy:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    scaled_bv = logits_bv.astype(jnp.float32) / temperature
    return jax.random.categorical(key, nucleus_logits(scaled_bv, top_p), axis=-1).astype(jnp.int32)


# --------------------------------------------------------------------------- jitted steps


@partial(jax.jit, static_argnames=("graphdef", "cache_len", "greedy"))
def _prefill(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens_bp: jax.Array,
    positions_bp: jax.Array,
    segment_ids_bp: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    *,
    cache_len: int,
    greedy: bool,
) -> tuple[jax.Array, KVCache]:
    model = nnx.merge(graphdef, state)
    cache = KVCache.empty(model.config, tokens_bp.shape[0], cache_len)
    hidden_bpd, cache = model(
        tokens_bp,
        positions_bt=positions_bp,
        segment_ids_bt=segment_ids_bp,
        cache=cache,
        return_hidden=True,
    )
    # Left padding puts every row's last prompt token in the last column.
    logits_bv = model.logits(hidden_bpd[:, -1:])[:, 0]
    return select_tokens(logits_bv, key, temperature, top_p, greedy=greedy), cache


@partial(jax.jit, static_argnames=("graphdef", "greedy"), donate_argnames=("cache",))
def _decode_step(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    cache: KVCache,
    tokens_b: jax.Array,
    positions_b: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    *,
    greedy: bool,
) -> tuple[jax.Array, KVCache]:
    model = nnx.merge(graphdef, state)
    logits_b1v, cache = model(
        tokens_b[:, None],
        positions_bt=positions_b[:, None],
        segment_ids_bt=jnp.ones_like(tokens_b)[:, None],
        cache=cache,
    )
    return select_tokens(logits_b1v[:, 0], key, temperature, top_p, greedy=greedy), cache


# --------------------------------------------------------------------------- generate


def _check_arguments(
    prompts: Sequence[Sequence[int]],
    vocab_size: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    pad_id: int,
) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if not temperature >= 0.0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 means greedy decoding)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if not 0 <= pad_id < vocab_size:
        raise ValueError(f"pad_id={pad_id} is outside the vocabulary [0, {vocab_size})")
    for index, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompts[{index}] is empty; every prompt needs at least one token")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(
                f"prompts[{index}] has token ids outside the vocabulary [0, {vocab_size}): "
                f"{bad[:10]}"
            )


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, *, pad_multiple: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return left-padded tokens, positions and segment ids, each int32 [B, P].

    P is the longest prompt's length rounded up to a multiple of ``pad_multiple``.
    Padding gets segment id 0 and position 0; real tokens get segment id 1 and
    positions 0, 1, ... from each row's first real token.
    """
    lengths = np.array([len(p) for p in prompts])
    width = -(-int(lengths.max()) // pad_multiple) * pad_multiple
    tokens_bp = np.full((len(prompts), width), pad_id, np.int32)
    segment_ids_bp = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        tokens_bp[row, width - len(prompt) :] = prompt
        segment_ids_bp[row, width - len(prompt) :] = 1
    positions_bp = np.maximum(np.arange(width)[None, :] - (width - lengths)[:, None], 0)
    return tokens_bp, positions_bp.astype(np.int32), segment_ids_bp


def generate(
    model: Decoder,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_ids: Sequence[int] | None = None,
    pad_id: int = 0,
    pad_multiple: int = 16,
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` tokens after each prompt; return the new tokens.

    ``temperature == 0`` decodes greedily. Otherwise tokens are sampled from
    softmax(logits / temperature) restricted to the top-p nucleus, with a PRNG
    key derived from ``seed``: the same seed and batch give the same tokens. A row
    stops after its first token in ``eos_ids`` (``None`` takes the model
    config's eos ids), and that token ends the returned list, so a caller can
    tell a finished reply from one cut at ``max_new_tokens``. ``pad_id`` fills
    the left padding; any valid id works because padding is masked. The
    padded prompt width is rounded up to a multiple of ``pad_multiple`` so that
    prompts of similar lengths share compiled prefill and decode functions
    (the cache holds that width plus ``max_new_tokens`` slots).
    """
    if not prompts:
        return []
    config = model.config
    eos = set(config.eos_token_ids if eos_ids is None else eos_ids)
    prompts = [[int(t) for t in p] for p in prompts]
    _check_arguments(prompts, config.vocab_size, max_new_tokens, temperature, top_p, pad_id)

    if pad_multiple < 1:
        raise ValueError(f"pad_multiple={pad_multiple} must be at least 1")
    tokens_bp, positions_bp, segment_ids_bp = left_pad(prompts, pad_id, pad_multiple=pad_multiple)
    batch, width = tokens_bp.shape
    greedy = temperature == 0.0
    temperature_arr = jnp.float32(temperature if not greedy else 1.0)
    top_p_arr = jnp.float32(top_p)
    base_key = jax.random.key(seed)
    graphdef, state = nnx.split(model)

    start = time.perf_counter()
    next_b, cache = _prefill(
        graphdef,
        state,
        jnp.asarray(tokens_bp),
        jnp.asarray(positions_bp),
        jnp.asarray(segment_ids_bp),
        jax.random.fold_in(base_key, 0),
        temperature_arr,
        top_p_arr,
        cache_len=width + max_new_tokens,
        greedy=greedy,
    )
    next_positions_b = jnp.asarray([len(p) for p in prompts], jnp.int32)

    outputs: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(batch, bool)
    steps = 0
    for step in range(1, max_new_tokens + 1):
        pending_b = next_b
        if step < max_new_tokens:
            # Dispatch the next step before reading this token back, so the host's
            # bookkeeping overlaps device work. Finished rows keep decoding; their
            # tokens are dropped below. The cache has width + max_new_tokens slots,
            # and this step writes slot width + step - 1.
            next_b, cache = _decode_step(
                graphdef,
                state,
                cache,
                pending_b,
                next_positions_b,
                jax.random.fold_in(base_key, step),
                temperature_arr,
                top_p_arr,
                greedy=greedy,
            )
            next_positions_b = next_positions_b + 1
        tokens_b = np.asarray(pending_b)
        steps = step
        for row in np.flatnonzero(~done):
            token = int(tokens_b[row])
            outputs[row].append(token)
            if token in eos:
                done[row] = True
        if done.all():
            break

    elapsed = time.perf_counter() - start
    logger.info(
        "generated %d tokens for %d prompts (prompt width %d, %d steps) in %.2f s",
        sum(len(o) for o in outputs),
        batch,
        width,
        steps,
        elapsed,
    )
    return outputs


# --------------------------------------------------------------------------- text


def _stop_token_ids(pretrained: Any, *, chat_text: str | None) -> list[int]:
    """Return the eos ids of the config and tokenizer, plus ChatML's end-of-turn token.

    A chat model may end its turn with a token other than its config's eos id,
    such as ChatML's ``<|im_end|>``, so that token is added when the rendered
    prompt uses ChatML.
    """
    tokenizer = pretrained.tokenizer
    ids = list(pretrained.config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if chat_text is not None and "<|im_start|>" in chat_text:
        end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
            ids.append(end_of_turn)
    return sorted(set(ids))


def generate_text(
    model_ref: str | os.PathLike[str],
    prompt: str,
    *,
    chat: bool = True,
    system: str | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    dtype: str = "float32",
) -> str:
    """Load a model, generate a reply to ``prompt`` and return it as text.

    ``model_ref`` is anything ``load_pretrained`` accepts. With ``chat``, the
    prompt becomes a user turn (after an optional ``system`` turn), rendered by
    the tokenizer's chat template with the assistant header appended. Without
    it, the raw text is tokenized as is. Special tokens are dropped from the reply.
    """
    from merit_jax.models.pretrained import load_pretrained
    from merit_jax.models.tokenizer import apply_chat_template

    if system is not None and not chat:
        raise ValueError("system applies only with chat=True; drop system or set chat=True")
    pretrained = load_pretrained(
        model_ref, param_dtype=dtype, compute_dtype=dtype, with_tokenizer=True
    )
    tokenizer = pretrained.tokenizer
    if chat:
        messages = [] if system is None else [{"role": "system", "content": system}]
        messages.append({"role": "user", "content": prompt})
        encoding = apply_chat_template(tokenizer, messages, add_generation_prompt=True)
        prompt_ids, chat_text = encoding.token_ids, encoding.text
    else:
        prompt_ids, chat_text = tokenizer.encode(prompt), None
    if not prompt_ids:
        raise ValueError("the prompt is empty after tokenization; pass a non-empty prompt")

    eos_ids = _stop_token_ids(pretrained, chat_text=chat_text)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = eos_ids[0] if eos_ids else 0
    [reply_ids] = generate(
        pretrained.model,
        [prompt_ids],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        eos_ids=eos_ids,
        pad_id=pad_id,
    )
    return tokenizer.decode(reply_ids, skip_special_tokens=True)
