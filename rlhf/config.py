"""The job sections of the preference, RL and distillation stages (`dpo`, `kto`, `grpo`, `rloo`, `ppo`, `reward`,
`distill`), gathered in `StageSections`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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

    beta: float = Field(default=0.1, gt=0, description="DPO's beta: higher keeps the policy closer to the reference")
    loss_type: DPO_LOSSES = Field(
        default="sigmoid", description="TRL's DPO loss: sigmoid (DPO), ipo, hinge, robust, ... (any TRL names)"
    )
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5, description="sigmoid: cDPO's assumed flip rate")
    sft_weight: float = Field(default=0.0, ge=0, description="adds NLL on the chosen answers (RPO) at this weight")
    precompute_ref_log_probs: bool = Field(
        default=False,
        description="score the pairs with the reference once before training, so no reference model stays loaded",
    )


class KtoSection(BaseModel):
    """Kahneman-Tversky optimisation on unpaired feedback: beta, the loss (TRL's), the weights of the two kinds."""

    model_config = ConfigDict(extra="forbid")

    beta: float = Field(default=0.1, gt=0, description="higher: stay closer to the reference")
    loss_type: Literal["kto", "apo_zero_unpaired"] = Field(
        default="kto", description="kto (with its KL term, from other rows of the batch) or apo_zero_unpaired (none)"
    )
    desirable_weight: float = Field(default=1.0, gt=0, description="scales the loss of the desirable rows")
    undesirable_weight: float = Field(
        default=1.0,
        gt=0,
        description="scales the loss of the undesirable rows; KTO's paper keeps "
        "desirable_weight x desirable rows / (undesirable_weight x undesirable rows) in [1, 4/3]",
    )
    precompute_ref_log_probs: bool = Field(
        default=False,
        description="score the rows with the reference once before training, so no reference model stays loaded",
    )


class RewardFunction(BaseModel):
    """One named reward function of the registry (rlhf/rewards.py) and its weight."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="a function registered in rlhf/rewards.py (@reward_function), e.g. last_word_exact")
    weight: float = Field(default=1.0, description="the reward is the sum of each function's score times its weight")


class RemoteReward(BaseModel):
    """A reward or verifier service over HTTP: one POST per answer, retried with backoff; an answer whose call
    still fails is left out of the loss (counted as reward_failures), never scored as 0."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        pattern=r"^https?://", description='the endpoint, http:// or https://; it answers a POST with {"reward": x}'
    )
    weight: float = Field(default=1.0, description="the service's reward is added at this weight")
    timeout_s: float = Field(default=10.0, gt=0, description="the longest one attempt may take")
    retries: int = Field(
        default=2, ge=0, description="attempts after the first, for timeouts, lost connections, HTTP 429 and 5xx"
    )
    backoff_s: float = Field(default=0.5, ge=0, description="the wait before retry k is backoff_s x 2^(k-1)")
    token_env: str | None = Field(
        default=None,
        description="the environment variable that holds a bearer token (sent as Authorization: Bearer; never logged)",
    )
    max_failed_frac: float = Field(
        default=0.2,
        ge=0,
        le=1,
        description="an iteration with a larger share of answers whose calls failed after their retries ends the "
        "run, naming the endpoint and the last error",
    )

    @field_validator("url")
    @classmethod
    def no_credentials_in_url(cls, url: str) -> str:
        # the job file is copied into the run folder and its values are logged: a secret has no place in it
        if "@" in url.split("://", 1)[1].split("/", 1)[0]:
            raise ValueError(
                "reward.remote.url carries credentials (user:password@), which would be written to the run folder; "
                "remove them and put a bearer token in an environment variable named by reward.remote.token_env"
            )
        return url


class RewardSection(BaseModel):
    """Where GRPO's, RLOO's and PPO's rewards come from: a reward-model folder, and/or weighted named functions."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description="a sequence-classification folder, e.g. runs/reward/final")
    model_weight: float = Field(default=1.0, description="the reward model's score is added at this weight")
    functions: list[RewardFunction] = Field(
        default_factory=list, description="named reward functions, each scoring one answer, summed by weight"
    )
    timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="ppo: the longest one call of a reward function (one answer) may take; a call that takes longer "
        "or raises ends the run naming the function and the prompt (it is never scored as 0)",
    )
    parallel_calls: int = Field(
        default=8, ge=1, description="ppo: reward function calls (one answer each) that run at once, in threads"
    )
    remote: RemoteReward | None = Field(
        default=None, description="ppo: a reward or verifier service over HTTP, its score added at its weight"
    )


class GrpoSection(BaseModel):
    """Group-relative policy optimisation: group size, sampling, KL weight."""

    model_config = ConfigDict(extra="forbid")

    num_generations: int = Field(
        default=8, ge=2, description="answers sampled per prompt: the group each answer is measured against"
    )
    max_completion_length: int = Field(default=16, ge=1, description="tokens an answer may have")
    temperature: float = Field(default=1.0, gt=0, description="sampling temperature of the answers")
    top_p: float = Field(default=1.0, gt=0, le=1, description="nucleus sampling of the answers (1: off)")
    beta: float = Field(default=0.0, ge=0, description="KL weight against the reference; 0 loads no reference")
    epsilon: float = Field(default=0.2, gt=0, description="clipping range")


class RlooSection(BaseModel):
    """REINFORCE leave-one-out: k samples per prompt, each baselined by the mean reward of the other k-1 (TRL's
    defaults, but a short completion as in `grpo`: the shipped tasks answer in a word)."""

    model_config = ConfigDict(extra="forbid")

    num_generations: int = Field(default=2, ge=2, description="k: samples per prompt (the baseline is the others')")
    max_completion_length: int = Field(default=16, ge=1, description="tokens an answer may have")
    temperature: float = Field(default=1.0, gt=0, description="sampling temperature of the answers")
    top_p: float = Field(default=1.0, gt=0, le=1, description="nucleus sampling of the answers (1: off)")
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
    top_p: float = Field(default=1.0, gt=0, le=1, description="nucleus sampling of the student's answers (1: off)")
    max_completion_length: int = Field(default=16, ge=1, description="tokens the student samples per prompt")


class KlSection(BaseModel):
    """The KL penalty against the reference: coefficient, estimator, where it enters, and a fixed or adaptive
    controller."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)

    coef: float = Field(default=0.05, ge=0, description="the KL coefficient (the start value when adaptive)")
    estimator: Literal["k1", "k2", "k3"] = Field(
        default="k1", description="per-token KL estimator (Schulman's k1-k3); k3 by default when `in` is loss"
    )
    in_: Literal["reward", "loss"] = Field(
        default="reward",
        alias="in",
        description="reward: -coef x KL in each token's reward (PPO's classic shaping); loss: coef x the KL estimate "
        "added to the policy loss, its gradient taken through the policy's log-probs (as GRPO does; use k3)",
    )
    clamp: float | None = Field(
        default=None, gt=0, description="clamp each token's KL estimate to +-clamp (none: unclamped; OpenRLHF: 10)"
    )
    controller: Literal["fixed", "adaptive"] = Field(
        default="fixed",
        description="fixed: coef throughout; adaptive: coef is scaled each iteration toward `target` KL over `horizon` "
        "samples",
    )
    target: float = Field(default=6.0, gt=0, description="adaptive: the KL (summed over a response) to hold")
    horizon: int = Field(default=10000, ge=1, description="adaptive: samples over which the coefficient adapts")

    @model_validator(mode="after")
    def _k3_in_the_loss(self) -> KlSection:
        # as a loss, k1's gradient only pushes the sampled tokens down; k3 is GRPO's unbiased, non-negative choice
        if self.in_ == "loss" and "estimator" not in self.model_fields_set:
            self.estimator = "k3"
        return self


class GenerationSection(BaseModel):
    """How the policy samples its responses during rollouts."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(
        default=16, ge=1, description="tokens an answer may have; one that reaches it before a stop is truncated"
    )
    temperature: float = Field(
        default=1.0, ge=0, description="0: greedy; every log-prob of the update is taken at this temperature"
    )
    top_p: float = Field(
        default=1.0, gt=0, le=1, description="nucleus sampling; the update scores the same nucleus it sampled from"
    )
    stop_at_eos: bool = Field(
        default=True,
        description="end an answer at the first stop id: the tokenizer's EOS, every eos_token_id of the model's "
        "generation_config.json and the chat template's end of turn (false: answers run to max_new_tokens)",
    )
    stop: list[str] = Field(
        default_factory=list,
        description="strings that also end an answer (both engines): it keeps the token that completes one",
    )
    engine: Literal["hf", "vllm"] = Field(
        default="hf",
        description="hf: Hugging Face generate inside the policy actors; vllm: vLLM engines as a role of their own "
        "(ppo.roles.rollout), the policy's weights synced into them after every update",
    )

    @model_validator(mode="after")
    def _a_temperature_both_engines_sample_at(self) -> GenerationSection:
        # vLLM raises a temperature below 0.01 to 0.01 and would sample from another distribution than the one scored
        if 0 < self.temperature < 0.01:
            raise ValueError(
                f"ppo.generation.temperature {self.temperature:g} is below 0.01, where vLLM samples at 0.01 instead: "
                "use 0 for greedy answers, or at least 0.01"
            )
        return self


class OverlongSection(BaseModel):
    """DAPO's treatment of answers that hit generation.max_new_tokens without a stop (truncated answers)."""

    model_config = ConfigDict(extra="forbid")

    filter: bool = Field(default=False, description="truncated answers are taken out of the policy and value loss")
    buffer: int = Field(
        default=0,
        ge=0,
        description="soft penalty: an answer longer than max_new_tokens - buffer tokens loses up to `penalty` of its "
        "reward, linearly over the buffer (0: no penalty)",
    )
    penalty: float = Field(default=1.0, gt=0, description="the penalty of an answer of max_new_tokens tokens")


class AsyncSection(BaseModel):
    """Rollouts generated ahead of training: the engines sample the next batches while the policy trains."""

    model_config = ConfigDict(extra="forbid")

    max_staleness: int = Field(
        default=0,
        ge=0,
        description="how many policy versions (iterations) a trained sample may lag the policy that trains on it: "
        "the engines run up to this many batches ahead; 0: generate, then train (the synchronous loop)",
    )
    partial_rollouts: bool = Field(
        default=False,
        description="sync the engines as soon as the policy has trained an iteration, interrupting the answers in "
        "flight and resuming them on the new weights (each token tagged with the version that drew it); false: the "
        "answers in flight finish first, and the engines sync once they are idle",
    )


class RoleSection(BaseModel):
    """One PPO role group: its workers, what each gets, and its ZeRO stage."""

    model_config = ConfigDict(extra="forbid")

    workers: int = Field(default=1, ge=1, description="Ray actors (ranks) of this role")
    cpus_per_worker: float = Field(default=1.0, gt=0, description="CPUs each actor asks for (its threads)")
    gpus_per_worker: float = Field(
        default=0.0, ge=0, description="GPUs each actor asks for (fractions share one GPU); > 0: NCCL"
    )
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


class RolloutRoleSection(BaseModel):
    """The vLLM rollout engines (ppo.generation.engine: vllm): how many, and what each one gets."""

    model_config = ConfigDict(extra="forbid")

    workers: int = Field(default=1, ge=1, description="engines; they take the prompts from one queue")
    groups_per_call: int | None = Field(
        default=None,
        ge=1,
        description="whole prompt groups (samples_per_prompt answers each) an engine takes from the queue per call; "
        "an engine answers as one batch what a call holds, and a free engine takes the next call (default: the whole "
        "batch with one engine, else the batch split in two calls per engine)",
    )
    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs one engine shards its model over")
    cpus_per_worker: float = Field(default=1.0, gt=0, description="CPUs each engine asks for")
    gpus_per_worker: float = Field(default=0.0, ge=0, description="on GPUs: tensor_parallel_size")
    gpu_memory_utilization: float = Field(
        default=0.5, gt=0, le=1, description="GPU: the share of its GPU memory an engine takes (weights + KV cache)"
    )
    kv_cache_gb: int = Field(default=1, ge=1, description="CPU: the KV cache an engine allocates, in GiB")

    @model_validator(mode="after")
    def _one_gpu_per_shard(self) -> RolloutRoleSection:
        if self.gpus_per_worker and self.gpus_per_worker != self.tensor_parallel_size:
            raise ValueError(
                f"ppo.roles.rollout.gpus_per_worker ({self.gpus_per_worker:g}) must equal its tensor_parallel_size "
                f"({self.tensor_parallel_size}): an engine holds one whole GPU per tensor-parallel shard"
            )
        return self


class RolesSection(BaseModel):
    """The PPO roles, each its own group of Ray actors (the trained and scoring roles with a torch.distributed
    group each)."""

    model_config = ConfigDict(extra="forbid")

    policy: RoleSection = Field(default_factory=RoleSection, description="the model being trained")
    critic: CriticRoleSection = Field(
        default_factory=CriticRoleSection, description="the value model (advantage gae only)"
    )
    reference: RoleSection = Field(
        default_factory=RoleSection,
        description="the frozen start, for the KL penalty (none with a LoRA/QLoRA policy: its base is the reference)",
    )
    reward: RoleSection = Field(default_factory=RoleSection, description="the reward model (with reward.model)")
    rollout: RolloutRoleSection = Field(
        default_factory=RolloutRoleSection, description="the vLLM engines (generation.engine: vllm)"
    )

    def zero_stage_of(self, role: str, job_zero_stage: int) -> int:
        """A role's ZeRO stage: its own `zero_stage`, else the job's `deepspeed.zero_stage` for the trained roles
        (policy, critic) and 0 for the inference roles (reference, reward: unsharded is their fast default)."""
        own = getattr(self, role).zero_stage
        if own is not None:
            return own
        return job_zero_stage if role in ("policy", "critic") else 0


class SandboxSection(BaseModel):
    """The limits a tool call runs under, in a process of its own (rlhf/sandbox.py)."""

    model_config = ConfigDict(extra="forbid")

    timeout_s: float = Field(default=5.0, gt=0, description="wall-clock seconds a tool call may take")
    memory_mb: int = Field(default=1024, ge=64, description="its address-space limit (RLIMIT_AS), MiB")
    cpu_s: float = Field(default=5.0, gt=0, description="CPU seconds it may use (RLIMIT_CPU)")
    command: list[str] = Field(
        default_factory=list,
        description="a command line the child's `python -m tuneyard.rlhf.sandbox_child` is appended to (a container "
        "or nsjail wrapper, for isolation of the network and filesystem); empty: run it directly",
    )


class EnvironmentSection(BaseModel):
    """The environment an episode runs in: one answer (single_turn), or turns with tool calls (tools)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="single_turn", description="a registered environment: single_turn, tools, or yours")
    max_turns: int = Field(default=1, ge=1, description="assistant turns an episode may take")
    max_tokens: int = Field(
        default=1024,
        ge=1,
        description="tokens an episode may hold after its prompt (its turns and the environment's messages); one "
        "whose next turn could pass it ends there",
    )
    tools: list[str] = Field(default_factory=list, description="the registered tools the tools environment offers")
    sandbox: SandboxSection = Field(default_factory=SandboxSection, description="the limits of each tool call")
    parallel_steps: int = Field(
        default=8,
        ge=1,
        description="episodes whose environment steps run at once, on driver threads (a tool call is a sandboxed "
        "process of its own, so a batch's calls overlap)",
    )
    options: dict = Field(default_factory=dict, description="the environment's own options")

    @property
    def multi_turn(self) -> bool:
        """Whether an episode may be more than one answer to its prompt (the episode loop runs)."""
        return self.name != "single_turn" or self.max_turns > 1


class PpoSection(BaseModel):
    """PPO with a critic: rollouts, KL-shaped rewards, GAE, clipped policy and value updates."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)

    rollout_batch_size: int = Field(default=16, ge=1, description="prompts per iteration")
    samples_per_prompt: int = Field(
        default=1, ge=1, description="answers per prompt (at least 2 for the group estimators and dynamic sampling)"
    )
    mini_batch_size: int = Field(default=16, ge=1, description="samples per optimizer step, over all policy ranks")
    micro_batch_size: int = Field(default=4, ge=1, description="samples per forward/backward on one rank")
    logprob_chunk_tokens: int = Field(
        default=1024,
        ge=0,
        description="response tokens whose logits exist at once when the policy and reference score them and when "
        "the policy trains; bounds that memory at long responses; 0: a micro-batch's whole [samples, tokens, vocab]",
    )
    ppo_epochs: int = Field(default=1, ge=1, description="passes of clipped updates over an iteration's samples")
    old_logprobs: Literal["auto", "pass"] = Field(
        default="auto",
        description="the policy's log-probs before an iteration's updates (PPO's old, decoupled PPO's proximal): auto "
        "takes them from the forward of the update itself when an iteration is one optimizer step (ppo_epochs 1, "
        "mini_batch_size = rollout_batch_size x samples_per_prompt) and kl.in is loss, saving a forward pass over "
        "the batch (TRL's and NeMo-RL's shortcut); pass: a forward pass of their own before the updates, always",
    )
    iterations: int = Field(default=0, ge=0, description="iterations to run; 0: `epochs` passes over the prompts")
    epochs: float = Field(default=1.0, gt=0, description="passes over the prompts when iterations is 0")
    clip_range: float = Field(default=0.2, gt=0, description="the ratio is clipped to [1 - clip_range, 1 + clip_range]")
    clip_range_low: float | None = Field(default=None, gt=0, lt=1, description="the lower bound's width (clip_range)")
    clip_range_high: float | None = Field(
        default=None, gt=0, description="the upper bound's width (clip_range); DAPO's clip-higher: 0.28 with 0.2"
    )
    value_clip_range: float | None = Field(default=0.2, gt=0, description="none: unclipped value loss")
    gamma: float = Field(default=1.0, ge=0, le=1, description="discount of later tokens' rewards (GAE's gamma)")
    lam: float = Field(default=0.95, ge=0, le=1, description="GAE lambda")
    advantage: Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_baseline"] = Field(
        default="gae",
        description="gae: a critic's values (a critic role trains beside the policy); grpo, dr_grpo, rloo, "
        "reinforce_baseline: no critic, each answer's reward is measured against the other answers to its prompt "
        "(samples_per_prompt >= 2)",
    )
    whiten_advantages: bool = Field(
        default=True, description="gae and reinforce_baseline: advantages to mean 0, std 1 over the batch"
    )
    whiten_variance: Literal["unbiased", "population"] = Field(
        default="unbiased", description="the whitening's variance: Bessel-corrected, or the population's (OpenRLHF)"
    )
    loss_aggregation: Literal["sequence_mean", "token_mean"] = Field(
        default="sequence_mean",
        description="sequence_mean: each response weighs the same whatever its length; token_mean: each token "
        "weighs the same, so long responses weigh more (OpenRLHF's default)",
    )
    dual_clip: float | None = Field(
        default=None, gt=1, description="bound the loss of a negative-advantage token at dual_clip x |A| (e.g. 3)"
    )
    reward_clip: float | None = Field(
        default=None, gt=0, description="clamp each sample's reward to +-reward_clip (none: unclipped; OpenRLHF: 10)"
    )
    rollout_correction: Literal["none", "tis", "decoupled"] = Field(
        default="none",
        description="engine vllm: weigh each token's policy loss by w = p_policy / p_engine, the engine's log-probs "
        "being the behaviour's; tis: min(w, tis_cap) (truncated IS); decoupled: w, and a token with w > tis_cap "
        "leaves the loss (AReaL's decoupled PPO, made for the stale samples of async.max_staleness > 0)",
    )
    tis_cap: float = Field(
        default=2.0,
        ge=1,
        description="the bound of the behaviour weight w (at least 1): tis truncates, decoupled masks",
    )
    entropy_coef: float = Field(
        default=0.0, ge=0, description="entropy bonus: the policy loss minus entropy_coef x the sampling entropy"
    )
    value_loss_coef: float = Field(default=1.0, gt=0, description="scales the critic's loss")
    critic_learning_rate: float | None = Field(default=None, gt=0, description="defaults to training.learning_rate")
    max_prompt_length: int = Field(default=128, ge=1, description="a longer prompt is an error, reported before start")
    save_every: int = Field(default=0, ge=0, description="checkpoint every N iterations (0: output.save_steps)")
    overlong: OverlongSection = Field(
        default_factory=OverlongSection, description="DAPO: truncated answers out of the loss, a length penalty"
    )
    dynamic_sampling: bool = Field(
        default=False,
        description="DAPO: drop the groups whose answers all got the same reward (no signal) and draw more prompts "
        "until the batch is full (samples_per_prompt >= 2)",
    )
    dynamic_sampling_max_rounds: int = Field(
        default=4,
        ge=1,
        description="draws of rollout_batch_size prompts per iteration at most; then the batch is "
        "filled up with uninformative groups",
    )
    generation: GenerationSection = Field(
        default_factory=GenerationSection, description="how the rollouts sample answers, and which engine"
    )
    async_: AsyncSection = Field(
        default_factory=AsyncSection,
        alias="async",
        description="engine vllm: the engines generate the next batches while the policy trains on this one",
    )
    kl: KlSection = Field(default_factory=KlSection, description="the KL penalty against the reference")
    environment: EnvironmentSection = Field(
        default_factory=EnvironmentSection,
        description="what an episode is: one answer to the prompt (single_turn), or assistant turns with tool calls "
        "and their results between them (tools); only the sampled tokens are trained on",
    )
    roles: RolesSection = Field(
        default_factory=RolesSection, description="each role's Ray actors: workers, CPUs, GPUs, ZeRO stage"
    )
    colocate: Literal["all", "policy_reference", "none"] = Field(
        default="none",
        description="none: a bundle per rank of every role; all: rank i of every role shares bundle i; "
        "policy_reference: only those two share",
    )

    @property
    def has_critic(self) -> bool:
        """Whether a critic role trains beside the policy (GAE's values); the group estimators need none."""
        return self.advantage == "gae"

    @property
    def old_logprobs_from_update(self) -> bool:
        """Whether the policy's pre-update log-probs come from its update's own forward (`old_logprobs` auto, one
        optimizer step per iteration, no KL in the reward), so no pass of their own runs before it."""
        one_step = self.ppo_epochs == 1 and self.mini_batch_size == self.rollout_batch_size * self.samples_per_prompt
        return self.old_logprobs == "auto" and one_step and self.kl.in_ == "loss"

    @property
    def response_tokens(self) -> int:
        """The most tokens a sample holds after its prompt: one answer, or a multi-turn episode's budget."""
        if not self.environment.multi_turn:
            return self.generation.max_new_tokens
        return max(self.generation.max_new_tokens, self.environment.max_tokens)

    @model_validator(mode="after")
    def _generating_ahead_fits(self) -> PpoSection:
        """What generating ahead of training needs: engines of their own and a correction for stale samples."""
        if not self.async_.max_staleness:
            return self
        ahead = f"ppo.async.max_staleness {self.async_.max_staleness} generates batches while the policy trains"
        if self.generation.engine != "vllm":
            raise ValueError(
                f"{ahead}, and with ppo.generation.engine hf the policy actors generate themselves, so they cannot "
                "train meanwhile: set generation.engine: vllm, or async.max_staleness: 0"
            )
        if self.colocate == "all":
            raise ValueError(
                f"{ahead}, and ppo.colocate all puts the engines on the policy's own devices (and CPU cores), so the "
                "two would take turns anyway: set ppo.colocate: none (or policy_reference)"
            )
        if self.rollout_correction == "none":
            raise ValueError(
                f"{ahead}: its samples come from older weights than the policy that trains on them, so the loss "
                "needs the engine's log-probs as the behaviour's: set ppo.rollout_correction: decoupled (AReaL's "
                "decoupled PPO) or tis"
            )
        if self.dynamic_sampling:
            raise ValueError(
                f"{ahead}, and ppo.dynamic_sampling decides from each draw's rewards how many more prompts an "
                "iteration draws, which the batches generated ahead cannot know: use one of the two"
            )
        return self

    @model_validator(mode="after")
    def _batches_divide(self) -> PpoSection:
        if not self.has_critic and self.samples_per_prompt < 2:
            raise ValueError(
                f"ppo.advantage {self.advantage} measures each answer against the other answers to its prompt, so "
                f"ppo.samples_per_prompt must be at least 2 (it is {self.samples_per_prompt}): raise it (4-8 is "
                "usual), or use ppo.advantage gae, which learns from one answer per prompt with a critic"
            )
        samples = self.rollout_batch_size * self.samples_per_prompt
        if samples % self.mini_batch_size:
            raise ValueError(
                f"ppo.mini_batch_size ({self.mini_batch_size}) must divide the samples of an iteration "
                f"(rollout_batch_size x samples_per_prompt = {samples})"
            )
        if self.dynamic_sampling and self.samples_per_prompt < 2:
            raise ValueError(
                "ppo.dynamic_sampling keeps the prompts whose answers got different rewards, so it needs "
                f"ppo.samples_per_prompt >= 2 (it is {self.samples_per_prompt})"
            )
        if self.overlong.buffer > self.generation.max_new_tokens:
            raise ValueError(
                f"ppo.overlong.buffer ({self.overlong.buffer}) must not exceed ppo.generation.max_new_tokens "
                f"({self.generation.max_new_tokens}): the penalty ramps over the last `buffer` tokens of an answer"
            )
        if self.overlong.filter and not self.generation.stop_at_eos and not self.generation.stop:
            raise ValueError(
                "ppo.overlong.filter takes truncated answers out of the loss, and with generation.stop_at_eos false "
                "and no generation.stop every answer runs to max_new_tokens: nothing would train; set stop_at_eos: true"
            )
        if self.rollout_correction != "none" and self.generation.engine != "vllm":
            raise ValueError(
                f"ppo.rollout_correction {self.rollout_correction} corrects for the vLLM engines' sampling numbers; "
                "with ppo.generation.engine hf the policy samples itself: set engine: vllm, or rollout_correction: none"
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


class StageSections(BaseModel):
    """The sections only some stages read (each stage's entry in training/stages.py names its own): a job holds them
    all, and a preference stage's workers get them beside the training spec."""

    model_config = ConfigDict(extra="forbid")

    dpo: DpoSection = Field(default_factory=DpoSection, description="stage dpo's settings")
    kto: KtoSection = Field(default_factory=KtoSection, description="stage kto's settings")
    grpo: GrpoSection = Field(default_factory=GrpoSection, description="stage grpo's settings")
    rloo: RlooSection = Field(default_factory=RlooSection, description="stage rloo's settings")
    ppo: PpoSection = Field(
        default_factory=PpoSection, description="stage ppo's settings: the controller, its roles and estimators"
    )
    reward: RewardSection = Field(
        default_factory=RewardSection, description="where grpo's, rloo's and ppo's rewards come from"
    )
    distill: DistillSection = Field(default_factory=DistillSection, description="stage distill's settings")
