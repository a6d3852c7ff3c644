"""Reading data sources into validated rows: local files or hub datasets, mixtures, eval splits."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from training.config import DataConfig, DataSource
from training.errors import UserError
from training.formats import normalize_row

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")


def _raw_rows(source: DataSource) -> list[tuple[object, str]]:
    """(row, where) pairs of one source; `where` is file:line for line-oriented files."""
    path = Path(source.path).expanduser()
    suffix = path.suffix.lower()
    if path.is_dir():  # a dataset folder (e.g. a clone of a hub dataset): `datasets` reads it
        return _hub_rows(source)
    if suffix in LOCAL_SUFFIXES or path.exists():
        if not path.is_file():
            raise UserError(f"data source '{source.path}' does not exist (or is not a file)")
        if suffix == ".jsonl":
            pairs = []
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        pairs.append((json.loads(line), f"{path}:{number}"))
                    except json.JSONDecodeError as exc:
                        raise UserError(
                            f"{path}:{number}: malformed JSON ({exc.msg} at column {exc.colno}); "
                            "each line of a .jsonl file must be one JSON object"
                        ) from None
            return pairs
        if suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
            if not isinstance(data, list):
                raise UserError(f"{path}: a .json data file must hold a list of rows")
            return [(row, f"{path}[{i}]") for i, row in enumerate(data)]
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return [(row, f"{path} row {i}") for i, row in enumerate(pq.read_table(path).to_pylist())]
        if suffix == ".txt":
            lines = path.read_text(encoding="utf-8").splitlines()
            return [({"text": line}, f"{path}:{n}") for n, line in enumerate(lines, start=1) if line.strip()]
        raise UserError(f"data source '{source.path}': unsupported file type; use one of {LOCAL_SUFFIXES}")
    return _hub_rows(source)


def _hub_rows(source: DataSource) -> list[tuple[object, str]]:
    """Rows of a `datasets.load_dataset` name or folder (a hub name needs the hub or its local cache)."""
    import datasets

    try:
        dataset = datasets.load_dataset(source.path, source.name, split=source.split)
    except Exception as exc:  # datasets raises many types for "not found / offline"
        raise UserError(
            f"data source '{source.path}' is neither a local file nor a loadable dataset ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); check the path or the hub name"
        ) from None
    return [(row, f"{source.path}[{source.split}] row {i}") for i, row in enumerate(dataset)]


def source_fingerprint(source: DataSource) -> str:
    """Content hash of a local file or dataset folder, or name/split/config of a hub dataset."""
    path = Path(source.path).expanduser()
    h = hashlib.sha256(f"{source.weight}|{source.split}|{source.name}".encode())
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        files = []
    for file in files:
        h.update(file.name.encode())
        with open(file, "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(block)
    if not files:  # a hub name: its name, split and config are all we know here
        h.update(source.path.encode())
    return h.hexdigest()


def _mix(source: DataSource, rows: list[dict], seed: int) -> list[dict]:
    """Apply a source's weight: whole repeats plus a seeded sample for the fraction."""
    whole, fraction = int(source.weight), source.weight - int(source.weight)
    mixed = rows * whole
    if fraction > 0:
        mixed += random.Random(seed).sample(rows, round(len(rows) * fraction))
    return mixed


def read_sources(sources: list[DataSource], cfg: DataConfig, seed: int, role: str) -> list[dict]:
    """Read, validate and mix the sources of one split; refuse an empty result."""
    rows = []
    for source in sources:
        normalized = [normalize_row(row, cfg.format, where, cfg.text_field) for row, where in _raw_rows(source)]
        rows.extend(_mix(source, normalized, seed))
    if not rows:
        names = ", ".join(s.path for s in sources)
        raise UserError(f"data.{role}: no rows left after reading {names}; check the files and the format")
    return rows


def read_splits(cfg: DataConfig, seed: int) -> tuple[list[dict], list[dict] | None]:
    """The train rows and the eval rows (from data.eval, or split off by data.eval_fraction)."""
    train = read_sources(cfg.train, cfg, seed, "train")
    if cfg.eval:
        return train, read_sources(cfg.eval, cfg, seed, "eval")
    if cfg.eval_fraction > 0:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        cut = max(1, int(len(order) * cfg.eval_fraction))
        if cut >= len(order):
            raise UserError("data.eval_fraction leaves no training rows; lower it")
        return [train[i] for i in sorted(order[cut:])], [train[i] for i in sorted(order[:cut])]
    return train, None
