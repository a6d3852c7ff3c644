"""The checks behind `make gpu-check` (`bench/gpu_check.py` runs each in a process of its own, with a timeout).

Every check runs the code a user's job runs: `tuneyard train JOB.yaml` through the CLI's own `main` (the Ray worker
group for SFT, PPO's role groups, `--single` for QLoRA), `tuneyard export --merge`, the model loader and collators
of the recipes, and the memory planner. Only the device, backend and precision differ between a GPU run and the
CPU rehearsal (`--cpu-rehearsal`: gloo, the rehearsal precision, tiny shapes), so the rehearsal runs the same code.

A check returns an Outcome: `pass`, `fail`, `skipped: why`, or `rehearsed` (a CPU run of a check whose verdict
needs a GPU, such as the planner against CUDA's peak memory), a one-line figure and the details for the JSON.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TOKENIZER = EXAMPLES / "tiny" / "tokenizer"
DATA = EXAMPLES / "data"
GiB = 2**30

# The correctness checks' model: small, head_dim 64 (a size every flash kernel takes), two layers.
SMALL_ARCH = {
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}

# The throughput model: Llama 3.2 1B's transformer (hidden 2048, 16 layers, 32 query and 8 key/value heads of 64,
# SwiGLU 8192, tied embeddings), with Llama 2's 32,000-token vocabulary instead of 128,256. The body is the most
# common 1B shape, so the figures transfer to real 1B fine-tunes; the smaller vocabulary keeps the head (and its
# fp32 logits at 2048 tokens a row) from dominating a 1B model's time and memory. 0.97B in the layers, 1.04B in all.
LLAMA_1B = {
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
}
# The same check in the rehearsal: the same vocabulary and layout, a shape two CPU cores train in seconds.
REHEARSAL_1B = {**LLAMA_1B, "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2}
REHEARSAL_1B.update(num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)

REHEARSAL_PRECISION = "bf16"  # CPU trains bf16 too (slower than fp32, but the GPU's precision path)
THROUGHPUT_SECONDS = 60.0  # the 1B SFT's intended length on a GPU
ASSUMED_MFU = 0.35  # sizes its max_steps from the GPU's peak: a faster GPU run ends sooner, a slower one later

# Dense bf16 tensor-core peak of one GPU in TFLOPs (vendors' data sheets, without sparsity), first match wins:
# the regular expressions are searched in torch.cuda.get_device_name(), e.g. "NVIDIA H100 80GB HBM3" (SXM).
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    (r"GB200", 2500.0),
    (r"B200", 2250.0),
    (r"B100", 1750.0),
    (r"H200 NVL", 835.0),
    (r"H100 NVL", 835.0),
    (r"H100 PCIe", 756.0),
    (r"H800 PCIe", 756.0),
    (r"GH200|H200|H100|H800", 989.0),  # SXM parts
    (r"\bH20\b", 148.0),
    (r"A100|A800", 312.0),
    (r"\bA30\b", 165.0),
    (r"\bA10\b", 125.0),
    (r"L40S", 362.0),
    (r"\bL40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"RTX 6000 Ada", 364.0),
    (r"RTX A6000", 155.0),
    (r"RTX 4090", 165.0),
    (r"MI325X|MI300X", 1307.0),
    (r"MI250X", 383.0),
]


def peak_bf16_tflops(gpu_name: str) -> float | None:
    """The dense bf16 peak of a GPU from its name (PEAK_BF16_TFLOPS), or None for a GPU not in the table."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, gpu_name):
            return tflops
    return None


@dataclass
class Outcome:
    """A check's verdict, its line's figure, and what the JSON keeps beside them."""

    result: str  # pass | fail | skipped: why | rehearsed
    figure: str
    details: dict = field(default_factory=dict)


@dataclass
class Context:
    """What every check of one `gpu-check` run shares."""

    mode: str  # "gpu", or "cpu" for the rehearsal
    work: Path  # the check's own folder
    ranks: int  # SPMD ranks: one per GPU (2 gloo ranks in the rehearsal)
    results: Path  # the earlier checks' result files (the planner check reads the throughput check's)
    peak_tflops: float | None = None  # per GPU; None: from the GPU's name
    timeout_s: float = 600.0  # this check's time; the throughput run sizes itself to it

    @property
    def gpu(self) -> bool:
        return self.mode == "gpu"

    @property
    def precision(self) -> str:
        return "bf16" if self.gpu else REHEARSAL_PRECISION

    @property
    def backend(self) -> str:
        return "nccl" if self.gpu else "gloo"

    @property
    def gpus_per_worker(self) -> int:
        return 1 if self.gpu else 0

    def verdict(self, ok: bool) -> str:
        return "pass" if ok else "fail"


# ------------------------------------------------------------------------------------------------ running a job


def run_cli(argv: list[str]) -> tuple[int, str]:
    """`tuneyard ARGV` in this process, as the console script runs it: (exit code, the error's first line)."""
    import io
    import sys

    from tuneyard.launch.cli import main

    class Tee(io.TextIOBase):
        """stderr as it was, and a copy: the CLI's one-paragraph error becomes the check's figure."""

        def __init__(self, stream) -> None:
            self.stream, self.copy = stream, io.StringIO()

        def write(self, text: str) -> int:
            self.copy.write(text)
            return self.stream.write(text)

        def flush(self) -> None:
            self.stream.flush()

    tee = Tee(sys.stderr)
    try:
        with contextlib.redirect_stderr(tee):
            code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    except Exception as exc:  # an unexpected error: the CLI lets it escape with its traceback
        import traceback

        traceback.print_exc()
        return 1, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
    said = [
        line
        for line in tee.copy.getvalue().splitlines()
        if line.startswith(("error:", "training failed", "PPO stopped"))
    ]
    return code, (said[-1][:300] if code and said else "")


def write_job(path: Path, job: dict) -> Path:
    """The job as a YAML file, as a user would write it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


@contextlib.contextmanager
def measured_workers(records: Path):
    """While inside, every SPMD worker group runs its stage's entry through bench/gpu_check_worker.py, which writes
    each rank's backend, GPU and peak memory into `records` (the recipe itself is untouched)."""
    import tuneyard.cluster.worker_group as worker_group
    from bench.gpu_check_worker import ENTRY, PAYLOAD_KEY

    original = worker_group.run_spmd_workers

    def run_measured(entry: str, payload: dict, cluster, absent: tuple[str, ...] = ()) -> None:
        payload = {**payload, PAYLOAD_KEY: {"entry": entry, "out": str(records)}}
        original(ENTRY, payload, cluster, absent)

    worker_group.run_spmd_workers = run_measured  # launch/run_job.py imports it from the module at call time
    try:
        yield
    finally:
        worker_group.run_spmd_workers = original


def train_measured(job_file: Path, overrides: list[str] | None = None) -> tuple[int, str, list[dict]]:
    """`tuneyard train JOB` with its workers measured: (exit code, error, each rank's record)."""
    records = job_file.parent / (job_file.stem + "-ranks")
    with measured_workers(records):
        code, error = run_cli(["train", str(job_file), *(overrides or [])])
    ranks = [json.loads(p.read_text()) for p in sorted(records.glob("rank-*.json"))]
    return code, error, ranks


def eval_losses(run_dir: Path) -> list[float]:
    """The eval losses a run logged, in order (the first is the starting model's)."""
    from tuneyard.training.metrics import read_metrics

    return [r["eval_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "eval_loss" in r]


def saved_dtype(folder: Path) -> str | None:
    """The dtype a saved model folder's config.json names."""
    config = json.loads((folder / "config.json").read_text())
    return config.get("dtype") or config.get("torch_dtype")


def sft_job(
    ctx: Context,
    run_dir: Path,
    *,
    arch: dict,
    ranks: int,
    max_steps: int,
    train: str | None = None,
    with_eval: bool = True,
    max_length: int = 128,
    batch_size: int = 8,
    learning_rate: float = 3e-3,
    zero_stage: int = 2,
    cpus_per_worker: float = 1.0,
    peft: dict | None = None,
    **training: object,
) -> dict:
    """A from-scratch SFT job on the tiny tokenizer, in the check's precision, one rank per GPU."""
    data: dict = {
        "format": "messages",
        "train": train or str(DATA / "last-word-train.jsonl"),
        "max_length": max_length,
        "overlength": "drop",
    }
    if with_eval:
        data["eval"] = str(DATA / "last-word-eval.jsonl")
    return {
        "stage": "sft",
        "model": {"init": "scratch", "tokenizer": str(TOKENIZER), "architecture": arch},
        "data": data,
        "training": {
            "learning_rate": learning_rate,
            "batch_size": batch_size,
            "max_steps": max_steps,
            "seed": 7,
            "precision": ctx.precision,
            "report_to": [],
            "max_failures": 0,  # a failure is the check's finding: no restart from a checkpoint
            **training,
        },
        "peft": peft or {"method": "full"},
        "deepspeed": {"zero_stage": zero_stage},
        "cluster": {
            "workers": ranks,
            "gpus_per_worker": ctx.gpus_per_worker,
            "cpus_per_worker": cpus_per_worker,
            "collective_timeout_s": 300,  # a hung collective becomes an error naming the rank, inside the timeout
        },
        "output": {"dir": str(run_dir), "overwrite": True},
    }


def rank_summary(ctx: Context, ranks: list[dict], expected: int) -> tuple[list[str], str]:
    """Problems with the ranks' records (count, backend, GPU), and a short text of where they ran."""
    problems = []
    if len(ranks) != expected:
        problems.append(f"{len(ranks)} rank records, expected {expected}")
    backends = sorted({str(r.get("backend")) for r in ranks})
    if backends != [ctx.backend]:
        problems.append(f"process group backend {backends}, expected {ctx.backend}")
    if ctx.gpu and not all(r.get("cuda") and r.get("gpu") for r in ranks):
        problems.append("a rank saw no CUDA device")
    if not all(r.get("finished") for r in ranks):
        problems += [f"rank {r['rank']}: {r.get('error')}" for r in ranks if not r.get("finished")]
    where = f"{len(ranks)} x {'/'.join(backends)}"
    gpus = sorted({r["gpu"] for r in ranks if r.get("gpu")})
    return problems, where + (f" on {', '.join(gpus)}" if gpus else " on CPU")


def peak_text(ranks: list[dict]) -> str:
    """The largest rank's peak: torch's allocated GPU bytes, else the process's RSS."""
    allocated = [r["max_memory_allocated"] for r in ranks if "max_memory_allocated" in r]
    if allocated:
        return f"peak {max(allocated) / GiB:.2f} GiB allocated"
    rss = [r.get("max_rss_bytes", 0) for r in ranks]
    return f"peak RSS {max(rss or [0]) / GiB:.2f} GiB"


# ------------------------------------------------------------------------------------------------ 1. worker group


def check_sft_zero(ctx: Context, zero_stage: int) -> Outcome:
    """A tiny SFT on the Ray worker group, one rank per GPU on NCCL, under `zero_stage`, in bf16: loss falls."""
    run_dir = ctx.work / f"sft-zero{zero_stage}"
    job = sft_job(ctx, run_dir, arch=SMALL_ARCH, ranks=ctx.ranks, max_steps=12, zero_stage=zero_stage)
    code, error, ranks = train_measured(write_job(ctx.work / f"sft-zero{zero_stage}.yaml", job))
    problems, where = rank_summary(ctx, ranks, ctx.ranks)
    if code != 0:
        problems.insert(0, f"tuneyard train exited {code}" + (f" ({error})" if error else ""))
    losses = eval_losses(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    if len(losses) < 2 or not all(math.isfinite(x) for x in losses) or losses[-1] >= losses[0]:
        problems.append(f"eval loss did not fall: {losses}")
    dtype = saved_dtype(run_dir / "final") if (run_dir / "final" / "config.json").is_file() else None
    if ctx.gpu and dtype != "bfloat16":
        problems.append(f"final/ saved in {dtype}, expected bfloat16")
    figure = (
        f"eval loss {losses[0]:.2f} -> {losses[-1]:.2f}; " if len(losses) >= 2 else ""
    ) + f"{where}; {ctx.precision}; {peak_text(ranks)}"
    details = {"eval_losses": losses, "ranks": ranks, "saved_dtype": dtype, "problems": problems}
    return Outcome(ctx.verdict(not problems), figure + (f"; {problems[0]}" if problems else ""), details)


# ------------------------------------------------------------------------------------------------ 2. attention


def attention_ops(run: Callable[[], object]) -> list[str]:
    """The attention operators `run` dispatched to (torch's profiler): which sdpa kernel or flash-attn ran."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    names = {event.key for event in prof.key_averages()}
    return sorted(
        n
        for n in names
        if ("scaled_dot_product" in n or "flash" in n.lower()) and n != "aten::scaled_dot_product_attention"
    )


def check_attention(ctx: Context) -> Outcome:
    """Packed SFT rows give each example the logits it gets alone, on the GPU's attention kernel.

    The model and the batch layout are the recipe's: `load_model` resolves `attn_implementation: auto`
    (flash_attention_2 where flash-attn imports, else sdpa) and `choose_collator` lays packed rows out for it
    (one flattened varlen row for flash-attn, rows with restarting position ids otherwise), as
    tests/test_packed_logits.py does on CPU. Under sdpa each example alone runs with the flash kernel forced;
    the packed rows try the flash kernel first and otherwise run where torch sends them (the kernels that ran
    are named). The same rows without restarting positions (attention leaking across examples) give the scale
    a real leak would have.
    """
    from types import SimpleNamespace

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tuneyard.training.causal_lm_recipe import choose_collator
    from tuneyard.training.config import DataConfig, ModelConfig
    from tuneyard.training.data.packing import IGNORE_INDEX
    from tuneyard.training.data.tokenize import build_datasets
    from tuneyard.training.model import load_model, load_tokenizer

    device = torch.device("cuda" if ctx.gpu else "cpu")
    model_cfg = ModelConfig(
        init="scratch",
        architecture=SMALL_ARCH,
        tokenizer=str(TOKENIZER),
        dtype=ctx.precision,
        attn_implementation="auto",
    )
    tokenizer = load_tokenizer(model_cfg)
    torch.manual_seed(0)
    model = load_model(model_cfg, tokenizer).to(device).eval()
    impl = model.config._attn_implementation
    data_cfg = DataConfig(format="messages", train=str(DATA / "last-word-eval.jsonl"), max_length=96)
    packed = build_datasets("sft", data_cfg, tokenizer, seed=0)["train"]
    unpacked = build_datasets("sft", data_cfg.model_copy(update={"packing": False}), tokenizer, seed=0)["train"]
    collate = choose_collator(SimpleNamespace(stage="sft", data=data_cfg), model, tokenizer.pad_token_id)
    by_ids = {tuple(row["input_ids"]): row for row in unpacked}

    def logits(ids: torch.Tensor, positions: torch.Tensor | None, backends: list | None) -> torch.Tensor:
        kernel = sdpa_kernel(backends) if backends and impl == "sdpa" else contextlib.nullcontext()
        with torch.no_grad(), kernel:
            # use_cache=False as in training (load_trained_model): with a cache, transformers sees no packed rows
            out = model(
                input_ids=ids.to(device),
                position_ids=None if positions is None else positions.to(device),
                use_cache=False,
            )
        return out.logits.float().cpu()

    flash = [SDPBackend.FLASH_ATTENTION]
    notes: list[str] = []
    alone_ops: list[str] = []
    packed_ops: list[str] = []
    worst = leak = scale = 0.0
    seen = 0
    for start in range(0, len(packed), 4):
        batch = collate([packed[i] for i in range(start, min(start + 4, len(packed)))])
        ids, positions = batch["input_ids"], batch["position_ids"]
        try:
            if not packed_ops:
                packed_ops = attention_ops(lambda: logits(ids, positions, flash))  # noqa: B023
            got = logits(ids, positions, flash)
        except RuntimeError as exc:  # sdpa's flash kernel takes no block mask: torch picks another one
            if not notes:
                notes.append(f"packed rows: the flash kernel refused ({str(exc).splitlines()[0][:80]})")
                packed_ops = attention_ops(lambda: logits(ids, positions, None))  # noqa: B023
            got = logits(ids, positions, None)
        flat = torch.arange(ids.shape[1]).expand_as(ids)  # no restart: every example sees the ones before it
        leaked = logits(ids, flat, None)
        for row, pos in enumerate(positions.tolist()):
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
            for lo, hi in zip(starts[:-1], starts[1:], strict=True):
                example = ids[row, lo:hi]
                if tuple(example.tolist()) not in by_ids:  # a row's padded tail
                    if not (batch["labels"][row, lo:hi] == IGNORE_INDEX).all():
                        return Outcome("fail", "a packed segment is no example and carries labels", {})
                    continue
                if not alone_ops:
                    alone_ops = attention_ops(lambda: logits(example[None], None, flash))  # noqa: B023
                alone = logits(example[None], None, flash)[0]
                worst = max(worst, float((got[row, lo:hi] - alone).abs().max()))
                scale = max(scale, float(alone.abs().max()))
                if lo > 0:  # an example after another in its row: what a leak would change
                    leak = max(leak, float((leaked[row, lo:hi] - alone).abs().max()))
                seen += 1
    bf16 = ctx.precision == "bf16"
    tolerance = 0.03 * scale if bf16 else 1e-4 * max(scale, 1.0)  # bf16 keeps 8 bits of mantissa
    problems = []
    if seen != len(unpacked):
        problems.append(f"{seen} of {len(unpacked)} examples found in the packed rows")
    if worst > tolerance:
        problems.append(f"packed logits differ by {worst:.3g} > {tolerance:.3g}")
    if leak and worst * 4 > leak:
        problems.append(f"the difference {worst:.3g} is not far below a leak's {leak:.3g}")
    if ctx.gpu and impl == "sdpa" and not any("flash" in op for op in alone_ops):
        problems.append(f"the flash kernel did not run alone: {alone_ops}")
    kernels = ", ".join(op.removeprefix("aten::") for op in dict.fromkeys(alone_ops + packed_ops))
    figure = (
        f"{impl}, {ctx.precision}: {seen} examples, max |packed - alone| {worst:.2g} (tol {tolerance:.2g}, "
        f"leak {leak:.2g}); {kernels}"
    )
    details = {
        "attn_implementation": impl,
        "layout": type(collate).__name__,
        "examples": seen,
        "rows": len(packed),
        "max_abs_diff": worst,
        "tolerance": tolerance,
        "leak_diff": leak,
        "logit_scale": scale,
        "alone_kernels": alone_ops,
        "packed_kernels": packed_ops,
        "notes": notes,
        "problems": problems,
    }
    return Outcome(ctx.verdict(not problems), figure + (f"; {problems[0]}" if problems else ""), details)


# ------------------------------------------------------------------------------------------------ 3. QLoRA


def check_qlora(ctx: Context) -> Outcome:
    """QLoRA (`tuneyard train --single`): the base in 4-bit through bitsandbytes (CUDA kernels on a GPU, its CPU
    backend in the rehearsal), the LoRA adapter trains and the eval loss falls; `tuneyard export --merge` writes a
    plain folder that transformers reloads to the trained model's logits."""
    import bitsandbytes as bnb
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuneyard.training.config import PeftSection
    from tuneyard.training.finetune_method import (
        disable_cpu_inference_repacking,
        memory_footprint,
        quantization_config,
    )

    run_dir = ctx.work / "qlora"
    job = sft_job(
        ctx,
        run_dir,
        arch=SMALL_ARCH,
        ranks=1,
        max_steps=20 if ctx.gpu else 12,
        learning_rate=1e-2,
        peft={"method": "qlora", "r": 16, "alpha": 32},
        gradient_checkpointing=True,
    )
    code, error = run_cli(["train", str(write_job(ctx.work / "qlora.yaml", job)), "--single"])
    problems = [f"tuneyard train --single exited {code}" + (f" ({error})" if error else "")] if code else []
    losses = eval_losses(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    if len(losses) < 2 or losses[-1] >= losses[0]:
        problems.append(f"eval loss did not fall: {losses}")
    if problems:
        return Outcome("fail", problems[0], {"eval_losses": losses, "problems": problems})
    merged_dir = ctx.work / "qlora-merged"
    code, error = run_cli(["export", str(run_dir), "--merge", "--out", str(merged_dir)])
    if code:
        return Outcome("fail", f"tuneyard export --merge exited {code} {error}", {"eval_losses": losses})

    device = torch.device("cuda" if ctx.gpu else "cpu")
    base = json.loads((run_dir / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
    placement = {"device_map": {"": 0}} if ctx.gpu else {}
    quantized = AutoModelForCausalLM.from_pretrained(
        base, quantization_config=quantization_config(PeftSection(method="qlora")), **placement
    )
    disable_cpu_inference_repacking(quantized)  # as training ran (bitsandbytes' CPU eval repacking)
    trained = PeftModel.from_pretrained(quantized, run_dir / "final").eval()
    footprint = memory_footprint(trained)
    four_bit = [m for m in trained.modules() if isinstance(m, bnb.nn.Linear4bit)]  # the base's, not PEFT's wrappers
    devices = sorted({str(m.weight.device.type) for m in four_bit})
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).to(device).eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = trained(ids.to(device)).logits.float().cpu()
        got = merged(ids.to(device)).logits.float().cpu()
    diff = float((got - want).abs().max())
    scale = float(want.abs().max())
    tolerance = 0.03 * scale if ctx.precision == "bf16" and ctx.gpu else 1e-3 * max(scale, 1.0)
    same_argmax = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    if "4-bit" not in footprint or not four_bit:
        problems.append("the base did not load in 4-bit")
    if ctx.gpu and devices != ["cuda"]:
        problems.append(f"4-bit weights on {devices}, expected cuda")
    if diff > tolerance:
        problems.append(f"merged logits differ by {diff:.3g} > {tolerance:.3g}")
    figure = (
        f"eval loss {losses[0]:.2f} -> {losses[-1]:.2f}; {len(four_bit)} Linear4bit on {'/'.join(devices)}; "
        f"merged reload max diff {diff:.2g} (tol {tolerance:.2g}, argmax {same_argmax:.0%})"
    )
    details = {
        "eval_losses": losses,
        "linear4bit": len(four_bit),
        "linear4bit_devices": devices,
        "footprint": footprint,
        "merged_max_abs_diff": diff,
        "tolerance": tolerance,
        "same_argmax": same_argmax,
        "merged_dtype": saved_dtype(merged_dir),
        "problems": problems,
    }
    return Outcome(ctx.verdict(not problems), figure + (f"; {problems[0]}" if problems else ""), details)


# ------------------------------------------------------------------------------------------------ 4. PPO


def vllm_overrides(gpu: bool) -> list[str]:
    """The vLLM entry's overrides: the engine, and on a GPU one GPU per engine (its tensor_parallel_size of 1), shared
    with the colocated roles (`colocate: all`; the weight sync then goes through host memory over gloo)."""
    return ["ppo.generation.engine=vllm", *(["ppo.roles.rollout.gpus_per_worker=1"] if gpu else [])]


def policy_base(ctx: Context) -> Path:
    """A small scratch policy saved as a model folder (PPO starts from a folder), in the check's dtype."""
    from tuneyard.training.config import ModelConfig
    from tuneyard.training.model import load_model, load_tokenizer

    folder = ctx.work / "ppo-base"
    if not (folder / "config.json").is_file():
        cfg = ModelConfig(init="scratch", architecture=SMALL_ARCH, tokenizer=str(TOKENIZER), dtype=ctx.precision)
        tokenizer = load_tokenizer(cfg)
        import torch

        torch.manual_seed(0)
        load_model(cfg, tokenizer).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def ppo_job(ctx: Context, run_dir: Path, policy: Path, iterations: int) -> dict:
    """PPO with a critic (GAE) and a reference, rewards from functions; every role one rank per GPU, on GPUs all
    roles colocated (each a share of its GPU), in the rehearsal apart (half a CPU each), as tests/test_ppo.py."""
    ranks = ctx.ranks if ctx.gpu else 1
    role = (
        {"workers": ranks, "gpus_per_worker": 1, "cpus_per_worker": 1}
        if ctx.gpu
        else {"workers": 1, "cpus_per_worker": 0.5}
    )
    return {
        "stage": "ppo",
        "model": {"name_or_path": str(policy)},
        "data": {"format": "prompt", "train": str(DATA / "last-word-prompts-train.jsonl"), "max_length": 128},
        "ppo": {
            "rollout_batch_size": 8 * ranks,
            "samples_per_prompt": 2,
            "mini_batch_size": 16 * ranks,
            "micro_batch_size": 8,
            "iterations": iterations,
            "generation": {"max_new_tokens": 8, "temperature": 0.7},
            "colocate": "all" if ctx.gpu else "none",
            "roles": {"policy": role, "critic": role, "reference": role},
        },
        "reward": {"functions": [{"name": "last_word_exact"}, {"name": "one_word", "weight": 0.2}]},
        "training": {
            "learning_rate": 5e-4,
            "lr_scheduler": "constant",
            "seed": 7,
            "precision": ctx.precision,
            "report_to": [],
            "max_failures": 0,
        },
        "deepspeed": {"zero_stage": 2},
        "cluster": {"collective_timeout_s": 300},
        "output": {"dir": str(run_dir), "overwrite": True},
    }


@contextlib.contextmanager
def measured_roles(records: Path):
    """While inside, PPO's role actors write each rank's backend and GPU into `records` once set up
    (bench/gpu_check_worker.measured_role_class around the controller's role classes; their code is untouched)."""
    from bench.gpu_check_worker import measured_role_class
    from tuneyard.rlhf.ppo import controller

    original = dict(controller.ROLE_CLASSES)  # the controller looks its classes up here when it starts the groups
    controller.ROLE_CLASSES.update({role: measured_role_class(cls, str(records)) for role, cls in original.items()})
    try:
        yield
    finally:
        controller.ROLE_CLASSES.clear()
        controller.ROLE_CLASSES.update(original)


def check_ppo(ctx: Context, engine: str = "hf") -> Outcome:
    """PPO (`tuneyard train`) with its role groups (policy, critic, reference) on NCCL, a few iterations.

    engine "vllm" is the same run with `ppo.generation.engine=vllm` (vLLM rollout engines, the policy's weights
    synced into them), skipped where vLLM does not import.
    """
    overrides: list[str] = []
    if engine == "vllm":
        try:
            import vllm  # noqa: F401
        except Exception:
            return Outcome("skipped: vllm not installed", "", {})
        overrides = vllm_overrides(ctx.gpu)
    iterations = 3
    run_dir = ctx.work / f"ppo-{engine}"
    job = ppo_job(ctx, run_dir, policy_base(ctx), iterations)
    records = ctx.work / f"ppo-{engine}-roles"
    started = time.monotonic()
    with measured_roles(records):
        code, error = run_cli(["train", str(write_job(ctx.work / f"ppo-{engine}.yaml", job)), *overrides])
    seconds = time.monotonic() - started
    roles = [json.loads(p.read_text()) for p in sorted(records.glob("*.json"))]
    from tuneyard.training.metrics import read_metrics

    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "reward" in r] if run_dir.is_dir() else []
    problems = [f"tuneyard train exited {code}" + (f" ({error})" if error else "")] if code else []
    if len(rows) != iterations:
        problems.append(f"{len(rows)} of {iterations} iterations logged")
    keys = ("reward", "kl", "policy_loss", "value_loss")
    if not all(math.isfinite(r.get(k, math.nan)) for r in rows for k in keys):
        problems.append("a non-finite reward, KL or loss")
    grouped = [r for r in roles if r["role"] != "rollout"]  # the vLLM engines form no torch group of their own
    backends = sorted({str(r.get("backend")) for r in grouped})
    if not grouped or backends != [ctx.backend]:
        problems.append(f"role process groups {backends}, expected {ctx.backend}")
    if ctx.gpu and not all(r.get("cuda") and r.get("gpu") for r in grouped):
        problems.append("a role actor saw no CUDA device")
    names = sorted({r["role"] for r in roles})
    gpus = sorted({r["gpu"] for r in roles if r.get("gpu")})
    where = f"{'/'.join(backends)}" + (f" on {', '.join(gpus)}" if gpus else "")
    generate_s = statistics.median([r["generate_s"] for r in rows if "generate_s" in r] or [math.nan])
    figure = (
        f"{len(rows)} iterations in {seconds:.0f}s; roles {', '.join(names) or '-'} on {where}; "
        f"reward {rows[-1]['reward']:.2f}, kl {rows[-1]['kl']:.3f}; generate {generate_s:.2f}s/it"
        if rows
        else f"no iteration logged ({seconds:.0f}s)"
    )
    if engine == "vllm" and rows:
        # the engine's log-probs of its samples against the policy's after each sync: 0-3e-7 in fp32 on CPU; bf16
        # kernels (vLLM's and HF's) differ by more, a sync that never lands by 0.05 and up
        gaps = [r["rollout_logprob_gap"] for r in rows if math.isfinite(r.get("rollout_logprob_gap", math.nan))]
        gap = max(gaps) if len(gaps) == len(rows) else math.nan  # a missing or NaN gap fails the check below
        sync_s = statistics.median(r.get("weight_sync_s", math.nan) for r in rows)
        figure += f"; weight sync {sync_s:.2f}s, log-prob gap {gap:.1e}"
        if not gap < (1e-3 if ctx.precision == "fp32" else 0.05):
            problems.append(f"rollout_logprob_gap {gap:.3g}: the engine does not sample with the policy's weights")
    details = {"engine": engine, "overrides": overrides, "iterations": rows, "roles": roles}
    details["problems"] = problems
    return Outcome(ctx.verdict(not problems), figure + (f"; {problems[0]}" if problems else ""), details)


# ------------------------------------------------------------------------------------------------ 5. throughput


def train_flops_per_token(arch: dict, attention_context: float) -> dict[str, float]:
    """Model FLOPs to train on one token of a Llama shape: 6 N (N the weights a token multiplies: every layer's
    matrices and the LM head, which a tied embedding counts once) plus the attention term 12 L d T (PaLM's,
    Chowdhery et al. 2022, appendix B: QK^T and AV forward and backward, not halved for causality), with T
    `attention_context`, the number of positions a token attends to on average."""
    d = arch["hidden_size"]
    layers = arch["num_hidden_layers"]
    heads = arch["num_attention_heads"]
    head_dim = arch.get("head_dim") or d // heads
    kv = arch.get("num_key_value_heads", heads) * head_dim
    per_layer = d * heads * head_dim * 2 + d * kv * 2 + 3 * d * arch["intermediate_size"] + 2 * d
    matmul = layers * per_layer + d + d * arch["vocab_size"]  # + final norm + LM head
    dense = 6.0 * matmul
    attention = 12.0 * layers * heads * head_dim * attention_context
    return {"weights_per_token": float(matmul), "dense": dense, "attention": attention, "total": dense + attention}


def long_chat_rows(path: Path, rows: int, max_sentences: int, seed: int = 0) -> Path:
    """SFT conversations of 1 to `max_sentences` corpus sentences (each ends with an answer), so packed rows hold a
    mix of short and long examples, as real SFT data does."""
    sentences = [s.strip() + "." for s in (DATA / "corpus.txt").read_text().split(".") if s.strip()]
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(rows):
            n = min(max_sentences, max(1, int(rng.expovariate(1 / (max_sentences / 3)))))
            text = " ".join(rng.choice(sentences) for _ in range(n))
            answer = rng.choice(sentences)
            messages = [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def example_lengths(train: Path, max_length: int) -> list[int]:
    """The tokens of each SFT example of `train` (unpacked; over-long ones dropped, as the job drops them)."""
    from tuneyard.training.config import DataConfig, ModelConfig
    from tuneyard.training.data.tokenize import build_datasets
    from tuneyard.training.model import load_tokenizer

    tokenizer = load_tokenizer(
        ModelConfig(init="scratch", architecture={"model_type": "llama"}, tokenizer=str(TOKENIZER))
    )
    cfg = DataConfig(format="messages", train=str(train), max_length=max_length, overlength="drop", packing=False)
    return [len(row["input_ids"]) for row in build_datasets("sft", cfg, tokenizer, seed=0)["train"]]


def gpu_properties() -> dict:
    """Name and memory of the first visible GPU (every rank's is alike on one node)."""
    import torch

    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "memory": props.total_memory}


def check_throughput(ctx: Context) -> Outcome:
    """SFT of a Llama-shaped ~1B model built from config, packed rows of 2048 tokens, one rank per GPU under
    ZeRO-2, for about a minute: tokens/s and MFU (model FLOPs from the shape over the GPUs' dense bf16 peak)."""
    from bench.common import steady_rate

    arch = LLAMA_1B if ctx.gpu else REHEARSAL_1B
    seq = 2048 if ctx.gpu else 256
    batch = 4 if ctx.gpu else 2
    train = long_chat_rows(
        ctx.work / "long-chat.jsonl", rows=1500 if ctx.gpu else 200, max_sentences=60 if ctx.gpu else 6
    )
    lengths = example_lengths(train, seq)
    attention_context = sum(n * n for n in lengths) / sum(lengths)  # packed rows attend within an example
    flops = train_flops_per_token(arch, attention_context)
    device = gpu_properties() if ctx.gpu else {"name": "CPU", "memory": None}
    peak = ctx.peak_tflops or (peak_bf16_tflops(device["name"]) if ctx.gpu else None)
    tokens_per_step = batch * seq * ctx.ranks
    if ctx.gpu:  # about a minute, or what the check's timeout leaves after start-up at half the assumed speed
        seconds = max(15.0, min(THROUGHPUT_SECONDS, (ctx.timeout_s - 90.0) / 2))
        rate = ASSUMED_MFU * (peak or 300.0) * 1e12 * ctx.ranks / flops["total"]
        steps = int(min(1500, max(20, seconds * rate / tokens_per_step)))
    else:
        steps = 8
    run_dir = ctx.work / "throughput"
    cpus = float(max(1, min(8, (os.cpu_count() or 2) // ctx.ranks))) if ctx.gpu else 1.0  # threads: model init
    job = sft_job(
        ctx,
        run_dir,
        arch=arch,
        ranks=ctx.ranks,
        max_steps=steps,
        train=str(train),
        with_eval=False,
        max_length=seq,
        batch_size=batch,
        learning_rate=1e-4,
        warmup_steps=5,
        cpus_per_worker=cpus,
    )
    job_file = write_job(ctx.work / "throughput.yaml", job)
    started = time.monotonic()
    code, error, ranks = train_measured(job_file)
    seconds = time.monotonic() - started
    problems, where = rank_summary(ctx, ranks, ctx.ranks)
    if code:
        problems.insert(0, f"tuneyard train exited {code}" + (f" ({error})" if error else ""))
    tokens_per_s = math.nan
    with contextlib.suppress(Exception):
        tokens_per_s = steady_rate(run_dir, "tokens_per_s", skip=min(5, steps // 3))
    if not math.isfinite(tokens_per_s):
        problems.append("no tokens/s in metrics.jsonl")
    achieved = tokens_per_s * flops["total"]  # model FLOPs per second, all ranks
    mfu = achieved / (peak * 1e12 * ctx.ranks) if peak and ctx.gpu else None
    params = flops["weights_per_token"]
    peak_text_ = (
        f"peak {peak:g} TFLOPs/GPU" if peak else ("no GPU peak on CPU" if not ctx.gpu else "GPU not in the peak table")
    )
    size = f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e6:.1f}M"
    figure = (
        f"{size} x {seq} packed, {steps} steps: {tokens_per_s:,.0f} tokens/s, "
        f"{achieved / 1e12:.3g} TFLOPs/s, MFU {'n/a' if mfu is None else f'{mfu:.1%}'} ({peak_text_}); {where}"
    )
    if ctx.gpu and mfu is None:
        problems.append(f"{device['name']} has no peak in PEAK_BF16_TFLOPS (pass --peak-tflops)")
    details = {
        "arch": arch,
        "seq": seq,
        "batch_per_rank": batch,
        "steps": steps,
        "tokens_per_step": tokens_per_step,
        "examples": len(lengths),
        "mean_example_tokens": statistics.mean(lengths) if lengths else None,
        "attention_context": attention_context,
        "flops_per_token": flops,
        "tokens_per_s": tokens_per_s,
        "model_tflops_per_s": achieved / 1e12,
        "peak_tflops_per_gpu": peak,
        "mfu": mfu,
        "gpu": device,
        "ranks": ranks,
        "job": str(job_file),
        "seconds_with_start_up": seconds,
        "problems": problems,
    }
    verdict = ctx.verdict(not problems) if ctx.gpu or problems else "pass"
    return Outcome(verdict, figure + (f"; {problems[0]}" if problems else ""), details)


# ------------------------------------------------------------------------------------------------ 6. planner


def check_planner(ctx: Context) -> Outcome:
    """The memory planner's figure for the throughput job (`tuneyard plan`'s `run_plan`) against the peak that
    job measured: torch's max_memory_allocated and max_memory_reserved on the fullest rank."""
    from tuneyard.launch.config import load_job
    from tuneyard.launch.plan import Hardware, run_plan

    source = ctx.results / "throughput_1b.json"
    if not source.is_file():
        return Outcome("skipped: the throughput check left no result", "", {})
    earlier = json.loads(source.read_text())
    details = earlier.get("details") or {}
    ranks = details.get("ranks") or []
    if not ranks or "job" not in details:
        return Outcome("skipped: the throughput check measured no peak", "", {})
    job = load_job(details["job"])
    gpu_memory = (details.get("gpu") or {}).get("memory")
    plan, _ = run_plan(job, Hardware(gpu_memory=gpu_memory))
    device = plan.devices[0]
    memory = device.parts[0][1]
    planned = device.gpu
    planned_torch = planned - memory.margin  # the margin is for CUDA's context and NCCL, outside torch's counters
    parts = {
        "weights": memory.weights,
        "gradients": memory.gradients,
        "optimizer": memory.optimizer,
        "activations": memory.activations,
        "buffers": memory.buffers,
    }
    out = {"planned_bytes": planned, "planned_without_margin": planned_torch, "planned_parts": parts}
    if not ctx.gpu:
        rss = max(r.get("max_rss_bytes", 0) for r in ranks)
        figure = (
            f"planned {planned / GiB:.2f} GiB per GPU; CPU rehearsal: RSS peak {rss / GiB:.2f} GiB (not comparable)"
        )
        return Outcome("rehearsed", figure, {**out, "max_rss_bytes": rss})
    allocated = max(r.get("max_memory_allocated", 0) for r in ranks)
    reserved = max(r.get("max_memory_reserved", 0) for r in ranks)
    if not reserved:
        return Outcome("skipped: the throughput check measured no CUDA peak", "", out)
    problems = []
    if planned < reserved:
        problems.append(f"the plan under-predicts: {planned / GiB:.2f} < reserved {reserved / GiB:.2f} GiB")
    if planned_torch > 1.5 * reserved:
        problems.append(f"the plan over-predicts 1.5x: {planned_torch / GiB:.2f} > 1.5 x {reserved / GiB:.2f} GiB")
    figure = (
        f"planned {planned / GiB:.2f} GiB ({planned_torch / GiB:.2f} + {memory.margin / GiB:.0f} margin) vs peak "
        f"{allocated / GiB:.2f} allocated / {reserved / GiB:.2f} reserved: planned/reserved {planned / reserved:.2f}"
    )
    out.update(max_memory_allocated=allocated, max_memory_reserved=reserved, problems=problems)
    return Outcome(ctx.verdict(not problems), figure + (f"; {problems[0]}" if problems else ""), out)


TILED_LOSS_TOKENS = 32768  # the long row of the tiled-loss check on one GPU (2048 in the rehearsal)


def check_tiled_loss(ctx: Context) -> Outcome:
    """One 32k-token row through the 1B Llama on one GPU, as pretrain and SFT train it on long rows (bf16, gradient
    checkpointing, tiled MLPs, TRL's fused output head): its loss equals the plain head's, and its peak memory is
    below the plain head's, which builds the [tokens x vocab] logits. Sequence parallelism needs two GPUs; this
    check is the one-GPU half of long sequences (the two-rank path is tested on CPU)."""
    from types import SimpleNamespace

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from tuneyard.training.attention import resolve_attn_implementation
    from tuneyard.training.tiled_mlp import tile_mlps

    device = torch.device("cuda" if ctx.gpu else "cpu")
    length = TILED_LOSS_TOKENS if ctx.gpu else 2048
    arch = {k: v for k, v in (LLAMA_1B if ctx.gpu else REHEARSAL_1B).items() if k != "model_type"}
    config = LlamaConfig(**{**arch, "max_position_embeddings": length})
    config._attn_implementation = resolve_attn_implementation("auto")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16)
    model.gradient_checkpointing_enable()
    model.train()
    tiled = tile_mlps(model, SimpleNamespace(training=SimpleNamespace(tiled_mlp=True)))
    add_fused_lm_head(model, outputs=("log_probs",))
    ids = torch.randint(3, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(1)).to(device)

    def step(fused: bool) -> tuple[float, int]:
        model.zero_grad(set_to_none=True)
        if ctx.gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        loss = (
            model(input_ids=ids, labels=ids, fused_lm_head=True).loss
            if fused
            else model(input_ids=ids, labels=ids).loss
        )
        loss.backward()
        peak = torch.cuda.max_memory_allocated() if ctx.gpu else 0
        return loss.item(), peak

    started = time.perf_counter()
    fused_loss, fused_peak = step(True)
    fused_s = time.perf_counter() - started
    plain_loss, plain_peak = step(False)
    details = {
        "tokens": length,
        "attention": config._attn_implementation,
        "tiled_mlps": tiled,
        "fused_loss": fused_loss,
        "plain_loss": plain_loss,
        "fused_peak_bytes": fused_peak,
        "plain_peak_bytes": plain_peak,
        "fused_step_s": fused_s,
    }
    equal = math.isfinite(fused_loss) and abs(fused_loss - plain_loss) <= 1e-2 * abs(plain_loss)
    figure = f"{length} tokens, loss {fused_loss:.4f} fused vs {plain_loss:.4f} plain"
    if not ctx.gpu:
        return Outcome("rehearsed", figure + " (CPU: no CUDA peak)", details)
    figure += (
        f"; peak {fused_peak / GiB:.1f} vs {plain_peak / GiB:.1f} GiB ({fused_peak / plain_peak:.2f}x), "
        f"{fused_s:.1f} s; sequence parallelism needs 2 GPUs"
    )
    return Outcome(ctx.verdict(equal and fused_peak < plain_peak), figure, details)
