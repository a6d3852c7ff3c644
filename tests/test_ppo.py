"""PPO: sample layout, placement arithmetic, reward re-tokenisation, and real runs of the role groups on
Ray with DeepSpeed and gloo: learning, first-step ratio, ZeRO-3 x 2 ranks == ZeRO-0 x 1 rank, resume
after preemption, a LoRA policy as its own reference, and the errors a user gets before any actor starts."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from tests.conftest import ROOT, TINY_ARCH, can_mount_tmpfs
from tests.ppo_jobs import DATA, PPO_JOB, assert_user_error, iterations_of, ppo_job, run_cli
from tuneyard.cluster.ray_cluster import ClusterError
from tuneyard.launch.config import job_from_dict
from tuneyard.launch.run_job import run_job
from tuneyard.rlhf.config import PpoSection
from tuneyard.rlhf.ppo.batches import build_samples, left_pad, split_rows
from tuneyard.rlhf.ppo.groups import check_fits, plan_placement, role_env
from tuneyard.rlhf.ppo.prompts import Prompt, prompts_at
from tuneyard.rlhf.ppo.scoring import render_for_reward_model, reward_model_scores
from tuneyard.rlhf.rewards import reward_function
from tuneyard.training.errors import TrainingFailed
from tuneyard.training.metrics import COMPLETE_MARKER, read_metrics
from tuneyard.training.preemption import REQUEST_FILE, Preempted
from tuneyard.training.run_dir import complete_checkpoints

# --- pure pieces: layout, placement, data order, re-tokenisation


def test_sample_layout_puts_response_after_left_padded_prompt():
    prompt_ids, prompt_mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    batch = build_samples(prompt_ids, prompt_mask, [[9, 2], [10, 11, 2]], pad_id=0)
    assert batch["sequences"].tolist() == [[5, 6, 7, 9, 2, 0], [0, 0, 8, 10, 11, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    # positions count real tokens only, as generate() places a left-padded prompt
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 4], [0, 0, 0, 1, 2, 3]]
    assert batch["action_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    halves = split_rows(batch, 2)
    assert halves[1]["sequences"].tolist() == [[0, 0, 8, 10, 11, 2]]


def test_placement_shares_bundles_when_colocated():
    roles = {"policy": {"workers": 2, "cpus_per_worker": 1}, "critic": {"workers": 2}, "reference": {"workers": 1}}
    colocated = plan_placement(PpoSection(colocate="all", roles=roles), ["policy", "critic", "reference"])
    assert colocated.bundles == [{"CPU": 1.0}, {"CPU": 1.0}]
    assert [(s.bundle, round(s.cpus, 3)) for s in colocated.seats["policy"]] == [(0, 0.333), (1, 0.5)]
    assert [s.bundle for s in colocated.seats["reference"]] == [0]
    apart = plan_placement(PpoSection(colocate="none", roles=roles), ["policy", "critic", "reference"])
    assert apart.total("CPU") == 5.0 and [s.bundle for s in apart.seats["critic"]] == [2, 3]
    pair = plan_placement(PpoSection(colocate="policy_reference", roles=roles), ["policy", "critic", "reference"])
    assert pair.total("CPU") == 4.0 and pair.seats["reference"][0].bundle == pair.seats["policy"][0].bundle


def test_role_actors_get_one_thread_per_cpu_of_their_own_role():
    """ppo.roles.<role>.cpus_per_worker sets a role actor's thread pools, not cluster.cpus_per_worker (the SPMD
    workers'); colocated ranks get threads for their share of the bundle."""
    from tuneyard.launch.config import job_from_dict

    job = job_from_dict(
        {
            **PPO_JOB,
            "model": {"name_or_path": "a-policy"},
            "ppo": {**PPO_JOB["ppo"], "roles": {"policy": {"cpus_per_worker": 2}, "critic": {"cpus_per_worker": 4}}},
            "cluster": {"cpus_per_worker": 1},
        }
    )
    apart = plan_placement(job.ppo, ["policy", "critic"])
    assert role_env(apart.seats["policy"][0])["OMP_NUM_THREADS"] == "2"
    assert role_env(apart.seats["critic"][0])["MKL_NUM_THREADS"] == "4"
    shared = plan_placement(job.ppo.model_copy(update={"colocate": "all"}), ["policy", "critic"])
    assert [role_env(s[0])["OMP_NUM_THREADS"] for s in shared.seats.values()] == ["1", "2"]


def test_roles_that_do_not_fit_show_the_arithmetic():
    ppo = PpoSection(roles={"policy": {"workers": 2, "gpus_per_worker": 1}, "critic": {"gpus_per_worker": 1}})
    placement = plan_placement(ppo, ["policy", "critic", "reference"])
    with pytest.raises(ClusterError) as info:
        check_fits(placement, {"CPU": 8.0, "GPU": 2.0}, ppo)
    assert "ask for 3 GPUs (policy 2 x 1 + critic 1 x 1 + reference 1 x 0) but the Ray cluster has 2" in str(info.value)


def test_batch_sizes_must_divide():
    with pytest.raises(ValueError, match=r"mini_batch_size \(12\) must divide the samples of an iteration"):
        PpoSection(rollout_batch_size=16, mini_batch_size=12)
    with pytest.raises(ValueError, match="must split evenly over the 3 policy worker"):
        PpoSection(rollout_batch_size=16, mini_batch_size=16, roles={"policy": {"workers": 3}})


def test_prompt_order_is_a_function_of_the_position():
    prompts = [Prompt([{"role": "user", "content": str(i)}], [i]) for i in range(10)]
    first_pass = [p.ids[0] for i in range(5) for p in prompts_at(prompts, 2 * i, 2, seed=3)]
    assert sorted(first_pass) == list(range(10))  # one pass sees every prompt once
    assert prompts_at(prompts, 14, 2, seed=3) == prompts_at(prompts, 14, 2, seed=3)
    second_pass = [p.ids[0] for i in range(5, 10) for p in prompts_at(prompts, 2 * i, 2, seed=3)]
    assert sorted(second_pass) == list(range(10)) and second_pass != first_pass  # reshuffled
    # a draw across the end of a pass reads the last prompts of one shuffle and the first of the next
    assert [p.ids[0] for p in prompts_at(prompts, 9, 2, seed=3)] == [first_pass[-1], second_pass[0]]


@pytest.fixture(scope="session")
def reward_models(sft_base, tmp_path_factory) -> dict[str, str]:
    """Two untrained one-output reward models: one on the policy's tokenizer, one with a tokenizer of its own."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("reward-models")
    torch.manual_seed(0)
    same = AutoModelForSequenceClassification.from_pretrained(sft_base, num_labels=1)
    same.save_pretrained(root / "same-tokenizer")
    AutoTokenizer.from_pretrained(sft_base).save_pretrained(root / "same-tokenizer")

    # a small byte-level BPE without a chat template: the reward model reads plain text
    raw = Tokenizer(models.BPE(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train(
        [str(DATA.parent / "data" / "corpus.txt")],
        trainers.BpeTrainer(vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[EOS]"]),
    )
    other_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )
    config = LlamaConfig(
        **{k: v for k, v in TINY_ARCH.items() if k != "model_type"},
        vocab_size=len(other_tokenizer),
        num_labels=1,
        pad_token_id=other_tokenizer.pad_token_id,
    )
    LlamaForSequenceClassification(config).save_pretrained(root / "other-tokenizer")
    other_tokenizer.save_pretrained(root / "other-tokenizer")
    return {"same": str(root / "same-tokenizer"), "other": str(root / "other-tokenizer")}


def test_reward_model_with_another_tokenizer_reads_its_own_tokens(reward_models, sft_base):
    tokenizer = AutoTokenizer.from_pretrained(reward_models["other"])
    model = AutoModelForSequenceClassification.from_pretrained(reward_models["other"]).eval()
    prompts = [[{"role": "user", "content": "Say the last word: red fox owl"}]] * 2 + [
        [{"role": "user", "content": "Say the last word: cat"}]
    ]
    responses = ["owl", "fox owl fox", "cat"]
    scores = reward_model_scores(model, tokenizer, prompts, responses, batch_size=2)  # padded batches
    with torch.no_grad():
        alone = [
            float(model(torch.tensor([render_for_reward_model(tokenizer, p, r)])).logits[0, 0])
            for p, r in zip(prompts, responses, strict=True)
        ]
    assert scores == pytest.approx(alone, abs=1e-5)
    assert (
        tokenizer.decode(render_for_reward_model(tokenizer, prompts[0], "owl")) == "Say the last word: red fox owl\nowl"
    )
    policy_ids = AutoTokenizer.from_pretrained(sft_base)("Say the last word: red fox owl\nowl")["input_ids"]
    assert policy_ids != render_for_reward_model(tokenizer, prompts[0], "owl")


# --- real runs on Ray: DeepSpeed engines in role actors, gloo groups


@pytest.fixture(scope="session")
def learning_run(ray_session, sft_base, tmp_path_factory):
    """80 iterations of 32 samples on the shipped task from the weak SFT model (about 25 s here)."""
    tmp = tmp_path_factory.mktemp("ppo-learn")
    job = ppo_job(tmp, sft_base, "run", ppo={"iterations": 80, "critic_learning_rate": 1e-3})
    result = run_job(job_from_dict(job), show_progress=False)
    return result


@pytest.mark.integration
def test_ppo_raises_the_reward_with_bounded_kl(learning_run):
    rows = iterations_of(learning_run.run_dir)
    assert len(rows) == 80
    first, last = (sum(r["reward"] for r in part) / len(part) for part in (rows[:16], rows[-16:]))
    # measured here: 0.385 -> 0.496 (last_word_exact + 0.2 x one_word, sampled at temperature 0.7)
    assert last > first + 0.06, (first, last)
    # KL per response (k1 over 32 samples, a noisy estimate: one unlikely answer lifts an iteration's) measured over the
    # last 16: a mean of 0.29 and a max of 2.4 on one machine; on another a median of 0.43, a mean of 1.03 and a max
    # of 6.5 (one iteration, between 0.09 and 2.8)
    assert statistics.median(r["kl"] for r in rows[-16:]) < 1.0 and max(r["kl"] for r in rows) < 10.0
    for key in (
        "reward_std",
        "kl_coef",
        "policy_loss",
        "value_loss",
        "clip_frac",
        "approx_kl",
        "entropy",
        "response_length",
        "generate_s",
        "score_s",
        "train_s",
    ):
        assert all(key in r for r in rows), key


@pytest.mark.integration
def test_grpo_learns_with_no_critic_actor(ray_session, sft_base, tmp_path):
    """advantage: grpo, the KL in the loss (k3): 4 answers per prompt scored against each other, no critic."""
    job = ppo_job(
        tmp_path,
        sft_base,
        "grpo",
        ppo={
            "iterations": 80,
            "rollout_batch_size": 16,
            "samples_per_prompt": 4,
            "mini_batch_size": 32,
            "advantage": "grpo",
            "kl": {"in": "loss", "estimator": "k3", "coef": 0.02},
        },
    )
    result = run_job(job_from_dict(job), show_progress=False)
    rows = iterations_of(result.run_dir)
    assert len(rows) == 80
    first, last = (sum(r["reward"] for r in part) / len(part) for part in (rows[:16], rows[-16:]))
    # measured here: 0.392 -> 0.545 (last_word_exact + 0.2 x one_word, sampled at temperature 0.7)
    assert last > first + 0.06, (first, last)
    assert all("kl_loss" in r and "value_loss" not in r for r in rows)
    logs = sorted(p.name for p in (result.run_dir / "logs").glob("*-0.log"))
    assert "policy-0.log" in logs and "critic-0.log" not in logs, logs  # no critic actor was started
    assert (result.run_dir / "final").is_dir() and not (result.run_dir / "critic").exists()


@pytest.mark.integration
@pytest.mark.parametrize("estimator", ["rloo", "reinforce_baseline", "dr_grpo"])
def test_the_other_group_estimators_run(ray_session, sft_base, tmp_path, estimator):
    job = ppo_job(tmp_path, sft_base, estimator, ppo={"iterations": 2, "advantage": estimator, "dual_clip": 3.0})
    rows = iterations_of(run_job(job_from_dict(job), show_progress=False).run_dir)
    assert len(rows) == 2 and all(math.isfinite(r["policy_loss"]) and "value_loss" not in r for r in rows)


@pytest.mark.integration
def test_ppo_reports_its_figures_to_tensorboard(learning_run):
    """The default tracker (training.report_to: [tensorboard]) gets each iteration's record from the controller."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = iterations_of(learning_run.run_dir)
    events = EventAccumulator(str(learning_run.run_dir / "tensorboard"))
    events.Reload()
    for key in ("loss", "reward", "kl"):
        got = [(e.step, e.value) for e in events.Scalars(f"train/{key}")]
        assert [step for step, _ in got] == [r["step"] for r in rows], key
        assert [value for _, value in got] == pytest.approx([r[key] for r in rows], rel=1e-6, abs=1e-7), key


@pytest.mark.integration
def test_first_ppo_step_has_ratio_one(learning_run):
    """Old log-probs (rollout forward) and new ones (training forward) agree before the first update.

    Every iteration's first mini-batch comes before any update of that iteration, with a batch
    composition (a shuffled mini-batch in micro-batches) other than the rollout's."""
    rows = iterations_of(learning_run.run_dir)
    assert max(r["first_ratio_max_dev"] for r in rows) < 1e-5
    assert max(r["ratio_max_dev"] for r in rows) > 1e-3  # later mini-batches did move the policy


@pytest.mark.integration
def test_ppo_outputs_load_and_plot(learning_run):
    run_dir = learning_run.run_dir
    policy = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    critic = AutoModelForSequenceClassification.from_pretrained(run_dir / "critic")
    assert critic.config.num_labels == 1 and policy.config.model_type == "llama"
    assert (run_dir / "final" / "model.safetensors").exists() and not list(run_dir.glob("final/*.bin"))
    subprocess.run([sys.executable, "-m", "tuneyard.launch.cli", "plot", str(run_dir)], check=True, capture_output=True)
    assert (run_dir / "metrics.png").stat().st_size > 10_000
    assert "greedy reward" in learning_run.figures


@pytest.mark.integration
def test_plot_overlays_runs_with_each_stages_figures(learning_run, sft_base, tmp_path):
    """`tuneyard plot PPO_RUN SFT_RUN`: one PNG, a loss panel for both and the PPO run's reward and KL panels."""
    from tuneyard.training.metrics import figure_panels

    runs = [learning_run.run_dir, Path(sft_base).parent]
    panels = figure_panels([read_metrics(run / "metrics.jsonl") for run in runs])
    assert [key for key, _ in panels] == ["loss", "reward", "kl"]
    out = tmp_path / "both.png"
    command = [sys.executable, "-m", "tuneyard.launch.cli", "plot", *map(str, runs), "--out", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000


@pytest.mark.integration
def test_two_rank_zero3_equals_one_rank_zero0(ray_session, sft_base, reward_models, tmp_path):
    """Greedy rollouts, so both runs see the same samples; the reward model shares the policy's tokenizer,
    so the critic starts from it. colocate all (2-rank groups) and none (1-rank groups) both finish; the
    one-rank run takes its log-probs from whole logits, the two-rank run in chunks of 7 response tokens."""
    common = {"iterations": 1, "generation": {"temperature": 0.0}, "rollout_batch_size": 8, "mini_batch_size": 16}
    reward = {"model": reward_models["same"], "model_weight": 0.5}
    one = ppo_job(
        tmp_path, sft_base, "one", deepspeed={"zero_stage": 0}, reward=reward, ppo={**common, "logprob_chunk_tokens": 0}
    )
    two = ppo_job(
        tmp_path,
        sft_base,
        "two",
        deepspeed={"zero_stage": 3},
        reward=reward,
        ppo={
            **common,
            "logprob_chunk_tokens": 7,  # the tied head called chunk by chunk, its ZeRO-3 shards gathered each time
            "colocate": "all",
            "roles": {"policy": {"workers": 2}, "critic": {"workers": 2}, "reference": {"workers": 2, "zero_stage": 3}},
        },
    )
    rows = [iterations_of(run_job(job_from_dict(j), show_progress=False).run_dir)[0] for j in (one, two)]
    for key in ("reward", "kl", "first_policy_loss", "first_value_loss", "value_loss", "policy_loss", "entropy"):
        assert rows[1][key] == pytest.approx(rows[0][key], rel=1e-4, abs=1e-6), key
    assert rows[0]["first_ratio_max_dev"] < 1e-5 and rows[1]["first_ratio_max_dev"] < 1e-5


HOOK: dict = {"run_dir": None, "action": None}


@reward_function("test_hook_in_iteration_three")
def hook_in_iteration_three(prompts: list, completions: list, **_: object) -> list[float]:
    """Zero reward; while the run in HOOK scores its iteration 3, it does HOOK's action to that run once."""
    run_dir = HOOK["run_dir"]
    if run_dir is not None and len(iterations_of(run_dir)) == 2:
        HOOK["run_dir"] = None
        HOOK["action"](run_dir)
    return [0.0] * len(completions)


def request_stop(run_dir) -> None:
    """What SIGUSR1 to `tuneyard train` does."""
    (run_dir / REQUEST_FILE).write_text("test\n")


def kill_critic(run_dir) -> None:
    """SIGKILL the critic actor's process (its pid is in its log)."""
    line = [x for x in (run_dir / "logs" / "critic-0.log").read_text().splitlines() if "critic rank 0 of 1: pid" in x]
    os.kill(int(line[-1].rsplit(" ", 1)[-1]), signal.SIGKILL)


FOUR_ITERATIONS = dict(
    reward={
        "functions": [{"name": "last_word_exact"}, {"name": "test_hook_in_iteration_three", "weight": 0.0}],
        "model": "OTHER",
        "model_weight": 0.1,
    },
    ppo={"iterations": 4, "save_every": 1, "kl": {"controller": "adaptive", "coef": 0.2, "target": 0.5, "horizon": 64}},
    output={"keep_last": 1},
)


def four_iteration_job(tmp_path, sft_base, reward_models, name: str) -> dict:
    """Adaptive KL, a checkpoint every iteration (keep_last 1), a reward model with its own tokenizer."""
    job = ppo_job(tmp_path, sft_base, name, **copy.deepcopy(FOUR_ITERATIONS))
    job["reward"]["model"] = reward_models["other"]
    return job


@pytest.fixture(scope="session")
def straight_run(ray_session, sft_base, reward_models, tmp_path_factory):
    """The 4 iterations without interruption."""
    job = four_iteration_job(tmp_path_factory.mktemp("ppo-straight"), sft_base, reward_models, "run")
    return run_job(job_from_dict(job), show_progress=False).run_dir


def assert_same_iterations(expected_dir, got_dir) -> None:
    expected, got = iterations_of(expected_dir), iterations_of(got_dir)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert len({r["kl_coef"] for r in expected}) == 4  # the adaptive coefficient moved every iteration
    for want, have in zip(expected, got, strict=True):
        for key in ("reward", "kl_coef", "kl", "policy_loss", "value_loss"):
            assert have[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (want["step"], key)
    a = AutoModelForCausalLM.from_pretrained(expected_dir / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(got_dir / "final").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.integration
def test_resume_after_preemption_ends_where_an_uninterrupted_run_ends(straight_run, sft_base, reward_models, tmp_path):
    """The stop lands in iteration 3 of 4: checkpoint, Preempted (exit 75 from the CLI), the rerun resumes."""
    job = job_from_dict(four_iteration_job(tmp_path, sft_base, reward_models, "resumed"))
    HOOK.update(run_dir=tmp_path / "resumed", action=request_stop)
    with pytest.raises(Preempted, match="stopped after step 3 of 4"):
        run_job(job, show_progress=False)
    checkpoints = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-3"] and not (tmp_path / "resumed" / "final").exists()  # keep_last 1
    assert (tmp_path / "resumed" / "checkpoints" / "checkpoint-3" / COMPLETE_MARKER).exists()
    run_job(job, show_progress=False)
    assert_same_iterations(straight_run, tmp_path / "resumed")


@pytest.mark.integration
def test_a_lost_role_actor_restarts_the_groups_from_the_last_checkpoint(
    straight_run, sft_base, reward_models, tmp_path
):
    """SIGKILL of the critic in iteration 3: the groups restart from checkpoint-2 and finish as if nothing happened."""
    job = job_from_dict(four_iteration_job(tmp_path, sft_base, reward_models, "killed"))
    HOOK.update(run_dir=tmp_path / "killed", action=kill_critic)
    run_job(job, show_progress=False)
    records = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    restarts = [r for r in records if r.get("event") == "restart"]
    assert len(restarts) == 1 and "died" in restarts[0]["reason"].lower()
    assert [r["step"] for r in records if r.get("event") == "start"] == [0, 2]
    assert_same_iterations(straight_run, tmp_path / "killed")


@pytest.mark.integration
def test_lora_policy_is_its_own_reference(ray_session, sft_base, tmp_path):
    """A LoRA policy under ZeRO-3 with a tied head: its reference is the base with the adapter off, and its
    log-probs and update in chunks of 5 response tokens equal the whole logits' (the frozen tied head's shards are
    gathered again for each recomputed chunk)."""
    rows = {}
    for chunk in (0, 5):
        job = ppo_job(
            tmp_path,
            sft_base,
            f"lora-{chunk}",
            peft={"method": "lora", "r": 4, "alpha": 8},
            ppo={"iterations": 2, "logprob_chunk_tokens": chunk, "roles": {"policy": {"zero_stage": 3}}},
            training={"learning_rate": 5e-3},
        )
        result = run_job(job_from_dict(job), show_progress=False)
        rows[chunk] = iterations_of(result.run_dir)
    for want, got in zip(rows[0], rows[5], strict=True):
        for key in ("reward", "kl", "policy_loss", "entropy"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (want["step"], key)
    rows = rows[5]
    # the fresh adapter is the identity, so the policy starts as its reference; after an update it is not
    assert rows[0]["kl"] == 0.0 and abs(rows[1]["kl"]) > 0
    assert not (result.run_dir / "logs" / "reference-0.log").exists()  # no reference actor, no second copy
    config = json.loads((result.run_dir / "final" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == sft_base


# --- the user's mistakes: one paragraph, exit 2, before any actor starts


@pytest.mark.parametrize(
    "change, fragments",
    [
        ({"reward": {"functions": []}}, ["stage ppo needs rewards"]),
        ({"ppo": {"max_prompt_length": 8}}, ["data.train: prompt 1", "over ppo.max_prompt_length 8"]),
        ({"reward": {"model": "POLICY"}}, ["is not a reward model", "num_labels"]),
        (
            {"reward": {"model": "OTHER"}, "ppo": {"roles": {"critic": {"init": "reward_model"}}}},
            ["has another tokenizer than the policy", "ppo.roles.critic.init: policy"],
        ),
        (
            {"ppo": {"roles": {"policy": {"gpus_per_worker": 1}}}},
            ["the PPO roles ask for 1 GPUs (policy 1 x 1 + critic 1 x 0 + reference 1 x 0) but the Ray cluster has 0"],
        ),
        ({"data": {"format": "preference"}}, ["stage ppo reads data.format prompt"]),
    ],
)
def test_bad_ppo_input_is_one_paragraph(tmp_path, sft_base, reward_models, change, fragments):
    job = ppo_job(tmp_path, sft_base, "run")
    for section, values in change.items():
        for key, value in values.items():
            if value == "POLICY":
                value = sft_base
            elif value == "OTHER":
                value = reward_models["other"]
            job[section][key] = {**job[section][key], **value} if isinstance(value, dict) else value
    proc = run_cli(tmp_path, job)
    assert_user_error(proc, *fragments)
    assert not list((tmp_path / "run" / "logs").glob("*.log"))  # no actor started


def test_ppo_refuses_single(tmp_path, sft_base):
    assert_user_error(run_cli(tmp_path, ppo_job(tmp_path, sft_base, "run"), "--single"), "--single is not supported")


@pytest.mark.integration
def test_nan_policy_steps_are_skipped_then_stop_the_run(ray_session, sft_base, tmp_path, monkeypatch):
    """Policy optimizer steps 2 and 3 get a NaN loss (rank 0) with training.max_nonfinite_steps 1: step 2 is
    skipped and the run goes on; step 3 is the second in a row and stops it, naming the steps; checkpoint-1 stays."""
    monkeypatch.setenv("TUNEYARD_FAULT_NAN_LOSS", "2,3")
    job = ppo_job(
        tmp_path,
        sft_base,
        "nan",
        ppo={"iterations": 3, "save_every": 1},
        training={"max_nonfinite_steps": 1},
    )
    from tuneyard.training.nonfinite import NonFiniteTraining

    with pytest.raises(NonFiniteTraining) as info:
        run_job(job_from_dict(job), show_progress=False)
    message = str(info.value)
    assert message.startswith("training stopped at step 3 (optimizer steps of policy and critic; PPO iteration 2)")
    assert "NaN/inf for 2 steps in a row (steps 2-3)" in message and "checkpoint-1" in message, message
    records = read_metrics(tmp_path / "nan" / "metrics.jsonl")
    assert [r["optimizer_step"] for r in records if r.get("event") == "nonfinite"] == [2, 3]
    assert [r["step"] for r in iterations_of(tmp_path / "nan")] == [1]  # iteration 2 was not completed
    assert [p.name for p in complete_checkpoints(tmp_path / "nan")] == ["checkpoint-1"]


@pytest.mark.integration
def test_a_stalled_policy_rank_is_named(ray_session, sft_base, tmp_path, monkeypatch):
    """Policy rank 1 of 2 is held after its optimizer step 2 with cluster.collective_timeout_s 20: rank 0
    answers and the controller stops waiting 20 s later, naming rank 1, its last step and its log."""
    monkeypatch.setenv("TUNEYARD_FAULT_HOLD", "1@2")
    job = ppo_job(
        tmp_path,
        sft_base,
        "held",
        ppo={"iterations": 2, "roles": {**PPO_JOB["ppo"]["roles"], "policy": {"workers": 2, "cpus_per_worker": 0.5}}},
        training={"max_failures": 0},
        cluster={"collective_timeout_s": 20},
    )
    started = time.monotonic()
    with pytest.raises(TrainingFailed) as info:
        run_job(job_from_dict(job), show_progress=False)
    message = str(info.value)
    assert message.startswith(
        "PPO stopped: policy rank(s) 0 answered and the rest stayed silent for cluster.collective_timeout_s (20 s); "
        "policy rank 1 did not arrive (its last sign: finished step 2, "
    ), message
    assert f"log: {tmp_path / 'held' / 'logs' / 'policy-1.log'}" in message
    assert "the 0 restart(s) that training.max_failures allows are used up" in message
    assert time.monotonic() - started < 300  # bounded by the timeout, not by the hold (an hour)


@pytest.mark.integration
def test_a_full_disk_during_a_ppo_save_is_one_paragraph(sft_base, tmp_path):
    """The run dir is on a 48 MiB tmpfs that fills after checkpoint-1: the save of checkpoint-2 fails with
    one paragraph (exit 1, not retried), the half-written folder goes and checkpoint-1 stays complete."""
    from tuneyard.training.metrics import COMPLETE_MARKER

    mount = tmp_path / "small"
    if not can_mount_tmpfs(mount):
        pytest.skip("needs unshare -m and tmpfs mounts (root)")
    job = ppo_job(tmp_path, sft_base, "unused", ppo={"iterations": 3, "save_every": 1}, output={"keep_last": 1})
    run_dir = mount / "run"
    job["output"]["dir"] = str(run_dir)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    out = tmp_path / "out"
    out.mkdir()
    tuneyard = f"'{sys.executable}' -m tuneyard.launch.cli"
    script = f"""
mount -t tmpfs -o size=48m tmpfs '{mount}'
( while [ ! -e '{run_dir}/checkpoints/checkpoint-1/{COMPLETE_MARKER}' ]; do sleep 0.05; done
  free=$(df --output=avail -B1 '{mount}' | tail -1)
  dd if=/dev/zero of='{mount}/filler' bs=64K count=$(( (free - 524288) / 65536 )) 2>/dev/null ) &
{tuneyard} train '{tmp_path / "job.yaml"}' > '{out}/out' 2> '{out}/err'; echo $? > '{out}/rc'
ls '{run_dir}/checkpoints' > '{out}/ls'
ls '{run_dir}/checkpoints/checkpoint-1' > '{out}/ls1'
"""
    subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=ROOT, timeout=900, check=True)
    err = (out / "err").read_text()
    assert (out / "rc").read_text().strip() == "1", err[-3000:]
    assert "Traceback" not in err
    message = err.strip().splitlines()[-1]
    assert message.startswith(f"saving checkpoint-2 failed: no space left on the disk of {run_dir}"), message
    assert "checkpoint-1, is intact" in message, message
    assert (out / "ls").read_text().split() == ["checkpoint-1"]
    assert COMPLETE_MARKER in (out / "ls1").read_text().split()
