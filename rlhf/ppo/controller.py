"""The PPO controller: the loop on the driver that drives the role groups.

Read `ppo_iterations` first: one screen, one iteration a pass through the stages below, each a function of its own:

    rollout.update_weights   the policy's current weights into the engines (vLLM; nothing for HF generate)
    collect_rollout          prompts -> sampled answers (token ids as sampled, stops, finish reasons) -> Rollout;
                             with dynamic sampling more draws until the batch holds informative groups
      or RolloutsAhead       with ppo.async.max_staleness > 0 both of the above: the engines sample the next batches
                             while the policy trains (`tuneyard.rlhf.ppo.ahead`)
    score_rollout            [old log-probs | reference log-probs | values] on the groups, rewards meanwhile
    estimate_advantages      KL, advantages, behaviour weights, overlong filter             -> Experience
    ppo_update               ppo_epochs x mini-batches of (policy, critic) optimizer steps  -> per-step figures
                             (an iteration of one step takes its old log-probs in that step's own forward:
                             `PpoSection.old_logprobs_from_update`; `with_update_logprobs` then completes the KL)
    then                     metrics, KL controller, checkpoint (or a requested stop)

The rollout object (`tuneyard.rlhf.ppo.rollout.make_rollout`) is chosen once, from `ppo.generation.engine`; the loop
never asks which engine it has, only whether batches are generated ahead. Scoring and advantages are
`tuneyard.rlhf.ppo.experience`, checkpoints `tuneyard.rlhf.ppo.checkpoints`, the maths `tuneyard.rlhf.ppo.algorithms`
(pure torch), the roles `tuneyard.rlhf.ppo.roles`, placement `tuneyard.rlhf.ppo.groups`. `run_ppo` around the loop
checks the input, places the roles, and restarts them after a lost actor. Tensors travel between driver and actors
through Ray's object store.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from tuneyard.cluster.config import ClusterConfig
from tuneyard.rlhf.config import PpoSection, RewardSection
from tuneyard.rlhf.ppo import algorithms as algo
from tuneyard.rlhf.ppo.ahead import RolloutsAhead
from tuneyard.rlhf.ppo.batches import select_rows
from tuneyard.rlhf.ppo.checkpoints import (
    ControllerState,
    KLController,
    checkpoint_or_stop,
    publish_models,
    resume_state,
)
from tuneyard.rlhf.ppo.episodes import EpisodeRollout, with_environment
from tuneyard.rlhf.ppo.experience import (
    Experience,
    RewardScorer,
    current_weights_gap,
    estimate_advantages,
    gather,
    iteration_figures,
    mean_of,
    score_rollout,
    with_update_logprobs,
)
from tuneyard.rlhf.ppo.groups import (
    RoleGroup,
    RoleStalled,
    plan_placement,
    present_roles,
    start_role_groups,
    wait_until_fits,
)
from tuneyard.rlhf.ppo.prompts import Prompt, batch_prompts, batch_seed, tokenize_prompts
from tuneyard.rlhf.ppo.roles import CriticWorker, PolicyWorker, ReferenceWorker, RewardWorker
from tuneyard.rlhf.ppo.rollout import EngineRollout, PolicyRollout, Rollout, Sample, make_rollout
from tuneyard.rlhf.ppo.rollout_engine import RolloutWorker, check_rollout_engine, engine_env
from tuneyard.rlhf.ppo.sampling import StopSet, stop_set
from tuneyard.training.config import TrainSpec
from tuneyard.training.errors import TrainingFailed, UserError
from tuneyard.training.faults import forwarded_faults
from tuneyard.training.interrupts import driver_phase
from tuneyard.training.metrics import append_metrics
from tuneyard.training.nonfinite import NonFiniteTraining, nonfinite_stop_message
from tuneyard.training.run_dir import set_status
from tuneyard.training.tracking import Trackers, tracked

log = logging.getLogger(__name__)
ROLE_CLASSES = {
    "policy": PolicyWorker,
    "critic": CriticWorker,
    "reference": ReferenceWorker,
    "reward": RewardWorker,
    "rollout": RolloutWorker,
}


@dataclass
class StepCount:
    """Optimizer steps taken so far, and the latest ones skipped for NaN/inf in a row."""

    done: int
    nonfinite: list[int] = field(default_factory=list)


def total_iterations(ppo: PpoSection, prompts: int) -> int:
    """`ppo.iterations`, or the iterations that `ppo.epochs` passes over the prompts take."""
    return ppo.iterations or max(1, math.ceil(ppo.epochs * prompts / ppo.rollout_batch_size))


def kl_controller(ppo: PpoSection) -> KLController:
    """The fixed or adaptive KL coefficient of `ppo.kl`."""
    kl = ppo.kl
    if kl.controller == "adaptive":
        return algo.AdaptiveKLController(kl.coef, kl.target, kl.horizon)
    return algo.FixedKLController(kl.coef)


def critic_source(spec: TrainSpec, ppo: PpoSection, reward: RewardSection, policy_vocab: dict) -> str:
    """The folder the critic starts from: the reward model (it must share the policy's tokenizer) or the policy.

    `auto` takes the reward model when there is one with the policy's tokenizer, else the policy."""
    from tuneyard.training.config import ModelConfig
    from tuneyard.training.model import load_tokenizer

    init = ppo.roles.critic.init
    if init == "reward_model" and not reward.model:
        raise UserError("ppo.roles.critic.init is reward_model but reward.model is not set; set one, or init: policy")
    same_tokens = (
        bool(reward.model) and load_tokenizer(ModelConfig(name_or_path=reward.model)).get_vocab() == policy_vocab
    )
    if init == "policy" or (init == "auto" and not same_tokens):
        assert spec.model.name_or_path is not None
        return spec.model.name_or_path
    if not same_tokens:
        raise UserError(
            f"ppo.roles.critic.init is reward_model, but reward.model '{reward.model}' has another tokenizer than "
            "the policy, and the critic reads the policy's tokens; set ppo.roles.critic.init: policy"
        )
    return reward.model


@dataclass
class PpoInputs:
    """What the driver prepares from the user's input before any actor starts."""

    tokenizer: PreTrainedTokenizerBase
    prompts: list[Prompt]
    critic_source: str | None
    stops: StopSet


def prepare_ppo(spec: TrainSpec, ppo: PpoSection, reward: RewardSection) -> PpoInputs:
    """The checks of the user's input (on the driver, before any actor): tokenizer, prompts, critic's start, stops."""
    from tuneyard.rlhf.environments import environment_class
    from tuneyard.rlhf.preference_recipe import check_reward_model
    from tuneyard.rlhf.remote_reward import RemoteRewardClient
    from tuneyard.rlhf.rewards import lookup
    from tuneyard.rlhf.tools import tool_schemas
    from tuneyard.training.data.sources import read_splits
    from tuneyard.training.model import check_model_source, load_tokenizer

    if spec.data.format != "prompt":
        raise UserError(f"stage ppo reads data.format prompt, not '{spec.data.format}'")
    if spec.model.init != "pretrained":
        raise UserError("stage ppo starts from a trained policy: set model.name_or_path (e.g. runs/sft-tiny/final)")
    assert spec.model.name_or_path is not None
    check_model_source(spec.model.name_or_path, allow_pickle=spec.model.allow_pickle)
    if not reward.functions and not reward.model and not reward.remote:
        raise UserError(
            "stage ppo needs rewards: set reward.functions (named functions), reward.model and/or reward.remote"
        )
    if reward.remote:
        RemoteRewardClient(reward.remote)  # its token is in the environment
    for function in reward.functions:
        lookup(function.name)
    if reward.model:
        check_reward_model(reward.model, allow_pickle=spec.model.allow_pickle)
    check_rollout_engine(spec, ppo)
    tokenizer = load_tokenizer(spec.model, spec.data.chat_template)
    train_rows, _ = read_splits(spec.data, spec.training.seed)
    environment_class(ppo.environment)  # a registered one
    tools = tool_schemas(ppo.environment.tools) if ppo.environment.tools else None
    prompts = tokenize_prompts(train_rows, tokenizer, ppo.max_prompt_length, "data.train", tools)
    critic = critic_source(spec, ppo, reward, tokenizer.get_vocab()) if ppo.has_critic else None
    stops = stop_set(tokenizer, spec.model.name_or_path, ppo.generation, spec.model.trust_remote_code)
    return PpoInputs(tokenizer, prompts, critic, stops)


def run_ppo(spec: TrainSpec, ppo: PpoSection, reward: RewardSection, run_dir: Path, cluster: ClusterConfig) -> None:
    """Train the policy with PPO on the current Ray cluster; write metrics, checkpoints and final/.

    A lost role actor (its process died, its node went away) or a stalled rank (`RoleGroup.results`)
    ends the attempt: every group is torn down and started again, resuming from the newest complete checkpoint, up to
    `training.max_failures` times.
    """
    import ray

    inputs = prepare_ppo(spec, ppo, reward)
    iterations = total_iterations(ppo, len(inputs.prompts))
    roles = present_roles(spec, ppo, reward)
    placement = plan_placement(ppo, roles)
    wait_until_fits(placement, ppo)  # before any actor starts
    payload = {
        "spec": spec.model_dump(mode="json"),
        "ppo": ppo.model_dump(mode="json"),
        "reward": reward.model_dump(mode="json"),
        "total_iterations": iterations,
        "critic_source": inputs.critic_source,
        "stops": inputs.stops.to_dict(),
        "faults": forwarded_faults(),
    }
    classes = {role: ROLE_CLASSES[role] for role in roles}
    args = {role: (str(run_dir), payload) for role in roles}
    resume = spec.output.resume
    actors = ", ".join(f"{role} x{len(seats)}" for role, seats in placement.seats.items())
    for attempt in range(spec.training.max_failures + 1):
        set_status(
            run_dir, f"starting the PPO role actors ({actors})" + (f", attempt {attempt + 1}" if attempt else "")
        )
        driver_phase("starting the role actors", run_dir)
        try:
            with (
                start_role_groups(placement, classes, cluster, args, run_dir, {"rollout": engine_env(ppo)}) as groups,
                tracked(spec.training.report_to, run_dir) as trackers,
            ):
                ppo_iterations(groups, spec, ppo, reward, run_dir, inputs, iterations, resume, trackers)
            return
        except (ray.exceptions.RayActorError, RoleStalled) as exc:
            lost = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            what = lost if isinstance(exc, RoleStalled) else f"a role actor was lost ({lost})"
            if attempt == spec.training.max_failures:
                raise TrainingFailed(
                    f"PPO stopped: {what}; the {attempt} restart(s) that "
                    f"training.max_failures allows are used up; the actors' logs are in {run_dir / 'logs'} "
                    "(ROLE-RANK.log). Run the job again to resume from its newest complete checkpoint."
                ) from None
            log.warning("%s; restarting the role groups from the last checkpoint", what)
            append_metrics(run_dir / "metrics.jsonl", {"event": "restart", "reason": lost, "time": time.time()})
            resume = "auto"  # this run's own newest checkpoint, whatever the job said


def ppo_iterations(
    groups: dict[str, RoleGroup],
    spec: TrainSpec,
    ppo: PpoSection,
    reward: RewardSection,
    run_dir: Path,
    inputs: PpoInputs,
    iterations: int,
    resume: str,
    trackers: Trackers | None = None,
) -> None:
    """The PPO loop over started role groups, from the checkpoint `resume` names (or the start) to final/."""
    metrics_path = run_dir / "metrics.jsonl"
    kl_ctl = kl_controller(ppo)
    state = resume_state(groups, run_dir, resume, kl_ctl)
    append_metrics(
        metrics_path, {"event": "start", "step": state.iteration, "total_steps": iterations, "time": time.time()}
    )
    steps = StepCount(done=state.iteration * steps_per_iteration(ppo))
    rollout_source = with_environment(make_rollout(groups, ppo, inputs.tokenizer, inputs.stops), ppo, inputs.tokenizer)
    rewards = RewardScorer(reward, groups.get("reward"), ppo)
    ahead = None
    if generates_ahead(ppo):  # the config allows it with vLLM engines only
        assert isinstance(rollout_source, EngineRollout | EpisodeRollout)
        ahead = RolloutsAhead(
            source=rollout_source,
            prompts=inputs.prompts,
            pad_id=inputs.tokenizer.pad_token_id,
            ppo=ppo,
            seed=spec.training.seed,
            iterations=iterations,
            iteration=state.iteration,
            position=state.data_position,
            rewards=rewards,
            reference=groups.get("reference"),
        )

    for iteration in range(state.iteration, iterations):
        at = f"iteration {iteration + 1} of {iterations}"
        started = time.perf_counter()
        if ahead is None:
            driver_phase("syncing weights", run_dir, at)
            sync_figures = rollout_source.update_weights()  # the engines answer with the policy's weights as they are
            synced = time.perf_counter()
            driver_phase("generating", run_dir, at)
            rollout, position = collect_rollout(
                rollout_source, rewards, inputs, ppo, state.data_position, iteration, spec.training.seed
            )
        else:
            driver_phase("generating", run_dir, at)  # the syncs are between the engines' batches
            rollout, position = ahead.rollout(iteration)
            sync_figures, synced = {}, started + rollout.figures["weight_sync_s"]
        generated = time.perf_counter()
        driver_phase("scoring", run_dir, at)
        scores = score_rollout(groups, rollout, rewards)
        scored = time.perf_counter()
        kl_coef = kl_ctl.value
        experience = estimate_advantages(rollout, scores, ppo, kl_coef)
        driver_phase("updating", run_dir, at)
        policy_stats, critic_stats, taken = ppo_update(groups, experience, ppo, spec, iteration, steps, run_dir)
        trained = time.perf_counter()
        if taken is not None:  # the update's own forward took the old log-probs
            with_update_logprobs(rollout, scores, experience, ppo, taken)

        kl_ctl.update(float(experience.sequence_kl().mean()), len(rollout.samples))
        record = {
            "step": iteration + 1,
            **iteration_figures(rollout, scores, experience, kl_coef, policy_stats, critic_stats),
            **current_weights_gap(rollout, scores.old_logprobs, iteration),
            **sync_figures,
            "generate_s": generated - synced,
            "score_s": scored - generated,
            "train_s": trained - scored,
            "samples_per_s": len(rollout.samples) / (trained - started),
            **(engine_idle(rollout.figures, trained - started) if ahead is not None else {}),
            "time": time.time(),
        }
        append_metrics(metrics_path, record)
        if trackers is not None:
            trackers.log(record)
        state = ControllerState(
            iteration=iteration + 1, data_position=position, kl_coef=kl_ctl.value, kl_controller=kl_ctl.state_dict()
        )
        if checkpoint_or_stop(groups, spec, ppo, run_dir, state, iterations):
            return
    driver_phase("publishing final/", run_dir)
    publish_models(groups, run_dir)


def generates_ahead(ppo: PpoSection) -> bool:
    """Whether the engines generate batches ahead of training (`RolloutsAhead`), or the loop takes turns."""
    return ppo.async_.max_staleness > 0


def engine_idle(figures: dict[str, float], iteration_s: float) -> dict[str, float]:
    """The engines' idle seconds in an iteration generating ahead: its length less their busy time on a batch and
    the sync (the batch is the one trained now, generated during the iteration before: equal in a steady run)."""
    return {"engine_idle_s": max(0.0, iteration_s - figures["engine_busy_s"] - figures["weight_sync_s"])}


def collect_rollout(
    source: PolicyRollout | EngineRollout | EpisodeRollout,
    rewards: RewardScorer,
    inputs: PpoInputs,
    ppo: PpoSection,
    position: int,
    iteration: int,
    seed: int,
) -> tuple[Rollout, int]:
    """The iteration's samples (`rollout_batch_size` prompts, each answered `samples_per_prompt` times) and the
    position in the prompt stream after them.

    With `ppo.dynamic_sampling` (DAPO) the answers are scored at once and a group whose answers all got the same
    reward is set aside: more prompts are drawn until the batch holds `rollout_batch_size` informative groups, at
    most `dynamic_sampling_max_rounds` draws; a batch still short then is filled up with groups set aside. Each draw's
    seed is a function of its position in the stream, so a resumed run samples what the uninterrupted one would.
    """
    group, wanted, pad_id = ppo.samples_per_prompt, ppo.rollout_batch_size, inputs.tokenizer.pad_token_id

    def draw(at: int) -> list[Sample]:
        prompts = batch_prompts(inputs.prompts, at, wanted, group, seed)
        return source.sample(prompts, batch_seed(seed, at, wanted), iteration)

    if not ppo.dynamic_sampling:
        return Rollout.of(draw(position), pad_id, dict(source.figures)), position + wanted
    kept: list[list[Sample]] = []
    set_aside: list[list[Sample]] = []
    draws = 0
    while draws < ppo.dynamic_sampling_max_rounds and len(kept) < wanted:
        samples = draw(position)
        draws, position = draws + 1, position + wanted
        rewards.score(samples)
        # as the advantages will see them: clipped first, so rewards that differ only beyond the clip are equal
        scores = algo.clip_scores(torch.tensor([s.reward for s in samples]), ppo.reward_clip)
        informative = algo.informative_groups(scores, group).tolist()
        for i, useful in enumerate(informative):
            (kept if useful else set_aside).append(samples[i * group : (i + 1) * group])
    if len(kept) < wanted:
        log.warning(
            "dynamic sampling: %d of %d groups informative after %d draws; the batch is filled up with groups whose "
            "answers all got the same reward (raise ppo.dynamic_sampling_max_rounds to draw more)",
            len(kept),
            wanted,
            draws,
        )
    figures = {
        **source.figures,
        "groups_kept_frac": len(kept) / (draws * wanted),  # the informative share of the draws: DAPO's cost is 1 / it
        "sampling_rounds": float(draws),
        "batch_informative_frac": min(len(kept), wanted) / wanted,  # below 1 only when the draws ran out
    }
    batch = (kept + set_aside)[:wanted]
    return Rollout.of([s for g in batch for s in g], pad_id, figures), position


def ppo_update(
    groups: dict[str, RoleGroup],
    experience: Experience,
    ppo: PpoSection,
    spec: TrainSpec,
    iteration: int,
    steps: StepCount,
    run_dir: Path,
) -> tuple[list[dict[str, float]], list[dict[str, float]], dict[str, torch.Tensor] | None]:
    """`ppo.ppo_epochs` passes over seeded mini-batches, each one optimizer step of policy and critic side by side.

    The figures of each step (policy's, critic's), averaged over the ranks, and the policy's log-probs and entropy
    from its step's own forward in the batch's order where the batch came without old log-probs (else None).
    """
    policy, critic = groups["policy"], groups.get("critic")
    samples = next(iter(experience.batch.values())).shape[0]
    policy_stats, critic_stats = [], []
    order = torch.Generator().manual_seed(spec.training.seed + 7 * iteration)
    for _ in range(ppo.ppo_epochs):
        permutation = torch.randperm(samples, generator=order)
        for start in range(0, samples, ppo.mini_batch_size):
            mini = select_rows(experience.batch, permutation[start : start + ppo.mini_batch_size])
            policy_refs = policy.scatter("train_step", mini)
            critic_refs = critic.scatter("train_step", mini) if critic is not None else None
            policy_stats.append(mean_of(policy.results(policy_refs)))
            skipped = bool(policy_stats[-1]["policy_skipped"])
            if critic is not None:
                critic_stats.append(mean_of(critic.results(critic_refs)))
                skipped = skipped or bool(critic_stats[-1]["critic_skipped"])
            count_step(steps, skipped, iteration, spec, run_dir)
    if "old_logprobs" in experience.batch:
        return policy_stats, critic_stats, None
    # one step over the whole batch (`PpoSection.old_logprobs_from_update`): its rows in `permutation`'s order
    taken = gather(policy, policy.broadcast("update_logprobs"))
    return policy_stats, critic_stats, {k: v[torch.argsort(permutation)] for k, v in taken.items()}


def count_step(steps: StepCount, skipped: bool, iteration: int, spec: TrainSpec, run_dir: Path) -> None:
    """Count one optimizer step; a NaN/inf-skipped one is logged, and one too many in a row stops the run."""
    steps.done += 1
    if not skipped:
        steps.nonfinite = []
        return
    steps.nonfinite.append(steps.done)
    event = {"event": "nonfinite", "step": iteration + 1, "optimizer_step": steps.done}
    append_metrics(run_dir / "metrics.jsonl", {**event, "in_a_row": len(steps.nonfinite), "time": time.time()})
    if len(steps.nonfinite) > spec.training.max_nonfinite_steps:
        where = f" (optimizer steps of policy and critic; PPO iteration {iteration + 1})"
        message = nonfinite_stop_message(steps.nonfinite, spec.training.max_nonfinite_steps, run_dir, where)
        raise NonFiniteTraining(message)


def steps_per_iteration(ppo: PpoSection) -> int:
    """Optimizer steps of one iteration: ppo_epochs passes of the samples in mini-batches."""
    return ppo.ppo_epochs * (ppo.rollout_batch_size * ppo.samples_per_prompt // ppo.mini_batch_size)
