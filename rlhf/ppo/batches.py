"""Token layout of PPO samples: left-padded prompts, right-padded responses, and the slices between them.

One layout is used for every forward pass of a rollout (old log-probs, reference log-probs, values)
and of training, so the new/old probability ratio starts at exactly 1:

    sequences      [B, P + R]   prompt left-padded to P, response right-padded to R
    attention_mask [B, P + R]   1 on real prompt tokens and on the response up to its end (its first EOS)
    position_ids   [B, P + R]   counted over real tokens only, as `generate` counts them
    action_mask    [B, R]       1 on the response tokens that the policy chose and that count

The logits at position P - 1 + t predict response token t, so every per-token tensor of the
algorithm is [B, R] and comes from `logits[:, P - 1 : -1]`.
"""

from __future__ import annotations

import torch


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as one left-padded [B, P] tensor and its attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids, mask


def position_ids_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens (pads get 0), the way `generate` places left-padded prompts."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as one right-padded [B, R] tensor (at least one column) and its mask."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def right_pad_values(rows: list[list[float]]) -> torch.Tensor:
    """Per-token values of the responses (e.g. an engine's log-probs) as one [B, R] tensor laid out like `right_pad`."""
    width = max(1, max(len(r) for r in rows))
    values = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, row in enumerate(rows):
        values[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return values


def build_samples(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, responses: list[list[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """The full layout of a batch from left-padded prompts and their responses (each already cut after EOS)."""
    response_ids, action_mask = right_pad(responses, pad_id)
    attention_mask = torch.cat([prompt_mask, action_mask], dim=1)
    return {
        "sequences": torch.cat([prompt_ids, response_ids], dim=1),
        "attention_mask": attention_mask,
        "position_ids": position_ids_of(attention_mask),
        "action_mask": action_mask,
    }


def select_rows(batch: dict[str, torch.Tensor], rows: torch.Tensor | slice) -> dict[str, torch.Tensor]:
    """The same rows of every [B, ...] tensor of a batch."""
    return {k: v[rows] for k, v in batch.items()}


def split_rows(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    """A batch cut into `parts` equal, consecutive shards (one per rank of a role group)."""
    size = next(iter(batch.values())).shape[0]
    if size % parts:
        raise ValueError(f"{size} samples do not split evenly over {parts} workers")
    step = size // parts
    return [select_rows(batch, slice(i * step, (i + 1) * step)) for i in range(parts)]


def concat_rows(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The shards of `split_rows` (or the ranks' answers) joined back in order."""
    return {k: torch.cat([s[k] for s in shards], dim=0) for k in shards[0]}
