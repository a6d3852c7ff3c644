"""Data as users have it: sharegpt, column maps, JSON arrays, save_to_disk folders, tool calls, chat templates,
loss masks; and the trainer's own knobs (optimizer, NEFTune, early stopping, best checkpoint)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import datasets
import pytest
import torch

from tests.conftest import EXAMPLES, SFT_JOB, TOKENIZER, _single_run, job_dict
from tuneyard.launch.config import job_from_dict
from tuneyard.launch.preflight import preflight
from tuneyard.training.config import DataConfig, ModelConfig
from tuneyard.training.data.chat_templates import end_of_turn_id, use_chat_template
from tuneyard.training.data.formats import normalize_row
from tuneyard.training.data.packing import IGNORE_INDEX
from tuneyard.training.data.sources import read_splits
from tuneyard.training.data.tokenize import tokenize_chat
from tuneyard.training.errors import UserError
from tuneyard.training.metrics import read_metrics
from tuneyard.training.model import load_tokenizer

FORMATS = EXAMPLES / "data" / "formats"
SAMPLE_COUNT = 64


def tiny_tokenizer(chat_template: str | None = None):
    return load_tokenizer(
        ModelConfig(init="scratch", architecture={"model_type": "llama"}, tokenizer=str(TOKENIZER)), chat_template
    )


def learned(tokenizer, out: dict) -> str:
    return tokenizer.decode([t for t, label in zip(out["input_ids"], out["labels"], strict=True) if label != -100])


def test_sharegpt_maps_speakers_system_and_function_calls():
    row = {
        "system": "Be brief.",
        "conversations": [
            {"from": "human", "value": "last word of red fox?"},
            {"from": "function_call", "value": '{"name": "last_word", "arguments": "{\\"words\\": [\\"red\\"]}"}'},
            {"from": "observation", "value": "fox"},
            {"from": "gpt", "value": "fox"},
        ],
        "tools": json.dumps([{"type": "function", "function": {"name": "last_word"}}]),
    }
    out = normalize_row(row, "sharegpt", "s.jsonl:1")
    assert [m["role"] for m in out["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert out["messages"][2]["tool_calls"] == [
        {"type": "function", "function": {"name": "last_word", "arguments": {"words": ["red"]}}}
    ]
    assert out["tools"] == [{"type": "function", "function": {"name": "last_word"}}]
    with pytest.raises(UserError, match=r"s.jsonl:1: conversations\[0\] is from 'robot'; speakers are"):
        normalize_row({"conversations": [{"from": "robot", "value": "hi"}]}, "sharegpt", "s.jsonl:1")


def test_alpaca_system_and_history_become_turns():
    row = {"instruction": "Q2", "input": "ctx", "output": "A2", "system": "S", "history": [["Q1", "A1"]]}
    assert normalize_row(row, "alpaca", "a.json[0]")["messages"] == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2\n\nctx"},
        {"role": "assistant", "content": "A2"},
    ]
    with pytest.raises(UserError, match=r"history\[0\] must be a \[question, answer\] pair"):
        normalize_row({**row, "history": [["only one"]]}, "alpaca", "a.json[0]")


def test_content_parts_null_content_and_tool_calls_are_kept_or_refused():
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    call = {"type": "function", "function": {"name": "f", "arguments": {}}}
    out = normalize_row(
        {
            "messages": [
                {"role": "user", "content": parts},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "content": "r", "tool_call_id": "c1"},
                {"role": "assistant", "content": "done", "tool_calls": None},  # Arrow's null for "no calls"
            ]
        },
        "messages",
        "m.jsonl:3",
    )
    assert out["messages"][0] == {"role": "user", "content": "a\nb"}
    assert out["messages"][1] == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert out["messages"][2] == {"role": "tool", "content": "r", "tool_call_id": "c1"}
    refused = {
        "a 'image_url' content part; tuneyard trains on text": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
        ],
        r"messages\[0\].content is null and the turn calls no tool": [{"role": "assistant", "content": None}],
        r"has keys \['weight'\] that no chat template reads": [{"role": "assistant", "content": "x", "weight": 0}],
        "has tool_calls but role 'user'": [{"role": "user", "content": "x", "tool_calls": [call]}],
    }
    for message, messages in refused.items():
        with pytest.raises(UserError, match=r"m.jsonl:3: .*" + message):
            normalize_row({"messages": messages + [{"role": "assistant", "content": "y"}]}, "messages", "m.jsonl:3")


def test_a_wrong_column_lists_the_columns_the_file_has(tmp_path):
    path = FORMATS / "columns.jsonl"
    with pytest.raises(UserError) as caught:
        read_splits(DataConfig(format="alpaca", train=str(path)), seed=0)
    assert str(caught.value) == (
        f"{path}:1: row is missing field 'instruction'; its columns are 'question', 'answer', 'id'. If one of them "
        "holds it, map it with data.columns: {instruction: <that column>} (format 'alpaca' needs 'instruction' and "
        "'output' strings, optional 'input', 'system', 'history' ([[question, answer], ...]))"
    )
    with pytest.raises(UserError) as caught:
        read_splits(DataConfig(format="alpaca", train=str(path), columns={"instruction": "query"}), seed=0)
    assert str(caught.value) == (
        f"{path}:1: data.columns names column(s) 'query', which this row does not have; its columns are 'question', "
        "'answer', 'id'. Fix data.columns ({field: column of your file})"
    )
    mapped = DataConfig(format="alpaca", train=str(path), columns={"instruction": "question", "output": "answer"})
    rows, _ = read_splits(mapped, seed=0)
    first = json.loads(path.read_text().splitlines()[0])
    assert rows[0]["messages"] == [
        {"role": "user", "content": first["question"]},
        {"role": "assistant", "content": first["answer"]},
    ]


def test_json_arrays_and_save_to_disk_folders_read_as_their_jsonl(tmp_path):
    rows = [json.loads(line) for line in (FORMATS / "sharegpt.jsonl").read_text().splitlines()]
    (tmp_path / "array.json").write_text(json.dumps(rows))
    # from_json, as users make them: from_list would take the columns of the first row only
    dataset = datasets.Dataset.from_json(str(FORMATS / "sharegpt.jsonl"), cache_dir=str(tmp_path / "cache"))
    dataset.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "dict"))
    expected, _ = read_splits(DataConfig(format="sharegpt", train=str(FORMATS / "sharegpt.jsonl")), seed=0)
    assert len(expected) == SAMPLE_COUNT
    for source in ("array.json", "one", "dict"):
        got, _ = read_splits(DataConfig(format="sharegpt", train=str(tmp_path / source)), seed=0)
        assert got == expected, source
    with pytest.raises(UserError, match=r"holds the splits \['train'\], not 'test'; pick one with split: NAME"):
        read_splits(DataConfig(format="sharegpt", train=[{"path": str(tmp_path / "dict"), "split": "test"}]), seed=0)


def test_train_on_masks_and_a_template_that_drops_tool_calls():
    tokenizer = tiny_tokenizer()
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"},
    ]
    assert learned(tokenizer, tokenize_chat(tokenizer, messages)) == " A1<|end|>\n A2<|end|>\n"
    assert learned(tokenizer, tokenize_chat(tokenizer, messages, "last_assistant")) == " A2<|end|>\n"
    everything = tokenize_chat(tokenizer, messages, "all")
    assert IGNORE_INDEX not in everything["labels"] and everything["labels"] == everything["input_ids"]
    row = normalize_row(json.loads((FORMATS / "tools.jsonl").read_text().splitlines()[0]), "messages", "t.jsonl:1")
    with pytest.raises(UserError, match="calls the tool 'last_word', but the chat template does not render"):
        tokenize_chat(tokenizer, row["messages"], tools=row["tools"])
    qwen = tiny_tokenizer("qwen2_5")
    out = learned(qwen, tokenize_chat(qwen, row["messages"], tools=row["tools"]))
    words = row["messages"][1]["tool_calls"][0]["function"]["arguments"]["words"]
    assert out == (
        f'<tool_call>\n{{"name": "last_word", "arguments": {{"words": {json.dumps(words)}}}}}\n</tool_call>'
        f"<|im_end|>\n{words[-1]}<|im_end|>\n"
    )


def test_chat_templates_add_their_tokens_and_name_their_end_of_turn():
    tokenizer = tiny_tokenizer()
    assert tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer)) == "<|end|>"
    size = len(tokenizer)
    assert use_chat_template(tokenizer, "chatml") == ["<|im_end|>", "<|im_start|>"]
    assert len(tokenizer) == size + 2 and tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer)) == "<|im_end|>"
    assert tokenizer.tokenize("<|im_start|>user")[0] == "<|im_start|>"  # one token, not pieces
    with pytest.raises(UserError, match="data.chat_template: 'chatmll' is not a template name or a file; names are"):
        use_chat_template(tokenizer, "chatmll")


def preflight_error(job: dict) -> str:
    with pytest.raises(UserError) as caught:
        preflight(job_from_dict(job))
    return str(caught.value)


def test_preflight_refuses_a_base_without_template_and_unusable_options(pretrained_base, tmp_path):
    """The tiny tokenizer has a template; a copy without one is a base model's."""
    bare = tmp_path / "bare-tokenizer"
    tokenizer = load_tokenizer(ModelConfig(name_or_path=pretrained_base))
    tokenizer.chat_template = None
    tokenizer.save_pretrained(bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    job = job_dict({**SFT_JOB, "model": {"name_or_path": pretrained_base, "tokenizer": str(bare)}}, tmp_path / "r")
    assert preflight_error(job) == (
        f"the tokenizer of '{bare}' has no chat template (a base model), and data.format 'messages' is rendered "
        "with one; set data.chat_template: chatml (or a template TRL ships such as llama3 or qwen3, or a .jinja file)"
    )
    job["data"]["chat_template"] = "chatml"
    job["peft"] = {"method": "lora"}
    assert "uses tokens the tokenizer of" in preflight_error(job) and "peft.method full or freeze" in preflight_error(
        job
    )
    job["peft"] = {"method": "full"}
    job["training"]["optim"] = "adamw_9bit"
    assert preflight_error(job).startswith("training.optim: 'adamw_9bit' is not an optimizer transformers has;")
    job["training"]["optim"] = "adamw_torch"
    job["output"].update(keep_best="eval_loss", save_steps=3)
    job["training"]["eval_steps"] = 2
    assert preflight_error(job) == (
        "output.keep_best keeps a checkpoint saved where an evaluation scored best, so output.save_steps (3) must be "
        "a multiple of training.eval_steps (2)"
    )
    job["data"]["train"] = str(FORMATS / "tools.jsonl")
    job["output"].update(keep_best=None, save_steps=0)
    assert "calls the tool 'last_word', but the chat template does not render tool_calls" in preflight_error(job)


SHAPES = {
    "alpaca-json-array": {"format": "alpaca", "train": str(FORMATS / "alpaca.json")},
    "sharegpt": {"format": "sharegpt", "train": str(FORMATS / "sharegpt.jsonl")},
    "columns": {
        "format": "alpaca",
        "train": str(FORMATS / "columns.jsonl"),
        "columns": {"instruction": "question", "output": "answer"},
    },
    "tools-qwen2_5": {
        "format": "messages",
        "train": str(FORMATS / "tools.jsonl"),
        "chat_template": "qwen2_5",
        "max_length": 768,
    },
}


def train_shape(pretrained_base: str, run_dir: Path, data: dict, **sections: dict) -> Path:
    job = {**SFT_JOB, "model": {"name_or_path": pretrained_base}}
    settings = {"eval": None, "eval_fraction": 0.25, "max_length": 128, **data}
    training = {"max_steps": 4, "batch_size": 4, "learning_rate": 3e-3, **sections.pop("training", {})}
    return _single_run(job, run_dir, data=settings, training=training, **sections)


def with_positions(base: str, positions: int, folder: Path) -> str:
    """A copy of a model folder whose config covers `positions` tokens (RoPE: the same weights, the same model)."""
    shutil.copytree(base, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": positions}))
    return str(folder)


@pytest.mark.integration
@pytest.mark.parametrize("shape", list(SHAPES))
def test_each_shipped_shape_trains(shape, pretrained_base, tmp_path):
    """A few steps on each shipped sample: the loss is finite and falls, and final/ stops at the turn's end."""
    base = pretrained_base
    if SHAPES[shape].get("max_length", 0) > 256:  # the tool rows with their schemas: up to 711 tokens
        base = with_positions(pretrained_base, 1024, tmp_path / "base-1024")
    final = train_shape(base, tmp_path / "run", SHAPES[shape])
    steps = [r for r in read_metrics(final.parent / "metrics.jsonl") if "loss" in r and "step" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(final)))
    stops = json.loads((final / "generation_config.json").read_text())["eos_token_id"]
    end = "<|im_end|>" if shape == "tools-qwen2_5" else "<|end|>"
    assert tokenizer.convert_ids_to_tokens(stops[0]) == end
    if shape == "tools-qwen2_5":  # the template's tokens were added, and the model grew to hold them
        config = json.loads((final / "config.json").read_text())
        assert config["vocab_size"] == len(tokenizer) == 512 + 2


@pytest.mark.integration
def test_optimizer_neftune_early_stopping_and_best_checkpoint(pretrained_base, tmp_path):
    """One run with 8-bit AdamW, NEFTune noise, early stopping and keep_best, beside a plain run on the same data.

    best_mode max on eval_loss (which falls) makes the best checkpoint the first, so keeping it is visible.
    """
    plain = train_shape(pretrained_base, tmp_path / "plain", SHAPES["sharegpt"])
    knobs = {
        "optim": "adamw_bnb_8bit",
        "neftune_noise_alpha": 5.0,
        "early_stopping": {"metric": "eval_loss", "mode": "max", "patience": 2},
        "eval_steps": 2,
        "max_steps": 12,
    }
    output = {"save_steps": 2, "keep_last": 1, "keep_best": "eval_loss", "best_mode": "max"}
    final = train_shape(pretrained_base, tmp_path / "knobs", SHAPES["sharegpt"], training=knobs, output=output)
    run_dir = final.parent
    records = read_metrics(run_dir / "metrics.jsonl")
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    # patience 2: step 2 is the best (the step-0 evaluation is no candidate), steps 4 and 6 do not beat it
    assert sorted(evals) == [0, 2, 4, 6] and evals[4] < evals[2] and evals[6] < evals[2]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-6"]
    best = json.loads((run_dir / "best_checkpoint.json").read_text())
    assert Path(best["checkpoint"]).name == "checkpoint-2" and best["value"] == pytest.approx(evals[2])
    # 8-bit AdamW: the moments of the big linear layers are uint8 (bitsandbytes keeps small tensors' in fp32,
    # and transformers the embeddings')
    state = torch.load(run_dir / "checkpoints" / "checkpoint-6" / "optimizer.pt", weights_only=False)["state"]
    moments = [s["__bnb_optimizer_quant_state__"]["state1"] for s in state.values()]
    assert moments[0].dtype == torch.float32
    big = [m for m in moments[1:] if m.numel() >= 4096]
    assert big and all(m.dtype == torch.uint8 for m in big)
    # NEFTune noises the embeddings in training only: the same model scores the same before, trains on other losses
    plain_records = read_metrics(plain.parent / "metrics.jsonl")
    plain_eval0 = next(r["eval_loss"] for r in plain_records if "eval_loss" in r and r["step"] == 0)
    plain_step1 = next(r["loss"] for r in plain_records if "loss" in r and r["step"] == 1)
    assert evals[0] == pytest.approx(plain_eval0, rel=1e-6)
    assert abs(next(r["loss"] for r in records if "loss" in r and r["step"] == 1) - plain_step1) > 1e-4
