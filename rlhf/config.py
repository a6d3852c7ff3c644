"""The job sections of the preference stages: `dpo`, `grpo` and `reward`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DPO_LOSSES = Literal[
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
]


class DpoSection(BaseModel):
    """Direct preference optimisation: beta, the loss (TRL's), label smoothing (cDPO with sigmoid)."""

    model_config = ConfigDict(extra="forbid")

    beta: float = Field(default=0.1, gt=0)
    loss_type: DPO_LOSSES = "sigmoid"
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5, description="sigmoid: cDPO's assumed flip rate")
    sft_weight: float = Field(default=0.0, ge=0, description="adds NLL on the chosen answers (RPO) at this weight")
    precompute_ref_log_probs: bool = False
    max_prompt_length: int | None = None


class RewardFunction(BaseModel):
    """One named reward function of the registry (rlhf/rewards.py) and its weight."""

    model_config = ConfigDict(extra="forbid")

    name: str
    weight: float = 1.0


class RewardSection(BaseModel):
    """Where GRPO's rewards come from: a reward-model folder, and/or weighted named functions."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description="a sequence-classification folder, e.g. runs/reward/final")
    model_weight: float = 1.0
    functions: list[RewardFunction] = Field(default_factory=list)


class GrpoSection(BaseModel):
    """Group-relative policy optimisation: group size, sampling, KL weight."""

    model_config = ConfigDict(extra="forbid")

    num_generations: int = Field(default=8, ge=2)
    max_completion_length: int = Field(default=16, ge=1)
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    beta: float = Field(default=0.0, ge=0, description="KL weight against the reference; 0 loads no reference")
    epsilon: float = Field(default=0.2, gt=0, description="clipping range")


class PreferenceSpec(BaseModel):
    """The preference sections a reward/dpo/grpo worker needs besides the training spec."""

    model_config = ConfigDict(extra="forbid")

    dpo: DpoSection = Field(default_factory=DpoSection)
    grpo: GrpoSection = Field(default_factory=GrpoSection)
    reward: RewardSection = Field(default_factory=RewardSection)
