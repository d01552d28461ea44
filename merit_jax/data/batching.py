"""Fixed-shape batches of tokenized examples: padding (optionally bucketed) and packing.

Axis letters: B batch rows, T sequence.

Every batch contains four numpy arrays of shape [B, T]:

* ``tokens`` int32: token ids, ``pad_id`` on padding;
* ``loss_mask`` bool: target token t counts (the convention of
  ``merit_jax.models.loss``: token t is the label of position t - 1, so the
  logits at t - 1 are scored against it). Set only on response tokens,
  end-of-turn included, and never on the first token of a segment;
* ``segment_ids`` int32: 1..k for the k examples of a row, 0 for padding;
* ``positions`` int32: 0, 1, ... restarting at every segment, 0 on padding.

No target crosses a segment boundary. This module never sets ``loss_mask``
on the first token of a segment, and the loss also requires
``segment_ids[t] == segment_ids[t - 1] != 0``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from merit_jax.data.format import TokenizedExample


@dataclasses.dataclass(frozen=True)
class Batch:
    """One [B, T] batch; see the module doc for the meaning of each array."""

    tokens: np.ndarray  # int32 [B, T]
    loss_mask: np.ndarray  # bool [B, T]
    segment_ids: np.ndarray  # int32 [B, T]
    positions: np.ndarray  # int32 [B, T]
    num_examples: int  # examples in the batch (rows that are all padding hold none)

    def __post_init__(self) -> None:
        shape = self.tokens.shape
        for field in ("loss_mask", "segment_ids", "positions"):
            if getattr(self, field).shape != shape:
                raise ValueError(
                    f"batch {field} has shape {getattr(self, field).shape}, tokens {shape}"
                )

    @property
    def shape(self) -> tuple[int, int]:
        batch, length = self.tokens.shape
        return batch, length

    @property
    def num_tokens(self) -> int:
        """Non-padding tokens."""
        return int((self.segment_ids != 0).sum())

    @property
    def num_targets(self) -> int:
        """Tokens the loss counts."""
        return int(self.loss_mask.sum())

    def as_dict(self) -> dict[str, np.ndarray]:
        return {
            "tokens": self.tokens,
            "loss_mask": self.loss_mask,
            "segment_ids": self.segment_ids,
            "positions": self.positions,
        }


class _RowBuilder:
    """Fills [B, T] arrays row by row with examples placed one after another."""

    def __init__(self, batch_size: int, seq_len: int, pad_id: int):
        self.tokens = np.full((batch_size, seq_len), pad_id, dtype=np.int32)
        self.loss_mask = np.zeros((batch_size, seq_len), dtype=bool)
        self.segment_ids = np.zeros((batch_size, seq_len), dtype=np.int32)
        self.positions = np.zeros((batch_size, seq_len), dtype=np.int32)
        self.num_examples = 0

    def place(self, row: int, start: int, segment: int, example: TokenizedExample) -> None:
        end = start + example.length
        self.tokens[row, start:end] = example.tokens
        self.loss_mask[row, start:end] = example.loss_mask
        # The first token of a segment is never a target: nothing in the segment predicts it.
        self.loss_mask[row, start] = False
        self.segment_ids[row, start:end] = segment
        self.positions[row, start:end] = np.arange(example.length, dtype=np.int32)
        self.num_examples += 1

    def build(self) -> Batch:
        return Batch(
            self.tokens, self.loss_mask, self.segment_ids, self.positions, self.num_examples
        )


def _check_sizes(batch_size: int, seq_len: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be a positive integer")
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be at least 2")


def _too_long(example: TokenizedExample, seq_len: int) -> ValueError:
    return ValueError(
        f"an example has {example.length} tokens, more than seq_len={seq_len}; tokenize with "
        f"max_length <= {seq_len} so that long prompts are truncated"
    )


def pad_rows(
    examples: Sequence[TokenizedExample],
    *,
    seq_len: int,
    pad_id: int,
    batch_size: int | None = None,
) -> Batch:
    """Put one example per row, right-padded to ``seq_len``.

    ``batch_size`` (default: the number of examples) fixes B; rows beyond the
    examples are all padding.
    """
    batch_size = len(examples) if batch_size is None else batch_size
    _check_sizes(batch_size, seq_len)
    if len(examples) > batch_size:
        raise ValueError(f"{len(examples)} examples do not fit batch_size={batch_size} rows")
    builder = _RowBuilder(batch_size, seq_len, pad_id)
    for row, example in enumerate(examples):
        if example.length > seq_len:
            raise _too_long(example, seq_len)
        builder.place(row, 0, 1, example)
    return builder.build()


def padded_batches(
    examples: Iterable[TokenizedExample],
    *,
    batch_size: int,
    seq_len: int,
    pad_id: int,
    bucket_lengths: Sequence[int] | None = None,
    drop_remainder: bool = False,
) -> Iterator[Batch]:
    """Yield [batch_size, L] batches with one example per row.

    Without ``bucket_lengths`` every batch has L = ``seq_len``.
    ``bucket_lengths`` is an increasing list whose last entry is at most
    ``seq_len``, and ``seq_len`` is appended when missing. Every example goes
    to the smallest bucket that fits it, and a bucket emits a batch with L =
    its length whenever it has ``batch_size`` examples, so only a few
    shapes occur.
    Leftover examples are emitted in padded partial batches at the end unless
    ``drop_remainder``.
    """
    _check_sizes(batch_size, seq_len)
    buckets = _bucket_list(bucket_lengths, seq_len)
    pending: dict[int, list[TokenizedExample]] = {length: [] for length in buckets}
    for example in examples:
        if example.length > seq_len:
            raise _too_long(example, seq_len)
        length = next(length for length in buckets if example.length <= length)
        pending[length].append(example)
        if len(pending[length]) == batch_size:
            yield pad_rows(pending[length], seq_len=length, pad_id=pad_id, batch_size=batch_size)
            pending[length] = []
    if not drop_remainder:
        for length in buckets:
            if pending[length]:
                yield pad_rows(
                    pending[length], seq_len=length, pad_id=pad_id, batch_size=batch_size
                )


def _bucket_list(bucket_lengths: Sequence[int] | None, seq_len: int) -> list[int]:
    if bucket_lengths is None:
        return [seq_len]
    buckets = [int(length) for length in bucket_lengths]
    if any(b <= a for a, b in zip(buckets, buckets[1:], strict=False)) or not buckets:
        raise ValueError(f"bucket_lengths={list(bucket_lengths)} must be strictly increasing")
    if buckets[0] < 2 or buckets[-1] > seq_len:
        raise ValueError(
            f"bucket_lengths={list(bucket_lengths)} must lie between 2 and seq_len={seq_len}"
        )
    if buckets[-1] != seq_len:
        buckets.append(seq_len)
    return buckets


def pack_rows(
    examples: Sequence[TokenizedExample],
    *,
    seq_len: int,
    max_open_rows: int = 64,
) -> list[list[TokenizedExample]]:
    """Assign examples to rows of ``seq_len`` tokens by first fit, keeping their order.

    Each example goes to the first open row with room; when ``max_open_rows``
    rows are open, the fullest one is closed first. This bounds the work per
    example while wasting little space. Returns the rows in order of creation.
    """
    if max_open_rows < 1:
        raise ValueError(f"max_open_rows={max_open_rows} must be a positive integer")
    rows: list[list[TokenizedExample]] = []
    used: list[int] = []
    open_rows: list[int] = []
    for example in examples:
        if example.length > seq_len:
            raise _too_long(example, seq_len)
        target = next((r for r in open_rows if used[r] + example.length <= seq_len), None)
        if target is None:
            if len(open_rows) == max_open_rows:
                fullest = max(open_rows, key=lambda r: used[r])
                open_rows.remove(fullest)
            target = len(rows)
            rows.append([])
            used.append(0)
            open_rows.append(target)
        rows[target].append(example)
        used[target] += example.length
        if used[target] == seq_len:
            open_rows.remove(target)
    return rows


def packed_batch(
    rows: Sequence[Sequence[TokenizedExample]], *, seq_len: int, pad_id: int, batch_size: int
) -> Batch:
    """Lay out packed rows (from :func:`pack_rows`) as one [batch_size, seq_len] batch."""
    _check_sizes(batch_size, seq_len)
    if len(rows) > batch_size:
        raise ValueError(f"{len(rows)} rows do not fit batch_size={batch_size}")
    builder = _RowBuilder(batch_size, seq_len, pad_id)
    for row, row_examples in enumerate(rows):
        start = 0
        for segment, example in enumerate(row_examples, start=1):
            if start + example.length > seq_len:
                raise ValueError(
                    f"row {row} needs {start + example.length} tokens, more than seq_len={seq_len}"
                )
            builder.place(row, start, segment, example)
            start += example.length
    return builder.build()


def packed_batches(
    examples: Iterable[TokenizedExample],
    *,
    batch_size: int,
    seq_len: int,
    pad_id: int,
    drop_remainder: bool = False,
    max_open_rows: int = 64,
) -> Iterator[Batch]:
    """Yield [batch_size, seq_len] batches with several examples per row (segments 1..k).

    Examples are packed by :func:`pack_rows` over the whole input; the last
    batch is filled with all-padding rows unless ``drop_remainder`` drops it.
    """
    _check_sizes(batch_size, seq_len)
    rows = pack_rows(list(examples), seq_len=seq_len, max_open_rows=max_open_rows)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        if len(chunk) < batch_size and drop_remainder:
            return
        yield packed_batch(chunk, seq_len=seq_len, pad_id=pad_id, batch_size=batch_size)
