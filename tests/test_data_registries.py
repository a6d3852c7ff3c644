"""Data as LLaMA-Factory and Axolotl users have it: their preference and KTO rows, content parts with loss_weight,
a dataset_info.json entry by name and an Axolotl `datasets:` entry, each read, checked and trained (2 steps)."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from tests.conftest import SFT_JOB, TINY_ARCH, TOKENIZER, _single_run
from tests.test_bad_input import assert_one_paragraph, run_tuneyard
from tests.test_formats import learned, tiny_tokenizer
from tuneyard.launch.config import job_from_dict
from tuneyard.training.config import DataConfig
from tuneyard.training.data.packing import IGNORE_INDEX
from tuneyard.training.data.sources import read_splits
from tuneyard.training.data.tokenize import tokenize_chat, tokenize_rows
from tuneyard.training.errors import UserError
from tuneyard.training.metrics import read_metrics

WORDS = "red fox owl hill crow soup cat field river door brown fish".split()
ROWS = 8


def task(i: int) -> tuple[str, str, str]:
    """The shipped task's i-th question, its right answer and a wrong one: "Say the last word: a b c" -> "c"."""
    words = [WORDS[(i * 5 + k * 3) % len(WORDS)] for k in range(3)]
    return f"Say the last word: {' '.join(words)}", words[-1], words[0]


def write(folder: Path, name: str, rows: list[dict]) -> Path:
    """A .json array or a .jsonl file of the rows."""
    path = folder / name
    if name.endswith(".json"):
        path.write_text(json.dumps(rows, indent=1))
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


TOOL = {"type": "function", "function": {"name": "last_word", "parameters": {"type": "object"}}}


def shaped_rows(i: int) -> dict[str, dict]:
    """Row i in each shape, written as the two projects' documentation shows them."""
    question, right, wrong = task(i)
    instruction, rest = question.split(": ")
    sharegpt = [{"from": "human", "value": question}]
    messages = [{"role": "user", "content": question}]
    parts = lambda text: [{"type": "text", "value": text}]  # noqa: E731
    return {
        # LLaMA-Factory, alpaca: instruction + input (joined by a newline), output, optional system and history
        "lf_alpaca.json": {
            "instruction": instruction + ":",
            "input": rest,
            "output": right,
            **({"system": "Answer with one word."} if i % 2 else {}),
            **({"history": [["Say the last word: a b", "b"]]} if i == 0 else {}),
        },
        "lf_sharegpt.json": {"conversations": [*sharegpt, {"from": "gpt", "value": right}], "sys": "Be brief."},
        "lf_tools.json": {
            "conversations": [
                *sharegpt,
                {"from": "function_call", "value": json.dumps({"name": "last_word", "arguments": {"n": 3}})},
                {"from": "observation", "value": right},
                {"from": "gpt", "value": right},
            ],
            "tools": json.dumps([TOOL]),
        },
        # LLaMA-Factory's newer rows: content parts with `value`, and a loss_weight per message
        "lf_parts.jsonl": {
            "messages": [
                {"role": "user", "content": parts("Say the last word: a b"), "loss_weight": 0.0},
                {"role": "assistant", "content": parts("a"), "loss_weight": 0.0},  # a wrong answer, not learned
                {"role": "user", "content": parts(question), "loss_weight": 0.0},
                {"role": "assistant", "content": parts(right), "loss_weight": 1.0},
            ]
        },
        "lf_ranking_alpaca.json": {"instruction": instruction + ":", "input": rest, "chosen": right, "rejected": wrong},
        "lf_ranking_sharegpt.json": {
            "conversations": sharegpt,
            "chosen": {"from": "gpt", "value": right},
            "rejected": {"from": "gpt", "value": wrong},
        },
        "lf_pairs_v1.jsonl": {
            "chosen_messages": [
                {"role": "user", "content": parts(question), "loss_weight": 0.0},
                {"role": "assistant", "content": parts(right), "loss_weight": 1.0},
            ],
            "rejected_messages": [
                {"role": "user", "content": parts(question), "loss_weight": 0.0},
                {"role": "assistant", "content": parts(wrong), "loss_weight": 1.0},
            ],
        },
        "lf_kto.json": {
            "messages": [*messages, {"role": "assistant", "content": right if i % 2 else wrong}],
            "kto_tag": bool(i % 2),
        },
        "lf_kto_alpaca.json": {"instruction": question, "output": right if i % 2 else wrong, "kto_tag": bool(i % 2)},
        # Axolotl: chat_template with renamed properties and a per-turn training flag, alpaca, and two DPO types
        "ax_chat.jsonl": {
            "conversations": [
                {"from": "human", "value": question, **({"train": True} if i == 1 else {})},
                {"from": "gpt", "value": right},
            ],
        },
        "ax_alpaca.jsonl": {"instruction": question, "input": "", "output": right},
        "ax_dpo.jsonl": {
            "messages": messages,
            "chosen": {"role": "assistant", "content": right},
            "rejected": {"role": "assistant", "content": wrong},
        },
        "ax_argilla.jsonl": {
            "chosen": [*messages, {"role": "assistant", "content": right}],
            "rejected": [*messages, {"role": "assistant", "content": wrong}],
        },
    }


DATASET_INFO = {
    "alpaca_demo": {
        "file_name": "lf_alpaca.json",
        "columns": {"prompt": "instruction", "query": "input", "response": "output", "system": "system"}
        | {"history": "history"},
    },
    "sharegpt_demo": {
        "file_name": "lf_sharegpt.json",
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "system": "sys"},
    },
    "tools_demo": {"file_name": "lf_tools.json", "formatting": "sharegpt", "columns": {"tools": "tools"}},
    "parts_demo": {
        "file_name": "lf_parts.jsonl",
        "formatting": "sharegpt",
        "columns": {"messages": "messages"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
    },
    "dpo_alpaca_demo": {
        "file_name": "lf_ranking_alpaca.json",
        "ranking": True,
        "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"},
    },
    "dpo_en_demo": {
        "file_name": "lf_ranking_sharegpt.json",
        "formatting": "sharegpt",
        "ranking": True,
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
    },
    "kto_en_demo": {
        "file_name": "lf_kto.json",
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "kto_tag": "kto_tag"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
    },
    "kto_alpaca_demo": {"file_name": "lf_kto_alpaca.json", "columns": {"response": "output", "kto_tag": "kto_tag"}},
    "unsupported": {"file_name": "lf_alpaca.json", "num_samples": 4},
}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """A folder with ROWS rows in every shape (data/ beside the run directories) and its dataset_info.json."""
    folder = tmp_path_factory.mktemp("shapes") / "data"
    folder.mkdir()
    rows = [shaped_rows(i) for i in range(ROWS)]
    for name in rows[0]:
        write(folder, name, [row[name] for row in rows])
    (folder / "dataset_info.json").write_text(json.dumps(DATASET_INFO, indent=1))
    (folder / "calls.jinja").write_text(CALLS_TEMPLATE)
    return folder


# the tiny tokenizer's template, plus each tool call as `name {arguments}`: short rows, no new tokens
CALLS_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|> ' }}{% if m['tool_calls'] is defined and m['tool_calls'] %}"
    "{% for c in m['tool_calls'] %}{{ c['function']['name'] + ' ' + (c['function']['arguments'] | tojson) }}"
    "{% endfor %}{% else %}{{ m['content'] }}{% endif %}{{ '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def lf(shapes: Path, name: str, **more: object) -> dict:
    return {"dataset_info": str(shapes / "dataset_info.json"), "name": name, **more}


def axolotl(shapes: Path, name: str) -> dict:
    entries = {
        "ax_chat.jsonl": {
            "type": "chat_template",
            "field_messages": "conversations",
            "message_property_mappings": {"role": "from", "content": "value"},
            "roles_to_train": ["gpt"],
            "train_on_eos": "turn",
            "message_field_training": "train",
        },
        "ax_alpaca.jsonl": {"type": "alpaca"},
        "ax_dpo.jsonl": {"type": "chat_template.default", "field_messages": "messages"},
        "ax_argilla.jsonl": {"type": "chat_template.argilla_chat"},
    }
    return {"path": str(shapes / name), **entries[name]}


def first_row(shapes: Path, fmt: str, source: dict, **data: object) -> dict:
    rows, _ = read_splits(DataConfig(format=fmt, train=[source], **data), seed=0)
    assert len(rows) == ROWS
    return rows[0]


# --- every shape reads as the canonical rows it means ---------------------------------------------------------

Q0, RIGHT0, WRONG0 = task(0)
USER0, ANSWER0 = {"role": "user", "content": Q0}, {"role": "assistant", "content": RIGHT0}


def test_llamafactory_entries_read_as_llamafactory_reads_them(shapes):
    assert first_row(shapes, "messages", lf(shapes, "alpaca_demo"))["messages"] == [
        {"role": "user", "content": "Say the last word: a b"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": Q0.replace(": ", ":\n")},  # instruction\ninput, as LLaMA-Factory joins them
        ANSWER0,
    ]
    rows, _ = read_splits(DataConfig(format="alpaca", train=[lf(shapes, "alpaca_demo")]), seed=0)
    assert rows[1]["messages"][0] == {"role": "system", "content": "Answer with one word."}
    assert first_row(shapes, "sharegpt", lf(shapes, "sharegpt_demo")) == {
        "messages": [{"role": "system", "content": "Be brief."}, USER0, ANSWER0]
    }
    tools = first_row(shapes, "messages", lf(shapes, "tools_demo"))
    assert tools["tools"] == [TOOL] and tools["messages"][1]["tool_calls"][0]["function"]["name"] == "last_word"
    assert first_row(shapes, "messages", lf(shapes, "parts_demo"))["messages"][2:] == [
        {"role": "user", "content": Q0, "loss_weight": 0},
        {"role": "assistant", "content": RIGHT0, "loss_weight": 1},
    ]
    pair = {"prompt": [USER0], "chosen": [ANSWER0], "rejected": [{"role": "assistant", "content": WRONG0}]}
    assert first_row(shapes, "preference", lf(shapes, "dpo_en_demo")) == pair
    alpaca_pair = first_row(shapes, "preference", lf(shapes, "dpo_alpaca_demo"))
    assert alpaca_pair == {"prompt": [{"role": "user", "content": Q0.replace(": ", ":\n")}]} | {
        "chosen": RIGHT0,
        "rejected": WRONG0,
    }
    feedback = {"prompt": [USER0], "completion": [{"role": "assistant", "content": WRONG0}], "label": False}
    assert first_row(shapes, "unpaired_preference", lf(shapes, "kto_en_demo")) == feedback
    assert first_row(shapes, "unpaired_preference", lf(shapes, "kto_alpaca_demo")) == feedback
    # pairs feed KTO too (each answer becomes a row); feedback rows do not feed DPO
    first_row(shapes, "unpaired_preference", lf(shapes, "dpo_en_demo"))
    with pytest.raises(UserError, match=r"dataset 'kto_en_demo' holds feedback rows .* set data.format: unpaired"):
        first_row(shapes, "preference", lf(shapes, "kto_en_demo"))


def test_their_shapes_read_without_a_registry(shapes):
    """The same files as data.format rows: ShareGPT pairs, KTO conversations with a named label, v1 pairs."""
    pair = {"prompt": [USER0], "chosen": [ANSWER0], "rejected": [{"role": "assistant", "content": WRONG0}]}
    assert first_row(shapes, "preference", {"path": str(shapes / "lf_ranking_sharegpt.json")}) == pair
    v1 = {"path": str(shapes / "lf_pairs_v1.jsonl")}
    columns = {"chosen": "chosen_messages", "rejected": "rejected_messages"}
    assert first_row(shapes, "preference", v1, columns=columns) == pair
    feedback = {"prompt": [USER0], "completion": [{"role": "assistant", "content": WRONG0}], "label": False}
    kto = {"path": str(shapes / "lf_kto.json")}
    assert first_row(shapes, "unpaired_preference", kto, columns={"label": "kto_tag"}) == feedback
    renamed = [{"speaker": "asker", "text": Q0}, {"speaker": "bot", "text": RIGHT0}]
    row = {"conversations": renamed}
    tags = {"role_tag": "speaker", "content_tag": "text", "user_tag": "asker", "assistant_tag": "bot"}
    path = write(shapes.parent, "renamed.jsonl", [row])
    rows, _ = read_splits(DataConfig(format="sharegpt", train=str(path), tags=tags), seed=0)
    assert rows == [{"messages": [USER0, ANSWER0]}]
    with pytest.raises(UserError, match=r"renamed.jsonl:1: conversations\[0\] is from 'None'.* data.tags"):
        read_splits(DataConfig(format="sharegpt", train=str(path)), seed=0)


def test_axolotl_entries_read_as_axolotl_reads_them(shapes):
    rows, _ = read_splits(DataConfig(format="messages", train=[axolotl(shapes, "ax_chat.jsonl")]), seed=0)
    assert rows[0] == {"messages": [USER0 | {"loss_weight": 0}, ANSWER0 | {"loss_weight": 1}]}
    assert rows[1]["messages"][0]["loss_weight"] == 1  # its message_field_training flag wins over roles_to_train
    assert first_row(shapes, "alpaca", axolotl(shapes, "ax_alpaca.jsonl")) == {"messages": [USER0, ANSWER0]}
    pair = {"prompt": [USER0], "chosen": [ANSWER0], "rejected": [{"role": "assistant", "content": WRONG0}]}
    assert first_row(shapes, "preference", axolotl(shapes, "ax_dpo.jsonl")) == pair
    assert first_row(shapes, "preference", axolotl(shapes, "ax_argilla.jsonl")) == pair


def test_registry_mistakes_name_the_entry_and_the_key(shapes):
    info = str(shapes / "dataset_info.json")
    cases = {
        "dataset 'unsupported': key 'num_samples' is not supported by tuneyard: give the data.train entry a weight": [
            lf(shapes, "unsupported")
        ],
        "no dataset named 'dpo_zh_demo'; its datasets are alpaca_demo": [lf(shapes, "dpo_zh_demo")],
        "an entry with dataset_info takes name (the dataset's name in it) and weight, not ['split']": [
            lf(shapes, "dpo_en_demo", split="test")
        ],
        "Axolotl's key 'shards' is not supported by tuneyard": [axolotl(shapes, "ax_alpaca.jsonl") | {"shards": 2}],
        "type 'sharegpt' is not an Axolotl dataset type tuneyard reads": [{"path": info, "type": "sharegpt"}],
        "'roles_to_train' is not read by type alpaca": [axolotl(shapes, "ax_alpaca.jsonl") | {"roles_to_train": []}],
        "'field_messages' is a key of an Axolotl dataset entry, which names its type": [
            {"path": info, "field_messages": "conversations"}
        ],
    }
    for message, train in cases.items():
        job = {**SFT_JOB, "data": {**SFT_JOB["data"], "train": train}, "output": {"dir": str(shapes.parent / "r")}}
        with pytest.raises(UserError) as caught:
            job_from_dict(job, "job.yaml")
        assert "'data.train.0': " in str(caught.value) and message in str(caught.value), str(caught.value)
    columns = {"prompt": "question", "query": "context", "response": "output"}
    (shapes / "bad_info.json").write_text(json.dumps({"q": {"file_name": "lf_alpaca.json", "columns": columns}}))
    source = {"dataset_info": str(shapes / "bad_info.json"), "name": "q"}
    with pytest.raises(UserError) as caught:
        read_splits(DataConfig(format="messages", train=[source]), seed=0)
    assert str(caught.value) == (
        f"{shapes / 'lf_alpaca.json'}[0]: the row has no text in column 'question' ({shapes / 'bad_info.json'}: "
        "dataset 'q': columns.prompt)"
    )


def test_unsupported_registry_keys_are_one_paragraph_exit_2(shapes, tmp_path):
    """Through the real `tuneyard validate`: an Axolotl key and a dataset_info key tuneyard does not read."""
    axolotl_job = {**SFT_JOB, "data": {**SFT_JOB["data"], "train": [axolotl(shapes, "ax_chat.jsonl")]}}
    axolotl_job["data"]["train"][0]["message_field_training_detail"] = "train_detail"
    lf_job = {**SFT_JOB, "data": {**SFT_JOB["data"], "train": [lf(shapes, "unsupported")]}}
    (tmp_path / "ax.yaml").write_text(yaml.safe_dump({**axolotl_job, "output": {"dir": str(tmp_path / "r")}}))
    (tmp_path / "lf.yaml").write_text(yaml.safe_dump({**lf_job, "output": {"dir": str(tmp_path / "r")}}))
    good = {
        **SFT_JOB,
        "data": {**SFT_JOB["data"], "train": [lf(shapes, "alpaca_demo"), axolotl(shapes, "ax_chat.jsonl")]},
    }
    (tmp_path / "good.yaml").write_text(yaml.safe_dump({**good, "output": {"dir": str(tmp_path / "r")}}))
    with ThreadPoolExecutor(3) as pool:
        runs = pool.map(lambda name: run_tuneyard("validate", name, cwd=tmp_path), ["ax.yaml", "lf.yaml", "good.yaml"])
    ax, lf_run, valid = list(runs)
    assert_one_paragraph(ax, "ax.yaml:", "'data.train.0'", "'message_field_training_detail' is not supported")
    assert_one_paragraph(lf_run, "lf.yaml:", "dataset 'unsupported': key 'num_samples' is not supported by tuneyard")
    assert valid.returncode == 0, valid.stderr
    train = yaml.safe_load(valid.stdout)["data"]["train"]
    assert train[0]["name"] == "alpaca_demo" and train[1]["roles_to_train"] == ["gpt"] and "type" not in train[0]


# --- loss masks ---------------------------------------------------------------------------------------------------


def test_a_loss_weight_0_turn_carries_no_loss_and_agrees_with_train_on(shapes):
    tokenizer = tiny_tokenizer()
    row = first_row(shapes, "messages", lf(shapes, "parts_demo"))
    out = tokenize_chat(tokenizer, row["messages"])
    assert learned(tokenizer, out) == f" {RIGHT0}<|end|>\n"
    # the wrong answer's turn, header to end-of-turn, is all ignored tokens
    render = lambda messages: tokenizer.apply_chat_template(messages, tokenize=False)  # noqa: E731
    lo, hi = len(render(row["messages"][:1])), len(render(row["messages"][:2]))
    encoded = tokenizer(render(row["messages"]), add_special_tokens=False, return_offsets_mapping=True)
    assert encoded["input_ids"] == out["input_ids"]
    turn = [label for label, (s, e) in zip(out["labels"], encoded["offset_mapping"], strict=True) if lo <= s < hi]
    assert len(turn) >= 3 and set(turn) == {IGNORE_INDEX}
    # no loss_weight: data.train_on decides; loss_weight 1 on a user turn trains it; under `all` a 0 turn stays out
    plain = [{k: v for k, v in m.items() if k != "loss_weight"} for m in row["messages"]]
    assert learned(tokenizer, tokenize_chat(tokenizer, plain)) == f" a<|end|>\n {RIGHT0}<|end|>\n"
    asked = [plain[0] | {"loss_weight": 1}, *plain[1:]]
    assert learned(tokenizer, tokenize_chat(tokenizer, asked, "last_assistant")) == (
        f"<|user|> Say the last word: a b<|end|>\n {RIGHT0}<|end|>\n"
    )
    everything = learned(tokenizer, tokenize_chat(tokenizer, row["messages"], "all"))
    assert everything == f"<|assistant|> {RIGHT0}<|end|>\n"
    # Axolotl's train_on_eos: none keeps the answer and drops its end-of-turn token; all adds every turn's
    assert learned(tokenizer, tokenize_chat(tokenizer, plain[2:], train_on_eos="none")) == f" {RIGHT0}\n"
    assert learned(tokenizer, tokenize_chat(tokenizer, plain[2:], train_on_eos="all")) == f"<|end|> {RIGHT0}<|end|>\n"
    # a template that marks assistant text ({% generation %}): the marked run of a loss_weight 0 turn is left out
    marked = tiny_tokenizer("qwen3_training")
    assert learned(marked, tokenize_chat(marked, row["messages"])) == f"<think>\n\n</think>\n\n{RIGHT0}<|im_end|>\n"
    # through the tokenised dataset: the turn with loss_weight 0 adds no label
    rows, _ = read_splits(DataConfig(format="messages", train=[lf(shapes, "parts_demo")]), seed=0)
    cfg = DataConfig(format="messages", train=[lf(shapes, "parts_demo")], packing=False, max_length=128)
    examples = tokenize_rows("sft", rows, cfg, tokenizer, "train")
    assert [learned(tokenizer, examples[i]) for i in range(2)] == [f" {task(i)[1]}<|end|>\n" for i in range(2)]


# --- a 2-step run of the stage each shape feeds ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from tests.tiny_models import save_tiny_models

    return str(save_tiny_models(tmp_path_factory.mktemp("models"))["causal"])


def two_steps(job: dict, run_dir: Path) -> list[dict]:
    """Run 2 steps in this process; the per-step records of metrics.jsonl."""
    final = _single_run(job, run_dir)
    steps = [r for r in read_metrics(final.parent / "metrics.jsonl") if "loss" in r and "step" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(math.isfinite(r["loss"]) for r in steps), steps
    assert (final / "config.json").exists()
    return steps


def preference_job(model: str, stage: str, fmt: str, train: list[dict]) -> dict:
    return {
        "stage": stage,
        "model": {"name_or_path": model},
        "data": {"format": fmt, "train": train, "max_length": 64},
        "training": {"batch_size": 4, "max_steps": 2, "learning_rate": 1e-3, "seed": 7, "precision": "fp32"},
        "deepspeed": {"zero_stage": 0},
        "cluster": {"workers": 1},
        "output": {"dir": "set-by-test"},
    }


@pytest.mark.integration
def test_sft_trains_on_every_chat_shape(shapes):
    """LLaMA-Factory's alpaca, sharegpt, tools and content-part entries and Axolotl's chat_template and alpaca, in one
    SFT job (with a template that renders the tool calls); two steps lower the loss."""
    train = [lf(shapes, name) for name in ("alpaca_demo", "sharegpt_demo", "tools_demo", "parts_demo")] + [
        axolotl(shapes, "ax_chat.jsonl"),
        axolotl(shapes, "ax_alpaca.jsonl"),
        str(shapes / "lf_parts.jsonl"),
    ]
    job = {
        **SFT_JOB,
        "model": {"init": "scratch", "tokenizer": str(TOKENIZER), "architecture": TINY_ARCH},
        "data": {
            "format": "messages",
            "train": train,
            "eval": None,
            "chat_template": str(shapes / "calls.jinja"),
            "max_length": 128,
        },
        "training": {"max_steps": 2, "batch_size": 8, "learning_rate": 3e-3, "seed": 7, "precision": "fp32"},
    }
    steps = two_steps(job, shapes.parent / "sft")
    assert steps[1]["loss"] < steps[0]["loss"], steps


@pytest.mark.integration
def test_dpo_trains_on_every_pair_shape(shapes, tiny_model):
    train = [
        lf(shapes, "dpo_en_demo"),
        lf(shapes, "dpo_alpaca_demo"),
        axolotl(shapes, "ax_dpo.jsonl"),
        axolotl(shapes, "ax_argilla.jsonl"),
        {"path": str(shapes / "lf_ranking_sharegpt.json")},
    ]
    steps = two_steps(preference_job(tiny_model, "dpo", "preference", train), shapes.parent / "dpo")
    assert steps[0]["epoch"] == pytest.approx(4 / (5 * ROWS))  # a batch of 4 of the 5 sources' pairs
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # the policy starts as its reference
    assert steps[1]["loss"] < steps[0]["loss"], steps


@pytest.mark.integration
def test_kto_trains_on_every_feedback_shape(shapes, tiny_model):
    train = [
        lf(shapes, "kto_en_demo"),
        lf(shapes, "kto_alpaca_demo"),
        lf(shapes, "dpo_en_demo"),  # a pair: one row of each kind
    ]
    steps = two_steps(preference_job(tiny_model, "kto", "unpaired_preference", train), shapes.parent / "kto")
    assert steps[0]["epoch"] == pytest.approx(4 / (4 * ROWS))  # 8 + 8 feedback rows and 8 pairs taken apart
    assert steps[0]["loss"] == pytest.approx(0.5) and steps[0]["rewards/margins"] == 0.0  # policy = reference
