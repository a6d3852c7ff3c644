"""PPO maths (rlhf/ppo/algorithms.py) against numbers worked out by hand: masked statistics, KL estimators,
reward shaping, GAE, the clipped policy and value losses, entropy/log-probs and the KL controllers; then the
group estimators, returns-to-go, reward/KL clipping, loss aggregation, dual clip and the KL loss; then the sampling
distribution (temperature, top-p) and DAPO's pieces, held against transformers', vLLM's, verl's and OpenRLHF's own
code where they have it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tuneyard.rlhf.ppo.algorithms import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    aggregate,
    clamp_kl,
    clip_scores,
    entropy_from_logits,
    gae_advantages,
    group_relative_scores,
    informative_groups,
    kl_estimate,
    kl_loss,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    overlong_penalty,
    policy_loss,
    returns_to_go,
    sampling_logits,
    sequence_mean,
    shape_rewards,
    value_loss,
)

MASK_DTYPES = [torch.bool, torch.float32]


def t(rows: list) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def assert_close(actual: torch.Tensor, expected: list, atol: float = 1e-9) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def lengths_mask(lengths: list[int], steps: int, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    return (torch.arange(steps)[None, :] < torch.tensor(lengths)[:, None]).to(dtype)


# masked statistics


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_masked_sum_mean_var_by_hand(mask_dtype):
    x = t([[1.0, 2.0, 3.0], [4.0, 5.0, 1e30]])
    mask = lengths_mask([3, 2], 3, mask_dtype)
    assert masked_sum(x, mask).item() == 15.0
    assert masked_sum(x, mask, dim=1).tolist() == [6.0, 9.0]
    assert masked_mean(x, mask).item() == 3.0
    assert masked_mean(x, mask, dim=1).tolist() == [2.0, 4.5]
    # squared deviations from 3: 4 + 1 + 0 + 1 + 4 = 10 over 5 entries, or over 4 with Bessel's correction
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(2.0)
    assert masked_var(x, mask).item() == pytest.approx(2.5)


def test_masked_stats_with_empty_rows_and_nan_padding_stay_finite():
    x = t([[float("nan"), float("inf")], [2.0, float("-inf")]])
    mask = lengths_mask([0, 1], 2)
    assert masked_mean(x, mask, dim=1).tolist() == [0.0, 2.0]
    assert masked_mean(x, mask).item() == 2.0
    # a single entry has no spread; the unbiased estimate must not be 0/0
    assert masked_var(x, mask).item() == 0.0
    assert masked_mean(x, lengths_mask([0, 0], 2)).item() == 0.0


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_masked_whiten_ignores_padding(mask_dtype):
    mask = lengths_mask([3, 2], 3, mask_dtype)
    small = masked_whiten(t([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]]), mask)
    huge = masked_whiten(t([[1.0, 2.0, 3.0], [4.0, 5.0, 1e30]]), mask)
    assert torch.equal(small, huge)
    # mean 3 and unbiased var 2.5 over the five real entries
    s = math.sqrt(2.5 + 1e-8)
    expected = [[-2 / s, -1 / s, 0.0], [1 / s, 2 / s, 0.0]]
    assert_close(huge, expected)
    assert huge[1, 2].item() == 0.0
    assert masked_mean(huge, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert masked_var(huge, mask).item() == pytest.approx(1.0, abs=1e-6)


def test_masked_whiten_without_mean_shift_keeps_the_mean():
    mask = lengths_mask([3, 2], 3)
    out = masked_whiten(t([[1.0, 2.0, 3.0], [4.0, 5.0, -7.0]]), mask, shift_mean=False)
    s = math.sqrt(2.5 + 1e-8)
    assert_close(out, [[3 - 2 / s, 3 - 1 / s, 3.0], [3 + 1 / s, 3 + 2 / s, 0.0]])
    assert masked_mean(out, mask).item() == pytest.approx(3.0)


def test_sequence_mean_averages_rows_then_batch():
    x = t([[1.0, 2.0, 99.0], [4.0, -5.0, -5.0]])
    mask = lengths_mask([2, 1], 3)
    # row means 1.5 and 4, then (1.5 + 4) / 2; a token-level mean would give 7 / 3 instead
    assert sequence_mean(x, mask).item() == pytest.approx(2.75)


def test_sequence_mean_of_equal_halves_is_the_whole_batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 6, generator=gen, dtype=torch.float64)
    mask = lengths_mask([6, 1, 3, 5, 2, 6, 4, 1], 6)
    whole = sequence_mean(x, mask)
    halves = (sequence_mean(x[:4], mask[:4]) + sequence_mean(x[4:], mask[4:])) / 2
    assert halves.item() == pytest.approx(whole.item(), abs=1e-12)
    # the property fails for a token-level mean on the same rows, so it is a real constraint
    token_halves = (masked_mean(x[:4], mask[:4]) + masked_mean(x[4:], mask[4:])) / 2
    assert token_halves.item() != pytest.approx(masked_mean(x, mask).item(), abs=1e-6)


# KL estimators

P = [0.5, 0.3, 0.2]
Q = [0.2, 0.3, 0.5]
# KL(p||q) = 0.5 ln(0.5/0.2) + 0.3 ln 1 + 0.2 ln(0.2/0.5) = 0.5 ln 2.5 - 0.2 ln 2.5 = 0.3 ln 2.5
TRUE_KL = 0.3 * math.log(2.5)


def log_pq() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(P, dtype=torch.float64).log(), torch.tensor(Q, dtype=torch.float64).log()


def test_true_kl_of_the_fixture_by_formula():
    assert TRUE_KL == pytest.approx(sum(p * math.log(p / q) for p, q in zip(P, Q, strict=True)))
    assert TRUE_KL == pytest.approx(0.2748872, abs=1e-7)


def test_k1_and_k3_expectations_under_p_are_the_true_kl():
    logp, logq = log_pq()
    weights = torch.tensor(P, dtype=torch.float64)
    assert (weights * kl_estimate(logp, logq, "k1")).sum().item() == pytest.approx(TRUE_KL)
    assert (weights * kl_estimate(logp, logq, "k3")).sum().item() == pytest.approx(TRUE_KL)
    assert (weights * kl_estimate(logp, logq)).sum().item() == pytest.approx(TRUE_KL)  # k1 is the default


def test_k2_expectation_is_half_the_mean_squared_log_ratio():
    logp, logq = log_pq()
    weights = torch.tensor(P, dtype=torch.float64)
    # log p/q is ln 2.5, 0, -ln 2.5: 0.5 * (0.5 + 0.2) * ln(2.5)^2
    expected = 0.35 * math.log(2.5) ** 2
    assert (weights * kl_estimate(logp, logq, "k2")).sum().item() == pytest.approx(expected)
    assert expected == pytest.approx(0.2938560, abs=1e-6)


def test_kl_estimators_pointwise_by_hand():
    log_ratio = t([0.0, math.log(2.0), -math.log(2.0)])
    zeros = torch.zeros(3, dtype=torch.float64)
    assert kl_estimate(log_ratio, zeros, "k1").tolist() == pytest.approx([0.0, math.log(2), -math.log(2)])
    half_sq = 0.5 * math.log(2) ** 2
    assert kl_estimate(log_ratio, zeros, "k2").tolist() == pytest.approx([0.0, half_sq, half_sq])
    # exp(-r) - 1 + r: r = ln 2 gives 0.5 - 1 + ln 2; r = -ln 2 gives 2 - 1 - ln 2
    assert kl_estimate(log_ratio, zeros, "k3").tolist() == pytest.approx([0.0, math.log(2) - 0.5, 1 - math.log(2)])


def test_k3_is_never_negative():
    log_ratio = torch.linspace(-20, 20, 4001, dtype=torch.float64)
    k3 = kl_estimate(log_ratio, torch.zeros_like(log_ratio), "k3")
    assert (k3 >= 0).all()
    small = torch.tensor([1e-6, -1e-6], dtype=torch.float32)
    assert (kl_estimate(small, torch.zeros_like(small), "k3") >= 0).all()


def test_k3_monte_carlo_matches_the_true_kl():
    gen = torch.Generator().manual_seed(1234)
    samples = torch.multinomial(torch.tensor(P), 200_000, replacement=True, generator=gen)
    logp, logq = log_pq()
    k3 = kl_estimate(logp[samples], logq[samples], "k3")
    assert abs(k3.mean().item() - TRUE_KL) < 0.01 * TRUE_KL


def test_unknown_kl_estimator_names_the_valid_ones():
    assert KL_ESTIMATORS == ("k1", "k2", "k3")
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(torch.zeros(2), torch.zeros(2), "k4")


# reward shaping and GAE


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_shape_rewards_puts_score_on_last_real_token(mask_dtype):
    scores = t([1.0, -2.0, 5.0])
    kl = t([[0.1, 0.2, 0.3], [0.4, 0.5, 9.9], [7.0, 7.0, 7.0]])
    mask = lengths_mask([3, 2, 0], 3, mask_dtype)
    rewards = shape_rewards(scores, kl, mask, kl_coef=0.5)
    expected = [
        [-0.05, -0.1, -0.15 + 1.0],
        [-0.2, -0.25 - 2.0, 0.0],  # padding gets neither penalty nor score
        [0.0, 0.0, 0.0],  # a row of length 0 gets nothing
    ]
    assert_close(rewards, expected)


# gamma 0.9, lam 0.8, gamma * lam 0.72; V after the last real token is 0.
# Row 0 (length 3): r = [0.1, -0.2, 1.0], V = [0.5, 0.4, 0.3]
#   delta2 = 1.0 + 0 - 0.3 = 0.7                 A2 = 0.7
#   delta1 = -0.2 + 0.9*0.3 - 0.4 = -0.33        A1 = -0.33 + 0.72*0.7 = 0.174
#   delta0 = 0.1 + 0.9*0.4 - 0.5 = -0.04         A0 = -0.04 + 0.72*0.174 = 0.08528
#   returns = A + V = [0.58528, 0.574, 1.0]
# Row 1 (length 2): r = [0.0, 2.0, pad], V = [1.0, 0.5, pad]
#   delta1 = 2.0 + 0 - 0.5 = 1.5                 A1 = 1.5
#   delta0 = 0.0 + 0.9*0.5 - 1.0 = -0.55         A0 = -0.55 + 0.72*1.5 = 0.53
#   returns = [1.53, 2.0, 0]
GAE_ADVANTAGES = [[0.08528, 0.174, 0.7], [0.53, 1.5, 0.0]]
GAE_RETURNS = [[0.58528, 0.574, 1.0], [1.53, 2.0, 0.0]]


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
@pytest.mark.parametrize("pad", [(0.0, 0.0), (7.0, -3.0), (1e6, 1e6)])
def test_gae_by_hand_on_a_padded_batch(mask_dtype, pad):
    rewards = t([[0.1, -0.2, 1.0], [0.0, 2.0, pad[0]]])
    values = t([[0.5, 0.4, 0.3], [1.0, 0.5, pad[1]]])
    mask = lengths_mask([3, 2], 3, mask_dtype)
    advantages, returns = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    assert_close(advantages, GAE_ADVANTAGES, atol=1e-12)
    assert_close(returns, GAE_RETURNS, atol=1e-12)
    assert advantages[1, 2].item() == 0.0 and returns[1, 2].item() == 0.0


def test_gae_with_gamma_lam_one_is_reward_to_go_minus_value():
    rewards = t([[1.0, 2.0, 3.0, 0.0]])
    values = t([[0.5, 0.25, 2.0, 4.0]])
    mask = lengths_mask([3], 4)
    advantages, returns = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    # reward-to-go 6, 5, 3 minus V; returns are the reward-to-go itself
    assert_close(advantages, [[5.5, 4.75, 1.0, 0.0]])
    assert_close(returns, [[6.0, 5.0, 3.0, 0.0]])


def test_gae_skips_an_episodes_environment_tokens():
    """A multi-turn row [a0 a1 | e e | a2 pad]: the environment's tokens (masked) are not steps, so the row's
    advantages and returns on its sampled tokens equal GAE over [a0 a1 a2] alone (hand-checked row 1 of the padded
    batch above, extended), and are 0 on the environment's tokens and the padding."""
    rewards = t([[0.1, -0.2, 9.0, 9.0, 1.0, 5.0]])
    values = t([[0.5, 0.4, 7.0, 7.0, 0.3, 2.0]])
    mask = t([[1.0, 1.0, 0.0, 0.0, 1.0, 0.0]])
    advantages, returns = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    assert_close(advantages, [[GAE_ADVANTAGES[0][0], GAE_ADVANTAGES[0][1], 0.0, 0.0, GAE_ADVANTAGES[0][2], 0.0]])
    assert_close(returns, [[GAE_RETURNS[0][0], GAE_RETURNS[0][1], 0.0, 0.0, GAE_RETURNS[0][2], 0.0]])


def test_gae_carries_no_gradient_into_the_critic():
    values = t([[0.5, 0.4]]).requires_grad_()
    advantages, returns = gae_advantages(t([[0.0, 1.0]]), values, lengths_mask([2], 2), gamma=0.9, lam=0.8)
    assert not advantages.requires_grad and not returns.requires_grad


# policy loss

CLIP = 0.2

# (ratio, advantage, per-token loss, clip active): loss = max(-A r, -A clamp(r, 0.8, 1.2))
POLICY_CASES = [
    (1.0, 1.0, -1.0, False),
    (1.1, 1.0, -1.1, False),  # inside the range
    (1.5, 1.0, -1.2, True),  # past 1 + c with A > 0: clipped at -1.2, no gradient
    (0.5, 1.0, -0.5, False),  # below 1 - c with A > 0: the unclipped term is the pessimistic one
    (1.0, -1.0, 1.0, False),
    (0.9, -1.0, 0.9, False),
    (0.5, -1.0, 0.8, True),  # below 1 - c with A < 0: clipped at 0.8
    (1.5, -1.0, 1.5, False),  # past 1 + c with A < 0: unclipped term is larger
    (1.5, 2.0, -2.4, True),
    (0.7, -0.5, 0.4, True),  # -(-0.5) * 0.8
]


@pytest.mark.parametrize("ratio,advantage,expected,clip_active", POLICY_CASES)
def test_policy_loss_single_token(ratio, advantage, expected, clip_active):
    old = t([[-1.3]])
    logprobs = (old + math.log(ratio)).requires_grad_()
    loss, stats = policy_loss(logprobs, old, t([[advantage]]), lengths_mask([1], 1), CLIP)
    assert loss.item() == pytest.approx(expected)
    assert stats["clip_frac"].item() == float(clip_active)
    assert stats["ratio_max_dev"].item() == pytest.approx(abs(ratio - 1))
    assert stats["approx_kl"].item() == pytest.approx(ratio - 1 - math.log(ratio))
    loss.backward()
    # d(-A r)/d logprob = -A r where the unclipped term is active; 0 where the clip holds the objective
    expected_grad = 0.0 if clip_active else -advantage * ratio
    assert logprobs.grad.item() == pytest.approx(expected_grad, abs=1e-12)


@pytest.mark.parametrize("advantage", [1.0, -1.0])
@pytest.mark.parametrize("boundary", [1 - CLIP, 1 + CLIP])
def test_policy_loss_is_continuous_at_the_clip_boundary(advantage, boundary):
    old = t([[0.0]])
    for ratio in (boundary - 1e-9, boundary, boundary + 1e-9):
        loss, _ = policy_loss(old + math.log(ratio), old, t([[advantage]]), lengths_mask([1], 1), CLIP)
        assert loss.item() == pytest.approx(-advantage * boundary, abs=1e-8)


def test_policy_loss_batch_stats_and_padding():
    ratios = [case[0] for case in POLICY_CASES]
    advantages = [case[1] for case in POLICY_CASES]
    old = torch.zeros(2, len(ratios), dtype=torch.float64)
    logprobs = torch.log(t([ratios, [2.0] + [1.0] * (len(ratios) - 1)]))
    # padding of row 1 is garbage: an enormous ratio and nan log-ratios must not show up anywhere
    logprobs[1, 1] = 50.0
    logprobs[1, 2] = old[1, 2] = float("-inf")  # -inf - -inf is nan
    logprobs.requires_grad_()
    adv = t([advantages, [1.0] + [1e9] * (len(ratios) - 1)])
    mask = lengths_mask([len(ratios), 1], len(ratios))
    loss, stats = policy_loss(logprobs, old, adv, mask, CLIP)
    row0 = sum(case[2] for case in POLICY_CASES) / len(POLICY_CASES)
    row1 = -1.2  # ratio 2 with A = 1 clips at 1.2
    assert loss.item() == pytest.approx((row0 + row1) / 2)
    # 4 clipped tokens in row 0 plus the one in row 1, over 11 real tokens
    assert stats["clip_frac"].item() == pytest.approx(5 / 11)
    assert stats["ratio_max_dev"].item() == pytest.approx(1.0)
    kl = [r - 1 - math.log(r) for r in ratios] + [1 - math.log(2)]
    assert stats["approx_kl"].item() == pytest.approx(sum(kl) / 11)
    assert all(not s.requires_grad for s in stats.values())
    loss.backward()
    assert torch.isfinite(logprobs.grad).all()
    assert (logprobs.grad[1, 1:] == 0).all()


def test_policy_loss_with_no_real_tokens_has_zero_stats():
    zeros = torch.zeros(1, 3)
    loss, stats = policy_loss(zeros, zeros, zeros, lengths_mask([0], 3), CLIP)
    assert loss.item() == 0.0
    assert {k: v.item() for k, v in stats.items()} == {"clip_frac": 0.0, "approx_kl": 0.0, "ratio_max_dev": 0.0}


# value loss (dyadic numbers so the squares are exact and "strictly larger" is unambiguous), clip 0.25
#   V      old   R     V_clipped  (V-R)^2   (Vc-R)^2   0.5*max    clip active
#   1.0    0.5   1.5   0.75       0.25      0.5625     0.28125    yes
#   1.0    0.5   0.0   0.75       1.0       0.5625     0.5        no
#   0.625  0.5   2.0   0.625      1.890625  1.890625   0.9453125  no (inside the range: equal terms)
#  -0.5    0.0   0.0  -0.25       0.25      0.0625     0.125      no
#  -0.5    0.0  -1.0  -0.25       0.25      0.5625     0.28125    yes
#   row 0 mean = 2.1328125 / 5 = 0.4265625; row 1 (one token, V=0, old=0, R=1): 0.5
VALUES = [[1.0, 1.0, 0.625, -0.5, -0.5], [0.0, 3.0, 3.0, 3.0, 3.0]]
OLD_VALUES = [[0.5, 0.5, 0.5, 0.0, 0.0], [0.0, -9.0, -9.0, -9.0, -9.0]]
RETURNS = [[1.5, 0.0, 2.0, 0.0, -1.0], [1.0, 1e9, float("nan"), 1e9, 1e9]]


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_value_loss_clipped_by_hand(mask_dtype):
    values = t(VALUES).requires_grad_()
    mask = lengths_mask([5, 1], 5, mask_dtype)
    loss, stats = value_loss(values, t(OLD_VALUES), t(RETURNS), mask, clip_range=0.25)
    assert loss.item() == pytest.approx((0.4265625 + 0.5) / 2)
    assert stats["value_clip_frac"].item() == pytest.approx(2 / 6)
    loss.backward()
    # where the clipped term wins, V_clipped is constant in V, so those tokens pass no gradient
    grad = values.grad.tolist()
    assert grad[0][0] == 0.0 and grad[0][4] == 0.0
    # elsewhere d/dV 0.5 (V - R)^2 / (5 tokens * 2 rows) = (V - R) / 10
    assert grad[0][1] == pytest.approx(1.0 / 10)
    assert grad[0][2] == pytest.approx(-1.375 / 10)
    assert grad[0][3] == pytest.approx(-0.5 / 10)
    assert grad[1] == pytest.approx([-1.0 / 2, 0.0, 0.0, 0.0, 0.0])


def test_value_loss_unclipped_by_hand():
    mask = lengths_mask([5, 1], 5)
    loss, stats = value_loss(t(VALUES), t(OLD_VALUES), t(RETURNS), mask, clip_range=None)
    # 0.5 (V-R)^2: 0.125, 0.5, 0.9453125, 0.125, 0.125 -> 1.8203125 / 5 = 0.3640625; row 1: 0.5
    assert loss.item() == pytest.approx((0.3640625 + 0.5) / 2)
    assert stats["value_clip_frac"].item() == 0.0


# entropy and log-probs


def test_entropy_of_uniform_is_log_vocab():
    for vocab in (2, 5, 50_000):
        logits = torch.full((2, 3, vocab), 3.7)
        assert entropy_from_logits(logits).shape == (2, 3)
        assert torch.allclose(entropy_from_logits(logits), torch.full((2, 3), math.log(vocab)))


def test_entropy_of_a_known_distribution():
    # p = (1/2, 1/4, 1/4): H = 0.5 ln 2 + 0.5 ln 4 = 1.5 ln 2, whatever constant the logits carry
    logits = torch.log(t([[0.5, 0.25, 0.25]])) + 1000.0
    assert entropy_from_logits(logits).item() == pytest.approx(1.5 * math.log(2), abs=1e-5)
    # a point mass has entropy 0; -inf (filtered) entries count as probability 0, not nan
    assert entropy_from_logits(t([[0.0, -1e4, -1e4]])).item() == pytest.approx(0.0, abs=1e-6)
    filtered = t([[1.0, 1.0, float("-inf")]])
    assert entropy_from_logits(filtered).item() == pytest.approx(math.log(2), abs=1e-6)


def test_entropy_gradient_is_finite_with_filtered_logits():
    logits = torch.tensor([[0.3, -1.0, float("-inf")]], requires_grad=True)
    entropy = entropy_from_logits(logits)
    p = torch.tensor([0.3, -1.0]).softmax(-1)
    assert entropy.item() == pytest.approx(float(-(p * p.log()).sum()), abs=1e-6)
    # an upstream gradient far above 1, as fp16's loss scale (2^16) makes it
    (65536.0 * entropy).sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 2] == 0


def test_logprobs_from_logits_by_hand():
    # softmax(0, ln 3) = (1/4, 3/4); softmax(ln 2, 0) = (2/3, 1/3)
    logits = torch.tensor([[[0.0, math.log(3)], [math.log(2), 0.0]]])
    out = logprobs_from_logits(logits, torch.tensor([[1, 1]]))
    assert out.shape == (1, 2)
    assert_close(out, [[math.log(0.75), math.log(1 / 3)]], atol=1e-6)
    out = logprobs_from_logits(logits, torch.tensor([[0, 0]]))
    assert_close(out, [[math.log(0.25), math.log(2 / 3)]], atol=1e-6)


def test_logprobs_from_bf16_logits_are_float32():
    logits = torch.tensor([[[0.0, 1.0, 2.0]]], dtype=torch.bfloat16)
    out = logprobs_from_logits(logits, torch.tensor([[2]]))
    assert out.dtype == torch.float32
    # ln(e^2 / (1 + e + e^2))
    assert out.item() == pytest.approx(2 - math.log(1 + math.e + math.e**2), abs=1e-6)


# KL controllers


def test_fixed_kl_controller_never_changes():
    ctl = FixedKLController(0.05)
    for kl in (0.0, 1.0, 1e6):
        ctl.update(kl, 512)
    assert ctl.value == 0.05


@pytest.mark.parametrize(
    "current_kl,expected",
    [
        (6.0, 0.1),  # on target: error 0
        (5.4, 0.099),  # below: error 5.4/6 - 1 = -0.1, factor 1 - 0.1 * 1000/10000 = 0.99
        (6.6, 0.101),  # above: error +0.1, factor 1.01
        (60.0, 0.102),  # error 9 clipped to 0.2, factor 1.02
        (0.0, 0.098),  # error -1 clipped to -0.2, factor 0.98
    ],
)
def test_adaptive_kl_controller_update_by_hand(current_kl, expected):
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl, n_steps=1000)
    assert ctl.value == pytest.approx(expected)


def test_adaptive_kl_controller_compounds_updates():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(5.4, 1000)
    ctl.update(6.6, 1000)
    assert ctl.value == pytest.approx(0.1 * 0.99 * 1.01)  # 0.09999
    ctl.update(torch.tensor(60.0), 500)  # a tensor KL is accepted; error 0.2 * 500/10000 = 0.01
    assert ctl.value == pytest.approx(0.09999 * 1.01)


def test_adaptive_kl_controller_rejects_bad_settings():
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
    with pytest.raises(ValueError, match="horizon"):
        AdaptiveKLController(0.1, target=1.0, horizon=0)


@pytest.mark.parametrize("make", [lambda: FixedKLController(0.2), lambda: AdaptiveKLController(0.2, 6.0, 10_000)])
def test_kl_controller_state_round_trips(make):
    ctl = make()
    ctl.update(60.0, 1000)
    state = json.loads(json.dumps(ctl.state_dict()))  # plain data, as a checkpoint stores it
    fresh = make()
    fresh.value = 123.0  # so a load that restores nothing cannot pass
    fresh.load_state_dict(state)
    assert fresh.value == ctl.value
    assert fresh.state_dict() == ctl.state_dict()


# group estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++-baseline): two prompts with three consecutive answers each
#   group A = [1, 3, 5]:  mean 3, deviations [-2, 0, 2], squares 4 + 0 + 4 = 8, unbiased var 8/2 = 4, std 2
#   group B = [4, 4, 10]: mean 6, deviations [-2, -2, 4], squares 4 + 4 + 16 = 24, unbiased var 24/2 = 12, std 2*sqrt(3)
#   (population stds would be sqrt(8/3) and sqrt(8): a biased std would not give these numbers)
# grpo:    A: [-2, 0, 2] / 2 = [-1, 0, 1];  B: [-2, -2, 4] / (2 sqrt 3) = [-1/sqrt 3, -1/sqrt 3, 2/sqrt 3]  (+eps)
# dr_grpo, reinforce_baseline: the deviations themselves, [-2, 0, 2, -2, -2, 4]
# rloo:    A: 1 - (3+5)/2 = -3, 3 - (1+5)/2 = 0, 5 - (1+3)/2 = 3;  B: 4 - (4+10)/2 = -3 (twice), 10 - (4+4)/2 = 6
#          (= 3/2 x the deviations, as n/(n-1) (r - mean) must be)
GROUP_SCORES = [1.0, 3.0, 5.0, 4.0, 4.0, 10.0]
ROOT3 = math.sqrt(3.0)
GROUP_EXPECTED = {
    "grpo": [-2 / (2 + 1e-6), 0.0, 2 / (2 + 1e-6)] + [x / (2 * ROOT3 + 1e-6) for x in (-2.0, -2.0, 4.0)],
    "dr_grpo": [-2.0, 0.0, 2.0, -2.0, -2.0, 4.0],
    "rloo": [-3.0, 0.0, 3.0, -3.0, -3.0, 6.0],
    "reinforce_baseline": [-2.0, 0.0, 2.0, -2.0, -2.0, 4.0],
}


def test_advantage_estimators_are_gae_and_the_group_ones():
    assert ADVANTAGE_ESTIMATORS == ("gae", "grpo", "dr_grpo", "rloo", "reinforce_baseline")
    assert set(GROUP_EXPECTED) == set(ADVANTAGE_ESTIMATORS) - {"gae"}


@pytest.mark.parametrize("estimator", list(GROUP_EXPECTED))
def test_group_relative_scores_by_hand(estimator):
    out = group_relative_scores(t(GROUP_SCORES), 3, estimator)
    assert out.shape == (6,) and out.dtype == torch.float64
    assert_close(out, GROUP_EXPECTED[estimator], atol=1e-12)


def test_grpo_uses_the_unbiased_std_and_the_eps():
    # group A of the fixture with a large eps: [-2, 0, 2] / (2 + 1); the population std sqrt(8/3) would not give it
    out = group_relative_scores(t(GROUP_SCORES[:3]), 3, "grpo", eps=1.0)
    assert_close(out, [-2 / 3, 0.0, 2 / 3], atol=1e-12)


@pytest.mark.parametrize("estimator", list(GROUP_EXPECTED))
def test_group_of_equal_scores_gives_zeros_not_nan(estimator):
    out = group_relative_scores(t([7.0, 7.0, 7.0, 7.0, 1.0, 3.0]), 2, estimator)
    # groups of 2: [7, 7] twice give 0, [1, 3] gives mean 2, unbiased std sqrt(2), leave-one-out baselines 3 and 1
    expected = {
        "grpo": [0.0, 0.0, 0.0, 0.0, -1 / (math.sqrt(2) + 1e-6), 1 / (math.sqrt(2) + 1e-6)],
        "dr_grpo": [0.0, 0.0, 0.0, 0.0, -1.0, 1.0],
        "rloo": [0.0, 0.0, 0.0, 0.0, -2.0, 2.0],
        "reinforce_baseline": [0.0, 0.0, 0.0, 0.0, -1.0, 1.0],
    }[estimator]
    assert_close(out, expected, atol=1e-12)


def test_group_relative_scores_accept_integer_rewards():
    # verifiable 0/1 rewards: group [1, 0, 0] has mean 1/3, so dr_grpo gives [2/3, -1/3, -1/3]
    out = group_relative_scores(torch.tensor([1, 0, 0]), 3, "dr_grpo")
    assert out.is_floating_point()
    assert out.tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3])


@pytest.mark.parametrize("estimator", list(GROUP_EXPECTED))
def test_group_size_one_is_refused_naming_the_estimator(estimator):
    with pytest.raises(ValueError, match=estimator):
        group_relative_scores(t([1.0, 2.0]), 1, estimator)


def test_group_relative_scores_refuse_bad_input():
    with pytest.raises(ValueError, match="groups of 4"):
        group_relative_scores(t(GROUP_SCORES), 4, "grpo")  # 6 answers are not whole groups of 4
    with pytest.raises(ValueError, match="not a group advantage estimator"):
        group_relative_scores(t(GROUP_SCORES), 3, "gae")
    with pytest.raises(ValueError, match="grpo, dr_grpo, rloo, reinforce_baseline"):
        group_relative_scores(t(GROUP_SCORES), 3, "ppo")


# returns-to-go: row 0 (length 3) r = [0.5, -1.0, 2.0], row 1 (length 1) r = [1.0], row 2 empty
#   gamma 1:   row 0: [0.5 - 1 + 2, -1 + 2, 2] = [1.5, 1.0, 2.0];  row 1: [1.0]
#   gamma 0.9: row 0: t2 = 2.0, t1 = -1 + 0.9 * 2 = 0.8, t0 = 0.5 + 0.9 * 0.8 = 1.22;  row 1: [1.0]
NAN = float("nan")
RTG_REWARDS = [[0.5, -1.0, 2.0, NAN], [1.0, NAN, float("inf"), NAN], [NAN, NAN, NAN, NAN]]
RTG_EXPECTED = {
    1.0: [[1.5, 1.0, 2.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
    0.9: [[1.22, 0.8, 2.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
}


def returns_to_go_by_loop(rewards: list, lengths: list[int], gamma: float) -> list:
    """The plain definition: sum over k >= t of gamma^(k - t) r_k within each row's real tokens."""
    steps = len(rewards[0])
    return [
        [sum(gamma ** (k - i) * row[k] for k in range(i, n)) if i < n else 0.0 for i in range(steps)]
        for row, n in zip(rewards, lengths, strict=True)
    ]


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_returns_to_go_by_hand_with_nan_padding(mask_dtype, gamma):
    mask = lengths_mask([3, 1, 0], 4, mask_dtype)
    out = returns_to_go(t(RTG_REWARDS), mask, gamma)
    assert_close(out, RTG_EXPECTED[gamma], atol=1e-12)
    # the hand numbers are the plain definition's too
    by_loop = returns_to_go_by_loop(RTG_REWARDS, [3, 1, 0], gamma)
    assert sum(by_loop, []) == pytest.approx(sum(RTG_EXPECTED[gamma], []), abs=1e-12)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_returns_to_go_matches_the_loop_on_a_random_padded_batch(gamma):
    gen = torch.Generator().manual_seed(7)
    lengths = [5, 1, 3, 0, 2]
    rewards = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    mask = lengths_mask(lengths, 5)
    rewards = torch.where(mask, rewards, torch.tensor(NAN, dtype=torch.float64))
    expected = returns_to_go_by_loop(rewards.tolist(), lengths, gamma)
    assert_close(returns_to_go(rewards, mask, gamma), expected, atol=1e-12)


def test_returns_to_go_of_shaped_rewards_is_the_critic_free_advantage():
    # score 2 on the last token, kl [0.1, 0.2, 0.4] with coef 0.5: rewards [-0.05, -0.1, -0.2 + 2]; with gamma 1
    # the advantage at t is score - 0.5 x the KL still to come: 2 - 0.35, 2 - 0.3, 2 - 0.2
    mask = lengths_mask([3], 4)
    rewards = shape_rewards(t([2.0]), t([[0.1, 0.2, 0.4, NAN]]), mask, kl_coef=0.5)
    assert_close(returns_to_go(rewards, mask, 1.0), [[1.65, 1.7, 1.8, 0.0]], atol=1e-12)


def test_returns_to_go_carries_no_gradient():
    rewards = t([[1.0, 2.0]]).requires_grad_()
    assert not returns_to_go(rewards, lengths_mask([2], 2), 1.0).requires_grad


# whitening with the population variance


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_masked_whiten_population_vs_unbiased_variance(mask_dtype):
    x = t([[1.0, 2.0, 3.0], [4.0, 5.0, NAN]])
    mask = lengths_mask([3, 2], 3, mask_dtype)
    # mean 3; squared deviations sum to 10 over 5 entries: population var 2, unbiased 10/4 = 2.5
    pop = masked_whiten(x, mask, unbiased=False)
    s = math.sqrt(2.0 + 1e-8)
    assert_close(pop, [[-2 / s, -1 / s, 0.0], [1 / s, 2 / s, 0.0]])
    assert masked_var(pop, mask, unbiased=False).item() == pytest.approx(1.0, abs=1e-6)
    unbiased = masked_whiten(x, mask, unbiased=True)
    s = math.sqrt(2.5 + 1e-8)
    assert_close(unbiased, [[-2 / s, -1 / s, 0.0], [1 / s, 2 / s, 0.0]])
    assert torch.equal(masked_whiten(x, mask), unbiased)  # the default is unchanged
    assert not torch.allclose(pop, unbiased)


# reward and KL clipping


def test_clip_scores_by_hand():
    scores = t([-20.0, -10.0, 3.0, 10.5, float("inf")])
    assert clip_scores(scores, 10.0).tolist() == [-10.0, -10.0, 3.0, 10.0, 10.0]
    assert clip_scores(scores, 2.5).tolist() == [-2.5, -2.5, 2.5, 2.5, 2.5]
    assert torch.equal(clip_scores(scores, None), scores)


def test_clamp_kl_by_hand():
    kl = t([[-12.0, 0.5, 9.0], [11.0, -0.25, float("inf")]])
    assert clamp_kl(kl, 10.0).tolist() == [[-10.0, 0.5, 9.0], [10.0, -0.25, 10.0]]
    assert torch.equal(clamp_kl(kl, None), kl)


@pytest.mark.parametrize("fn", [clip_scores, clamp_kl])
@pytest.mark.parametrize("limit", [0.0, -1.0, NAN])
def test_clip_limits_must_be_positive(fn, limit):
    with pytest.raises(ValueError, match="positive"):
        fn(t([1.0]), limit)


# loss aggregation: row 0 has 3 real tokens [1, 2, 3], row 1 one token [10], garbage in the padding
#   sequence_mean: row means 2 and 10, then (2 + 10) / 2 = 6
#   token_mean:    (1 + 2 + 3 + 10) / 4 tokens = 4
AGG_X = [[1.0, 2.0, 3.0, NAN], [10.0, float("inf"), NAN, -1e30]]


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_aggregate_sequence_mean_vs_token_mean_by_hand(mask_dtype):
    mask = lengths_mask([3, 1], 4, mask_dtype)
    assert aggregate(t(AGG_X), mask, "sequence_mean").item() == 6.0
    assert aggregate(t(AGG_X), mask, "token_mean").item() == 4.0
    assert torch.equal(aggregate(t(AGG_X), mask), sequence_mean(t(AGG_X), mask))  # the default is today's


def test_aggregate_refuses_an_unknown_name():
    with pytest.raises(ValueError, match="sequence_mean, token_mean"):
        aggregate(t([[1.0]]), lengths_mask([1], 1), "sum")


def test_policy_loss_token_mean_by_hand():
    # ratio 1 everywhere (logprobs = old), so each token's loss is -A and its gradient -A r / token count
    old = t([[-1.0, -2.0, -3.0, 0.0], [-0.5, 0.0, 0.0, 0.0]])
    logprobs = old.clone().requires_grad_()
    advantages = t([[1.0, 2.0, 3.0, NAN], [10.0, NAN, 1e9, NAN]])
    mask = lengths_mask([3, 1], 4)
    loss, _ = policy_loss(logprobs, old, advantages, mask, CLIP, aggregation="token_mean")
    assert loss.item() == pytest.approx(-16 / 4)
    seq, _ = policy_loss(old, old, advantages, mask, CLIP)
    assert seq.item() == pytest.approx(-(2 + 10) / 2)
    loss.backward()
    assert_close(logprobs.grad, [[-1 / 4, -2 / 4, -3 / 4, 0.0], [-10 / 4, 0.0, 0.0, 0.0]], atol=1e-12)


def test_value_loss_token_mean_by_hand():
    mask = lengths_mask([5, 1], 5)
    # the per-token terms of the value-loss tables above over all 6 real tokens instead of per row
    loss, _ = value_loss(t(VALUES), t(OLD_VALUES), t(RETURNS), mask, clip_range=0.25, aggregation="token_mean")
    assert loss.item() == pytest.approx((2.1328125 + 0.5) / 6)
    loss, _ = value_loss(t(VALUES), t(OLD_VALUES), t(RETURNS), mask, clip_range=None, aggregation="token_mean")
    assert loss.item() == pytest.approx((1.8203125 + 0.5) / 6)
    with pytest.raises(ValueError, match="loss aggregation"):
        value_loss(t(VALUES), t(OLD_VALUES), t(RETURNS), mask, clip_range=None, aggregation="mean")


# dual clip 3, clip 0.2; per-token PPO loss max(-A r, -A clamp(r, 0.8, 1.2)), then min(., 3|A|) where A < 0
#   r    A     PPO loss                  dual-clipped      gradient (-A r where the unclipped term is active)
#   5   -2     max(10, 2.4) = 10         min(10, 6) = 6    0 (the bound 3|A| is constant)
#   5    2     max(-10, -2.4) = -2.4     -2.4 (A > 0)      0 (ratio clipped)
#   2   -1     max(2, 1.2) = 2           min(2, 3) = 2     2
#   0.5 -1     max(0.5, 0.8) = 0.8       0.8               0 (ratio clipped)
#   mean with dual clip (6 - 2.4 + 2 + 0.8) / 4 = 1.6; without (10 - 2.4 + 2 + 0.8) / 4 = 2.6
DUAL_RATIOS = [5.0, 5.0, 2.0, 0.5]
DUAL_ADVANTAGES = [-2.0, 2.0, -1.0, -1.0]


def dual_clip_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    old = t([[-1.0, -2.0, -0.5, -3.0, float("-inf")]])
    logprobs = old.clone()
    logprobs[0, :4] += torch.log(t(DUAL_RATIOS))
    advantages = t([DUAL_ADVANTAGES + [NAN]])
    return logprobs.requires_grad_(), old, advantages, lengths_mask([4], 5)


def test_dual_clip_bounds_negative_advantages_by_hand():
    logprobs, old, advantages, mask = dual_clip_batch()
    loss, stats = policy_loss(logprobs, old, advantages, mask, CLIP, dual_clip=3.0)
    assert loss.item() == pytest.approx(1.6)
    assert stats["dual_clip_frac"].item() == pytest.approx(1 / 4)
    assert stats["clip_frac"].item() == pytest.approx(2 / 4)  # the PPO clip stat is unchanged by the dual clip
    loss.backward()
    assert_close(logprobs.grad, [[0.0, 0.0, 2.0 / 4, 0.0, 0.0]], atol=1e-9)
    plain, plain_stats = policy_loss(*dual_clip_batch(), CLIP)
    assert plain.item() == pytest.approx(2.6)
    assert "dual_clip_frac" not in plain_stats


def test_dual_clip_none_is_todays_loss_bit_for_bit():
    gen = torch.Generator().manual_seed(3)
    old = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    logprobs = old + torch.randn(4, 6, generator=gen, dtype=torch.float64)
    advantages = 3 * torch.randn(4, 6, generator=gen, dtype=torch.float64)
    mask = lengths_mask([6, 2, 4, 1], 6)
    advantages = torch.where(mask, advantages, torch.tensor(NAN, dtype=torch.float64))
    loss, stats = policy_loss(logprobs, old, advantages, mask, CLIP, dual_clip=None)
    # today's loss written out: sequence mean of max(-A r, -A clamp(r)) with the padding selected away
    adv = torch.where(mask, advantages, torch.zeros((), dtype=torch.float64))
    ratio = torch.exp(torch.where(mask, logprobs - old, torch.zeros((), dtype=torch.float64)))
    today = sequence_mean(torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP, 1 + CLIP)), mask)
    assert torch.equal(loss, today)
    assert torch.equal(loss, policy_loss(logprobs, old, advantages, mask, CLIP)[0])
    assert set(stats) == {"clip_frac", "approx_kl", "ratio_max_dev"}
    # and a dual clip that binds nowhere (no ratio reaches 1e6) changes nothing either
    loose, _ = policy_loss(logprobs, old, advantages, mask, CLIP, dual_clip=1e6)
    assert torch.equal(loose, loss)


@pytest.mark.parametrize("dual_clip", [1.0, 0.5, -3.0, NAN])
def test_dual_clip_must_exceed_one(dual_clip):
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(*dual_clip_batch(), CLIP, dual_clip=dual_clip)


# KL loss: log-ratios ln 2 and -ln 2 give k3 = exp(-r) - 1 + r = ln 2 - 1/2 and 1 - ln 2 (sum exactly 1/2), and
# d k3 / d logprob = 1 - exp(-r) = 1/2 and -1. Row 0 holds both, row 1 only the first:
#   sequence_mean: ((1/2) / 2 + (ln 2 - 1/2)) / 2;  token_mean: (1/2 + ln 2 - 1/2) / 3 = ln 2 / 3
LN2 = math.log(2.0)


def kl_loss_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ref = t([[-1.0, -2.0, NAN], [-0.5, NAN, NAN]]).requires_grad_()
    logprobs = t([[-1.0 + LN2, -2.0 - LN2, float("-inf")], [-0.5 + LN2, float("-inf"), 0.0]]).requires_grad_()
    return logprobs, ref, lengths_mask([2, 1], 3)


def test_kl_loss_by_hand_and_gradients():
    logprobs, ref, mask = kl_loss_batch()
    loss = kl_loss(logprobs, ref, mask)  # k3 and sequence_mean by default
    assert loss.item() == pytest.approx((0.25 + (LN2 - 0.5)) / 2)
    loss.backward()
    assert_close(logprobs.grad, [[0.5 / 4, -1.0 / 4, 0.0], [0.5 / 2, 0.0, 0.0]], atol=1e-12)
    assert ref.grad is None  # the reference is a fixed target

    logprobs, ref, mask = kl_loss_batch()
    loss = kl_loss(logprobs, ref, mask, aggregation="token_mean")
    assert loss.item() == pytest.approx(LN2 / 3)
    loss.backward()
    assert_close(logprobs.grad, [[0.5 / 3, -1.0 / 3, 0.0], [0.5 / 3, 0.0, 0.0]], atol=1e-12)
    assert ref.grad is None


def test_kl_loss_is_zero_at_the_reference_and_positive_elsewhere():
    gen = torch.Generator().manual_seed(11)
    ref = torch.randn(3, 5, generator=gen, dtype=torch.float64) - 2
    mask = lengths_mask([5, 2, 3], 5)
    assert kl_loss(ref.clone(), ref, mask).item() == 0.0
    moved = ref + 0.3 * torch.randn(3, 5, generator=gen, dtype=torch.float64)
    assert kl_loss(moved, ref, mask).item() > 0.0
    # the estimator is selectable: k1 is the mean log-ratio, row means then their mean
    expected = masked_mean(moved - ref, mask, dim=-1).mean()
    assert kl_loss(moved, ref, mask, "k1").item() == pytest.approx(expected.item())


def test_kl_loss_clamp_bounds_the_term_and_stops_its_gradient():
    # r = -ln 100: k3 = 100 - 1 - ln 100 ~ 94.4, clamped to 10 with no gradient past the limit
    logprobs = t([[-math.log(100.0)]]).requires_grad_()
    loss = kl_loss(logprobs, t([[0.0]]), lengths_mask([1], 1), limit=10.0)
    assert loss.item() == 10.0
    loss.backward()
    assert logprobs.grad.item() == 0.0
    assert kl_loss(logprobs, t([[0.0]]), lengths_mask([1], 1)).item() == pytest.approx(99 - math.log(100.0))


# the sampling distribution: temperature and top-p


def test_sampling_logits_divide_by_the_temperature():
    logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0]]])
    scaled = sampling_logits(logits, temperature=0.5)
    assert_close(scaled, [[[4.0, 2.0, 0.0, -2.0]]])
    # log-probs at T: log softmax(l / T); at T = 0.5 the likeliest token gains what the others lose
    logp = logprobs_from_logits(scaled, torch.tensor([[0]]))
    expected = 4.0 - math.log(math.exp(4) + math.exp(2) + 1 + math.exp(-2))
    assert logp.item() == pytest.approx(expected, abs=1e-6)
    assert logp.item() > logprobs_from_logits(logits, torch.tensor([[0]])).item()
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sampling_logits(logits, temperature=0.0)


def test_top_p_keeps_the_nucleus_by_hand():
    # probabilities 0.5, 0.3, 0.15, 0.05 (logits are their logs): top_p 0.8 keeps the first two (0.5 + 0.3 >= 0.8)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().reshape(1, 1, 4)
    kept = sampling_logits(logits, top_p=0.8)
    assert torch.isinf(kept[0, 0, 2:]).all() and torch.isfinite(kept[0, 0, :2]).all()
    assert_close(kept.softmax(-1)[0, 0, :2], [0.5 / 0.8, 0.3 / 0.8], atol=1e-6)
    # 0.81 needs the third token too; the likeliest token always stays, however small top_p
    assert torch.isfinite(sampling_logits(logits, top_p=0.81)[0, 0, :3]).all()
    assert torch.isfinite(sampling_logits(logits, top_p=0.01)).sum() == 1
    # the sampled token stays in the nucleus even where the weights that score it would cut it
    rescued = sampling_logits(logits, top_p=0.8, keep=torch.tensor([[3]]))
    assert torch.isfinite(rescued[0, 0, [0, 1, 3]]).all() and torch.isinf(rescued[0, 0, 2])
    logp = logprobs_from_logits(rescued, torch.tensor([[3]]))
    assert logp.item() == pytest.approx(math.log(0.05 / 0.85), abs=1e-6)
    assert torch.isfinite(entropy_from_logits(rescued)).all()


def test_top_p_cuts_as_transformers_and_vllm_cut():
    """The nucleus equals HF's TopPLogitsWarper's (what the policy's generate samples from) and vLLM's own top-p
    (what the engines sample from) on random logits at several temperatures."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=gen) * 3
    for temperature, top_p in [(1.0, 0.9), (0.7, 0.8), (1.5, 0.5)]:
        ours = sampling_logits(logits, temperature, top_p)
        hf = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits.clone()))
        assert torch.equal(torch.isinf(ours), torch.isinf(hf))
        assert torch.allclose(ours.log_softmax(-1).exp(), hf.log_softmax(-1).exp(), atol=1e-6)
        vllm_sampler = pytest.importorskip("vllm.v1.sample.ops.topk_topp_sampler")
        p = torch.full((64,), top_p)
        theirs = vllm_sampler.apply_top_k_top_p_pytorch(logits.clone() / temperature, None, p, allow_cpu_sync=True)
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs))


def test_sampling_logits_keep_the_gradient_of_the_kept_tokens():
    logits = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(1), requires_grad=True)
    tokens = torch.tensor([[0, 1, 2], [3, 4, 5]])
    logp = logprobs_from_logits(sampling_logits(logits, 0.7, 0.6, keep=tokens), tokens)
    logp.sum().backward()
    assert torch.isfinite(logp).all() and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


# DAPO: overlong penalty, informative groups, clip-higher


def test_overlong_penalty_by_hand_and_as_openrlhf_computes_it():
    from tests.reference_rl import openrlhf_overlong_penalties

    lengths = torch.tensor([1, 12, 13, 14, 15, 16])
    # max 16, buffer 4: 0 up to 12 tokens, then -1/4 per token to -1 (x factor 2) at 16
    penalty = overlong_penalty(lengths, 16, 4, 2.0)
    assert_close(penalty, [0.0, 0.0, -0.5, -1.0, -1.5, -2.0], atol=1e-6)
    for buffer, factor in [(4, 2.0), (1, 1.0), (16, 0.5), (7, 1.0)]:
        theirs = openrlhf_overlong_penalties(lengths.tolist(), 16, buffer, factor)
        assert torch.allclose(overlong_penalty(lengths, 16, buffer, factor).double(), theirs, atol=1e-6)
    with pytest.raises(ValueError, match="buffer must be in 1..16"):
        overlong_penalty(lengths, 16, 17, 1.0)


def test_informative_groups_by_hand_and_as_verl_keeps_them():
    from tests.reference_rl import verl_kept_trajectories

    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.2, 0.2, 0.0, 0.0])
    assert informative_groups(scores, 2).tolist() == [False, True, False, False]
    assert informative_groups(scores, 4).tolist() == [True, True]
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        scores = torch.randint(0, 2, (24,), generator=gen).float()
        kept = informative_groups(scores, 4).repeat_interleave(4).nonzero().flatten().tolist()
        uids = [i // 4 for i in range(24)]
        assert kept == verl_kept_trajectories(uids, scores.tolist())


def test_clip_higher_widens_only_the_upper_bound_by_hand():
    # ratios 1.25 and 0.75; clip_range 0.2 low, 0.28 high
    old = torch.zeros(1, 2)
    new = torch.tensor([[math.log(1.25), math.log(0.75)]])
    mask = torch.ones(1, 2)
    positive = torch.tensor([[1.0, 1.0]])
    # A > 0: the high token may rise to 1.25 (under 1.28) instead of being cut at 1.2; the low one is unclipped
    loss, stats = policy_loss(new, old, positive, mask, 0.2, clip_range_high=0.28, aggregation="token_mean")
    assert loss.item() == pytest.approx(-(1.25 + 0.75) / 2)
    assert stats["clip_frac"].item() == 0.0
    symmetric, stats = policy_loss(new, old, positive, mask, 0.2, aggregation="token_mean")
    assert symmetric.item() == pytest.approx(-(1.2 + 0.75) / 2) and stats["clip_frac"].item() == 0.5
    # A < 0: the low bound (0.8) still clips the 0.75 token; the high one takes its full ratio
    negative = -positive
    loss, _ = policy_loss(new, old, negative, mask, 0.2, clip_range_high=0.28, aggregation="token_mean")
    assert loss.item() == pytest.approx((1.25 + 0.8) / 2)


def test_clip_higher_and_dual_clip_equal_verls_policy_loss():
    from tests.reference_rl import verl_compute_policy_loss

    gen = torch.Generator().manual_seed(5)
    for _ in range(12):
        old = torch.randn(6, 9, generator=gen, dtype=torch.float64) * 0.3
        new = old + torch.randn(6, 9, generator=gen, dtype=torch.float64) * 0.4
        advantages = torch.randn(6, 9, generator=gen, dtype=torch.float64)
        mask = lengths_mask(torch.randint(1, 10, (6,), generator=gen).tolist(), 9, torch.float64)
        ours, _ = policy_loss(
            new, old, advantages, mask, 0.2, clip_range_high=0.28, dual_clip=3.0, aggregation="token_mean"
        )
        theirs = verl_compute_policy_loss(old, new, advantages, mask, cliprange_low=0.2, cliprange_high=0.28)
        assert ours.item() == pytest.approx(theirs.item(), abs=1e-7)
