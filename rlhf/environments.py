"""Environments for online RL (`ppo.environment`): what happens between an episode's assistant turns.

An environment is a small class, registered with `@environment("name")` and built from the job's
`ppo.environment` section, one instance per episode:

    reset(prompt)  a fresh episode on this prompt (its messages, and its row's other columns in prompt.metadata)
    step(answer)   the assistant turn's text -> Step(messages to add, or None; a reward, or None; done)

The episode's first turn answers the prompt row's messages (rendered once, with the tools' schemas). What `step`
adds is rendered by the chat template as a delta and appended as token ids after the sampled turn
(rlhf/ppo/episodes.py): the model's tokens are never re-tokenised. The reward of `step` (if any) adds to the reward
functions' score of the final answer.

Shipped: `single_turn` (one answer, the loop of every existing job) and `tools` (ToolEnvironment).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from tuneyard.rlhf.config import EnvironmentSection
from tuneyard.rlhf.ppo.prompts import Prompt
from tuneyard.rlhf.sandbox import run_tool
from tuneyard.rlhf.tools import lookup_tool
from tuneyard.training.errors import UserError

ENVIRONMENTS: dict[str, type] = {}


def environment(name: str) -> Callable[[type], type]:
    """Register an environment class under `name`."""

    def register(cls: type) -> type:
        ENVIRONMENTS[name] = cls
        return cls

    return register


def environment_class(section: EnvironmentSection) -> type:
    """The registered class of ppo.environment.name, or an error that lists the registered names."""
    if section.name not in ENVIRONMENTS:
        raise UserError(
            f"ppo.environment.name: unknown environment '{section.name}'; registered: {', '.join(sorted(ENVIRONMENTS))}"
        )
    return ENVIRONMENTS[section.name]


@dataclass
class Step:
    """What the environment answers to an assistant turn."""

    messages: list[dict] | None  # appended before the next assistant turn (None: nothing)
    reward: float | None = None  # added to the episode's reward
    done: bool = False
    figures: dict[str, float] = field(default_factory=dict)  # counted into the iteration's figures (summed)


@environment("single_turn")
class SingleTurn:
    """One answer to the prompt: the episode ends after the first assistant turn."""

    def __init__(self, section: EnvironmentSection) -> None:
        self.section = section

    def reset(self, prompt: Prompt) -> None:
        """Nothing to set up."""

    def step(self, answer: str) -> Step:
        """Done."""
        return Step(None, done=True)


TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def tool_calls(answer: str) -> list[dict | str]:
    """The tool calls in an assistant turn, in the Hermes format Qwen's and many other templates use:
    <tool_call>{"name": ..., "arguments": {...}}</tool_call>; a call that is not such JSON is its text."""
    calls: list[dict | str] = []
    for text in TOOL_CALL.findall(answer):
        try:
            call = json.loads(text)
        except ValueError:
            calls.append(text)
            continue
        ok = isinstance(call, dict) and isinstance(call.get("name"), str) and isinstance(call.get("arguments"), dict)
        calls.append(call if ok else text)
    return calls


@environment("tools")
class ToolEnvironment:
    """The model calls the job's tools (`ppo.environment.tools`) by writing tool calls; each runs in the sandbox and
    its result comes back as a `tool` message; a turn without a tool call is the final answer. A call of an unknown
    tool, with arguments that are not JSON, or that fails in the sandbox gets an error message (counted in
    `tool_errors`), never an exception."""

    def __init__(self, section: EnvironmentSection) -> None:
        self.section = section
        self.tools = {name: lookup_tool(name) for name in section.tools}

    def reset(self, prompt: Prompt) -> None:
        """Nothing to set up: the tools are stateless."""

    def step(self, answer: str) -> Step:
        """Run the turn's tool calls; no call: done."""
        calls = tool_calls(answer)
        if not calls:
            return Step(None, done=True)
        messages, errors = [], 0
        for call in calls:
            if isinstance(call, str):
                text, failed = f'tool error: not a call: {call[:100]} (write {{"name": ..., "arguments": {{...}}}})', 1
            elif call["name"] not in self.tools:
                text, failed = f"tool error: no tool named {call['name'][:40]!r}; tools: {', '.join(self.tools)}", 1
            else:
                outcome = run_tool(self.tools[call["name"]], call["arguments"], self.section.sandbox)
                text, failed = outcome.text, int(outcome.error is not None)
            errors += failed
            messages.append({"role": "tool", "content": text})
        return Step(messages, figures={"tool_calls": float(len(calls)), "tool_errors": float(errors)})
