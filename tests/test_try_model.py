"""Trying a run's model and seeing all runs: `tuneyard generate`, `tuneyard chat` on a terminal, `tuneyard runs`."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import EXAMPLES, ROOT, SFT_JOB, job_dict
from tuneyard.launch.run_list import list_runs, read_run
from tuneyard.training.answer_accuracy import exact_match_accuracy, greedy_answer

pytestmark = pytest.mark.integration


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tuneyard.launch.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env=env,
    )


def test_generate_answers_held_out_prompts_as_the_evaluation_scores_them(sft_base, tmp_path):
    """`tuneyard generate` (greedy) on 30 held-out rows: each row comes back with a response, and the share
    that matches the reference answer equals the exact-match accuracy the job's evaluation computes."""
    run_dir = Path(sft_base).parent
    rows = [json.loads(line) for line in (EXAMPLES / "data" / "last-word-eval.jsonl").read_text().splitlines()][:30]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "answers" / "out.jsonl"
    proc = cli("generate", str(run_dir), "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "generate: 30/30 rows" in proc.stderr
    answered = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["messages"] for a in answered] == [r["messages"] for r in rows]  # the rows, in order, plus a response
    matched = sum(a["response"] == a["messages"][-1]["content"].strip() for a in answered) / len(rows)
    model = AutoModelForCausalLM.from_pretrained(sft_base)
    assert matched == exact_match_accuracy(model, AutoTokenizer.from_pretrained(sft_base), rows)
    assert 0 < matched  # it learned something: an all-wrong model would make the equality above cheap


def test_generate_refuses_bad_input_in_one_paragraph(sft_base, tmp_path):
    run_dir = Path(sft_base).parent
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"question": "hi"}\n')
    proc = cli("generate", str(run_dir), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        f"error: {prompts}:2: a prompt row needs 'messages', 'prompt' (a conversation or text) or 'instruction'; "
        "it has ['question']"
    )
    assert not (tmp_path / "o.jsonl").exists()
    proc = cli("generate", str(tmp_path), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"))
    assert proc.returncode == 2 and f"error: {tmp_path} has no final/ folder" in proc.stderr


class Terminal:
    """A program on a pseudo-terminal: what it prints, read until a prompt; keys typed as a user would."""

    def __init__(self, command: list[str]):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            command, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, start_new_session=True, close_fds=True
        )
        os.close(slave)
        self.seen = ""

    def read_until(self, text: str, timeout_s: float = 300) -> str:
        """Everything printed since the last read, up to and including `text`."""
        deadline = time.monotonic() + timeout_s
        while text not in self.seen:
            assert time.monotonic() < deadline, f"no {text!r} in {self.seen[-2000:]!r}"
            ready, _, _ = select.select([self.master], [], [], 1.0)
            if ready:
                try:
                    self.seen += os.read(self.master, 4096).decode(errors="replace").replace("\r", "")
                except OSError:  # the program ended and closed the terminal
                    assert text in self.seen, f"ended without {text!r}: {self.seen[-2000:]!r}"
        before, _, self.seen = self.seen.partition(text)
        return before + text

    def type(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        os.close(self.master)


def reply_in(screen: str, question: str) -> str:
    """The model's reply on a screen that shows `question` echoed, then `model> REPLY`, then the next prompt."""
    after = screen.split(question, 1)[1]
    return after.split("model> ", 1)[1].rsplit("you> ", 1)[0].strip()


def test_chat_in_a_real_terminal(sft_base):
    """Three turns through a pty: the replies are the greedy answers to the conversation so far; /reset forgets
    it; /exit ends with status 0."""
    run_dir = Path(sft_base).parent
    model = AutoModelForCausalLM.from_pretrained(sft_base)
    tokenizer = AutoTokenizer.from_pretrained(sft_base)
    first, second = "Say the last word: red fox owl", "Say the last word: cat lamp"
    term = Terminal([sys.executable, "-m", "tuneyard.launch.cli", "chat", str(run_dir), "--temperature", "0"])
    try:
        assert "/reset starts a new conversation" in term.read_until("you> ")
        term.type(first)
        one = reply_in(term.read_until("you> "), first)
        history = [{"role": "user", "content": first}]
        assert one == greedy_answer(model, tokenizer, history, max_new_tokens=256)
        term.type(second)
        two = reply_in(term.read_until("you> "), second)
        history += [{"role": "assistant", "content": one}, {"role": "user", "content": second}]
        assert two == greedy_answer(model, tokenizer, history, max_new_tokens=256)  # it kept the conversation
        term.type("/reset")
        assert "(a new conversation)" in term.read_until("you> ")
        term.type(second)
        fresh = reply_in(term.read_until("you> "), second)
        assert fresh == greedy_answer(model, tokenizer, [{"role": "user", "content": second}], max_new_tokens=256)
        term.type("/exit")
        assert term.proc.wait(timeout=30) == 0
    finally:
        term.close()


def test_runs_shows_each_runs_stage_status_and_figures(tmp_path):
    """Under one folder: a finished run, a failed one (NaN with max_nonfinite_steps 0), and one seen running
    and then SIGKILLed (`died`); `tuneyard runs` prints a row for each."""
    root = tmp_path / "runs"

    def job_file(name: str, **sections: dict) -> Path:
        job = job_dict(SFT_JOB, root / name, cluster={"workers": 1}, **sections)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(job))
        return path

    done = cli("train", str(job_file("done", training={"max_steps": 4})), "--single")
    assert done.returncode == 0, done.stderr[-3000:]
    env = {**os.environ, "TUNEYARD_FAULT_NAN_LOSS": "2"}
    nan = cli("train", str(job_file("nan", training={"max_steps": 4, "max_nonfinite_steps": 0})), "--single", env=env)
    assert nan.returncode == 1, nan.stderr[-3000:]

    command = [
        sys.executable,
        "-m",
        "tuneyard.launch.cli",
        "train",
        str(job_file("killed", training={"max_steps": 400})),
    ]
    proc = subprocess.Popen(
        [*command, "--single"], cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 300
        while (row := read_run(root / "killed")).step is None:
            assert time.monotonic() < deadline and proc.poll() is None, "the run never logged a step"
            time.sleep(0.2)
        assert row.status == "running" and row.total == 400 and row.seconds > 0
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert read_run(root / "killed").status == "died"

    listing = cli("runs", str(root))
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.strip().splitlines()
    header = ["RUN", "STAGE", "STATUS", "STEP", "LOSS", "BEFORE", "->", "AFTER", "STARTED", "WALL", "FINAL"]
    assert lines[0].split() == header
    rows = {line.split()[0]: line for line in lines[1:]}
    assert sorted(rows) == ["done", "killed", "nan"]
    assert rows["done"].split()[1:4] == ["sft", "finished", "4/4"]
    assert "eval loss" in rows["done"] and rows["done"].endswith(str(root / "done" / "final"))
    assert rows["nan"].split()[1:3] == ["sft", "failed"] and rows["nan"].endswith(" -")
    assert rows["killed"].split()[1:3] == ["sft", "died"] and "/400" in rows["killed"]
    outcome = json.loads((root / "nan" / "outcome.json").read_text())
    assert outcome["message"].startswith("training stopped at step 2: the loss or gradients were NaN/inf")
    assert list_runs(root) == listing.stdout.strip()
    (tmp_path / "empty").mkdir()
    empty = tmp_path / "empty"
    assert list_runs(empty) == f"no run directories under {empty} (a run directory holds run.json)"
