"""Rollout engines side by side: the same critic-free PPO job (GRPO's estimator) with `ppo.generation.engine: hf`
(HF generate in the policy actor) and `vllm` (one vLLM engine, the policy's weights synced into it every iteration).

16 prompts x 4 samples at temperature 1, fp32, one policy rank and one engine at half a CPU each, rounds alternating
the engines; the medians of the steady-state iterations are compared. Three settings:

- "generation": a randomly initialised Llama of 27.5M parameters (hidden 512, intermediate 1536, 8 layers, 8 heads
  of 64), every answer 128 tokens (`stop_at_eos: false`): a model where generation, not Python overhead, dominates.
  "ratio" is HF's generate seconds over vLLM's (target >= 1.3); the check "whole iteration" is HF's iteration over
  vLLM's, sync included (target >= 1.1). Each engine's generate, sync, score and train seconds are reported.
- "long" and "short": bench_ppo's tiny Llama (0.4M parameters) after pretraining and SFT, every answer 64 tokens,
  and the task as trained (answers of 2-3 tokens and EOS): the engine's fixed costs dominate there.

And DAPO's dynamic sampling on the short setting (HF engine): the informative share of what it draws
(`groups_kept_frac`), its draws per iteration, and its generate seconds over the plain run's.
"""

from __future__ import annotations

import importlib.util
import math
import statistics
from pathlib import Path

from bench.bench_ppo import SEED, build_bases, ppo_job, run_ours
from bench.common import TOKENIZER

ROUNDS = 2
ITERATIONS = 8
GENERATION_ITERATIONS = 5
SETTINGS = {
    "generation": {"max_new_tokens": 128, "stop_at_eos": False},
    "long": {"max_new_tokens": 64, "stop_at_eos": False},
    "short": {"max_new_tokens": 16},
}
# 27.5M parameters: 8 x (4 x 512^2 + 3 x 512 x 1536) + 512 x 512 (tied embeddings)
GENERATION_ARCH = {
    "model_type": "llama",
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}
PHASES = ("generate_s", "weight_sync_s", "score_s", "train_s")


def random_llama(folder: Path) -> Path:
    """The generation setting's model: randomly initialised (seeded), saved with the tiny tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    arch = dict(GENERATION_ARCH)
    ids = {k: getattr(tokenizer, k) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    config = AutoConfig.for_model(arch.pop("model_type"), vocab_size=len(tokenizer), **arch, **ids)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def rollout_job(run_dir: Path, policy: Path, engine: str, generation: dict, iterations: int = ITERATIONS) -> dict:
    """bench_ppo's job with the named reward functions, GRPO's estimator and the given rollout engine."""
    job = ppo_job(run_dir, policy, iterations, samples_per_prompt=4, colocate="none", reward_model=None)
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


def iteration_seconds(records: list[dict]) -> float:
    """The median seconds of a whole iteration: sync, generate, score and train."""
    return statistics.median(sum(r.get(phase, 0.0) for phase in PHASES) for r in records)


def main(tmp: Path) -> dict:
    """Every setting with both engines, alternating rounds; then dynamic sampling on the short setting."""
    if importlib.util.find_spec("vllm") is None:
        return {"ratio": math.nan, "target": ">= 1.3", "skipped": "vLLM is not installed (make install-vllm)"}
    policy, _ = build_bases(tmp / "bases")
    policies = {"generation": random_llama(tmp / "random-llama"), "long": policy, "short": policy}
    records: dict[tuple[str, str], list[dict]] = {}
    for round_ in range(ROUNDS):
        for setting, generation in SETTINGS.items():
            iterations = GENERATION_ITERATIONS if setting == "generation" else ITERATIONS
            for engine in ("hf", "vllm"):
                job = rollout_job(
                    tmp / f"{setting}-{engine}-{round_}", policies[setting], engine, generation, iterations
                )
                records.setdefault((setting, engine), []).extend(run_ours(job))
    result: dict = {"target": ">= 1.3", "samples_per_iteration": 64}
    for setting in SETTINGS:
        hf, vllm = records[(setting, "hf")], records[(setting, "vllm")]
        for engine, rows in (("hf", hf), ("vllm", vllm)):
            for phase in PHASES:
                if phase in rows[0]:
                    result[f"{setting}_{engine}_{phase}"] = statistics.median(r[phase] for r in rows)
        result[f"{setting}_generate_ratio"] = result[f"{setting}_hf_generate_s"] / result[f"{setting}_vllm_generate_s"]
        result[f"{setting}_rollout_ratio"] = rollout_seconds(hf) / rollout_seconds(vllm)
        result[f"{setting}_iteration_ratio"] = iteration_seconds(hf) / iteration_seconds(vllm)
    result["ratio"] = result["generation_generate_ratio"]
    result["checks"] = [
        {"name": "whole iteration, 27.5M model", "ratio": result["generation_iteration_ratio"], "target": ">= 1.1"}
    ]
    every_engine_run = [r for setting in SETTINGS for r in records[(setting, "vllm")]]
    result["vllm_max_logprob_gap"] = max(r["rollout_logprob_gap"] for r in every_engine_run)
    result |= dynamic_sampling_cost(tmp, policy, records[("short", "hf")])
    return result


def dynamic_sampling_cost(tmp: Path, policy: Path, plain: list[dict]) -> dict:
    """The short setting with `ppo.dynamic_sampling` on the HF engine, against the plain runs' generate seconds."""
    job = rollout_job(tmp / "short-hf-dynamic", policy, "hf", SETTINGS["short"])
    job["ppo"]["dynamic_sampling"] = True
    rows = run_ours(job)
    return {
        "dynamic_groups_kept_frac": statistics.median(r["groups_kept_frac"] for r in rows),
        "dynamic_sampling_rounds": statistics.mean(r["sampling_rounds"] for r in rows),
        "dynamic_batch_informative_frac": statistics.mean(r["batch_informative_frac"] for r in rows),
        "dynamic_generate_cost": statistics.median(r["generate_s"] for r in rows)
        / statistics.median(r["generate_s"] for r in plain),
    }
