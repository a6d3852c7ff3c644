"""Online RL samples and learns from one distribution: HF generate samples softmax(logits / T) with the job's settings
alone (none leak in from generation_config.json), every answer ends at the run's one stop set and says whether it
finished, reward functions run with a timeout and never score a failure as 0, DAPO's overlong filter and dynamic
sampling shape the batch as worked out by hand, and the controller never asks which engine it has."""

from __future__ import annotations

import ast
import contextlib
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import ROOT
from tests.ppo_jobs import iterations_of, ppo_job
from tuneyard.launch.config import job_from_dict
from tuneyard.launch.run_job import run_job
from tuneyard.rlhf.config import GenerationSection, PpoSection, RewardFunction
from tuneyard.rlhf.ppo import algorithms as algo
from tuneyard.rlhf.ppo.experience import RolloutScores, estimate_advantages, with_update_logprobs
from tuneyard.rlhf.ppo.generation import HFGenerator
from tuneyard.rlhf.ppo.prompts import Prompt, prompts_at, tokenize_prompts
from tuneyard.rlhf.ppo.rollout import Rollout, Sample
from tuneyard.rlhf.ppo.sampling import StopSet, end_of_answer, stop_set
from tuneyard.rlhf.ppo.scoring import RewardCallFailed, function_scores
from tuneyard.rlhf.rewards import reward_function
from tuneyard.training.errors import TrainingFailed
from tuneyard.training.metrics import read_metrics

EVAL_PROMPTS = ROOT / "examples" / "data" / "last-word-prompts-eval.jsonl"


def eval_rows() -> list[dict]:
    return [json.loads(line) for line in EVAL_PROMPTS.read_text().splitlines() if line.strip()]


def folder_with_generation_config(source: str, target: Path, **settings) -> Path:
    """A copy of a model folder whose generation_config.json carries `settings`."""
    shutil.copytree(source, target)
    path = target / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**config, **settings}))
    return target


# --- where an answer ends


def decode_of(vocabulary: dict[int, str]):
    return lambda ids: "".join(vocabulary[i] for i in ids)


def test_an_answer_ends_at_its_first_stop_id_or_string_and_says_why():
    decode = decode_of({1: "a", 2: "b", 3: "\n", 4: "<end>", 5: "c\nd"})
    stops = StopSet((4, 9), ("\n",))
    assert end_of_answer([1, 2, 4, 1], StopSet((4, 9)), decode) == (3, True)  # the stop id is kept
    assert end_of_answer([1, 9, 4], StopSet((4, 9)), decode) == (2, True)  # whichever comes first
    assert end_of_answer([1, 2, 1], StopSet((4, 9)), decode) == (3, False)  # truncated
    assert end_of_answer([1, 1, 1, 3, 2, 4], stops, decode) == (4, True)  # the string's token is kept
    assert end_of_answer([1, 5, 2], stops, decode) == (2, True)  # a token that holds the string inside it
    assert end_of_answer([1, 4, 3], stops, decode) == (2, True)  # the id comes before the string
    assert end_of_answer([2] * 9 + [3], StopSet((), ("b\n",)), decode) == (10, True)  # a string over two tokens
    assert end_of_answer([1, 2], StopSet(()), decode) == (2, False)  # stop_at_eos false and no strings


def test_the_stop_set_holds_every_eos_of_the_model_and_the_template(tmp_path, sft_base):
    folder = folder_with_generation_config(sft_base, tmp_path / "two-eos", eos_token_id=[2, 57])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    stops = stop_set(tokenizer, str(folder), GenerationSection(stop=["\n\n"]), trust_remote_code=False)
    assert stops == StopSet((2, 57), ("\n\n",))
    from tuneyard.training.data.chat_templates import use_chat_template

    added = use_chat_template(tokenizer, "chatml")  # a template whose turn ends with its own marker
    stops = stop_set(tokenizer, str(folder), GenerationSection(), trust_remote_code=False)
    assert stops.token_ids == (2, 57, tokenizer.convert_tokens_to_ids("<|im_end|>")) and "<|im_end|>" in added
    assert stop_set(tokenizer, str(folder), GenerationSection(stop_at_eos=False), False) == StopSet(())


# --- HF generate samples what is scored


@pytest.fixture(scope="module")
def leaky_policy(sft_base, tmp_path_factory) -> Path:
    """The SFT model with sampling settings in its generation_config.json that must not reach the rollouts."""
    target = tmp_path_factory.mktemp("leaky") / "model"
    settings = {"do_sample": True, "top_k": 1, "repetition_penalty": 5.0, "temperature": 0.1}
    return folder_with_generation_config(sft_base, target, **settings)


def first_token_logits(model, prompts: list[Prompt]) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([model(torch.tensor([p.ids])).logits[0, -1].float() for p in prompts])


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


def bucketed(distribution: torch.Tensor, likely: torch.Tensor) -> torch.Tensor:
    """The probabilities of the `likely` tokens one by one, and of all the others together (so 8000 samples measure
    the distribution to about 0.02 in total variation instead of the noise of 500 rare tokens)."""
    return torch.cat([distribution[likely], (1 - distribution[likely].sum()).reshape(1)])


@pytest.mark.parametrize("temperature, top_p", [(0.7, 1.0), (1.5, 1.0), (0.7, 0.8)])
def test_hf_samples_follow_the_distribution_the_update_scores(leaky_policy, temperature, top_p):
    """8000 answers to one prompt: the first tokens' frequencies match softmax(sampling_logits) (the numbers every
    log-prob of the update is taken from), while the raw logits' softmax (what the update scored before temperature
    was applied) misses them by far more than the sampling noise; top_k and repetition_penalty in the model's
    generation_config.json change nothing."""
    tokenizer = AutoTokenizer.from_pretrained(leaky_policy)
    model = AutoModelForCausalLM.from_pretrained(leaky_policy).eval()
    prompts = tokenize_prompts(eval_rows()[:24], tokenizer, 128, "eval")
    logits = first_token_logits(model, prompts)
    # the prompt where the temperature matters most, so the test can tell the two distributions apart
    raw = logits.softmax(-1)
    scored = algo.sampling_logits(logits, temperature, top_p).softmax(-1)
    gaps = [total_variation(a, b) for a, b in zip(raw, scored, strict=True)]
    chosen = max(range(len(prompts)), key=gaps.__getitem__)
    assert gaps[chosen] > 0.15, gaps  # a prompt where the two distributions differ clearly

    generator = HFGenerator(lambda: contextlib.nullcontext(model), tokenizer, StopSet((tokenizer.eos_token_id,)))
    count = 8000
    ids = torch.tensor([prompts[chosen].ids] * count)
    cfg = GenerationSection(max_new_tokens=1, temperature=temperature, top_p=top_p)
    answers = generator.generate(ids, torch.ones_like(ids), cfg, seed=11)
    frequencies = torch.bincount(torch.tensor([a[0] for a in answers]), minlength=logits.shape[-1]).float() / count
    likely = ((scored[chosen] >= 0.01) | (raw[chosen] >= 0.01)).nonzero().flatten()
    sampled = bucketed(frequencies, likely)
    assert total_variation(sampled, bucketed(scored[chosen], likely)) < 0.05
    # what the update scored before the temperature was applied describes another distribution
    assert total_variation(sampled, bucketed(raw[chosen], likely)) > 0.1


def test_the_model_generation_config_is_back_after_generating(leaky_policy):
    tokenizer = AutoTokenizer.from_pretrained(leaky_policy)
    model = AutoModelForCausalLM.from_pretrained(leaky_policy).eval()
    generator = HFGenerator(lambda: contextlib.nullcontext(model), tokenizer, StopSet((tokenizer.eos_token_id,)))
    ids = torch.tensor([tokenize_prompts(eval_rows()[:1], tokenizer, 128, "eval")[0].ids] * 64)
    answers = generator.generate(ids, torch.ones_like(ids), GenerationSection(max_new_tokens=3), seed=1)
    assert len({tuple(a) for a in answers}) > 1  # sampled at T 1 with all tokens (top_k 1 would make one answer)
    assert model.generation_config.top_k == 1 and model.generation_config.repetition_penalty == 5.0  # saved as is


# --- reward functions: concurrent, timed, never a silent 0

CALLS: list[float] = []


@reward_function("test_sleeps_a_while")
def sleeps_a_while(prompts: list, completions: list, **_: object) -> list[float]:
    """0.5 s per answer, then its length."""
    CALLS.append(time.monotonic())
    time.sleep(0.5)
    return [float(len(completions[0][0]["content"]))]


@reward_function("test_sleeps_past_the_timeout")
def sleeps_past_the_timeout(prompts: list, completions: list, **_: object) -> list[float]:
    """Hangs on the answer 'hang' (a service that never answers)."""
    if completions[0][0]["content"] == "hang":
        time.sleep(60)
    return [1.0]


@reward_function("test_raises_on_bad")
def raises_on_bad(prompts: list, completions: list, **_: object) -> list[float]:
    """Raises on the answer 'bad', 1.0 otherwise."""
    if completions[0][0]["content"] == "bad":
        raise ConnectionError("the verifier is down")
    return [1.0]


@reward_function("test_returns_text")
def returns_text(prompts: list, completions: list, **_: object) -> list:
    return ["1.0"]


@reward_function("test_returns_nan")
def returns_nan(prompts: list, completions: list, **_: object) -> list:
    return [float("nan")]


@reward_function("test_raises_a_long_story")
def raises_a_long_story(prompts: list, completions: list, **_: object) -> list:
    raise RuntimeError("HTTP 503\n<html>\n  <body>the verifier is down</body>\n</html>")


PROMPTS = [[{"role": "user", "content": f"Say the last word: w{i}"}] for i in range(8)]


def test_reward_calls_run_side_by_side_and_add_up_with_their_weights():
    CALLS.clear()
    started = time.monotonic()
    answers = [f"a{'x' * i}" for i in range(8)]
    functions = [RewardFunction(name="test_sleeps_a_while", weight=2.0), RewardFunction(name="one_word", weight=0.5)]
    scores = function_scores(functions, PROMPTS, answers, timeout_s=30, parallel_calls=8)
    assert scores == [2.0 * (i + 1) + 0.5 for i in range(8)]
    assert time.monotonic() - started < 2.5  # eight calls of 0.5 s at once, not one after another (4 s)
    assert max(CALLS) - min(CALLS) < 0.4


@pytest.mark.parametrize(
    "function, answer, fragments",
    [
        ("test_raises_on_bad", "bad", ["'test_raises_on_bad' on prompt 'Say the last word: w3'", "ConnectionError"]),
        ("test_sleeps_past_the_timeout", "hang", ["did not return within reward.timeout_s (1 s)", "w3'"]),
        ("test_returns_text", "ok", ["it returned ['1.0'], not a list of one number"]),
        ("test_returns_nan", "ok", ["it returned nan (a reward must be a finite number)"]),
        ("test_raises_a_long_story", "ok", ["RuntimeError: HTTP 503 <html> <body>the verifier is down</body> </html>"]),
    ],
)
def test_a_failed_reward_call_is_one_paragraph_never_a_zero(function, answer, fragments):
    answers = ["ok"] * 8
    answers[3] = answer
    started = time.monotonic()
    with pytest.raises(RewardCallFailed) as failure:
        function_scores([RewardFunction(name=function)], PROMPTS, answers, timeout_s=1, parallel_calls=4)
    message = str(failure.value)
    assert "\n" not in message and "never scored as 0" in message, message
    for fragment in fragments:
        assert fragment in message, message
    assert time.monotonic() - started < 10
    assert isinstance(failure.value, TrainingFailed) and failure.value.exit_code == 1


# --- the batch: overlong filter and dynamic sampling by hand


def sample(prompt: Prompt, tokens: list[int], finished: bool, reward: float | None = None) -> Sample:
    return Sample(prompt, tokens, finished, version=0, text="", reward=reward)


def test_old_logprobs_left_to_the_update_give_what_a_pass_gives_by_hand():
    """An iteration of one optimizer step with the KL in the loss leaves its old log-probs to the update's forward:
    the batch carries the engine's log-probs instead, the advantages do not change, and once the update's log-probs
    are filled in the KL, the engine's gap and the behaviour weights (as the policy weighs its tokens) are those a
    pass of their own gives."""
    p, q = Prompt([], [5, 6]), Prompt([], [7])
    engine = [[-0.5, -0.7, -0.2], [-1.0, -0.1, -0.3], [-0.2, -0.4, -2.0], [-0.9, -0.6, -0.1]]
    samples = [
        Sample(prompt, [1, 2, 9], True, 0, "", logprobs, reward)
        for prompt, logprobs, reward in zip([p, p, q, q], engine, [1.0, 0.0, 1.0, 0.0], strict=True)
    ]
    rollout = Rollout.of(samples, pad_id=0)
    old = torch.tensor([[-0.4, -0.9, -0.2], [-1.1, -0.1, -0.2], [-0.2, -0.5, -0.9], [-0.8, -0.6, -0.3]])
    entropy, ref = torch.full((4, 3), 0.7), torch.full((4, 3), -0.6)
    settings = {
        "advantage": "grpo",
        "samples_per_prompt": 2,
        "rollout_batch_size": 2,
        "mini_batch_size": 4,
        "kl": {"in": "loss"},
        "generation": {"engine": "vllm"},
        "rollout_correction": "decoupled",
        "tis_cap": 1.5,
    }
    ppo = PpoSection(**settings)
    assert ppo.old_logprobs_from_update
    for other in ({"old_logprobs": "pass"}, {"mini_batch_size": 2}, {"ppo_epochs": 2}, {"kl": {"in": "reward"}}):
        assert not PpoSection(**{**settings, **other}).old_logprobs_from_update, other
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    passed = estimate_advantages(rollout, RolloutScores(rewards, old, entropy, ref, None), ppo, 0.1)
    later = RolloutScores(rewards, None, None, ref, None)
    deferred = estimate_advantages(rollout, later, ppo, 0.1)
    assert "old_logprobs" not in deferred.batch and "behaviour_weights" not in deferred.batch
    assert deferred.kl is None and deferred.rollout_gap is None
    assert torch.equal(deferred.batch["behaviour_logprobs"], rollout.behaviour_logprobs)
    assert torch.equal(deferred.batch["advantages"], passed.batch["advantages"])
    weighed = algo.rollout_correction_weights(
        "decoupled", old, deferred.batch["behaviour_logprobs"], deferred.batch["action_mask"], 1.5
    )
    assert torch.equal(weighed, passed.batch["behaviour_weights"])
    assert (weighed == 0).sum() == 1  # exp(-0.9 + 2.0) = 3.0 is over the cap: that token leaves the loss
    with_update_logprobs(rollout, later, deferred, ppo, {"logprobs": old, "entropy": entropy})
    assert torch.equal(deferred.kl, passed.kl) and torch.equal(deferred.rollout_gap, passed.rollout_gap)
    assert torch.equal(deferred.batch["behaviour_weights"], passed.batch["behaviour_weights"])
    assert later.old_logprobs is old and later.entropy is entropy


def test_the_overlong_filter_takes_truncated_answers_out_of_the_loss_by_hand():
    """Two prompts x 2 answers, GRPO: the truncated answer keeps its place in its group's baseline (so its partner's
    advantage is as without the filter) but none of its tokens reach the loss."""
    p, q = Prompt([], [5, 6]), Prompt([], [7])
    samples = [
        sample(p, [1, 2, 9], True, 1.0),
        sample(p, [1, 2, 3, 4], False, 0.0),  # truncated
        sample(q, [3, 9], True, 0.0),
        sample(q, [4, 4, 9], True, 1.0),
    ]
    rollout = Rollout.of(samples, pad_id=0)
    zeros = torch.zeros(4, 4)
    scores = RolloutScores(torch.tensor([1.0, 0.0, 0.0, 1.0]), zeros, zeros, zeros, None)
    settings = {"advantage": "grpo", "samples_per_prompt": 2, "rollout_batch_size": 2, "mini_batch_size": 4}
    plain = estimate_advantages(rollout, scores, PpoSection(**settings), 0.0)
    filtered = estimate_advantages(rollout, scores, PpoSection(**settings, overlong={"filter": True}), 0.0)
    assert plain.batch["action_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
    assert filtered.batch["action_mask"].tolist() == [[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]]
    assert torch.equal(filtered.batch["advantages"], plain.batch["advantages"])
    # GRPO: (1 - 0.5) / std([1, 0]) = 0.7071 for the winners, -0.7071 for the losers, on every token
    a = 0.5 / torch.tensor([1.0, 0.0]).std().item()
    logprobs = torch.zeros(4, 4, requires_grad=True)
    for aggregation, with_filter, without in [
        # token_mean: the loss is -mean(A) over the kept tokens: (3a - 2a + 3a) / 8 vs (3a - 4a - 2a + 3a) / 12
        ("token_mean", -(3 * a - 2 * a + 3 * a) / 8, -(3 * a - 4 * a - 2 * a + 3 * a) / 12),
        # sequence_mean: each row's mean, over all four rows (the filtered row counts as 0)
        ("sequence_mean", -(a - a + a) / 4, -(a - a - a + a) / 4),
    ]:
        for experience, expected in [(filtered, with_filter), (plain, without)]:
            batch = experience.batch
            loss, _ = algo.policy_loss(
                logprobs, logprobs.detach(), batch["advantages"], batch["action_mask"], 0.2, aggregation=aggregation
            )
            assert loss.item() == pytest.approx(expected, abs=1e-6), (aggregation, expected)
    assert float((~rollout.finished).float().mean()) == 0.25


class ScriptedRollout:
    """A rollout source for the controller's sampling loop whose answers are fixed in advance (one list per draw)."""

    def __init__(self, draws: list[list[str]]):
        self.draws, self.seeds = draws, []
        self.figures: dict[str, float] = {}

    def sample(self, prompts: list[Prompt], seed: int, version: int) -> list[Sample]:
        self.seeds.append(seed)
        texts = self.draws[len(self.seeds) - 1]
        return [Sample(p, [1], True, version, text) for p, text in zip(prompts, texts, strict=True)]


def test_dynamic_sampling_draws_until_the_batch_holds_informative_groups():
    """2 prompts x 2 answers a draw; the reward is last_word_exact. Draw 1 has one informative group, draw 2 none,
    draw 3 two: the batch is draw 1's and draw 3's first informative group; 2 of 6 groups were informative."""
    from tuneyard.rlhf.config import RewardSection
    from tuneyard.rlhf.ppo.controller import PpoInputs, collect_rollout
    from tuneyard.rlhf.ppo.experience import RewardScorer

    prompts = [Prompt([{"role": "user", "content": f"Say the last word: w{i}"}], [i + 1]) for i in range(6)]
    inputs = PpoInputs(AutoTokenizer.from_pretrained(ROOT / "examples" / "tiny" / "tokenizer"), prompts, None, None)
    ppo = PpoSection(
        advantage="grpo", samples_per_prompt=2, rollout_batch_size=2, mini_batch_size=4, dynamic_sampling=True
    )
    rewards = RewardScorer(RewardSection(functions=[{"name": "last_word_exact"}]), None, ppo)
    order = [p.ids[0] - 1 for p in prompts_at(prompts, 0, 6, seed=7)]

    def right(k: int) -> str:
        return f"w{order[k]}"

    draws = [
        [right(0), "no", "no", "no"],  # group 1 informative, group 2 not
        [right(2), right(2), "no", "no"],  # neither
        [right(4), "no", "no", right(5)],  # both
    ]
    source = ScriptedRollout(draws)
    rollout, position = collect_rollout(source, rewards, inputs, ppo, position=0, iteration=0, seed=7)
    assert position == 6 and len(source.seeds) == 3 and len(set(source.seeds)) == 3
    assert [s.text for s in rollout.samples] == [right(0), "no", right(4), "no"]
    assert rollout.rewards.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert rollout.figures == {"groups_kept_frac": 3 / 6, "sampling_rounds": 3.0, "batch_informative_frac": 1.0}
    # one draw allowed: the batch is filled up with the uninformative group, and says so
    source = ScriptedRollout(draws)
    capped = ppo.model_copy(update={"dynamic_sampling_max_rounds": 1})
    rollout, position = collect_rollout(source, rewards, inputs, capped, position=0, iteration=0, seed=7)
    assert position == 2 and [s.text for s in rollout.samples] == [right(0), "no", "no", "no"]
    assert rollout.figures["batch_informative_frac"] == 0.5 and rollout.figures["groups_kept_frac"] == 0.5


# --- the controller never asks which engine it has


def test_the_loop_has_no_engine_branch_outside_the_rollout_factory():
    """No comparison with an engine's name or the rollout role, and no read of `.engine`, in the controller and the
    modules it hands the rollout to: the rollout object is chosen once, in rollout.make_rollout."""
    names = {"vllm", "hf", "rollout"}
    for module in ("controller", "experience", "checkpoints"):
        tree = ast.parse((ROOT / "rlhf" / "ppo" / f"{module}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                constants = [n.value for n in ast.walk(node) if isinstance(n, ast.Constant)]
                assert not names & set(constants), f"{module}.py:{node.lineno} compares with an engine's name"
            if isinstance(node, ast.Attribute):
                assert node.attr != "engine", f"{module}.py:{node.lineno} reads .engine"
    factory = ast.parse((ROOT / "rlhf" / "ppo" / "rollout.py").read_text())
    branches = [node.lineno for node in ast.walk(factory) if isinstance(node, ast.Attribute) and node.attr == "engine"]
    assert len(branches) == 1  # make_rollout's


# --- DAPO's controls and the reward failures in a real run


@pytest.mark.integration
def test_dapo_controls_run_and_report_how_answers_ended(ray_session, sft_base, tmp_path):
    """Dynamic sampling, the overlong penalty and filter, clip-higher and a stop string together at T 0.7: answers of
    at most 3 tokens (many truncated), every batch made of informative groups where the draws allowed."""
    job = ppo_job(
        tmp_path,
        sft_base,
        "dapo",
        ppo={
            "advantage": "grpo",
            "iterations": 3,
            "samples_per_prompt": 4,
            "rollout_batch_size": 8,
            "mini_batch_size": 16,
            "dynamic_sampling": True,
            "dynamic_sampling_max_rounds": 3,
            "overlong": {"filter": True, "buffer": 2, "penalty": 0.5},
            "clip_range_high": 0.28,
            "generation": {"max_new_tokens": 3, "stop": ["\n"]},
        },
    )
    rows = iterations_of(run_job(job_from_dict(job), show_progress=False).run_dir)
    assert len(rows) == 3
    truncated = [r["truncated_frac"] for r in rows]
    assert all(0 <= t <= 1 for t in truncated) and sum(truncated) > 0, truncated
    assert all(1 <= r["sampling_rounds"] <= 3 and 0 < r["groups_kept_frac"] <= 1 for r in rows)
    assert all(r["batch_informative_frac"] == 1.0 or r["sampling_rounds"] == 3 for r in rows)
    assert all(r["response_length"] <= 3 for r in rows)


FAIL_AT = {"iteration": 0}


@reward_function("test_fails_in_iteration_two")
def fails_in_iteration_two(prompts: list, completions: list, **_: object) -> list[float]:
    """0 reward; in the second iteration of the run in FAIL_AT, raises (or hangs) on every answer."""
    FAIL_AT["calls"] = FAIL_AT.get("calls", 0) + 1
    if FAIL_AT["calls"] > FAIL_AT["per_iteration"]:
        if FAIL_AT["how"] == "raise":
            raise ValueError("malformed verifier output")
        time.sleep(60)
    return [0.0]


@pytest.mark.integration
@pytest.mark.parametrize("how", ["raise", "hang"])
def test_a_failing_reward_function_ends_the_run_and_keeps_the_checkpoint(ray_session, sft_base, tmp_path, how):
    job = ppo_job(
        tmp_path,
        sft_base,
        how,
        ppo={"advantage": "grpo", "iterations": 3, "rollout_batch_size": 4, "mini_batch_size": 8, "save_every": 1},
        reward={"functions": [{"name": "test_fails_in_iteration_two"}], "timeout_s": 2},
    )
    FAIL_AT.update(calls=0, per_iteration=8, how=how)
    with pytest.raises(TrainingFailed) as failure:
        run_job(job_from_dict(job), show_progress=False)
    message = str(failure.value)
    assert "reward function 'test_fails_in_iteration_two' on prompt 'Say the last word:" in message, message
    assert ("ValueError: malformed verifier output" if how == "raise" else "reward.timeout_s (2 s)") in message
    run_dir = tmp_path / how
    checkpoint = run_dir / "checkpoints" / "checkpoint-1"
    assert (checkpoint / "controller.json").exists() and (checkpoint / "policy").is_dir()
    assert not (run_dir / "checkpoints" / "checkpoint-2").exists() and not (run_dir / "final").exists()
    assert json.loads((run_dir / "outcome.json").read_text())["status"] == "failed"
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "reward" in r] == [1]


@pytest.mark.parametrize(
    "ppo, fragment",
    [
        ({"tis_cap": 0.5}, "'ppo.tis_cap': Input should be greater than or equal to 1"),
        (
            {"generation": {"temperature": 0.005}},
            "ppo.generation.temperature 0.005 is below 0.01, where vLLM samples at 0.01 instead",
        ),
        ({"clip_range_low": 1.2}, "'ppo.clip_range_low': Input should be less than 1"),
        (
            {"dynamic_sampling": True, "samples_per_prompt": 1},
            "ppo.dynamic_sampling keeps the prompts whose answers got different rewards, so it needs "
            "ppo.samples_per_prompt >= 2 (it is 1)",
        ),
        ({"overlong": {"buffer": 9}}, "ppo.overlong.buffer (9) must not exceed ppo.generation.max_new_tokens (8)"),
        (
            {"overlong": {"filter": True}, "generation": {"stop_at_eos": False}},
            "no generation.stop every answer runs to max_new_tokens: nothing would train; set stop_at_eos: true",
        ),
    ],
)
def test_sampling_settings_that_cannot_work_are_refused_by_key(tmp_path, ppo, fragment):
    from tuneyard.training.errors import UserError

    with pytest.raises(UserError) as refused:
        job_from_dict(ppo_job(tmp_path, "policy", "run", ppo=ppo))
    assert fragment in str(refused.value)
