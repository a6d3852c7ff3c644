"""Attention choice, DeepSpeed dict, run directory rules, and the tokenizer recipe."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TOKENIZER
from tuneyard.training.attention import choose_attn_implementation
from tuneyard.training.config import DeepSpeedSection, OutputConfig
from tuneyard.training.deepspeed_config import build_deepspeed_config
from tuneyard.training.errors import UserError
from tuneyard.training.metrics import COMPLETE_MARKER
from tuneyard.training.run_dir import complete_checkpoints, prepare_run_dir, publish_final, resume_checkpoint


@pytest.mark.parametrize(
    ("flash", "cuda", "strict", "expected"),
    [
        (True, True, False, "flash_attention_2"),
        (True, False, False, "sdpa"),
        (False, True, False, "sdpa"),
        (False, False, False, "sdpa"),
        (True, True, True, "flash_attention_2"),
        (True, False, True, "sdpa"),
        (False, True, True, "sdpa"),
        (False, False, True, "sdpa"),
    ],
)
def test_auto_attention_choice(flash, cuda, strict, expected):
    choice, _ = choose_attn_implementation("auto", flash_available=flash, cuda_available=cuda, strict=strict)
    assert choice == expected


@pytest.mark.parametrize(("flash", "cuda"), [(True, False), (False, True), (False, False)])
def test_flash_request_falls_back_or_fails_when_strict(flash, cuda):
    choice, reason = choose_attn_implementation("flash_attention_2", flash_available=flash, cuda_available=cuda)
    assert choice == "sdpa" and "falling back to sdpa" in reason
    with pytest.raises(UserError, match="model.attn_implementation is flash_attention_2 but"):
        choose_attn_implementation("flash_attention_2", flash_available=flash, cuda_available=cuda, strict=True)
    assert choose_attn_implementation("flash_attention_2", flash_available=True, cuda_available=True)[0] == (
        "flash_attention_2"
    )
    assert choose_attn_implementation("auto", flash_available=False, cuda_available=False, sdpa=False)[0] == "eager"


def test_deepspeed_dict_per_stage():
    zero3 = build_deepspeed_config(DeepSpeedSection(zero_stage=3, offload_optimizer=True))
    assert zero3["zero_optimization"]["stage"] == 3
    assert zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero3["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert zero3["optimizer"]["type"] == "AdamW"
    assert "train_batch_size" not in zero3
    zero0 = build_deepspeed_config(DeepSpeedSection(zero_stage=0))
    assert zero0["zero_optimization"] == {"stage": 0} and "optimizer" not in zero0
    with pytest.raises(ValueError, match="offload_params needs zero_stage: 3"):
        DeepSpeedSection(zero_stage=2, offload_params=True)


def test_raw_deepspeed_json_wins(tmp_path):
    raw = {"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": "auto"}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(raw))
    assert build_deepspeed_config(DeepSpeedSection(zero_stage=3, config=str(path))) == raw
    with pytest.raises(UserError, match="does not exist"):
        build_deepspeed_config(DeepSpeedSection(config=str(tmp_path / "missing.json")))


def test_run_dir_refuses_another_jobs_run(tmp_path):
    out = OutputConfig(dir=str(tmp_path / "run"))
    prepare_run_dir(out, "job-a")
    prepare_run_dir(out, "job-a")  # the same job may come back (resume)
    with pytest.raises(UserError, match="holds another job's run"):
        prepare_run_dir(out, "job-b")
    (tmp_path / "run" / "keep.txt").write_text("x")
    prepare_run_dir(out.model_copy(update={"overwrite": True}), "job-b")
    assert not (tmp_path / "run" / "keep.txt").exists()


def test_resume_takes_newest_complete_checkpoint(tmp_path):
    for step, complete in [(10, True), (20, True), (30, False)]:
        folder = tmp_path / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        if complete:
            (folder / COMPLETE_MARKER).write_text(str(step))
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-20"]
    assert resume_checkpoint(tmp_path, "auto").name == "checkpoint-20"  # the half-written 30 is skipped
    assert resume_checkpoint(tmp_path, "never") is None
    with pytest.raises(UserError, match="does not exist"):
        resume_checkpoint(tmp_path, str(tmp_path / "nope"))


def test_publish_final_swaps_whole_folders(tmp_path):
    final, staging = tmp_path / "final", tmp_path / "final.staging"
    final.mkdir()
    (final / "model.safetensors").write_text("old")
    staging.mkdir()
    (staging / "model.safetensors").write_text("new")
    publish_final(staging, final)
    assert (final / "model.safetensors").read_text() == "new" and not staging.exists()


def test_tokenizer_recipe_reproduces_the_shipped_tokenizer(tmp_path):
    import subprocess
    import sys

    recipe = TOKENIZER.parent / "build_tokenizer.py"
    subprocess.run([sys.executable, str(recipe), str(tmp_path / "tok")], check=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "tok" / name).read_text() == (TOKENIZER / name).read_text()


def test_previous_checkpoint_survives_every_moment_of_a_save(tmp_path):
    """keep_last 1: while checkpoint N is written (before it is marked complete) N-1 is still complete.

    The probe runs after the trainer wrote checkpoint N and before it is marked; with the HF trainer's
    own rotation (save_total_limit) N-1 was already gone then, and a kill there left nothing to resume."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from tests.conftest import SFT_JOB, TINY_ARCH, job_dict
    from tuneyard.training.callbacks import CompleteCheckpointCallback
    from tuneyard.training.config import TrainSpec
    from tuneyard.training.trainer_setup import common_trainer_kwargs

    job = job_dict(
        SFT_JOB, tmp_path, training={"max_steps": 3, "batch_size": 2}, output={"save_steps": 1, "keep_last": 1}
    )
    spec = TrainSpec.model_validate({k: v for k, v in job.items() if k != "cluster"}).model_copy(
        update={"deepspeed": None}
    )
    args = TrainingArguments(**common_trainer_kwargs(spec, tmp_path, has_eval=False))
    config = AutoConfig.for_model(**{**TINY_ARCH, "vocab_size": 64})
    ids = torch.arange(16) % 64
    data = [{"input_ids": ids, "labels": ids}] * 8
    seen: list[list[str]] = []

    class Probe(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            seen.append([p.name for p in complete_checkpoints(tmp_path)])

    trainer = Trainer(
        model=AutoModelForCausalLM.from_config(config),
        args=args,
        train_dataset=data,
        callbacks=[Probe(), CompleteCheckpointCallback(tmp_path, keep_last=1)],
    )
    trainer.train()
    assert seen == [[], ["checkpoint-1"], ["checkpoint-2"]]
    assert [p.name for p in (tmp_path / "checkpoints").glob("checkpoint-*")] == ["checkpoint-3"]
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-3"]


def test_a_run_whose_checkpoints_cannot_fit_is_refused_before_it_starts(tmp_path):
    """A 0.9T-parameter architecture (counted on the meta device) cannot keep 2 checkpoints on this disk."""
    from tests.conftest import SFT_JOB, TINY_ARCH, job_dict
    from tuneyard.launch.config import job_from_dict
    from tuneyard.launch.disk_check import run_bytes
    from tuneyard.launch.run_job import run_job

    huge = {**TINY_ARCH, "hidden_size": 16384, "intermediate_size": 65536, "num_hidden_layers": 256}
    job = job_dict(SFT_JOB, tmp_path / "run", output={"save_steps": 10, "keep_last": 2})
    job["model"]["architecture"] = huge
    with pytest.raises(UserError, match=r"has .* free, but this run needs about .* TB: 2 checkpoint\(s\)") as info:
        run_job(job_from_dict(job), show_progress=False)
    assert "output.keep_last" in str(info.value) and not list((tmp_path / "run" / "logs").iterdir())
    # the arithmetic: weights (8 B) + Adam (12 B) per parameter per checkpoint, + the final fp32 weights
    assert run_bytes(10, adapter=False, checkpoints=2) == 2 * 10 * 20 + 10 * 4


@pytest.mark.parametrize("shard", [None, "200KB"])
def test_the_disk_check_counts_a_folders_parameters_from_its_safetensors_headers_as_the_model_does(tmp_path, shard):
    """One file or sharded with an index, tied embeddings stored once: the meta device's count, without its imports."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.conftest import TINY_ARCH
    from tuneyard.launch.disk_check import stored_parameter_count

    config = LlamaConfig(**{k: v for k, v in TINY_ARCH.items() if k != "model_type"}, vocab_size=300)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "model.safetensors.index.json").is_file() == bool(shard)
    with torch.device("meta"):
        expected = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    assert stored_parameter_count(tmp_path) == expected
    config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    config.save_pretrained(tmp_path)  # packed 4-bit elements say nothing about the count: the meta device counts
    assert stored_parameter_count(tmp_path) is None


def test_progress_line_says_what_start_up_is_doing_and_when_a_run_restarted(tmp_path):
    from tuneyard.launch.progress import progress_line
    from tuneyard.training.run_dir import read_status, set_status

    set_status(tmp_path, "tokenising the data (rank 0; cached for later runs)")
    assert read_status(tmp_path) == "tokenising the data (rank 0; cached for later runs)"
    assert progress_line([], 0.0, 12.0, read_status(tmp_path)) == (
        "starting workers: tokenising the data (rank 0; cached for later runs) ... 0:12"
    )
    records = [
        {"event": "start", "step": 0, "total_steps": 30, "time": 0.0},
        {"step": 10, "loss": 2.0, "time": 10.0, "tokens_per_s": 100.0},
        {"event": "start", "step": 5, "total_steps": 30, "time": 20.0},
        {"step": 15, "loss": 1.5, "time": 30.0, "tokens_per_s": 100.0},
    ]
    line = progress_line(records, 0.0, 40.0)
    assert line.startswith("step 15/30 [ 50%] | loss 1.500") and "ETA 0:15" in line
    assert line.endswith("restarted from step 5 after a lost worker")
    records.insert(3, {"event": "nonfinite", "step": 12, "in_a_row": 1, "time": 25.0})
    assert progress_line(records, 0.0, 40.0).endswith("after a lost worker | 1 NaN/inf step skipped")
