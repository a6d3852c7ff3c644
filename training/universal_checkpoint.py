"""Resuming a DeepSpeed ZeRO checkpoint on another number of ranks, through DeepSpeed's universal checkpoint.

A ZeRO checkpoint splits the optimizer state (under ZeRO-3 the weights too) over the ranks that wrote it, and an
engine loads it only on as many ranks. DeepSpeed's `ds_to_universal` rewrites it as one file per parameter and
state, which an engine loads on any number of ranks when its config says `"checkpoint": {"load_universal": true}`.

The universal copy is written once, beside the original in the same engine folder (the one holding DeepSpeed's
`latest` file): `TAG_universal/` and a `latest_universal` file naming it. It is built in a staging folder and
renamed into place, so a crash leaves either no copy or a whole one; the original files are never touched.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
from pathlib import Path

import torch

from tuneyard.training.errors import UserError

LATEST = "latest"  # DeepSpeed's file naming the tag (folder) of the newest save
UNIVERSAL_POINTER = "latest_universal"  # DeepSpeed's file naming the universal copy an engine loads
STAGING = "universal.staging"


class NotConvertible(Exception):
    """DeepSpeed's converter refused or failed on a checkpoint; the message is its reason."""


def _tag(folder: Path) -> str | None:
    """The tag DeepSpeed's `latest` file names in an engine folder (None: not a DeepSpeed save)."""
    latest = Path(folder) / LATEST
    return latest.read_text().strip() if latest.is_file() else None


def _optimizer_files(folder: Path) -> list[Path]:
    """The per-rank ZeRO optimizer files of the newest save in an engine folder (bf16_ prefixed ones included)."""
    tag = _tag(folder)
    return sorted((Path(folder) / tag).glob("*zero_pp_rank_*_optim_states.pt")) if tag else []


def written_ranks(folder: Path) -> int | None:
    """How many ranks the ZeRO optimizer state of an engine folder is split over (None: not a ZeRO checkpoint)."""
    ranks = {p.name.split("zero_pp_rank_")[1].split("_")[0] for p in _optimizer_files(folder)}
    return len(ranks) or None


def universal_copy(folder: Path) -> Path | None:
    """The whole universal copy of an engine folder's newest save, or None when it has none yet."""
    pointer = Path(folder) / UNIVERSAL_POINTER
    if not pointer.is_file():
        return None
    copy = Path(folder) / pointer.read_text().strip()
    return copy if (copy / "zero").is_dir() else None


def loads_universal(folder: Path | None, world_size: int) -> bool:
    """Whether an engine resuming from `folder` on `world_size` ranks must load its universal copy."""
    if folder is None:
        return False
    written = written_ranks(folder)
    return written is not None and written != world_size


def convert_to_universal(folder: Path, log_file: Path) -> Path:
    """Write the universal copy of an engine folder's newest save (once; the original stays); return it.

    DeepSpeed's converter prints its progress to `log_file`; what it cannot convert raises NotConvertible.
    """
    folder = Path(folder)
    done = universal_copy(folder)
    if done is not None:
        return done
    tag = _tag(folder)
    if tag is None:
        raise NotConvertible(f"{folder} holds no DeepSpeed save (no 'latest' file naming its tag)")
    final = folder / f"{tag}_universal"
    if not (final / "zero").is_dir():  # a copy renamed into place is whole; only its pointer may be missing
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        staging = folder / STAGING
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        args = argparse.Namespace(
            input_folder=str(folder / tag),
            output_folder=str(staging / final.name),  # ds_to_universal writes its pointer beside it: in staging
            num_extract_workers=1,  # no process pool inside a driver that runs Ray's threads
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            # HF's and our engines do not record the tensor-parallel layout Megatron clients do: pure data parallel
            inject_missing_state=True,
        )
        log_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(log_file, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                ds_to_universal(args)
        except Exception as exc:  # DeepSpeed asserts and raises what it cannot convert; its reason is the news
            shutil.rmtree(staging, ignore_errors=True)
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise NotConvertible(f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__) from exc
        (staging / final.name).rename(final)
        shutil.rmtree(staging, ignore_errors=True)
    pointer = folder / f"{UNIVERSAL_POINTER}.tmp"
    pointer.write_text(final.name)
    pointer.replace(folder / UNIVERSAL_POINTER)
    return final


def prepare_resize(folder: Path, world_size: int, key: str, log_file: Path, optimizer_on_nvme: bool = False) -> bool:
    """Make an engine folder loadable on `world_size` ranks: convert it when it was written by another count.

    True when the engine must load the universal copy. A save the converter cannot convert, or one an engine with
    its optimizer on NVMe (`optimizer_on_nvme`) would load, is a UserError with the reason and the way on.
    """
    if not loads_universal(folder, world_size):
        return False
    written = written_ranks(folder)
    try:
        if optimizer_on_nvme or (Path(folder) / str(_tag(folder)) / "offloaded_tensors").is_dir():
            # DeepSpeed 0.19's load_checkpoint skips the ZeRO (and universal) optimizer load under NVMe offload and
            # copies each rank's swap files (TAG/offloaded_tensors/rankN) instead, which exist per writing rank only
            raise NotConvertible(
                "the optimizer state is offloaded to NVMe, which DeepSpeed loads per rank, never universally"
            )
        convert_to_universal(folder, log_file)
    except OSError as exc:  # a read-only checkpoint folder, a full disk: the copy is written beside the original
        raise UserError(
            f"{folder} was written by {written} workers under ZeRO, but this job runs {key}: {world_size}, and its "
            f"universal copy cannot be written beside it ({exc.strerror or exc}: '{exc.filename}'); give write "
            f"access to it (or copy the checkpoint somewhere writable and set output.resume to the copy), or set "
            f"{key}: {written} to continue it as it is"
        ) from None
    except NotConvertible as exc:
        raise UserError(
            f"{folder} was written by {written} workers under ZeRO (its optimizer state is split {written} ways), "
            f"but this job runs {key}: {world_size}, and DeepSpeed's ds_to_universal, which makes the copy another "
            f"number of ranks can load, could not convert it ({exc}; its log: {log_file}). Set {key}: {written} "
            "to continue it (the checkpoint is as it was), or start anew (another output.dir, or "
            "output.overwrite: true)"
        ) from None
    return True


def untie_step_counters(optimizer: object) -> int:
    """Give each parameter group of the torch optimizer inside DeepSpeed's its own Adam step tensor; how many it split.

    DeepSpeed 0.19's ZeRO-3 universal load puts one `step` tensor into the state of every sub-group, and torch's
    AdamW increments each group's step in place, so with two groups (decayed, not decayed) the shared count would
    rise by two a step and the bias correction run ahead of the run's true step.
    """
    from tuneyard.training.nonfinite import innermost_torch_optimizer

    inner = innermost_torch_optimizer(optimizer)
    if inner is None:
        return 0
    seen: set[int] = set()
    split = 0
    for state in inner.state.values():
        step = state.get("step")
        if torch.is_tensor(step):
            if id(step) in seen:
                state["step"] = step.clone()
                split += 1
            seen.add(id(step))
    return split


def load_engine_checkpoint(engine, folder: str | Path, tag: str):
    """`engine.load_checkpoint(folder, tag)`, from the universal copy when the save has another rank count."""
    folder = Path(folder)
    copy = universal_copy(folder) if loads_universal(folder, engine.dp_world_size) else None
    if copy is None:
        return engine.load_checkpoint(str(folder), tag=tag)
    # DeepSpeed reads this switch only while loading, so an engine built without it loads the copy the same way
    engine._config.load_universal_checkpoint = True
    try:
        loaded = engine.load_checkpoint(str(folder), tag=copy.name)
    finally:
        engine._config.load_universal_checkpoint = False
    untie_step_counters(engine.optimizer)
    return loaded
