"""PPO's prompts: each rendered once with the chat template into token ids, and the seeded order they are drawn in."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from tuneyard.training.errors import UserError


@dataclass
class Prompt:
    """One training prompt: the conversation (for rewards) and its token ids (for the policy)."""

    messages: list[dict]
    ids: list[int]
    metadata: dict = field(default_factory=dict)  # the row's other columns (sent to a remote reward service)


def tokenize_prompts(
    rows: list[dict],
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_length: int,
    source: str,
    tools: list[dict] | None = None,
) -> list[Prompt]:
    """Render each prompt with the chat template (ready for the answer, showing `tools`' JSON schemas where the
    template shows tools) and refuse one over the limit."""
    prompts = []
    for i, row in enumerate(rows):
        messages = row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer("\n".join(m["content"] for m in messages))["input_ids"]
        if len(ids) > max_prompt_length:
            raise UserError(
                f"{source}: prompt {i + 1} ({messages[-1]['content'][:60]!r}...) is {len(ids)} tokens, over "
                f"ppo.max_prompt_length {max_prompt_length}; raise ppo.max_prompt_length or shorten that prompt"
            )
        prompts.append(Prompt(messages, ids, {k: v for k, v in row.items() if k != "prompt"}))
    return prompts


def prompts_at(prompts: list[Prompt], position: int, count: int, seed: int) -> list[Prompt]:
    """`count` prompts from `position` on in the stream of seeded shuffles of the prompts (reshuffled every pass).

    A pure function of the position, so a resumed run (which keeps its position in its checkpoint) reads the very
    prompts the uninterrupted one would."""
    chosen = []
    for at in range(position, position + count):
        epoch, offset = divmod(at, len(prompts))
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed + epoch))
        chosen.append(prompts[int(order[offset])])
    return chosen


def batch_seed(seed: int, position: int, wanted: int) -> int:
    """The sampling seed of the batch of `wanted` prompts at `position` in the stream (an engine adds each prompt's
    index), so a resumed or a generated-ahead batch samples what the synchronous loop's would."""
    return seed + 100_003 * (position // wanted)


def batch_prompts(prompts: list[Prompt], position: int, wanted: int, group: int, seed: int) -> list[Prompt]:
    """The `wanted` prompts at `position` in the stream, each repeated `group` times (samples_per_prompt)."""
    return [p for p in prompts_at(prompts, position, wanted, seed) for _ in range(group)]
