"""`make gpu-check`: a prepared proof of every GPU path, one line of a table per check.

    .venv/bin/python bench/gpu_check.py                  # on a machine with CUDA; without: "no GPU: nothing to check"
    .venv/bin/python bench/gpu_check.py --cpu-rehearsal  # the same checks on CPU (gloo, tiny shapes), to try the code
    .venv/bin/python bench/gpu_check.py --only attention_packed,qlora_4bit

Each check runs in a process of its own with a timeout (a hang or a crash ends that check, and the rest run), all
within one time budget (8 minutes on a GPU). The table (name, result, figure, seconds) is printed as the checks end
and written to bench/results/gpu-check.json (the rehearsal: gpu-check-rehearsal.json), with each check's log beside
it under gpu-check-logs/. The checks themselves are in bench/gpu_check_checks.py. Exit code 1 when a check failed,
crashed or timed out, else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
GPU_BUDGET_S = 480.0  # the whole check on one GPU
REHEARSAL_BUDGET_S = 2400.0  # two shared CPU cores
MIN_START_S = 20.0  # a check is not started with less of the budget left


@dataclass(frozen=True)
class Check:
    """One line of the table: the function (in bench/gpu_check_checks.py) and its timeouts."""

    name: str
    what: str
    function: str  # name in bench.gpu_check_checks
    kwargs: tuple[tuple[str, object], ...] = ()
    timeout_gpu_s: float = 180.0
    timeout_cpu_s: float = 600.0


CHECKS = [
    Check(
        "sft_zero2",
        "worker group on NCCL, 1 rank per GPU: tiny SFT, ZeRO-2, bf16",
        "check_sft_zero",
        (("zero_stage", 2),),
    ),
    Check(
        "sft_zero3",
        "worker group on NCCL, 1 rank per GPU: tiny SFT, ZeRO-3, bf16",
        "check_sft_zero",
        (("zero_stage", 3),),
    ),
    Check(
        "attention_packed",
        "flash-attn, else sdpa's flash kernel: packed == unpacked logits",
        "check_attention",
        timeout_gpu_s=120.0,
        timeout_cpu_s=240.0,
    ),
    Check("qlora_4bit", "QLoRA on bitsandbytes' CUDA 4-bit kernels: loss falls, merged export reloads", "check_qlora"),
    Check(
        "ppo_hf",
        "PPO role groups on NCCL, HF generate, 3 iterations",
        "check_ppo",
        (("engine", "hf"),),
        timeout_gpu_s=240.0,
        timeout_cpu_s=600.0,
    ),
    # The second PPO entry: the same run with ppo.generation.engine=vllm (vLLM rollout engines, one weight sync per
    # iteration, rollout_logprob_gap logged). Skipped where vLLM does not import; its overrides: vllm_overrides.
    Check(
        "ppo_vllm",
        "PPO as above with ppo.generation.engine=vllm",
        "check_ppo",
        (("engine", "vllm"),),
        timeout_gpu_s=180.0,
        timeout_cpu_s=600.0,
    ),
    Check(
        "throughput_1b",
        "1B Llama SFT, packed 2048, ~60 s: tokens/s and MFU",
        "check_throughput",
        timeout_gpu_s=300.0,
        timeout_cpu_s=600.0,
    ),
    Check(
        "tiled_loss_32k",
        "1B Llama, one 32k-token row: fused head + tiled MLPs vs plain head (loss, peak)",
        "check_tiled_loss",
        timeout_gpu_s=120.0,
        timeout_cpu_s=240.0,
    ),
    Check(
        "planner_vs_peak",
        "memory planner vs the 1B run's measured peak",
        "check_planner",
        timeout_gpu_s=60.0,
        timeout_cpu_s=120.0,
    ),
]


def gpu_count() -> int:
    """CUDA devices visible here (torch's count, which creates no CUDA context)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def probe_gpus() -> list[dict]:
    """Name and memory of each visible GPU, asked in a short process of its own (this one keeps no CUDA context)."""
    code = (
        "import json, torch; print(json.dumps([{'name': torch.cuda.get_device_properties(i).name, "
        "'memory': torch.cuda.get_device_properties(i).total_memory} for i in range(torch.cuda.device_count())]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else []


def child_env(mode: str) -> dict[str, str]:
    """The environment of a check's process: this tree importable by it and by its Ray workers (who inherit it)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if mode == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the rehearsal stays on CPU on a GPU machine too
    else:
        env.setdefault("NCCL_DEBUG", "INFO")  # NCCL's set-up in the workers' logs, for a check that fails there
    return env


def end_session(pid: int) -> None:
    """Kill a timed-out check's process and everything it started (its session: the driver, Ray, the workers)."""
    table = subprocess.run(["ps", "-eo", "sid=,pid="], capture_output=True, text=True).stdout
    pids = [int(p) for s, p in (row.split() for row in table.splitlines()) if int(s) == pid]
    for each in [pid, *[p for p in pids if p != pid]]:
        try:
            os.kill(each, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_check(check: Check, mode: str, context: dict, work: Path, timeout_s: float) -> dict:
    """Run one check in its own process (its own session) within `timeout_s`; its row for the table."""
    folder = work / check.name
    folder.mkdir(parents=True, exist_ok=True)
    context_file = folder / "context.json"
    context_file.write_text(json.dumps({**context, "work": str(folder), "timeout_s": timeout_s}))
    result_file = Path(context["results"]) / f"{check.name}.json"
    result_file.unlink(missing_ok=True)
    log = folder / "log.txt"
    started = time.monotonic()
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--child", check.name, "--context", str(context_file)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=child_env(mode),
            cwd=ROOT,
            start_new_session=True,
        )
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            end_session(process.pid)
            process.wait()
            code = None
    seconds = time.monotonic() - started
    row = {"name": check.name, "what": check.what, "seconds": round(seconds, 1), "log": str(log)}
    if code is None:
        said = last_line(log)[:100]
        row.update(result="timeout", figure=f"no result within {timeout_s:.0f}s" + (f"; last: {said}" if said else ""))
        row["details"] = {}
    elif result_file.is_file():
        row.update(json.loads(result_file.read_text()))
        row["seconds"] = round(seconds, 1)
    else:
        row.update(result=f"crashed (exit {code})", figure=last_line(log), details={})
    if not row["result"].startswith(("pass", "skipped", "rehearsed")):
        row["log_tail"] = log.read_text(errors="replace").splitlines()[-30:]
    return row


def last_line(log: Path) -> str:
    """The last non-empty line of a log (a crash's own message, usually)."""
    lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
    return lines[-1][:160] if lines else ""


def child_main(name: str, context_file: Path) -> int:
    """In a check's process: run the check and write its result file for the parent."""
    import logging

    from bench import gpu_check_checks as checks

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    context = json.loads(context_file.read_text())
    check = next(c for c in CHECKS if c.name == name)
    ctx = checks.Context(
        mode=context["mode"],
        work=Path(context["work"]),
        ranks=context["ranks"],
        results=Path(context["results"]),
        peak_tflops=context.get("peak_tflops"),
        timeout_s=context.get("timeout_s", 600.0),
    )
    try:
        outcome = getattr(checks, check.function)(ctx, **dict(check.kwargs))
    except Exception as exc:
        import traceback

        traceback.print_exc()
        outcome = checks.Outcome("fail", f"{type(exc).__name__}: {str(exc).strip()[:200]}", {})
    record = {"name": name, **asdict(outcome)}
    (Path(context["results"]) / f"{name}.json").write_text(json.dumps(record, indent=2, default=str))
    return 0


WIDTHS = (17, 10, 0, 7)


def table_row(name: str, result: str, figure: str, seconds: str) -> str:
    """One line of the table: name, result, figure, seconds (a long result takes the space it needs)."""
    return f"{name:<{WIDTHS[0]}} {result:<{WIDTHS[1]}} {seconds:>{WIDTHS[3]}}  {figure}"


def driver_sees_gpus() -> bool:
    """Whether the NVIDIA driver lists a GPU on this machine (whatever torch can use)."""
    if shutil.which("nvidia-smi") is None:
        return False
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    return listed.returncode == 0 and "GPU" in listed.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-rehearsal", action="store_true", help="run every check on CPU (gloo, tiny shapes)")
    parser.add_argument("--only", help="comma-separated check names (default: all)")
    parser.add_argument("--out", help="the JSON file (default bench/results/gpu-check.json or -rehearsal.json)")
    parser.add_argument("--budget-s", type=float, help="time for all checks (default 480 on a GPU, 2400 rehearsed)")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of one GPU, for a GPU not in the table")
    parser.add_argument("--keep", action="store_true", help="keep the checks' run folders (the 1B run is 2 GB)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--context", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args.child, Path(args.context))

    selected = CHECKS
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in {c.name for c in CHECKS}]
        if unknown:
            parser.error(f"unknown check(s) {unknown}; the checks are {[c.name for c in CHECKS]}")
        selected = [c for c in CHECKS if c.name in names]

    mode = "cpu" if args.cpu_rehearsal else "gpu"
    gpus: list[dict] = []
    if mode == "gpu":
        if gpu_count() == 0:
            if driver_sees_gpus():
                print(
                    "nvidia-smi lists GPUs but this torch has no CUDA (a CPU build of torch in this environment?): "
                    "install a CUDA build of torch here, then run the check again",
                    file=sys.stderr,
                )
                return 1
            print("no GPU: nothing to check")
            return 0
        gpus = probe_gpus()
    out = Path(args.out) if args.out else RESULTS / ("gpu-check.json" if mode == "gpu" else "gpu-check-rehearsal.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = out.with_suffix("").with_name(out.stem + "-logs")
    budget = args.budget_s or (GPU_BUDGET_S if mode == "gpu" else REHEARSAL_BUDGET_S)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    results = work / "results"
    results.mkdir()
    context = {
        "mode": mode,
        "ranks": max(1, len(gpus)) if mode == "gpu" else 2,
        "results": str(results),
        "peak_tflops": args.peak_tflops,
    }
    device = ", ".join(g["name"] for g in gpus) if gpus else "CPU (rehearsal: gloo, tiny shapes)"
    print(f"gpu-check on {device}; {len(selected)} checks, {budget:.0f}s budget; work in {work}", flush=True)
    print(table_row("check", "result", "figure", "seconds"), flush=True)
    started = time.monotonic()
    rows = []
    for check in selected:
        left = budget - (time.monotonic() - started)
        own = check.timeout_gpu_s if mode == "gpu" else check.timeout_cpu_s
        if left < MIN_START_S:
            row = {
                "name": check.name,
                "what": check.what,
                "result": "skipped: out of time",
                "figure": "",
                "seconds": 0.0,
                "details": {},
            }
        else:
            row = run_check(check, mode, context, work, min(own, left))
        rows.append(row)
        print(table_row(row["name"], row["result"], row["figure"], f"{row['seconds']:.0f}"), flush=True)
    report = {
        "mode": mode,
        "device": {"gpus": gpus, "ranks": context["ranks"]},
        "budget_s": budget,
        "seconds": round(time.monotonic() - started, 1),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "checks": rows,
    }
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    for row in rows:
        if row.get("log") and Path(row["log"]).is_file():
            kept = logs / f"{row['name']}.log"
            shutil.copyfile(row["log"], kept)
            row["log"] = str(kept)
    out.write_text(json.dumps(report, indent=2, default=str))
    if args.keep:
        print(f"run folders kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    bad = [r["name"] for r in rows if not r["result"].startswith(("pass", "skipped", "rehearsed"))]
    print(f"results: {out} (logs: {logs})" + (f"; not passed: {', '.join(bad)}" if bad else ""), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
