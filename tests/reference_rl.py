"""Other libraries' own code for DAPO's pieces, copied so the tests can hold ours against it (both Apache-2.0).

Each function body between the markers is the upstream code as it stands at the commit named (only the wrapper's
signature is ours, to call it with plain tensors):
  verl      volcengine/verl        4f80e465c2ec79ab9c3c30ec74b9745de61d0490 (the DAPO paper's reproduction commit)
  recipe    verl-project/verl-recipe 48ea0a797fa29867ea0ad92aff7d284eec7d4be3 (dapo/dapo_ray_trainer.py)
  OpenRLHF  OpenRLHF/OpenRLHF      3c3be6234e0cb353e76bb8019947db9dfe99fca7 (v0.11.0)
"""

# ruff: noqa
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import torch

# the upstream lines as they are:
# fmt: off


def verl_masked_mean(values, mask, axis=None):
    # verl/utils/torch_functional.py@4f80e465:119-120
    """Compute mean of tensor with a masked values."""
    return (values * mask).sum(axis=axis) / (mask.sum(axis=axis) + 1e-8)


def verl_compute_policy_loss(
    old_log_prob, log_prob, advantages, response_mask, cliprange=None, cliprange_low=None, cliprange_high=None,
    clip_ratio_c=3.0,
):
    """verl's compute_policy_loss (clip-higher and its always-on dual clip), token-mean aggregation."""
    verl_F = SimpleNamespace(masked_mean=verl_masked_mean)
    # --- verl/trainer/ppo/core_algos.py@4f80e465:339-359
    negative_approx_kl = log_prob - old_log_prob
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = verl_F.masked_mean(-negative_approx_kl, response_mask)

    pg_losses1 = -advantages * ratio
    if cliprange_low is None:
        cliprange_low = cliprange
    if cliprange_high is None:
        cliprange_high = cliprange
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - cliprange_low,
                                           1 + cliprange_high)  # - clip(ratio, 1-cliprange, 1+cliprange) * A
    clip_pg_losses1 = torch.maximum(pg_losses1,
                                    pg_losses2)  # max(-ratio * A, -clip(ratio, 1-cliprange, 1+cliprange) * A)
    pg_clipfrac = verl_F.masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)

    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = verl_F.masked_mean(
        torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).float(), response_mask)

    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    # --- end; agg_loss token-mean (core_algos.py@4f80e465:283-284)
    return verl_F.masked_mean(pg_losses, response_mask)


def openrlhf_overlong_penalties(response_lengths, max_new_tokens, overlong_buffer_len, overlong_penalty_factor=1.0):
    """OpenRLHF's apply_overlong_penalty on rewards of 0: the penalty of each response length."""
    experiences = [SimpleNamespace(response_length=torch.tensor(response_lengths),
                                   rewards=torch.zeros(len(response_lengths), dtype=torch.float64))]
    # --- openrlhf/trainer/ppo_utils/length_penalty.py:39-56
    expected_len = max_new_tokens - overlong_buffer_len
    total_penalized = 0

    for experience in experiences:
        response_lengths = experience.response_length
        batch_size = len(response_lengths)

        for j in range(batch_size):
            valid_response_length = response_lengths[j].item()
            # Cap the exceed_len to overlong_buffer_len to prevent excessive penalty
            exceed_len = min(valid_response_length - expected_len, overlong_buffer_len)

            if exceed_len > 0:
                overlong_penalty = -exceed_len / overlong_buffer_len * overlong_penalty_factor
                experience.rewards[j] += overlong_penalty
                total_penalized += 1
    # --- end
    return experiences[0].rewards


def verl_kept_trajectories(uids, metric_values):
    """verl's DAPO filter_groups: the indices of the trajectories whose prompt's metric has std > 0."""
    new_batch = SimpleNamespace(non_tensor_batch={"uid": np.array(uids, dtype=object),
                                                  "metric": np.array(metric_values)})
    metric_name = "metric"
    num_prompt_in_batch = 0
    # --- verl-recipe dapo/dapo_ray_trainer.py:250-271
    # Collect the sequence reward for each trajectory
    prompt_uid2metric_vals = defaultdict(list)
    for uid, metric_val in zip(
        new_batch.non_tensor_batch["uid"], new_batch.non_tensor_batch[metric_name], strict=True
    ):
        prompt_uid2metric_vals[uid].append(metric_val)

    prompt_uid2metric_std = {}
    for prompt_uid, metric_vals in prompt_uid2metric_vals.items():
        prompt_uid2metric_std[prompt_uid] = np.std(metric_vals)

    kept_prompt_uids = [
        uid
        for uid, std in prompt_uid2metric_std.items()
        if std > 0 or len(prompt_uid2metric_vals[uid]) == 1
    ]
    num_prompt_in_batch += len(kept_prompt_uids)

    kept_traj_idxs = []
    for idx, traj_from_prompt_uid in enumerate(new_batch.non_tensor_batch["uid"]):
        if traj_from_prompt_uid in kept_prompt_uids:
            kept_traj_idxs.append(idx)
    # --- end
    return kept_traj_idxs
