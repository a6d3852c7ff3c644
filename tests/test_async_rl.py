"""Rollouts generated ahead of training (ppo.async.max_staleness): the schedule's bound and seeds, decoupled PPO's
behaviour weights by hand, the inputs refused, and for real on CPU (Ray actors, a vLLM engine): the bound 0 is the
synchronous run to 1e-6, the bounds 1 and 2 hold over 500+ samples while the task improves, a killed engine restarts
the run from its checkpoint."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from tests.ppo_jobs import engine_job, iterations_of, kill_engine, needs_vllm, ppo_job
from tuneyard.launch.config import job_from_dict
from tuneyard.launch.run_job import run_job
from tuneyard.rlhf.config import PpoSection
from tuneyard.rlhf.ppo import algorithms as algo
from tuneyard.rlhf.ppo import controller
from tuneyard.rlhf.ppo.ahead import RolloutsAhead
from tuneyard.rlhf.ppo.groups import RoleGroup, RoleStalled
from tuneyard.rlhf.ppo.prompt_queue import RESUMED_SEED_STRIDE, Answer, PromptQueue, call_bounds
from tuneyard.rlhf.ppo.prompts import Prompt, batch_seed, prompts_at
from tuneyard.rlhf.ppo.rollout import Generating, Sample
from tuneyard.rlhf.rewards import reward_function
from tuneyard.training.metrics import read_metrics

AHEAD = {"async": {"max_staleness": 1}, "rollout_correction": "decoupled"}


# --- the schedule, on a recording rollout source (the engines' calls in order, no engine behind them)


class RecordingSource:
    """Stands in for EngineRollout's three calls and writes down the order of syncs and launches."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.version = -1

    def update_weights(self, wait_for_engines: bool = True) -> dict[str, float]:
        self.calls.append(("sync",))
        return {"weight_sync_s": 0.0}

    def launch(self, prompts: list[Prompt], seed: int, version: int, arrived=None) -> Generating:
        self.calls.append(("launch", seed, version, tuple(p.messages[0]["content"] for p in prompts)))
        return Generating(prompts, version, Future())

    def collect(self, generating: Generating) -> tuple[list[Sample], float]:
        self.calls.append(("collect",))
        samples = [Sample(p, [5, 2], True, generating.version, "x", [-0.5, -0.1]) for p in generating.prompts]
        return samples, 0.0


PROMPTS = [Prompt([{"role": "user", "content": f"prompt {i}"}], [3, 4 + i]) for i in range(10)]


def schedule(bound: int, iterations: int = 12, start: int = 0) -> tuple[RecordingSource, list[dict]]:
    ppo = PpoSection(
        rollout_batch_size=3,
        samples_per_prompt=2,
        mini_batch_size=6,
        micro_batch_size=6,
        advantage="grpo",
        generation={"engine": "vllm"},
        rollout_correction="decoupled",
        **{"async": {"max_staleness": bound}},
    )
    source = RecordingSource()
    ahead = RolloutsAhead(
        source=source,  # type: ignore[arg-type]
        prompts=PROMPTS,
        pad_id=0,
        ppo=ppo,
        seed=11,
        iterations=iterations,
        iteration=start,
        position=start * 3,
    )
    figures = [ahead.rollout(k)[0].figures for k in range(start, iterations)]
    return source, figures


@pytest.mark.parametrize("bound", [1, 2, 3])
def test_no_batch_is_staler_than_the_bound_and_the_engines_run_ahead(bound):
    source, figures = schedule(bound)
    assert max(f["staleness_max"] for f in figures) == bound
    assert figures[0]["staleness_max"] == 0  # the first batch: nothing older to sample with
    # the engines start on the next batch before the policy trains on this one (queue_depth: batches in flight)
    assert all(f["queue_depth"] >= 1 for f in figures[:-bound])
    kinds = [c[0] for c in source.calls]
    assert kinds.count("launch") == 12  # every batch once, none beyond the run's last
    # a sync for each burst of launches, none after the last: N = 1 syncs before batches 0, 2, 3, ..., 11
    assert kinds.count("sync") == kinds.count("launch") - {1: 1, 2: 6, 3: 8}[bound]
    # a sync only between batches: never while one is in flight
    in_flight = 0
    for call in source.calls:
        in_flight += {"launch": 1, "collect": -1}.get(call[0], 0)
        assert call[0] != "sync" or in_flight == 0


def test_bound_zero_samples_what_the_synchronous_loop_samples():
    """Sync, launch, collect: each batch on the weights trained up to it, with collect_rollout's prompts and seed."""
    source, figures = schedule(0, iterations=5)
    assert [c[0] for c in source.calls] == ["sync", "launch", "collect"] * 5
    launches = [c for c in source.calls if c[0] == "launch"]
    for k, (_, seed, version, prompts) in enumerate(launches):
        expected = [p.messages[0]["content"] for p in prompts_at(PROMPTS, 3 * k, 3, 11) for _ in range(2)]
        assert (seed, version, list(prompts)) == (batch_seed(11, 3 * k, 3), k, expected)
    assert all(f["staleness_max"] == 0 for f in figures)


def test_a_resumed_schedule_launches_from_the_checkpoints_position():
    """Resumed at iteration 4: the same prompts and seeds as the uninterrupted run from batch 4 on."""
    straight, _ = schedule(2)
    resumed, _ = schedule(2, start=4)

    def launched(source: RecordingSource) -> list[tuple]:
        return [(c[1], c[3]) for c in source.calls if c[0] == "launch"]

    assert launched(resumed) == launched(straight)[4:]


# --- the prompt queue: whole groups per call, to whichever engine is free, answers handed on as they come


def test_a_batch_is_cut_into_calls_of_whole_groups():
    assert call_bounds(128, 8, engines=1, groups_per_call=None) == [(0, 128)]
    assert call_bounds(128, 8, engines=2, groups_per_call=None) == [(0, 32), (32, 64), (64, 96), (96, 128)]
    assert call_bounds(128, 8, engines=1, groups_per_call=3) == [
        (0, 24),
        (24, 48),
        (48, 72),
        (72, 96),
        (96, 120),
        (120, 128),
    ]
    assert call_bounds(6, 2, engines=4, groups_per_call=None) == [(0, 2), (2, 4), (4, 6)]
    # the episodes still running after a turn: any number
    assert call_bounds(5, 8, engines=1, groups_per_call=None) == [(0, 5)]
    assert call_bounds(13, 4, engines=2, groups_per_call=None) == [(0, 4), (4, 8), (8, 12), (12, 13)]


def engines_of(tmp_path, *step_s: float, timeout_s: float = 30) -> RoleGroup:
    """Engines standing in for vLLM's (the class defined here so that Ray pickles it by value: the tests are no
    package on the workers)."""

    class SteppingEngine:
        """Stands in for a vLLM engine's `generate_timed`: a token per step of `step_s` for each prompt of a call,
        the token its absolute position (prompt length + index) and its log-prob -(version + 1); `interrupt` cuts
        the call until `receive_weights`. Records each call's first seed."""

        concurrency_groups = {"control": 1}  # noqa: RUF012

        def __init__(self, number: int, step_s: float):
            self.number, self.step_s, self.version, self.seeds, self.steps = number, step_s, 0, [], 0
            self.interrupted = threading.Event()

        def generate_timed(self, prompt_ids: list[list[int]], seeds: list[int], budgets: list[int]):
            started, drawn = time.perf_counter(), [[] for _ in prompt_ids]
            self.seeds.append(seeds[0])
            for _ in range(max(budgets)):
                if self.interrupted.is_set():
                    break
                time.sleep(self.step_s)
                self.steps += 1
                for ids, tokens, budget in zip(prompt_ids, drawn, budgets, strict=True):
                    if len(tokens) < budget:
                        tokens.append(len(ids) + len(tokens))
            answers = [(t, [-(self.version + 1.0)] * len(t), len(t) < b) for t, b in zip(drawn, budgets, strict=True)]
            return answers, time.perf_counter() - started

        @ray.method(concurrency_group="control")
        def interrupt(self) -> None:
            self.interrupted.set()

        @ray.method(concurrency_group="control")
        def steps_drawn(self) -> int:
            return self.steps

        def receive_weights(self, version: int) -> None:
            self.version = version
            self.interrupted.clear()

        def number_and_seeds(self) -> tuple[int, list[int]]:
            return self.number, self.seeds

    remote = ray.remote(concurrency_groups=SteppingEngine.concurrency_groups)(SteppingEngine)
    return RoleGroup("rollout", [remote.remote(i, s) for i, s in enumerate(step_s)], tmp_path, timeout_s)


def calls_of(count: int, answers: int, budget: int) -> list[list[Answer]]:
    return [[Answer([7] * 3, 10 * call + i, budget) for i in range(answers)] for call in range(count)]


@pytest.mark.integration
def test_a_free_engine_takes_the_next_call_and_answers_are_handed_on_as_they_come(ray_session, tmp_path):
    """A fast engine and a slow one (2 s a call): the fast one answers every call but the two the slow one took at
    the start (equal static shares would have given each 6), each call gets its own answers, and the slow engine's
    two calls are handed on last, after the fast one's ten."""
    engines = engines_of(tmp_path, 0.01, 1.0)
    calls = calls_of(12, 2, budget=2)
    arrived: list[int] = []
    busy_s = PromptQueue(engines).answer(calls, lambda i, answers: arrived.append(i), version=0)
    assert sorted(arrived) == list(range(12)) and arrived[-2:] == [2, 3]
    by_engine = dict(ray.get([actor.number_and_seeds.remote() for actor in engines.actors]))
    assert sorted(by_engine[1]) == [20, 30] and len(by_engine[0]) == 10
    assert all(a.tokens == [3, 4] and a.versions == [0, 0] and a.logprobs == [-1.0, -1.0] for c in calls for a in c)
    assert busy_s == pytest.approx((10 * 0.02 + 2 * 2.0) / 2, rel=0.2)


@pytest.mark.integration
def test_a_paused_answer_resumes_on_the_new_weights_with_its_tokens_so_far(ray_session, tmp_path):
    """Partial rollouts: answers of 20 tokens paused after about 6, the engine given version 1, resumed: each answer
    is one run of positions (the resumed call's prompt held the tokens so far), its first tokens drawn by version 0
    and the rest by version 1 with that version's log-probs, and the resumed call got seeds of its own."""
    engines = engines_of(tmp_path, 0.1)
    queue, calls = PromptQueue(engines), calls_of(1, 3, budget=20)
    with ThreadPoolExecutor(1) as pool:
        answering = pool.submit(queue.answer, calls, lambda i, answers: None, 0)
        deadline = time.monotonic() + 30  # a loaded machine may take seconds to start the call
        while ray.get(engines.actors[0].steps_drawn.remote()) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        queue.pause()
        ray.get(engines.actors[0].receive_weights.remote(1))
        queue.resume(1)
        answering.result(timeout=30)
    for answer in calls[0]:
        old = answer.versions.count(0)
        assert 0 < old < 20 and answer.versions == [0] * old + [1] * (20 - old)
        assert answer.tokens == list(range(3, 23))
        assert answer.logprobs == [-1.0] * old + [-2.0] * (20 - old)
        assert answer.segments == 2
    _, seeds = ray.get(engines.actors[0].number_and_seeds.remote())
    assert seeds == [0, RESUMED_SEED_STRIDE]


@pytest.mark.integration
def test_an_engine_silent_past_the_timeout_is_named(ray_session, tmp_path):
    engines = engines_of(tmp_path, 60.0, timeout_s=1.0)
    try:
        with pytest.raises(
            RoleStalled,
            match=r"no rollout engine answered a call within cluster.collective_timeout_s \(1 s\); rollout rank 0 did "
            "not arrive",
        ):
            PromptQueue(engines).answer(calls_of(1, 1, budget=1), lambda i, answers: None, 0)
    finally:
        ray.kill(engines.actors[0])


# --- decoupled PPO's behaviour weights


def test_decoupled_behaviour_weights_by_hand():
    """w = p_proximal / p_behaviour: 0.6 / 0.4 = 1.5 (under the cap: kept), 0.2 / 0.2 = 1, 0.9 / 0.1 = 9 (over:
    masked); off the response 1. The loss of each token is -w * min(r A, clip(r) A) with r = p_theta / p_proximal."""
    proximal = torch.log(torch.tensor([[0.6, 0.2, 0.9, 0.3]], dtype=torch.float64))
    behaviour = torch.log(torch.tensor([[0.4, 0.2, 0.1, 0.7]], dtype=torch.float64))
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    weights = algo.decoupled_behaviour_weights(proximal, behaviour, mask, cap=2.0)
    assert weights[0].tolist() == pytest.approx([1.5, 1.0, 0.0, 1.0])
    # TIS truncates instead: the third token keeps the cap
    tis = algo.truncated_importance_weights(proximal, behaviour, mask, 2.0)
    assert tis[0].tolist() == pytest.approx([1.5, 1.0, 2.0, 1.0])
    # the policy moved: p_theta = 0.9, 0.1, 0.9 -> r = 1.5 (clipped at 1.2 with eps 0.2), 0.5, 1
    logprobs = torch.log(torch.tensor([[0.9, 0.1, 0.9, 0.3]], dtype=torch.float64))
    advantages = torch.tensor([[1.0, -1.0, 1.0, 0.0]])
    loss, _ = algo.policy_loss(
        logprobs, proximal, advantages, mask, 0.2, aggregation="token_mean", token_weights=weights
    )
    # token 1: -1.5 * min(1.5, 1.2) = -1.8; token 2 (A < 0): -1 * min(-0.5, -0.8) = 0.8; token 3: masked by w = 0
    assert float(loss) == pytest.approx((-1.8 + 0.8 + 0.0) / 3, abs=1e-9)
    # exactly at the cap a weight is kept (AReaL masks w > cap)
    cap = float(torch.exp(torch.tensor(0.5)))
    at_cap = algo.decoupled_behaviour_weights(torch.zeros(1, 1), torch.full((1, 1), -0.5), torch.ones(1, 1), cap)
    assert float(at_cap) == cap


# --- what is refused


@pytest.mark.parametrize(
    "ppo, fragment",
    [
        ({"generation": {"engine": "hf"}}, "set generation.engine: vllm, or async.max_staleness: 0"),
        ({"colocate": "all"}, "set ppo.colocate: none"),
        ({"rollout_correction": "none"}, "set ppo.rollout_correction: decoupled"),
        ({"dynamic_sampling": True}, "ppo.dynamic_sampling decides from each draw's rewards"),
    ],
)
def test_what_generating_ahead_cannot_do_is_refused(ppo, fragment):
    settings = {
        "advantage": "grpo",
        "samples_per_prompt": 2,
        "mini_batch_size": 4,
        "rollout_batch_size": 2,
        "generation": {"engine": "vllm"},
        **AHEAD,
        **ppo,
    }
    with pytest.raises(ValueError, match="ppo.async.max_staleness 1 generates batches while the policy trains") as e:
        PpoSection(**settings)
    assert fragment in str(e.value)


def test_the_async_section_reads_from_a_job_file(tmp_path):
    job = ppo_job(
        tmp_path, "some/model", "parsed", ppo={"advantage": "grpo", "generation": {"engine": "vllm"}, **AHEAD}
    )
    ppo = job_from_dict(job).ppo
    assert ppo.async_.max_staleness == 1
    assert ppo.model_dump(mode="json")["async"] == {"max_staleness": 1, "partial_rollouts": False}


# --- for real: Ray actors and a vLLM engine


def policy_weights(run_dir) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(run_dir / "final").state_dict()


@needs_vllm
@pytest.mark.integration
def test_bound_zero_generating_ahead_is_the_synchronous_run(ray_session, vllm_base, tmp_path, monkeypatch):
    """RolloutsAhead at bound 0 in the real loop (the loop itself runs the synchronous path at 0; the schedule is
    forced here): after 10 fp32 iterations the policy's parameters equal the synchronous run's to 1e-6. Each iteration
    is one optimizer step with the KL in the loss, so both take the old log-probs from the update's own forward; a
    third, synchronous run with a pass of their own (`ppo.old_logprobs: pass`) ends at the same parameters and logs
    the same KL, gap and behaviour weights."""

    def ten_iterations(name: str, **ppo) -> dict:
        job = engine_job(
            tmp_path,
            vllm_base,
            name,
            iterations=10,
            mini_batch_size=32,
            kl={"in": "loss", "estimator": "k3", "coef": 0.05},
            rollout_correction="decoupled",
            **ppo,
        )
        job["training"]["learning_rate"] = 5e-3
        return job

    synchronous = run_job(job_from_dict(ten_iterations("sync")), show_progress=False).run_dir
    with_pass = run_job(job_from_dict(ten_iterations("pass", old_logprobs="pass")), show_progress=False).run_dir
    monkeypatch.setattr(controller, "generates_ahead", lambda ppo: True)
    ahead = run_job(job_from_dict(ten_iterations("ahead-0")), show_progress=False).run_dir
    rows = [r for r in read_metrics(ahead / "metrics.jsonl") if "reward" in r]
    assert len(rows) == 10 and all(r["staleness_max"] == 0 for r in rows)
    a = policy_weights(synchronous)
    for other in (ahead, with_pass):
        b = policy_weights(other)
        apart = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert apart < 1e-6, (other.name, apart)
    start = AutoModelForCausalLM.from_pretrained(vllm_base).state_dict()
    assert max(float((a[k] - start[k]).abs().max()) for k in a) > 1e-3  # the runs did train
    taken, passed = ([r for r in read_metrics(d / "metrics.jsonl") if "reward" in r] for d in (synchronous, with_pass))
    for key in ("kl", "entropy", "rollout_logprob_gap", "tis_weight", "reward"):
        assert [r[key] for r in taken] == pytest.approx([r[key] for r in passed], rel=1e-5, abs=1e-7), key
    assert all(r["first_ratio_max_dev"] == 0 for r in taken)  # the ratio of a forward to itself


@needs_vllm
@pytest.mark.integration
@pytest.mark.parametrize("bound", [1, 2])
def test_stale_samples_stay_within_the_bound_and_the_task_improves(ray_session, vllm_base, tmp_path, bound):
    """5120 samples (80 iterations of 16 prompts x 4) generated up to `bound` versions ahead: every iteration's logged
    staleness is within the bound and reaches it, generation overlaps training (the policy waits for less than the
    engine generates), and the reward rises as test_grpo_learns_with_vllm_engines' does."""
    job = engine_job(
        tmp_path,
        vllm_base,
        f"ahead-{bound}",
        iterations=80,
        samples_per_prompt=4,
        mini_batch_size=32,
        kl={"in": "loss", "estimator": "k3", "coef": 0.02},
        rollout_correction="decoupled",
        **{"async": {"max_staleness": bound}},
    )
    rows = [r for r in read_metrics(run_job(job_from_dict(job), show_progress=False).run_dir / "metrics.jsonl")]
    iterations = [r for r in rows if "reward" in r]
    assert len(iterations) == 80 and not [r for r in rows if r.get("event") == "restart"]
    assert max(r["staleness_max"] for r in iterations) == bound
    assert all(0 <= r["staleness_mean"] <= r["staleness_max"] <= bound for r in iterations)
    steady = iterations[bound + 1 :]
    assert sum(r["policy_idle_s"] for r in steady) < sum(r["engine_busy_s"] for r in steady)
    assert all(r["engine_idle_s"] >= 0 and 0 <= r["behaviour_masked_frac"] < 0.5 for r in iterations)
    first, last = (sum(r["reward"] for r in part) / len(part) for part in (iterations[:16], iterations[-16:]))
    assert last > first + 0.06, (first, last)


@reward_function("test_share_of_vowels")
def share_of_vowels(prompts: list, completions: list, **_: object) -> list[float]:
    """The share of an answer's characters that are vowels: differs between answers of any length, so that answers
    cut by no stop still give the policy a direction to move in."""
    return [sum(ch in "aeiou" for ch in str(c)) / max(1, len(str(c))) for c in completions]


@needs_vllm
@pytest.mark.integration
def test_partial_rollouts_resume_interrupted_answers_on_the_new_weights(ray_session, vllm_base, tmp_path):
    """Answers of 128 tokens (no stop at EOS, so generating a batch outlasts scoring and training one), the engine
    synced as soon as the policy has trained: answers in flight are interrupted and resumed on the new weights, so
    batches hold answers drawn by two versions; every token drawn with the weights the policy holds has the policy's
    own log-prob (gap < 1e-4) while the stale tokens of the same answers do not; no sample is staler than the bound."""
    job = engine_job(
        tmp_path,
        vllm_base,
        "partial",
        iterations=8,
        samples_per_prompt=4,
        mini_batch_size=32,
        generation={"max_new_tokens": 128, "stop_at_eos": False},
        rollout_correction="decoupled",
        **{"async": {"max_staleness": 1, "partial_rollouts": True}},
    )
    job["training"]["learning_rate"] = 5e-3  # each version's log-probs visibly apart
    job["reward"]["functions"] = [{"name": "test_share_of_vowels"}]
    rows = read_metrics(run_job(job_from_dict(job), show_progress=False).run_dir / "metrics.jsonl")
    iterations = [r for r in rows if "reward" in r]
    assert len(iterations) == 8 and all(r["staleness_max"] <= 1 for r in iterations)
    resumed = [r for r in iterations if r["resumed_frac"] > 0]
    assert len(resumed) >= 3, [r["resumed_frac"] for r in iterations]
    assert all(r["rollout_logprob_gap_current_max"] < 1e-4 for r in resumed), resumed
    assert max(r["rollout_logprob_gap"] for r in resumed) > 1e-3  # the answers' older tokens: another version's


@needs_vllm
@pytest.mark.integration
def test_multi_turn_episodes_are_generated_ahead(ray_session, vllm_base, tmp_path):
    """Relay episodes of up to 3 turns and 56 tokens generated one batch ahead with partial rollouts: every
    iteration's episodes went on after their first answers, some to a third turn and some stopped by the token
    limit (so a turn's batch holds part of the episodes), no sample is staler than the bound, the tokens drawn by the
    policy's current weights carry its own log-probs, and the held-out figures score greedy episodes."""
    from tests import episode_checks  # noqa: F401  (registers the relay environment)

    job = engine_job(
        tmp_path,
        vllm_base,
        "episodes-ahead",
        iterations=4,
        rollout_correction="decoupled",
        environment={"name": "relay", "max_turns": 3, "max_tokens": 56},
        **{"async": {"max_staleness": 1, "partial_rollouts": True}},
    )
    result = run_job(job_from_dict(job), show_progress=False)
    iterations = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "reward" in r]
    assert len(iterations) == 4 and all(2.0 < r["turns"] < 3.0 and r["cut_at_max_tokens"] for r in iterations)
    assert max(r["staleness_max"] for r in iterations) == 1
    gaps = [r["rollout_logprob_gap_current_max"] for r in iterations if "rollout_logprob_gap_current_max" in r]
    assert gaps and max(gaps) < 1e-4, iterations
    assert 1.0 < result.figures["greedy turns"][1] <= 3.0, result.figures


KILL: dict = {"run_dir": None}


@reward_function("test_kill_the_engine_generating_ahead")
def kill_the_engine_generating_ahead(prompts: list, completions: list, **_: object) -> list[float]:
    """Zero reward; while the run in KILL scores iteration 3 (the engine generating batch 4), the engine is killed."""
    run_dir = KILL["run_dir"]
    if run_dir is not None and len(iterations_of(run_dir)) == 2:
        KILL["run_dir"] = None
        kill_engine(run_dir)
    return [0.0] * len(completions)


@needs_vllm
@pytest.mark.integration
def test_a_killed_engine_while_generating_ahead_restarts_from_the_checkpoint(ray_session, vllm_base, tmp_path):
    """SIGKILL of the engine while iteration 3 is scored (batch 4 in flight on it): the run restarts every group from
    checkpoint-3 by itself, samples batch 4 again on the checkpoint's weights, and finishes."""
    job = engine_job(tmp_path, vllm_base, "killed", iterations=5, save_every=1, **AHEAD)
    job["reward"]["functions"].append({"name": "test_kill_the_engine_generating_ahead", "weight": 0.0})
    KILL["run_dir"] = tmp_path / "killed"
    run_dir = run_job(job_from_dict(job), show_progress=False).run_dir
    records = read_metrics(run_dir / "metrics.jsonl")
    assert len([r for r in records if r.get("event") == "restart"]) == 1
    assert [r["step"] for r in records if r.get("event") == "start"] == [0, 3]
    iterations = [r for r in records if "reward" in r]
    assert [r["step"] for r in iterations] == [1, 2, 3, 4, 5]
    # the resumed run's first batch is sampled on the checkpoint's own weights
    assert iterations[3]["staleness_max"] == 0 and iterations[4]["staleness_max"] == 1
    assert (run_dir / "final" / "model.safetensors").exists()
