"""PPO throughput: tuneyard's `stage: ppo` phase by phase (colocate all vs none), and against TRL's PPOTrainer.

Part 1 runs the same PPO job (policy, critic, reference; rewards from the named functions last_word_exact
and one_word) with `ppo.colocate: all` and `ppo.colocate: none`, rounds alternating the two, and reports
the medians of the per-iteration generate / score / train seconds and samples/s.

Part 2 compares samples/s with TRL's PPOTrainer, which TRL removed in 1.13; 1.12.0 is the last release
that ships it (as trl.experimental.ppo). TRL's PPO takes only a reward model, so both sides score with
the same reward-model folder (built here from the policy with a one-output head) and both value models
start from it (ours: `ppo.roles.critic.init: reward_model`). Same prompts (chat-templated), same batch
(16 prompts x 1 sample), mini-batch, micro-batch, PPO epochs, max_new_tokens, temperature, LR and fp32.
The shapes differ and the result says so: TRL is one process without DeepSpeed; ours is a driver plus
one Ray actor per role with DeepSpeed engines. "ratio" is ours / TRL as shipped; TRL's loop calls
gc.collect() twice per update, which dominates its time on a model this small, so the result also
times those calls and gives the ratio TRL would face without them ("ratio_if_trl_skipped_gc").

TRL's side runs in its own virtualenv (outside the repository, never committed); without it Part 2 is
skipped and "ratio" is NaN. Build it with:

    python3 -m venv /work/trl-ppo-venv
    /work/trl-ppo-venv/bin/pip install torch==2.13.0
    /work/trl-ppo-venv/bin/pip install trl==1.12.0 transformers==5.23.0 accelerate==1.15.0 datasets==5.2.0 \\
        torch==2.13.0

(torch is pinned on the second line too, so pip never swaps the CPU wheel for a CUDA one; another
location: set TUNEYARD_TRL_PPO_VENV.) Base models are built in the bench's temp dir: a short pretraining
and SFT of the bench's tiny Llama, each in this process.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import subprocess
import time
from pathlib import Path

from bench.common import ARCH, ROOT, TOKENIZER
from tuneyard.launch.config import job_from_dict
from tuneyard.launch.run_job import run_job
from tuneyard.training.metrics import read_metrics

DATA = ROOT / "examples" / "data"
PROMPTS = DATA / "last-word-prompts-train.jsonl"
TRL_VENV = Path(os.environ.get("TUNEYARD_TRL_PPO_VENV", "/work/trl-ppo-venv"))
SKIP = 2  # iterations of start-up and warm-up left out of every median
SEED = 7
# one torch thread per process, TRL's as each of our actors (worker_env sets OMP_NUM_THREADS=1 there):
# two OpenMP threads on a busy two-core machine stall at every barrier and make a run 10-20x slower
TRL_THREADS = 1

# the settings both sides of Part 2 share; Part 1 uses them with two samples per prompt
SETTINGS = {
    "rollout_batch_size": 16,
    "mini_batch_size": 16,
    "micro_batch_size": 4,
    "ppo_epochs": 1,
    "max_new_tokens": 8,
    "temperature": 0.7,
    "learning_rate": 1e-4,
    "kl_coef": 0.05,
    "clip_range": 0.2,
    "value_clip_range": 0.2,
    "value_loss_coef": 1.0,
    "gamma": 1.0,
    "lam": 0.95,
    "seed": SEED,
}
PHASES = ("generate_s", "score_s", "train_s", "samples_per_s")


def single_run(job: dict, run_dir: Path) -> Path:
    """Run a job in this process (no Ray) and return its final/ folder."""
    job = copy.deepcopy(job)
    job["output"] = {"dir": str(run_dir), "overwrite": True}
    job["data"]["cache_dir"] = str(run_dir.parent / ".tokenized")
    job["cluster"] = {"workers": 1}
    run_job(job_from_dict(job), show_progress=False, single=True)
    return run_dir / "final"


def build_bases(root: Path) -> tuple[Path, Path]:
    """The policy (tiny Llama: short pretraining, then SFT on the last-word task) and a reward model from it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as TRL_THREADS: a busy machine stalls multi-threaded steps of a tiny model
    try:
        return _build_bases(root)
    finally:
        torch.set_num_threads(threads)


def _build_bases(root: Path) -> tuple[Path, Path]:
    """`build_bases` at whatever thread count is set."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = {"init": "scratch", "tokenizer": str(TOKENIZER), "architecture": ARCH}
    pretrain = {
        "stage": "pretrain",
        "model": model,
        "data": {"format": "text", "train": str(DATA / "corpus.txt"), "max_length": 64},
        "training": {"learning_rate": 3e-3, "batch_size": 4, "max_steps": 60, "warmup_steps": 2, "seed": SEED,
                     "precision": "fp32"},
    }  # fmt: skip
    pre = single_run(pretrain, root / "pretrain")
    sft = {
        "stage": "sft",
        "model": {"name_or_path": str(pre)},
        "data": {"format": "messages", "train": str(DATA / "last-word-train.jsonl"), "max_length": 128},
        "training": {"learning_rate": 3e-3, "batch_size": 8, "max_steps": 120, "seed": SEED, "precision": "fp32"},
    }
    policy = single_run(sft, root / "sft")
    # TRL's PPO needs a reward model; a one-output head on the policy (same tokenizer) serves both sides alike
    torch.manual_seed(SEED)
    reward = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    reward.config.pad_token_id = tokenizer.pad_token_id  # batched scoring finds each row's last token by it
    reward.save_pretrained(root / "reward")
    tokenizer.save_pretrained(root / "reward")
    return policy, root / "reward"


def ppo_job(run_dir: Path, policy: Path, iterations: int, samples_per_prompt: int, colocate: str,
            reward_model: Path | None) -> dict:  # fmt: skip
    """Our PPO job on the shared settings; rewards from a reward model, or the named functions without one."""
    s = SETTINGS
    roles = {role: {"cpus_per_worker": 0.5} for role in ("policy", "critic", "reference", "reward")}
    if reward_model is not None:
        roles["critic"]["init"] = "reward_model"
        reward = {"model": str(reward_model)}
    else:
        del roles["reward"]
        reward = {"functions": [{"name": "last_word_exact", "weight": 1.0}, {"name": "one_word", "weight": 0.2}]}
    return {
        "stage": "ppo",
        "model": {"name_or_path": str(policy)},
        "data": {"format": "prompt", "train": str(PROMPTS), "max_length": 128},
        "ppo": {
            "rollout_batch_size": s["rollout_batch_size"],
            "samples_per_prompt": samples_per_prompt,
            "mini_batch_size": s["mini_batch_size"] * samples_per_prompt,
            "micro_batch_size": s["micro_batch_size"],
            "ppo_epochs": s["ppo_epochs"],
            "iterations": iterations,
            "clip_range": s["clip_range"],
            "value_clip_range": s["value_clip_range"],
            "value_loss_coef": s["value_loss_coef"],
            "gamma": s["gamma"],
            "lam": s["lam"],
            "generation": {"max_new_tokens": s["max_new_tokens"], "temperature": s["temperature"]},
            "kl": {"coef": s["kl_coef"]},
            "roles": roles,
            "colocate": colocate,
        },
        "reward": reward,
        "training": {"learning_rate": s["learning_rate"], "lr_scheduler": "constant", "precision": "fp32",
                     "seed": SEED},
        "deepspeed": {"zero_stage": 2},
        "output": {"dir": str(run_dir), "overwrite": True},
    }  # fmt: skip


def wait_for_free_cpus(timeout_s: float = 60.0) -> None:
    """Block until the previous job's actors and placement group have given their CPUs back to Ray."""
    import ray

    if not ray.is_initialized():
        return  # run_job starts (and stops) a Ray of its own
    # the previous job's processes may still be exiting: let them go before the next job is timed
    deadline = time.monotonic() + timeout_s
    total = ray.cluster_resources().get("CPU", 0.0)
    while ray.available_resources().get("CPU", 0.0) < total - 1e-6 and time.monotonic() < deadline:
        time.sleep(0.2)


def run_ours(job: dict) -> list[dict]:
    """Run our PPO job on the current Ray; its steady-state iterations, each with its step-to-step wall time."""
    wait_for_free_cpus()
    run_job(job_from_dict(job), show_progress=False)
    records = [r for r in read_metrics(Path(job["output"]["dir"]) / "metrics.jsonl") if "generate_s" in r]
    samples = job["ppo"]["rollout_batch_size"] * job["ppo"]["samples_per_prompt"]
    for before, record in zip(records, records[1:], strict=False):
        # record end to record end, as TRL's side is timed: everything the driver does in an iteration
        record["wall_samples_per_s"] = samples / (record["time"] - before["time"])
    return [r for r in records if r["step"] > SKIP]


def medians(records: list[dict], keys: tuple[str, ...]) -> dict[str, float]:
    """The median of each key over the records."""
    return {k: statistics.median(r[k] for r in records) for k in keys}


def trl_available() -> str | None:
    """Why TRL's side cannot run (None when it can)."""
    python = TRL_VENV / "bin" / "python"
    if not python.exists():
        return f"no virtualenv at {TRL_VENV}"
    check = subprocess.run([str(python), "-c", "import trl.experimental.ppo"], capture_output=True, text=True,
                           env={**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"})  # fmt: skip
    if check.returncode:
        return f"{python} cannot import trl.experimental.ppo: {check.stderr.strip().splitlines()[-1]}"
    return None


def run_trl(work: Path, policy: Path, reward_model: Path, iterations: int) -> dict:
    """TRL's PPOTrainer in its own virtualenv with the shared settings; its result JSON."""
    work.mkdir(parents=True, exist_ok=True)
    settings = {
        **SETTINGS,
        "policy": str(policy),
        "reward_model": str(reward_model),
        "prompts": str(PROMPTS),
        "iterations": iterations,
        "skip": SKIP,
        "torch_threads": TRL_THREADS,
        "output_dir": str(work / "out"),
    }
    (work / "settings.json").write_text(json.dumps(settings, indent=2))
    threads = str(TRL_THREADS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}  # fmt: skip
    env.pop("PYTHONPATH", None)  # TRL's venv must not see this repository's packages
    with open(work / "trl.log", "w") as log:
        subprocess.run(
            [str(TRL_VENV / "bin" / "python"), str(ROOT / "bench" / "trl_ppo_baseline.py"),
             str(work / "settings.json"), str(work / "result.json")],
            check=True, env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    return json.loads((work / "result.json").read_text())


def main(tmp: Path, rounds: int = 2, iterations: int = 25) -> dict:
    """Part 1 (colocate all vs none) and Part 2 (ours vs TRL, reward model on both sides), rounds alternating."""
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    policy, reward_model = build_bases(tmp / "bases")
    bases_s = time.perf_counter() - started

    # --- Part 1: the same job, colocated and not; each round swaps which goes first
    colocated: dict[str, list[dict]] = {"all": [], "none": []}
    per_run: dict[str, list[float]] = {"all": [], "none": []}  # each run's median, to show the machine's noise
    for i in range(rounds):
        for mode in ("all", "none") if i % 2 == 0 else ("none", "all"):
            records = run_ours(ppo_job(tmp / f"colocate-{mode}-{i}", policy, iterations, 2, mode, None))
            colocated[mode].extend(records)
            per_run[mode].append(medians(records, ("samples_per_s",))["samples_per_s"])
    part1 = {
        f"colocate_{mode}": {**medians(recs, PHASES), "iterations": len(recs), "per_run_samples_per_s": per_run[mode]}
        for mode, recs in colocated.items()
    }
    result: dict = {
        **part1,
        "colocate_all_vs_none_samples_per_s": part1["colocate_all"]["samples_per_s"]
        / part1["colocate_none"]["samples_per_s"],
        "part1_job": f"rollout {SETTINGS['rollout_batch_size']} prompts x 2 samples, mini-batch "
        f"{2 * SETTINGS['mini_batch_size']}, micro {SETTINGS['micro_batch_size']}, {iterations} iterations x "
        f"{rounds} rounds, max_new_tokens {SETTINGS['max_new_tokens']}; roles policy, critic, reference "
        "(0.5 CPU each), rewards last_word_exact + 0.2 one_word; medians after the first "
        f"{SKIP} iterations of each run",
    }

    # --- Part 2: ours vs TRL's PPOTrainer, both scoring with the same reward model
    why_not = trl_available()
    if why_not is not None:
        result.update(
            ratio=math.nan,
            target=">= 1.0 (TRL comparison skipped)",
            trl_skipped=f"{why_not}; build the venv with the commands in bench/bench_ppo.py's docstring",
        )
    else:
        ours: list[dict] = []
        trl_updates: list[dict] = []
        trl_result: dict = {}
        ours_runs: list[float] = []
        trl_runs: list[float] = []
        for i in range(rounds):
            for side in ("ours", "trl") if i % 2 == 0 else ("trl", "ours"):
                if side == "ours":
                    job = ppo_job(tmp / f"ours-rm-{i}", policy, iterations, 1, "none", reward_model)
                    records = run_ours(job)
                    ours.extend(records)
                    ours_runs.append(medians(records, ("wall_samples_per_s",))["wall_samples_per_s"])
                else:
                    trl_result = run_trl(tmp / f"trl-{i}", policy, reward_model, iterations)
                    trl_updates.extend(u for u in trl_result["updates"] if u["step"] > SKIP)
                    trl_runs.append(trl_result["samples_per_s"])
        for update in trl_updates:
            # what TRL would do without the two gc.collect() calls its loop makes every update
            update["samples_per_s_without_gc"] = SETTINGS["rollout_batch_size"] / (update["seconds"] - update["gc_s"])
        ours_m = medians(ours, (*PHASES, "wall_samples_per_s", "response_length"))
        trl_m = medians(trl_updates, (*PHASES, "between_s", "gc_s", "samples_per_s_without_gc", "generated_width"))
        result.update(
            ratio=ours_m["wall_samples_per_s"] / trl_m["samples_per_s"],
            target=">= 1.0",
            ours_samples_per_s=ours_m["wall_samples_per_s"],
            trl_samples_per_s=trl_m["samples_per_s"],
            ours_per_run_samples_per_s=ours_runs,
            trl_per_run_samples_per_s=trl_runs,
            ratio_if_trl_skipped_gc=ours_m["wall_samples_per_s"] / trl_m["samples_per_s_without_gc"],
            ours_phases=ours_m,
            trl_phases=trl_m,
            trl_versions=trl_result["versions"],
            ours_ran=f"tuneyard PPO: the controller in this process plus 4 Ray actors (policy, critic, reference, "
            f"reward; colocate none, 0.5 CPU and 1 torch thread each), DeepSpeed ZeRO-2 engines for policy and "
            f"critic, reward model {reward_model.name}/ scoring re-rendered text, critic init reward_model",
            trl_ran=f"TRL {trl_result['versions']['trl']} experimental PPOTrainer: one process, no DeepSpeed, "
            f"accelerate on CPU, torch threads: {trl_result['torch_threads']}, policy + value model in one wrapper "
            "with one AdamW, rollout forwards in one batch (local_rollout_forward_batch_size 64)",
            phase_notes="ours: generate_s = prompt batching + policy.generate over Ray; score_s = old log-probs, "
            "reference log-probs, values and reward-model scores (4 actors in parallel); train_s = GAE + policy and "
            "critic updates. TRL: generate_s = generate (its logits give the old log-probs); score_s = reference, "
            "value and reward forwards one after another, plus one gc.collect(); train_s = the update; between_s = "
            "the next gc.collect() and the next prompts; gc_s = both gc.collect() calls of an update",
            part2_job=f"rollout {SETTINGS['rollout_batch_size']} prompts x 1 sample, mini-batch "
            f"{SETTINGS['mini_batch_size']}, micro {SETTINGS['micro_batch_size']}, ppo_epochs "
            f"{SETTINGS['ppo_epochs']}, {iterations} iterations x {rounds} rounds per side, max_new_tokens "
            f"{SETTINGS['max_new_tokens']}, temperature {SETTINGS['temperature']}, lr {SETTINGS['learning_rate']}, "
            f"fp32; samples/s = responses per second, update end to update end, median after the first {SKIP}",
        )
    # the machine's 1-minute load at start and end: these figures are only as quiet as the machine was
    result["load_avg_start_end"] = [load_start, os.getloadavg()[0]]
    result["bases_s"] = bases_s
    result["wall_s"] = time.perf_counter() - started
    return result
