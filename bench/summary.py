"""`bench/results/summary.md` and `summary.png`: every ratio of one `make bench` run beside its target, pass or fail."""

from __future__ import annotations

import math
import operator
import re
from pathlib import Path

COMPARISONS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
TARGET = re.compile(r"(>=|<=|>|<)\s*([0-9]*\.?[0-9]+)")


def verdict(ratio: float, target: str) -> str:
    """`pass`, `FAIL`, or `not measured` (a NaN ratio, or a target without a bound to compare with)."""
    match = TARGET.search(target)
    if match is None or ratio is None or math.isnan(ratio):
        return "not measured"
    return "pass" if COMPARISONS[match.group(1)](ratio, float(match.group(2))) else "FAIL"


def rows_of(results: dict[str, dict]) -> list[tuple[str, dict]]:
    """(name, result) per ratio: a benchmark's own, then each of its further `checks` as `name: check`."""
    rows = []
    for name, result in results.items():
        rows.append((name, result))
        rows += [(f"{name}: {check['name']}", check) for check in result.get("checks", [])]
    return rows


def summary_markdown(results: dict[str, dict]) -> str:
    """A Markdown table: benchmark, ratio, target, verdict, and the benchmark's own note when it has one."""
    lines = [
        "# Benchmark summary",
        "",
        "Each ratio was measured side by side in one `make bench` run (these machines are noisy: compare only",
        "within a run). Details of every benchmark are in its JSON file beside this one.",
        "",
        "| benchmark | ratio | target | verdict | note |",
        "|---|---|---|---|---|",
    ]
    for name, result in rows_of(results):
        ratio = result.get("ratio", math.nan)
        shown = "n/a" if ratio is None or math.isnan(ratio) else f"{ratio:.2f}"
        note = str(result.get("note", "")).replace("|", "/").replace("\n", " ")
        lines.append(f"| {name} | {shown} | {result['target']} | {verdict(ratio, result['target'])} | {note} |")
    return "\n".join(lines) + "\n"


def summary_chart(results: dict[str, dict], path: Path) -> None:
    """Bars of each measured ratio with its target's bound marked: green where it passes, red where it fails."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(name, r["ratio"], r["target"]) for name, r in rows_of(results) if not math.isnan(r.get("ratio", math.nan))]
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.2))
    for y, (_, ratio, target) in enumerate(rows):
        ax.barh(y, ratio, color="tab:green" if verdict(ratio, target) == "pass" else "tab:red")
        bound = TARGET.search(target)
        if bound:
            ax.plot([float(bound.group(2))] * 2, [y - 0.4, y + 0.4], color="black")
        ax.text(ratio, y, f" {ratio:.2f} (target {target})", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [name for name, _, _ in rows])
    ax.set_xscale("log")
    ax.set_xlabel("ratio (log scale; black line: the target's bound)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_summary(results: dict[str, dict], out: Path) -> Path:
    """Write summary.md and summary.png into `out`; the Markdown file's path."""
    markdown = out / "summary.md"
    markdown.write_text(summary_markdown(results))
    summary_chart(results, out / "summary.png")
    return markdown
