"""Before/after figures on the driver: scored for a model the driver's CPU can hold, skipped with a reason above."""

from __future__ import annotations

import logging

from tests.conftest import SFT_JOB, job_dict
from tests.test_plan import LLAMA_70B
from tuneyard.launch.before_after import stage_figures
from tuneyard.launch.config import job_from_dict


def test_a_small_model_gets_its_figure(tmp_path):
    job = job_from_dict(job_dict(SFT_JOB, tmp_path / "run", data={"eval_generations": 4}))
    figures = stage_figures(job, None)
    assert list(figures) == ["task acc."] and 0.0 <= figures["task acc."] <= 1.0


def test_a_70b_model_is_not_loaded_on_the_driver(tmp_path, caplog):
    job = job_dict(SFT_JOB, tmp_path / "run", data={"eval_generations": 4})
    job["model"]["architecture"] = LLAMA_70B  # built whole in fp32 it would take 276 GB: this machine has 24
    with caplog.at_level(logging.WARNING, logger="tuneyard.launch.before_after"):
        assert stage_figures(job_from_dict(job), None) == {}  # counted on the meta device, never built
    (message,) = [r.getMessage() for r in caplog.records if r.name == "tuneyard.launch.before_after"]
    assert message.startswith(
        "before/after figures skipped: they are scored on this (the driver's) CPU with the model whole in fp32, "
        "and 69.0B parameters would take 276 GB of its memory (the bound is 3B)."
    ), message


def test_a_big_teacher_keeps_a_small_students_figures_off_the_driver(tmp_path, caplog):
    """distill scores the teacher beside the student: a 70B teacher (a config.json alone) counts toward the bound."""
    import json

    from tests.test_rloo_distill import DISTILL_JOB

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps(LLAMA_70B))
    job = job_dict(DISTILL_JOB, tmp_path / "run", distill={"teacher": str(teacher)})
    with caplog.at_level(logging.WARNING, logger="tuneyard.launch.before_after"):
        assert stage_figures(job_from_dict(job), None) == {}
    (message,) = [r.getMessage() for r in caplog.records if r.name == "tuneyard.launch.before_after"]
    assert "69.0B parameters" in message, message
