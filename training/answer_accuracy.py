"""Program-checked evaluation: greedy answers to held-out chat prompts, scored by exact match."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@torch.no_grad()
def greedy_answer(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: list[dict], max_new_tokens: int = 16
) -> str:
    """The model's greedy reply to a chat prompt, special tokens stripped."""
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def exact_match_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[dict]) -> float:
    """Share of `messages` rows whose last assistant turn the model reproduces exactly (greedy)."""
    model.eval()
    correct = 0
    for row in rows:
        messages = row["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        answer = greedy_answer(model, tokenizer, messages[:last])
        correct += answer == messages[last]["content"].strip()
    return correct / max(len(rows), 1)
