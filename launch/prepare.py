"""Tokenise and pack a job's data into its cache before any worker starts (`tuneyard prepare`, and every run).

The cache is built here, in the driver, before any process group exists, and every rank only reads it.
Built inside the workers, one rank would tokenise while the others waited in a process-group barrier,
and a big corpus would run past the collective timeout (cluster.collective_timeout_s).

A corpus larger than memory (data.streaming) is split into shards that Ray tasks tokenise in parallel across
the cluster's nodes (training/data/shards.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tuneyard.launch.config import JobConfig
from tuneyard.training.config import TrainSpec
from tuneyard.training.errors import UserError
from tuneyard.training.stages import stage_spec, stages_where

# why a stage that is not tokenised on the driver (training/stages.py) has nothing to prepare ahead of its run
TOKENISED_ON_THE_WORKERS = {
    "classify": "its labelled rows are small and every worker tokenises them in seconds",
    "token-classify": "its labelled rows are small and every worker tokenises them in seconds",
    "ppo": "its controller tokenises the prompts it samples from",
}


@dataclass
class PreparedData:
    """Where a job's tokenised splits are, how many rows each holds, and whether they were there already."""

    folder: Path
    rows: dict[str, int]
    warm: bool

    def summary(self) -> str:
        """One line for the terminal."""
        rows = ", ".join(f"{split} {count:,} rows" for split, count in self.rows.items())
        return f"{'already prepared' if self.warm else 'prepared'}: {rows} in {self.folder}"


def ray_task_runner(spec: TrainSpec, workers: int):
    """Run shard tasks as Ray tasks spread over the cluster's nodes, at most `workers` at once (0: one per CPU).

    Each task tokenises on one thread (no tokenizers parallelism), so N tasks use N CPUs, as Ray reserved them.
    """
    import ray
    from ray.exceptions import RayTaskError

    @ray.remote(
        num_cpus=1,
        scheduling_strategy="SPREAD",
        runtime_env={"env_vars": {"RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}},
    )
    def prepare_shard(task, spec_dump: dict, folder: str) -> dict:
        from tuneyard.training.config import TrainSpec
        from tuneyard.training.data.shards import tokenize_shard
        from tuneyard.training.model import load_tokenizer

        spec = TrainSpec.model_validate(spec_dump)
        tokenizer = load_tokenizer(spec.model, spec.data.chat_template)
        return {
            **tokenize_shard(task, spec.data, tokenizer, Path(folder)),
            "node": ray.get_runtime_context().get_node_id(),
        }

    at_once = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    spec_dump = spec.model_dump(mode="json")

    def run(tasks: list, folder: Path) -> Iterator[dict]:
        waiting, running = list(tasks), []
        try:
            while waiting or running:
                while waiting and len(running) < at_once:
                    running.append(prepare_shard.remote(waiting.pop(0), spec_dump, str(folder)))
                done, running = ray.wait(running, num_returns=1)
                yield ray.get(done[0])
        except RayTaskError as exc:
            if isinstance(exc.cause, UserError):  # a bad row: its file:line, without Ray's traceback
                raise UserError(str(exc.cause)) from None
            raise
        finally:
            for ref in running:
                ray.cancel(ref)

    return run


def prepare_data(job: JobConfig, on_ray: bool = False, report: Callable[[str], None] | None = None) -> PreparedData:
    """Build the job's tokenised-data cache (a no-op when it is warm); a streamed corpus by Ray tasks if `on_ray`."""
    if not stage_spec(job.stage).tokenised_on_driver:
        reason = TOKENISED_ON_THE_WORKERS.get(job.stage, "TRL tokenises its rows inside its trainer")
        raise UserError(
            f"stage {job.stage}: {reason}, so there is nothing to prepare ahead; `tuneyard prepare` applies to "
            f"stages {' and '.join(stages_where(lambda s: s.tokenised_on_driver))}"
        )
    from tuneyard.training.data.tokenize import default_cache_dir, prepare_datasets, prepared_folder
    from tuneyard.training.model import load_tokenizer

    spec = job.train_spec()
    tokenizer = load_tokenizer(spec.model, spec.data.chat_template)  # as the workers load it: the same cache key
    cache_dir = default_cache_dir(spec.data, spec.output)
    runner = ray_task_runner(spec, spec.data.prepare_workers) if on_ray and spec.data.streaming else None
    splits, warm = prepare_datasets(spec.stage, spec.data, tokenizer, spec.training.seed, cache_dir, runner, report)
    folder = prepared_folder(spec.stage, spec.data, tokenizer, spec.training.seed, cache_dir)
    return PreparedData(folder=folder, rows={name: len(split) for name, split in splits.items()}, warm=warm)
