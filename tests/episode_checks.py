"""The token-in/token-out check of multi-turn episodes, shared by the HF-generate test (tests/test_environments.py)
and the vLLM one (tests/test_vllm_rollout.py): a relay environment that always answers, two chat templates that
use the tiny tokenizer's own marker tokens (one renders every turn as it was, one rewrites earlier assistant
turns as Qwen3 drops their reasoning), and an inner rollout that records what its engine sampled."""

from __future__ import annotations

from tuneyard.rlhf.config import EnvironmentSection
from tuneyard.rlhf.environments import Step, environment
from tuneyard.rlhf.ppo.episodes import EpisodeRollout, message_delta
from tuneyard.rlhf.ppo.prompts import Prompt
from tuneyard.rlhf.ppo.rollout import Rollout, Sample

TEMPLATES = {
    # role headers and an end-of-turn marker, every turn rendered as it is (the tiny tokenizer's own)
    "turns_as_they_are": (
        "{% for message in messages %}{{ '<|' + message['role'] + '|> ' + message['content'] + '<|end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    ),
    # the same, but an assistant turn before the last user turn is rendered normalised (no space after its header),
    # as Qwen3's template renders earlier turns without their reasoning: a conversation re-rendered from text is
    # not the token ids that were sampled
    "earlier_turns_rewritten": (
        "{% set ns = namespace(last=0) %}{% for m in messages %}{% if m['role'] == 'user' %}"
        "{% set ns.last = loop.index0 %}{% endif %}{% endfor %}"
        "{% for m in messages %}{% set gap = ' ' %}"
        "{% if m['role'] == 'assistant' and loop.index0 < ns.last %}{% set gap = '' %}{% endif %}"
        "{{ '<|' + m['role'] + '|>' + gap + m['content'] + '<|end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    ),
}


@environment("relay")
class Relay:
    """Answers every assistant turn with a user turn naming it (a reward of 0.25 per turn), until max_turns."""

    def __init__(self, section: EnvironmentSection) -> None:
        self.turn = 0

    def reset(self, prompt: Prompt) -> None:
        self.turn = 0

    def step(self, answer: str) -> Step:
        self.turn += 1
        return Step([{"role": "user", "content": f"turn {self.turn} said {answer[:20]!r}; go on"}], reward=0.25)


class Recording:
    """An inner rollout that records each call's contexts and answers."""

    def __init__(self, sample) -> None:
        self.inner_sample, self.calls = sample, []
        self.figures: dict[str, float] = {}

    def start(self) -> None:
        pass

    def update_weights(self) -> dict[str, float]:
        return {}

    def sample(self, prompts: list[Prompt], seed: int, version: int) -> list[Sample]:
        answers = self.inner_sample(prompts, seed, version)
        self.calls.append(([list(p.ids) for p in prompts], answers))
        return answers


def check_episodes(tokenizer, inner_sample, prompts: list[Prompt], max_turns: int = 3) -> dict[str, int]:
    """Run the relay episodes and check, per episode: each turn's context is the prompt plus every token so far; the
    episode's tokens are the sampled turns and the template's deltas, in order; the batch's action mask is 1
    exactly on the sampled tokens. Returns counts: episodes, assistant turns, and the episodes whose conversation
    re-rendered from text does not give back the trained tokens."""
    recording = Recording(inner_sample)
    section = EnvironmentSection(name="relay", max_turns=max_turns)
    rollout = EpisodeRollout(recording, section, tokenizer, max_new_tokens=8)
    samples = rollout.sample(prompts, seed=11, version=4)
    batch = Rollout.of(samples, tokenizer.pad_token_id).batch
    width = batch["sequences"].shape[1] - batch["action_mask"].shape[1]
    # replay: per episode, its answers in the order of the calls it took part in
    turns: list[list[Sample]] = [[] for _ in prompts]  # answers, and the deltas between them
    answered = [0] * len(prompts)
    running = list(range(len(prompts)))
    for contexts, answers in recording.calls:
        for index, context, answer in zip(running, contexts, answers, strict=True):
            expected_context = prompts[index].ids + [t for s in turns[index] for t in s.tokens]
            assert context == expected_context, f"episode {index}: turn {answered[index] + 1}'s context"
            turns[index].append(answer)
            answered[index] += 1
        running = [i for i in running if turns[i][-1].finished and answered[i] < max_turns]
        for i in running:  # the relay's message went in as a delta after the answer
            turns[i].append(Sample(prompts[i], relay_delta(tokenizer, turns[i]), True, 4, "", sampled=[False]))
    assert len(recording.calls) <= max_turns
    rerendered = 0
    for i, sample in enumerate(samples):
        want_tokens = [t for s in turns[i] for t in s.tokens]
        want_sampled = [s.sampled is None for s in turns[i] for _ in s.tokens]
        assert sample.tokens == want_tokens, f"episode {i}: its tokens are not its sampled turns and deltas"
        assert sample.sampled == want_sampled, f"episode {i}: sampled mask"
        assert sample.environment_reward == 0.25 * sum(s.sampled is None and s.finished for s in turns[i])
        row = batch["sequences"][i, width : width + len(want_tokens)].tolist()
        assert row == want_tokens, f"episode {i}: the batch's tokens"
        mask = batch["action_mask"][i].tolist()
        assert mask == [float(x) for x in want_sampled] + [0.0] * (len(mask) - len(want_sampled))
        rerendered += (
            tokenizer(conversation_text(tokenizer, prompts[i], turns[i]), add_special_tokens=False)["input_ids"]
            != prompts[i].ids + want_tokens
        )
    return {"episodes": len(samples), "answers": sum(answered), "rerendered_differs": rerendered}


def relay_delta(tokenizer, turns: list[Sample]) -> list[int]:
    """The delta of the relay's message after the episode's last answer."""
    answered = sum(s.sampled is None for s in turns)
    text = turns[-1].text
    return message_delta(tokenizer, [{"role": "user", "content": f"turn {answered} said {text[:20]!r}; go on"}])


def conversation_text(tokenizer, prompt: Prompt, turns: list[Sample]) -> str:
    """The episode re-rendered from text, as a pipeline that re-tokenises conversations would train on it."""
    messages = list(prompt.messages)
    answered = 0
    for turn in turns:
        if turn.sampled is None:
            answered += 1
            messages.append({"role": "assistant", "content": turn.text})
            last_text = turn.text
        else:
            messages.append({"role": "user", "content": f"turn {answered} said {last_text[:20]!r}; go on"})
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    if turns[-1].sampled is not None:  # it ended on the environment's message: the next turn's header follows
        return text + "<|assistant|>"
    return text[: text.rindex("<|end|>") + len("<|end|>")]  # the last answer ends at its end-of-turn token
