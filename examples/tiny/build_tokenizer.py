"""Train the tiny BPE tokenizer used by the demo and the tests, from the shipped text.

`python examples/tiny/build_tokenizer.py` rewrites examples/tiny/tokenizer/ (a Hugging Face
tokenizer folder with a chat template). Training is deterministic, so the result is identical
to the committed folder; tests check that.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "data"
VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
# Plain Jinja: each turn is `<|role|> content<|end|>\n`. The space before the content makes an answer
# word tokenize as it does mid-sentence ('Ġcat'); the generation prompt stops at the tag so the
# model, not the prompt, emits that space-led token. `<|end|>` is the eos: generation stops there.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def training_text() -> list[str]:
    """Lines of the shipped corpus and of the instruction task."""
    lines = (DATA / "corpus.txt").read_text().splitlines()
    for name in ["last-word-train.jsonl"]:
        for row in (DATA / name).read_text().splitlines():
            lines.extend(m["content"] for m in json.loads(row)["messages"])
    return lines


def build_tokenizer(out_dir: Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on the shipped text and save it as a HF tokenizer folder."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|end|>",
        extra_special_tokens={},
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 4096
    fast.save_pretrained(out_dir)
    return fast


if __name__ == "__main__":
    build_tokenizer(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "tokenizer")
