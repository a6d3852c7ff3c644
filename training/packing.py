"""Pure sequence maths: pretraining blocks and assistant-only labels.

SFT packing itself (best-fit decreasing into max_length rows, position ids restarting per example)
is TRL's `pack_dataset` and padding-free collator; tests check its logits against unpacked ones.
"""

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
