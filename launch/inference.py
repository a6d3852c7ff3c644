"""Trying a run's model: load its final/ (adapters applied), answer a file of prompts, or chat in a terminal.

One process, on one GPU when there is one, else the CPU. Prompts go through the tokenizer's chat
template (the one the run trained with, saved in final/); a plain-text prompt is continued as it is.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tuneyard.training.errors import UserError
from tuneyard.training.stages import stages_where

GENERATING_STAGES = stages_where(lambda s: s.generates)


def checked_run(run_dir: Path) -> dict:
    """The job of a finished run whose final/ generates text (refused in one paragraph otherwise)."""
    from tuneyard.launch.export import read_run_job

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a folder; give a run directory (the output.dir of a finished job)")
    if not (run_dir / "final").is_dir():
        raise UserError(
            f"{run_dir} has no final/ folder: the run has not finished (`tuneyard runs` shows where it stands); "
            "give a finished run directory"
        )
    job = read_run_job(run_dir)
    stage = job.get("stage", "sft")
    if stage not in GENERATING_STAGES:
        raise UserError(
            f"{run_dir} is a {stage} run: its final/ scores text, it does not write any; give a run of stage "
            f"{', '.join(GENERATING_STAGES)}"
        )
    return job


def load_run_model(run_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model in RUN_DIR/final/ for generation (a LoRA/QLoRA adapter on its base) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneyard.launch.export import load_adapter_model

    job = checked_run(run_dir)
    final = Path(run_dir) / "final"
    if (final / "adapter_config.json").exists():
        model = load_adapter_model(run_dir)
    else:
        trust = bool((job.get("model") or {}).get("trust_remote_code", False))
        model = AutoModelForCausalLM.from_pretrained(final, use_safetensors=True, trust_remote_code=trust)
    tokenizer = AutoTokenizer.from_pretrained(final)
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval(), tokenizer


def prompt_of(row: object, where: str) -> list[dict] | str:
    """What a row asks the model to continue: its conversation up to the last assistant turn, or its prompt."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: a prompt row must be a JSON object, not a {type(row).__name__}")
    if isinstance(row.get("messages"), list):
        messages = list(row["messages"])
        while messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            messages.pop()  # the reference answer: the model is to write its own
        if not messages:
            raise UserError(f"{where}: 'messages' holds no turn before the assistant's; give a user turn")
        return messages
    if isinstance(row.get("prompt"), list | str):
        return row["prompt"]
    if isinstance(row.get("instruction"), str):
        text = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return [{"role": "user", "content": text}]
    raise UserError(
        f"{where}: a prompt row needs 'messages', 'prompt' (a conversation or text) or 'instruction'; "
        f"it has {sorted(row) or 'no keys'}"
    )


def render(tokenizer: PreTrainedTokenizerBase, prompt: list[dict] | str, where: str) -> torch.Tensor:
    """Token ids [1, L] of a prompt: a conversation through the chat template, text as it is."""
    if isinstance(prompt, str):
        return tokenizer(prompt, return_tensors="pt")["input_ids"]
    if not tokenizer.chat_template:
        raise UserError(
            f"{where}: a conversation, but the model's tokenizer has no chat template (a base model?); "
            'give plain-text prompts ({"prompt": "..."}), or train it with SFT first'
        )
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


@torch.no_grad()
def answer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    streamer=None,
) -> str:
    """The model's reply to prompt ids: greedy at temperature 0, else sampled; special tokens stripped."""
    ids = ids.to(model.device)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        streamer=streamer,
        **sampling,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def generate_file(
    run_dir: Path, prompts: Path, out: Path, max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0
) -> int:
    """Answer every row of a JSONL/JSON/Parquet file of prompts; write each row with its `response` to `out`.

    `out` appears whole or not at all (written beside it, then renamed). Returns the number of rows.
    """
    from transformers import set_seed

    from tuneyard.training.data.sources import rows_of_file

    checked_run(run_dir)  # a wrong folder answers before the prompts are read
    rows = rows_of_file(str(prompts), "--prompts")
    if not rows:
        raise UserError(f"--prompts: {prompts} holds no rows")
    asked = [prompt_of(row, where) for row, where in rows]  # every row checked before the model loads
    model, tokenizer = load_run_model(run_dir)
    set_seed(seed)
    out = Path(out)
    staging = out.with_name(out.name + ".partial")
    try:
        staging.parent.mkdir(parents=True, exist_ok=True)
        handle = open(staging, "w", encoding="utf-8")
    except OSError as exc:
        raise UserError(f"--out: cannot write '{out}' ({exc.strerror}); give a file path in a writable place") from None
    started = time.monotonic()
    with handle:
        for done, ((row, where), prompt) in enumerate(zip(rows, asked, strict=True), start=1):
            response = answer(model, tokenizer, render(tokenizer, prompt, where), max_new_tokens, temperature)
            handle.write(json.dumps({**row, "response": response}, ensure_ascii=False) + "\n")
            rate = done / max(time.monotonic() - started, 1e-9)
            eta = (len(rows) - done) / rate
            print(f"\rgenerate: {done}/{len(rows)} rows | {rate:.1f} rows/s | ETA {eta:.0f} s", end="", file=sys.stderr)
    print(file=sys.stderr)
    staging.replace(out)
    return len(rows)


HELP = "/reset starts a new conversation, /exit (or Ctrl-D) ends"


def chat(run_dir: Path, max_new_tokens: int = 256, temperature: float = 0.7, system: str | None = None) -> None:
    """An interactive chat with the run's model on stdin/stdout, the reply streamed token by token."""
    from transformers import TextStreamer

    model, tokenizer = load_run_model(run_dir)
    if not tokenizer.chat_template:
        raise UserError(
            f"{Path(run_dir) / 'final'}: the tokenizer has no chat template (a base model?), so there is no chat "
            "to have; use `tuneyard generate` with plain-text prompts, or train it with SFT first"
        )
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    print(f"chatting with {Path(run_dir) / 'final'}; {HELP}", flush=True)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print(flush=True)
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = list(start)
            print("(a new conversation)", flush=True)
            continue
        if not line:
            continue
        if line.startswith("/"):
            print(f"unknown command {line}; {HELP}", flush=True)
            continue
        history.append({"role": "user", "content": line})
        print("model> ", end="", flush=True)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        reply = answer(model, tokenizer, render(tokenizer, history, "chat"), max_new_tokens, temperature, streamer)
        history.append({"role": "assistant", "content": reply})
