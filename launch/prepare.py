"""Tokenise and pack a job's data into its cache before any worker starts (`tuneyard prepare`, and every run).

Workers used to build the cache on rank 0 while the other ranks waited in a process-group barrier,
which a big corpus turns into a collective timeout (30 min by default). Built here, in the driver,
before any process group exists, every rank only reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from launch.config import JobConfig
from training.errors import UserError

TOKENISED_STAGES = ("pretrain", "sft")  # the others hand raw rows to TRL, which tokenises in its trainer


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


def prepare_data(job: JobConfig) -> PreparedData:
    """Build the job's tokenised-data cache in this process (a no-op when it is warm)."""
    if job.stage not in TOKENISED_STAGES:
        raise UserError(
            f"stage {job.stage}: TRL tokenises this stage's rows inside its trainer, so there is nothing to "
            f"prepare ahead; `tuneyard prepare` applies to stages {' and '.join(TOKENISED_STAGES)}"
        )
    from training.model import load_tokenizer
    from training.runner import default_cache_dir
    from training.tokenize import cache_key, prepare_datasets

    spec = job.train_spec()
    tokenizer = load_tokenizer(spec.model, spec.data.chat_template)  # as the workers load it: the same cache key
    cache_dir = default_cache_dir(spec.data, spec.output)
    splits, warm = prepare_datasets(spec.stage, spec.data, tokenizer, spec.training.seed, cache_dir)
    folder = cache_dir / cache_key(spec.stage, spec.data, tokenizer, spec.training.seed)
    return PreparedData(folder=folder, rows={name: len(split) for name, split in splits.items()}, warm=warm)
