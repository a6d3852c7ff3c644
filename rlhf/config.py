"""The job sections of the preference, RL and distillation stages: `dpo`, `kto`, `grpo`, `rloo`, `ppo`, `reward`
and `distill`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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


class KtoSection(BaseModel):
    """Kahneman-Tversky optimisation on unpaired feedback: beta, the loss (TRL's), the weights of the two kinds."""

    model_config = ConfigDict(extra="forbid")

    beta: float = Field(default=0.1, gt=0, description="higher: stay closer to the reference")
    loss_type: Literal["kto", "apo_zero_unpaired"] = "kto"
    desirable_weight: float = Field(default=1.0, gt=0, description="scales the loss of the desirable rows")
    undesirable_weight: float = Field(
        default=1.0,
        gt=0,
        description="scales the loss of the undesirable rows; KTO's paper keeps "
        "desirable_weight x desirable rows / (undesirable_weight x undesirable rows) in [1, 4/3]",
    )
    precompute_ref_log_probs: bool = False


class RewardFunction(BaseModel):
    """One named reward function of the registry (rlhf/rewards.py) and its weight."""

    model_config = ConfigDict(extra="forbid")

    name: str
    weight: float = 1.0


class RewardSection(BaseModel):
    """Where GRPO's and RLOO's rewards come from: a reward-model folder, and/or weighted named functions."""

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


class RlooSection(BaseModel):
    """REINFORCE leave-one-out: k samples per prompt, each baselined by the mean reward of the other k-1 (TRL's
    defaults, but a short completion as in `grpo`: the shipped tasks answer in a word)."""

    model_config = ConfigDict(extra="forbid")

    num_generations: int = Field(default=2, ge=2, description="k: samples per prompt (the baseline is the others')")
    max_completion_length: int = Field(default=16, ge=1)
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    beta: float = Field(default=0.05, ge=0, description="KL weight against the reference; 0 loads no reference")
    epsilon: float = Field(default=0.2, gt=0, description="clipping range")
    num_iterations: int = Field(default=1, ge=1, description="updates per generated batch")
    normalize_advantages: bool = Field(default=False, description="scale each generation batch's advantages to std 1")


class DistillSection(BaseModel):
    """On-policy distillation (TRL's DistillationTrainer, GKD with lmbda 1): the student samples completions of the
    prompts and learns the teacher's next-token distribution on them under a generalised Jensen-Shannon divergence."""

    model_config = ConfigDict(extra="forbid")

    teacher: str | None = Field(default=None, description="the teacher: a local model folder or a hub id")
    beta: float = Field(default=1.0, ge=0, le=1, description="0: forward KL, 0.5: JSD, 1: reverse KL (TRL's default)")
    temperature: float = Field(default=1.0, gt=0, description="for the student's sampling and both distributions")
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_completion_length: int = Field(default=16, ge=1, description="tokens the student samples per prompt")


class PreferenceSpec(BaseModel):
    """The sections a reward/dpo/kto/grpo/rloo/distill worker needs besides the training spec."""

    model_config = ConfigDict(extra="forbid")

    dpo: DpoSection = Field(default_factory=DpoSection)
    kto: KtoSection = Field(default_factory=KtoSection)
    grpo: GrpoSection = Field(default_factory=GrpoSection)
    rloo: RlooSection = Field(default_factory=RlooSection)
    reward: RewardSection = Field(default_factory=RewardSection)
    distill: DistillSection = Field(default_factory=DistillSection)


class KlSection(BaseModel):
    """The KL penalty against the reference: coefficient, estimator, and a fixed or adaptive controller."""

    model_config = ConfigDict(extra="forbid")

    coef: float = Field(default=0.05, ge=0, description="the KL coefficient (the start value when adaptive)")
    estimator: Literal["k1", "k2", "k3"] = Field(default="k1", description="per-token KL estimator (Schulman's k1-k3)")
    controller: Literal["fixed", "adaptive"] = "fixed"
    target: float = Field(default=6.0, gt=0, description="adaptive: the KL (summed over a response) to hold")
    horizon: int = Field(default=10000, ge=1, description="adaptive: samples over which the coefficient adapts")


class GenerationSection(BaseModel):
    """How the policy samples its responses during rollouts."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=1.0, ge=0, description="0: greedy")
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop_at_eos: bool = True


class RoleSection(BaseModel):
    """One PPO role group: its workers, what each gets, and its ZeRO stage."""

    model_config = ConfigDict(extra="forbid")

    workers: int = Field(default=1, ge=1)
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(default=0.0, ge=0)
    zero_stage: Literal[0, 1, 2, 3] | None = Field(
        default=None, description="policy/critic: defaults to deepspeed.zero_stage; reference/reward: 0 or 3"
    )


class CriticRoleSection(RoleSection):
    """The critic group, plus where its weights start."""

    init: Literal["auto", "reward_model", "policy"] = Field(
        default="auto",
        description="start from reward.model (OpenRLHF's default) or the policy's weights; "
        "auto: the reward model when it shares the policy's tokenizer, else the policy",
    )


class RolesSection(BaseModel):
    """The four PPO roles, each its own group of Ray actors and torch.distributed group."""

    model_config = ConfigDict(extra="forbid")

    policy: RoleSection = Field(default_factory=RoleSection)
    critic: CriticRoleSection = Field(default_factory=CriticRoleSection)
    reference: RoleSection = Field(default_factory=RoleSection)
    reward: RoleSection = Field(default_factory=RoleSection)


class PpoSection(BaseModel):
    """PPO with a critic: rollouts, KL-shaped rewards, GAE, clipped policy and value updates."""

    model_config = ConfigDict(extra="forbid")

    rollout_batch_size: int = Field(default=16, ge=1, description="prompts per iteration")
    samples_per_prompt: int = Field(default=1, ge=1)
    mini_batch_size: int = Field(default=16, ge=1, description="samples per optimizer step, over all policy ranks")
    micro_batch_size: int = Field(default=4, ge=1, description="samples per forward/backward on one rank")
    ppo_epochs: int = Field(default=1, ge=1)
    iterations: int = Field(default=0, ge=0, description="iterations to run; 0: `epochs` passes over the prompts")
    epochs: float = Field(default=1.0, gt=0, description="passes over the prompts when iterations is 0")
    clip_range: float = Field(default=0.2, gt=0)
    value_clip_range: float | None = Field(default=0.2, gt=0, description="none: unclipped value loss")
    gamma: float = Field(default=1.0, ge=0, le=1)
    lam: float = Field(default=0.95, ge=0, le=1, description="GAE lambda")
    whiten_advantages: bool = True
    entropy_coef: float = Field(default=0.0, ge=0)
    value_loss_coef: float = Field(default=1.0, gt=0, description="scales the critic's loss")
    critic_learning_rate: float | None = Field(default=None, gt=0, description="defaults to training.learning_rate")
    max_prompt_length: int = Field(default=128, ge=1, description="a longer prompt is an error, reported before start")
    save_every: int = Field(default=0, ge=0, description="checkpoint every N iterations (0: output.save_steps)")
    generation: GenerationSection = Field(default_factory=GenerationSection)
    kl: KlSection = Field(default_factory=KlSection)
    roles: RolesSection = Field(default_factory=RolesSection)
    colocate: Literal["all", "policy_reference", "none"] = "none"

    @model_validator(mode="after")
    def _batches_divide(self) -> PpoSection:
        samples = self.rollout_batch_size * self.samples_per_prompt
        if samples % self.mini_batch_size:
            raise ValueError(
                f"ppo.mini_batch_size ({self.mini_batch_size}) must divide the samples of an iteration "
                f"(rollout_batch_size x samples_per_prompt = {samples})"
            )
        for role in ("reference", "reward"):
            if getattr(self.roles, role).zero_stage not in (None, 0, 3):
                raise ValueError(f"ppo.roles.{role}.zero_stage: an inference role runs unsharded (0) or ZeRO-3 (3)")
        for role in ("policy", "critic", "reference", "reward"):
            ranks = getattr(self.roles, role).workers
            if samples % ranks:
                raise ValueError(
                    f"the {samples} samples of an iteration must split evenly over the {ranks} {role} worker(s)"
                )
            if role in ("reference", "reward"):
                continue
            per_rank, rest = divmod(self.mini_batch_size, ranks)
            if rest or per_rank % min(self.micro_batch_size, per_rank):
                raise ValueError(
                    f"ppo.mini_batch_size ({self.mini_batch_size}) must split evenly over the {ranks} {role} "
                    f"worker(s) into micro-batches of ppo.micro_batch_size ({self.micro_batch_size})"
                )
        return self
