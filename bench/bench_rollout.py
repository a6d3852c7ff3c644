"""Rollout engines side by side: the same critic-free PPO job (GRPO's estimator) with `ppo.generation.engine: hf`
(HF generate in the policy actor) and `vllm` (one vLLM engine, the policy's weights synced into it every iteration).

Same policy (bench_ppo's tiny Llama after pretraining and SFT), prompts, 16 prompts x 4 samples at temperature 1,
fp32, one policy rank and one engine at half a CPU each. Two settings: "long", every answer 64 tokens
(`stop_at_eos: false`: the engines' generation speed), and "short", the task as trained (answers of 2-3 tokens
and EOS: a rollout the engine's fixed costs dominate). Rounds alternate the engines; the medians of the
steady-state iterations are compared. "ratio" is vLLM's rollout time (weight sync + generation) over HF's generation
time in the long setting (target: below 1); the result also gives the short setting's ratio, each engine's
samples/s, the sync's seconds and the largest per-iteration rollout_logprob_gap (engine against policy, fp32).
"""

from __future__ import annotations

import importlib.util
import math
import statistics
from pathlib import Path

from bench.bench_ppo import build_bases, ppo_job, run_ours

ROUNDS = 2
ITERATIONS = 8
SETTINGS = {"long": {"max_new_tokens": 64, "stop_at_eos": False}, "short": {"max_new_tokens": 16}}


def rollout_job(run_dir: Path, policy: Path, engine: str, generation: dict) -> dict:
    """bench_ppo's job with the named reward functions, GRPO's estimator and the given rollout engine."""
    job = ppo_job(run_dir, policy, ITERATIONS, samples_per_prompt=4, colocate="none", reward_model=None)
    ppo = job["ppo"]
    ppo["advantage"] = "grpo"
    ppo["generation"] = {"temperature": 1.0, "engine": engine, **generation}
    del ppo["roles"]["critic"]
    if engine == "vllm":
        ppo["roles"]["rollout"] = {"cpus_per_worker": 0.5}
    return job


def rollout_seconds(records: list[dict]) -> float:
    """The median seconds an iteration spends getting its answers (with vLLM: the weight sync too)."""
    return statistics.median(r["generate_s"] + r.get("weight_sync_s", 0.0) for r in records)


def main(tmp: Path) -> dict:
    """Both engines in both settings, alternating rounds; the ratio of their rollout times."""
    if importlib.util.find_spec("vllm") is None:
        return {"ratio": math.nan, "target": "< 1", "skipped": "vLLM is not installed (make install-vllm)"}
    policy, _ = build_bases(tmp / "bases")
    records: dict[tuple[str, str], list[dict]] = {}
    for round_ in range(ROUNDS):
        for setting, generation in SETTINGS.items():
            for engine in ("hf", "vllm"):
                job = rollout_job(tmp / f"{setting}-{engine}-{round_}", policy, engine, generation)
                records.setdefault((setting, engine), []).extend(run_ours(job))
    result: dict = {"target": "< 1", "samples_per_iteration": 64}
    for setting in SETTINGS:
        hf, vllm = records[(setting, "hf")], records[(setting, "vllm")]
        result |= {
            f"{setting}_ratio": rollout_seconds(vllm) / rollout_seconds(hf),
            f"{setting}_hf_generate_s": rollout_seconds(hf),
            f"{setting}_vllm_generate_and_sync_s": rollout_seconds(vllm),
            f"{setting}_hf_samples_per_s": statistics.median(r["wall_samples_per_s"] for r in hf),
            f"{setting}_vllm_samples_per_s": statistics.median(r["wall_samples_per_s"] for r in vllm),
        }
    every_engine_run = records[("long", "vllm")] + records[("short", "vllm")]
    result["ratio"] = result["long_ratio"]
    result["vllm_weight_sync_s"] = statistics.median(r["weight_sync_s"] for r in every_engine_run)
    result["vllm_max_logprob_gap"] = max(r["rollout_logprob_gap"] for r in every_engine_run)
    return result
