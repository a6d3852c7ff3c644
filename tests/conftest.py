"""Shared fixtures: the repository paths, tiny job dicts, and one local Ray for the whole session."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TOKENIZER = EXAMPLES / "tiny" / "tokenizer"

TINY_ARCH = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}

PRETRAIN_JOB = {
    "stage": "pretrain",
    "model": {"init": "scratch", "tokenizer": str(TOKENIZER), "architecture": TINY_ARCH},
    "data": {
        "format": "text",
        "train": str(EXAMPLES / "data" / "corpus.txt"),
        "eval": str(EXAMPLES / "data" / "corpus-eval.txt"),
        "max_length": 64,
    },
    "training": {
        "learning_rate": 3e-3,
        "batch_size": 4,
        "max_steps": 6,
        "warmup_steps": 2,
        "seed": 7,
        "precision": "fp32",
    },
    "deepspeed": {"zero_stage": 3},
    "cluster": {"workers": 2},
    "output": {"dir": "set-by-test"},
}

SFT_JOB = {
    "stage": "sft",
    "model": {"init": "scratch", "tokenizer": str(TOKENIZER), "architecture": TINY_ARCH},
    "data": {
        "format": "messages",
        "train": str(EXAMPLES / "data" / "last-word-train.jsonl"),
        "eval": str(EXAMPLES / "data" / "last-word-eval.jsonl"),
        "max_length": 128,
    },
    "training": {"learning_rate": 3e-3, "batch_size": 4, "max_steps": 6, "seed": 7, "precision": "fp32"},
    "deepspeed": {"zero_stage": 2},
    "cluster": {"workers": 2},
    "output": {"dir": "set-by-test"},
}


def can_mount_tmpfs(folder: Path) -> bool:
    """Whether this machine lets us mount a small tmpfs in a private mount namespace (root)."""
    if shutil.which("unshare") is None:
        return False
    folder.mkdir(exist_ok=True)
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs '{folder}'"], capture_output=True
    )
    return probe.returncode == 0


def job_dict(base: dict, run_dir: Path, **sections: dict) -> dict:
    """A copy of a base job with its output dir set and some sections' keys replaced."""
    job = copy.deepcopy(base)
    job["output"]["dir"] = str(run_dir)
    job["data"]["cache_dir"] = str(run_dir.parent / ".tokenized")
    for name, values in sections.items():
        job.setdefault(name, {}).update(values)
    return job


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray on 127.0.0.1 for every integration test; jobs see it and reuse it."""
    import ray

    from tuneyard.cluster.extensions import clear_stale_locks, default_extensions_dir

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", default_extensions_dir())
    clear_stale_locks(os.environ["TORCH_EXTENSIONS_DIR"])  # this fixture starts Ray itself, not via ray_cluster
    ray.init(
        num_cpus=max(os.cpu_count() or 1, 2),
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=str(tmp_path_factory.mktemp("ray")),
    )
    yield
    ray.shutdown()


def _single_run(base: dict, run_dir: Path, **sections: dict) -> Path:
    """Run a job in this process (no Ray) and return its final/ folder."""
    from tuneyard.launch.config import job_from_dict
    from tuneyard.launch.run_job import run_job

    job = job_dict(base, run_dir, cluster={"workers": 1}, **sections)
    run_job(job_from_dict(job), show_progress=False, single=True)
    return run_dir / "final"


@pytest.fixture(scope="session")
def pretrained_base(tmp_path_factory) -> str:
    """The tiny Llama after a short single-process pretraining on the shipped corpus."""
    return str(_single_run(PRETRAIN_JOB, tmp_path_factory.mktemp("pretrained") / "run", training={"max_steps": 60}))


@pytest.fixture(scope="session")
def sft_base(pretrained_base, tmp_path_factory) -> str:
    """A weakly instruction-tuned model: knows the answer format, often wrong, so preference stages can improve it."""
    job = {**SFT_JOB, "model": {"name_or_path": pretrained_base}}
    return str(
        _single_run(
            job,
            tmp_path_factory.mktemp("sft") / "run",
            training={"max_steps": SFT_BASE_STEPS, "learning_rate": 3e-3, "batch_size": 8},
        )
    )


SFT_BASE_STEPS = 120
# vLLM's CPU attention serves head sizes 32, 64, ...; the shared tiny model's 4 heads are 16 wide, these 2 are 32
VLLM_ARCH = {**TINY_ARCH, "num_attention_heads": 2, "num_key_value_heads": 1}


@pytest.fixture(scope="session")
def vllm_base(tmp_path_factory) -> str:
    """The weak SFT model of sft_base, with heads vLLM's CPU kernels serve."""
    root = tmp_path_factory.mktemp("vllm-base")
    pretrain = {**PRETRAIN_JOB, "model": {**PRETRAIN_JOB["model"], "architecture": VLLM_ARCH}}
    pretrained = _single_run(pretrain, root / "pretrain", training={"max_steps": 60})
    sft = {**SFT_JOB, "model": {"name_or_path": str(pretrained)}}
    steps = {"max_steps": SFT_BASE_STEPS, "learning_rate": 3e-3, "batch_size": 8}
    return str(_single_run(sft, root / "sft", training=steps))


def processes_of_session(sid: int) -> list[str]:
    """The processes of one session: a CLI started with start_new_session, its Ray daemons and workers too."""
    table = subprocess.run(["ps", "-ww", "-eo", "sid=,pid=,args="], capture_output=True, text=True).stdout
    return [row for row in table.splitlines() if row.split()[0] == str(sid)]
