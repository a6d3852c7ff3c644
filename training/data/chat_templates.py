"""data.chat_template: which template renders conversations, the tokens it needs, and where a turn ends."""

from __future__ import annotations

import copy
import re
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from tuneyard.training.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# ChatML (OpenAI, Qwen, many fine-tunes); TRL ships the model families' own templates beside it
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# the markers templates use as single tokens: <|im_start|>, <|eot_id|>, <start_of_turn>, ...
SPECIAL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]{1,40}\|>|<(?:start|end)_of_turn>")
SENTINEL = "tuneyard-answer-ends-here"


def shipped_templates() -> list[str]:
    """Names of the templates TRL ships (llama3, qwen3, gemma, ...) plus chatml."""
    folder = resources.files("trl") / "chat_templates"
    names = [p.name.removesuffix(".jinja") for p in folder.iterdir() if p.name.endswith(".jinja")]
    return sorted({"chatml", *names})


def resolve_chat_template(choice: str) -> str:
    """The Jinja text of data.chat_template: chatml, a name TRL ships, or a .jinja file."""
    if choice == "chatml":
        return CHATML
    path = Path(choice).expanduser()
    if choice.endswith(".jinja") or path.is_file():
        if not path.is_file():
            raise UserError(f"data.chat_template: the file '{choice}' does not exist; give a .jinja file or a name")
        return path.read_text(encoding="utf-8")
    shipped = resources.files("trl") / "chat_templates" / f"{choice}.jinja"
    if not shipped.is_file():
        raise UserError(
            f"data.chat_template: '{choice}' is not a template name or a file; names are "
            f"{', '.join(shipped_templates())}; or give the path of a .jinja file"
        )
    return shipped.read_text(encoding="utf-8")


def use_chat_template(tokenizer: PreTrainedTokenizerBase, choice: str) -> list[str]:
    """Give `tokenizer` the chosen template; add the marker tokens it uses that the vocabulary lacks.

    Returns the added tokens: the model's embeddings must grow by as many rows (tuneyard.training.model.load_model).
    """
    template = resolve_chat_template(choice)
    tokenizer.chat_template = template
    vocab = tokenizer.get_vocab()
    missing = sorted({token for token in SPECIAL_TOKEN.findall(template) if token not in vocab})
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return missing


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The special token the chat template puts right after an assistant answer, or None without a template."""
    if not tokenizer.chat_template:
        return None
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": SENTINEL}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    after = text[text.rindex(SENTINEL) + len(SENTINEL) :]
    special = set(tokenizer.all_special_ids)
    for token_id in tokenizer(after, add_special_tokens=False)["input_ids"]:
        if token_id in special:
            return token_id
    return None


def stop_at_end_of_turn(folder: Path, model: object, tokenizer: PreTrainedTokenizerBase) -> None:
    """Write `folder`/generation_config.json so generation stops at the template's end-of-turn token.

    A base model's config stops at its end-of-text token only, which a chat model rarely emits after an answer:
    the classic "the model never stops" after chat fine-tuning.
    """
    end = end_of_turn_id(tokenizer)
    config = getattr(model, "generation_config", None)  # None for a classifier (a reward model)
    if end is None or config is None:
        return
    config = copy.deepcopy(config)
    eos = config.eos_token_id
    stops = [end, *(eos if isinstance(eos, list) else [] if eos is None else [eos])]
    config.eos_token_id = list(dict.fromkeys(stops))
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    config.save_pretrained(folder)
