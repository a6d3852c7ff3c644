"""The PPO controller: the loop on the driver that drives the role groups. Read `ppo_iterations` top to
bottom; `run_ppo` around it checks the input, places the roles, and restarts them after a lost actor.

    prompts -> policy.generate -> [reference log-probs | critic values | rewards] in parallel
            -> KL-shaped per-token rewards -> GAE -> ppo_epochs x mini-batches of (policy, critic) updates
            -> metrics -> checkpoint

The maths is `tuneyard.rlhf.ppo.algorithms` (pure torch); the roles are `tuneyard.rlhf.ppo.roles`; placement is
`tuneyard.rlhf.ppo.groups`. Tensors travel between driver and actors through Ray's object store.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase
from tuneyard.cluster.config import ClusterConfig
from tuneyard.rlhf.config import PpoSection, RewardSection
from tuneyard.rlhf.ppo import algorithms as algo
from tuneyard.rlhf.ppo.batches import build_samples, concat_rows, left_pad, select_rows, split_rows
from tuneyard.rlhf.ppo.groups import (
    RoleGroup,
    RoleStalled,
    plan_placement,
    present_roles,
    start_role_groups,
    wait_until_fits,
)
from tuneyard.rlhf.ppo.roles import CriticWorker, PolicyWorker, ReferenceWorker, RewardWorker
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
ROLE_CLASSES = {"policy": PolicyWorker, "critic": CriticWorker, "reference": ReferenceWorker, "reward": RewardWorker}


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


def kl_controller(ppo: PpoSection):
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
        saving = {role: groups[role].broadcast("save_checkpoint", str(folder / role)) for role in ("policy", "critic")}
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
    for role, name in (("policy", "final"), ("critic", "critic")):
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
) -> tuple[PreTrainedTokenizerBase, list[Prompt], str]:
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
    tokenizer = load_tokenizer(spec.model, spec.data.chat_template)
    train_rows, _ = read_splits(spec.data, spec.training.seed)
    prompts = tokenize_prompts(train_rows, tokenizer, ppo.max_prompt_length, "data.train")
    return tokenizer, prompts, critic_source(spec, ppo, reward, tokenizer.get_vocab())


def run_ppo(spec: TrainSpec, ppo: PpoSection, reward: RewardSection, run_dir: Path, cluster: ClusterConfig) -> None:
    """Train the policy with PPO on the current Ray cluster; write metrics, checkpoints and final/.

    A lost role actor (its process died, its node went away) or a stalled rank (`RoleGroup.results`)
    ends the attempt: every group is torn down and started again, resuming from the newest complete checkpoint, up to
    `training.max_failures` times.
    """
    import ray

    tokenizer, prompts, critic_start = prepare_ppo(spec, ppo, reward)
    iterations = total_iterations(ppo, len(prompts))
    roles = present_roles(spec, reward)
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
                start_role_groups(placement, classes, cluster, args, run_dir) as groups,
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
    samples_per_iteration = ppo.rollout_batch_size * ppo.samples_per_prompt
    metrics_path = run_dir / "metrics.jsonl"
    policy, critic = groups["policy"], groups["critic"]
    reference = groups.get("reference", policy)  # an adapter policy is its own reference
    reward_group = groups.get("reward")

    # --- resume: engines, KL coefficient and data position from the newest complete checkpoint
    kl_ctl = kl_controller(ppo)
    state = ControllerState(kl_coef=kl_ctl.value)
    checkpoint = resume_checkpoint(run_dir, resume)
    if checkpoint is not None:
        state = ControllerState(**json.loads((checkpoint / "controller.json").read_text()))
        kl_ctl.load_state_dict(state.kl_controller or {"value": state.kl_coef})
        policy.results(policy.broadcast("load_checkpoint", str(checkpoint / "policy")))
        critic.results(critic.broadcast("load_checkpoint", str(checkpoint / "critic")))
        log.info("resumed from %s at iteration %d", checkpoint, state.iteration)
    append_metrics(
        metrics_path, {"event": "start", "step": state.iteration, "total_steps": iterations, "time": time.time()}
    )
    save_every = ppo.save_every or spec.output.save_steps
    steps_per_iteration = ppo.ppo_epochs * (samples_per_iteration // ppo.mini_batch_size)
    optimizer_step, nonfinite = state.iteration * steps_per_iteration, []  # NaN/inf steps in a row

    for iteration in range(state.iteration, iterations):
        started = time.perf_counter()
        # --- rollout: the policy ranks answer their share of the prompts with the current weights
        batch_prompts = prompts_of_iteration(prompts, iteration, ppo.rollout_batch_size, spec.training.seed)
        samples = [p for p in batch_prompts for _ in range(ppo.samples_per_prompt)]
        prompt_ids, prompt_mask = left_pad([p.ids for p in samples], tokenizer.pad_token_id)
        seed = spec.training.seed + 100_003 * iteration
        shards = split_rows({"ids": prompt_ids, "mask": prompt_mask}, len(policy.actors))
        answers = policy.results(policy.call("generate", [(s["ids"], s["mask"], seed) for s in shards]))
        responses = [r for part in answers for r in part]
        batch = build_samples(prompt_ids, prompt_mask, responses, tokenizer.pad_token_id)
        mask = batch["action_mask"].float()
        generated = time.perf_counter()

        # --- score: reference log-probs, old log-probs, values and rewards, all groups at once
        old_refs = policy.scatter("logprobs", batch)
        ref_refs = reference.scatter("logprobs" if reference is not policy else "reference_logprobs", batch)
        value_refs = critic.scatter("values", batch)
        # rewards read text: a reward model re-tokenises it with its own tokenizer (rlhf/ppo/scoring.py)
        texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]
        conversations = [s.messages for s in samples]
        if reward_group is not None:
            per_rank = len(samples) // len(reward_group.actors)
            reward_refs = reward_group.call(
                "score",
                [(conversations[i : i + per_rank], texts[i : i + per_rank]) for i in range(0, len(samples), per_rank)],
            )
        scores = torch.tensor(function_scores(reward.functions, conversations, texts))
        if reward_group is not None:
            model_scores = torch.tensor([s for part in reward_group.results(reward_refs) for s in part])
            scores = scores + reward.model_weight * model_scores
        old = gather(policy, old_refs)
        old_logprobs, entropy = old["logprobs"], old["entropy"]
        ref_logprobs = gather(reference, ref_refs)["logprobs"]
        values = gather(critic, value_refs)["values"]
        scored = time.perf_counter()

        # --- advantages: KL-shaped per-token rewards, GAE, whitening
        kl = algo.kl_estimate(old_logprobs, ref_logprobs, ppo.kl.estimator) * mask
        kl_coef = kl_ctl.value
        rewards = algo.shape_rewards(scores, kl, mask, kl_coef)
        advantages, returns = algo.gae_advantages(rewards, values * mask, mask, ppo.gamma, ppo.lam)
        if ppo.whiten_advantages:
            advantages = algo.masked_whiten(advantages, mask)
        experience = {
            **batch,
            "old_logprobs": old_logprobs,
            "old_values": values,
            "advantages": advantages,
            "returns": returns,
        }

        # --- ppo_epochs over seeded mini-batches: policy and critic update side by side
        policy_stats, critic_stats = [], []
        order = torch.Generator().manual_seed(spec.training.seed + 7 * iteration)
        for _ in range(ppo.ppo_epochs):
            permutation = torch.randperm(samples_per_iteration, generator=order)
            for start in range(0, samples_per_iteration, ppo.mini_batch_size):
                mini = select_rows(experience, permutation[start : start + ppo.mini_batch_size])
                policy_refs = policy.scatter("train_step", mini)
                critic_refs = critic.scatter("train_step", mini)
                policy_stats.append(mean_of(policy.results(policy_refs)))
                critic_stats.append(mean_of(critic.results(critic_refs)))
                optimizer_step += 1
                if policy_stats[-1]["policy_skipped"] or critic_stats[-1]["critic_skipped"]:
                    nonfinite.append(optimizer_step)
                    event = {"event": "nonfinite", "step": iteration + 1, "optimizer_step": optimizer_step}
                    append_metrics(metrics_path, {**event, "in_a_row": len(nonfinite), "time": time.time()})
                    if len(nonfinite) > spec.training.max_nonfinite_steps:
                        where = f" (optimizer steps of policy and critic; PPO iteration {iteration + 1})"
                        message = nonfinite_stop_message(nonfinite, spec.training.max_nonfinite_steps, run_dir, where)
                        raise NonFiniteTraining(message)
                else:
                    nonfinite = []
        trained = time.perf_counter()

        # --- metrics, KL controller, checkpoint
        sequence_kl = (kl * mask).sum(dim=1)
        kl_ctl.update(float(sequence_kl.mean()), samples_per_iteration)
        first, policy_means = policy_stats[0], mean_of(policy_stats)
        record = {
            "step": iteration + 1,
            "reward": float(scores.mean()),
            "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
            "kl": float(sequence_kl.mean()),
            "kl_coef": kl_coef,
            **policy_means,
            **mean_of(critic_stats),
            "loss": policy_means["policy_loss"],
            "first_ratio_max_dev": first["ratio_max_dev"],
            "first_policy_loss": first["policy_loss"],
            "first_value_loss": critic_stats[0]["value_loss"],
            "entropy": float(algo.masked_mean(entropy, mask)),  # of the rollout's sampling distribution
            "response_length": float(mask.sum(dim=1).mean()),
            "generate_s": generated - started,
            "score_s": scored - generated,
            "train_s": trained - scored,
            "samples_per_s": samples_per_iteration / (trained - started),
            "time": time.time(),
        }
        state = ControllerState(
            iteration=iteration + 1,
            data_position=(iteration + 1) * ppo.rollout_batch_size,
            kl_coef=kl_ctl.value,
            kl_controller=kl_ctl.state_dict(),
        )
        append_metrics(metrics_path, record)
        if trackers is not None:
            trackers.log(record)
        stop_requested = (run_dir / REQUEST_FILE).exists()
        last = iteration + 1 == iterations
        if stop_requested or (save_every and (iteration + 1) % save_every == 0 and not last):
            folder = save_checkpoint(groups, run_dir, state, spec.output.keep_last)
        if stop_requested and not last:
            (run_dir / RECORD_FILE).write_text(
                json.dumps({"step": iteration + 1, "max_steps": iterations, "checkpoint": str(folder)})
            )
            return
    publish_models(groups, run_dir)
