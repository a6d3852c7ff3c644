"""RLOO and distillation through TRL's own trainers: the job sections and their errors, the prompt rows, and
learning under real Ray + DeepSpeed with 2 workers (RLOO: the sampled reward rises; distillation: the student's
KL to the teacher falls)."""

from __future__ import annotations

import json
import statistics

import pytest

from tests.conftest import EXAMPLES, TINY_ARCH, TOKENIZER, job_dict
from tests.test_rlhf import PREFERENCE_JOB
from tuneyard.launch.config import job_from_dict
from tuneyard.launch.preflight import preflight
from tuneyard.launch.run_job import run_job
from tuneyard.rlhf.trl_rows import to_trl_rows
from tuneyard.training.errors import UserError
from tuneyard.training.metrics import read_metrics

DATA = EXAMPLES / "data"
RLOO_JOB = {
    **PREFERENCE_JOB,
    "stage": "rloo",
    "data": {
        **PREFERENCE_JOB["data"],
        "format": "prompt",
        "train": str(DATA / "last-word-prompts-train.jsonl"),
        "eval": str(DATA / "last-word-prompts-eval.jsonl"),
    },
    "reward": {"functions": [{"name": "last_word_exact"}, {"name": "one_word", "weight": 0.2}]},
}
# the student is smaller than the teacher (the tiny Llama: 2 layers of width 64) and shares its tokenizer
STUDENT_ARCH = {**TINY_ARCH, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
STUDENT_ARCH.update(num_attention_heads=2, num_key_value_heads=1)
DISTILL_JOB = {
    **PREFERENCE_JOB,
    "stage": "distill",
    "model": {"init": "scratch", "tokenizer": str(TOKENIZER), "architecture": STUDENT_ARCH},
    "data": {
        **PREFERENCE_JOB["data"],
        "format": "messages",
        "train": str(DATA / "last-word-train.jsonl"),
        "eval": str(DATA / "last-word-eval.jsonl"),
    },
    "deepspeed": {"zero_stage": 2},
    "distill": {"teacher": "set-by-test", "max_completion_length": 8},
}
USER = {"role": "user", "content": "Say the last word: red fox"}


def test_rloo_and_distill_read_prompts_only():
    messages = {"messages": [USER, {"role": "assistant", "content": "fox"}]}
    assert to_trl_rows("distill", [messages], conversational=True) == [{"prompt": [USER]}]
    assert to_trl_rows("distill", [messages], conversational=False) == [{"prompt": USER["content"]}]
    pair = {"prompt": [USER], "chosen": "fox", "rejected": "red"}
    assert to_trl_rows("rloo", [pair], conversational=True) == [{"prompt": [USER]}]


def test_rloo_section_keeps_trl_defaults_and_refuses_unknown_keys(tmp_path):
    from trl import RLOOConfig

    job = job_from_dict(job_dict(RLOO_JOB, tmp_path / "run"))
    trl = RLOOConfig(output_dir=str(tmp_path), use_cpu=True)
    for key in ("num_generations", "beta", "epsilon", "temperature", "top_p", "num_iterations", "normalize_advantages"):
        assert getattr(job.rloo, key) == getattr(trl, key), key
    assert "rloo" in job.identity_dump() and "grpo" not in job.identity_dump()
    with pytest.raises(UserError, match=r"unknown key 'rloo.k'; valid keys here: num_generations"):
        job_from_dict(job_dict(RLOO_JOB, tmp_path / "run", rloo={"k": 4}))
    with pytest.raises(UserError, match=r"unknown key 'distill.lmbda'"):
        job_from_dict(job_dict(DISTILL_JOB, tmp_path / "run", distill={"lmbda": 0.5}))


def test_rloo_needs_rewards(tmp_path, sft_base):
    job = job_dict(RLOO_JOB, tmp_path / "run")
    job["model"] = {"name_or_path": sft_base}
    job["reward"] = {"functions": []}
    with pytest.raises(UserError, match="stage rloo needs rewards: set reward.functions"):
        preflight(job_from_dict(job))
    job["reward"] = {"functions": [{"name": "nope"}]}
    with pytest.raises(UserError, match="unknown reward function 'nope'"):
        preflight(job_from_dict(job))


def test_distill_needs_an_existing_teacher(tmp_path):
    job = job_dict(DISTILL_JOB, tmp_path / "run")
    job["distill"] = {}
    with pytest.raises(UserError, match="stage distill needs a teacher: set distill.teacher"):
        job_from_dict(job)
    job["distill"] = {"teacher": str(tmp_path / "no-such-teacher")}
    with pytest.raises(UserError, match=r"distill.teacher: '.*no-such-teacher' does not exist"):
        preflight(job_from_dict(job))


def test_a_teacher_with_another_tokenizer_is_refused(tmp_path, sft_base):
    """A teacher whose vocabulary differs (here: the tiny tokenizer with tokens added) is refused before start."""
    import shutil

    from transformers import AutoTokenizer

    teacher = tmp_path / "teacher"
    shutil.copytree(sft_base, teacher)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    tokenizer.add_tokens(["<extra_a>", "<extra_b>"])
    tokenizer.save_pretrained(teacher)
    job = job_dict(DISTILL_JOB, tmp_path / "run", distill={"teacher": str(teacher)})
    with pytest.raises(UserError, match=r"distill.teacher: the tokenizer of '.*teacher' differs from the student's"):
        preflight(job_from_dict(job))


def test_messages_rows_are_checked_before_start(tmp_path, sft_base):
    train = tmp_path / "chat.jsonl"
    train.write_text(json.dumps({"messages": [USER]}) + "\n")
    job = job_dict(
        DISTILL_JOB, tmp_path / "run", data={"train": str(train), "eval": None}, distill={"teacher": sft_base}
    )
    with pytest.raises(UserError, match=r"chat.jsonl:1"):
        preflight(job_from_dict(job))
    prefs = job_dict(DISTILL_JOB, tmp_path / "run", data={"format": "preference"}, distill={"teacher": sft_base})
    with pytest.raises(UserError, match="stage distill reads data.format prompt or messages"):
        preflight(job_from_dict(prefs))


def test_plan_holds_the_teacher_beside_the_smaller_student(tmp_path, sft_base):
    from tuneyard.launch.plan import Hardware, plan_job

    job = job_from_dict(job_dict(DISTILL_JOB, tmp_path / "run", distill={"teacher": sft_base}))
    (device,) = plan_job(job, Hardware()).devices
    parts = dict(device.parts)
    assert list(parts) == ["rank", "teacher"]
    assert parts["teacher"].weights > 2 * parts["rank"].weights  # the teacher's own (larger) config, not the student's
    rloo = job_from_dict(job_dict(RLOO_JOB, tmp_path / "rloo", model={"name_or_path": sft_base}))
    assert [name for name, _ in plan_job(rloo, Hardware()).devices[0].parts] == ["rank", "reference"]


@pytest.mark.integration
def test_rloo_raises_the_sampled_reward(ray_session, sft_base, tmp_path):
    """RLOO on 2 workers under ZeRO-3 from the weakly tuned SFT model (TRL's KL weight 0.05, so a reference too):
    the sampled reward of the last 30 steps beats the first 30, and the greedy reward does not fall.

    learning_rate 3e-4: RLOO's loss weighs each sequence's summed log-prob, so 1e-3 (GRPO's rate here) overshoots."""
    job = job_dict(
        RLOO_JOB,
        tmp_path / "rloo",
        training={"learning_rate": 3e-4, "lr_scheduler": "constant", "max_steps": 150, "batch_size": 16},
        rloo={"num_generations": 8, "max_completion_length": 8, "temperature": 0.7},
    )
    job["model"] = {"name_or_path": sft_base}
    result = run_job(job_from_dict(job), show_progress=False)
    records = read_metrics(result.run_dir / "metrics.jsonl")
    rewards = [r["reward"] for r in records if "reward" in r]
    assert len(rewards) == 150
    first, last = statistics.mean(rewards[:30]), statistics.mean(rewards[-30:])
    assert last > first + 0.05, (first, last)
    greedy = result.figures["greedy reward"]
    assert greedy[1] >= greedy[0] - 0.05, result.figure()
    assert any(r.get("kl", 0) > 0 for r in records)  # the reference is loaded and the KL term is live
    assert (result.run_dir / "final" / "model.safetensors").exists()


@pytest.mark.integration
def test_distill_brings_a_smaller_student_to_the_teacher(ray_session, sft_base, tmp_path):
    """On-policy distillation (TRL's defaults: reverse KL, temperature 1) of a 1-layer student from the SFT model
    on 2 workers under ZeRO-2: the student's KL to the teacher on the held-out answers falls."""
    job = job_dict(
        DISTILL_JOB,
        tmp_path / "distill",
        training={"learning_rate": 3e-3, "max_steps": 120},
        distill={"teacher": sft_base},
    )
    result = run_job(job_from_dict(job), show_progress=False)
    before, after = result.figures["KL to teacher"]
    assert after < before - 0.5, result.figure()
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(result.run_dir / "final")
    assert student.config.num_hidden_layers == 1  # final/ is the student, not the teacher


def test_distill_forward_kl_in_one_process(sft_base, tmp_path):
    """`--single` (no Ray, no DeepSpeed) on prompt rows with distill.beta 0, the forward KL the figure measures."""
    job = job_dict(
        DISTILL_JOB,
        tmp_path / "forward",
        training={"learning_rate": 3e-3, "max_steps": 60},
        distill={"teacher": sft_base, "beta": 0.0},
        cluster={"workers": 1},
    )
    # prompt rows: the figure is measured on the teacher's own (greedy) answers
    job["data"].update(format="prompt", train=RLOO_JOB["data"]["train"], eval=RLOO_JOB["data"]["eval"])
    result = run_job(job_from_dict(job), show_progress=False, single=True)
    before, after = result.figures["KL to teacher"]
    assert after < before - 0.5, result.figure()
