"""Reading data sources into validated rows: local files or hub datasets, mixtures, eval splits."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from tuneyard.training.config import DataConfig, DataSource
from tuneyard.training.data.formats import DEFAULT_SPEAKERS, normalize_row, speakers_from_tags
from tuneyard.training.data.registries import check_fits, registry_rows
from tuneyard.training.errors import UserError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")


def _decoded(path: Path) -> str:
    """The file's text; a byte that is not UTF-8 is an error naming the line it is on."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # a leading byte-order mark (Windows editors) is not part of the data
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise UserError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); data files are read "
            "as UTF-8: convert it, e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8"
        ) from None


def _jsonl_rows(path: Path) -> list[tuple[object, str]]:
    text = _decoded(path)
    lines = text.split("\n")
    pairs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            pairs.append((json.loads(line), f"{path}:{number}"))
        except json.JSONDecodeError as exc:
            cut = " The file ends inside this row: was it cut short?" if number == len(lines) else ""
            raise UserError(
                f"{path}:{number}: malformed JSON ({exc.msg} at column {exc.colno}); "
                f"each line of a .jsonl file must be one JSON object.{cut}"
            ) from None
    return pairs


def _json_rows(path: Path) -> list[tuple[object, str]]:
    text = _decoded(path)
    if not text.strip():
        raise UserError(f"{path}: the file is empty; a .json data file holds a list of rows, [{{...}}, ...]")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(data, list):
        raise UserError(
            f"{path}: a .json data file must hold a list of rows, [{{...}}, ...], not a {type(data).__name__}; "
            "for one JSON object per line name the file .jsonl"
        )
    return [(row, f"{path}[{i}]") for i, row in enumerate(data)]


def _parquet_rows(path: Path) -> list[tuple[object, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:  # ArrowInvalid: damaged or not Parquet; ArrowIOError is an OSError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{path}: not a readable Parquet file ({first}); it may be damaged or cut short, "
            "or hold another format under a .parquet name: write it again"
        ) from None
    return [(row, f"{path} row {i}") for i, row in enumerate(table.to_pylist())]


def _raw_rows(source: DataSource, key: str = "data.train") -> list[tuple[object, str]]:
    """(row, where) pairs of one source; `where` is file:line for line-oriented files; `key` names the list."""
    path = Path(source.path).expanduser()
    suffix = path.suffix.lower()
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return _saved_rows(path, source.split, key)
        return _hub_rows(source, key)  # a dataset folder (e.g. a clone of a hub dataset): `datasets` reads it
    if suffix in LOCAL_SUFFIXES or path.exists():
        if not path.is_file():
            raise UserError(
                f"{key}: data source '{source.path}' does not exist (or is not a file); check the path "
                "(relative paths are relative to the directory tuneyard runs in)"
            )
        if suffix == ".jsonl":
            return _jsonl_rows(path)
        if suffix == ".json":
            return _json_rows(path)
        if suffix == ".parquet":
            return _parquet_rows(path)
        if suffix == ".txt":
            lines = _decoded(path).splitlines()
            return [({"text": line}, f"{path}:{n}") for n, line in enumerate(lines, start=1) if line.strip()]
        raise UserError(f"{key}: data source '{source.path}': unsupported file type; use one of {LOCAL_SUFFIXES}")
    return _hub_rows(source, key)


def rows_of_file(path: str, key: str) -> list[tuple[object, str]]:
    """(row, where) pairs of one data file or dataset folder, errors naming `key` (the option that gave it)."""
    return _raw_rows(DataSource(path=path), key)


def _saved_rows(path: Path, split: str, key: str) -> list[tuple[object, str]]:
    """Rows of a folder written by `datasets`' save_to_disk: one Dataset, or a DatasetDict's `split`."""
    import datasets

    try:
        saved = datasets.load_from_disk(str(path))
    except Exception as exc:  # a half-copied folder: missing arrow files, damaged state.json
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{key}: '{path}' looks like a save_to_disk folder but cannot be read ({type(exc).__name__}: {first}); "
            "copy it again or save it again with Dataset.save_to_disk"
        ) from None
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise UserError(
                f"{key}: '{path}' holds the splits {sorted(saved)}, not '{split}'; pick one with split: NAME on the "
                "source"
            )
        saved = saved[split]
    return [(row, f"{path} row {i}") for i, row in enumerate(saved)]


def _hub_rows(source: DataSource, key: str) -> list[tuple[object, str]]:
    """Rows of a `datasets.load_dataset` name or folder (a hub name needs the hub or its local cache)."""
    import datasets

    try:
        dataset = datasets.load_dataset(source.path, source.name, split=source.split)
    except Exception as exc:  # datasets raises many types for "not found / offline"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if Path(source.path).expanduser().is_dir():
            raise UserError(
                f"{key}: data source '{source.path}' is a folder that `datasets` cannot read as a dataset "
                f"({type(exc).__name__}: {first}); point it at a {'/'.join(LOCAL_SUFFIXES)} file, or at a folder "
                "of data files"
            ) from None
        raise UserError(
            f"{key}: data source '{source.path}' is neither a local file nor a loadable dataset ({type(exc).__name__}: "
            f"{first}); check the path or the hub name"
        ) from None
    return [(row, f"{source.path}[{source.split}] row {i}") for i, row in enumerate(dataset)]


def source_fingerprint(source: DataSource) -> str:
    """Content hash of a local file or dataset folder, or name/split/config of a hub dataset; for an LLaMA-Factory or
    Axolotl entry, that of the data it points at and of how its rows are read."""
    registry = registry_rows(source)
    if registry is not None:
        read = registry.source.model_copy(update={"weight": source.weight})
        return hashlib.sha256((registry.described + _fingerprint(read)).encode()).hexdigest()
    return _fingerprint(source)


def _fingerprint(source: DataSource) -> str:
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


def read_sources(
    sources: list[DataSource], cfg: DataConfig, seed: int, role: str, keep_where: bool = False
) -> list[dict]:
    """Read, validate and mix the sources of one split (each row with its file:line as `where` if `keep_where`)."""
    rows = []
    key = f"data.{role}"
    speakers = speakers_from_tags(cfg.tags.model_dump()) if cfg.tags else DEFAULT_SPEAKERS
    for source in sources:
        registry = registry_rows(source)
        if registry is None:
            normalized = [
                normalize_row(row, cfg.format, where, cfg.text_field, cfg.columns, speakers)
                | ({"where": where} if keep_where else {})
                for row, where in _raw_rows(source, key)
            ]
        else:  # an LLaMA-Factory or Axolotl entry: its own columns and speakers, not data.columns and data.tags
            check_fits(registry, cfg.format, key)
            normalized = [
                normalize_row(registry.convert(row, where), registry.fmt, where, speakers=registry.speakers)
                | registry.extra
                | ({"where": where} if keep_where else {})
                for row, where in _raw_rows(registry.source, key)
            ]
        rows.extend(_mix(source, normalized, seed))
    if not rows:
        names = ", ".join(s.path for s in sources)
        raise UserError(f"data.{role}: no rows left after reading {names}; check the files and the format")
    return rows


def read_splits(cfg: DataConfig, seed: int, keep_where: bool = False) -> tuple[list[dict], list[dict] | None]:
    """The train rows and the eval rows (from data.eval, or split off by data.eval_fraction); see `read_sources`."""
    train = read_sources(cfg.train, cfg, seed, "train", keep_where)
    if cfg.eval:
        return train, read_sources(cfg.eval, cfg, seed, "eval", keep_where)
    if cfg.eval_fraction > 0:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        cut = max(1, int(len(order) * cfg.eval_fraction))
        if cut >= len(order):
            raise UserError("data.eval_fraction leaves no training rows; lower it")
        return [train[i] for i in sorted(order[cut:])], [train[i] for i in sorted(order[:cut])]
    return train, None
