"""Padding, bucketing and packing into fixed [B, T] shapes."""

from __future__ import annotations

import numpy as np
import pytest

from merit_jax.data.batching import (
    Batch,
    pack_rows,
    packed_batch,
    packed_batches,
    pad_rows,
    padded_batches,
)
from merit_jax.data.format import TokenizedExample

PAD = 0


def make_example(rng: np.random.Generator, length: int, response: int) -> TokenizedExample:
    tokens = rng.integers(3, 300, size=length).astype(np.int32)
    mask = np.zeros(length, dtype=bool)
    mask[length - response :] = True
    return TokenizedExample(tokens=tokens, loss_mask=mask)


def random_examples(seed: int, count: int, max_length: int) -> list[TokenizedExample]:
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(count):
        length = int(rng.integers(2, max_length + 1))
        response = int(rng.integers(1, length))
        examples.append(make_example(rng, length, response))
    return examples


def check_batch_invariants(batch: Batch, batch_size: int, seq_len: int) -> None:
    assert batch.tokens.shape == (batch_size, seq_len)
    assert batch.tokens.dtype == np.int32
    assert batch.segment_ids.dtype == np.int32
    assert batch.positions.dtype == np.int32
    assert batch.loss_mask.dtype == np.bool_
    padding = batch.segment_ids == 0
    assert (batch.tokens[padding] == PAD).all()
    assert not batch.loss_mask[padding].any()
    assert (batch.positions[padding] == 0).all()
    for row in range(batch_size):
        segments = batch.segment_ids[row]
        for t in range(seq_len):
            if segments[t] == 0:
                continue
            starts_segment = t == 0 or segments[t - 1] != segments[t]
            if starts_segment:
                # Positions restart and the first token of a segment is never a target.
                assert batch.positions[row, t] == 0
                assert not batch.loss_mask[row, t]
            else:
                assert batch.positions[row, t] == batch.positions[row, t - 1] + 1
        # Segment ids count up 1..k along the row, then only padding follows.
        nonzero = segments[segments != 0]
        if nonzero.size:
            assert nonzero[0] == 1
            assert (np.diff(nonzero) >= 0).all()
            assert (np.diff(nonzero) <= 1).all()
            assert (segments[np.flatnonzero(segments)[-1] + 1 :] == 0).all()


def segments_of(batch: Batch) -> list[tuple[list[int], list[bool]]]:
    """Read back every (tokens, loss_mask) segment in row-major order."""
    found = []
    for row in range(batch.tokens.shape[0]):
        for segment in range(1, int(batch.segment_ids[row].max()) + 1):
            where = batch.segment_ids[row] == segment
            found.append((batch.tokens[row, where].tolist(), batch.loss_mask[row, where].tolist()))
    return found


def test_pad_rows_layout():
    examples = random_examples(0, 3, 10)
    batch = pad_rows(examples, seq_len=12, pad_id=PAD, batch_size=4)
    check_batch_invariants(batch, 4, 12)
    for row, example in enumerate(examples):
        n = example.length
        assert batch.tokens[row, :n].tolist() == example.tokens.tolist()
        assert batch.loss_mask[row, :n].tolist() == example.loss_mask.tolist()
        assert batch.positions[row, :n].tolist() == list(range(n))
        assert (batch.segment_ids[row, :n] == 1).all()
    assert (batch.segment_ids[3] == 0).all()
    assert batch.num_examples == 3
    assert batch.num_targets == sum(example.num_targets for example in examples)


def test_padded_batches_buckets_fix_shapes():
    examples = random_examples(1, 50, 30)
    batches = list(
        padded_batches(examples, batch_size=4, seq_len=32, pad_id=PAD, bucket_lengths=[8, 16])
    )
    shapes = {batch.shape for batch in batches}
    assert shapes <= {(4, 8), (4, 16), (4, 32)}
    assert sum(batch.num_examples for batch in batches) == 50
    for batch in batches:
        check_batch_invariants(batch, *batch.shape)
        lengths = (batch.segment_ids != 0).sum(axis=1)
        bucket = batch.shape[1]
        smaller = {8: 0, 16: 8, 32: 16}[bucket]
        assert ((lengths == 0) | ((lengths > smaller) & (lengths <= bucket))).all()
    got = sorted(tuple(tokens) for tokens, _ in (s for b in batches for s in segments_of(b)))
    assert got == sorted(tuple(example.tokens.tolist()) for example in examples)


def test_padded_batches_drop_remainder():
    examples = random_examples(2, 10, 8)
    batches = list(
        padded_batches(examples, batch_size=4, seq_len=8, pad_id=PAD, drop_remainder=True)
    )
    assert len(batches) == 2
    assert all(batch.num_examples == 4 for batch in batches)


@pytest.mark.parametrize(("seed", "seq_len", "max_length"), [(3, 17, 17), (4, 64, 20), (5, 33, 7)])
def test_packing_invariants(seed, seq_len, max_length):
    examples = random_examples(seed, 97, max_length)
    batches = list(packed_batches(examples, batch_size=3, seq_len=seq_len, pad_id=PAD))
    for batch in batches:
        check_batch_invariants(batch, 3, seq_len)

    # Every example appears exactly once, unchanged, and order is kept within a row.
    found = [segment for batch in batches for segment in segments_of(batch)]
    assert len(found) == len(examples)
    expected = sorted((e.tokens.tolist(), [False] + e.loss_mask[1:].tolist()) for e in examples)
    assert sorted(found) == expected
    assert sum(batch.num_examples for batch in batches) == len(examples)
    assert sum(batch.num_targets for batch in batches) == sum(e.num_targets for e in examples)


def test_packing_matches_loss_targets():
    jnp = pytest.importorskip("jax.numpy")
    loss = pytest.importorskip("merit_jax.models.loss")
    examples = random_examples(6, 40, 12)
    batch = next(packed_batches(examples, batch_size=8, seq_len=40, pad_id=PAD))
    targets, weights = loss.target_weights(
        jnp.asarray(batch.tokens), jnp.asarray(batch.loss_mask), jnp.asarray(batch.segment_ids)
    )
    # The loss counts exactly the targets the batch marks: none is dropped or added by its
    # segment check, so no target crosses a segment boundary.
    assert int(weights.sum()) == batch.num_targets
    np.testing.assert_array_equal(np.asarray(weights) > 0, batch.loss_mask[:, 1:])
    np.testing.assert_array_equal(np.asarray(targets), batch.tokens[:, 1:])


def test_pack_rows_first_fit_reference():
    rng = np.random.default_rng(7)
    lengths = [int(n) for n in rng.integers(2, 20, size=60)]
    examples = [make_example(rng, n, 1) for n in lengths]
    rows = pack_rows(examples, seq_len=24, max_open_rows=1000)

    # Naive first fit over all rows, as the reference.
    reference_used: list[int] = []
    reference_rows: list[list[int]] = []
    for index, n in enumerate(lengths):
        for row, used in enumerate(reference_used):
            if used + n <= 24:
                reference_used[row] += n
                reference_rows[row].append(index)
                break
        else:
            reference_used.append(n)
            reference_rows.append([index])
    ids = {id(example): index for index, example in enumerate(examples)}
    assert [[ids[id(example)] for example in row] for row in rows] == reference_rows


def test_pack_rows_bounded_open_rows():
    examples = random_examples(8, 200, 30)
    rows = pack_rows(examples, seq_len=32, max_open_rows=2)
    assert sum(len(row) for row in rows) == 200
    assert all(sum(example.length for example in row) <= 32 for row in rows)


def test_packed_batches_remainder():
    examples = random_examples(9, 20, 10)
    rows = pack_rows(examples, seq_len=16)
    kept = list(packed_batches(examples, batch_size=4, seq_len=16, pad_id=PAD))
    dropped = list(
        packed_batches(examples, batch_size=4, seq_len=16, pad_id=PAD, drop_remainder=True)
    )
    assert len(kept) == -(-len(rows) // 4)
    assert len(dropped) == len(rows) // 4
    assert kept[-1].shape == (4, 16)


def test_too_long_example_raises():
    example = random_examples(10, 1, 40)[0]
    while example.length <= 16:
        example = random_examples(example.length, 1, 40)[0]
    with pytest.raises(ValueError, match="max_length <= 16"):
        pad_rows([example], seq_len=16, pad_id=PAD)
    with pytest.raises(ValueError, match="max_length <= 16"):
        list(packed_batches([example], batch_size=2, seq_len=16, pad_id=PAD))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: pad_rows(random_examples(0, 3, 4), seq_len=8, pad_id=PAD, batch_size=2),
            "3 examples",
        ),
        (lambda: list(padded_batches([], batch_size=0, seq_len=8, pad_id=PAD)), "batch_size=0"),
        (
            lambda: list(
                padded_batches([], batch_size=2, seq_len=8, pad_id=PAD, bucket_lengths=[4, 4])
            ),
            "strictly increasing",
        ),
        (
            lambda: list(
                padded_batches([], batch_size=2, seq_len=8, pad_id=PAD, bucket_lengths=[16])
            ),
            "between 2 and seq_len=8",
        ),
        (lambda: packed_batch([[], [], []], seq_len=8, pad_id=PAD, batch_size=2), "3 rows"),
        (lambda: pack_rows([], seq_len=8, max_open_rows=0), "max_open_rows=0"),
    ],
)
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
