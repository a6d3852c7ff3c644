"""Rollouts generated ahead of training (`ppo.async.max_staleness` N > 0): the engines sample the next batches while
the policy trains on this one.

The policy's version is the number of iterations it has trained; batch k is trained at version k. Batch j may be
launched on engines holding version v only when j - v <= N, so no trained sample lags the policy by more than N
versions (admission control: a batch waits rather than run ahead of the bound; nothing is generated to be thrown
away). The weights move to the engines only when they have nothing in flight, so a request never mixes two versions;
with `ppo.async.partial_rollouts` they move as soon as the policy is ahead: the answers in flight are interrupted,
keep their tokens so far, and are resumed on the new weights (`tuneyard.rlhf.ppo.prompt_queue`), each token tagged
with its version and scored against the engine log-prob it was drawn with. A sample's staleness is its oldest
token's. Each iteration, around taking its own batch:

    sync       when the engines are behind the policy and idle (or, with partial rollouts, at once): the policy's
               weights, now version k; the policy goes on once it has sent them, and the engines load them while
               it scores and trains (the next batch launched waits for the load)
    launch     every batch j <= k + N the engines' version admits, in order, each seeded by its place in the prompt
               stream as the synchronous loop seeds it
    take       batch k (the policy waits only when the engines have not finished it yet)
    again      sync and launch, as the engines may have gone idle meanwhile (N = 1: batch k + 1 on version k)

A batch is scored as it arrives, on threads of the driver, while the policy trains on the batch before: each call's
answers get their rewards as the engines return them, and once the batch is whole the reference takes its log-probs
(a reference group of its own: an adapter policy's reference is the policy, which is training). What is left for the
iteration that takes it is what needs the weights it trains: the policy's log-probs and the critic's values.

At N = 0 this is the synchronous loop step for step (sync, launch k, collect k); at N = 1 the engines generate batch
k + 1 on version k while the policy trains on batch k (one step off-policy). With N >= 2 the engines run up to N
batches past one sync, so the staleness of successive batches cycles through 1..N: in a steady run that overlaps no
more than N = 1 does (an iteration costs the longer of generating and training either way), but an iteration that
generates or trains slower than the others is absorbed. The loss corrects for the staleness with the engine's
log-probs as the behaviour's (`ppo.rollout_correction`: decoupled or tis). A run resumed from a checkpoint launches
again from the checkpoint's prompt position, so it trains on the same prompts; the batches that were in flight are
sampled again on the checkpoint's weights.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

from tuneyard.rlhf.config import PpoSection
from tuneyard.rlhf.ppo.episodes import EpisodeRollout
from tuneyard.rlhf.ppo.experience import RewardScorer, gather
from tuneyard.rlhf.ppo.groups import RoleGroup
from tuneyard.rlhf.ppo.prompts import Prompt, batch_prompts, batch_seed
from tuneyard.rlhf.ppo.rollout import EngineRollout, Generating, Rollout


class RolloutsAhead:
    """Batches sampled up to `ppo.async.max_staleness` policy versions ahead of the iteration that trains them."""

    def __init__(
        self,
        *,
        source: EngineRollout | EpisodeRollout,
        prompts: list[Prompt],
        pad_id: int,
        ppo: PpoSection,
        seed: int,
        iterations: int,
        iteration: int,
        position: int,
        rewards: RewardScorer | None = None,
        reference: RoleGroup | None = None,
    ):
        """Batches from `iteration` (at prompt `position`) up to `iterations`, the run's last; `rewards` and
        `reference` score each batch as it arrives (None: left to the iteration that takes it)."""
        self.source, self.prompts, self.pad_id, self.ppo, self.seed = source, prompts, pad_id, ppo, seed
        self.bound, self.iterations = ppo.async_.max_staleness, iterations
        self.rewards, self.reference = rewards, reference
        # (iteration, position, the batch's Rollout, scored as it arrives)
        self.in_flight: deque[tuple[int, int, Future]] = deque()
        self.scoring = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tuneyard-arrivals")
        self.next_iteration, self.next_position = iteration, position
        self.engine_version = -1  # unknown until the first sync (a fresh or restarted engine)

    def rollout(self, iteration: int) -> tuple[Rollout, int]:
        """Batch `iteration`'s samples (the policy at version `iteration`), and the prompt position after them.

        Its figures: the staleness of its samples, the seconds of weight sync, the policy's wait for the engines,
        the engines' busy seconds on this batch and the batches still in flight behind it (queue depth)."""
        sync_s = self.sync_and_launch(iteration)
        waiting = time.perf_counter()
        batch_iteration, position, arriving = self.in_flight.popleft()
        assert batch_iteration == iteration, (batch_iteration, iteration)
        rollout = arriving.result()
        samples = rollout.samples
        policy_idle_s = time.perf_counter() - waiting
        sync_s += self.sync_and_launch(iteration)
        staleness = [iteration - s.version for s in samples]  # of each sample's oldest token
        resumed = [s for s in samples if s.token_versions and s.token_versions[0] != s.token_versions[-1]]
        if max(staleness) > self.bound:  # admission control makes this impossible: a broken invariant, not a user's
            raise RuntimeError(f"batch {iteration} is {max(staleness)} versions stale, over the bound {self.bound}")
        figures = {
            "staleness_max": float(max(staleness)),
            "staleness_mean": sum(staleness) / len(staleness),
            "weight_sync_s": sync_s,
            "policy_idle_s": policy_idle_s,
            "queue_depth": float(len(self.in_flight)),
            "resumed_frac": len(resumed) / len(samples),  # answers drawn by two versions (partial rollouts)
        }
        rollout.figures |= figures
        return rollout, position + self.ppo.rollout_batch_size

    def arrive(self, generating: Generating) -> Rollout:
        """A launched batch as the iteration that trains it takes it: its samples (rewarded call by call as the
        engines return them), the reference's log-probs once it is whole, the engines' busy seconds on it."""
        samples, engine_busy_s = self.source.collect(generating)
        rollout = Rollout.of(samples, self.pad_id, {**generating.figures, "engine_busy_s": engine_busy_s})
        if self.reference is not None:
            rollout.reference_logprobs = gather(self.reference, self.reference.scatter("logprobs", rollout.batch))[
                "logprobs"
            ]
        return rollout

    def sync_and_launch(self, version: int) -> float:
        """With the policy at `version`: sync the engines if they are idle and behind, then launch every batch the
        bound admits; the seconds the sync took."""
        sync_s = 0.0
        more_to_launch = self.next_iteration < self.iterations
        if self.engine_version != version and not self.in_flight and more_to_launch:
            # the policy goes on once it has sent its weights; the engines load them before the batch launched next
            sync_s = self.source.update_weights(wait_for_engines=False)["weight_sync_s"]
            self.engine_version = version
        elif self.engine_version != version and self.in_flight and self.ppo.async_.partial_rollouts:
            self.source.pause()  # the answers in flight keep their tokens so far
            sync_s = self.source.update_weights()["weight_sync_s"]
            self.engine_version = version
            self.source.resume(version)
        # the engines' version is at most the policy's, so this also keeps every batch within `bound` of `version`
        while self.next_iteration < self.iterations and self.next_iteration - self.engine_version <= self.bound:
            position, wanted = self.next_position, self.ppo.rollout_batch_size
            prompts = batch_prompts(self.prompts, position, wanted, self.ppo.samples_per_prompt, self.seed)
            arrived = self.rewards.score if self.rewards is not None else None
            seed = batch_seed(self.seed, position, wanted)
            generating = self.source.launch(prompts, seed, self.engine_version, arrived)
            self.in_flight.append((self.next_iteration, position, self.scoring.submit(self.arrive, generating)))
            self.next_iteration, self.next_position = self.next_iteration + 1, position + wanted
        return sync_s
