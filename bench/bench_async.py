"""Async RL: the GRPO + vLLM example synchronous and generating one batch ahead (`ppo.async.max_staleness: 1`).

Both runs start from the same brief SFT model (examples/configs/pretrain-tiny.yaml, then sft-brief-tiny.yaml, run
here), with the shipped job files as they are except for their output folders: grpo-vllm-tiny.yaml (synchronous)
and grpo-vllm-async-tiny.yaml (max_staleness 1, decoupled PPO). The engine has a bundle of its own and the policy
and reference theirs (`colocate: none`), each actor one thread on a two-core machine. "ratio" is the async run's
iterations per second over the synchronous run's, from the metrics' timestamps after the first SKIP iterations
(start-up and warm-up left out); both runs' held-out task accuracy before and after is reported (the target asks
each to rise by 20 points), and each role's idle share:

    synchronous   policy idle = (generate_s) / iteration time      engine idle = 1 - (generate_s + weight_sync_s) / ...
    async         policy idle = policy_idle_s / iteration time     engine idle = engine_idle_s / ...

(the policy side is the policy and the reference; while the engine generates synchronously both wait, and while
they score and train the engine waits).
"""

from __future__ import annotations

import importlib.util
import math
import statistics
from pathlib import Path

import yaml

from bench.common import ROOT
from tuneyard.launch.config import job_from_dict
from tuneyard.launch.run_job import run_job
from tuneyard.training.metrics import read_metrics

CONFIGS = ROOT / "examples" / "configs"
SKIP = 5


def example_job(name: str, run_dir: Path, model: Path | None = None) -> dict:
    """A shipped example's job, writing to `run_dir`, from `model` where given; its data paths made absolute."""
    job = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    job["output"] = {**job.get("output", {}), "dir": str(run_dir), "overwrite": True}
    for key in ("train", "eval"):
        if key in job["data"]:
            job["data"][key] = str(ROOT / job["data"][key])
    if "tokenizer" in job["model"]:
        job["model"]["tokenizer"] = str(ROOT / job["model"]["tokenizer"])
    if model is not None:
        job["model"]["name_or_path"] = str(model)
    return job


def run(job: dict):
    """Run a job on the current Ray cluster; its RunResult."""
    return run_job(job_from_dict(job), show_progress=False)


def rates(run_dir: Path, asynchronous: bool) -> dict[str, float]:
    """Iterations per second after SKIP, and each role's idle share of that time."""
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "reward" in r][SKIP:]
    seconds = rows[-1]["time"] - rows[0]["time"]
    counted = rows[1:]  # the iterations that ended inside those seconds
    if asynchronous:
        policy_idle = sum(r["policy_idle_s"] for r in counted)
        engine_idle = sum(r["engine_idle_s"] for r in counted)
    else:
        policy_idle = sum(r["generate_s"] for r in counted)
        engine_idle = seconds - sum(r["generate_s"] + r["weight_sync_s"] for r in counted)
    phases = ("weight_sync_s", "generate_s", "score_s", "train_s", "engine_busy_s")
    return {
        **{f"median_{k}": statistics.median(r[k] for r in counted) for k in phases if k in counted[0]},
        "iterations_per_s": len(counted) / seconds,
        "policy_idle_frac": policy_idle / seconds,
        "engine_idle_frac": max(0.0, engine_idle) / seconds,
        "max_staleness": max(r.get("staleness_max", 0.0) for r in rows),
        "max_rollout_logprob_gap": max(r["rollout_logprob_gap"] for r in rows),
    }


def main(tmp: Path) -> dict:
    """Build the brief SFT model, run both examples on it, and compare."""
    target = ">= 1.4"
    if importlib.util.find_spec("vllm") is None:
        return {"ratio": math.nan, "target": target, "skipped": "vLLM is not installed (make install-vllm)"}
    pretrained = run(example_job("pretrain-tiny", tmp / "pretrain")).run_dir / "final"
    sft = run(example_job("sft-brief-tiny", tmp / "sft", pretrained)).run_dir / "final"
    result: dict = {"target": target}
    for name, asynchronous in (("grpo-vllm-tiny", False), ("grpo-vllm-async-tiny", True)):
        outcome = run(example_job(name, tmp / name, sft))
        key = "async" if asynchronous else "sync"
        before, after = outcome.figures["task acc."]
        result[f"{key}_task_acc_before"], result[f"{key}_task_acc_after"] = before, after
        result |= {f"{key}_{k}": v for k, v in rates(outcome.run_dir, asynchronous).items()}
    result["ratio"] = result["async_iterations_per_s"] / result["sync_iterations_per_s"]
    result["checks"] = [
        {"name": f"{key} task acc. gain (points)", "ratio": 100 * (result[f"{key}_task_acc_after"] -
                                                                  result[f"{key}_task_acc_before"]), "target": ">= 20"}
        for key in ("sync", "async")
    ]  # fmt: skip
    return result
