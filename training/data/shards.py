"""Pretraining corpora larger than memory (data.streaming): byte ranges of the text files are tokenised and
packed by independent tasks, each into its own Arrow shard; training memory-maps the shards in place.

Why Arrow shards read through `datasets` rather than a Ray Data stream: the Trainer keeps its map-style
sampler, so every rank reads only the rows of its own share (pages of a memory map, never the corpus),
and a resumed run skips the batches it has seen by index, without reading them: the exact-sample resume
an iterable stream would have to rebuild. Ray is used only to run the tasks on the cluster's nodes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import resource
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from tuneyard.training.config import DataConfig, DataSource
from tuneyard.training.data.formats import normalize_row
from tuneyard.training.errors import UserError

log = logging.getLogger(__name__)
STREAMED_SUFFIXES = (".txt", ".jsonl", ".parquet")
STREAMED_VERSION = "1"  # bump when the shard layout changes
MANIFEST = "manifest.json"
LINES_PER_BATCH = 1000  # documents tokenised per tokenizer call: bounds a task's memory, keeps calls efficient
SCHEMA = pa.schema([pa.field("input_ids", pa.list_(pa.int32()))])


@dataclass(frozen=True)
class ShardTask:
    """One unit of preparation: a byte range of a .txt/.jsonl file, or row groups of a .parquet file."""

    role: str  # train or eval
    source: int  # index of its data source in data.train / data.eval (weights apply per source)
    path: str
    start: int  # byte offset, or first row group
    end: int  # byte offset (exclusive), or last row group (exclusive)
    name: str  # its shard's file name in the prepared folder


def source_files(source: DataSource, key: str) -> list[Path]:
    """The text files of one source: the file itself, or the .txt/.jsonl/.parquet files under a folder."""
    path = Path(source.path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in STREAMED_SUFFIXES)
        if not files:
            raise UserError(f"{key}: the folder '{source.path}' holds no {'/'.join(STREAMED_SUFFIXES)} files")
        return files
    if path.is_file() and path.suffix.lower() in STREAMED_SUFFIXES:
        return [path]
    if path.is_file():
        raise UserError(
            f"{key}: data.streaming reads {'/'.join(STREAMED_SUFFIXES)} files, not '{source.path}'; convert it, "
            "or drop data.streaming"
        )
    raise UserError(
        f"{key}: data source '{source.path}' is not a local file or folder; data.streaming reads local "
        f"{'/'.join(STREAMED_SUFFIXES)} files (on a filesystem every node sees): download a hub dataset first, "
        "e.g. `huggingface-cli download --repo-type dataset NAME --local-dir DIR`, and name DIR"
    )


def _ranges(path: Path, shard_bytes: int) -> list[tuple[int, int]]:
    """Byte ranges of a line-oriented file (a line belongs to the range it starts in), or parquet row-group ranges."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            meta = pq.ParquetFile(path).metadata
        except (pa.ArrowException, OSError) as exc:
            raise UserError(f"{path}: not a readable Parquet file ({str(exc).strip().splitlines()[0]})") from None
        groups, ranges, first, size = meta.num_row_groups, [], 0, 0
        for group in range(groups):
            size += meta.row_group(group).total_byte_size
            if size >= shard_bytes or group == groups - 1:
                ranges.append((first, group + 1))
                first, size = group + 1, 0
        return ranges
    size = path.stat().st_size
    return [(start, min(start + shard_bytes, size)) for start in range(0, size, shard_bytes)]


def plan_tasks(cfg: DataConfig) -> list[ShardTask]:
    """Every shard the job's train and eval sources split into, in a fixed order."""
    shard_bytes = max(1, int(cfg.shard_mb * 2**20))
    tasks = []
    for role, sources in (("train", cfg.train), ("eval", cfg.eval or [])):
        for index, source in enumerate(sources):
            for path in source_files(source, f"data.{role}"):
                for start, end in _ranges(path, shard_bytes):
                    tasks.append(ShardTask(role, index, str(path), start, end, f"{role}-{len(tasks):05d}.arrow"))
    return tasks


def line_records(path: str, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) of every line that starts in [start, end): each line of the file in exactly one range."""
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            f.readline()  # the rest of the line the byte before `start` is on: it belongs to the range before
        offset = f.tell()
        while offset < end:
            line = f.readline()
            if not line:
                return
            yield offset, line
            offset += len(line)


def line_number(path: str, offset: int) -> int:
    """The 1-based line a byte offset is on (only computed for an error message)."""
    count, done = 1, 0
    with open(path, "rb") as f:
        while done < offset:
            block = f.read(min(1 << 20, offset - done))
            if not block:
                break
            count += block.count(b"\n")
            done += len(block)
    return count


def _decoded(path: str, offset: int, line: bytes) -> str:
    try:
        return line.decode("utf-8-sig" if offset == 0 else "utf-8")
    except UnicodeDecodeError:
        raise UserError(
            f"{path}:{line_number(path, offset)}: not UTF-8 text; data files are read as UTF-8: convert it, e.g. "
            "iconv -f latin1 -t utf-8 FILE > FILE.utf8"
        ) from None


def documents(task: ShardTask, cfg: DataConfig) -> Iterator[str]:
    """The text of every document in a task's range, validated as the in-memory path validates rows."""
    suffix = Path(task.path).suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(task.path)
        for group in range(task.start, task.end):
            for i, row in enumerate(parquet.read_row_group(group).to_pylist()):
                yield normalize_row(row, "text", f"{task.path} row group {group} row {i}", cfg.text_field, cfg.columns)[
                    "text"
                ]
        return
    for offset, raw in line_records(task.path, task.start, task.end):
        line = _decoded(task.path, offset, raw)
        if not line.strip():
            continue
        if suffix == ".txt":
            yield line.rstrip("\r\n")
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{task.path}:{line_number(task.path, offset)}: malformed JSON ({exc.msg} at column {exc.colno}); "
                "each line of a .jsonl file must be one JSON object"
            ) from None
        yield _text_of(row, task.path, offset, cfg)


def _text_of(row: object, path: str, offset: int, cfg: DataConfig) -> str:
    """A .jsonl row's text; its line number is counted only when the row is refused."""
    mark = f"{path}:@{offset}"
    try:
        return normalize_row(row, "text", mark, cfg.text_field, cfg.columns)["text"]
    except UserError as exc:
        raise UserError(str(exc).replace(mark, f"{path}:{line_number(path, offset)}")) from None


def _batches(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    batch = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_shard(task: ShardTask, cfg: DataConfig, tokenizer, folder: Path) -> dict:
    """Tokenise one task's documents (each ended by EOS) into max_length blocks written to folder/task.name.

    Streams: memory holds one batch of documents and less than a block of carried tokens. The tokens after
    the task's last whole block are dropped (fewer than max_length per shard) and counted. A shard already
    present (an interrupted preparation run again) is kept as it is.
    """
    target, sidecar = folder / task.name, folder / f"{task.name}.json"
    if target.exists() and sidecar.exists():
        return json.loads(sidecar.read_text())
    started, length = time.perf_counter(), cfg.max_length
    carry = np.zeros(0, dtype=np.int32)
    blocks = tokens = docs = 0
    staging = folder / f"{task.name}.tmp-{os.getpid()}"
    with pa.OSFile(str(staging), "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as writer:
        for batch in _batches(documents(task, cfg), LINES_PER_BATCH):
            ids = tokenizer(batch, add_special_tokens=True)["input_ids"]
            flat = np.fromiter((t for doc in ids for t in (*doc, tokenizer.eos_token_id)), dtype=np.int32, count=-1)
            docs, tokens = docs + len(batch), tokens + len(flat)
            carry = np.concatenate([carry, flat])
            whole = len(carry) // length
            if whole:
                values = carry[: whole * length]
                offsets = np.arange(0, whole * length + 1, length, dtype=np.int32)
                column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
                writer.write_batch(pa.record_batch([column], schema=SCHEMA))
                blocks += whole
                carry = carry[whole * length :]
    result = {
        **asdict(task),
        "documents": docs,
        "tokens": tokens,
        "blocks": blocks,
        "dropped_tokens": int(len(carry)),
        "seconds": round(time.perf_counter() - started, 3),
        "text_bytes": task.end - task.start if Path(task.path).suffix.lower() != ".parquet" else None,
        "pid": os.getpid(),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    sidecar.write_text(json.dumps(result))
    staging.rename(target)  # last: a shard file present is a whole shard
    return result


def _file_fingerprint(path: Path) -> str:
    # size and modification time, not content: hashing a terabyte on the driver would take longer than the work
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def streamed_cache_key(stage: str, cfg: DataConfig, tokenizer_fingerprint: str) -> str:
    """Keyed by the files, tokenizer, block length and shard size: not by weights, seed or eval_fraction,
    which apply when the shards are read, so changing them does not tokenise a corpus again."""
    parts = [STREAMED_VERSION, stage, cfg.text_field, json.dumps(cfg.columns, sort_keys=True), str(cfg.max_length)]
    parts += [str(cfg.shard_mb), tokenizer_fingerprint]
    for role, sources in (("train", cfg.train), ("eval", cfg.eval or [])):
        for source in sources:
            parts += [f"{role}:{source.path}", *(_file_fingerprint(p) for p in source_files(source, f"data.{role}"))]
    return "streamed-" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


TaskRunner = Callable[[list[ShardTask], Path], Iterator[dict]]


def run_tasks_here(tasks: list[ShardTask], folder: Path, cfg: DataConfig, tokenizer) -> Iterator[dict]:
    """Run the tasks one after another in this process (torchrun, --single, a machine without Ray)."""
    for task in tasks:
        yield tokenize_shard(task, cfg, tokenizer, folder)


def build_streamed(
    tasks: list[ShardTask], final: Path, results: TaskRunner, report: Callable[[str], None] = log.info
) -> dict:
    """Run the tasks into final's `.partial` folder (kept across interruptions), then publish it whole."""
    partial = final.with_name(final.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    started, done, total_bytes = time.perf_counter(), [], sum(t.end - t.start for t in tasks)
    for result in results(tasks, partial):
        done.append(result)
        elapsed = time.perf_counter() - started
        read = sum(r["text_bytes"] or 0 for r in done)
        rate = read / elapsed / 2**20 if elapsed else 0.0
        eta = (total_bytes - read) / (read / elapsed) if read and elapsed else 0.0
        report(
            f"tokenising: {len(done)}/{len(tasks)} shards, {sum(r['tokens'] for r in done):,} tokens, "
            f"{rate:.1f} MB/s, ETA {eta:.0f}s"
        )
    by_name = {r["name"]: r for r in done}
    manifest = {
        "shards": [by_name[t.name] for t in tasks],
        "tokens": sum(r["tokens"] for r in done),
        "blocks": sum(r["blocks"] for r in done),
        "dropped_tokens": sum(r["dropped_tokens"] for r in done),
        "seconds": round(time.perf_counter() - started, 2),
    }
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=1))
    (partial / "ready").write_text("")
    try:
        partial.rename(final)
    except OSError:  # another preparation published the same key first
        pass
    return manifest


def _mixed_indices(counts: list[int], offsets: list[int], held_out: np.ndarray, weights: list[float], seed: int):
    """Row indices of each source's blocks not held out, repeated by its weight (a seeded sample for a fraction)."""
    rng = random.Random(seed)
    parts = []
    for count, offset, weight in zip(counts, offsets, weights, strict=True):
        own = np.arange(offset, offset + count, dtype=np.int64)
        own = own[~held_out[offset : offset + count]]
        whole, fraction = int(weight), weight - int(weight)
        parts += [own] * whole
        if fraction > 0 and len(own):
            parts.append(np.sort(np.array(rng.sample(range(len(own)), round(len(own) * fraction)), dtype=np.int64)))
            parts[-1] = own[parts[-1]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def load_streamed(folder: Path, cfg: DataConfig, seed: int):
    """The train (and eval) splits as memory-mapped datasets over the shards, weights and eval_fraction applied."""
    import datasets

    manifest = json.loads((folder / MANIFEST).read_text())
    splits = {}
    for role, sources in (("train", cfg.train), ("eval", cfg.eval or [])):
        shards = [s for s in manifest["shards"] if s["role"] == role and s["blocks"]]
        if not shards:
            if role == "train" or sources:
                raise UserError(
                    f"data.{role}: fewer tokens than one block of data.max_length={cfg.max_length} in any shard of "
                    f"data.shard_mb={cfg.shard_mb}; lower max_length or raise shard_mb"
                )
            continue
        table = datasets.concatenate_datasets([datasets.Dataset.from_file(str(folder / s["name"])) for s in shards])
        counts = [sum(s["blocks"] for s in shards if s["source"] == i) for i in range(len(sources))]
        offsets = list(np.cumsum([0, *counts[:-1]]))
        held_out = np.zeros(len(table), dtype=bool)
        if role == "train" and not cfg.eval and cfg.eval_fraction > 0:
            cut = max(1, int(len(table) * cfg.eval_fraction))
            if cut >= len(table):
                raise UserError("data.eval_fraction leaves no training blocks; lower it")
            held_out[np.random.default_rng(seed).choice(len(table), cut, replace=False)] = True
            splits["eval"] = table.select(np.flatnonzero(held_out))
        indices = _mixed_indices(counts, offsets, held_out, [s.weight for s in sources], seed)
        splits[role] = table if len(indices) == len(table) and not held_out.any() else table.select(indices)
    return datasets.DatasetDict({name: splits[name] for name in ("train", "eval") if name in splits})
