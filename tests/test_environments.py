"""Multi-turn environments: tools run in a sandboxed process with limits (real processes), tool calls parsed from
the model's turns, and the chat template's deltas appended as token ids after the sampled turns."""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import tests.sandbox_tools as tools
from tests.episode_checks import TEMPLATES, Recording, check_episodes
from tuneyard.rlhf.config import EnvironmentSection, SandboxSection
from tuneyard.rlhf.environments import Step, ToolEnvironment, environment, tool_calls
from tuneyard.rlhf.ppo.episodes import EpisodeRollout, message_delta
from tuneyard.rlhf.ppo.prompts import Prompt
from tuneyard.rlhf.ppo.rollout import Sample
from tuneyard.rlhf.rewards import calculator_exact
from tuneyard.rlhf.sandbox import run_tool
from tuneyard.rlhf.tools import calculate, tool_schemas
from tuneyard.training.errors import UserError
from tuneyard.training.metrics import figure_panels, read_metrics

ROOT = Path(__file__).resolve().parent.parent
LIMITS = SandboxSection(timeout_s=2, memory_mb=512, cpu_s=2)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie (killed, not yet reaped by init) counts as gone
        return stat.read().split()[2] != "Z"


def test_a_tool_answers_and_its_prints_cannot_forge_the_answer(monkeypatch):
    assert run_tool(calculate, {"expression": "(12 + 30) * 7 - 2 // 2"}, LIMITS).text == "293"
    monkeypatch.setenv("TUNEYARD_TEST_SECRET", "do-not-pass")
    outcome = run_tool(tools.environment_names, {}, LIMITS)
    assert outcome.error is None
    assert set(outcome.text.split(",")) <= {"PATH", "PYTHONPATH", "HOME", "LANG", "PYTHONDONTWRITEBYTECODE", "LC_CTYPE"}


def test_a_tool_that_sleeps_forever_is_killed_at_its_timeout_with_what_it_started(tmp_path):
    started = time.monotonic()
    outcome = run_tool(tools.sleep_forever, {"pid_file": str(tmp_path / "pids")}, LIMITS)
    assert (outcome.text, outcome.error) == ("tool error: timed out after 2 s", "timeout")
    assert time.monotonic() - started < 5
    child, grandchild = map(int, (tmp_path / "pids").read_text().split())
    deadline = time.monotonic() + 5
    while (alive(child) or alive(grandchild)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child) and not alive(grandchild)


def test_a_tool_over_its_memory_or_cpu_limit_or_that_raises_is_an_error_turn():
    outcome = run_tool(tools.allocate, {"gib": 2}, LIMITS)
    assert (outcome.text, outcome.error) == ("tool error: over its memory limit of 512 MiB", "memory")
    outcome = run_tool(tools.spin, {"seconds": 30}, SandboxSection(timeout_s=20, memory_mb=512, cpu_s=1))
    assert (outcome.text, outcome.error) == ("tool error: used up its 1 s of CPU time", "cpu")
    outcome = run_tool(tools.fail, {"message": "bad key"}, LIMITS)
    assert (outcome.text, outcome.error) == ("tool error: ValueError: bad key", "raised")
    outcome = run_tool(tools.lookup, {"key": "k1", "extra": 1}, LIMITS)
    assert outcome.error == "raised" and "unexpected keyword argument 'extra'" in outcome.text


def test_the_tools_environment_answers_calls_and_counts_errors():
    environment = ToolEnvironment(EnvironmentSection(name="tools", max_turns=3, tools=["lookup"], sandbox=LIMITS))
    step = environment.step('<tool_call>\n{"name": "lookup", "arguments": {"key": "k2"}}\n</tool_call>')
    assert step.messages == [{"role": "tool", "content": "BRAVO"}] and not step.done
    assert step.figures == {"tool_calls": 1.0, "tool_errors": 0.0}
    step = environment.step('<tool_call>{"name": "search", "arguments": {}}</tool_call><tool_call>{oops}</tool_call>')
    assert [m["content"] for m in step.messages] == [
        "tool error: no tool named 'search'; tools: lookup",
        'tool error: not a call: {oops} (write {"name": ..., "arguments": {...}})',
    ]
    assert step.figures == {"tool_calls": 2.0, "tool_errors": 2.0}
    step = environment.step("The code is BRAVO.")
    assert step.done and step.messages is None
    assert tool_calls("no call here") == []
    with pytest.raises(UserError, match="unknown tool 'nope'; registered: "):
        ToolEnvironment(EnvironmentSection(name="tools", tools=["nope"]))
    assert tool_schemas(["lookup"])[0]["function"]["parameters"]["required"] == ["key"]


def test_the_calculator_examples_calls_are_the_ones_the_tools_environment_runs():
    """The calculator example's SFT rows replayed through the `tools` environment: every call it shows is parsed and
    answered with the row's own tool turn, every direct answer ends the episode, and the reward passes an answer
    only after the tool."""
    rows = [json.loads(line) for line in (ROOT / "examples" / "data" / "calculator-train.jsonl").open()][:40]
    section = EnvironmentSection(name="tools", max_turns=3, tools=["calculate"], sandbox=LIMITS, parallel_steps=1)
    passed = []
    for row in rows:
        environment, turns = ToolEnvironment(section), row["messages"][1:]
        for index, turn in enumerate(turns):
            if turn["role"] != "assistant":
                continue
            step = environment.step(turn["content"])
            assert step.done == (index == len(turns) - 1), row
            assert step.messages == (None if step.done else [turns[index + 1]]), row
        passed += calculator_exact([row["messages"][:1]], [turns[-1:]])
    called = [len(row["messages"]) == 4 for row in rows]
    assert 0 < sum(called) < len(rows) and passed == [float(c) for c in called]


def test_the_environment_steps_of_a_turn_run_at_once():
    """A turn's episodes step their environments side by side (`parallel_steps`, as a batch's tool calls overlap):
    four steps that each wait at one barrier for all four finish, and each episode gets its own step's reward."""
    barrier = threading.Barrier(4, timeout=30)  # a step at a time would break it after 30 s

    @environment("barrier")
    class AtTheBarrier:
        def __init__(self, section: EnvironmentSection) -> None:
            pass

        def reset(self, prompt: Prompt) -> None:
            self.asked = prompt.ids[0]

        def step(self, answer: str) -> Step:
            barrier.wait()
            return Step(None, reward=float(self.asked), done=True)

    def answers(prompts: list[Prompt], seed: int, version: int) -> list[Sample]:
        return [Sample(p, [9, 2], True, version, "done") for p in prompts]

    section = EnvironmentSection(name="barrier", max_turns=2, parallel_steps=4)
    rollout = EpisodeRollout(Recording(answers), section, tokenizer=None, max_new_tokens=8)
    samples = rollout.sample([Prompt([{"role": "user", "content": "?"}], [i]) for i in range(4)], seed=0, version=0)
    assert [s.environment_reward for s in samples] == [0.0, 1.0, 2.0, 3.0] and rollout.figures == {"turns": 1.0}


def tokenizer_with(template: str):
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "examples" / "tiny" / "tokenizer")
    from tuneyard.training.data.chat_templates import use_chat_template

    use_chat_template(tokenizer, template)
    return tokenizer


@pytest.mark.parametrize("template", ["chatml", "qwen2_5", "qwen3"])
def test_the_delta_is_what_the_template_puts_after_an_assistant_turn(template):
    """For ChatML, Qwen2.5 and Qwen3 (which drops earlier turns' reasoning): the sampled turn's tokens (ending at the
    end-of-turn token) plus the delta of a tool message decode to the template's own rendering of the whole
    conversation's tail, and the delta ends with the next assistant turn's generation prompt."""
    tokenizer = tokenizer_with(template)
    messages = [{"role": "user", "content": "What is k1?"}]
    tool_turn = '<tool_call>\n{"name": "lookup", "arguments": {"key": "k1"}}\n</tool_call>'
    delta = message_delta(tokenizer, [{"role": "tool", "content": "ALPHA"}])
    whole = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": tool_turn}, {"role": "tool", "content": "ALPHA"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    text = tokenizer.decode(delta)
    assert whole.endswith(text), (text, whole)
    opening = tokenizer.apply_chat_template(messages, tokenize=False)
    generation_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "ALPHA" in text and text.endswith(generation_prompt[len(opening) :])


def eval_prompts(tokenizer, count: int) -> list:
    """`count` prompts of the shipped held-out set (repeated), rendered with the tokenizer's template."""
    import json

    from tuneyard.rlhf.ppo.prompts import tokenize_prompts

    path = ROOT / "examples" / "data" / "last-word-prompts-eval.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return tokenize_prompts([rows[i % len(rows)] for i in range(count)], tokenizer, 128, "eval")


@pytest.mark.integration
@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_hf_episodes_train_on_the_sampled_tokens_and_the_deltas_only(vllm_base, template):
    """100 relay episodes of up to 3 turns, sampled by HF generate at temperature 0.8 with two stop ids, per
    template: every turn's context, every episode's tokens and the batch's action mask are the sampled turns and the
    template's deltas, 0 differences. Re-rendering the conversations from text would not give back the tokens
    trained on where the template rewrites earlier turns."""
    from transformers import AutoModelForCausalLM

    from tuneyard.rlhf.config import GenerationSection
    from tuneyard.rlhf.ppo.rollout import LocalRollout
    from tuneyard.rlhf.ppo.sampling import StopSet
    from tuneyard.training.data.chat_templates import end_of_turn_id

    tokenizer = AutoTokenizer.from_pretrained(vllm_base)
    tokenizer.chat_template = TEMPLATES[template]
    model = AutoModelForCausalLM.from_pretrained(vllm_base).eval()
    stops = StopSet((tokenizer.eos_token_id, end_of_turn_id(tokenizer)))
    hf = LocalRollout(model, tokenizer, stops, GenerationSection(max_new_tokens=8, temperature=0.8))
    counts = check_episodes(tokenizer, hf.sample, eval_prompts(tokenizer, 100))
    assert counts["episodes"] == 100 and counts["answers"] > 250, counts  # most episodes took 3 turns
    if template == "earlier_turns_rewritten":
        assert counts["rerendered_differs"] >= 10, counts


def test_a_rollout_that_splits_its_batch_over_ranks_gets_whole_shares(vllm_base):
    """An inner rollout that splits each batch over 3 ranks (as the HF policy does over its actors) gets batches of a
    multiple of 3 on every turn, however many episodes still run; the padding's answers are dropped."""
    from transformers import AutoModelForCausalLM

    from tuneyard.rlhf.config import GenerationSection
    from tuneyard.rlhf.ppo.episodes import EpisodeRollout
    from tuneyard.rlhf.ppo.rollout import LocalRollout
    from tuneyard.rlhf.ppo.sampling import StopSet
    from tuneyard.training.data.chat_templates import end_of_turn_id

    tokenizer = AutoTokenizer.from_pretrained(vllm_base)
    model = AutoModelForCausalLM.from_pretrained(vllm_base).eval()
    stops = StopSet((tokenizer.eos_token_id, end_of_turn_id(tokenizer)))
    hf = LocalRollout(model, tokenizer, stops, GenerationSection(max_new_tokens=4, temperature=1.0))
    sizes = []

    class ThreeRanks:
        batch_multiple = 3
        figures: dict = {}  # noqa: RUF012

        def sample(self, prompts, seed, version):
            assert len(prompts) % 3 == 0
            sizes.append(len(prompts))
            return hf.sample(prompts, seed, version)

    section = EnvironmentSection(name="relay", max_turns=3)
    samples = EpisodeRollout(ThreeRanks(), section, tokenizer, 4).sample(eval_prompts(tokenizer, 10), 3, 0)
    assert len(samples) == 10 and sizes[0] == 12 and len(sizes) >= 2, sizes


@pytest.mark.integration
def test_a_ppo_run_trains_on_multi_turn_episodes(ray_session, sft_base, tmp_path):
    """PPO with a critic (GAE skips the environment's tokens) on HF-generated relay episodes of up to 2 turns: the
    run completes, each iteration logs its turns per episode (above 1: the episodes went on after their first
    answer), its policy and value losses; the held-out figures score greedy episodes' final answers."""
    from tests.ppo_jobs import iterations_of, ppo_job
    from tuneyard.launch.config import job_from_dict
    from tuneyard.launch.run_job import run_job

    job = ppo_job(
        tmp_path,
        sft_base,
        "relay",
        ppo={"iterations": 2, "environment": {"name": "relay", "max_turns": 2, "max_tokens": 64}},
    )
    result = run_job(job_from_dict(job), show_progress=False)
    rows = iterations_of(result.run_dir)
    assert len(rows) == 2
    assert all(1.0 < r["turns"] <= 2.0 and math.isfinite(r["loss"] + r["value_loss"]) for r in rows), rows
    before, after = result.figures["greedy turns"]
    assert 1.0 < before <= 2.0 and 1.0 < after <= 2.0 and "task acc." in result.figures, result.figures
    panels = [key for key, _ in figure_panels([read_metrics(result.run_dir / "metrics.jsonl")])]
    assert panels == ["loss", "reward", "kl", "turns"]  # `tuneyard plot`: a tools run adds a tool-error panel


def test_a_tools_run_plots_its_turns_and_tool_errors():
    records = [{"step": 1, "loss": 0.4, "reward": 0.4, "turns": 1.4, "tool_calls": 51.0, "tool_errors": 0.0}]
    assert [key for key, _ in figure_panels([records])] == ["loss", "reward", "turns", "tool_errors"]
