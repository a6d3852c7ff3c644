"""PPO maths for RLHF as pure torch functions: masked statistics, loss aggregation, KL estimators and the KL
loss, reward clipping and shaping, DAPO's overlong penalty and group filter, GAE and the critic-free group
estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++-baseline) with returns-to-go, the clipped (clip-higher, dual-clipped)
policy loss and the value loss, the sampling distribution's logits (temperature, top-p) with entropy/log-probs
from logits, and the KL-coefficient controllers.

Conventions: per-token tensors are float [B, T] over response positions only (index t is the t-th response
token), and `mask` is a [B, T] bool or 0/1 float tensor that is 1 on real tokens, contiguous from t=0
(right padding). Values at masked-out positions never influence a result: they are selected away with
`torch.where` rather than multiplied by 0, so inf/nan padding cannot leak in as nan.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

KL_ESTIMATORS = ("k1", "k2", "k3")
ADVANTAGE_ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_baseline")
# the estimators that need no critic: a sample's baseline is the other answers to the same prompt
GROUP_ESTIMATORS = ADVANTAGE_ESTIMATORS[1:]
AGGREGATIONS = ("sequence_mean", "token_mean")


def _bool(mask: Tensor) -> Tensor:
    """The mask as a bool tensor."""
    return mask if mask.dtype == torch.bool else mask != 0


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of x over the masked entries (all of them when dim is None, else along dim)."""
    kept = torch.where(_bool(mask), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over the masked entries (all of them when dim is None, else along dim); 0 where none."""
    count = _bool(mask).sum() if dim is None else _bool(mask).sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of x over all masked entries (Bessel-corrected when unbiased)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        # stays a tensor op (no .item() sync); one entry gives 0 rather than 0/0
        count = _bool(mask).sum().to(x.dtype)
        var = var * count / (count - 1).clamp(min=1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8, unbiased: bool = True) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries, 0 elsewhere; shift_mean False keeps the mean."""
    # unbiased False is the population variance OpenRLHF whitens with; over a batch of many tokens the two agree
    # closely, but they differ visibly on small batches, so the choice is left to the config
    mean, var = masked_mean(x, mask), masked_var(x, mask, unbiased=unbiased)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(_bool(mask), whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))


def sequence_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Loss aggregation: the masked mean over each row's tokens, then the plain mean over rows."""
    # every sequence weighs the same whatever its length, and equal-size micro-batches average to the batch value
    return masked_mean(x, mask, dim=-1).mean()


def aggregate(x: Tensor, mask: Tensor, how: str = "sequence_mean") -> Tensor:
    """Reduce a per-token loss [B, T] to a scalar: "sequence_mean" (see sequence_mean) or "token_mean"."""
    if how == "sequence_mean":
        return sequence_mean(x, mask)
    if how == "token_mean":
        # every real token weighs the same, so long responses weigh more (OpenRLHF's and DAPO's default)
        return masked_mean(x, mask)
    raise ValueError(f"unknown loss aggregation '{how}'; valid: {', '.join(AGGREGATIONS)}")


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(policy || reference) for tokens sampled from the policy (k1, k2 or k3)."""
    # Schulman, "Approximating KL divergence": k1 is unbiased, k2 low-variance but biased, k3 unbiased and >= 0
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        # expm1 keeps precision when the policy is close to the reference (log_ratio ~ 0)
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator '{estimator}'; valid: {', '.join(KL_ESTIMATORS)}")


def _clamp_symmetric(x: Tensor, limit: float | None, what: str) -> Tensor:
    """x clamped to [-limit, limit]; x itself when limit is None."""
    if limit is None:
        return x
    # a limit of 0 would erase the signal and a negative one would invert the bounds, so both are refused
    if not limit > 0:
        raise ValueError(f"the {what} limit must be a positive number or None, not {limit}")
    return x.clamp(-limit, limit)


def clip_scores(scores: Tensor, limit: float | None) -> Tensor:
    """Each sample's scalar reward clamped to [-limit, limit]; unchanged when limit is None."""
    # bounds reward-model outliers before they reach the group statistics or the returns. OpenRLHF clamps to
    # (-10, 10) too, but inside compute_reward, i.e. after the group baseline of rloo/group_norm/dr_grpo/
    # reinforce_baseline has been subtracted; clipping the raw score first keeps one outlier from shifting the
    # baseline of every other answer to its prompt
    return _clamp_symmetric(scores, limit, "reward")


def clamp_kl(kl: Tensor, limit: float | None) -> Tensor:
    """A per-token KL estimate clamped to [-limit, limit]; unchanged when limit is None."""
    # k3 grows like exp(-log_ratio) where the reference is far likelier than the policy, and one such token can
    # dominate the penalty; OpenRLHF's compute_approx_kl always clamps to +-10, here it is an option (None: off).
    # the clamp has no gradient beyond the limit, so in a KL loss those tokens stop pulling towards the reference
    return _clamp_symmetric(kl, limit, "KL")


def kl_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    estimator: str = "k3",
    limit: float | None = None,
    aggregation: str = "sequence_mean",
) -> Tensor:
    """The aggregated per-token KL(policy || reference) estimate, as a loss term (GRPO's KL in the loss)."""
    keep = _bool(mask)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    # padding is selected away before the estimator: k3's exp of a garbage (-inf) log-ratio would be inf there,
    # and even unselected, its backward would be 0 * inf = nan in the gradient of logprobs
    logprobs = torch.where(keep, logprobs, zero)
    # the reference is a fixed target: detached so no gradient reaches it even when it was computed with one
    ref_logprobs = torch.where(keep, ref_logprobs.detach().to(logprobs.dtype), zero)
    # k3 by default as in GRPO (Shao et al. 2024): unbiased and never negative, so the loss cannot reward drifting
    kl = clamp_kl(kl_estimate(logprobs, ref_logprobs, estimator), limit)
    return aggregate(kl, mask, aggregation)


def shape_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards: -kl_coef * kl on each response token plus each row's score on its last real token."""
    keep = _bool(mask)
    zero = torch.zeros((), dtype=kl.dtype, device=kl.device)
    rewards = torch.where(keep, -kl_coef * kl, zero)
    lengths = keep.sum(-1)
    last = (lengths - 1).clamp(min=0).unsqueeze(-1)
    # a row of length 0 has no token to carry its score, so its score is dropped
    score = torch.where(lengths > 0, scores.to(rewards.dtype), zero).unsqueeze(-1)
    return rewards.scatter_add(-1, last, score)


def overlong_penalty(lengths: Tensor, max_length: int, buffer: int, factor: float) -> Tensor:
    """DAPO's soft overlong punishment of each answer: 0 up to `max_length - buffer` tokens, then falling linearly
    to -factor at `max_length` (Yu et al. 2025, eq. 13; verl's and OpenRLHF's overlong buffer)."""
    if not 0 < buffer <= max_length:
        raise ValueError(f"the overlong buffer must be in 1..{max_length} tokens, not {buffer}")
    exceed = (lengths.to(torch.float64) - (max_length - buffer)).clamp(min=0)
    # answers never run past max_length here (generation stops there), so the penalty bottoms out at -factor
    return -(exceed.clamp(max=buffer) / buffer * factor).to(torch.float32)


def informative_groups(scores: Tensor, group_size: int) -> Tensor:
    """One bool per group of `group_size` consecutive answers: True where their rewards differ.

    A group of equal rewards has a group-relative advantage of 0 for every answer, so it carries no learning signal;
    DAPO's dynamic sampling drops such groups (verl keeps the groups whose metric has std > 0)."""
    if scores.dim() != 1 or scores.numel() % group_size:
        raise ValueError(f"{tuple(scores.shape)} scores do not split into groups of {group_size} consecutive answers")
    groups = scores.reshape(-1, group_size)
    scored = groups.isfinite()  # an answer without a reward (its remote call failed) tells nothing
    return groups.where(scored, -math.inf).amax(-1) > groups.where(scored, math.inf).amin(-1)


def group_relative_scores(scores: Tensor, group_size: int, estimator: str, eps: float = 1e-6) -> Tensor:
    """Each score relative to the other answers to its prompt; the group_size answers of a prompt are consecutive."""
    if estimator not in GROUP_ESTIMATORS:
        raise ValueError(f"'{estimator}' is not a group advantage estimator; valid: {', '.join(GROUP_ESTIMATORS)}")
    # one answer per prompt leaves no other answer to compare with: the score minus its own mean is always 0,
    # RLOO's leave-one-out mean would be 0/0 and GRPO's std nan
    if group_size < 2:
        raise ValueError(f"{estimator} needs group_size >= 2 answers per prompt, not {group_size}")
    if scores.dim() != 1 or scores.numel() % group_size:
        raise ValueError(f"{tuple(scores.shape)} scores do not split into groups of {group_size} consecutive answers")
    # verifiable rewards may arrive as integers, and a mean needs a float
    groups = (scores if scores.is_floating_point() else scores.float()).reshape(-1, group_size)
    if not groups.isfinite().all():
        return relative_to_scored(groups, estimator, eps).reshape(scores.shape)
    mean = groups.mean(-1, keepdim=True)
    if estimator == "grpo":
        # Shao et al. 2024 as TRL and OpenRLHF's group_norm do it: the unbiased (Bessel) std of the group. eps is
        # 1e-9 in OpenRLHF and 1e-4 in TRL; it keeps a group of equal scores (std 0) at 0 rather than 0/0, and
        # otherwise only scales a group by std / (std + eps)
        relative = (groups - mean) / (groups.std(-1, keepdim=True) + eps)
    elif estimator == "rloo":
        # leave-one-out: the baseline of an answer is the mean of the group_size - 1 others (Ahmadian et al. 2024)
        relative = groups - (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    else:
        # dr_grpo: GRPO without the std division, since dividing by a small std inflates the prompts whose answers
        # barely differ (Liu et al. 2025); reinforce_baseline: the same group-mean baseline, whitened over the
        # whole batch later (OpenRLHF computes the two identically and whitens only reinforce_baseline)
        relative = groups - mean
    return relative.reshape(scores.shape)


def relative_to_scored(groups: Tensor, estimator: str, eps: float) -> Tensor:
    """`group_relative_scores` of [prompts, group_size] scores where some answers have none (nan: their remote
    reward call failed): each group's statistics over its scored answers alone, as if the others had not been
    sampled, and 0 for the unscored answers and for a group with fewer than two scored ones (no comparison)."""
    scored = groups.isfinite()
    count = scored.sum(-1, keepdim=True)
    values = groups.where(scored, 0.0)
    total = values.sum(-1, keepdim=True)
    mean = total / count.clamp(min=1)
    if estimator == "grpo":
        variance = ((values - mean) ** 2 * scored).sum(-1, keepdim=True) / (count - 1).clamp(min=1)
        relative = (values - mean) / (variance.sqrt() + eps)
    elif estimator == "rloo":
        relative = values - (total - values) / (count - 1).clamp(min=1)
    else:
        relative = values - mean
    return relative.where(scored & (count >= 2), 0.0)


@torch.no_grad()
def gae_advantages(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """(advantages, returns) by generalised advantage estimation; the episode ends after each row's last token.

    A masked position inside a row (a multi-turn episode's environment tokens, which the policy did not choose) is
    not a step: the sampled token before it bootstraps from the next sampled token's value, as GAE over the row's
    sampled tokens alone would."""
    # no_grad: advantages and returns are fixed targets for the update, never a path for gradients into the critic
    keep = _bool(mask)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    # zeroed padding makes V after the last real token 0 (terminal) and keeps A at padded positions 0
    rewards = torch.where(keep, rewards.to(values.dtype), zero)
    values = torch.where(keep, values, zero)
    steps = rewards.shape[-1]
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[..., 0])
    next_advantage = torch.zeros_like(values[..., 0])
    for t in reversed(range(steps)):
        delta = rewards[..., t] + gamma * next_value - values[..., t]
        advantage = delta + gamma * lam * next_advantage
        advantages[..., t] = advantage
        step = keep[..., t]  # a masked position carries the next step's value and advantage through unchanged
        next_value = torch.where(step, values[..., t], next_value)
        next_advantage = torch.where(step, advantage, next_advantage)
    advantages = torch.where(keep, advantages, zero)
    returns = torch.where(keep, advantages + values, zero)
    return advantages, returns


@torch.no_grad()
def returns_to_go(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """The discounted sum of each row's rewards from token t to its last real token; 0 on padding."""
    # no_grad as in gae_advantages: for the critic-free estimators this return is the advantage, a fixed target
    keep = _bool(mask)
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    # zeroed padding ends each episode after its last real token and keeps nan/inf padding out of the sums
    rewards = torch.where(keep, rewards, zero)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in reversed(range(rewards.shape[-1])):
        running = rewards[..., t] + gamma * running
        returns[..., t] = running
    return torch.where(keep, returns, zero)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float,
    *,
    clip_range_high: float | None = None,
    dual_clip: float | None = None,
    aggregation: str = "sequence_mean",
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate loss and its stats (clip_frac, approx_kl, ratio_max_dev; dual_clip_frac if dual_clip).

    The ratio is clipped to [1 - clip_range, 1 + clip_range_high] (clip_range_high None: clip_range; DAPO's
    clip-higher raises only the upper bound). `token_weights` (constants, e.g. truncated importance weights) scale
    each token's loss before aggregation."""
    # at or below 1 the bound dual_clip * |A| would cut into the ordinary PPO objective at ratio 1 itself
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1 (or None), not {dual_clip}")
    keep = _bool(mask)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    # padded log-probs may be garbage (e.g. -inf); selecting them away before exp keeps loss and grads finite
    log_ratio = torch.where(keep, logprobs - old_logprobs, zero)
    advantages = torch.where(keep, advantages.to(logprobs.dtype), zero)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    high = clip_range if clip_range_high is None else clip_range_high
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + high)
    per_token = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        # dual-clip PPO (Ye et al. 2020), as OpenRLHF's PolicyLoss: with A < 0 the PPO loss -A * r grows without
        # bound in the ratio, so a token the old policy found unlikely can swamp the batch; min(loss, c * |A|) caps it
        # (OpenRLHF's max(min(surr1, surr2), c * A) in objective terms, negated)
        bound = -dual_clip * advantages
        dual_clipped = (advantages < 0) & (per_token > bound)
        per_token_dual = torch.where(dual_clipped, bound, per_token)
    else:
        per_token_dual = per_token
    if token_weights is not None:
        per_token_dual = per_token_dual * torch.where(keep, token_weights.to(logprobs.dtype), zero)
    loss = aggregate(per_token_dual, mask, aggregation)
    with torch.no_grad():
        deviation = torch.where(keep, (ratio - 1).abs(), zero)
        stats = {
            "clip_frac": masked_mean((clipped > unclipped).to(logprobs.dtype), mask),
            # k3 of old vs new; from log_ratio directly rather than log(exp(...))
            "approx_kl": masked_mean(ratio - 1 - log_ratio, mask),
            "ratio_max_dev": deviation.max() if deviation.numel() else zero.clone(),
        }
        if dual_clip is not None:
            stats["dual_clip_frac"] = masked_mean(dual_clipped.to(logprobs.dtype), mask)
    return loss, stats


def truncated_importance_weights(policy_logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor, cap: float) -> Tensor:
    """TIS: min(p_policy / p_engine, cap) per sampled token (1 off the response), as OpenRLHF's and verl's.

    The engine sampled from its own numbers; this reweights each token's loss toward the policy's distribution,
    truncated so a token the engine found far likelier than the policy cannot dominate a batch."""
    keep = _bool(mask)
    log_ratio = torch.where(keep, policy_logprobs - engine_logprobs, torch.zeros_like(policy_logprobs))
    return torch.exp(log_ratio).clamp(max=cap)


def decoupled_behaviour_weights(
    proximal_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, cap: float
) -> Tensor:
    """Decoupled PPO's behaviour weight (AReaL): w = p_proximal / p_behaviour per sampled token, 0 where w > cap.

    With samples from older weights than the policy's, PPO's objective splits in two (Hilton et al. 2021, "Batch
    size-invariance for policy optimization"; AReaL, Fu et al. 2025):

        loss = -w * min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A),   r = p_theta / p_proximal

    The trust region is kept around the proximal policy (the policy's own log-probs of the samples before the
    iteration's updates: `old_logprobs`, from a pass or the one step's own forward), and w corrects for the behaviour
    policy that sampled them (the engine's log-probs, taken with the weights it had). Unlike TIS, a token whose
    weight exceeds the cap is masked out of the loss rather than truncated, as AReaL's `behav_imp_weight_cap`; off
    the response w is 1. The weight scales the PPO term only: a masked token still counts in the aggregation's
    denominator (as AReaL's), and the KL-in-loss and entropy terms still see it."""
    keep = _bool(mask)
    log_ratio = torch.where(keep, proximal_logprobs - behaviour_logprobs, torch.zeros_like(proximal_logprobs))
    weights = torch.exp(log_ratio)
    return torch.where(keep & (weights > cap), torch.zeros_like(weights), weights)


def rollout_correction_weights(
    correction: str, policy_logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor, cap: float
) -> Tensor | None:
    """The per-token weights of `ppo.rollout_correction` (tis: truncated, decoupled: masked over the cap); None for
    none. `policy_logprobs` are the policy's before the iteration's updates (decoupled PPO's proximal)."""
    if correction == "tis":
        return truncated_importance_weights(policy_logprobs, engine_logprobs, mask, cap)
    if correction == "decoupled":
        return decoupled_behaviour_weights(policy_logprobs, engine_logprobs, mask, cap)
    return None


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range: float | None,
    *,
    aggregation: str = "sequence_mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss 0.5 * max((V - R)^2, (V_clipped - R)^2) (plain when clip_range is None) and its stats."""
    keep = _bool(mask)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    # as in policy_loss: padded targets are selected away so garbage there cannot reach the loss or grads
    returns = torch.where(keep, returns.to(values.dtype), zero)
    old_values = torch.where(keep, old_values.to(values.dtype), zero)
    values = torch.where(keep, values, zero)
    unclipped = (values - returns) ** 2
    if clip_range is None:
        return 0.5 * aggregate(unclipped, mask, aggregation), {"value_clip_frac": zero.clone()}
    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * aggregate(torch.maximum(unclipped, clipped), mask, aggregation)
    with torch.no_grad():
        stats = {"value_clip_frac": masked_mean((clipped > unclipped).to(values.dtype), mask)}
    return loss, stats


def sampling_logits(logits: Tensor, temperature: float = 1.0, top_p: float = 1.0, keep: Tensor | None = None) -> Tensor:
    """The logits of the distribution the rollout engines sample from: logits / temperature, and with top_p < 1 the
    tokens outside the nucleus at -inf, the nucleus cut as HF's TopPLogitsWarper and vLLM's sampler cut it.

    Log-probs, entropy, KL and importance weights are all taken from these logits, so they describe the distribution
    the answers came from. `keep` [...] holds one token id per position (the sampled one) that stays in the nucleus:
    a token the old weights sampled can fall just outside the new weights' nucleus, and a log-prob of -inf there
    would make the PPO ratio 0 and its gradient nan."""
    if not temperature > 0:
        raise ValueError(f"the sampling temperature must be > 0, not {temperature} (greedy answers are scored at 1)")
    scaled = logits.float() if temperature == 1.0 else logits.float() / temperature
    if top_p >= 1.0:
        return scaled
    with torch.no_grad():
        ascending, order = scaled.sort(dim=-1)
        # the mass of the tokens below each one: those whose tail mass is <= 1 - top_p fall outside the nucleus
        outside_sorted = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1.0 - top_p
        outside_sorted[..., -1] = False  # the likeliest token always stays
        outside = torch.zeros_like(outside_sorted).scatter(-1, order, outside_sorted)
        if keep is not None:
            outside.scatter_(-1, keep.long().unsqueeze(-1), False)
    return scaled.masked_fill(outside, float("-inf"))


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dim, per position (shape logits.shape[:-1])."""
    logits = logits.float()
    # entropy is shift-invariant; shifting the max to 0 avoids the cancellation of two large terms in
    # logZ - sum p * logits when logits are large (the shift is a constant, so it is detached)
    logits = logits - logits.amax(dim=-1, keepdim=True).detach()
    probs = torch.softmax(logits, dim=-1)
    # top-k/top-p filtered entries arrive as -inf: their probability is 0 and so is their term, selected away
    # rather than multiplied (0 * -inf is nan, and so would be the backward of any finite stand-in times a large
    # upstream gradient, such as a loss scale's)
    finite = torch.where(torch.isfinite(logits), logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
    # H = logZ - sum p * logits: no log of a probability, so no log(0) for vanishing ones
    return torch.logsumexp(logits, dim=-1) - (probs * finite).sum(-1)


def logprobs_from_logits(logits: Tensor, tokens: Tensor) -> Tensor:
    """Log-probabilities of `tokens` [B, T] under logits [B, T, V], computed in float32."""
    # float32: bf16 log-softmax over a large vocabulary is too coarse for PPO ratios
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return log_probs.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float) -> None:
        """Start at kl_coef."""
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt: the coefficient stays fixed."""

    def state_dict(self) -> dict:
        """The coefficient, for checkpoints."""
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        """Restore the coefficient from a checkpoint."""
        self.value = float(state["value"])


class AdaptiveKLController:
    """KL coefficient steered towards a target KL (Ziegler et al. 2019, "Fine-Tuning LMs from Human Preferences")."""

    def __init__(self, kl_coef: float, target: float, horizon: int) -> None:
        """Start at kl_coef, aiming at `target` KL with a response time of `horizon` samples."""
        if not (target > 0 and math.isfinite(target)):
            raise ValueError(f"AdaptiveKLController target must be a positive number, not {target}")
        if horizon <= 0:
            raise ValueError(f"AdaptiveKLController horizon must be positive, not {horizon}")
        self.value = float(kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Scale the coefficient by 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon."""
        # the clipped error bounds the change per update, so one outlier batch cannot swing the coefficient
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        """The coefficient, for checkpoints (target and horizon come from the config)."""
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        """Restore the coefficient from a checkpoint."""
        self.value = float(state["value"])
