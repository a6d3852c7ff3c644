"""`make gpu-check` (bench/gpu_check.py): without CUDA it says there is nothing to check and exits 0; its checks run
on CPU in the rehearsal; the MFU arithmetic and the GPU peak table; the vLLM entry skips without vLLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from bench.gpu_check import CHECKS
from bench.gpu_check_checks import (
    LLAMA_1B,
    SMALL_ARCH,
    Context,
    check_planner,
    check_ppo,
    peak_bf16_tflops,
    ppo_job,
    sft_job,
    train_flops_per_token,
    vllm_overrides,
    write_job,
)
from tests.conftest import ROOT

SCRIPT = ROOT / "bench" / "gpu_check.py"


def test_without_a_gpu_there_is_nothing_to_check(tmp_path):
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "gpu-check.json")],
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "no GPU: nothing to check"
    assert time.monotonic() - started < 60
    assert not (tmp_path / "gpu-check.json").exists()
    dry = subprocess.run(["make", "-n", "gpu-check"], capture_output=True, text=True, cwd=ROOT)
    assert dry.returncode == 0 and "bench/gpu_check.py" in dry.stdout


@pytest.mark.integration
def test_the_rehearsal_runs_checks_on_cpu_and_writes_the_table(tmp_path):
    """The attention check (sdpa, packed == unpacked in bf16) and the worker group's SFT under ZeRO-2 with 2 gloo
    ranks, measured through the entry the GPU run uses; each a row of the table and of the JSON."""
    out = tmp_path / "rehearsal.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-rehearsal", "--only", "attention_packed,sft_zero2", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out.read_text())
    rows = {row["name"]: row for row in report["checks"]}
    assert report["mode"] == "cpu" and list(rows) == ["sft_zero2", "attention_packed"]
    assert all(row["result"] == "pass" for row in rows.values()), rows
    attention = rows["attention_packed"]["details"]
    assert attention["examples"] == 100 and attention["max_abs_diff"] * 4 < attention["leak_diff"]
    ranks = rows["sft_zero2"]["details"]["ranks"]
    assert [r["backend"] for r in ranks] == ["gloo", "gloo"] and all(r["finished"] for r in ranks)
    for name in rows:  # one table line per check, and its log kept beside the JSON
        assert any(line.startswith(name) for line in run.stdout.splitlines())
        assert (tmp_path / "rehearsal-logs" / f"{name}.log").is_file()


def test_gpu_peaks_come_from_the_device_name():
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756
    assert peak_bf16_tflops("NVIDIA H100 NVL") == 835
    assert peak_bf16_tflops("NVIDIA H200") == 989
    assert peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == peak_bf16_tflops("NVIDIA A100 80GB PCIe") == 312
    assert peak_bf16_tflops("NVIDIA L40S") == 362 and peak_bf16_tflops("NVIDIA L40") == 181
    assert peak_bf16_tflops("NVIDIA L4") == 121 and peak_bf16_tflops("NVIDIA A10") == 125
    assert peak_bf16_tflops("Tesla T4") is None


def test_model_flops_count_every_weight_a_token_multiplies():
    """6 N with N the model's own parameter count (the tied embedding counted once, as the LM head) plus 12 L d T."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", **{k: v for k, v in LLAMA_1B.items() if k != "model_type"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    parameters = sum(p.numel() for p in model.parameters())
    flops = train_flops_per_token(LLAMA_1B, attention_context=500.0)
    assert flops["weights_per_token"] == parameters  # 1.04B: 0.97B in the layers, 65.5M in the tied head
    assert 1.0e9 < parameters < 1.1e9
    assert flops["dense"] == 6 * parameters
    assert flops["attention"] == 12 * 16 * 2048 * 500.0
    assert flops["total"] == flops["dense"] + flops["attention"]


def test_the_vllm_entry_is_the_ppo_check_with_the_engine_override_and_skips_without_vllm(tmp_path, monkeypatch):
    entries = {c.name: c for c in CHECKS}
    assert entries["ppo_vllm"].function == entries["ppo_hf"].function == "check_ppo"
    assert dict(entries["ppo_vllm"].kwargs) == {"engine": "vllm"}
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed
    ctx = Context(mode="gpu", work=tmp_path, ranks=1, results=tmp_path)
    assert check_ppo(ctx, engine="vllm").result == "skipped: vllm not installed"
    assert check_planner(ctx).result == "skipped: the throughput check left no result"


@pytest.mark.parametrize("gpus", [1, 2, 8])
def test_the_gpu_runs_jobs_are_valid_and_the_1b_one_fits_an_80gib_gpu(tmp_path, gpus):
    """What only a GPU runs, checked here: the jobs of the GPU mode (NCCL ranks, colocated PPO roles with their
    vLLM overrides, the 1B run) pass the job's validation, and the planner fits the 1B run in 80 GiB."""
    from tuneyard.launch.config import job_from_dict, load_job
    from tuneyard.launch.plan import Hardware, run_plan

    ctx = Context(mode="gpu", work=tmp_path, ranks=gpus, results=tmp_path)
    for stage in (2, 3):
        job = job_from_dict(sft_job(ctx, tmp_path / "sft", arch=SMALL_ARCH, ranks=gpus, max_steps=12, zero_stage=stage))
        assert job.cluster.workers == gpus and job.cluster.gpus_per_worker == 1 and job.training.precision == "bf16"
    ppo = load_job(write_job(tmp_path / "ppo.yaml", ppo_job(ctx, tmp_path / "ppo", tmp_path / "base", 3)))
    assert ppo.ppo.colocate == "all" and ppo.ppo.roles.policy.workers == gpus
    load_job(tmp_path / "ppo.yaml", vllm_overrides(gpu=True))
    one_b = sft_job(
        ctx, tmp_path / "1b", arch=LLAMA_1B, ranks=gpus, max_steps=100, with_eval=False, max_length=2048, batch_size=4
    )
    plan, _ = run_plan(job_from_dict(one_b), Hardware(gpu_memory=80 * 2**30))
    assert plan.fits and plan.peak_gpu > 10 * 2**30
