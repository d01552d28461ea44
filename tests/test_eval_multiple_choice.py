"""Log-likelihood multiple choice against transformers' PyTorch Llama and hand-checked cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from merit_jax.data.task import MultipleChoiceExample, MultipleChoiceTask  # noqa: E402
from merit_jax.data.testing import CHATML_TEMPLATE, SPECIAL_TOKENS, chatml_byte_tokenizer  # noqa: E402
from merit_jax.eval.loglikelihood import (  # noqa: E402
    LoglikelihoodRequest,
    bucket_lengths,
    score_requests,
)
from merit_jax.eval.multiple_choice import (  # noqa: E402
    build_requests,
    choose,
    encode_pair,
    evaluate_multiple_choice,
    mean_and_stderr,
    move_trailing_whitespace,
    select_examples,
    task_result,
)
from merit_jax.models.pretrained import load_pretrained  # noqa: E402

ATOL = 1e-4
# Word-piece merges of the test BPE: " yes", " no", " maybe", "ab".
MERGES = [
    ("Ġ", "y"),
    ("Ġy", "e"),
    ("Ġye", "s"),
    ("Ġ", "n"),
    ("Ġn", "o"),
    ("Ġ", "m"),
    ("Ġm", "a"),
    ("Ġma", "y"),
    ("Ġmay", "b"),
    ("Ġmayb", "e"),
    ("a", "b"),
]
VOCAB_SIZE = 3 + 256 + len(MERGES) + 5  # special tokens, bytes, merges, unused ids


def regex_bpe_tokenizer(merges=MERGES):
    """A byte-level BPE with GPT-2's pre-tokenizer regex, as SmolLM2's tokenizer uses.

    The regex splits "A:  yes" into "A", ":", " ", " yes", so a space run before
    a word leaves one space token and one " word" token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )


def tokens_of(tokenizer, ids):
    return tokenizer.convert_ids_to_tokens(list(ids))


# ------------------------------------------------------------------ the whitespace rule


def test_move_trailing_whitespace():
    assert move_trailing_whitespace("Q: hi\nA: ", " yes") == ("Q: hi\nA:", "  yes")
    assert move_trailing_whitespace("Q \n\t", " no") == ("Q", " \n\t no")
    assert move_trailing_whitespace("Q", " no") == ("Q", " no")
    assert move_trailing_whitespace("   ", " x") == ("", "    x")


def test_encode_pair_with_regex_bpe():
    tokenizer = regex_bpe_tokenizer()
    # Context "A: " gives up its space: context "A:", continuation "  yes".
    context_ids, continuation_ids = encode_pair(tokenizer, "A: ", " yes")
    assert tokens_of(tokenizer, context_ids) == ["A", ":"]
    assert tokens_of(tokenizer, continuation_ids) == ["Ġ", "Ġyes"]

    # Without trailing whitespace the continuation is the single " yes" token.
    context_ids, continuation_ids = encode_pair(tokenizer, "A:", " yes")
    assert tokens_of(tokenizer, context_ids) == ["A", ":"]
    assert tokens_of(tokenizer, continuation_ids) == ["Ġyes"]

    # A newline run before the output prefix stays in the context.
    context_ids, continuation_ids = encode_pair(tokenizer, "ab\nA:\n", " maybe")
    assert tokens_of(tokenizer, context_ids) == ["ab", "Ċ", "A", ":"]
    assert tokens_of(tokenizer, continuation_ids) == ["Ċ", "Ġmaybe"]


def test_encode_pair_slices_whole_encoding():
    # Without pre-tokenizer splits, ":" and the space merge across the boundary. The
    # continuation is then what follows len(context tokens) tokens of the whole encoding,
    # as lm-evaluation-harness slices it, so the merged space is not scored.
    tokenizer = chatml_byte_tokenizer(merges=MERGES[:3] + [(":", "Ġ")])
    context_ids, continuation_ids = encode_pair(tokenizer, "A: ", " yes")
    whole = tokenizer.encode("A:  yes", add_special_tokens=False)
    assert tokens_of(tokenizer, whole) == ["A", ":Ġ", "Ġyes"]
    assert tokens_of(tokenizer, context_ids) == ["A", ":"]
    assert tokens_of(tokenizer, continuation_ids) == ["Ġyes"]


def test_empty_context_starts_with_eos():
    tokenizer = regex_bpe_tokenizer()
    context_ids, continuation_ids = encode_pair(tokenizer, "", " no")
    assert context_ids == [tokenizer.eos_token_id]
    assert tokens_of(tokenizer, continuation_ids) == ["Ġno"]
    # Whitespace-only contexts lose all their text to the continuation.
    context_ids, continuation_ids = encode_pair(tokenizer, " ", " no")
    assert context_ids == [tokenizer.eos_token_id]
    assert tokens_of(tokenizer, continuation_ids) == ["Ġ", "Ġno"]


# ------------------------------------------------------------------ acc and acc_norm


def hand_task() -> MultipleChoiceTask:
    examples = [
        # Gold {1, 2}. Raw argmax 0 misses, per-character argmax 1 hits.
        MultipleChoiceExample("e0", ("a", "bbbb", "cc"), (0, 1, 1)),
        # A tie in both: the first index (0) wins and is gold.
        MultipleChoiceExample("e1", ("x", "y"), (1, 0)),
        # Raw tie picks 0 (wrong). Per character -1 vs -1.5 also picks 0.
        MultipleChoiceExample("e2", ("yes", "no"), (0, 1)),
        # Raw argmax 0 hits; per character "qqqq" wins and misses.
        MultipleChoiceExample("e3", ("p", "qqqq"), (1, 0)),
    ]
    return MultipleChoiceTask(name="hand", source="test", examples=tuple(examples))


HAND_SCORES = [-1.0, -2.0, -3.0, -2.0, -2.0, -3.0, -3.0, -2.0, -4.0]


def test_choose_first_index_on_ties():
    assert choose([-2.0, -2.0, -5.0], ["a", "b", "c"]) == (0, 0)
    assert choose([-1.0, -2.0, -3.0], ["a", "bbbb", "cc"]) == (0, 1)


def test_acc_and_acc_norm_hand_case():
    task = hand_task()
    result = task_result(task, range(4), np.array(HAND_SCORES), np.zeros(9, bool))
    assert result.predictions == (0, 0, 0, 0)
    assert result.predictions_norm == (1, 0, 0, 1)
    assert result.acc == pytest.approx(0.5)  # examples 1 and 3
    assert result.acc_norm == pytest.approx(0.5)  # examples 0 and 1
    assert result.acc_stderr == pytest.approx(math.sqrt(1 / 3) / 2)
    assert result.chance == pytest.approx((2 / 3 + 1 / 2 + 1 / 2 + 1 / 2) / 4)
    assert result.n == 4
    assert result.num_requests == 9
    assert result.choice_scores[0] == (-1.0, -2.0, -3.0)


def test_task_result_rejects_wrong_score_count():
    with pytest.raises(ValueError, match="9 \\(example, choice\\) pairs"):
        task_result(hand_task(), range(4), np.zeros(8), np.zeros(8, bool))


def test_mean_and_stderr():
    mean, stderr = mean_and_stderr([1.0, 0.0, 1.0])
    assert mean == pytest.approx(2 / 3)
    assert stderr == pytest.approx(np.std([1.0, 0.0, 1.0], ddof=1) / math.sqrt(3))
    assert mean_and_stderr([1.0]) == (1.0, None)


def test_select_examples():
    task = MultipleChoiceTask(
        name="many",
        source="test",
        examples=tuple(MultipleChoiceExample(f"q{i}", ("a", "b"), (1, 0)) for i in range(30)),
    )
    assert select_examples(task, None) == tuple(range(30))
    assert select_examples(task, 5) == (0, 1, 2, 3, 4)
    assert select_examples(task, 50) == tuple(range(30))
    drawn = select_examples(task, 5, seed=3)
    assert drawn == select_examples(task, 5, seed=3)
    assert list(drawn) == sorted(drawn)
    assert len(set(drawn)) == 5
    assert drawn != (0, 1, 2, 3, 4)
    assert select_examples(task, 5, seed=4) != drawn
    with pytest.raises(ValueError, match="num_examples=0"):
        select_examples(task, 0)


def test_build_requests_rejects_empty_choice():
    task = MultipleChoiceTask(
        name="empty_choice",
        source="test",
        examples=(MultipleChoiceExample("q", ("a", ""), (1, 0)),),
    )
    with pytest.raises(ValueError, match="choice 1 is empty"):
        build_requests(regex_bpe_tokenizer(), task, [0])


# ------------------------------------------------------------------ PyTorch reference


def make_torch_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            else:
                param.copy_(0.2 * torch.randn_like(param))
    return model.float().eval()


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    torch_model = make_torch_llama()
    directory = tmp_path_factory.mktemp("tiny_llama")
    torch_model.save_pretrained(directory)
    loaded = load_pretrained(directory, with_tokenizer=False)
    return torch_model, loaded.model


def reference_choice_scores(torch_model, tokenizer, example, max_length=None):
    """Summed log-probabilities by the convention, written out independently in plain Python."""
    scores = []
    for choice in example.choices:
        context = example.task_prefix + example.input_prefix + example.input + example.output_prefix
        continuation = " " + choice
        spaces = len(context) - len(context.rstrip())
        if spaces:
            continuation = context[-spaces:] + continuation
            context = context[:-spaces]
        whole = tokenizer.encode(context + continuation, add_special_tokens=False)
        context_ids = tokenizer.encode(context, add_special_tokens=False)
        continuation_ids = whole[len(context_ids) :]
        sequence = context_ids + continuation_ids
        if max_length is not None:
            sequence = sequence[-max_length:]
        with torch.no_grad():
            logits = torch_model(input_ids=torch.tensor([sequence])).logits[0].double()
        log_probs = torch.log_softmax(logits, dim=-1)
        total = 0.0
        for offset in range(len(continuation_ids)):
            position = len(sequence) - len(continuation_ids) + offset
            total += float(log_probs[position - 1, sequence[position]])
        scores.append(total)
    return scores


def reference_task() -> MultipleChoiceTask:
    prefixes = dict(task_prefix="Answer the question.\n", input_prefix="Q: ", output_prefix="\nA: ")
    examples = [
        MultipleChoiceExample("is ab yes?", ("yes", "no"), (1, 0), **prefixes),
        MultipleChoiceExample("ab ab", ("yes", "no", "maybe"), (0, 0, 1), **prefixes),
        MultipleChoiceExample("x", ("no", "maybe yes"), (0, 1), output_prefix="\n"),
        MultipleChoiceExample("trailing tab\t", ("ab", "b a", "a  b"), (1, 0, 0)),
        MultipleChoiceExample("a much longer question " * 4, ("yes", "no"), (0, 1), **prefixes),
    ]
    return MultipleChoiceTask(name="reference", source="test", examples=tuple(examples))


def test_scores_match_pytorch(llama_pair):
    torch_model, model = llama_pair
    tokenizer = regex_bpe_tokenizer()
    task = reference_task()
    # A small token budget spreads the requests over several batches and two buckets.
    result = evaluate_multiple_choice(model, tokenizer, [task], max_length=128, batch_tokens=64)[
        "reference"
    ]
    assert result.num_truncated == 0
    for index, example in enumerate(task.examples):
        expected = reference_choice_scores(torch_model, tokenizer, example)
        np.testing.assert_allclose(result.choice_scores[index], expected, atol=ATOL, rtol=0)
        assert result.predictions[index] == int(np.argmax(expected))


def test_left_truncation_matches_pytorch(llama_pair):
    torch_model, model = llama_pair
    tokenizer = regex_bpe_tokenizer()
    task = reference_task()
    long_example = task.examples[4]
    max_length = 24
    result = evaluate_multiple_choice(
        model, tokenizer, [task], max_length=max_length, batch_tokens=64
    )["reference"]
    requests = build_requests(tokenizer, task, range(5))
    expected_truncated = sum(request.length > max_length for request in requests)
    assert expected_truncated >= 2
    assert result.num_truncated == expected_truncated
    expected = reference_choice_scores(torch_model, tokenizer, long_example, max_length)
    np.testing.assert_allclose(result.choice_scores[4], expected, atol=ATOL, rtol=0)


def test_padding_and_batching_do_not_change_scores(llama_pair):
    _, model = llama_pair
    tokenizer = regex_bpe_tokenizer()
    requests = build_requests(tokenizer, reference_task(), range(5))
    one_per_batch = score_requests(model, requests, max_length=128, batch_tokens=1, min_bucket=128)
    all_in_one = score_requests(model, requests, max_length=128, batch_tokens=4096)
    buckets = score_requests(model, requests, max_length=128, batch_tokens=100, min_bucket=4)
    assert one_per_batch.shapes == ((1, 128),)
    assert one_per_batch.num_batches == len(requests)
    assert all_in_one.num_batches < len(requests)
    assert len(buckets.shapes) > 1
    np.testing.assert_allclose(all_in_one.scores, one_per_batch.scores, atol=1e-5, rtol=0)
    np.testing.assert_allclose(buckets.scores, one_per_batch.scores, atol=1e-5, rtol=0)
    assert np.all(one_per_batch.scores < 0)


def test_score_requests_rejects_long_continuation(llama_pair):
    _, model = llama_pair
    request = LoglikelihoodRequest((5,), tuple(range(10, 18)))
    with pytest.raises(ValueError, match="continuation has 8 tokens"):
        score_requests(model, [request], max_length=8)


def test_request_needs_context_and_continuation():
    with pytest.raises(ValueError, match="empty context"):
        LoglikelihoodRequest((), (1,))
    with pytest.raises(ValueError, match="empty continuation"):
        LoglikelihoodRequest((1,), ())


def test_bucket_lengths():
    assert bucket_lengths(100, 32) == [32, 64, 100]
    assert bucket_lengths(128, 20) == [32, 64, 128]
    assert bucket_lengths(16, 32) == [16]
