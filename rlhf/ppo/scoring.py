"""Scalar rewards of finished responses: a reward model reading its own rendering of the text, and the
weighted named functions of `tuneyard.rlhf.rewards`, called per answer in threads with a timeout each."""

from __future__ import annotations

import math
import numbers
import threading
import time
from collections.abc import Callable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tuneyard.rlhf.config import RewardFunction
from tuneyard.rlhf.rewards import lookup
from tuneyard.training.errors import TrainingFailed


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


class RewardCallFailed(TrainingFailed):
    """A reward function raised, returned no number, or did not return within reward.timeout_s."""


def function_scores(
    functions: list[RewardFunction],
    prompts: list[list[dict]],
    responses: list[str],
    timeout_s: float,
    parallel_calls: int = 8,
) -> list[float]:
    """The weighted sum of the named reward functions for each (prompt, response).

    Every function is called once per answer, `parallel_calls` calls at a time in daemon threads (a call that hangs
    cannot keep the process alive). A call that raises, returns something other than one number, or runs past
    `timeout_s` ends the scoring with RewardCallFailed naming the function and the prompt: a failed call is never
    scored as 0, which would teach the policy that the answer was wrong."""
    calls = [(function, i) for function in functions for i in range(len(prompts))]

    def call(index: int) -> float:
        function, i = calls[index]
        values = lookup(function.name)(
            prompts=[prompts[i]], completions=[[{"role": "assistant", "content": responses[i]}]]
        )
        if not isinstance(values, list | tuple) or len(values) != 1 or not isinstance(values[0], numbers.Real):
            raise TypeError(f"it returned {values!r:.100}, not a list of one number for one completion")
        if not math.isfinite(values[0]):
            raise ValueError(f"it returned {values[0]} (a reward must be a finite number)")
        return float(values[0])

    def described(index: int) -> str:
        function, i = calls[index]
        user = next((m["content"] for m in reversed(prompts[i]) if m["role"] == "user"), "")
        return f"reward function '{function.name}' on prompt {user[:80]!r} (answer {responses[i][:60]!r})"

    values = call_in_threads(call, len(calls), timeout_s, parallel_calls, described)
    total = [0.0] * len(prompts)
    for (function, i), value in zip(calls, values, strict=True):
        total[i] += function.weight * value
    return total


def call_in_threads(
    call: Callable[[int], float], count: int, timeout_s: float, parallel: int, described: Callable[[int], str]
) -> list[float]:
    """[call(0), ..., call(count - 1)], `parallel` at a time in daemon threads; the first call that raises or runs
    past `timeout_s` raises RewardCallFailed (the calls not yet begun are not begun; one still running is left to
    its daemon thread)."""
    results: list[float | None] = [None] * count
    began: dict[int, float] = {}
    ended: set[int] = set()
    errors: dict[int, BaseException] = {}
    queue = list(range(count - 1, -1, -1))  # popped from the end: calls begin in order
    lock = threading.Condition()
    stopped = threading.Event()

    def work() -> None:
        while not stopped.is_set():
            with lock:
                if not queue:
                    return
                index = queue.pop()
                began[index] = time.monotonic()
            try:
                results[index] = call(index)
            except BaseException as exc:  # the driver reports it; the thread must not die silently
                errors[index] = exc
            with lock:
                ended.add(index)
                lock.notify_all()

    for _ in range(min(parallel, count)):
        threading.Thread(target=work, daemon=True, name="tuneyard-reward").start()
    with lock:
        while True:
            if errors:
                stopped.set()
                index = min(errors)
                exc = errors[index]
                said = " ".join(str(exc).split())[:200]  # one paragraph, whatever the exception's text holds
                raise RewardCallFailed(
                    f"{described(index)} raised {type(exc).__name__}: {said}; a failed call is never scored "
                    "as 0 (that would teach the policy the answer was wrong): fix the function or the service it "
                    "calls, then run the job again to resume from its newest checkpoint"
                )
            if len(ended) == count:
                return [float(v) for v in results]
            now = time.monotonic()
            late = [i for i, t in began.items() if i not in ended and now - t > timeout_s]
            if late:
                stopped.set()
                raise RewardCallFailed(
                    f"{described(min(late))} did not return within reward.timeout_s ({timeout_s:g} s); a call that "
                    "does not return is never scored as 0: fix the function or the service it calls (or raise "
                    "reward.timeout_s), then run the job again to resume from its newest checkpoint"
                )
            lock.wait(timeout=min(1.0, timeout_s))
