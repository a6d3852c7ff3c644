"""A table of users' mistakes through the real `tuneyard` command: exit 2, one paragraph naming the place, no traceback.

Each case builds its files under tmp_path and returns the command line and fragments the message must hold.
Almost all stop in `validate` or in the driver's preflight, before any Ray worker starts; the few that need
the loader run with --single on a tiny model built once for the module. Each case runs in a process of its own,
forked from a warm CLI process (tests/cli_forks.py) so that the table does not import torch once per case.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from queue import Queue

import pytest
import yaml

from tests.cli_forks import ForkingCli
from tests.conftest import EXAMPLES, PRETRAIN_JOB, SFT_JOB, job_dict
from tests.tiny_models import save_tiny_models

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
SFT_ROWS = EXAMPLES / "data" / "last-word-train.jsonl"
PROMPTS = EXAMPLES / "data" / "last-word-prompts-train.jsonl"


def run_tuneyard(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """The real CLI in a fresh process, offline (nothing here may need the hub)."""
    env = {**os.environ, **OFFLINE}
    return subprocess.run(
        [sys.executable, "-m", "tuneyard.launch.cli", *argv],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=cwd,
        env=env,
    )


def assert_one_paragraph(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2, no traceback, and an `error:` paragraph (no blank line in it) holding every fragment."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    message = proc.stderr[proc.stderr.index("error: ") :].strip() if "error: " in proc.stderr else ""
    assert message and "\n\n" not in message, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The tiny model folders of tests.tiny_models: safetensors, pickle, and a pickled one-output classifier."""
    return save_tiny_models(tmp_path_factory.mktemp("models"))


def copy_model(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


# --- helpers that write a case's files ------------------------------------------------------------------------


def write_job(tmp: Path, job: dict | list | str, name: str = "job.yaml") -> str:
    path = tmp / name
    path.write_text(job if isinstance(job, str) else yaml.safe_dump(job))
    return str(path)


def sft(tmp: Path, **sections: dict) -> dict:
    """The tiny SFT job with its run dir under tmp, one worker, no eval file unless a case sets one."""
    return job_dict(SFT_JOB, tmp / "run", cluster={"workers": 1}, **{"data": {"eval": None}, **sections})


def with_data(tmp: Path, name: str, content: bytes | str, base: dict | None = None, **data: object) -> tuple:
    """A job whose data.train is one file of this content."""
    path = tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    job = base or sft(tmp)
    job["data"].update(train=str(path), **data)
    return job, str(path)


def first_rows(source: Path, count: int) -> str:
    return "".join(source.read_text().splitlines(keepends=True)[:count])


def pretrained(tmp: Path, folder: Path, stage: str = "sft", **sections: dict) -> dict:
    """A job that starts from `folder` (a saved model) instead of a scratch architecture."""
    job = sft(tmp, **sections)
    job["stage"] = stage
    job["model"] = {"name_or_path": str(folder)}
    return job


def grpo(tmp: Path, models: dict[str, Path], **reward: object) -> dict:
    job = pretrained(tmp, models["causal"], stage="grpo")
    job["data"].update(format="prompt", train=str(PROMPTS))
    job["reward"] = {"functions": [{"name": "last_word_exact"}], **reward}
    return job


def ppo(tmp: Path, models: dict[str, Path], **ppo_section: object) -> dict:
    job = pretrained(tmp, models["causal"], stage="ppo")
    job["data"].update(format="prompt", train=str(PROMPTS))
    job["reward"] = {"functions": [{"name": "last_word_exact"}]}
    job["ppo"] = ppo_section
    return job


def adapter_run(tmp: Path, adapter_config: str) -> Path:
    """A finished-looking LoRA run directory: job.yaml and final/ with the given adapter_config.json."""
    run = tmp / "lora-run"
    (run / "final").mkdir(parents=True)
    (run / "job.yaml").write_text(yaml.safe_dump({"stage": "sft", "peft": {"method": "lora"}}))
    (run / "final" / "adapter_config.json").write_text(adapter_config)
    return run


# --- the cases: name -> (tmp, models) -> (argv, fragments) -----------------------------------------------------

Case = Callable[[Path, dict], tuple[list[str], list[str]]]
CASES: dict[str, Case] = {}


def case(name: str) -> Callable[[Case], Case]:
    def register(fn: Case) -> Case:
        CASES[name] = fn
        return fn

    return register


# job file and overrides (`validate`: no torch, a fraction of a second)


@case("data.train is an empty list")
def _(tmp, models):
    return ["validate", write_job(tmp, sft(tmp)), "data.train=[]"], ["job.yaml:", "'data.train': lists no data"]


@case("data.train is an empty path")
def _(tmp, models):
    return ["validate", write_job(tmp, sft(tmp, data={"train": ""}))], ["'data.train': a source has an empty path"]


@case("negative learning rate")
def _(tmp, models):
    job = sft(tmp, training={"learning_rate": -0.001})
    return ["validate", write_job(tmp, job)], ["job.yaml:", "'training.learning_rate': Input should be greater than 0"]


@case("unknown stage")
def _(tmp, models):
    return ["validate", write_job(tmp, {**sft(tmp), "stage": "finetune"})], ["job.yaml:", "'stage': Input should be"]


@case("override without =")
def _(tmp, models):
    return ["validate", write_job(tmp, sft(tmp)), "training.max_steps"], ["not of the form key.sub=value"]


@case("override descends into a value")
def _(tmp, models):
    job = write_job(tmp, sft(tmp))
    return ["validate", job, "training.max_steps.limit=3"], ["'max_steps' holds a value, not a section"]


@case("override replaces a section by a scalar")
def _(tmp, models):
    return ["validate", write_job(tmp, sft(tmp)), "training=5"], ["'training': Input should be a valid dictionary"]


@case("override value is not YAML")
def _(tmp, models):
    job = write_job(tmp, sft(tmp))
    return ["validate", job, "training.max_steps=[3"], ["override 'training.max_steps=[3': the value is not valid YAML"]


@case("job file indented with a tab")
def _(tmp, models):
    text = yaml.safe_dump(sft(tmp)).replace("\n  learning_rate:", "\n\tlearning_rate:")
    return ["validate", write_job(tmp, text)], ["job.yaml:", "not valid YAML", "not tabs"]


@case("job file with unclosed bracket")
def _(tmp, models):
    return ["validate", write_job(tmp, "stage: sft\nmodel: {name_or_path: x\ndata: {}\n")], [
        "job.yaml:",
        "not valid YAML",
    ]


@case("job file is a list")
def _(tmp, models):
    return ["validate", write_job(tmp, [sft(tmp)])], ["job.yaml: a job file is a mapping of sections"]


@case("job file is not UTF-8")
def _(tmp, models):
    path = tmp / "job.yaml"
    path.write_bytes(yaml.safe_dump(sft(tmp)).encode() + b"# caf\xe9\n")
    return ["validate", str(path)], ["job.yaml:", "not UTF-8"]


@case("job file is a folder")
def _(tmp, models):
    (tmp / "jobs").mkdir()
    return ["train", str(tmp / "jobs")], ["jobs is a folder"]


@case("ia3 in a preference stage")
def _(tmp, models):
    job = sft(tmp, peft={"method": "ia3"})
    job["stage"], job["data"]["format"] = "dpo", "preference"
    return ["validate", write_job(tmp, job)], ["peft.method ia3 trains in stages pretrain and sft; for stage dpo"]


@case("deepspeed.config is malformed JSON")
def _(tmp, models):
    (tmp / "ds.json").write_text('{"zero_optimization": {"stage": 2},\n  "fp16": }\n')
    job = sft(tmp, deepspeed={"config": str(tmp / "ds.json")})
    return ["validate", write_job(tmp, job)], ["job.yaml:", f"deepspeed.config {tmp / 'ds.json'}:2: malformed JSON"]


@case("deepspeed.config does not exist")
def _(tmp, models):
    job = sft(tmp, deepspeed={"config": str(tmp / "nope.json")})
    return ["validate", write_job(tmp, job)], [f"deepspeed.config '{tmp / 'nope.json'}' does not exist"]


@case("pipeline without stages")
def _(tmp, models):
    return ["pipeline", write_job(tmp, {"jobs": ["a.yaml"]}, "pipe.yaml")], ["pipe.yaml: a pipeline is `stages:`"]


@case("pipeline stage whose job has an unknown key")
def _(tmp, models):
    job = write_job(tmp, {**sft(tmp), "trainig": {}}, "stage1.yaml")
    pipe = write_job(tmp, {"stages": [{"job": job}]}, "pipe.yaml")
    return ["pipeline", pipe, "--single"], ["stage1.yaml", "unknown key 'trainig'; did you mean 'training'?"]


@case("pipeline file indented with a tab")
def _(tmp, models):
    return ["pipeline", write_job(tmp, "stages:\n\t- job: a.yaml\n", "pipe.yaml")], ["pipe.yaml:2", "not valid YAML"]


# export and plot


@case("export of a run without final/")
def _(tmp, models):
    (tmp / "run").mkdir()
    return ["export", str(tmp / "run"), "--adapter"], ["has no final/ folder"]


@case("export of a path that is no run")
def _(tmp, models):
    return ["export", str(tmp / "nowhere"), "--merge"], [f"{tmp / 'nowhere'} is not a folder"]


@case("export --merge with a damaged adapter_config.json")
def _(tmp, models):
    run = adapter_run(tmp, '{"base_model_name_or_path": ')
    return ["export", str(run), "--merge"], [f"{run / 'final' / 'adapter_config.json'} is damaged"]


@case("export --merge without the run's job.yaml")
def _(tmp, models):
    run = adapter_run(tmp, json.dumps({"base_model_name_or_path": str(models["causal"])}))
    (run / "job.yaml").unlink()
    return ["export", str(run), "--merge"], [f"{run / 'job.yaml'} is missing"]


@case("export --merge onto a pickle base")
def _(tmp, models):
    run = adapter_run(tmp, json.dumps({"base_model_name_or_path": str(models["pickle"])}))
    return ["export", str(run), "--merge"], ["the adapter's base model:", "pytorch_model.bin", "model.allow_pickle"]


@case("export --adapter to a path under a file")
def _(tmp, models):
    run = adapter_run(tmp, json.dumps({"base_model_name_or_path": str(models["causal"])}))
    (tmp / "a-file").write_text("")
    return ["export", str(run), "--adapter", "--out", str(tmp / "a-file" / "out")], ["--out: cannot write the export"]


@case("plot of a folder without metrics.jsonl")
def _(tmp, models):
    (tmp / "run").mkdir()
    return ["plot", str(tmp / "run")], ["has no metrics.jsonl"]


@case("plot where metrics.jsonl is a folder")
def _(tmp, models):
    (tmp / "run" / "metrics.jsonl").mkdir(parents=True)
    return ["plot", str(tmp / "run")], ["has no metrics.jsonl"]


# data files (preflight on the driver)


@case("data file not UTF-8")
def _(tmp, models):
    rows = first_rows(SFT_ROWS, 3).encode() + '{"messages": [{"role": "user", "content": "caf\xe9"}]}\n'.encode(
        "latin1"
    )
    job, path = with_data(tmp, "latin1.jsonl", rows)
    return ["train", write_job(tmp, job)], [f"{path}:4: not UTF-8 text (byte 0xe9", "iconv"]


@case("jsonl with a truncated last line")
def _(tmp, models):
    rows = first_rows(SFT_ROWS, 4)
    job, path = with_data(tmp, "cut.jsonl", rows + rows.splitlines()[0][:25])
    return ["train", write_job(tmp, job)], [f"{path}:5: malformed JSON", "cut short"]


@case(".json that is not a list")
def _(tmp, models):
    job, path = with_data(tmp, "rows.json", json.dumps({"data": [{"messages": []}]}))
    return ["train", write_job(tmp, job)], [f"{path}: a .json data file must hold a list of rows", "not a dict"]


@case("corrupt parquet")
def _(tmp, models):
    job, path = with_data(tmp, "rows.parquet", b"PAR1" + os.urandom(200) + b"PAR1")
    return ["train", write_job(tmp, job)], [f"{path}: not a readable Parquet file"]


@case("data path is a folder without data files")
def _(tmp, models):
    (tmp / "dataset").mkdir()
    (tmp / "dataset" / "README").write_text("nothing here")
    job = sft(tmp, data={"train": str(tmp / "dataset")})
    return ["train", write_job(tmp, job)], ["data.train: data source", "is a folder that `datasets` cannot read"]


@case("data path goes through a file")
def _(tmp, models):
    (tmp / "train.jsonl").write_text(first_rows(SFT_ROWS, 2))
    job = sft(tmp, data={"train": str(tmp / "train.jsonl" / "part-0.jsonl")})
    return ["train", write_job(tmp, job)], ["data.train: data source", "part-0.jsonl' does not exist"]


@case("eval file missing")
def _(tmp, models):
    job = sft(tmp, data={"eval": str(tmp / "eval.jsonl")})
    return ["train", write_job(tmp, job)], [f"data.eval: data source '{tmp / 'eval.jsonl'}' does not exist"]


@case("messages row with an unknown role")
def _(tmp, models):
    row = {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    job, path = with_data(tmp, "roles.jsonl", first_rows(SFT_ROWS, 2) + json.dumps(row) + "\n")
    return ["train", write_job(tmp, job)], [f"{path}:3: messages[0] has role 'robot'"]


@case("row that is not an object")
def _(tmp, models):
    job, path = with_data(tmp, "lists.jsonl", first_rows(SFT_ROWS, 1) + '["user", "hi"]\n')
    return ["train", write_job(tmp, job)], [f"{path}:2: a row must be a JSON object, got list"]


# model and tokenizer folders


@case("model.safetensors cut short")
def _(tmp, models):
    folder = copy_model(models["causal"], tmp / "model")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    job = pretrained(tmp, folder)
    return ["train", write_job(tmp, job)], [f"model.name_or_path: {weights} is damaged", "cut short"]


@case("config.json is not JSON")
def _(tmp, models):
    folder = copy_model(models["causal"], tmp / "model")
    (folder / "config.json").write_text('{\n  "model_type": "llama",\n  "hidden_size": 64,,\n}\n')
    job = pretrained(tmp, folder)
    return ["train", write_job(tmp, job)], [f"model.name_or_path: {folder / 'config.json'}:3: not valid JSON"]


@case("model folder without weights")
def _(tmp, models):
    folder = copy_model(models["causal"], tmp / "model")
    (folder / "model.safetensors").unlink()
    return ["train", write_job(tmp, pretrained(tmp, folder))], ["holds config.json but no weights"]


@case("model.name_or_path is a file")
def _(tmp, models):
    job = pretrained(tmp, models["causal"] / "model.safetensors")
    return ["train", write_job(tmp, job)], ["model.name_or_path:", "model.safetensors' is a file"]


@case("model.name_or_path is a LoRA adapter folder")
def _(tmp, models):
    run = adapter_run(tmp, json.dumps({"base_model_name_or_path": str(models["causal"])}))
    job = pretrained(tmp, run / "final")
    return ["train", write_job(tmp, job)], ["is a LoRA adapter folder", "tuneyard export RUN_DIR --merge"]


@case("tokenizer folder without tokenizer files")
def _(tmp, models):
    (tmp / "tokenizer").mkdir()
    (tmp / "tokenizer" / "notes.txt").write_text("the tokenizer was not copied")
    job = sft(tmp)
    job["model"]["tokenizer"] = str(tmp / "tokenizer")
    return ["train", write_job(tmp, job)], ["model.tokenizer: cannot load a tokenizer from", "tokenizer.json"]


@case("pickle weights without model.allow_pickle")
def _(tmp, models):
    job = pretrained(tmp, models["pickle"])
    job["data"]["train"] = str(tmp / "rows.jsonl")
    (tmp / "rows.jsonl").write_text(first_rows(SFT_ROWS, 8))
    argv = ["train", write_job(tmp, job), "--single"]  # refused by the loader, in this process
    return argv, ["pytorch_model.bin", "unpickling can run code", "Convert them to safetensors", "allow_pickle: true"]


# stages and rewards


@case("--single with stage ppo")
def _(tmp, models):
    return ["train", write_job(tmp, ppo(tmp, models)), "--single"], ["--single is not supported"]


@case("grpo with an unknown reward function")
def _(tmp, models):
    job = grpo(tmp, models, functions=[{"name": "last_word_exactly"}])
    return ["train", write_job(tmp, job)], ["unknown reward function 'last_word_exactly'", "last_word_exact"]


@case("grpo with reward.remote")
def _(tmp, models):
    job = grpo(tmp, models, remote={"url": "http://127.0.0.1:9/score"})
    return ["validate", write_job(tmp, job)], ["reward.remote is scored by stage ppo's own loop", "ppo.advantage: grpo"]


@case("ppo reward.remote with credentials in its url")
def _(tmp, models):
    job = ppo(tmp, models)
    job["reward"]["remote"] = {"url": "https://me:hunter2@example.org/score"}
    return ["validate", write_job(tmp, job)], ["reward.remote.url carries credentials", "reward.remote.token_env"]


@case("ppo reward.remote.token_env that is not set")
def _(tmp, models):
    job = ppo(tmp, models)
    job["reward"]["remote"] = {"url": "http://127.0.0.1:9/score", "token_env": "TUNEYARD_TEST_UNSET_TOKEN"}
    return ["train", write_job(tmp, job)], ["reward.remote.token_env names TUNEYARD_TEST_UNSET_TOKEN, which is not set"]


@case("ppo.environment offering an unknown tool")
def _(tmp, models):
    environment = {"name": "tools", "max_turns": 2, "tools": ["calculator"], "max_tokens": 64}
    job = ppo(tmp, models, advantage="grpo", samples_per_prompt=2, environment=environment)
    return ["train", write_job(tmp, job)], ["ppo.environment.tools: unknown tool 'calculator'", "calculate"]


@case("ppo.environment.max_tokens past the model's positions")
def _(tmp, models):
    environment = {"name": "tools", "max_turns": 2, "tools": ["calculate"], "max_tokens": 200}
    job = ppo(tmp, models, advantage="grpo", samples_per_prompt=2, environment=environment)
    return ["train", write_job(tmp, job)], [
        "ppo.max_prompt_length (128) plus ppo.environment.max_tokens (200) is 328 tokens",
        "the 256 positions of the model",
    ]


@case("grpo reward.model that is a causal LM")
def _(tmp, models):
    job = grpo(tmp, models, model=str(models["causal"]))
    return ["train", write_job(tmp, job)], ["reward.model:", "is not a reward model", "LlamaForCausalLM"]


@case("grpo reward.model with pickle weights")
def _(tmp, models):
    job = grpo(tmp, models, model=str(models["classifier-pickle"]))
    job["data"]["train"] = str(tmp / "prompts.jsonl")
    (tmp / "prompts.jsonl").write_text(first_rows(PROMPTS, 8))
    return ["train", write_job(tmp, job), "--single"], ["reward.model:", "pytorch_model.bin", "allow_pickle: true"]


@case("a group advantage estimator with one sample per prompt")
def _(tmp, models):
    job = ppo(tmp, models, advantage="grpo", samples_per_prompt=1)
    return ["validate", write_job(tmp, job)], [
        "ppo.advantage grpo measures each answer against the other answers to its prompt",
        "ppo.samples_per_prompt must be at least 2 (it is 1)",
    ]


@case("ppo.kl.in neither reward nor loss")
def _(tmp, models):
    job = ppo(tmp, models, kl={"in": "advantage"})
    return ["validate", write_job(tmp, job)], ["job.yaml:", "'ppo.kl.in': Input should be 'reward' or 'loss'"]


@case("ppo prompt longer than ppo.max_prompt_length")
def _(tmp, models):
    job = ppo(tmp, models, max_prompt_length=8)
    return ["train", write_job(tmp, job)], ["data.train: prompt 1", "over ppo.max_prompt_length 8"]


def sharing(tmp: Path, stage_job: dict, n: int, workers: int, **training: object) -> dict:
    """`stage_job` with training.sequence_parallel n over `workers` workers."""
    stage_job["training"].update(sequence_parallel=n, **training)
    stage_job["cluster"] = {"workers": workers}
    return stage_job


@case("training.sequence_parallel in stage dpo")
def _(tmp, models):
    job = sharing(tmp, pretrained(tmp, models["causal"], stage="dpo"), 2, 2)
    return ["validate", write_job(tmp, job)], ["training.sequence_parallel (2) runs in stages pretrain and sft"]


@case("training.sequence_parallel that does not divide the workers")
def _(tmp, models):
    job = sharing(tmp, sft(tmp, data={"packing": False}), 2, 3)
    return ["validate", write_job(tmp, job)], ["training.sequence_parallel (2) must divide cluster.workers (3)"]


@case("training.sequence_parallel that does not divide data.max_length")
def _(tmp, models):
    job = sharing(tmp, sft(tmp, data={"packing": False, "max_length": 101}), 2, 2)
    return ["validate", write_job(tmp, job)], ["training.sequence_parallel (2) must divide data.max_length (101)"]


@case("training.sequence_parallel that does not divide the attention heads")
def _(tmp, models):
    job = sharing(tmp, sft(tmp, data={"packing": False, "max_length": 120, "cache_dir": str(tmp / ".tokenized")}), 3, 3)
    return ["train", write_job(tmp, job)], ["training.sequence_parallel (3) must divide the model's 4 attention heads"]


@case("training.sequence_parallel with --single")
def _(tmp, models):
    job = sharing(tmp, sft(tmp, data={"packing": False}), 2, 2)
    return ["train", write_job(tmp, job), "--single"], ["training.sequence_parallel (2)", "drop --single"]


@case("pretrain with a format other than text")
def _(tmp, models):
    job = job_dict(PRETRAIN_JOB, tmp / "run", cluster={"workers": 1}, data={"eval": None, "format": "messages"})
    job["data"]["train"] = str(SFT_ROWS)
    job["data"]["max_length"] = 32
    return ["train", write_job(tmp, job), "--single"], ["stage pretrain reads data.format: text"]


# where things are written


@case("data.cache_dir under a regular file")
def _(tmp, models):
    (tmp / "a-file").write_text("")
    job = sft(tmp, data={"cache_dir": str(tmp / "a-file" / "cache"), "train": str(tmp / "rows.jsonl")})
    (tmp / "rows.jsonl").write_text(first_rows(SFT_ROWS, 8))
    return ["train", write_job(tmp, job), "--single"], ["data.cache_dir: cannot create", "Not a directory"]


@case("output.dir is an existing file")
def _(tmp, models):
    (tmp / "run").write_text("not a folder")
    return ["train", write_job(tmp, sft(tmp))], ["output.dir", str(tmp / "run")]


@case("output.dir under a regular file")
def _(tmp, models):
    (tmp / "a-file").write_text("")
    job = sft(tmp, data={"cache_dir": str(tmp / ".tokenized")})
    job["output"]["dir"] = str(tmp / "a-file" / "run")
    return ["train", write_job(tmp, job)], ["output.dir", str(tmp / "a-file")]


@case("data.max_length longer than the model's positions")
def _(tmp, models):
    job = sft(tmp, data={"max_length": 100000, "cache_dir": str(tmp / ".tokenized")})
    return ["train", write_job(tmp, job)], [
        "data.max_length (100000)",
        "the 256 positions of the model",
        "set data.max_length to at most 256",
    ]


@case("output.dir that cannot be created")
def _(tmp, models):
    job = sft(tmp, data={"cache_dir": str(tmp / ".tokenized")})
    job["output"]["dir"] = "/proc/tuneyard-test/run"
    return ["train", write_job(tmp, job)], ["output.dir '/proc/tuneyard-test/run' cannot be created", "choose an"]


PARALLEL = max(2, min(4, os.cpu_count() or 2))  # forks of warm CLI processes, one case each at a time


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory, models) -> dict[str, tuple[subprocess.CompletedProcess | Exception, list]]:
    """Every selected case built in its own folder and run, PARALLEL at a time: the table takes its CPU time / 2."""
    selected = [
        item.callspec.params["name"]
        for item in request.session.items
        if item.module.__name__ == __name__ and "name" in getattr(getattr(item, "callspec", None), "params", {})
    ]

    clis: Queue[ForkingCli] = Queue()

    def run(name: str) -> tuple[subprocess.CompletedProcess | Exception, list]:
        tmp = tmp_path_factory.mktemp(re.sub(r"\W+", "-", name)[:40])
        cli = clis.get()
        try:
            argv, fragments = CASES[name](tmp, models)
            return cli.run(argv, cwd=tmp, timeout=180), fragments
        except Exception as exc:  # reported by the case's own test, not by the fixture
            return exc, []
        finally:
            clis.put(cli)

    for _ in range(PARALLEL):
        clis.put(ForkingCli({**os.environ, **OFFLINE}))
    try:
        with ThreadPoolExecutor(PARALLEL) as pool:
            return dict(zip(selected, pool.map(run, selected), strict=True))
    finally:
        while not clis.empty():
            clis.get().close()


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_paragraph(name, outcomes):
    proc, fragments = outcomes[name]
    if isinstance(proc, Exception):
        raise proc
    assert_one_paragraph(proc, *fragments)
