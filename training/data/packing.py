"""Sequence maths: pretraining blocks, assistant-only labels, and the packed-rows collator.

SFT examples are packed into max_length rows by TRL's best-fit-decreasing `pack_dataset` (at
tokenisation time, so the packing is cached too). How the rows reach the model depends on the
attention kernel: flash-attn takes the whole batch flattened into one varlen sequence (TRL's
padding-free collator); sdpa and eager take `PackedRowsCollator`'s [rows, length] layout, where
each row's block-diagonal mask costs rows x length^2 instead of (rows x length)^2.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

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


def restarting_positions(seq_lengths: Sequence[int], width: int) -> list[int]:
    """Position ids that restart at 0 for each packed example; the padded tail is one more segment."""
    positions = [p for length in seq_lengths for p in range(length)]
    return positions + list(range(width - len(positions)))


@dataclass
class PackedRowsCollator:
    """Batch packed rows as [rows, width]: position ids restart per example and there is no attention mask,
    so the model builds a block-diagonal causal mask per row and no token attends across examples. The width is
    the longest row's, rounded up to `pad_to_multiple_of` (sequence parallelism slices rows into equal shares)."""

    pad_token_id: int
    pad_to_multiple_of: int = 1

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(row["input_ids"]) for row in rows)
        width = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row.get("labels", row["input_ids"]))
            position_ids[i] = torch.tensor(restarting_positions(row.get("seq_lengths", [n]), width))
        labels[position_ids == 0] = IGNORE_INDEX  # an example's first token is not predicted from the one before
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
