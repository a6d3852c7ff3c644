"""Every registered stage walks through what reads the registry: validation, the planner, the figures' choice,
the driver's checks, inference and the run path. A stage added to training/stages.py is walked here too."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, TINY_ARCH, TOKENIZER
from tuneyard.launch.config import OPTIONAL_SECTIONS, JobConfig, job_from_dict
from tuneyard.launch.inference import GENERATING_STAGES
from tuneyard.launch.plan import Hardware, plan_job
from tuneyard.training.config import ADAPTER_METHODS
from tuneyard.training.errors import UserError
from tuneyard.training.stages import ALL_METHODS, STAGES, StageSpec

# one shipped file of each data format
ROWS = {
    "text": "corpus.txt",
    "messages": "last-word-train.jsonl",
    "preference": "last-word-pref-train.jsonl",
    "unpaired_preference": "last-word-feedback-train.jsonl",
    "prompt": "last-word-prompts-train.jsonl",
    "classification": "sentiment-generated-train.jsonl",
    "bio": "ner-generated-train.jsonl",
}
GIB = 1024**3


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny causal model folder: a distillation teacher."""
    from tests.tiny_models import save_tiny_models

    return save_tiny_models(tmp_path_factory.mktemp("models"))["causal"]


def stage_job(spec: StageSpec, run_dir: Path, teacher: Path, **sections: dict) -> JobConfig:
    """The smallest valid job of a registered stage: a scratch tiny Llama on its first data format."""
    job = {
        "stage": spec.name,
        "model": {"init": "scratch", "tokenizer": str(TOKENIZER), "architecture": TINY_ARCH},
        "data": {"format": spec.formats[0], "train": str(EXAMPLES / "data" / ROWS[spec.formats[0]]), "max_length": 64},
        "training": {"batch_size": 2, "precision": "bf16"},
        "output": {"dir": str(run_dir)},
        "reward": {"functions": [{"name": "last_word_exact"}]},
        "distill": {"teacher": str(teacher)},
    }
    for name, values in sections.items():
        job.setdefault(name, {}).update(values)
    return job_from_dict(job)


def entry(name: str):
    """The object a registry string `module:function` names."""
    module, _, attribute = name.partition(":")
    return getattr(importlib.import_module(module), attribute)


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_validates_plans_and_names_functions_that_exist(name, tmp_path, teacher):
    spec = STAGES[name]
    job = stage_job(spec, tmp_path / "run", teacher)
    assert job.stage == name
    # identity keeps exactly the stage's own sections
    assert set(OPTIONAL_SECTIONS) & set(job.identity_dump()) == set(spec.sections)

    # the functions the registry names exist: the driver's checks, the figures, the recipe's entry points
    assert callable(entry(spec.preflight))
    if spec.figures:
        assert callable(entry(spec.figures))
    recipe = importlib.import_module(spec.recipe)
    if spec.controller:
        assert callable(recipe.run_ppo)
    else:
        assert callable(recipe.ray_worker) and callable(recipe.run_in_process)
    assert (name in GENERATING_STAGES) == (spec.task == "causal-lm")

    plan = plan_job(job, Hardware(gpu_memory=80 * GIB, gpus_per_node=1, nodes=1))
    assert plan.fits and plan.peak_gpu > 0
    if spec.controller:
        return
    completion = spec.completion_length(job) if spec.completion_length else 0
    rows = job.training.batch_size * spec.sequences_per_row
    assert f"micro-batch {rows} x {job.data.max_length + completion} tokens" in "\n".join(plan.summary)
    parts = [part for part, _ in plan.devices[0].parts]
    assert ("reference" in parts) == spec.has_reference(job), parts
    assert ("teacher" in parts) == ("distill" in spec.sections)


@pytest.mark.parametrize("name", [n for n, s in STAGES.items() if s.reference is not None])
def test_a_stage_with_a_reference_plans_it_only_when_it_runs_and_not_beside_an_adapter(name, tmp_path, teacher):
    spec = STAGES[name]
    full = stage_job(spec, tmp_path / "full", teacher)
    lora = stage_job(spec, tmp_path / "lora", teacher, peft={"method": "lora"})
    names = [
        [part for part, _ in plan_job(job, Hardware(gpu_memory=80 * GIB)).devices[0].parts] for job in (full, lora)
    ]
    assert ("reference" in names[0]) == spec.has_reference(full)
    assert "reference" not in names[1]  # the reference is the base with the adapter disabled: no second copy


@pytest.mark.parametrize("name", list(STAGES))
def test_a_peft_method_the_stage_does_not_train_with_is_refused_naming_the_stage(name, tmp_path, teacher):
    spec = STAGES[name]
    for method in ALL_METHODS + ("feature-based",):
        if method in spec.peft_methods:
            continue
        with pytest.raises(UserError, match=f"peft.method {method}"):
            stage_job(spec, tmp_path / method, teacher, peft={"method": method})


def test_the_registry_is_consistent():
    for name, spec in STAGES.items():
        assert spec.name == name and spec.summary and spec.formats
        assert spec.sequences_per_row in (1, 2)
        assert not (spec.streaming and not spec.tokenised_on_driver)  # streamed shards feed the driver's cache
        assert spec.single != spec.controller  # a controller's roles are Ray actors: never in one process
        assert set(spec.peft_methods) <= set(ALL_METHODS) | {"feature-based"}
        assert spec.labelled == (spec.task != "causal-lm" and spec.name != "reward")
    assert set(ADAPTER_METHODS) <= set(ALL_METHODS)
