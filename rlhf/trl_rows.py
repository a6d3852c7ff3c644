"""Validated preference/prompt rows as the datasets TRL's trainers take (conversational when the
tokenizer has a chat template, so TRL renders the prompt and answers with it)."""

from __future__ import annotations

import random

import datasets
from transformers import PreTrainedTokenizerBase

from tuneyard.training.config import DataConfig
from tuneyard.training.data.sources import read_splits
from tuneyard.training.errors import UserError
from tuneyard.training.stages import stage_spec


def as_messages(value: str | list[dict], role: str) -> list[dict]:
    """A message list, wrapping a plain string as one message of `role`."""
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def as_text(value: str | list[dict]) -> str:
    """A plain string, joining message contents when given a message list."""
    return value if isinstance(value, str) else "\n".join(m["content"] for m in value)


def unpair(rows: list[dict]) -> list[dict]:
    """Unpaired feedback rows: a preference pair becomes its desirable and its undesirable completion."""
    out = []
    for row in rows:
        if "completion" in row:
            out.append(row)
        else:
            out += [
                {"prompt": row["prompt"], "completion": row["chosen"], "label": True},
                {"prompt": row["prompt"], "completion": row["rejected"], "label": False},
            ]
    return out


def prompt_of(row: dict) -> str | list[dict]:
    """A row's prompt: its `prompt`, or a `messages` row's turns before its last assistant turn."""
    if "prompt" in row:
        return row["prompt"]
    messages = row["messages"]
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    return messages[:last]


def to_trl_rows(stage: str, rows: list[dict], conversational: bool) -> list[dict]:
    """Rows in the shape TRL expects for the stage: prompt/chosen/rejected, prompt/completion/label, or prompt."""
    convert = (lambda v, role: as_messages(v, role)) if conversational else (lambda v, role: as_text(v))
    if stage_spec(stage).prompt_only:
        return [{"prompt": convert(prompt_of(row), "user")} for row in rows]
    if stage == "kto":
        return [
            {
                "prompt": convert(row["prompt"], "user"),
                "completion": convert(row["completion"], "assistant"),
                "label": row["label"],
            }
            for row in unpair(rows)
        ]
    return [
        {
            "prompt": convert(row["prompt"], "user"),
            "chosen": convert(row["chosen"], "assistant"),
            "rejected": convert(row["rejected"], "assistant"),
        }
        for row in rows
    ]


def rlhf_datasets(stage: str, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> dict:
    """Train (and eval) datasets of a reward, dpo, kto, grpo, rloo or distill job, read and validated from data."""
    formats = stage_spec(stage).formats
    if cfg.format not in formats:
        raise UserError(f"stage {stage} reads data.format {' or '.join(formats)}, not '{cfg.format}'")
    train, held = read_splits(cfg, seed)
    if stage == "kto":
        # TRL's KTO reads its train set in order (the KL term pairs each completion with a neighbour's prompt,
        # fixed before training), so a file sorted by label, or a pair's two halves side by side, would give
        # one-sided batches and KL pairs that share their prompt: shuffle once, the same on every rank
        train = unpair(train)
        random.Random(seed).shuffle(train)
    conversational = tokenizer.chat_template is not None
    splits = {"train": datasets.Dataset.from_list(to_trl_rows(stage, train, conversational))}
    if held is not None:
        splits["eval"] = datasets.Dataset.from_list(to_trl_rows(stage, held, conversational))
    return splits
