"""Reading and validating data: file:line errors, field checks per format, mixtures, splits, cache."""

from __future__ import annotations

import json
import time

import pytest

from tests.conftest import EXAMPLES, TOKENIZER
from tuneyard.training.config import DataConfig, ModelConfig
from tuneyard.training.data.formats import normalize_row
from tuneyard.training.data.packing import IGNORE_INDEX
from tuneyard.training.data.sources import read_splits
from tuneyard.training.data.tokenize import prepare_datasets, tokenize_chat
from tuneyard.training.errors import UserError
from tuneyard.training.model import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(init="scratch", architecture={"model_type": "llama"}, tokenizer=str(TOKENIZER)))


def jsonl(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = jsonl(tmp_path, [{"text": "fine"}, '{"text": "broken"', {"text": "x"}])
    with pytest.raises(UserError, match=rf"{path}:2: malformed JSON"):
        read_splits(DataConfig(format="text", train=path), seed=0)


def test_missing_field_names_field_and_format(tmp_path):
    path = jsonl(tmp_path, [{"instruction": "a", "output": "b"}, {"instruction": "only"}])
    with pytest.raises(UserError) as info:
        read_splits(DataConfig(format="alpaca", train=path), seed=0)
    assert f"{path}:2: row is missing field 'output'; its columns are 'instruction'. If one" in str(info.value)


def test_empty_dataset_is_refused(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n\n")
    with pytest.raises(UserError, match="data.train: no rows left after reading"):
        read_splits(DataConfig(format="text", train=str(path)), seed=0)


def test_preference_rows_are_checked():
    where = "p.jsonl:3"
    with pytest.raises(UserError, match="p.jsonl:3: 'chosen' and 'rejected' are identical"):
        normalize_row({"prompt": "q", "chosen": "a", "rejected": "a"}, "preference", where)
    with pytest.raises(UserError, match="field 'rejected' is empty"):
        normalize_row({"prompt": "q", "chosen": "a", "rejected": " "}, "preference", where)
    with pytest.raises(UserError, match="row is missing field 'prompt'"):
        normalize_row({"chosen": "a", "rejected": "b"}, "preference", where)
    assert normalize_row({"prompt": "q"}, "prompt", where) == {"prompt": "q"}


def test_messages_need_an_assistant_turn():
    with pytest.raises(UserError, match="no assistant turn"):
        normalize_row({"messages": [{"role": "user", "content": "hi"}]}, "messages", "m.jsonl:1")


def test_weights_and_eval_fraction(tmp_path):
    path = jsonl(tmp_path, [{"text": f"doc {i}"} for i in range(10)])
    cfg = DataConfig(format="text", train=[{"path": path, "weight": 1.5}], eval_fraction=0.2)
    train, held = read_splits(cfg, seed=3)
    assert len(train) + len(held) == 15 and len(held) == 3
    assert read_splits(cfg, seed=3) == (train, held)  # seeded


def test_chat_labels_cover_assistant_turns_only(tokenizer):
    messages = [
        {"role": "user", "content": "Say the last word: red fox"},
        {"role": "assistant", "content": "fox"},
    ]
    out = tokenize_chat(tokenizer, messages)
    kept = [t for t, label in zip(out["input_ids"], out["labels"], strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(kept) == " fox<|end|>\n"
    first_kept = out["labels"].index(kept[0])
    assert all(label == IGNORE_INDEX for label in out["labels"][:first_kept])


def test_overlength_sft_examples_are_counted_not_dropped(tmp_path, tokenizer):
    long = {"messages": [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "x"}]}
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}
    path = jsonl(tmp_path, [short, long, long])
    cfg = DataConfig(format="messages", train=path, max_length=32)
    with pytest.raises(UserError, match=r"2 of 3 train examples are longer than data.max_length=32 tokens"):
        prepare_datasets("sft", cfg, tokenizer, 0, tmp_path / "cache")
    dropped, _ = prepare_datasets("sft", cfg.model_copy(update={"overlength": "drop"}), tokenizer, 0, tmp_path / "c")
    assert len(dropped["train"]) == 1


def test_second_run_reads_the_cache(tmp_path, tokenizer):
    cfg = DataConfig(format="messages", train=str(EXAMPLES / "data" / "last-word-train.jsonl"), max_length=64)
    started = time.perf_counter()
    cold, warm = prepare_datasets("sft", cfg, tokenizer, 0, tmp_path)
    cold_s = time.perf_counter() - started
    assert not warm
    again, warm = prepare_datasets("sft", cfg, tokenizer, 0, tmp_path)
    assert warm and again["train"][:5] == cold["train"][:5]
    assert len(list(tmp_path.iterdir())) == 1 and cold_s > 0
    # a different max_length is a different cache entry
    _, warm = prepare_datasets("sft", cfg.model_copy(update={"max_length": 96}), tokenizer, 0, tmp_path)
    assert not warm


def test_a_dataset_folder_loads_through_datasets(tmp_path):
    folder = tmp_path / "my-dataset"
    folder.mkdir()
    jsonl(folder, [{"instruction": "say hi", "output": "hi"}] * 3, name="train.jsonl")
    train, _ = read_splits(DataConfig(format="alpaca", train=str(folder)), seed=0)
    assert train[0]["messages"][1] == {"role": "assistant", "content": "hi"} and len(train) == 3


def test_plot_writes_a_png(tmp_path):
    from tuneyard.training.metrics import append_metrics, plot_metrics

    for step in range(1, 6):
        append_metrics(tmp_path / "metrics.jsonl", {"step": step, "loss": 5.0 / step})
    append_metrics(tmp_path / "metrics.jsonl", {"step": 5, "eval_loss": 1.2})
    png = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "metrics.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
