"""Evaluation of the real SmolLM2-135M-Instruct on real BIG-bench tasks.

These tests need the cached GGUF and BIG-bench tarball (`merit fetch`) and
skip without them. Run with ``-s`` to see the scores.
"""

from __future__ import annotations

import math

import pytest

from merit_jax import assets
from merit_jax.data.bigbench import BigBenchArchive
from merit_jax.eval.held_out import held_out_losses, prepare_held_out
from merit_jax.eval.multiple_choice import encode_pair, evaluate_multiple_choice
from merit_jax.models.pretrained import load_pretrained

pytestmark = pytest.mark.real

MC_TASKS = ("anachronisms", "sports_understanding")


@pytest.fixture(scope="module")
def smollm2(real_gguf):
    del real_gguf  # fetched and verified; the registry name resolves to it
    return load_pretrained(assets.SMOLLM2)


@pytest.fixture(scope="module")
def archive(real_bigbench_tarball):
    return BigBenchArchive(tarball=real_bigbench_tarball)


def test_real_tokenizer_context_split(smollm2):
    tokenizer = smollm2.tokenizer

    def split(context: str, continuation: str) -> tuple[list[str], list[str]]:
        context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
        return (
            tokenizer.convert_ids_to_tokens(context_ids),
            tokenizer.convert_ids_to_tokens(continuation_ids),
        )

    # sports_understanding's output prefix ends in a space, which joins the choice.
    assert split("Plausible/implausible? ", " plausible") == (
        ["Pl", "aus", "ible", "/", "impl", "aus", "ible", "?"],
        ["Ġ", "Ġplausible"],
    )
    # A trailing newline (anachronisms' output prefix) moves the same way.
    assert split("Does it?\n", " Yes") == (["Does", "Ġit", "?"], ["Ċ", "ĠYes"])
    # SmolLM2 splits digits one by one, so " 19" is a space and two digits.
    assert split("What is 12 plus 7?", " 19")[1] == ["Ġ", "1", "9"]


def test_real_multiple_choice_scores(smollm2, archive):
    tasks = archive.load_multiple_choice_tasks(MC_TASKS)
    results = evaluate_multiple_choice(
        smollm2.model, smollm2.tokenizer, tasks, num_examples=20, max_length=512
    )
    for name in MC_TASKS:
        result = results[name]
        print(
            f"{name}: acc {result.acc:.3f} ± {result.acc_stderr:.3f}, acc_norm "
            f"{result.acc_norm:.3f} ± {result.acc_norm_stderr:.3f}, chance {result.chance:.3f}, "
            f"n {result.n}, truncated {result.num_truncated}"
        )
        assert result.n == 20
        assert result.num_requests == 40
        assert result.num_truncated == 0
        assert 0.0 <= result.acc <= 1.0
        assert 0.0 <= result.acc_norm <= 1.0
        assert 0.0 < result.chance < 1.0
        scores = [score for example in result.choice_scores for score in example]
        assert all(math.isfinite(score) and score < 0 for score in scores)


def test_real_held_out_loss(smollm2, archive):
    task = archive.load_instruction_task("arithmetic/3_digit_addition")
    data = prepare_held_out(
        smollm2.tokenizer, {task.name: task.examples[:6]}, seq_len=128, batch_size=2
    )
    result = held_out_losses(smollm2.model, data)[task.name]
    print(f"{task.name}: held-out loss {result.loss:.3f} over {result.num_targets} targets")
    # Each sum is 3 or 4 digit tokens, followed by <|im_end|>.
    assert 6 * 4 <= result.num_targets <= 6 * 5
    assert math.isfinite(result.loss)
    assert 0.0 < result.loss < 10.0
