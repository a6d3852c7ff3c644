"""Tokenising rows for a stage, and the on-disk cache that makes a second run skip it."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import datasets
from transformers import PreTrainedTokenizerBase

from tuneyard.training.config import DataConfig, OutputConfig
from tuneyard.training.data.chat_templates import end_of_turn_id
from tuneyard.training.data.packing import IGNORE_INDEX, labels_from_spans, pack_into_blocks
from tuneyard.training.data.shards import (
    TaskRunner,
    build_streamed,
    load_streamed,
    plan_tasks,
    run_tasks_here,
    streamed_cache_key,
)
from tuneyard.training.data.sources import read_splits, source_fingerprint
from tuneyard.training.errors import UserError

log = logging.getLogger(__name__)
CHAT_FORMATS = ("messages", "alpaca", "sharegpt")
GENERATION_MARK = re.compile(r"{%-?\s*generation\s*-?%}")
CACHE_VERSION = "3"  # bump when the tokenised layout or a row's loss mask changes, so stale caches are not reused


def default_cache_dir(data: DataConfig, output: OutputConfig) -> Path:
    """Tokenised data lives beside the run directories, so sibling jobs share it."""
    return Path(data.cache_dir) if data.cache_dir else Path(output.dir).resolve().parent / ".tokenized"


def _turns_trained(messages: list[dict], train_on: str) -> list[bool]:
    """Whether each turn carries loss: its loss_weight where it has one, else data.train_on's choice by role."""
    assistant = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    chosen = (
        set(range(len(messages)))
        if train_on == "all"
        else set(assistant[-1:] if train_on == "last_assistant" else assistant)
    )
    return [bool(m["loss_weight"]) if "loss_weight" in m else i in chosen for i, m in enumerate(messages)]


def _trained_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], tools: list[dict] | None, train_on: str, text: str
) -> list[tuple[int, int]]:
    """Character spans of the rendered conversation that carry loss under data.train_on and the turns' loss_weight.

    A turn's span runs from the end of the conversation before it (an assistant turn's with the generation prompt,
    so its header carries no loss) to the end of the conversation up to it; both renderings must be prefixes of
    the whole one. Under train_on all, every character carries loss but those of turns with loss_weight 0.
    """
    render = functools.partial(tokenizer.apply_chat_template, tools=tools, tokenize=False)

    def bounds(i: int, after_header: bool) -> tuple[int, int]:
        before = render(messages[:i], add_generation_prompt=True) if after_header else render(messages[:i]) if i else ""
        through = render(messages[: i + 1])
        if not (text.startswith(before) and text.startswith(through)):
            raise UserError(
                "data.chat_template: the template renders a turn differently once later turns follow (as qwen3 "
                "does with its thinking blocks), so the turns that carry loss cannot be located in the text; use the "
                "template's _training variant (e.g. qwen3_training, which marks them with {% generation %}) or "
                "another template"
            )
        return len(before), len(through)

    if train_on == "all":
        spans, start = [], 0
        for i in (i for i, message in enumerate(messages) if message.get("loss_weight") == 0):
            masked_from, masked_to = bounds(i, after_header=False)
            spans.append((start, masked_from))
            start = masked_to
        return [(lo, hi) for lo, hi in [*spans, (start, len(text))] if hi > lo]
    trained = _turns_trained(messages, train_on)
    return [bounds(i, messages[i]["role"] == "assistant") for i in range(len(messages)) if trained[i]]


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    """The [start, end) runs of 1s in a 0/1 mask."""
    runs, start = [], None
    for i, bit in enumerate([*mask, 0]):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _marked_labels(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], tools: list[dict] | None, train_on: str
) -> tuple[list[int], list[int]] | None:
    """(input_ids, labels) from a template that marks assistant text with {% generation %} (TRL's _training ones);
    None when a turn's loss_weight asks for loss on a turn the template does not mark."""
    trained = _turns_trained(messages, train_on)
    assistant = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    if any(on and messages[i]["role"] != "assistant" for i, on in enumerate(trained)):
        return None
    encoded = tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = list(encoded["input_ids"]), list(encoded["assistant_masks"])
    runs = _runs(mask)
    if not any("loss_weight" in message for message in messages):
        keep = runs[-1:] if train_on == "last_assistant" else runs
    elif len(runs) == len(assistant):  # one marked run per assistant turn, in order
        keep = [run for run, i in zip(runs, assistant, strict=True) if trained[i]]
    else:
        raise UserError(
            f"data.chat_template marks {len(runs)} runs of assistant text in a conversation of {len(assistant)} "
            "assistant turns, so a turn's loss_weight cannot be matched to its tokens; use a template that renders "
            "each assistant turn as one {% generation %} block"
        )
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in keep:
        labels[start:end] = ids[start:end]
    return ids, labels


def check_tool_calls_render(messages: list[dict], text: str) -> None:
    """Refuse a template that drops a turn's tool calls, which would teach the model to answer without them."""
    for message in messages:
        for call in message.get("tool_calls") or []:
            if call["function"]["name"] not in text:
                raise UserError(
                    f"data: a turn calls the tool '{call['function']['name']}', but the chat template does not "
                    "render tool_calls, so the call would be silently left out of training. Choose a template "
                    "that renders them (data.chat_template: llama3_1, qwen3, ... or your own .jinja), or remove "
                    "the tool_calls from the data"
                )


def _eos_labels(tokenizer: PreTrainedTokenizerBase, ids: list[int], labels: list[int], train_on_eos: str) -> list[int]:
    """Axolotl's train_on_eos on the EOS and end-of-turn tokens: turn (as the turns' spans say), all, last, none."""
    if train_on_eos == "turn":
        return labels
    ends = {tokenizer.eos_token_id, end_of_turn_id(tokenizer)} - {None}
    positions = [i for i, token in enumerate(ids) if token in ends]
    labels = list(labels)
    for i in positions:
        keep = train_on_eos == "all" or (train_on_eos == "last" and i == positions[-1])
        labels[i] = ids[i] if keep else IGNORE_INDEX
    return labels


def tokenize_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    train_on: str = "assistant",
    tools: list[dict] | None = None,
    train_on_eos: str = "turn",
) -> dict:
    """input_ids of the chat-template rendering, and labels that keep the tokens data.train_on and the turns'
    loss_weight name (and the EOS tokens `train_on_eos` names, as an Axolotl entry does)."""
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    check_tool_calls_render(messages, text)
    marked = None
    if train_on != "all" and GENERATION_MARK.search(tokenizer.chat_template or ""):
        marked = _marked_labels(tokenizer, messages, tools, train_on)
    if marked is not None:
        ids, labels = marked
    else:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        spans = _trained_spans(tokenizer, messages, tools, train_on, text)
        labels = labels_from_spans(ids, encoded["offset_mapping"], spans)
    return {"input_ids": ids, "labels": _eos_labels(tokenizer, ids, labels, train_on_eos)}


def _tokenize_chat_batch(batch: dict, tokenizer: PreTrainedTokenizerBase, train_on: str) -> dict:
    rows = [json.loads(conversation) for conversation in batch["conversation"]]
    out = [
        tokenize_chat(tokenizer, row["messages"], train_on, row.get("tools"), row.get("train_on_eos", "turn"))
        for row in rows
    ]
    return {"input_ids": [o["input_ids"] for o in out], "labels": [o["labels"] for o in out]}


def _tokenize_text_batch(batch: dict, tokenizer: PreTrainedTokenizerBase) -> dict:
    ids = tokenizer(batch["text"])["input_ids"]
    return {"input_ids": [doc + [tokenizer.eos_token_id] for doc in ids]}


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of the vocabulary, merges, special tokens and chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(
        backend.to_str().encode() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()
    )
    h.update(str(tokenizer.chat_template).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_key(stage: str, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> str:
    """Keyed by data content, tokenizer, format, lengths, packing and the split; not by the run."""
    parts = [
        CACHE_VERSION,
        stage,
        cfg.format,
        cfg.text_field,
        json.dumps(cfg.columns, sort_keys=True),
        cfg.train_on,
        str(cfg.max_length),
        cfg.overlength,
        f"packing={cfg.packing}",
        str(cfg.eval_fraction),
        str(seed),
        tokenizer_fingerprint(tokenizer),
        *("train:" + source_fingerprint(s) for s in cfg.train),
        *("eval:" + source_fingerprint(s) for s in cfg.eval or []),
        *([f"tags={cfg.tags.model_dump_json()}"] if cfg.tags else []),
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def _fit_to_length(dataset: datasets.Dataset, cfg: DataConfig, role: str) -> datasets.Dataset:
    """Apply data.overlength to SFT examples longer than max_length; never drop them silently."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    long = [n for n in lengths if n > cfg.max_length]
    if not long:
        return dataset
    summary = (
        f"{len(long)} of {len(lengths)} {role} examples are longer than "
        f"data.max_length={cfg.max_length} tokens (longest {max(long)})"
    )
    if cfg.overlength == "error":
        raise UserError(
            f"{summary}. Raise data.max_length, or set data.overlength: drop (skip them) or truncate (cut them)."
        )
    log.warning("%s: %s them (data.overlength)", summary, "dropping" if cfg.overlength == "drop" else "truncating")
    if cfg.overlength == "drop":
        return dataset.filter(lambda row: len(row["input_ids"]) <= cfg.max_length)
    return dataset.map(lambda row: {k: row[k][: cfg.max_length] for k in ("input_ids", "labels")})


def tokenize_rows(
    stage: str, rows: list[dict], cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, role: str, seed: int = 0
) -> datasets.Dataset:
    """Rows of one split -> fixed blocks (pretrain), or labelled examples (sft), packed when data.packing."""
    if stage != "pretrain":
        # one JSON string per conversation: Arrow would give every turn the union of all turns' keys and
        # every tool call's arguments the union of all arguments' fields
        rows = [{"conversation": json.dumps(row)} for row in rows]
    raw = datasets.Dataset.from_list(rows)
    num_proc = cfg.num_proc if cfg.num_proc > 1 and len(rows) >= 1000 else None
    if stage == "pretrain":
        if cfg.format != "text":
            raise UserError(f"stage pretrain reads data.format: text, not '{cfg.format}'")
        docs = raw.map(
            _tokenize_text_batch,
            batched=True,
            fn_kwargs={"tokenizer": tokenizer},
            remove_columns=raw.column_names,
            num_proc=num_proc,
        )
        blocks = pack_into_blocks(docs["input_ids"], cfg.max_length)
        if not blocks:
            raise UserError(f"data.{role}: fewer tokens than one block of data.max_length={cfg.max_length}")
        return datasets.Dataset.from_dict({"input_ids": blocks})
    if cfg.format not in CHAT_FORMATS:
        raise UserError(f"stage {stage} reads data.format {', '.join(CHAT_FORMATS)}, not '{cfg.format}'")
    examples = raw.map(
        _tokenize_chat_batch,
        batched=True,
        fn_kwargs={"tokenizer": tokenizer, "train_on": cfg.train_on},
        remove_columns=raw.column_names,
        num_proc=num_proc,
    )
    examples = _fit_to_length(examples, cfg, role)
    examples = examples.filter(lambda row: any(label != IGNORE_INDEX for label in row["labels"]))
    if len(examples) == 0:
        raise UserError(f"data.{role}: no examples with assistant tokens left after filtering")
    if not cfg.packing:
        return examples
    from trl.data_utils import pack_dataset

    # shuffled first, so which examples share a row does not follow the file's order
    return pack_dataset(examples.shuffle(seed=seed), cfg.max_length, strategy="bfd")


def build_datasets(stage: str, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> datasets.DatasetDict:
    """Read, validate and tokenise the train (and eval) split, without the cache."""
    train_rows, eval_rows = read_splits(cfg, seed)
    splits = {"train": tokenize_rows(stage, train_rows, cfg, tokenizer, "train", seed)}
    if eval_rows is not None:
        splits["eval"] = tokenize_rows(stage, eval_rows, cfg, tokenizer, "eval", seed)
    return datasets.DatasetDict(splits)


def prepared_folder(
    stage: str, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, cache_dir: Path
) -> Path:
    """The cache folder of a job's tokenised splits."""
    if cfg.streaming:
        return Path(cache_dir) / streamed_cache_key(stage, cfg, tokenizer_fingerprint(tokenizer))
    return Path(cache_dir) / cache_key(stage, cfg, tokenizer, seed)


def _make_cache_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a folder should be, a read-only place
        raise UserError(
            f"data.cache_dir: cannot create the tokenised-data cache folder '{folder}' ({exc.strerror}: "
            f"'{exc.filename}'); set data.cache_dir to a writable folder (default: beside output.dir)"
        ) from None


def prepare_datasets(
    stage: str,
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    cache_dir: Path,
    run_tasks: TaskRunner | None = None,
    report: Callable[[str], None] | None = None,
) -> tuple[datasets.DatasetDict, bool]:
    """Load the tokenised splits from the cache, building and storing them atomically when missing.

    Returns the datasets and whether the cache was already warm. A streamed corpus (data.streaming) is
    prepared by `run_tasks` (default: one task after another in this process), progress told to `report`.
    """
    final = prepared_folder(stage, cfg, tokenizer, seed, cache_dir)
    if cfg.streaming:
        warm = (final / "ready").exists()
        if not warm:
            _make_cache_dir(final.parent)
            runner = run_tasks or functools.partial(run_tasks_here, cfg=cfg, tokenizer=tokenizer)
            manifest = build_streamed(plan_tasks(cfg), final, runner, report or log.info)
            log.info(
                "tokenised %s tokens into %s blocks in %.1fs (%s tokens after the shards' last blocks dropped)",
                f"{manifest['tokens']:,}",
                f"{manifest['blocks']:,}",
                manifest["seconds"],
                f"{manifest['dropped_tokens']:,}",
            )
        return load_streamed(final, cfg, seed), warm
    if (final / "ready").exists():
        return datasets.load_from_disk(str(final / "splits")), True
    _make_cache_dir(final.parent)
    started = time.perf_counter()
    built = build_datasets(stage, cfg, tokenizer, seed)
    staging = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    built.save_to_disk(str(staging / "splits"))
    (staging / "ready").write_text(json.dumps({k: len(v) for k, v in built.items()}))
    try:
        staging.rename(final)
    except OSError:  # another process published the same key first; theirs is as good as ours
        shutil.rmtree(staging, ignore_errors=True)
    log.info(
        "tokenised %s in %.1fs into %s", {k: len(v) for k, v in built.items()}, time.perf_counter() - started, final
    )
    return datasets.load_from_disk(str(final / "splits")), False
