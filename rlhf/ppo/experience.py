"""From a rollout to the training batch: rewards, the roles' per-token scores, and advantages.

    score_rollout        [old log-probs | reference log-probs | values] on the role groups, the rewards on the driver
                         meanwhile (`RewardScorer`: weighted functions, the reward model, DAPO's overlong penalty)
    estimate_advantages  KL estimate (in the reward or the loss), advantages (gae | grpo | dr_grpo | rloo |
                         reinforce_baseline), whitening, TIS weights, DAPO's overlong filter -> Experience
    with_update_logprobs when the update's forward took the old log-probs: the KL, the gap and the weights after it
    iteration_figures    what an iteration logs

Every log-prob here was taken at the sampling temperature (and top-p) by the roles, so the KL, the PPO ratio and
the TIS weights describe the distribution the answers came from.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from tuneyard.rlhf.config import PpoSection, RewardSection
from tuneyard.rlhf.ppo import algorithms as algo
from tuneyard.rlhf.ppo.batches import concat_rows, right_pad_values
from tuneyard.rlhf.ppo.groups import RoleGroup
from tuneyard.rlhf.ppo.rollout import Rollout, Sample
from tuneyard.rlhf.ppo.scoring import RewardCallFailed, function_scores
from tuneyard.rlhf.remote_reward import RemoteRewardClient, RemoteScore


@dataclass
class RolloutScores:
    """What the roles say of a rollout: sequence rewards and, per response token, log-probs, entropy and values."""

    rewards: torch.Tensor  # [B], the weighted reward functions plus the reward model (and any overlong penalty)
    # [B, R], the policy's before this iteration's updates, and its sampling distribution's entropy; None until the
    # update when the update's own forward takes them (`PpoSection.old_logprobs_from_update`)
    old_logprobs: torch.Tensor | None
    entropy: torch.Tensor | None
    ref_logprobs: torch.Tensor  # [B, R]
    values: torch.Tensor | None  # [B, R], the critic's (None without a critic)


@dataclass
class Experience:
    """The training batch of an iteration (layout, old log-probs and values, advantages, returns) and its KL."""

    batch: dict[str, torch.Tensor]
    kl: torch.Tensor | None  # [B, R] per-token KL estimate to the reference, 0 off the response (None: until known)
    mask: torch.Tensor  # [B, R] every sampled token (the batch's action_mask may leave filtered answers out)
    rollout_gap: torch.Tensor | None = None  # mean |engine - policy| log-prob of the sampled tokens (vLLM only)

    def sequence_kl(self) -> torch.Tensor:
        """The KL of each response, summed over its tokens."""
        return (self.kl * self.mask).sum(dim=1)


@dataclass
class RewardScorer:
    """A sample's reward: the weighted named functions (threads on the driver, a timeout per call), plus the reward
    model's score at its weight (the reward group), plus a remote service's at its weight, plus DAPO's soft
    overlong penalty. An answer whose remote call failed after its retries has no reward (nan): it is left out of
    the loss and of its group's baseline, and counted."""

    section: RewardSection
    model_group: RoleGroup | None
    ppo: PpoSection
    remote: RemoteRewardClient | None = None

    def __post_init__(self) -> None:
        if self.section.remote is not None and self.remote is None:
            self.remote = RemoteRewardClient(self.section.remote)

    def score(self, samples: list[Sample]) -> None:
        """Set each sample's reward (the reward model and the remote service score while the functions run)."""
        conversations, texts = [s.prompt.messages for s in samples], [s.text for s in samples]
        group = self.model_group
        if group is not None:
            # rewards read text: a reward model re-tokenises it with its own tokenizer (rlhf/ppo/scoring.py)
            ranks = len(group.actors)
            bounds = [round(rank * len(texts) / ranks) for rank in range(ranks + 1)]
            model_refs = group.call("score", [(conversations[a:b], texts[a:b]) for a, b in itertools.pairwise(bounds)])
        section = self.section
        remote_calls = self.call_remote(samples) if self.remote is not None else None
        rewards = torch.tensor(
            function_scores(section.functions, conversations, texts, section.timeout_s, section.parallel_calls)
        )
        if group is not None:
            model_scores = torch.tensor([s for part in group.results(model_refs) for s in part])
            rewards = rewards + section.model_weight * model_scores
        if remote_calls is not None:
            rewards = rewards + section.remote.weight * self.remote_rewards(remote_calls)
        rewards = rewards + self.overlong_penalties(samples)
        rewards = rewards + torch.tensor([s.environment_reward for s in samples])
        for sample, reward in zip(samples, rewards.tolist(), strict=True):
            sample.reward = reward

    def call_remote(self, samples: list[Sample]) -> Iterator[RemoteScore]:
        """Start the remote service's calls, `reward.parallel_calls` at a time; their scores, in order, as they end."""
        pool = ThreadPoolExecutor(max_workers=self.section.parallel_calls, thread_name_prefix="tuneyard-remote")

        def one(sample: Sample) -> RemoteScore:
            metadata = {
                **sample.prompt.metadata,
                "finished": sample.finished,
                "tokens": len(sample.tokens),
                "version": sample.version,
            }
            return self.remote.score(sample.prompt.messages, sample.text, metadata)

        calls = pool.map(one, samples)  # every call is bounded by its attempts' timeouts and backoffs
        pool.shutdown(wait=False)
        return calls

    def remote_rewards(self, calls: Iterator[RemoteScore]) -> torch.Tensor:
        """[B] the remote service's rewards, nan where a call failed; too many failures end the run."""
        scores = list(calls)
        failed = [s for s in scores if s.reward is None]
        limit = self.section.remote.max_failed_frac
        if failed and len(failed) > limit * len(scores):
            raise RewardCallFailed(
                f"reward.remote: {len(failed)} of {len(scores)} answers got no reward from {self.remote.url} after "
                f"{self.section.remote.retries + 1} attempts each, over reward.remote.max_failed_frac ({limit:g}); the "
                f"last error: {failed[-1].error}. Check that the service is up and answers POST requests with "
                '{"reward": <number>} within reward.remote.timeout_s, then run the job again to resume from its '
                "newest checkpoint"
            )
        return torch.tensor([float("nan") if s.reward is None else s.reward for s in scores])

    def overlong_penalties(self, samples: list[Sample]) -> torch.Tensor:
        """[B] DAPO's soft overlong penalty of each answer (0 without `ppo.overlong.buffer`)."""
        overlong = self.ppo.overlong
        lengths = torch.tensor([len(s.tokens) for s in samples])
        if not overlong.buffer:
            return torch.zeros(len(samples))
        return algo.overlong_penalty(lengths, self.ppo.generation.max_new_tokens, overlong.buffer, overlong.penalty)


def gather(group: RoleGroup, refs: list) -> dict[str, torch.Tensor]:
    """The ranks' answers to one call of `group` (dicts of tensors) joined in rank order."""
    return concat_rows(group.results(refs))


def score_rollout(groups: dict[str, RoleGroup], rollout: Rollout, rewards: RewardScorer) -> RolloutScores:
    """Old log-probs, reference log-probs and values of the rollout, every group computing at once, and the rewards
    on the driver meanwhile (unless dynamic sampling or the async loop scored them already; the async loop also
    takes the reference's log-probs as a batch arrives). The old log-probs are left to the update when its own
    forward takes them (`PpoSection.old_logprobs_from_update`).

    An adapter policy is its own reference (its base with the adapter off).
    """
    policy, critic = groups["policy"], groups.get("critic")
    reference = groups.get("reference", policy)
    batch = rollout.batch
    old_refs = None if rewards.ppo.old_logprobs_from_update else policy.scatter("logprobs", batch)
    ref_refs = None
    if rollout.reference_logprobs is None:
        ref_refs = reference.scatter("logprobs" if reference is not policy else "reference_logprobs", batch)
    value_refs = critic.scatter("values", batch) if critic is not None else None
    if rollout.rewards is None:
        rewards.score(rollout.samples)
    old = gather(policy, old_refs) if old_refs is not None else {"logprobs": None, "entropy": None}
    return RolloutScores(
        rewards=rollout.rewards,
        old_logprobs=old["logprobs"],
        entropy=old["entropy"],
        ref_logprobs=rollout.reference_logprobs if ref_refs is None else gather(reference, ref_refs)["logprobs"],
        values=gather(critic, value_refs)["values"] if critic is not None else None,
    )


def estimate_advantages(rollout: Rollout, scores: RolloutScores, ppo: PpoSection, kl_coef: float) -> Experience:
    """Per-token rewards (the sample's reward on its last token, minus kl_coef x KL when the KL is in the reward),
    then the advantages of `ppo.advantage`: GAE on the critic's values, or a group estimator's reward relative to
    the other answers to the same prompt, carried to every token as the return from it on. With
    `ppo.overlong.filter` a truncated answer still counts in its group's baseline, but not in the loss. An answer
    without a reward (nan: its remote reward call failed) is in neither.

    Without old log-probs yet (the update's forward takes them) the batch carries the engine's log-probs instead,
    for the policy to weigh its tokens with, and the KL and the engine's gap wait for `with_update_logprobs`."""
    mask = rollout.mask
    old_known = scores.old_logprobs is not None
    kl, gap, weights = policy_logprob_terms(rollout, scores, ppo) if old_known else (None, None, None)
    # clipped before any group baseline, so one outlier answer cannot move its whole group's baseline
    sample_rewards = algo.clip_scores(scores.rewards, ppo.reward_clip)
    scored = sample_rewards.isfinite()
    kl_in_reward = kl_coef if ppo.kl.in_ == "reward" else 0.0
    reward_kl = kl if kl is not None else torch.zeros_like(mask)  # not in the reward when unknown (the config's rule)
    if ppo.has_critic:
        rewards = algo.shape_rewards(sample_rewards.nan_to_num(0.0), reward_kl, mask, kl_in_reward)
        advantages, returns = algo.gae_advantages(rewards, scores.values * mask, mask, ppo.gamma, ppo.lam)
        critic_batch = {"old_values": scores.values, "returns": returns}
    else:
        relative = algo.group_relative_scores(sample_rewards, ppo.samples_per_prompt, ppo.advantage)
        rewards = algo.shape_rewards(relative, reward_kl, mask, kl_in_reward)
        advantages, critic_batch = algo.returns_to_go(rewards, mask, ppo.gamma), {}
    # DAPO's overlong filtering: a truncated answer's tokens leave the policy's and the critic's loss (and the
    # whitening's statistics), while its reward still counted in its group's baseline above
    trained = mask * rollout.finished.unsqueeze(1).to(mask.dtype) if ppo.overlong.filter else mask
    trained = trained * scored.unsqueeze(1).to(mask.dtype)
    # GRPO, Dr. GRPO and RLOO are already on a per-group scale; GAE and REINFORCE++'s baseline are whitened
    if ppo.whiten_advantages and ppo.advantage in ("gae", "reinforce_baseline"):
        advantages = algo.masked_whiten(advantages, trained, unbiased=ppo.whiten_variance == "unbiased")
    batch = {**rollout.batch, "advantages": advantages, **critic_batch}
    if ppo.kl.in_ == "loss":
        batch |= {"ref_logprobs": scores.ref_logprobs, "kl_coef": torch.full((len(rollout.samples),), kl_coef)}
    if old_known:
        batch["old_logprobs"] = scores.old_logprobs
        if weights is not None:
            batch["behaviour_weights"] = weights
    elif rollout.behaviour_logprobs is not None and ppo.rollout_correction != "none":
        batch["behaviour_logprobs"] = rollout.behaviour_logprobs
    batch["action_mask"] = trained.to(batch["action_mask"].dtype)
    return Experience(batch, kl, mask, gap)


def policy_logprob_terms(
    rollout: Rollout, scores: RolloutScores, ppo: PpoSection
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """What the policy's pre-update log-probs give: the per-token KL estimate to the reference (0 off the response),
    the mean |engine - policy| log-prob gap and the rollout correction's weights (both None without engine
    log-probs)."""
    mask = rollout.mask
    kl = algo.clamp_kl(algo.kl_estimate(scores.old_logprobs, scores.ref_logprobs, ppo.kl.estimator), ppo.kl.clamp)
    behaviour = rollout.behaviour_logprobs
    if behaviour is None:
        return kl * mask, None, None
    gap = algo.masked_mean((behaviour - scores.old_logprobs).abs(), mask)
    weights = algo.rollout_correction_weights(ppo.rollout_correction, scores.old_logprobs, behaviour, mask, ppo.tis_cap)
    return kl * mask, gap, weights


def with_update_logprobs(
    rollout: Rollout, scores: RolloutScores, experience: Experience, ppo: PpoSection, taken: dict[str, torch.Tensor]
) -> None:
    """Fill in what waited for the update's own log-probs (`taken`: the policy's forward before its one optimizer
    step, in the rollout's order): the scores' old log-probs and entropy, the KL, the engine's gap, and the
    behaviour weights the policy computed the same way (for the figures)."""
    scores.old_logprobs, scores.entropy = taken["logprobs"], taken["entropy"]
    experience.kl, experience.rollout_gap, weights = policy_logprob_terms(rollout, scores, ppo)
    if weights is not None:
        experience.batch["behaviour_weights"] = weights


def current_weights_gap(rollout: Rollout, old_logprobs: torch.Tensor, version: int) -> dict[str, float]:
    """The largest |engine - policy| log-prob over the tokens the engines drew with the weights the policy holds now
    (`version`): about 0 however stale the other tokens are, when each token's behaviour log-prob is the one its own
    version drew it with (partial rollouts). {} without engine log-probs or without such tokens."""
    if rollout.behaviour_logprobs is None or any(s.token_versions is None for s in rollout.samples):
        return {}
    versions = right_pad_values([[float(v) for v in s.token_versions] for s in rollout.samples])
    current = (versions == version) & (rollout.mask > 0)
    if not current.any():
        return {}
    return {"rollout_logprob_gap_current_max": float((rollout.behaviour_logprobs - old_logprobs).abs()[current].max())}


def behaviour_figures(weights: torch.Tensor | None, mask: torch.Tensor) -> dict[str, float]:
    """The mean behaviour weight of the trained tokens (`tis_weight`), and the share decoupled PPO masked out."""
    if weights is None:
        return {}
    masked = (weights == 0) & (mask > 0)
    return {
        "tis_weight": float(algo.masked_mean(weights, mask)),
        "behaviour_masked_frac": float(algo.masked_mean(masked.float(), mask)),
    }


def mean_of(dicts: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean of the ranks' (or steps') figures; ratio_max_dev is a max."""
    keys = dicts[0].keys()
    return {
        k: max(d[k] for d in dicts) if k == "ratio_max_dev" else sum(d[k] for d in dicts) / len(dicts) for k in keys
    }


def iteration_figures(
    rollout: Rollout,
    scores: RolloutScores,
    experience: Experience,
    kl_coef: float,
    policy_stats: list[dict[str, float]],
    critic_stats: list[dict[str, float]],
) -> dict[str, float]:
    """An iteration's figures: reward, KL, the updates' means and their first step's (where the ratio is 1), how the
    answers ended; the critic's only when there is one, the engine's log-prob gap only with engine log-probs."""
    mask = experience.mask
    rewards = scores.rewards[scores.rewards.isfinite()]  # an answer whose remote call failed has none
    first, policy_means = policy_stats[0], mean_of(policy_stats)
    return {
        "reward": float(rewards.mean()) if len(rewards) else float("nan"),
        "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
        "reward_failures": len(scores.rewards) - len(rewards),
        "kl": float(experience.sequence_kl().mean()),
        "kl_coef": kl_coef,
        **policy_means,
        **(mean_of(critic_stats) if critic_stats else {}),  # no critic: a group estimator
        "loss": policy_means["policy_loss"],
        "first_ratio_max_dev": first["ratio_max_dev"],
        "first_policy_loss": first["policy_loss"],
        **({"first_value_loss": critic_stats[0]["value_loss"]} if critic_stats else {}),
        **({"rollout_logprob_gap": float(experience.rollout_gap)} if experience.rollout_gap is not None else {}),
        **behaviour_figures(experience.batch.get("behaviour_weights"), experience.batch["action_mask"].float()),
        "entropy": float(algo.masked_mean(scores.entropy, mask)),  # of the rollout's sampling distribution
        "response_length": float(mask.sum(dim=1).mean()),
        "truncated_frac": float((~rollout.finished).float().mean()),
        **rollout.figures,
    }
