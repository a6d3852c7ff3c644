"""Multi-turn episodes, token in and token out, over either rollout object (HF generate or vLLM).

An episode is kept as token ids: the prompt's, then for each turn the tokens the engine sampled (as sampled,
ending at the end-of-turn stop), then what the environment adds, rendered by the chat template once as a delta
(`message_delta`) and tokenised once. The conversation is never re-tokenised from text, so a template that renders
earlier turns differently from how they were sampled (Qwen3's drops earlier reasoning) cannot change what is
trained on. The episode's `Sample` holds all its tokens after the prompt, with `sampled` marking the engine's: the
loss, the KL and the entropy see those only; the environment's tokens are context.

Each turn is one `sample` call of the inner rollout on every episode still running (its prompt the episode so
far), so both engines, their stops, behaviour log-probs and seeds work unchanged. Over vLLM engines a batch of
episodes can also be launched ahead of training (`launch`/`collect`, ppo.async): its turns run on a thread of
their own, and each sampled token keeps the version that drew it.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from tuneyard.rlhf.config import EnvironmentSection, PpoSection
from tuneyard.rlhf.environments import environment_class
from tuneyard.rlhf.ppo.prompts import Prompt
from tuneyard.rlhf.ppo.rollout import Generating, Sample
from tuneyard.training.data.chat_templates import SENTINEL, end_of_turn_id
from tuneyard.training.errors import UserError

TURN_SEED_STRIDE = 7_919_993  # turn t of a batch samples with seed + t x this (+ the episode's index)


def message_delta(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """The token ids the chat template puts after an assistant turn's end-of-turn token when `messages` follow it,
    up to the next assistant turn's generation prompt.

    Rendered after a fixed stand-in conversation (a user turn and an assistant turn) and cut after that assistant
    turn's end-of-turn marker in the same rendering, so what the template does to earlier turns (Qwen3 renders an
    assistant turn with an empty reasoning block only while it is the last message) cannot reach the delta."""
    base = [{"role": "user", "content": "?"}, {"role": "assistant", "content": SENTINEL}]
    rendered = tokenizer.apply_chat_template(base + messages, tokenize=False, add_generation_prompt=True)
    end = end_of_turn_id(tokenizer)
    marker = tokenizer.decode([end]) if end is not None else None
    cut = rendered.find(marker, rendered.rindex(SENTINEL)) if marker else -1
    if cut < 0:
        raise UserError(
            "ppo.environment: the chat template has no end-of-turn token after an assistant turn, so an episode "
            "cannot tell where a turn ends and the environment's messages begin; use a template that ends each turn "
            "with a special token (chatml, qwen2_5, qwen3, llama3)"
        )
    return tokenizer(rendered[cut + len(marker) :], add_special_tokens=False)["input_ids"]


@dataclass
class Episode:
    """One episode on its way: its prompt, environment, tokens so far, and what it has gathered."""

    prompt: Prompt
    environment: object
    tokens: list[int] = field(default_factory=list)
    sampled: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] | None = field(default_factory=list)  # the version that drew each token (None: untold)
    text: str = ""
    finished: bool = True
    done: bool = False
    reward: float = 0.0
    turns: int = 0
    figures: dict[str, float] = field(default_factory=dict)

    def add(
        self, tokens: list[int], sampled: bool, logprobs: list[float] | None = None, versions: list[int] | None = None
    ) -> None:
        """Append an answer's tokens (sampled) or the environment's delta (context), with their log-probs and, for
        an answer, the version that drew each token (a delta takes the version of the answer before it)."""
        self.tokens += tokens
        self.sampled += [sampled] * len(tokens)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(tokens)
        if sampled and versions is None:
            self.versions = None
        elif self.versions is not None:
            self.versions += versions if sampled else [self.versions[-1] if self.versions else 0] * len(tokens)

    def sample(self, version: int, engine_logprobs: bool) -> Sample:
        drawn = [v for v, s in zip(self.versions or [], self.sampled, strict=False) if s]
        return Sample(
            prompt=self.prompt,
            tokens=self.tokens,
            finished=self.finished,
            version=min(drawn, default=version),
            text=self.text,
            logprobs=self.logprobs if engine_logprobs else None,
            sampled=self.sampled,
            environment_reward=self.reward,
            token_versions=self.versions if self.versions else None,
        )


class EpisodeRollout:
    """Episodes of `ppo.environment` over a rollout object: `sample` runs every episode's turns and answers one
    `Sample` per prompt, as a single-turn rollout does; `figures` holds the last batch's turns and tool counts."""

    def __init__(
        self, inner, section: EnvironmentSection, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int
    ) -> None:
        self.inner, self.section, self.tokenizer = inner, section, tokenizer
        self.max_new_tokens = max_new_tokens  # a turn's; the next turn starts only if it fits section.max_tokens
        self.environment_class = environment_class(section)
        self.figures: dict[str, float] = {}
        # the episodes of batches launched ahead, one batch at a time (no thread starts until one is)
        self.runner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tuneyard-episodes")
        # the environments' steps of a turn, several at once: each tool call waits on a process of its own
        self.stepper = ThreadPoolExecutor(max_workers=section.parallel_steps, thread_name_prefix="tuneyard-env")

    def start(self) -> None:
        """The inner rollout's."""
        self.inner.start()

    def update_weights(self, wait_for_engines: bool = True) -> dict[str, float]:
        """The inner rollout's (a sync not waited for is loaded before the first turn launched next)."""
        return self.inner.update_weights(wait_for_engines)

    def launch(
        self,
        prompts: list[Prompt],
        seed: int,
        version: int,
        arrived: Callable[[list[Sample]], None] | None = None,
    ) -> Generating:
        """Start `sample` on a thread of its own and return at once (batches generated ahead, over vLLM engines);
        `collect` waits. `arrived` is handed the batch's episodes once they are all done."""

        figures: dict[str, float] = {}

        def episodes() -> tuple[list[Sample], float]:
            samples, busy_s, drawn = self.run(prompts, seed, version)
            figures.update(drawn)
            if arrived is not None:
                arrived(samples)
            return samples, busy_s

        return Generating(prompts, version, self.runner.submit(episodes), figures)

    def collect(self, generating: Generating) -> tuple[list[Sample], float]:
        """A launched batch's episodes, and the engines' busy seconds over its turns."""
        return generating.answers.result()

    def pause(self) -> None:
        """The inner rollout's (partial rollouts: a turn in flight keeps its tokens so far)."""
        self.inner.pause()

    def resume(self, version: int) -> None:
        """The inner rollout's."""
        self.inner.resume(version)

    def sample(self, prompts: list[Prompt], seed: int, version: int) -> list[Sample]:
        """One episode for each prompt, seeded; at most `max_turns` assistant turns each."""
        samples, _, self.figures = self.run(prompts, seed, version)
        return samples

    def run(self, prompts: list[Prompt], seed: int, version: int) -> tuple[list[Sample], float, dict[str, float]]:
        """`sample`'s episodes, the engines' busy seconds over their turns (0 where untold), and their figures."""
        episodes = [Episode(prompt, self.environment_class(self.section)) for prompt in prompts]
        for episode in episodes:
            episode.environment.reset(episode.prompt)
        engine_logprobs, busy_s = False, 0.0
        for turn in range(self.section.max_turns):
            running = [e for e in episodes if not e.done]
            if not running:
                break
            contexts = [Prompt(e.prompt.messages, e.prompt.ids + e.tokens, e.prompt.metadata) for e in running]
            # the policy's ranks each take an equal share of a batch: the last context repeats up to a multiple
            padding = -len(contexts) % getattr(self.inner, "batch_multiple", 1)
            turn_prompts, turn_seed = contexts + contexts[-1:] * padding, seed + turn * TURN_SEED_STRIDE
            if hasattr(self.inner, "launch"):  # the engines also tell how long they were busy
                answers, turn_busy_s = self.inner.collect(self.inner.launch(turn_prompts, turn_seed, version))
                busy_s += turn_busy_s
            else:
                answers = self.inner.sample(turn_prompts, turn_seed, version)
            answers = answers[: len(running)]
            for episode, answer in zip(running, answers, strict=True):
                engine_logprobs = answer.logprobs is not None
                episode.add(answer.tokens, True, answer.logprobs, answer.token_versions)
                episode.text, episode.turns = answer.text, episode.turns + 1
                if not answer.finished:  # cut at max_new_tokens: no end of turn to continue after
                    episode.finished, episode.done = False, True
            stepping = [e for e in running if not e.done]
            steps = self.stepper.map(lambda e: e.environment.step(e.text), stepping)
            for episode, step in zip(stepping, steps, strict=True):
                episode.reward += step.reward or 0.0
                for key, value in step.figures.items():
                    episode.figures[key] = episode.figures.get(key, 0.0) + value
                if step.done or not step.messages:
                    episode.done = True
                    continue
                delta = message_delta(self.tokenizer, step.messages)
                if turn + 1 == self.section.max_turns:
                    episode.done, episode.figures["cut_at_max_turns"] = True, 1.0
                elif len(episode.tokens) + len(delta) + self.max_new_tokens > self.section.max_tokens:
                    episode.done, episode.figures["cut_at_max_tokens"] = True, 1.0
                else:
                    episode.add(delta, False)
        return [e.sample(version, engine_logprobs) for e in episodes], busy_s, episode_figures(episodes)


def with_environment(rollout, ppo: PpoSection, tokenizer: PreTrainedTokenizerBase):
    """`rollout` (started), its samples made episodes of `ppo.environment` when that is more than one answer."""
    if not ppo.environment.multi_turn:
        return rollout
    return EpisodeRollout(rollout, ppo.environment, tokenizer, ppo.generation.max_new_tokens)


def episode_figures(episodes: list[Episode]) -> dict[str, float]:
    """The batch's mean turns per episode and its summed environment counts (tool calls, tool errors, ...)."""
    figures = {"turns": sum(e.turns for e in episodes) / len(episodes)}
    for episode in episodes:
        for key, value in episode.figures.items():
            figures[key] = figures.get(key, 0.0) + value
    return figures


def greedy_episodes(
    model, tokenizer: PreTrainedTokenizerBase, rows: list[dict], section: EnvironmentSection, max_new_tokens: int
) -> tuple[list[str], dict[str, float]]:
    """The final answers of greedy episodes on the rows' prompts (HF generate in this process), and the episodes'
    figures (turns, tool calls and errors): what the held-out figures of a multi-turn job score."""
    from tuneyard.rlhf.config import GenerationSection
    from tuneyard.rlhf.ppo.prompts import tokenize_prompts
    from tuneyard.rlhf.ppo.rollout import LocalRollout
    from tuneyard.rlhf.ppo.sampling import StopSet
    from tuneyard.rlhf.tools import tool_schemas

    stops = StopSet(
        tuple(i for i in dict.fromkeys([tokenizer.eos_token_id, end_of_turn_id(tokenizer)]) if i is not None)
    )
    greedy = GenerationSection(max_new_tokens=max_new_tokens, temperature=0)
    tools = tool_schemas(section.tools) if section.tools else None
    prompts = tokenize_prompts(rows, tokenizer, 10**9, "data.eval", tools)
    rollout = EpisodeRollout(LocalRollout(model, tokenizer, stops, greedy), section, tokenizer, max_new_tokens)
    samples = rollout.sample(prompts, seed=0, version=0)
    return [s.text for s in samples], rollout.figures
