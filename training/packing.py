"""Pure sequence maths: pretraining blocks, assistant-only labels, packed position ids."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

IGNORE_INDEX = -100


def pack_into_blocks(documents: Iterable[Sequence[int]], block_size: int) -> list[list[int]]:
    """Concatenate token lists (each already ending in EOS) and cut `block_size` blocks; drop the tail."""
    stream: list[int] = []
    for doc in documents:
        stream.extend(doc)
    return [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]


def labels_from_spans(
    input_ids: Sequence[int], offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> list[int]:
    """Copy a token id into the labels when its characters overlap a span, else IGNORE_INDEX.

    Overlap, not containment: a byte-level token such as 'Ġcat' starts on the space that the
    template's generation prompt owns, yet it is the answer's first token.
    """
    labels = []
    for token_id, (start, end) in zip(input_ids, offsets, strict=True):
        inside = any(start < hi and end > lo for lo, hi in spans)
        labels.append(token_id if inside else IGNORE_INDEX)
    return labels


def packed_position_ids(lengths: Sequence[int]) -> list[int]:
    """Position ids that restart at 0 for each packed sequence, so attention stays within each one."""
    return [p for length in lengths for p in range(length)]


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group sequence indexes into bins of at most `capacity` tokens (longest first, first bin that fits)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        length = lengths[index]
        if length > capacity:
            raise ValueError(f"sequence {index} has {length} tokens, more than the bin capacity {capacity}")
        for b, free in enumerate(room):
            if length <= free:
                bins[b].append(index)
                room[b] -= length
                break
        else:
            bins.append([index])
            room.append(capacity - length)
    return bins
