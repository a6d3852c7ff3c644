"""A batch's prompts handed to the rollout engines as a queue, in calls of whole prompt groups.

Each engine holds at most two calls (one generating, one waiting behind it, so it never idles for a round trip);
whichever engine answers first takes the next call from the queue, so a slow engine answers fewer calls instead of
holding up an equal share. Each call's answers are handed on as they arrive (the async loop scores them there), and
every prompt keeps its own seed, so the answers do not depend on which engine drew them.

Partial rollouts (`ppo.async.partial_rollouts`): `pause` stops the hand-out and interrupts the engines, whose calls
return the tokens drawn so far; once the new weights are in, `resume` hands out the rest of each interrupted answer
as a call of its own (the prompt and the tokens so far as the prompt, the rest of the token budget, a seed of its
own), so every answer is built from segments, each tagged with the version of the weights that drew it.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tuneyard.rlhf.ppo.groups import RoleGroup, RoleStalled

CALLS_IN_FLIGHT_PER_ENGINE = 2
RESUMED_SEED_STRIDE = 1_000_003  # a resumed segment's seed: the prompt's seed + stride x the segments before it


def call_bounds(prompts: int, group: int, engines: int, groups_per_call: int | None) -> list[tuple[int, int]]:
    """The [start, end) prompt ranges of a batch's calls: `groups_per_call` whole groups each (None: one call with a
    single engine, else the groups split in two calls per engine). A batch of episodes' later turns may hold part
    of a group: it counts as one."""
    groups = max(1, math.ceil(prompts / group))
    if groups_per_call is None:
        groups_per_call = groups if engines == 1 else max(1, math.ceil(groups / (2 * engines)))
    step = groups_per_call * group
    return [(start, min(start + step, prompts)) for start in range(0, prompts, step)]


@dataclass
class Answer:
    """One prompt's answer as its segments arrive: the tokens, their log-probs and the version that drew each."""

    prompt_ids: list[int]
    seed: int
    budget: int  # max_new_tokens
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    segments: int = 0

    def next_call(self) -> tuple[list[int], int, int]:
        """(prompt ids, seed, tokens left) of the answer's next segment: the prompt followed by the tokens so far."""
        return (
            self.prompt_ids + self.tokens,
            self.seed + RESUMED_SEED_STRIDE * self.segments,
            self.budget - len(self.tokens),
        )


class PromptQueue:
    """The engines' calls, handed out from one driver thread (`answer`), paused and resumed from another."""

    def __init__(self, engines: RoleGroup):
        self.engines = engines
        self.version = -1  # the version of the engines' weights (raised by a launch and by `resume`)
        self.lock = threading.Condition()
        self.open = True  # calls may be handed out
        self.running = 0  # calls on the engines

    def answer(self, calls: list[list[Answer]], arrived: Callable[[int, list[Answer]], None], version: int) -> float:
        """Every call answered by whichever engine is free, interrupted answers resumed after `resume`; `arrived(i,
        answers)` as call i's answers are whole. The engines' mean busy seconds. `version`: the engines' version when
        the batch was launched (a pause since may have moved them on: versions only grow, so the newer one holds).

        Nothing answering within cluster.collective_timeout_s is a stall (RoleStalled, naming the silent engines); an
        engine's error or death is raised as it comes."""
        import ray

        with self.lock:
            self.version = max(self.version, version)
        waiting = deque((i, answers) for i, answers in enumerate(calls))
        unfinished = [len(answers) for answers in calls]
        running: dict = {}  # ObjectRef -> (engine, call, its answers, the version drawing them)
        load = [0] * len(self.engines.actors)
        busy = [0.0] * len(self.engines.actors)

        def hand_out() -> None:
            with self.lock:
                if not self.open:
                    return
                for engine, actor in enumerate(self.engines.actors):
                    while waiting and load[engine] < CALLS_IN_FLIGHT_PER_ENGINE:
                        call, answers = waiting.popleft()
                        prompts, seeds, budgets = zip(*(a.next_call() for a in answers), strict=True)
                        ref = actor.generate_timed.remote(list(prompts), list(seeds), list(budgets))
                        running[ref] = (engine, call, answers, self.version)
                        load[engine] += 1
                        self.running += 1

        while waiting or running:
            hand_out()
            if not running:  # paused with calls waiting: until `resume`
                with self.lock:
                    self.lock.wait_for(lambda: self.open)
                continue
            done, _ = ray.wait(list(running), num_returns=1, timeout=self.engines.timeout_s)
            if not done:
                raise RoleStalled(self.stall_message(running))
            engine, call, answers, drawn_by = running.pop(done[0])
            load[engine] -= 1
            try:
                segments, seconds = ray.get(done[0])
            finally:
                with self.lock:
                    self.running -= 1
                    self.lock.notify_all()
            busy[engine] += seconds
            resumed = []
            for answer, (tokens, logprobs, interrupted) in zip(answers, segments, strict=True):
                answer.tokens += tokens
                answer.logprobs += logprobs
                answer.versions += [drawn_by] * len(tokens)
                answer.segments += 1
                if interrupted:
                    resumed.append(answer)
                else:
                    unfinished[call] -= 1
            if resumed:
                waiting.appendleft((call, resumed))  # the oldest answers go first
            hand_out()  # before handing the answers on, so the engine's queue refills first
            if not unfinished[call]:
                arrived(call, calls[call])
        return sum(busy) / len(busy)

    def pause(self) -> None:
        """Hand out no more calls, interrupt the engines, and return once none is running (the engines keep
        returning at once until their next weights arrive)."""
        import ray

        with self.lock:
            self.open = False
        ray.get(self.engines.broadcast("interrupt"))
        with self.lock:
            self.lock.wait_for(lambda: self.running == 0)

    def resume(self, version: int) -> None:
        """Hand out calls again, on weights of `version`."""
        with self.lock:
            self.version, self.open = version, True
            self.lock.notify_all()

    def stall_message(self, running: dict) -> str:
        """The engines with calls running and nothing back."""
        refs = [None] * len(self.engines.actors)
        for ref, (engine, *_) in running.items():
            refs[engine] = ref
        silent = [refs[engine] for engine in sorted({engine for engine, *_ in running.values()})]
        return (
            f"no rollout engine answered a call within cluster.collective_timeout_s ({self.engines.timeout_s:g} s); "
            + self.engines.silence(refs, silent)
        )
