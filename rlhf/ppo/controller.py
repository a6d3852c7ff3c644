"""The PPO controller: the loop on the driver that drives the role groups.

Read `ppo_iterations` first: one screen, one iteration a pass through the stages below it, each a function of its own
in the order the loop calls them:

    sync_weights         (vLLM engines) the policy's current weights into every engine
    generate_rollout     prompts -> responses (the policy ranks' HF generate, or the vLLM engines) -> Rollout
    score_rollout        [old log-probs | reference log-probs | values | rewards]      -> RolloutScores
                         every group at once
    estimate_advantages  KL-shaped per-token rewards -> GAE -> whitening               -> Experience
    ppo_update           ppo_epochs x mini-batches of (policy, critic) optimizer steps -> per-step figures
    then                 metrics, KL controller, checkpoint (or a requested stop)

The rollout engine (`ppo.generation.engine`) answers in `generate_rollout`, the advantage estimator (`ppo.advantage`)
lives in `estimate_advantages`; the loop reads only their Rollout and Experience. `run_ppo` around the loop checks the
input, places the roles, and restarts them after a lost actor.

The maths is `tuneyard.rlhf.ppo.algorithms` (pure torch); the roles are `tuneyard.rlhf.ppo.roles`; placement is
`tuneyard.rlhf.ppo.groups`. Tensors travel between driver and actors through Ray's object store.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from tuneyard.cluster.config import ClusterConfig
from tuneyard.rlhf.config import PpoSection, RewardSection
from tuneyard.rlhf.ppo import algorithms as algo
from tuneyard.rlhf.ppo.batches import (
    build_samples,
    concat_rows,
    left_pad,
    right_pad_values,
    select_rows,
    split_rows,
)
from tuneyard.rlhf.ppo.groups import (
    RoleGroup,
    RoleStalled,
    plan_placement,
    present_roles,
    start_role_groups,
    wait_until_fits,
)
from tuneyard.rlhf.ppo.roles import CriticWorker, PolicyWorker, ReferenceWorker, RewardWorker
from tuneyard.rlhf.ppo.rollout_engine import RolloutWorker, check_rollout_engine, engine_env
from tuneyard.rlhf.ppo.scoring import function_scores
from tuneyard.training.config import TrainSpec
from tuneyard.training.errors import TrainingFailed, UserError
from tuneyard.training.faults import forwarded_faults
from tuneyard.training.metrics import COMPLETE_MARKER, append_metrics
from tuneyard.training.nonfinite import NonFiniteTraining, nonfinite_stop_message
from tuneyard.training.preemption import RECORD_FILE, REQUEST_FILE
from tuneyard.training.run_dir import (
    DiskFull,
    disk_full_message,
    out_of_space,
    publish_final,
    resume_checkpoint,
    retire_old_checkpoints,
    set_status,
)
from tuneyard.training.tracking import Trackers, tracked

log = logging.getLogger(__name__)
KLController = algo.FixedKLController | algo.AdaptiveKLController
ROLE_CLASSES = {
    "policy": PolicyWorker,
    "critic": CriticWorker,
    "reference": ReferenceWorker,
    "reward": RewardWorker,
    "rollout": RolloutWorker,
}


@dataclass
class Prompt:
    """One training prompt: the conversation (for rewards) and its token ids (for the policy)."""

    messages: list[dict]
    ids: list[int]


@dataclass
class ControllerState:
    """What a checkpoint needs besides the engines: where the loop is and the KL coefficient."""

    iteration: int = 0
    data_position: int = 0
    kl_coef: float = 0.0
    kl_controller: dict | None = None


@dataclass
class Rollout:
    """What a rollout yields: each sample's prompt, the responses' token ids, and the batch layout of both."""

    samples: list[Prompt]  # one per sample: every prompt `ppo.samples_per_prompt` times in a row
    responses: list[list[int]]  # each cut after its first EOS
    batch: dict[str, torch.Tensor]  # the layout of tuneyard.rlhf.ppo.batches
    engine_logprobs: torch.Tensor | None = None  # [B, R], the vLLM engines' log-probs of their sampled tokens

    @property
    def mask(self) -> torch.Tensor:
        """The action mask as floats: 1 on the response tokens that count."""
        return self.batch["action_mask"].float()


@dataclass
class RolloutScores:
    """What the roles say of a rollout: sequence rewards and, per response token, log-probs, entropy and values."""

    rewards: torch.Tensor  # [B], the weighted reward functions plus the reward model
    old_logprobs: torch.Tensor  # [B, R], the policy's before this iteration's updates
    entropy: torch.Tensor  # [B, R], of the policy's sampling distribution
    ref_logprobs: torch.Tensor  # [B, R]
    values: torch.Tensor | None  # [B, R], the critic's (None without a critic)


@dataclass
class Experience:
    """The training batch of an iteration (layout, old log-probs and values, advantages, returns) and its KL."""

    batch: dict[str, torch.Tensor]
    kl: torch.Tensor  # [B, R] per-token KL estimate to the reference, 0 off the response
    mask: torch.Tensor
    rollout_gap: torch.Tensor | None = None  # mean |engine - policy| log-prob of the sampled tokens (vLLM only)

    def sequence_kl(self) -> torch.Tensor:
        """The KL of each response, summed over its tokens."""
        return (self.kl * self.mask).sum(dim=1)


@dataclass
class StepCount:
    """Optimizer steps taken so far, and the latest ones skipped for NaN/inf in a row."""

    done: int
    nonfinite: list[int] = field(default_factory=list)


def tokenize_prompts(
    rows: list[dict], tokenizer: PreTrainedTokenizerBase, max_prompt_length: int, source: str
) -> list[Prompt]:
    """Render each prompt with the chat template (ready for the answer) and refuse one over the limit."""
    prompts = []
    for i, row in enumerate(rows):
        messages = row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer("\n".join(m["content"] for m in messages))["input_ids"]
        if len(ids) > max_prompt_length:
            raise UserError(
                f"{source}: prompt {i + 1} ({messages[-1]['content'][:60]!r}...) is {len(ids)} tokens, over "
                f"ppo.max_prompt_length {max_prompt_length}; raise ppo.max_prompt_length or shorten that prompt"
            )
        prompts.append(Prompt(messages, ids))
    return prompts


def total_iterations(ppo: PpoSection, prompts: int) -> int:
    """`ppo.iterations`, or the iterations that `ppo.epochs` passes over the prompts take."""
    return ppo.iterations or max(1, math.ceil(ppo.epochs * prompts / ppo.rollout_batch_size))


def prompts_of_iteration(prompts: list[Prompt], iteration: int, batch: int, seed: int) -> list[Prompt]:
    """The iteration's prompts: consecutive positions in a seeded shuffle, reshuffled every pass.

    A pure function of the iteration, so a resumed run reads the very prompts the uninterrupted one would.
    """
    chosen = []
    for position in range(iteration * batch, (iteration + 1) * batch):
        epoch, offset = divmod(position, len(prompts))
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed + epoch))
        chosen.append(prompts[int(order[offset])])
    return chosen


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


def gather(group: RoleGroup, refs: list) -> dict[str, torch.Tensor]:
    """The ranks' answers to one call of `group` (dicts of tensors) joined in rank order."""
    return concat_rows(group.results(refs))


def trained(groups: dict[str, RoleGroup]) -> list[str]:
    """The roles that train and checkpoint: the policy, and the critic when there is one."""
    return [role for role in ("policy", "critic") if role in groups]


def mean_of(dicts: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean of the ranks' (or steps') figures; ratio_max_dev is a max."""
    keys = dicts[0].keys()
    return {
        k: max(d[k] for d in dicts) if k == "ratio_max_dev" else sum(d[k] for d in dicts) / len(dicts) for k in keys
    }


def save_checkpoint(groups: dict[str, RoleGroup], run_dir: Path, state: ControllerState, keep_last: int) -> Path:
    """Engines and controller state into checkpoints/checkpoint-N, marked complete last; older ones go after."""
    folder = run_dir / "checkpoints" / f"checkpoint-{state.iteration}"
    shutil.rmtree(folder, ignore_errors=True)
    try:
        folder.mkdir(parents=True)
        saving = {role: groups[role].broadcast("save_checkpoint", str(folder / role)) for role in trained(groups)}
        for role, refs in saving.items():
            groups[role].results(refs)
        (folder / "controller.json").write_text(json.dumps(asdict(state)))
    except Exception as exc:
        if not out_of_space(exc, folder):
            raise
        shutil.rmtree(folder, ignore_errors=True)  # never marked complete; resume would skip it anyway
        raise DiskFull(disk_full_message(f"saving {folder.name}", run_dir)) from None
    (folder / COMPLETE_MARKER).write_text(str(state.iteration))
    retire_old_checkpoints(run_dir, keep_last)
    return folder


def publish_models(groups: dict[str, RoleGroup], run_dir: Path) -> None:
    """final/ (the policy, a Hugging Face folder) and critic/ beside it, each published atomically."""
    for role in trained(groups):
        name = "final" if role == "policy" else role
        staging = run_dir / f"{name}.staging"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            groups[role].results(groups[role].broadcast("save_final", str(staging)))
        except Exception as exc:
            if not out_of_space(exc, staging):
                raise
            shutil.rmtree(staging, ignore_errors=True)
            raise DiskFull(disk_full_message(f"writing {name}/", run_dir)) from None
        publish_final(staging, run_dir / name)


def prepare_ppo(
    spec: TrainSpec, ppo: PpoSection, reward: RewardSection
) -> tuple[PreTrainedTokenizerBase, list[Prompt], str | None]:
    """The checks of the user's input (on the driver, before any actor): tokenizer, prompts, critic's start."""
    from tuneyard.rlhf.preference_recipe import check_reward_model
    from tuneyard.rlhf.rewards import lookup
    from tuneyard.training.data.sources import read_splits
    from tuneyard.training.model import check_model_source, load_tokenizer

    if spec.data.format != "prompt":
        raise UserError(f"stage ppo reads data.format prompt, not '{spec.data.format}'")
    if spec.model.init != "pretrained":
        raise UserError("stage ppo starts from a trained policy: set model.name_or_path (e.g. runs/sft-tiny/final)")
    assert spec.model.name_or_path is not None
    check_model_source(spec.model.name_or_path, allow_pickle=spec.model.allow_pickle)
    if not reward.functions and not reward.model:
        raise UserError("stage ppo needs rewards: set reward.functions (named functions) and/or reward.model")
    for function in reward.functions:
        lookup(function.name)
    if reward.model:
        check_reward_model(reward.model, allow_pickle=spec.model.allow_pickle)
    if ppo.generation.engine == "vllm":
        check_rollout_engine(spec, ppo)
    tokenizer = load_tokenizer(spec.model, spec.data.chat_template)
    train_rows, _ = read_splits(spec.data, spec.training.seed)
    prompts = tokenize_prompts(train_rows, tokenizer, ppo.max_prompt_length, "data.train")
    critic = critic_source(spec, ppo, reward, tokenizer.get_vocab()) if ppo.has_critic else None
    return tokenizer, prompts, critic


def run_ppo(spec: TrainSpec, ppo: PpoSection, reward: RewardSection, run_dir: Path, cluster: ClusterConfig) -> None:
    """Train the policy with PPO on the current Ray cluster; write metrics, checkpoints and final/.

    A lost role actor (its process died, its node went away) or a stalled rank (`RoleGroup.results`)
    ends the attempt: every group is torn down and started again, resuming from the newest complete checkpoint, up to
    `training.max_failures` times.
    """
    import ray

    tokenizer, prompts, critic_start = prepare_ppo(spec, ppo, reward)
    iterations = total_iterations(ppo, len(prompts))
    roles = present_roles(spec, ppo, reward)
    placement = plan_placement(ppo, roles)
    wait_until_fits(placement, ppo)  # before any actor starts
    payload = {
        "spec": spec.model_dump(mode="json"),
        "ppo": ppo.model_dump(mode="json"),
        "reward": reward.model_dump(mode="json"),
        "total_iterations": iterations,
        "critic_source": critic_start,
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
        try:
            with (
                start_role_groups(placement, classes, cluster, args, run_dir, {"rollout": engine_env(ppo)}) as groups,
                tracked(spec.training.report_to, run_dir) as trackers,
            ):
                ppo_iterations(groups, spec, ppo, reward, run_dir, tokenizer, prompts, iterations, resume, trackers)
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
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Prompt],
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
    manifest = open_weight_sync(groups, ppo) if "rollout" in groups else None

    for iteration in range(state.iteration, iterations):
        started = time.perf_counter()
        if manifest is not None:  # the engines answer with the weights the policy has now (also after a resume)
            sync_weights(groups, manifest)
        synced = time.perf_counter()
        rollout = generate_rollout(groups, ppo, tokenizer, prompts, iteration, spec.training.seed)
        generated = time.perf_counter()
        scores = score_rollout(groups, reward, tokenizer, rollout)
        scored = time.perf_counter()
        kl_coef = kl_ctl.value
        experience = estimate_advantages(rollout, scores, ppo, kl_coef)
        policy_stats, critic_stats = ppo_update(groups, experience, ppo, spec, iteration, steps, run_dir)
        trained = time.perf_counter()

        kl_ctl.update(float(experience.sequence_kl().mean()), len(rollout.samples))
        record = {
            "step": iteration + 1,
            **iteration_figures(scores, experience, kl_coef, policy_stats, critic_stats),
            **({"weight_sync_s": synced - started} if manifest is not None else {}),
            "generate_s": generated - synced,
            "score_s": scored - generated,
            "train_s": trained - scored,
            "samples_per_s": len(rollout.samples) / (trained - started),
            "time": time.time(),
        }
        append_metrics(metrics_path, record)
        if trackers is not None:
            trackers.log(record)
        state = ControllerState(
            iteration=iteration + 1,
            data_position=(iteration + 1) * ppo.rollout_batch_size,
            kl_coef=kl_ctl.value,
            kl_controller=kl_ctl.state_dict(),
        )
        if checkpoint_or_stop(groups, spec, ppo, run_dir, state, iterations):
            return
    publish_models(groups, run_dir)


def steps_per_iteration(ppo: PpoSection) -> int:
    """Optimizer steps of one iteration: ppo_epochs passes of the samples in mini-batches."""
    return ppo.ppo_epochs * (ppo.rollout_batch_size * ppo.samples_per_prompt // ppo.mini_batch_size)


def resume_state(groups: dict[str, RoleGroup], run_dir: Path, resume: str, kl_ctl: KLController) -> ControllerState:
    """Load the engines and KL coefficient from the checkpoint `resume` names; where the loop goes on."""
    state = ControllerState(kl_coef=kl_ctl.value)
    checkpoint = resume_checkpoint(run_dir, resume)
    if checkpoint is None:
        return state
    state = ControllerState(**json.loads((checkpoint / "controller.json").read_text()))
    kl_ctl.load_state_dict(state.kl_controller or {"value": state.kl_coef})
    for role in trained(groups):
        groups[role].results(groups[role].broadcast("load_checkpoint", str(checkpoint / role)))
    log.info("resumed from %s at iteration %d", checkpoint, state.iteration)
    return state


def open_weight_sync(groups: dict[str, RoleGroup], ppo: PpoSection) -> list:
    """Join policy rank 0 and every rollout engine's workers in a process group of their own; the sync's manifest."""
    import ray

    policy, rollout = groups["policy"], groups["rollout"]
    shards = ppo.roles.rollout.tensor_parallel_size
    world = 1 + shards * len(rollout.actors)
    policy_gpus, engine_gpus = ppo.roles.policy.gpus_per_worker, ppo.roles.rollout.gpus_per_worker
    # NCCL takes one rank per device: an engine that may share the policy's GPU syncs over gloo through host memory
    own_gpus = policy_gpus >= 1 and engine_gpus >= 1 and ppo.colocate != "all"
    backend = "nccl" if own_gpus else "gloo"
    timeout = policy.timeout_s
    address = ray.get(policy.actors[0].weight_sync_address.remote(world, timeout))
    first_ranks = [1 + i * shards for i in range(len(rollout.actors))]
    policy_joins = [policy.actors[0].join_weight_sync.remote(world, backend, timeout)]
    engines_join = rollout.call(
        "join_weight_sync", [(address, first, world, backend, timeout) for first in first_ranks]
    )
    rollout.results(engines_join)
    ray.get(policy_joins)
    return policy.results(policy.broadcast("weight_manifest"))[0]


def sync_weights(groups: dict[str, RoleGroup], manifest: list) -> None:
    """The policy's current weights into every rollout engine (ZeRO-3 shards gathered one parameter at a time).

    Whichever side fails first says why, at once: an engine's own error, or its death (RayActorError: the groups
    restart, as for any lost actor). A broadcast that times out names its parameter and the engines still silent."""
    import ray

    policy, rollout = groups["policy"], groups["rollout"]
    sending = policy.broadcast("send_weights")
    receiving = rollout.broadcast("receive_weights", manifest)
    pending = [*sending, *receiving]
    while any(ref in pending for ref in sending):
        (done,), pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(done)
        except ray.exceptions.RayTaskError as exc:
            timed_out = re.search(r"WeightSyncTimeout: (.*)", str(exc))
            if done in receiving or timed_out is None:
                raise
            answered, silent = ray.wait(receiving, num_returns=len(receiving), timeout=10)
            for ref in answered:
                ray.get(ref)  # an engine that died while the policy waited: the restart path
            raise RoleStalled(f"{timed_out.group(1).strip()}; " + rollout.silence(receiving, silent)) from None
    # the sender can finish into the sockets' buffers first: an engine still receiving a timeout later is stuck
    answered, silent = ray.wait(receiving, num_returns=len(receiving), timeout=rollout.timeout_s)
    for ref in answered:
        ray.get(ref)
    if silent:
        raise RoleStalled(
            "the weight sync timed out: the policy sent every parameter, and an engine did not take them in within "
            f"cluster.collective_timeout_s ({rollout.timeout_s:g} s); " + rollout.silence(receiving, silent)
        )


def generate_rollout(
    groups: dict[str, RoleGroup],
    ppo: PpoSection,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Prompt],
    iteration: int,
    seed: int,
) -> Rollout:
    """The iteration's prompts, each answered `ppo.samples_per_prompt` times with the policy's current weights: by
    the policy ranks (`ppo.generation.engine: hf`) or the vLLM engines, each answering a consecutive share.

    The seed depends on the iteration only, so a resumed run samples what the uninterrupted one would.
    """
    batch_prompts = prompts_of_iteration(prompts, iteration, ppo.rollout_batch_size, seed)
    samples = [p for p in batch_prompts for _ in range(ppo.samples_per_prompt)]
    prompt_ids, prompt_mask = left_pad([p.ids for p in samples], tokenizer.pad_token_id)
    sampling_seed = seed + 100_003 * iteration
    engine_logprobs = None
    if "rollout" in groups:
        responses, logprobs = engine_answers(groups["rollout"], [p.ids for p in samples], sampling_seed)
        engine_logprobs = right_pad_values(logprobs)
    else:
        policy = groups["policy"]
        shards = split_rows({"ids": prompt_ids, "mask": prompt_mask}, len(policy.actors))
        answers = policy.results(policy.call("generate", [(s["ids"], s["mask"], sampling_seed) for s in shards]))
        responses = [r for part in answers for r in part]
    batch = build_samples(prompt_ids, prompt_mask, responses, tokenizer.pad_token_id)
    return Rollout(samples, responses, batch, engine_logprobs)


def engine_answers(
    rollout: RoleGroup, prompt_ids: list[list[int]], seed: int
) -> tuple[list[list[int]], list[list[float]]]:
    """The engines' responses and their sampled tokens' log-probs; engine i answers the i-th consecutive share.

    Each prompt gets its own seed (seed + its index), so the answers do not depend on how many engines share them."""
    engines = len(rollout.actors)
    bounds = [round(i * len(prompt_ids) / engines) for i in range(engines + 1)]
    shares = [(prompt_ids[a:b], [seed + i for i in range(a, b)]) for a, b in itertools.pairwise(bounds)]
    answers = [pair for part in rollout.results(rollout.call("generate", shares)) for pair in part]
    return [tokens for tokens, _ in answers], [logprobs for _, logprobs in answers]


def score_rollout(
    groups: dict[str, RoleGroup], reward: RewardSection, tokenizer: PreTrainedTokenizerBase, rollout: Rollout
) -> RolloutScores:
    """Old log-probs, reference log-probs, values and rewards of the rollout, every group computing at once.

    An adapter policy is its own reference (its base with the adapter off). The reward functions run on the
    driver while the groups work.
    """
    policy, critic, reward_group = groups["policy"], groups.get("critic"), groups.get("reward")
    reference = groups.get("reference", policy)
    batch = rollout.batch
    old_refs = policy.scatter("logprobs", batch)
    ref_refs = reference.scatter("logprobs" if reference is not policy else "reference_logprobs", batch)
    value_refs = critic.scatter("values", batch) if critic is not None else None
    # rewards read text: a reward model re-tokenises it with its own tokenizer (rlhf/ppo/scoring.py)
    texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in rollout.responses]
    conversations = [s.messages for s in rollout.samples]
    if reward_group is not None:
        per_rank = len(texts) // len(reward_group.actors)
        reward_refs = reward_group.call(
            "score",
            [(conversations[i : i + per_rank], texts[i : i + per_rank]) for i in range(0, len(texts), per_rank)],
        )
    rewards = torch.tensor(function_scores(reward.functions, conversations, texts))
    if reward_group is not None:
        model_scores = torch.tensor([s for part in reward_group.results(reward_refs) for s in part])
        rewards = rewards + reward.model_weight * model_scores
    old = gather(policy, old_refs)
    return RolloutScores(
        rewards=rewards,
        old_logprobs=old["logprobs"],
        entropy=old["entropy"],
        ref_logprobs=gather(reference, ref_refs)["logprobs"],
        values=gather(critic, value_refs)["values"] if critic is not None else None,
    )


def estimate_advantages(rollout: Rollout, scores: RolloutScores, ppo: PpoSection, kl_coef: float) -> Experience:
    """Per-token rewards (the sample's reward on its last token, minus kl_coef x KL when the KL is in the reward),
    then the advantages of `ppo.advantage`: GAE on the critic's values, or a group estimator's reward relative to
    the other answers to the same prompt, carried to every token as the return from it on."""
    mask = rollout.mask
    kl = algo.clamp_kl(algo.kl_estimate(scores.old_logprobs, scores.ref_logprobs, ppo.kl.estimator), ppo.kl.clamp)
    kl = kl * mask
    # clipped before any group baseline, so one outlier answer cannot move its whole group's baseline
    sample_rewards = algo.clip_scores(scores.rewards, ppo.reward_clip)
    kl_in_reward = kl_coef if ppo.kl.in_ == "reward" else 0.0
    if ppo.has_critic:
        rewards = algo.shape_rewards(sample_rewards, kl, mask, kl_in_reward)
        advantages, returns = algo.gae_advantages(rewards, scores.values * mask, mask, ppo.gamma, ppo.lam)
        critic_batch = {"old_values": scores.values, "returns": returns}
    else:
        relative = algo.group_relative_scores(sample_rewards, ppo.samples_per_prompt, ppo.advantage)
        rewards = algo.shape_rewards(relative, kl, mask, kl_in_reward)
        advantages, critic_batch = algo.returns_to_go(rewards, mask, ppo.gamma), {}
    # GRPO, Dr. GRPO and RLOO are already on a per-group scale; GAE and REINFORCE++'s baseline are whitened
    if ppo.whiten_advantages and ppo.advantage in ("gae", "reinforce_baseline"):
        advantages = algo.masked_whiten(advantages, mask, unbiased=ppo.whiten_variance == "unbiased")
    batch = {**rollout.batch, "old_logprobs": scores.old_logprobs, "advantages": advantages, **critic_batch}
    if ppo.kl.in_ == "loss":
        batch |= {"ref_logprobs": scores.ref_logprobs, "kl_coef": torch.full((len(rollout.samples),), kl_coef)}
    gap = None
    if rollout.engine_logprobs is not None:
        gap = algo.masked_mean((rollout.engine_logprobs - scores.old_logprobs).abs(), mask)
        if ppo.rollout_correction == "tis":
            weights = algo.truncated_importance_weights(scores.old_logprobs, rollout.engine_logprobs, mask, ppo.tis_cap)
            batch["tis_weights"] = weights
    return Experience(batch, kl, mask, gap)


def ppo_update(
    groups: dict[str, RoleGroup],
    experience: Experience,
    ppo: PpoSection,
    spec: TrainSpec,
    iteration: int,
    steps: StepCount,
    run_dir: Path,
) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """`ppo.ppo_epochs` passes over seeded mini-batches, each one optimizer step of policy and critic side by side.

    The figures of each step (policy's, critic's), averaged over the ranks.
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
    return policy_stats, critic_stats


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


def iteration_figures(
    scores: RolloutScores,
    experience: Experience,
    kl_coef: float,
    policy_stats: list[dict[str, float]],
    critic_stats: list[dict[str, float]],
) -> dict[str, float]:
    """An iteration's figures: reward, KL, the updates' means and their first step's (where the ratio is 1); the
    critic's only when there is one."""
    rewards, mask = scores.rewards, experience.mask
    first, policy_means = policy_stats[0], mean_of(policy_stats)
    return {
        "reward": float(rewards.mean()),
        "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
        "kl": float(experience.sequence_kl().mean()),
        "kl_coef": kl_coef,
        **policy_means,
        **(mean_of(critic_stats) if critic_stats else {}),  # no critic: a group estimator
        "loss": policy_means["policy_loss"],
        "first_ratio_max_dev": first["ratio_max_dev"],
        "first_policy_loss": first["policy_loss"],
        **({"first_value_loss": critic_stats[0]["value_loss"]} if critic_stats else {}),
        **({"rollout_logprob_gap": float(experience.rollout_gap)} if experience.rollout_gap is not None else {}),
        **(
            {"tis_weight": float(algo.masked_mean(tis, mask))}
            if (tis := experience.batch.get("tis_weights")) is not None
            else {}
        ),
        "entropy": float(algo.masked_mean(scores.entropy, mask)),  # of the rollout's sampling distribution
        "response_length": float(mask.sum(dim=1).mean()),
    }


def checkpoint_or_stop(
    groups: dict[str, RoleGroup],
    spec: TrainSpec,
    ppo: PpoSection,
    run_dir: Path,
    state: ControllerState,
    iterations: int,
) -> bool:
    """Save a checkpoint when one is due or a stop is asked for; True when the run stops here to be resumed.

    The last iteration saves no periodic checkpoint: final/ follows it. A stop asked for during the last
    iteration saves one and lets the run finish.
    """
    save_every = ppo.save_every or spec.output.save_steps
    stop_requested = (run_dir / REQUEST_FILE).exists()
    last = state.iteration == iterations
    if stop_requested or (save_every and state.iteration % save_every == 0 and not last):
        folder = save_checkpoint(groups, run_dir, state, spec.output.keep_last)
    if stop_requested and not last:
        (run_dir / RECORD_FILE).write_text(
            json.dumps({"step": state.iteration, "max_steps": iterations, "checkpoint": str(folder)})
        )
        return True
    return False
