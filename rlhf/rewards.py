"""Named reward functions for GRPO, RLOO and PPO: programs that score completions, no humans needed.

A job names them in `reward.functions`, each with a weight. A function takes `prompts` and `completions` as
keywords, each item a plain string or a conversation (a list of messages), and returns one float per completion.
GRPO and RLOO call it through TRL, which also passes the dataset's other columns and its own extras as keywords
(so take `**_`); PPO's controller and the before/after figures pass conversations and nothing else. Register a new
one with `@reward_function("name")`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from tuneyard.training.errors import UserError

RewardFn = Callable[..., list[float]]
REGISTRY: dict[str, RewardFn] = {}


def reward_function(name: str) -> Callable[[RewardFn], RewardFn]:
    """Register a reward function under `name`."""

    def register(fn: RewardFn) -> RewardFn:
        fn.__name__ = name  # TRL logs each reward under its function's name
        REGISTRY[name] = fn
        return fn

    return register


def lookup(name: str) -> RewardFn:
    """The registered function, or an error that lists the registered names."""
    if name not in REGISTRY:
        raise UserError(
            f"reward.functions: unknown reward function '{name}'; registered: {', '.join(sorted(REGISTRY))}"
        )
    return REGISTRY[name]


def text_of(item: str | list[dict]) -> str:
    """The text of a plain completion, or of the last message of a conversational one."""
    return item if isinstance(item, str) else item[-1]["content"]


def last_user_turn(prompt: str | list[dict]) -> str:
    """A plain prompt, or the text of a conversation's last user turn."""
    return prompt if isinstance(prompt, str) else next(m["content"] for m in reversed(prompt) if m["role"] == "user")


def last_word_of_prompt(prompt: str | list[dict]) -> str:
    """The expected answer of the shipped task: the last word after 'Say the last word:'."""
    return last_user_turn(prompt).rsplit(":", 1)[-1].split()[-1]


@reward_function("last_word_exact")
def last_word_exact(prompts: list, completions: list, **_: object) -> list[float]:
    """1.0 when the completion is exactly the prompt's last word, else 0.0."""
    return [float(text_of(c).strip() == last_word_of_prompt(p)) for p, c in zip(prompts, completions, strict=True)]


CALCULATOR_QUESTION = re.compile(r"What is (\d+) ([+-]) (\d+)\?")


def calculator_answer(prompt: str | list[dict]) -> str:
    """The calculator example's expected answer: the value "What is A + B?" (or A - B) asks for, written out (""
    if the prompt asks no such question)."""
    asked = CALCULATOR_QUESTION.search(last_user_turn(prompt))
    if asked is None:
        return ""
    a, b = int(asked[1]), int(asked[3])
    return str(a + b if asked[2] == "+" else a - b)


@reward_function("calculator_exact")
def calculator_exact(prompts: list, completions: list, **_: object) -> list[float]:
    """1.0 when the completion is exactly the value the prompt asks for ("What is A + B?" or A - B: the calculator
    example's task), else 0.0; a prompt that asks no such question scores 0.0."""
    return [float(text_of(c).strip() == calculator_answer(p) != "") for p, c in zip(prompts, completions, strict=True)]


@reward_function("last_word_in_answer")
def last_word_in_answer(prompts: list, completions: list, **_: object) -> list[float]:
    """Partial credit: 1.0 when the prompt's last word appears among the completion's words."""
    return [
        float(last_word_of_prompt(p) in re.findall(r"[\w']+", text_of(c)))
        for p, c in zip(prompts, completions, strict=True)
    ]


@reward_function("one_word")
def one_word(prompts: list, completions: list, **_: object) -> list[float]:
    """1.0 for an answer of exactly one word (the format the task asks for), else 0.0."""
    return [float(len(text_of(c).split()) == 1) for c in completions]
