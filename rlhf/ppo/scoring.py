"""Scalar rewards of finished responses: a reward model reading its own rendering of the text, and the
weighted named functions of `tuneyard.rlhf.rewards`."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tuneyard.rlhf.config import RewardFunction
from tuneyard.rlhf.rewards import lookup


def render_for_reward_model(tokenizer: PreTrainedTokenizerBase, prompt: list[dict], response: str) -> list[int]:
    """The reward model's token ids of a conversation: its chat template when it has one, else plain text."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = "\n".join(m["content"] for m in prompt) + "\n" + response
    return tokenizer(text)["input_ids"]


@torch.no_grad()
def reward_model_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[dict]],
    responses: list[str],
    batch_size: int = 8,
) -> list[float]:
    """The one-output classifier's score of each (prompt, response), read as it was trained (right padding)."""
    scores: list[float] = []
    for start in range(0, len(prompts), batch_size):
        rows = [
            render_for_reward_model(tokenizer, p, r)
            for p, r in zip(prompts[start : start + batch_size], responses[start : start + batch_size], strict=True)
        ]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
        scores.extend(logits[:, 0].float().cpu().tolist())
    return scores


def function_scores(functions: list[RewardFunction], prompts: list[list[dict]], responses: list[str]) -> list[float]:
    """The weighted sum of the named reward functions for each (prompt, response)."""
    completions = [[{"role": "assistant", "content": r}] for r in responses]
    total = [0.0] * len(prompts)
    for function in functions:
        values = lookup(function.name)(prompts=prompts, completions=completions)
        total = [t + function.weight * v for t, v in zip(total, values, strict=True)]
    return total
