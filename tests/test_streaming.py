"""data.streaming: a pretraining corpus split into byte ranges, tokenised by parallel Ray tasks into
memory-mapped shards, read in place by the workers, and resumed at the exact sample."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from tests.conftest import EXAMPLES, PRETRAIN_JOB, job_dict
from tests.test_faults import kill_when_paused, losses
from tuneyard.launch.cli import main
from tuneyard.launch.config import job_from_dict
from tuneyard.launch.run_job import run_job
from tuneyard.training.config import DataConfig, ModelConfig
from tuneyard.training.data.shards import MANIFEST, line_records, plan_tasks
from tuneyard.training.data.tokenize import build_datasets, prepare_datasets
from tuneyard.training.errors import UserError
from tuneyard.training.metrics import read_metrics
from tuneyard.training.model import load_tokenizer

CORPUS = EXAMPLES / "data" / "corpus.txt"
STREAMED = {"streaming": True, "shard_mb": 0.2, "eval": None, "eval_fraction": 0.05}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(
        ModelConfig(
            init="scratch", tokenizer=str(PRETRAIN_JOB["model"]["tokenizer"]), architecture={"model_type": "llama"}
        )
    )


def test_byte_ranges_give_every_line_exactly_once(tmp_path):
    """Ranges cut anywhere (inside a line, a CRLF, a multi-byte character) still give each line to one range."""
    rng = random.Random(0)
    lines = [("é" * rng.randint(0, 3) + "word " * rng.randint(0, 9)).rstrip() for _ in range(300)]
    path = tmp_path / "corpus.txt"
    path.write_bytes(("\r\n".join(lines)).encode())  # no newline at the end either
    data = path.read_bytes()
    for size in (1, 2, 3, 17, 256, len(data)):
        got = [line for start in range(0, len(data), size) for _, line in line_records(str(path), start, start + size)]
        assert b"".join(got) == data, size


def test_streamed_blocks_are_the_in_memory_blocks(tmp_path, tokenizer):
    """One shard over the whole file gives exactly the blocks of the in-memory path; many shards give
    contiguous runs of the same token stream, each losing less than a block at its end; both memory-mapped."""
    common = {"format": "text", "train": [str(CORPUS)], "max_length": 64}
    in_memory = build_datasets("pretrain", DataConfig(**common), tokenizer, 7)["train"]["input_ids"]
    whole, warm = prepare_datasets("pretrain", DataConfig(**common, streaming=True), tokenizer, 7, tmp_path)
    assert not warm and whole["train"]["input_ids"] == in_memory
    sharded_cfg = DataConfig(**common, streaming=True, shard_mb=0.05)
    sharded, _ = prepare_datasets("pretrain", sharded_cfg, tokenizer, 7, tmp_path)
    assert len(plan_tasks(sharded_cfg)) == 14
    stream = [t for block in in_memory for t in block]
    blocks = sharded["train"]["input_ids"]
    assert len(in_memory) - 14 <= len(blocks) < len(in_memory)
    text = " ".join(map(str, stream))
    assert all(" ".join(map(str, block)) in text for block in blocks[::50])
    assert all(f["filename"].endswith(".arrow") for f in sharded["train"].cache_files)  # read in place, not loaded


def test_weights_and_eval_fraction_apply_when_reading_without_tokenising_again(tmp_path, tokenizer):
    base = {"format": "text", "max_length": 64, "streaming": True}
    plain, _ = prepare_datasets("pretrain", DataConfig(**base, train=[str(CORPUS)]), tokenizer, 7, tmp_path)
    weighted_cfg = DataConfig(**base, train=[{"path": str(CORPUS), "weight": 1.5}], eval_fraction=0.1)
    weighted, warm = prepare_datasets("pretrain", weighted_cfg, tokenizer, 7, tmp_path)
    assert warm  # the same shards: only how they are read changed
    total = len(plain["train"])
    held = len(weighted["eval"])
    assert held == int(total * 0.1) and len(weighted["train"]) == (total - held) + round((total - held) * 0.5)
    eval_rows = {tuple(r) for r in weighted["eval"]["input_ids"]}
    assert not eval_rows & {tuple(r) for r in weighted["train"]["input_ids"]}


def test_a_bad_row_is_named_by_file_and_line(tmp_path, tokenizer):
    path = tmp_path / "corpus.jsonl"
    rows = [json.dumps({"text": f"row {i} " * 30}) for i in range(400)]
    rows[321] = json.dumps({"content": "no text field"})
    path.write_text("\n".join(rows) + "\n")
    cfg = DataConfig(format="text", train=[str(path)], max_length=16, streaming=True, shard_mb=0.01)
    with pytest.raises(UserError, match=rf"^{path}:322: .*'text'"):
        prepare_datasets("pretrain", cfg, tokenizer, 7, tmp_path / "cache")
    hub = DataConfig(format="text", train=["someone/corpus"], streaming=True)
    with pytest.raises(UserError, match="data.train: data source 'someone/corpus' is not a local file or folder"):
        plan_tasks(hub)


def test_streaming_is_refused_outside_plain_text_pretraining():
    job = job_dict(PRETRAIN_JOB, Path("/tmp/unused"), data={"streaming": True})
    job["stage"] = "sft"
    with pytest.raises(UserError, match="data.streaming tokenises plain-text corpora for stage pretrain"):
        job_from_dict(job)


@pytest.mark.integration
def test_prepare_runs_ray_tasks_in_parallel_and_an_interrupted_one_keeps_its_shards(ray_session, tmp_path, capsys):
    job = job_dict(PRETRAIN_JOB, tmp_path / "run", data=STREAMED)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    assert main(["prepare", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("prepared: train ") and "tokenising: 4/4 shards" in err, (out, err)
    folder = Path(out.strip().rsplit(" in ", 1)[1])
    shards = json.loads((folder / MANIFEST).read_text())["shards"]
    assert len({s["pid"] for s in shards}) == 2  # two tasks at once, in two Ray worker processes
    # an interruption: the folder is back to .partial with one shard missing; only that one is made again
    partial = folder.with_name(folder.name + ".partial")
    folder.rename(partial)
    (partial / "ready").unlink()
    (partial / shards[1]["name"]).unlink()
    kept = {s["name"]: (partial / s["name"]).stat().st_mtime_ns for s in shards if s is not shards[1]}
    assert main(["prepare", str(path)]) == 0
    assert capsys.readouterr().out.startswith("prepared: ")
    assert {name: (folder / name).stat().st_mtime_ns for name in kept} == kept
    assert (folder / shards[1]["name"]).exists()
    assert main(["prepare", str(path)]) == 0
    assert capsys.readouterr().out.startswith("already prepared: ")


STREAMED_RUN = {"max_steps": 12, "max_failures": 1, "eval_steps": None}


@pytest.mark.integration
def test_streamed_pretraining_learns_and_a_restart_resumes_at_the_exact_sample(ray_session, tmp_path, monkeypatch):
    """2 Ray workers on streamed shards; rank 0 killed inside the save of checkpoint-10 restarts from
    checkpoint-5, and steps 6-12 see the very batches of a run never killed: equal losses."""
    sections = {"data": STREAMED, "training": STREAMED_RUN, "output": {"save_steps": 5, "keep_last": 1}}
    clean = run_job(job_from_dict(job_dict(PRETRAIN_JOB, tmp_path / "clean", **sections)), show_progress=False)
    assert clean.eval_loss_after < clean.eval_loss_before - 0.5
    monkeypatch.setenv("TUNEYARD_FAULT_PAUSE", "written@10")
    run_dir = tmp_path / "killed"
    killed = kill_when_paused(run_dir, "written", 10)
    run_job(job_from_dict(job_dict(PRETRAIN_JOB, run_dir, **sections)), show_progress=False)
    assert killed["pid"] is not None
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "start"] == [0, 5]
    expected, got = losses(tmp_path / "clean"), losses(run_dir)
    assert [got[step] for step in range(6, 13)] == pytest.approx([expected[step] for step in range(6, 13)], rel=1e-4)
