"""KTO on unpaired feedback: the row format and its errors, the TRL rows, and learning under real Ray +
DeepSpeed ZeRO-3 with 2 workers (the desirable-minus-undesirable gap widens)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import EXAMPLES, TINY_ARCH, TOKENIZER, job_dict
from tests.test_rlhf import PREFERENCE_JOB
from tuneyard.launch.config import job_from_dict
from tuneyard.launch.preflight import preflight
from tuneyard.launch.run_job import run_job
from tuneyard.rlhf.trl_rows import to_trl_rows
from tuneyard.training.data.formats import normalize_row
from tuneyard.training.errors import UserError
from tuneyard.training.metrics import figure_panels, read_metrics

DATA = EXAMPLES / "data"
# the DPO test's job on the same prompts, the pairs taken apart into feedback rows
KTO_JOB = {
    **PREFERENCE_JOB,
    "stage": "kto",
    "data": {
        **PREFERENCE_JOB["data"],
        "format": "unpaired_preference",
        "train": str(DATA / "last-word-feedback-train.jsonl"),
        "eval": str(DATA / "last-word-feedback-eval.jsonl"),
    },
}
PROMPT = [{"role": "user", "content": "Say the last word: red fox"}]


def scratch_job(tmp_path, train: str, **sections: dict) -> dict:
    """A KTO job on the tiny scratch model: preflight reads the data without any trained model on disk."""
    job = job_dict(KTO_JOB, tmp_path / "run", **sections)
    job["data"].update(train=train, eval=None)
    job["model"] = {"init": "scratch", "tokenizer": str(TOKENIZER), "architecture": TINY_ARCH}
    return job


def write_rows(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_feedback_rows_normalise():
    row = {"prompt": "q", "completion": "a", "label": False}
    assert normalize_row(row, "unpaired_preference", "f:1") == row
    chat = {"prompt": PROMPT, "completion": [{"role": "assistant", "content": "fox"}], "label": True}
    assert normalize_row(chat, "unpaired_preference", "f:1") == chat


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "q", "completion": "a", "label": "true"}, r"feedback.jsonl:3: field 'label' must be true or false"),
        ({"prompt": "q", "completion": "a", "label": 1}, r"feedback.jsonl:3: field 'label' .* got int 1"),
        ({"prompt": "q", "label": True}, r"feedback.jsonl:3: row is missing field 'completion'"),
        ({"prompt": "q", "completion": "a"}, r"feedback.jsonl:3: row is missing field 'label'"),
        ({"prompt": "q", "completion": " ", "label": True}, r"feedback.jsonl:3: field 'completion' is empty"),
    ],
)
def test_bad_feedback_is_refused_before_start_naming_file_and_line(tmp_path, row, message):
    good = {"prompt": "q", "completion": "a", "label": True}
    train = write_rows(tmp_path / "feedback.jsonl", [good, {**good, "label": False}, row])
    with pytest.raises(UserError, match=message):
        preflight(job_from_dict(scratch_job(tmp_path, train)))


def test_kto_refuses_a_batch_of_one_and_other_formats(tmp_path):
    train = str(DATA / "last-word-feedback-train.jsonl")
    with pytest.raises(UserError, match="training.batch_size must be at least 2"):
        job_from_dict(scratch_job(tmp_path, train, training={"batch_size": 1}))
    job_from_dict(scratch_job(tmp_path, train, training={"batch_size": 1}, kto={"loss_type": "apo_zero_unpaired"}))
    prompts = scratch_job(tmp_path, str(DATA / "last-word-prompts-train.jsonl"), data={"format": "prompt"})
    with pytest.raises(UserError, match="stage kto reads data.format unpaired_preference or preference"):
        preflight(job_from_dict(prompts))


def test_preference_pairs_become_one_row_of_each_kind():
    pair = {"prompt": "Say the last word: red fox", "chosen": "fox", "rejected": "red"}
    rows = to_trl_rows("kto", [pair], conversational=True)
    assert [(r["completion"][0]["content"], r["label"]) for r in rows] == [("fox", True), ("red", False)]
    assert rows[0]["prompt"] == PROMPT


def test_shipped_feedback_is_the_preference_pairs_taken_apart():
    def lines(name: str) -> list[dict]:
        return [json.loads(line) for line in (DATA / name).read_text().splitlines()]

    feedback, pairs = lines("last-word-feedback-eval.jsonl"), lines("last-word-pref-eval.jsonl")
    assert len(feedback) == 2 * len(pairs) and sum(r["label"] for r in feedback) == len(pairs)
    key = lambda prompt, answer: (prompt[0]["content"], answer[0]["content"])  # noqa: E731
    assert {key(r["prompt"], r["completion"]) for r in feedback if r["label"]} == {
        key(p["prompt"], p["chosen"]) for p in pairs
    }


@pytest.mark.integration
def test_kto_widens_the_desirable_undesirable_gap(ray_session, sft_base, tmp_path):
    """KTO on 2 workers under ZeRO-3 from the weakly tuned SFT model: on the held-out feedback the log-prob gap
    between desirable and undesirable completions widens, and so does TRL's own reward margin (0 at the start,
    where the policy is its reference), without breaking the greedy answers.

    desirable_weight 1.33 is the top of the KTO paper's range for balanced data; at 1.0 with beta 0.1 this tiny
    model lowers every answer word, so its greedy answers fall apart into word fragments (52% -> 15-21%)."""
    beta = 1.0
    job = job_dict(
        KTO_JOB,
        tmp_path / "kto",
        training={"learning_rate": 1e-3, "max_steps": 60},
        kto={"beta": beta, "desirable_weight": 1.33},
    )
    job["model"] = {"name_or_path": sft_base}
    result = run_job(job_from_dict(job), show_progress=False)
    before, after = result.figures["logp gap"]
    assert beta * (after - before) > 0.4, result.figure()  # KTO's implicit reward gap on the eval rows
    greedy = result.figures["greedy desirable"]
    assert greedy[1] > greedy[0] - 0.15, result.figure()
    metrics = read_metrics(result.run_dir / "metrics.jsonl")
    evals = [r for r in metrics if "eval_rewards/margins" in r]
    assert abs(evals[0]["eval_rewards/margins"]) < 1e-4 and evals[-1]["eval_rewards/margins"] > 0.4, evals
    panels = [key for key, _ in figure_panels([metrics])]
    assert "rewards/margins" in panels and "kl" in panels  # `tuneyard plot` draws KTO's own figures
    assert (result.run_dir / "final" / "model.safetensors").exists()


@pytest.mark.integration
def test_lora_kto_with_precomputed_reference_on_two_workers(ray_session, sft_base, tmp_path):
    """The reference log-probs computed once by rank 0 reach rank 1 (TRL caches them next to the dataset's files,
    so the rows live in the run directory), and TRL's own adapter makes the reference the adapter-less base."""
    job = job_dict(
        KTO_JOB,
        tmp_path / "kto-lora",
        training={"learning_rate": 1e-3, "max_steps": 2},
        peft={"method": "lora", "r": 4, "alpha": 8},
        kto={"precompute_ref_log_probs": True},
    )
    job["data"]["eval"] = None
    job["model"] = {"name_or_path": sft_base}
    result = run_job(job_from_dict(job), show_progress=False)
    assert sorted(p.name for p in (result.run_dir / "datasets").iterdir()) == ["train"]
    assert (result.run_dir / "final" / "adapter_model.safetensors").exists()
    losses = [r["loss"] for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss" in r]
    assert losses[0] == pytest.approx(0.5)  # step 1: the policy is its reference, so each row's loss is 1 - sigmoid(0)


def test_progress_line_reads_kto_records():
    from tuneyard.launch.progress import progress_line

    start = {"event": "start", "step": 0, "total_steps": 10, "time": 0.0}
    step = {"step": 1, "loss": 0.5, "kl": 0.0, "rewards/margins": 0.1, "samples_per_s": 4.0, "time": 1.0}
    assert progress_line([start, step], 0.0, 2.0).startswith("step 1/10 [ 10%] | loss 0.500 | 4.0 samples/s")
