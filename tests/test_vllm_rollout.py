"""PPO's vLLM rollout engines (ppo.generation.engine: vllm) for real on CPU: the engines answer with the policy's
current weights after every sync (their log-probs equal the policy's), a ZeRO-3, a LoRA and a plain policy send
what the engine serves, a skipped sync shows in rollout_logprob_gap, GRPO learns with engines, TIS maths, and the
inputs refused before any actor starts."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.ppo_jobs import DATA, assert_user_error, engine_job, iterations_of, kill_engine, needs_vllm, ppo_job, run_cli
from tuneyard.launch.config import job_from_dict
from tuneyard.launch.run_job import run_job
from tuneyard.rlhf.config import GenerationSection
from tuneyard.rlhf.ppo import algorithms as algo
from tuneyard.rlhf.ppo.batches import build_samples, left_pad, right_pad_values
from tuneyard.rlhf.ppo.generation import HFGenerator
from tuneyard.rlhf.ppo.groups import RoleGroup
from tuneyard.rlhf.ppo.prompts import tokenize_prompts
from tuneyard.rlhf.ppo.sampling import StopSet, stop_set
from tuneyard.rlhf.ppo.weight_sync import bucket_bounds, bucket_name
from tuneyard.rlhf.rewards import reward_function
from tuneyard.training.errors import TrainingFailed
from tuneyard.training.metrics import read_metrics

# --- pure pieces


def test_truncated_importance_weights_by_hand():
    policy = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, 0.0]])
    engine = torch.tensor([[-1.0, -2.5, -2.0], [-2.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    weights = algo.truncated_importance_weights(policy, engine, mask, cap=2.0)
    # exp(0) = 1; exp(0.5) = 1.6487; exp(1.5) = 4.48 -> cap 2; exp(-1) = 0.3679; 1; off the response 1
    expected = torch.tensor([[1.0, math.exp(0.5), 2.0], [math.exp(-1.0), 1.0, 1.0]])
    assert torch.allclose(weights, expected, atol=1e-6)


def test_token_weights_scale_each_tokens_policy_loss():
    """At ratio 1 the clipped loss of a token is -A; weights w make it -w A, aggregated as the loss says."""
    logprobs = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]])
    advantages = torch.tensor([[1.0, 2.0], [-1.0, 4.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    weights = torch.tensor([[0.5, 2.0], [1.0, 9.0]])
    loss, _ = algo.policy_loss(
        logprobs, logprobs, advantages, mask, 0.2, aggregation="token_mean", token_weights=weights
    )
    # tokens: -0.5, -4, +1 (the masked 4th does not count): mean -3.5 / 3
    assert loss.item() == pytest.approx(-3.5 / 3)
    plain, _ = algo.policy_loss(logprobs, logprobs, advantages, mask, 0.2, aggregation="token_mean")
    assert plain.item() == pytest.approx(-2.0 / 3)


def test_engine_log_probs_are_laid_out_like_the_responses():
    values = right_pad_values([[-0.5, -1.5], [], [-2.0]])
    assert values.tolist() == [[-0.5, -1.5], [0.0, 0.0], [-2.0, 0.0]]


# --- the user's mistakes: one paragraph before any actor starts


def test_tis_needs_the_vllm_engine(tmp_path, sft_base):
    job = ppo_job(tmp_path, sft_base, "run", ppo={"advantage": "grpo", "rollout_correction": "tis"})
    assert_user_error(run_cli(tmp_path, job), "ppo.rollout_correction tis", "set engine: vllm")


@needs_vllm
@pytest.mark.parametrize(
    "ppo, fragments",
    [
        ({}, ["has attention heads of 16 dimensions", "32, 64, 80", "ppo.generation.engine: hf"]),
        (
            {"roles": {"rollout": {"tensor_parallel_size": 2}}},
            ["tensor_parallel_size is 2, but engines on CPUs", "ppo.roles.rollout.workers"],
        ),
        (
            {"roles": {"rollout": {"gpus_per_worker": 1}}},
            ["ppo.roles.rollout.gpus_per_worker is 1 and ppo.roles.policy.gpus_per_worker 0", "both use GPUs"],
        ),
        (
            {"roles": {"rollout": {"gpus_per_worker": 1, "tensor_parallel_size": 2}}},
            ["gpus_per_worker (1) must equal its tensor_parallel_size (2)"],
        ),
    ],
)
def test_engines_this_machine_cannot_run_are_refused(tmp_path, sft_base, ppo, fragments):
    proc = run_cli(tmp_path, engine_job(tmp_path, sft_base, "run", **ppo))
    assert_user_error(proc, *fragments)
    assert not list((tmp_path / "run" / "logs").glob("*.log"))  # no actor started


@needs_vllm
def test_a_lora_policy_that_unties_the_embeddings_is_refused(tmp_path, sft_base):
    """modules_to_save on the head of a tied model: PEFT trains a copy of it apart, which an engine that serves one
    matrix for both cannot hold."""
    job = engine_job(tmp_path, sft_base, "run")
    job["peft"] = {"method": "lora", "r": 4, "alpha": 8, "modules_to_save": ["lm_head"]}
    proc = run_cli(tmp_path, job)
    assert_user_error(proc, "peft (modules_to_save: lm_head) trains the input or output embeddings", "tied")


def test_the_head_probe_on_models_without_a_shared_head():
    from tuneyard.rlhf.ppo.weight_sync import output_head_keeps_own_copy

    class NoHead(torch.nn.Module):  # Gemma-2 in vLLM: logits from the embeddings, no lm_head module
        def __init__(self):
            super().__init__()
            self.embed_tokens = torch.nn.Embedding(8, 4)

    class OwnHead(NoHead):
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(4, 8, bias=False)

    assert output_head_keeps_own_copy(NoHead()) is False
    assert output_head_keeps_own_copy(OwnHead()) is True


def test_vllm_missing_is_one_paragraph(tmp_path, sft_base, monkeypatch):
    from tuneyard.launch.config import job_from_dict as parse
    from tuneyard.rlhf.ppo.rollout_engine import check_rollout_engine
    from tuneyard.training.errors import UserError

    job = parse(engine_job(tmp_path, sft_base, "run"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(UserError, match=r"vLLM is not installed in this environment: `make install-vllm`"):
        check_rollout_engine(job.train_spec(), job.ppo)


# --- real engines


@needs_vllm
@pytest.mark.integration
def test_zero3_policy_and_engine_sample_the_same_numbers(ray_session, vllm_base, tmp_path):
    """Two ZeRO-3 policy ranks gather each parameter and rank 0 sends it: after every update the engine's log-probs of
    its own samples equal the policy's (fp32), with TIS weights of 1 and the tied output head synced too."""
    job = engine_job(
        tmp_path,
        vllm_base,
        "zero3",
        roles={"policy": {"workers": 2, "zero_stage": 3, "cpus_per_worker": 0.5}},
        rollout_correction="tis",
    )
    job["training"]["learning_rate"] = 5e-3
    rows = iterations_of(run_job(job_from_dict(job), show_progress=False).run_dir)
    assert len(rows) == 3
    assert job["ppo"]["generation"]["temperature"] == 0.7
    # measured here: 0.0 to 3e-7 on every iteration
    assert all(r["rollout_logprob_gap"] < 1e-5 for r in rows), [r["rollout_logprob_gap"] for r in rows]
    assert all(r["weight_sync_s"] > 0 and r["approx_kl"] > 0 for r in rows)
    assert all(r["tis_weight"] == pytest.approx(1.0, abs=1e-4) for r in rows)  # equal numbers: weights of 1


@needs_vllm
@pytest.mark.integration
def test_a_skipped_sync_shows_in_the_log_prob_gap(ray_session, vllm_base, tmp_path, monkeypatch):
    """The figure that guards the sync: an engine left on the first iteration's weights answers with other numbers."""
    from tuneyard.rlhf.ppo import rollout

    real, syncs = rollout.EngineRollout.update_weights, []

    def first_only(self, wait_for_engines: bool = True) -> dict[str, float]:
        syncs.append(1)
        return real(self, wait_for_engines) if len(syncs) == 1 else {"weight_sync_s": 0.0}

    monkeypatch.setattr(rollout.EngineRollout, "update_weights", first_only)
    job = engine_job(tmp_path, vllm_base, "stale")
    job["training"]["learning_rate"] = 5e-3
    rows = iterations_of(run_job(job_from_dict(job), show_progress=False).run_dir)
    # measured here: 0.0, then 0.05-0.1 once the policy has moved on
    assert rows[0]["rollout_logprob_gap"] < 1e-4 and all(r["rollout_logprob_gap"] > 5e-3 for r in rows[1:]), rows


@needs_vllm
@pytest.mark.integration
@pytest.mark.parametrize("method, modules_to_save", [("lora", None), ("qlora", None), ("lora", ["norm"])])
def test_adapter_policy_sends_merged_weights(ray_session, vllm_base, tmp_path, method, modules_to_save):
    """The engine serves base + adapter merged, QLoRA's 4-bit base sent dequantized (measured here: a gap of 1e-7 to
    3e-7 for both; bitsandbytes' CPU backend multiplies by the same dequantized numbers), and the trained copies of
    modules_to_save (every RMSNorm here) under their modules' own names."""
    job = engine_job(tmp_path, vllm_base, method)
    job["peft"] = {"method": method, "r": 4, "alpha": 8, "modules_to_save": modules_to_save}
    job["training"]["learning_rate"] = 5e-3
    rows = iterations_of(run_job(job_from_dict(job), show_progress=False).run_dir)
    assert abs(rows[-1]["kl"]) > 0  # the adapter moved the policy off its base
    assert all(r["rollout_logprob_gap"] < 1e-4 for r in rows), [r["rollout_logprob_gap"] for r in rows]


@needs_vllm
@pytest.mark.integration
def test_grpo_learns_with_vllm_engines(ray_session, vllm_base, tmp_path):
    """The learning test of the HF path (test_grpo_learns_with_no_critic_actor), its rollouts from two engines."""
    job = engine_job(
        tmp_path,
        vllm_base,
        "grpo",
        iterations=80,
        samples_per_prompt=4,
        mini_batch_size=32,
        kl={"in": "loss", "estimator": "k3", "coef": 0.02},
        roles={"rollout": {"workers": 2, "cpus_per_worker": 0.25}},
    )
    rows = iterations_of(run_job(job_from_dict(job), show_progress=False).run_dir)
    assert len(rows) == 80
    first, last = (sum(r["reward"] for r in part) / len(part) for part in (rows[:16], rows[-16:]))
    assert last > first + 0.06, (first, last)
    assert max(r["rollout_logprob_gap"] for r in rows) < 1e-3


# --- one engine, driven directly: its log-probs, its stops, and what its weight sync accepts


@pytest.fixture(scope="module")
def two_stop_model(vllm_base, tmp_path_factory) -> tuple[Path, int]:
    """vllm_base with a second EOS id in its generation_config.json: a token its greedy answers use before their end."""
    tokenizer = AutoTokenizer.from_pretrained(vllm_base)
    model = AutoModelForCausalLM.from_pretrained(vllm_base).eval()
    ids, mask = left_pad([p.ids for p in eval_prompts(tokenizer)], tokenizer.pad_token_id)
    free = HFGenerator(lambda: contextlib.nullcontext(model), tokenizer, StopSet(()))
    answers = free.generate(ids, mask, GenerationSection(max_new_tokens=8, temperature=0), seed=0)
    inside = Counter(t for a in answers for t in a[: a.index(2) if 2 in a else len(a)] if t not in (0, 1, 2))
    second = inside.most_common(1)[0][0]
    folder = tmp_path_factory.mktemp("two-stops") / "model"
    shutil.copytree(vllm_base, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": [2, second]}))
    return folder, second


def eval_prompts(tokenizer, count: int = 16) -> list:
    rows = [json.loads(x) for x in (DATA / "last-word-prompts-eval.jsonl").read_text().splitlines() if x.strip()]
    return tokenize_prompts(rows[:count], tokenizer, 128, "eval")


@pytest.fixture(scope="module")
def engine(ray_session, two_stop_model, tmp_path_factory):
    """One RolloutWorker (a vLLM engine on CPU) on the two-stop model, as the PPO controller starts it."""
    import ray

    from tuneyard.cluster.ray_cluster import worker_env
    from tuneyard.rlhf.ppo.rollout_engine import RolloutWorker, engine_env

    folder, _ = two_stop_model
    root = tmp_path_factory.mktemp("engine")
    job = job_from_dict(engine_job(root, str(folder), "run"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    stops = stop_set(tokenizer, str(folder), job.ppo.generation, trust_remote_code=False)
    payload = {
        "spec": job.train_spec().model_dump(mode="json"),
        "ppo": job.ppo.model_dump(mode="json"),
        "stops": stops.to_dict(),
        "faults": {},
    }
    (root / "run" / "logs").mkdir(parents=True)
    env = worker_env(0.5) | engine_env(job.ppo)
    actor = (
        ray.remote(concurrency_groups=RolloutWorker.concurrency_groups)(RolloutWorker)
        .options(num_cpus=0.5, runtime_env={"env_vars": env})
        .remote(0, 1, str(root / "run"), payload)
    )
    ray.get(actor.setup.remote(""))
    yield actor, stops
    ray.kill(actor)


def engine_answers(
    engine, prompts, generation: GenerationSection, seed: int = 5
) -> list[tuple[list[int], list[float]]]:
    import ray

    actor, _ = engine
    return ray.get(actor.generate.remote([p.ids for p in prompts], [seed + i for i in range(len(prompts))], generation))


def policy_logprobs(model, prompts, answers, distribution: tuple[float, float]) -> torch.Tensor:
    """The policy's log-probs of the engine's tokens, as its roles take them (sampling logits, micro-batched)."""
    from tuneyard.rlhf.ppo.chunked_logprobs import ChunkedScorer
    from tuneyard.rlhf.ppo.roles import response_logprobs

    ids, mask = left_pad([p.ids for p in prompts], 0)
    batch = build_samples(ids, mask, [tokens for tokens, _ in answers], 0)
    return response_logprobs(model, batch, 4, ChunkedScorer(1024, distribution))["logprobs"], batch["action_mask"]


@needs_vllm
@pytest.mark.integration
@pytest.mark.parametrize("temperature, top_p", [(0.5, 1.0), (1.5, 1.0), (0.7, 0.9)])
def test_the_engine_returns_the_log_probs_the_policy_scores(engine, two_stop_model, temperature, top_p):
    """vLLM's processed log-probs of its sampled tokens equal the policy's log-probs at the sampling temperature (and
    top-p) to 1e-5 in fp32; the raw logits (what both sides took before) describe another distribution at T != 1."""
    folder, _ = two_stop_model
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompts = eval_prompts(tokenizer)
    answers = engine_answers(engine, prompts, GenerationSection(max_new_tokens=8, temperature=temperature, top_p=top_p))
    ours, mask = policy_logprobs(model, prompts, answers, (temperature, top_p))
    theirs = right_pad_values([values for _, values in answers])
    gap = (ours - theirs).abs()[mask.bool()]
    assert gap.max() < 1e-5, gap.max()
    raw, _ = policy_logprobs(model, prompts, answers, (1.0, 1.0))
    assert (raw - theirs).abs()[mask.bool()].mean() > 1e-2  # the old code's numbers at this temperature


@needs_vllm
@pytest.mark.integration
def test_both_engines_stop_at_the_first_of_either_eos(engine, two_stop_model):
    """A model whose generation_config lists two EOS ids: greedy answers of HF generate and of the engine are the same
    tokens, each ending at the first of either id; sampled answers end there too, and the same seeds repeat them."""
    folder, second = two_stop_model
    _, stops = engine
    assert stops.token_ids == (2, second)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompts = eval_prompts(tokenizer)
    ids, mask = left_pad([p.ids for p in prompts], tokenizer.pad_token_id)
    hf = HFGenerator(lambda: contextlib.nullcontext(model), tokenizer, stops)
    greedy = GenerationSection(max_new_tokens=8, temperature=0)
    hf_answers = hf.generate(ids, mask, greedy, seed=0)
    engine_greedy = [tokens for tokens, _ in engine_answers(engine, prompts, greedy)]
    assert hf_answers == engine_greedy
    assert any(a[-1] == second for a in hf_answers) and any(a[-1] == 2 for a in hf_answers), hf_answers
    sampled = GenerationSection(max_new_tokens=8, temperature=1.0)
    for answers in (hf.generate(ids, mask, sampled, seed=3), [t for t, _ in engine_answers(engine, prompts, sampled)]):
        for answer in answers:
            assert not set(answer[:-1]) & {2, second}, answer  # no stop before the end
            assert answer[-1] in (2, second) or len(answer) == 8, answer
    assert engine_answers(engine, prompts, sampled, seed=9) == engine_answers(engine, prompts, sampled, seed=9)
    assert hf.generate(ids, mask, sampled, seed=3) == hf.generate(ids, mask, sampled, seed=3)


@needs_vllm
@pytest.mark.integration
@pytest.mark.parametrize("template", ["earlier_turns_rewritten", "turns_as_they_are"])
def test_engine_episodes_train_on_the_sampled_tokens_and_the_deltas_only(engine, two_stop_model, template):
    """100 relay episodes of up to 3 turns on the vLLM engine (its two stop ids) per template: every turn's context
    (token ids in), every episode's tokens and the batch's action mask are the engine's sampled tokens and the
    template's deltas, 0 differences; the engine's log-probs ride along for the sampled tokens only. (Before the
    weight-sync test below, which leaves the engine's weights unloaded.)"""
    import ray

    from tests.episode_checks import TEMPLATES, check_episodes
    from tuneyard.rlhf.ppo.rollout import finished_samples

    folder, _ = two_stop_model
    actor, stops = engine
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = TEMPLATES[template]
    generation = GenerationSection(max_new_tokens=8, temperature=0.8)
    rows = [json.loads(x) for x in (DATA / "last-word-prompts-eval.jsonl").read_text().splitlines() if x.strip()]
    prompts = tokenize_prompts([rows[i % len(rows)] for i in range(100)], tokenizer, 128, "eval")

    def engine_sample(batch, seed, version):
        seeds = [seed + i for i in range(len(batch))]
        answers = ray.get(actor.generate.remote([p.ids for p in batch], seeds, generation))
        drawn, logprobs = [t for t, _ in answers], [v for _, v in answers]
        samples = finished_samples(batch, drawn, logprobs, stops, tokenizer, version)
        assert all(len(s.logprobs) == len(s.tokens) for s in samples)
        return samples

    counts = check_episodes(tokenizer, engine_sample, prompts)
    assert counts["episodes"] == 100 and counts["answers"] > 250, counts
    if template == "earlier_turns_rewritten":
        assert counts["rerendered_differs"] >= 10, counts


def test_a_sync_packs_consecutive_tensors_of_one_dtype_into_bounded_buckets():
    """Runs of one dtype up to the byte limit; a dtype change or the limit starts a new bucket, a tensor over the
    limit goes alone; an error names a bucket by its first tensor and how many more it holds."""
    manifest = [
        ("a", [4, 4], "float32"),  # 64 bytes
        ("b", [8], "float32"),  # 32
        ("c", [2, 2], "bfloat16"),  # 8
        ("d", [30], "bfloat16"),  # 60
        ("e", [100], "float32"),  # 400: over the limit, alone
        ("f", [1], "float32"),
        ("g", [1], "float32"),
    ]
    assert bucket_bounds(manifest, limit=96) == [(0, 2), (2, 4), (4, 5), (5, 7)]
    assert bucket_bounds(manifest, limit=64) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 7)]
    assert bucket_bounds(manifest) == [(0, 2), (2, 4), (4, 7)]
    assert bucket_bounds([]) == []
    assert bucket_name(manifest, 0, 2) == "a (and 1 more in its broadcast)" and bucket_name(manifest, 4, 5) == "e"


@needs_vllm
@pytest.mark.integration
def test_the_weight_sync_checks_what_the_engine_loaded(engine, two_stop_model):
    """The test plays policy rank 0. The CPU engine reports that its output head keeps a copy of its own; a sync with
    the tied head gives log-probs equal to the new weights' (to 1e-5), one without it leaves the old head (the gap
    the head probe prevents); a sync that leaves a parameter out, or sends a name vLLM has no parameter for, is
    refused with the names, as the controller's one paragraph. (Last of the tests on this engine: it is left broken.)"""
    import ray

    from tuneyard.rlhf.ppo.rollout import refused_sync
    from tuneyard.rlhf.ppo.weight_sync import open_sync_group, send_tensors, sync_store, weight_units

    actor, _ = engine
    folder, _ = two_stop_model
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = eval_prompts(tokenizer, 8)
    store, address = sync_store("127.0.0.1", 2, 60)
    joined = actor.join_weight_sync.remote(address, 1, 2, "gloo", 60)
    group = open_sync_group("", 0, 2, "gloo", 60, store=store)
    assert ray.get(joined) == [True]  # vLLM's CPU layers repack the head apart from the embeddings

    def sync(model, tied_head: bool, drop: str = "", extra: str = ""):
        units = [(n, make) for n, _, make in weight_units(model, tied_head) if n != drop]
        tensors = [(n, make().contiguous()) for n, make in units]
        if extra:
            tensors.append((extra, torch.zeros(4, 4)))
        manifest = [(n, list(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in tensors]
        receiving = actor.receive_weights.remote(manifest)
        send_tensors(group, manifest, [t for _, t in tensors], 60)
        return receiving

    def moved(scale: float):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(scale)
            model.model.norm.weight.mul_(1 / scale)
        return model

    sampling = GenerationSection(max_new_tokens=6, temperature=0.7)
    for scale, tied_head, within in [(1.5, True, True), (0.7, False, False)]:
        model = moved(scale)
        ray.get(sync(model, tied_head))
        answers = engine_answers(engine, prompts, sampling)
        ours, mask = policy_logprobs(model, prompts, answers, (0.7, 1.0))
        gap = (ours - right_pad_values([v for _, v in answers])).abs()[mask.bool()].max()
        assert (gap < 1e-5) if within else (gap > 1e-3), (scale, tied_head, float(gap))

    # partial rollouts: an interrupted engine cuts every answer (here before its first step) until the next weights
    ids, seeds = [p.ids for p in prompts], list(range(len(prompts)))
    ray.get(actor.interrupt.remote())
    cut, _ = ray.get(actor.generate_timed.remote(ids, seeds))
    assert all(interrupted and not tokens for tokens, _, interrupted in cut)
    ray.get(sync(moved(1.0), True))
    answered, _ = ray.get(actor.generate_timed.remote(ids, seeds))
    assert not any(interrupted for _, _, interrupted in answered) and all(tokens for tokens, _, _ in answered)

    with pytest.raises(TrainingFailed) as left_out:
        refused_sync(ray.get, sync(moved(1.0), True, drop="model.norm.weight"))
    message = str(left_out.value)
    assert "left 1 of the rollout engine's parameters as they were (model.norm.weight)" in message, message
    with pytest.raises(TrainingFailed) as unknown:
        refused_sync(ray.get, sync(moved(1.0), True, extra="model.layers.0.mlp.extra_proj.weight"))
    message = str(unknown.value)
    assert "cannot load what the policy sends" in message and "extra_proj" in message, message
    assert "ppo.generation.engine: hf" in message and "\n" not in message


@pytest.mark.integration
def test_an_engine_dying_mid_sync_is_its_death_not_the_policys_broken_socket(ray_session, tmp_path):
    """The policy's broadcast fails first (the dead engine reset its socket), the engine's death is reported
    later: sync_weights raises the death (RayActorError, which restarts the groups), not the socket error."""
    import ray

    from tuneyard.rlhf.ppo.rollout import sync_weights

    class SyncSender:  # defined here so that Ray pickles it by value (the tests are no package on the workers)
        def send_weights(self) -> None:
            time.sleep(0.5)
            raise RuntimeError("Read error [127.0.0.1]:33003: Connection reset by peer")

    class SyncReceiver:
        def receive_weights(self, manifest: list) -> None:
            time.sleep(2.0)
            os._exit(1)

    groups = {
        "policy": RoleGroup("policy", [ray.remote(SyncSender).remote()], tmp_path, timeout_s=30),
        "rollout": RoleGroup("rollout", [ray.remote(max_restarts=0)(SyncReceiver).remote()], tmp_path, timeout_s=30),
    }
    with pytest.raises(ray.exceptions.RayActorError) as died:
        sync_weights(groups, [])
    assert "SyncReceiver" in str(died.value) and "Connection reset" not in str(died.value), died.value


HOOK: dict = {"run_dir": None}


@reward_function("test_kill_the_engine_in_iteration_three")
def kill_the_engine_in_iteration_three(prompts: list, completions: list, **_: object) -> list[float]:
    """Zero reward; while the run in HOOK scores its iteration 3, its rollout engine is killed (once)."""
    run_dir = HOOK["run_dir"]
    if run_dir is not None and len(iterations_of(run_dir)) == 2:
        HOOK["run_dir"] = None
        kill_engine(run_dir)
    return [0.0] * len(completions)


@needs_vllm
@pytest.mark.integration
def test_a_killed_engine_restarts_and_the_run_ends_as_an_uninterrupted_one(ray_session, vllm_base, tmp_path):
    """SIGKILL of the engine while iteration 3 of 4 is scored: the next sync finds it gone, every group restarts from
    checkpoint-3, the new engine (started from the SFT folder) gets the checkpoint's weights by the sync after the
    resume, and the iterations and final weights equal a straight run's (each prompt's seed repeats vLLM's samples)."""

    def four_iterations(name: str) -> dict:
        job = engine_job(tmp_path, vllm_base, name, iterations=4, save_every=1)
        job["reward"]["functions"].append({"name": "test_kill_the_engine_in_iteration_three", "weight": 0.0})
        job["training"]["learning_rate"] = 5e-3
        return job

    straight = run_job(job_from_dict(four_iterations("straight")), show_progress=False).run_dir
    HOOK["run_dir"] = tmp_path / "killed"
    killed = run_job(job_from_dict(four_iterations("killed")), show_progress=False).run_dir
    records = read_metrics(killed / "metrics.jsonl")
    restarts = [r for r in records if r.get("event") == "restart"]
    assert len(restarts) == 1 and [r["step"] for r in records if r.get("event") == "start"] == [0, 3]
    expected, got = iterations_of(straight), iterations_of(killed)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for want, have in zip(expected, got, strict=True):
        for key in ("reward", "kl", "policy_loss", "rollout_logprob_gap"):
            assert have[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (want["step"], key)
    a = AutoModelForCausalLM.from_pretrained(straight / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(killed / "final").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@needs_vllm
@pytest.mark.integration
@pytest.mark.parametrize("ahead", [False, True], ids=["synchronous", "ahead"])
def test_a_sync_an_engine_never_receives_names_the_parameter_and_the_engine(
    ray_session, vllm_base, tmp_path, monkeypatch, ahead
):
    """Engine 0 stops before receiving its second sync: the policy's broadcast times out after
    cluster.collective_timeout_s, and the run ends naming the parameter it waited on and the silent engine. Generating
    ahead, the policy goes on training once it has sent, and the batch launched after the sync ends the run so."""
    monkeypatch.setenv("TUNEYARD_FAULT_ENGINE_HOLD", "0@2")
    generating = {"async": {"max_staleness": 1}, "rollout_correction": "decoupled"} if ahead else {}
    job = engine_job(tmp_path, vllm_base, "silent", iterations=3 if ahead else 2, **generating)
    job["cluster"] = {"collective_timeout_s": 10}
    job["training"]["max_failures"] = 0
    started = time.monotonic()
    with pytest.raises(TrainingFailed) as failure:
        run_job(job_from_dict(job), show_progress=False)
    message = str(failure.value)
    # the broadcast blocks on its first bucket (named by its first parameter), or (its bytes buffered by the
    # sockets) the engine's call does
    named = "parameter model.embed_tokens.weight (and " in message or "sent every parameter" in message
    assert message.count("the weight sync timed out") == 1 and named, message
    assert "cluster.collective_timeout_s (10 s)" in message and "rollout rank 0 did not arrive" in message, message
    assert time.monotonic() - started < 120
