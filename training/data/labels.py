"""The data of the task-head stages: labelled texts (classify) and BIO-tagged words (token-classify).

Rows are read and checked by the shared readers and formats (`classification`, `bio`), keeping each row's
file:line, so a label the training data never shows can be refused where it is written. Words are aligned to
sub-word tokens through the fast tokenizer's character offsets: the first token of a word carries its tag,
the rest (and special tokens) -100, which the loss and the metrics skip.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tuneyard.training.config import DataConfig
from tuneyard.training.data.sources import read_splits
from tuneyard.training.errors import UserError
from tuneyard.training.stages import STAGES, stages_where

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

TASK_HEAD_STAGES = stages_where(lambda s: s.labelled)
STAGE_FORMAT = {name: STAGES[name].formats[0] for name in TASK_HEAD_STAGES}
STAGE_TASK = {name: STAGES[name].task for name in TASK_HEAD_STAGES}
# the head's modules (decoders' score, BERT's classifier and [CLS] pooler, e.g. bert.pooler.dense): trained in
# full, so never 4-bit; patterns as transformers' quantizers match them (llm_int8_skip_modules)
HEAD_MODULES = (r"(.*\.)?classifier", r"(.*\.)?score", r"(.*\.)?pooler")
IGNORED = -100  # the label the loss and the metrics skip: special tokens and a word's later sub-tokens


def task_head_problem(stage: str, data_format: str, method: str) -> str | None:
    """Why a job's stage, data.format and peft.method do not fit together (None when they do)."""
    if stage in TASK_HEAD_STAGES and data_format != STAGE_FORMAT[stage]:
        return f"stage {stage} reads data.format {STAGE_FORMAT[stage]}, not '{data_format}': set data.format"
    if stage not in TASK_HEAD_STAGES and data_format in STAGE_FORMAT.values():
        return f"data.format {data_format} is the rows of stages {' and '.join(TASK_HEAD_STAGES)}, not of {stage}"
    if method == "feature-based" and stage != "classify":
        return (
            f"peft.method feature-based fits a logistic regression on sentence embeddings: it is for stage classify, "
            f"not {stage}"
        )
    if stage == "token-classify" and method in ("prompt_tuning", "prefix_tuning"):
        return (
            f"peft.method {method} is not supported with stage token-classify (PEFT's prompt learning for token "
            "tagging puts virtual tokens where the tagger's per-token labels are read); use lora, adalora, ia3, "
            "freeze or full"
        )
    if stage == "classify" and method == "prompt_tuning":
        return (
            "peft.method prompt_tuning is not supported with stage classify: PEFT hands the model each row as "
            "embeddings with the virtual tokens first, in which a decoder's classification head cannot find the "
            "row's last token; use prefix_tuning (its prefix is a key/value cache, the row's tokens stay as they "
            "are), lora, adalora, ia3, freeze or full"
        )
    return None


def _tag_order(tag: str) -> tuple:
    """O first, then by entity type, B- before I-."""
    return (0, "", "") if tag == "O" else (1, tag[2:], tag[0])


def label_names(stage: str, train: list[dict]) -> list[str]:
    """The classes the head predicts, in id order: from the training rows' labels (classify) or tags."""
    if stage == "token-classify":
        tags = {tag for row in train for tag in row["tags"]} | {"O"}
        # a type seen only as I- still needs its B- (an entity's first word)
        tags |= {f"B-{tag[2:]}" for tag in tags if tag != "O"}
        return sorted(tags, key=_tag_order)
    kinds = {type(row["label"]) for row in train}
    if len(kinds) > 1:
        odd = next(row for row in train if not isinstance(row["label"], type(train[0]["label"])))
        raise UserError(
            f"{odd['where']}: label {odd['label']!r} is a {type(odd['label']).__name__}, but {train[0]['where']} "
            f"gives {train[0]['label']!r}; write every label as a class name, or every label as a class id"
        )
    if kinds == {int}:  # class ids: the head has an output for each id up to the largest
        return [str(i) for i in range(max(row["label"] for row in train) + 1)]
    names = sorted({row["label"] for row in train})
    if len(names) < 2:
        raise UserError(
            f"data.train: every row has label {names[0]!r}; a classifier needs at least two classes in its "
            "training data"
        )
    return names


def check_known_labels(stage: str, rows: list[dict], names: list[str]) -> None:
    """Refuse a held-out row whose label (or tag) the head has no output for, naming its file:line."""
    known = set(names)
    for row in rows:
        values = row["tags"] if stage == "token-classify" else [str(row["label"])]
        unknown = next((v for v in values if v not in known), None)
        if unknown is not None:
            what = "tag" if stage == "token-classify" else "label"
            raise UserError(
                f"{row['where']}: {what} '{unknown}' never occurs in the training data, so the model has no output "
                f"for it (the {what}s are {names}); fix this row's {what}, or add training rows that have it"
            )


def _word_of_tokens(words: list[str], offsets: list[tuple[int, int]], text: str) -> list[int | None]:
    """For each token (character offsets into `text`, the words joined by spaces) the index of its word."""
    starts, position = [], 0
    for word in words:
        starts.append(position)
        position += len(word) + 1
    owner: list[int | None] = []
    word = 0
    for start, end in offsets:
        while start < end and text[start] == " ":  # byte-level BPE counts the space before a word as its own
            start += 1
        if start >= end:  # a special token (0, 0) or a token of spaces alone
            owner.append(None)
            continue
        while word + 1 < len(starts) and starts[word + 1] <= start:
            word += 1
        owner.append(word)
    return owner


def token_labels(words: list[str], tags: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict:
    """One tagged sentence as token ids and labels: a word's first sub-token carries its tag id, the rest -100."""
    text = " ".join(words)
    encoded = tokenizer(text, truncation=True, max_length=max_length, return_offsets_mapping=True)
    owner = _word_of_tokens(words, encoded.pop("offset_mapping"), text)
    labels, previous = [], None
    for word in owner:
        labels.append(IGNORED if word is None or word == previous else tags[word])
        previous = word if word is not None else previous
    return {**encoded, "labels": labels}


def tokenized(
    stage: str, rows: list[dict], tokenizer: PreTrainedTokenizerBase, names: list[str], max_length: int
) -> datasets.Dataset:
    """Rows as a dataset of input_ids, attention_mask and labels (a class id, or one id per token)."""
    import datasets

    if not tokenizer.is_fast:
        raise UserError(
            "the task-head stages align words to tokens with a fast tokenizer's character offsets; the model's "
            "tokenizer is a slow one: give model.tokenizer a folder with tokenizer.json"
        )
    ids = {name: i for i, name in enumerate(names)}
    out = []
    for row in rows:
        if stage == "token-classify":
            encoded = token_labels(row["tokens"], [ids[t] for t in row["tags"]], tokenizer, max_length)
        else:
            encoded = {
                **tokenizer(row["text"], truncation=True, max_length=max_length),
                "label": ids[str(row["label"])],
            }
        out.append({k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask", "labels", "label")})
    return datasets.Dataset.from_list(out)


def task_datasets(
    stage: str, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int
) -> tuple[dict[str, datasets.Dataset], list[str]]:
    """The tokenised train (and eval) datasets of a classify or token-classify job, and the label names."""
    train, held = read_splits(cfg, seed, keep_where=True)  # file:line for the label checks
    names = label_names(stage, train)
    if held is not None:
        check_known_labels(stage, held, names)
    splits = {"train": tokenized(stage, train, tokenizer, names, cfg.max_length)}
    if held is not None:
        splits["eval"] = tokenized(stage, held, tokenizer, names, cfg.max_length)
    return splits, names
