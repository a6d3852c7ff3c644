"""Rollouts: one object per engine, chosen once when the run starts, each owning its engine's whole lifecycle.

    PolicyRollout   HF generate inside the policy actors, on the weights they train (nothing to sync)
    EngineRollout   vLLM engines (role `rollout`): the weight-sync group, a sync before each rollout, generation
                    (`sample`, or `launch` now and `collect` later: `tuneyard.rlhf.ppo.ahead` generates ahead)

Both answer `sample(prompts, seed, version)` with the same `Sample`s: each answer's token ids as sampled, ending at
the run's first stop (`tuneyard.rlhf.ppo.sampling`), whether it finished or was truncated, the behaviour log-probs
where the engine returns them, and the policy version that produced it. `Rollout.of` lays samples out as the batch
every role's forward reads (`tuneyard.rlhf.ppo.batches`). `make_rollout` is the one place that asks which engine
the job chose.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from tuneyard.rlhf.config import PpoSection
from tuneyard.rlhf.ppo.batches import build_samples, left_pad, right_pad_values, split_rows
from tuneyard.rlhf.ppo.groups import RoleGroup, RoleStalled
from tuneyard.rlhf.ppo.prompt_queue import Answer, PromptQueue, call_bounds
from tuneyard.rlhf.ppo.prompts import Prompt
from tuneyard.rlhf.ppo.sampling import StopSet, end_of_answer
from tuneyard.training.errors import TrainingFailed


@dataclass
class Sample:
    """One sampled answer to one prompt, kept as the token ids the engine drew."""

    prompt: Prompt
    tokens: list[int]  # ending at the first stop (included), or at generation.max_new_tokens
    finished: bool  # ended at a stop; False: truncated at max_new_tokens
    version: int  # the policy version (iterations trained) whose weights sampled it (its oldest token)
    text: str  # the decoded answer, for the reward functions and the reward model
    logprobs: list[float] | None = None  # the engine's log-prob of each token (vLLM); the policy's own: None
    reward: float | None = None  # set once scored (before the batch is built under dynamic sampling)
    sampled: list[bool] | None = None  # which tokens the engine sampled (an episode's); None: every one
    environment_reward: float = 0.0  # what an episode's environment gave, added to the reward functions' score
    token_versions: list[int] | None = None  # the version that drew each token (an engine's answer)


@dataclass
class Rollout:
    """An iteration's samples and their batch layout (left-padded prompts, right-padded answers)."""

    samples: list[Sample]
    batch: dict[str, torch.Tensor]
    behaviour_logprobs: torch.Tensor | None = None  # [B, R], the engine's log-probs of its sampled tokens
    reference_logprobs: torch.Tensor | None = None  # [B, R], where the reference scored the batch as it arrived
    figures: dict[str, float] = field(default_factory=dict)  # how they were drawn (dynamic sampling, generating ahead)

    @classmethod
    def of(cls, samples: list[Sample], pad_id: int, figures: dict[str, float] | None = None) -> Rollout:
        """The batch of `samples`, in their order."""
        prompt_ids, prompt_mask = left_pad([s.prompt.ids for s in samples], pad_id)
        batch = build_samples(prompt_ids, prompt_mask, [s.tokens for s in samples], pad_id)
        engine = samples[0].logprobs is not None
        behaviour = right_pad_values([s.logprobs for s in samples]) if engine else None
        if any(s.sampled is not None for s in samples):
            # an episode's environment tokens are context (attended to) but not actions: out of the action mask
            sampled = right_pad_values([[float(x) for x in (s.sampled or [True] * len(s.tokens))] for s in samples])
            batch["action_mask"] = batch["action_mask"] * sampled.to(batch["action_mask"].dtype)
        return cls(samples, batch, behaviour_logprobs=behaviour, figures=figures or {})

    @property
    def mask(self) -> torch.Tensor:
        """The action mask as floats: 1 on the response tokens that count."""
        return self.batch["action_mask"].float()

    @property
    def finished(self) -> torch.Tensor:
        """[B] bool: which answers ended at a stop (the others were truncated)."""
        return torch.tensor([s.finished for s in self.samples])

    @property
    def rewards(self) -> torch.Tensor | None:
        """[B] the samples' rewards, where every one has been scored."""
        if any(s.reward is None for s in self.samples):
            return None
        return torch.tensor([s.reward for s in self.samples], dtype=torch.float32)


def finished_samples(
    prompts: list[Prompt],
    drawn: list[list[int]],
    logprobs: list[list[float]] | None,
    stops: StopSet,
    tokenizer: PreTrainedTokenizerBase,
    version: int,
) -> list[Sample]:
    """The engine's draws as Samples: each cut at its first stop id or stop string, its finish reason, its text."""

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    samples = []
    for i, (prompt, tokens) in enumerate(zip(prompts, drawn, strict=True)):
        end, finished = end_of_answer(tokens, stops, decode)
        kept = tokens[:end]
        samples.append(
            Sample(
                prompt=prompt,
                tokens=kept,
                finished=finished,
                version=version,
                text=decode(kept).strip(),
                logprobs=logprobs[i][:end] if logprobs is not None else None,
            )
        )
    return samples


@dataclass
class Generating:
    """A batch on its way: its prompts, the policy version the engines sample it with, and its samples to come (with
    the engines' mean busy seconds on it)."""

    prompts: list[Prompt]
    version: int
    answers: Future  # of (list[Sample], float)
    figures: dict[str, float] = field(default_factory=dict)  # how the batch was drawn (an episode batch's turns)


class PolicyRollout:
    """HF `generate` inside the policy actors: each rank answers an equal, consecutive share of the prompts."""

    figures: dict[str, float] = {}  # noqa: RUF012  (how the last batch was drawn: none to tell)

    def __init__(self, groups: dict[str, RoleGroup], ppo: PpoSection, tokenizer: PreTrainedTokenizerBase, stops):
        self.policy, self.tokenizer, self.stops = groups["policy"], tokenizer, stops
        self.batch_multiple = len(self.policy.actors)  # `sample` splits its prompts equally over the ranks

    def start(self) -> None:
        """Nothing to open: the policy samples with the weights it trains."""

    def update_weights(self, wait_for_engines: bool = True) -> dict[str, float]:
        """Nothing to send (the figures of a sync: none)."""
        return {}

    def sample(self, prompts: list[Prompt], seed: int, version: int) -> list[Sample]:
        """One answer to each prompt (a prompt repeated is answered again), seeded."""
        prompt_ids, prompt_mask = left_pad([p.ids for p in prompts], self.tokenizer.pad_token_id)
        shards = split_rows({"ids": prompt_ids, "mask": prompt_mask}, len(self.policy.actors))
        answers = self.policy.results(self.policy.call("generate", [(s["ids"], s["mask"], seed) for s in shards]))
        drawn = [tokens for part in answers for tokens in part]
        return finished_samples(prompts, drawn, None, self.stops, self.tokenizer, version)


class EngineRollout:
    """vLLM engines (role `rollout`): they take the prompts from a queue, each prompt with its own seed, and answer
    on the policy's weights as of the last `update_weights`."""

    figures: dict[str, float] = {}  # noqa: RUF012  (how the last batch was drawn: none to tell)

    def __init__(self, groups: dict[str, RoleGroup], ppo: PpoSection, tokenizer: PreTrainedTokenizerBase, stops):
        self.groups, self.ppo, self.tokenizer, self.stops = groups, ppo, tokenizer, stops
        self.engines = groups["rollout"]
        self.manifest: list | None = None
        self.queue = PromptQueue(self.engines)
        # one thread hands out the batches' calls, a batch at a time, while the driver goes on
        self.dispatcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tuneyard-engines")
        self.loading: Future | None = None  # the engines loading a sync not waited for (`update_weights`)

    def start(self) -> None:
        """Join policy rank 0 and every engine worker in the weight-sync group, and agree on what a sync sends."""
        self.manifest = open_weight_sync(self.groups, self.ppo)

    def update_weights(self, wait_for_engines: bool = True) -> dict[str, float]:
        """The policy's current weights into every engine (also after a resume); the seconds the caller waited.

        Without `wait_for_engines` it returns once the policy has sent them, so the policy can go on (its weights
        may change from then on); the engines load what they received meanwhile, and the next batch launched waits
        for that first (an error of the sync is raised from that batch)."""
        started = time.perf_counter()
        if wait_for_engines:
            sync_weights(self.groups, self.manifest)
        else:
            receiving = start_sync(self.groups, self.manifest)
            self.loading = self.dispatcher.submit(seconds_of, finish_sync, self.groups, receiving)
        return {"weight_sync_s": time.perf_counter() - started}

    def sample(self, prompts: list[Prompt], seed: int, version: int) -> list[Sample]:
        """One answer to each prompt; prompt i is sampled with seed + i, so the answers do not depend on how many
        engines share them."""
        return self.collect(self.launch(prompts, seed, version))[0]

    def launch(
        self,
        prompts: list[Prompt],
        seed: int,
        version: int,
        arrived: Callable[[list[Sample]], None] | None = None,
    ) -> Generating:
        """Start `sample` and return at once; `collect` waits for the answers. The prompts go to the engines as a
        queue (`tuneyard.rlhf.ppo.prompt_queue`); `arrived` is handed each call's samples as they come. Batches
        launched one after another are answered in turn."""
        bounds = call_bounds(
            len(prompts), self.ppo.samples_per_prompt, len(self.engines.actors), self.ppo.roles.rollout.groups_per_call
        )
        budget = self.ppo.generation.max_new_tokens
        calls = [[Answer(p.ids, seed + i, budget) for i, p in enumerate(prompts[a:b], start=a)] for a, b in bounds]
        samples: list[list[Sample]] = [[] for _ in calls]

        def keep(call: int, answers: list[Answer]) -> None:
            start, end = bounds[call]
            samples[call] = part = engine_samples(prompts[start:end], answers, self.stops, self.tokenizer, version)
            if arrived is not None:
                arrived(part)

        loading, self.loading = self.loading, None

        def answer() -> tuple[list[Sample], float]:
            load_s = loading.result() if loading is not None else 0.0  # done: the dispatcher ran it first
            busy_s = self.queue.answer(calls, keep, version)
            return [s for part in samples for s in part], load_s + busy_s

        return Generating(prompts, version, self.dispatcher.submit(answer))

    def collect(self, generating: Generating) -> tuple[list[Sample], float]:
        """A launched batch's samples, and the seconds the engines were busy with it (their mean)."""
        return generating.answers.result()

    def pause(self) -> None:
        """Interrupt the engines' answers (they keep the tokens drawn so far) until `resume` (partial rollouts)."""
        self.queue.pause()

    def resume(self, version: int) -> None:
        """Resume the interrupted answers, and answer on, with the weights of `version` (just synced)."""
        self.queue.resume(version)


def engine_samples(
    prompts: list[Prompt], answers: list[Answer], stops: StopSet, tokenizer: PreTrainedTokenizerBase, version: int
) -> list[Sample]:
    """The engines' answers as Samples (`finished_samples`), each token tagged with the version that drew it; a
    sample's version is its oldest token's (`version`, the launch's, for an empty answer)."""
    drawn, logprobs = [a.tokens for a in answers], [a.logprobs for a in answers]
    samples = finished_samples(prompts, drawn, logprobs, stops, tokenizer, version)
    for sample, answer in zip(samples, answers, strict=True):
        sample.token_versions = answer.versions[: len(sample.tokens)]
        sample.version = min(sample.token_versions, default=version)
    return samples


class LocalRollout:
    """HF `generate` in this process, on a model it is handed (the driver's held-out figures, and tests)."""

    figures: dict[str, float] = {}  # noqa: RUF012  (how the last batch was drawn: none to tell)

    def __init__(self, model, tokenizer: PreTrainedTokenizerBase, stops: StopSet, generation) -> None:
        import contextlib

        from tuneyard.rlhf.ppo.generation import HFGenerator

        self.tokenizer, self.stops, self.generation = tokenizer, stops, generation
        self.generator = HFGenerator(lambda: contextlib.nullcontext(model), tokenizer, stops)

    def start(self) -> None:
        """Nothing to open."""

    def update_weights(self, wait_for_engines: bool = True) -> dict[str, float]:
        """Nothing to send: the model is this process's."""
        return {}

    def sample(self, prompts: list[Prompt], seed: int, version: int) -> list[Sample]:
        """One answer to each prompt, seeded (all of them with one seed: the batch is sampled at once)."""
        ids, mask = left_pad([p.ids for p in prompts], self.tokenizer.pad_token_id)
        drawn = self.generator.generate(ids, mask, self.generation, seed)
        return finished_samples(prompts, drawn, None, self.stops, self.tokenizer, version)


def make_rollout(
    groups: dict[str, RoleGroup], ppo: PpoSection, tokenizer: PreTrainedTokenizerBase, stops: StopSet
) -> PolicyRollout | EngineRollout:
    """The rollout object of the job's engine (`ppo.generation.engine`), started."""
    rollout = (EngineRollout if ppo.generation.engine == "vllm" else PolicyRollout)(groups, ppo, tokenizer, stops)
    rollout.start()
    return rollout


def open_weight_sync(groups: dict[str, RoleGroup], ppo: PpoSection) -> list:
    """Join policy rank 0 and every rollout engine's workers in a process group of their own; the sync's manifest.

    A tied output head is part of the manifest only where an engine reports that its head keeps a copy of its own."""
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
    own_heads = [keeps for worker_reports in rollout.results(engines_join) for keeps in worker_reports]
    ray.get(policy_joins)
    return policy.results(policy.broadcast("weight_manifest", any(own_heads)))[0]


def sync_weights(groups: dict[str, RoleGroup], manifest: list) -> None:
    """The policy's current weights into every rollout engine (ZeRO-3 shards gathered one parameter at a time).

    Whichever side fails first says why, at once: an engine's own error (one that could not load what was sent ends
    the run), or its death (RayActorError: the groups restart, as for any lost actor). A broadcast that times out
    names its parameter and the engines still silent."""
    finish_sync(groups, start_sync(groups, manifest))


def start_sync(groups: dict[str, RoleGroup], manifest: list) -> list:
    """`sync_weights` up to the policy's end of it (every bucket sent); the engines' calls, still loading."""
    import ray

    policy, rollout = groups["policy"], groups["rollout"]
    sending = policy.broadcast("send_weights")
    receiving = rollout.broadcast("receive_weights", manifest)
    pending = [*sending, *receiving]
    while any(ref in pending for ref in sending):
        (done,), pending = ray.wait(pending, num_returns=1)
        try:
            refused_sync(ray.get, done)
        except ray.exceptions.RayTaskError as exc:
            if done in receiving:
                raise
            # an engine that dies mid-sync breaks the policy's sockets first ("Connection reset by peer"): its
            # death, once Ray reports it, is what the run answers (the restart path), not the policy's error
            answered, silent = ray.wait(receiving, num_returns=len(receiving), timeout=10)
            for ref in answered:
                ray.get(ref)
            timed_out = re.search(r"WeightSyncTimeout: (.*)", str(exc))
            if timed_out is None:
                raise
            raise RoleStalled(f"{timed_out.group(1).strip()}; " + rollout.silence(receiving, silent)) from None
    return receiving


def finish_sync(groups: dict[str, RoleGroup], receiving: list) -> None:
    """`sync_weights` from the policy's end of it: every engine has loaded what it received, or the error says why."""
    import ray

    rollout = groups["rollout"]
    # the sender can finish into the sockets' buffers first: an engine still receiving a timeout later is stuck
    answered, silent = ray.wait(receiving, num_returns=len(receiving), timeout=rollout.timeout_s)
    for ref in answered:
        refused_sync(ray.get, ref)
    if silent:
        raise RoleStalled(
            "the weight sync timed out: the policy sent every parameter, and an engine did not take them in within "
            f"cluster.collective_timeout_s ({rollout.timeout_s:g} s); " + rollout.silence(receiving, silent)
        )


def seconds_of(call: Callable, *args) -> float:
    """Run `call(*args)`; the seconds it took."""
    started = time.perf_counter()
    call(*args)
    return time.perf_counter() - started


def refused_sync(get, ref) -> None:
    """`get(ref)`; an engine that could not load what the policy sent ends the run with its one paragraph."""
    import ray

    try:
        get(ref)
    except ray.exceptions.RayTaskError as exc:
        mismatch = re.search(r"WeightSyncMismatch: (.*)", str(exc))
        if mismatch is None:
            raise
        raise TrainingFailed(mismatch.group(1).strip()) from None
