"""Before/after figures of a job: the starting model and `final/` scored on held-out data, on the driver."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from tuneyard.launch.config import JobConfig
from tuneyard.training.data.sources import read_sources
from tuneyard.training.model import load_tokenizer
from tuneyard.training.stages import stage_spec

PERCENTAGES = {"task acc.", "greedy = chosen", "greedy desirable", "pair accuracy", "eval accuracy"}
EVAL_ROWS = 100
# The figures load the model whole, in fp32, on the driver's CPU: 3B parameters are 12 GB of the head node's
# memory and minutes of its CPU, before the first step and after the last. Above this the driver skips them.
DRIVER_FIGURES_MAX_PARAMS = 3_000_000_000

log = logging.getLogger(__name__)


def _load(job: JobConfig, model_path: str | None, task: str):
    """The job's starting model (seeded, for a scratch start) or a finished model folder, for inference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from tuneyard.training.model import load_model

    if model_path is None:
        # a scratch model's weights come from torch's generator alone; transformers' set_seed would import its
        # Trainer's modules (PEFT, bitsandbytes: a second of the driver's CPU while the workers start)
        torch.manual_seed(job.training.seed)
        return load_model(job.model, load_tokenizer(job.model, job.data.chat_template), task=task)
    if _is_prompt_adapter(model_path):  # transformers applies weight adapters (LoRA...) itself, not virtual tokens
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(model_path)
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    return auto.from_pretrained(model_path)


def _is_prompt_adapter(model_path: str) -> bool:
    """Whether a model folder holds a prompt or prefix tuning adapter (PEFT's prompt learning)."""
    import json

    config = Path(model_path) / "adapter_config.json"
    return config.is_file() and json.loads(config.read_text()).get("peft_type") in ("PROMPT_TUNING", "PREFIX_TUNING")


def _eval_rows(job: JobConfig) -> list[dict]:
    count = job.data.eval_generations or EVAL_ROWS
    return read_sources(job.data.eval, job.data, job.training.seed, "eval")[:count] if job.data.eval else []


def stage_figures(job: JobConfig, model_path: str | None) -> dict[str, float]:
    """Named figures of one model for the job's stage (empty when the job has no held-out data)."""
    figures = stage_spec(job.stage).figures
    rows = _eval_rows(job)
    if figures is None or not rows:
        return {}
    module, _, function = figures.partition(":")
    return getattr(importlib.import_module(module), function)(job, model_path, rows)


def _scoring_tokenizer(job: JobConfig):
    """The job's tokenizer, or None when the model is too big to score on the driver."""
    tokenizer = load_tokenizer(job.model, job.data.chat_template)
    return None if too_big_for_the_driver(job, len(tokenizer)) else tokenizer


def answer_accuracy_figures(job: JobConfig, model_path: str | None, rows: list[dict]) -> dict[str, float]:
    """sft with data.eval_generations: the share of held-out prompts whose greedy answer is the reference."""
    if not job.data.eval_generations or (tokenizer := _scoring_tokenizer(job)) is None:
        return {}
    from tuneyard.training.answer_accuracy import exact_match_accuracy

    return {"task acc.": exact_match_accuracy(_load(job, model_path, "causal-lm"), tokenizer, rows)}


def reward_model_pair_figures(job: JobConfig, model_path: str | None, rows: list[dict]) -> dict[str, float]:
    """A reward model: how often it scores the chosen answer above the rejected one, and by what margin."""
    if (tokenizer := _scoring_tokenizer(job)) is None:
        return {}
    from tuneyard.rlhf.preference_eval import reward_model_figures

    return reward_model_figures(_load(job, model_path, "sequence-classification"), tokenizer, rows)


def preference_pair_figures(job: JobConfig, model_path: str | None, rows: list[dict]) -> dict[str, float]:
    """A policy on preference pairs: its log-prob margin of chosen over rejected, and its greedy answers."""
    if (tokenizer := _scoring_tokenizer(job)) is None:
        return {}
    from tuneyard.rlhf.preference_eval import preference_figures

    return preference_figures(_load(job, model_path, "causal-lm"), tokenizer, rows)


def feedback_figures(job: JobConfig, model_path: str | None, rows: list[dict]) -> dict[str, float]:
    """A policy on unpaired feedback: how it scores the desirable and undesirable completions."""
    if (tokenizer := _scoring_tokenizer(job)) is None:
        return {}
    from tuneyard.rlhf import preference_eval

    return preference_eval.feedback_figures(_load(job, model_path, "causal-lm"), tokenizer, rows)


def greedy_reward_figures(job: JobConfig, model_path: str | None, rows: list[dict]) -> dict[str, float]:
    """The online RL stages: the reward functions' score of the greedy answers to held-out prompts, and the task's
    accuracy where the first function is a 0/1 check."""
    spec = stage_spec(job.stage)
    if not job.reward.functions or spec.completion_length is None or (tokenizer := _scoring_tokenizer(job)) is None:
        return {}
    from tuneyard.rlhf.preference_eval import greedy_answer_figures
    from tuneyard.rlhf.rewards import lookup

    functions = [(lookup(f.name), f.weight) for f in job.reward.functions]
    model = _load(job, model_path, "causal-lm")
    length = spec.completion_length(job)
    environment = job.ppo.environment
    if job.stage != "ppo" or not environment.multi_turn:
        return greedy_answer_figures(model, tokenizer, rows, functions, length)
    from tuneyard.rlhf.ppo.episodes import greedy_episodes

    model.eval()
    replies, episodes = greedy_episodes(model, tokenizer, rows, environment, length)
    figures = greedy_answer_figures(model, tokenizer, rows, functions, length, replies)
    return {**figures, **{f"greedy {key.replace('_', ' ')}": value for key, value in episodes.items()}}


def teacher_kl_figures(job: JobConfig, model_path: str | None, rows: list[dict]) -> dict[str, float]:
    """Distillation: the student's per-token KL to the teacher over answers to held-out prompts."""
    if not job.distill.teacher or (tokenizer := _scoring_tokenizer(job)) is None:
        return {}
    from transformers import AutoModelForCausalLM

    from tuneyard.rlhf.preference_eval import teacher_kl

    teacher = AutoModelForCausalLM.from_pretrained(job.distill.teacher)
    student = _load(job, model_path, "causal-lm")
    return {"KL to teacher": teacher_kl(student, teacher, tokenizer, rows, job.distill.max_completion_length)}


def too_big_for_the_driver(job: JobConfig, vocab_size: int) -> bool:
    """Whether the model is too big to score on the driver's CPU (counted on the meta device); says so if it is."""
    from tuneyard.launch.disk_check import parameter_count

    spec = job.train_spec()
    count = parameter_count(spec, vocab_size)
    if "distill" in stage_spec(job.stage).sections and job.distill.teacher:  # scored beside the student
        count += parameter_count(spec.model_copy(update={"model": spec.model.loading(job.distill.teacher)}), vocab_size)
    if count <= DRIVER_FIGURES_MAX_PARAMS:
        return False
    log.warning(
        "before/after figures skipped: they are scored on this (the driver's) CPU with the model whole in fp32, "
        "and %.1fB parameters would take %.0f GB of its memory (the bound is %.0fB). The trainer's own evaluation "
        "(eval loss, and the stage's eval metrics in metrics.jsonl) still runs on the workers; score final/ on a "
        "GPU machine with `tuneyard generate` if you need the answers",
        count / 1e9,
        count * 4 / 1e9,
        DRIVER_FIGURES_MAX_PARAMS / 1e9,
    )
    return True


def starting_point(job: JobConfig) -> str | None:
    """The folder the job starts from, or None for a scratch model."""
    return job.model.name_or_path if job.model.init == "pretrained" else None


def format_figures(figures: dict[str, tuple[float, float]]) -> list[str]:
    """`  name   before -> after` lines, percentages where the figure is a share."""
    lines = []
    for name, (before, after) in figures.items():
        if name in PERCENTAGES:
            lines.append(f"  {name:16s}{before:8.1%} -> {after:7.1%}")
        else:
            lines.append(f"  {name:16s}{before:8.3f} -> {after:7.3f}")
    return lines


def final_folder(run_dir: Path) -> str:
    """The finished model folder of a run."""
    return str(Path(run_dir) / "final")
