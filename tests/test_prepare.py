"""`tuneyard prepare`: the driver tokenises a job's data into the cache the workers then only read."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.conftest import EXAMPLES, SFT_JOB, job_dict
from tuneyard.launch.cli import main
from tuneyard.launch.config import job_from_dict
from tuneyard.training.data.tokenize import default_cache_dir, prepare_datasets
from tuneyard.training.model import load_tokenizer


def test_prepare_builds_the_cache_a_worker_then_reads(tmp_path, capsys):
    job = job_dict(SFT_JOB, tmp_path / "run")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    assert main(["prepare", str(path)]) == 0
    first = capsys.readouterr().out.strip()
    assert first.startswith("prepared: train ") and ", eval " in first, first
    folder = Path(first.rsplit(" in ", 1)[1])
    assert folder.parent == tmp_path / ".tokenized" and (folder / "ready").exists()
    assert main(["prepare", str(path)]) == 0
    assert capsys.readouterr().out.strip() == "already " + first
    # what a worker does (tuneyard.training.causal_lm_recipe.run_training): the same key, found warm
    spec = job_from_dict(job).train_spec()
    tokenizer = load_tokenizer(spec.model, spec.data.chat_template)
    splits, warm = prepare_datasets(
        spec.stage, spec.data, tokenizer, spec.training.seed, default_cache_dir(spec.data, spec.output)
    )
    assert warm and f"train {len(splits['train']):,} rows" in first


def test_prepare_refuses_the_stages_trl_tokenises(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    job = job_dict(SFT_JOB, tmp_path / "run", data={"format": "preference"})
    job["stage"] = "dpo"
    job["data"]["train"] = str(EXAMPLES / "data" / "last-word-pref-train.jsonl")
    job["data"]["eval"] = str(EXAMPLES / "data" / "last-word-pref-eval.jsonl")
    path.write_text(yaml.safe_dump(job))
    assert main(["prepare", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: stage dpo: TRL tokenises its rows inside its trainer, so there is nothing to prepare ahead; "
        "`tuneyard prepare` applies to stages pretrain and sft"
    )
    job["stage"] = "classify"
    job["data"] = {"format": "classification", "train": str(EXAMPLES / "data" / "sentiment-generated-train.jsonl")}
    path.write_text(yaml.safe_dump(job))
    assert main(["prepare", str(path)]) == 2
    assert capsys.readouterr().err.startswith(
        "error: stage classify: its labelled rows are small and every worker tokenises them in seconds, so there is "
        "nothing to prepare ahead"
    )
