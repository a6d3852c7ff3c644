"""`make bench`'s summary: each ratio judged against its target, written as Markdown and a PNG."""

from __future__ import annotations

import math

from bench.summary import verdict, write_summary


def test_each_target_form_is_judged():
    assert verdict(0.97, ">= 0.95") == "pass" and verdict(0.88, ">= 0.95") == "FAIL"
    assert verdict(2.4, ">= 2x") == "pass" and verdict(0.31, "<= 0.3x") == "FAIL"
    assert verdict(1.2, "precomputed faster than live (> 1x)") == "pass"
    assert verdict(math.nan, ">= 1.0 (TRL comparison skipped)") == "not measured"
    assert verdict(0.4, "as fast as it goes") == "not measured"


def test_summary_lists_every_ratio_with_its_verdict(tmp_path):
    results = {
        "orchestration": {"ratio": 1.12, "target": ">= 0.95"},
        "qlora_memory": {"ratio": 0.35, "target": "<= 0.3x", "note": "4-bit | bf16"},
        "ppo": {"ratio": math.nan, "target": ">= 1.0 (TRL comparison skipped)"},
        "data_prep": {
            "ratio": 1.7,
            "target": ">= 1.6x",
            "checks": [{"name": "RSS", "ratio": 1.4, "target": "<= 1.3x"}],
        },
    }
    markdown = write_summary(results, tmp_path).read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows == [
        "| orchestration | 1.12 | >= 0.95 | pass |  |",
        "| qlora_memory | 0.35 | <= 0.3x | FAIL | 4-bit / bf16 |",
        "| ppo | n/a | >= 1.0 (TRL comparison skipped) | not measured |  |",
        "| data_prep | 1.70 | >= 1.6x | pass |  |",
        "| data_prep: RSS | 1.40 | <= 1.3x | FAIL |  |",
    ]
    assert (tmp_path / "summary.png").read_bytes().startswith(b"\x89PNG")
