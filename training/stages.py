"""The stages a job can be, one `StageSpec` each: what the stage reads, what it trains, how it runs and how it is
scored. The job's config, the planner, the before/after figures, inference and the run path all read this table,
so adding a stage is one entry here plus its recipe (docs/extending.md walks through one).

The table is plain data: recipes and figure functions are named as `module` or `module:function` strings and
imported where they run, so this bottom layer imports none of the packages above it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tuneyard.training.errors import UserError

ALL_METHODS = ("full", "freeze", "lora", "qlora", "adalora", "ia3", "prompt_tuning", "prefix_tuning")
# the methods a TRL preference trainer takes: whole weights, or a LoRA adapter whose disabled base is the reference
WEIGHT_AND_LORA = ("full", "freeze", "lora", "qlora")
# the task heads: prompt tuning puts virtual tokens where a head reads the row (training/data/labels.py says why)
HEAD_METHODS = ("full", "freeze", "lora", "qlora", "adalora", "ia3")


@dataclass(frozen=True)
class StageSpec:
    """One stage: its data, sections, model head, reference, recipe, figures and the modes that apply to it."""

    name: str
    summary: str
    recipe: str  # the module whose `ray_worker(payload, rank)` a Ray worker runs, `run_in_process(payload)` --single
    formats: tuple[str, ...]  # the data.format values it reads
    preflight: str  # `module:function(job)`: the driver's checks of its rows (and rewards, teacher...)
    sections: tuple[str, ...] = ()  # the stage sections of the job it reads (rlhf/config.py StageSections)
    task: str = "causal-lm"  # the model head it trains: causal-lm, sequence-classification, token-classification
    sequences_per_row: int = 1  # 2: chosen and rejected go through the model in one batch
    labelled: bool = False  # its head predicts named labels, read from the rows (labels.json beside an adapter)
    peft_methods: tuple[str, ...] = WEIGHT_AND_LORA
    # the tokens it samples per prompt, from the job's stage sections (the sampling stages append completions)
    completion_length: Callable[[Any], int] | None = None
    # whether a frozen reference model runs beside the trained one, from the job's stage sections
    reference: Callable[[Any], bool] | None = None
    figures: str | None = None  # `module:function(job, model_path) -> {name: value}`: its before/after figures
    trainer_evaluates: bool = True  # held-out rows get the trainer's evaluation; False: scored on the driver only
    prompt_only: bool = False  # its trainer samples its own completions and reads only a prompt from each row
    tokenised_on_driver: bool = False  # rows tokenised (and packed) into a cache before any worker starts
    streaming: bool = False  # data.streaming: a plain-text corpus tokenised into shards by Ray tasks
    single: bool = True  # `--single` runs it in one process
    controller: bool = False  # a controller on the driver runs its roles as Ray actor groups (not one SPMD group)
    saved_models: int = 1  # models a checkpoint holds (PPO saves the critic beside the policy)

    @property
    def generates(self) -> bool:
        """Whether its final/ writes text (`tuneyard chat` and `generate` take it)."""
        return self.task == "causal-lm"

    def evaluates(self, data: Any) -> bool:
        """Whether the trainer evaluates held-out rows for a job's `data` section (data.eval or eval_fraction)."""
        return self.trainer_evaluates and (bool(data.eval) or data.eval_fraction > 0)

    def has_reference(self, sections: Any) -> bool:
        """Whether a frozen reference model runs beside the trained one under these stage sections."""
        return self.reference is not None and self.reference(sections)


STAGES: dict[str, StageSpec] = {}


def register_stage(spec: StageSpec) -> StageSpec:
    """Add a stage to the table."""
    STAGES[spec.name] = spec
    return spec


def stage_spec(name: str) -> StageSpec:
    """The registered stage, or an error that lists the registered names."""
    if name not in STAGES:
        raise UserError(f"stage: unknown stage '{name}'; registered: {', '.join(STAGES)}")
    return STAGES[name]


def stages_where(test: Callable[[StageSpec], bool]) -> tuple[str, ...]:
    """The names of the registered stages that pass `test`, in registration order."""
    return tuple(name for name, spec in STAGES.items() if test(spec))


CAUSAL_LM = "tuneyard.training.causal_lm_recipe"
TASK_HEAD = "tuneyard.training.task_head_recipe"
PREFERENCE = "tuneyard.rlhf.preference_recipe"
FIGURES = "tuneyard.launch.before_after"
CHECKS = "tuneyard.launch.preflight"

register_stage(
    StageSpec(
        name="pretrain",
        summary="continual pretraining: causal LM on raw text packed into fixed-length blocks",
        recipe=CAUSAL_LM,
        preflight=f"{CHECKS}:check_causal_lm_rows",
        formats=("text",),
        peft_methods=ALL_METHODS,
        tokenised_on_driver=True,
        streaming=True,
    )
)
register_stage(
    StageSpec(
        name="sft",
        summary="instruction tuning on chat or alpaca rows, loss on the assistant's tokens, packed rows",
        recipe=CAUSAL_LM,
        preflight=f"{CHECKS}:check_causal_lm_rows",
        formats=("messages", "alpaca", "sharegpt"),
        peft_methods=ALL_METHODS,
        figures=f"{FIGURES}:answer_accuracy_figures",
        tokenised_on_driver=True,
    )
)
register_stage(
    StageSpec(
        name="reward",
        summary="a reward model (one-output classifier) from preference pairs",
        recipe=PREFERENCE,
        preflight=f"{CHECKS}:check_preference_rows",
        formats=("preference",),
        task="sequence-classification",
        sequences_per_row=2,
        figures=f"{FIGURES}:reward_model_pair_figures",
    )
)
register_stage(
    StageSpec(
        name="dpo",
        summary="direct preference optimisation (and IPO, cDPO, RPO...) against a frozen reference",
        recipe=PREFERENCE,
        preflight=f"{CHECKS}:check_preference_rows",
        formats=("preference",),
        sections=("dpo",),
        sequences_per_row=2,
        reference=lambda s: not s.dpo.precompute_ref_log_probs,
        figures=f"{FIGURES}:preference_pair_figures",
    )
)
register_stage(
    StageSpec(
        name="kto",
        summary="Kahneman-Tversky optimisation on unpaired good/bad feedback",
        recipe=PREFERENCE,
        preflight=f"{CHECKS}:check_preference_rows",
        formats=("unpaired_preference", "preference"),
        sections=("kto",),
        reference=lambda s: not s.kto.precompute_ref_log_probs,
        figures=f"{FIGURES}:feedback_figures",
    )
)
register_stage(
    StageSpec(
        name="grpo",
        summary="group-relative policy optimisation with reward functions and/or a reward model",
        recipe=PREFERENCE,
        preflight=f"{CHECKS}:check_preference_rows",
        formats=("prompt", "preference"),
        sections=("grpo", "reward"),
        completion_length=lambda s: s.grpo.max_completion_length,
        reference=lambda s: s.grpo.beta > 0,
        figures=f"{FIGURES}:greedy_reward_figures",
        trainer_evaluates=False,
        prompt_only=True,
    )
)
register_stage(
    StageSpec(
        name="rloo",
        summary="REINFORCE leave-one-out online RL with reward functions and/or a reward model",
        recipe=PREFERENCE,
        preflight=f"{CHECKS}:check_preference_rows",
        formats=("prompt", "preference"),
        sections=("rloo", "reward"),
        completion_length=lambda s: s.rloo.max_completion_length,
        reference=lambda s: s.rloo.beta > 0,
        figures=f"{FIGURES}:greedy_reward_figures",
        trainer_evaluates=False,
        prompt_only=True,
    )
)
register_stage(
    StageSpec(
        name="ppo",
        summary="PPO with a critic: policy, critic, reference and reward roles as Ray actor groups",
        recipe="tuneyard.rlhf.ppo.controller",
        preflight=f"{CHECKS}:check_ppo_job",
        formats=("prompt",),
        sections=("ppo", "reward"),
        completion_length=lambda s: s.ppo.generation.max_new_tokens,
        figures=f"{FIGURES}:greedy_reward_figures",
        single=False,
        controller=True,
        saved_models=2,
    )
)
register_stage(
    StageSpec(
        name="distill",
        summary="on-policy distillation: a student learns a teacher's next-token distribution on its own samples",
        recipe=PREFERENCE,
        preflight=f"{CHECKS}:check_preference_rows",
        formats=("prompt", "messages"),
        sections=("distill",),
        completion_length=lambda s: s.distill.max_completion_length,
        figures=f"{FIGURES}:teacher_kl_figures",
        prompt_only=True,
    )
)
register_stage(
    StageSpec(
        name="classify",
        summary="sequence classification: a task head on an encoder or decoder",
        recipe=TASK_HEAD,
        preflight=f"{CHECKS}:check_task_head_rows",
        formats=("classification",),
        task="sequence-classification",
        labelled=True,
        peft_methods=(*HEAD_METHODS, "prefix_tuning", "feature-based"),
    )
)
register_stage(
    StageSpec(
        name="token-classify",
        summary="token classification (NER with BIO tags): a tag per word",
        recipe=TASK_HEAD,
        preflight=f"{CHECKS}:check_task_head_rows",
        formats=("bio",),
        task="token-classification",
        labelled=True,
        peft_methods=HEAD_METHODS,
    )
)
