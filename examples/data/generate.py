"""Regenerate the shipped synthetic data: a small English-like corpus and an instruction task.

Everything here is generated: the corpus, the last-word task, its preference pairs, its unpaired feedback
(last-word-feedback-*.jsonl: the pairs taken apart into desirable and undesirable rows, for KTO) and its prompts.

The instruction task ("name the last word of a list") is checkable by a program, so the demo and
tests can measure learning without humans. Run `python examples/data/generate.py` to rebuild;
the output is deterministic for a given seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "grey", "orange", "purple"]
ANIMALS = ["fox", "cat", "dog", "owl", "bear", "wolf", "hare", "deer", "crow", "frog", "mouse", "horse"]
TOWNS = ["Oakford", "Riverton", "Millbrook", "Stonehill", "Ashby", "Fernvale", "Kingsbridge", "Marlow"]
NAMES = ["Ana", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jade", "Kai", "Lena"]
FOODS = ["apples", "bread", "cheese", "fish", "berries", "nuts", "honey", "rice", "soup", "plums"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
VERBS = ["sees", "likes", "follows", "finds", "helps", "meets", "watches", "calls"]
WORDS = (
    COLORS
    + ANIMALS
    + FOODS
    + [n.lower() for n in NAMES]
    + ["river", "stone", "tree", "lamp", "boat", "road", "hill", "door", "cloud", "field"]
)


def _sentence(rng: random.Random) -> str:
    """One templated sentence about the small world."""
    name, other = rng.sample(NAMES, 2)
    color, animal, town = rng.choice(COLORS), rng.choice(ANIMALS), rng.choice(TOWNS)
    food, number, verb = rng.choice(FOODS), rng.choice(NUMBERS), rng.choice(VERBS)
    listed = rng.sample(WORDS, rng.randint(2, 5))
    templates = [
        f"The {color} {animal} lives in {town}.",
        f"{name} {verb} the {color} {animal} near {town}.",
        f"Every morning {name} eats {number} {food}.",
        f"In {town} the {animal}s like {food}.",
        f"{name} and {other} walk to {town} with a {color} bag.",
        f"{name} wrote a list: {' '.join(listed)}. The last word was {listed[-1]}.",
        f"{other} read the words {' '.join(listed)} and said {listed[-1]} at the end.",
        f"The {animal} has {number} {color} spots.",
        f"{name} {verb} {other} because the {animal} ran away.",
    ]
    return rng.choice(templates)


def make_corpus(rng: random.Random, documents: int) -> list[str]:
    """Documents of a few sentences each, one per line."""
    return [" ".join(_sentence(rng) for _ in range(rng.randint(3, 8))) for _ in range(documents)]


def make_last_word_task(rng: random.Random, count: int) -> list[dict]:
    """Chat examples: the user lists words, the assistant answers with the last one."""
    rows = []
    for _ in range(count):
        words = rng.sample(WORDS, rng.randint(2, 6))
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Say the last word: {' '.join(words)}"},
                    {"role": "assistant", "content": words[-1]},
                ]
            }
        )
    return rows


def make_last_word_preferences(rng: random.Random, count: int) -> list[dict]:
    """Preference pairs: the right last word is chosen, another word of the list (or a near miss) rejected."""
    rows = []
    for _ in range(count):
        words = rng.sample(WORDS, rng.randint(2, 6))
        wrong = rng.choice(words[:-1] + [rng.choice([w for w in WORDS if w not in words])])
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"Say the last word: {' '.join(words)}"}],
                "chosen": [{"role": "assistant", "content": words[-1]}],
                "rejected": [{"role": "assistant", "content": wrong}],
            }
        )
    return rows


def make_last_word_feedback(pairs: list[dict], rng: random.Random) -> list[dict]:
    """Unpaired feedback for KTO from preference pairs: chosen -> a desirable row, rejected -> an undesirable one."""
    rows = []
    for pair in pairs:
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    rng.shuffle(rows)  # feedback arrives unpaired: a pair's two halves rarely side by side, labels mixed
    return rows


def make_last_word_prompts(rng: random.Random, count: int) -> list[dict]:
    """Prompts alone, for online RL: a reward function checks the answer (rlhf/rewards.py)."""
    return [
        {
            "prompt": [
                {"role": "user", "content": f"Say the last word: {' '.join(rng.sample(WORDS, rng.randint(2, 6)))}"}
            ]
        }
        for _ in range(count)
    ]


def make_format_samples(rng: random.Random, count: int) -> dict[str, list[dict]]:
    """The last-word task in the shapes users bring from other tools (see data.format and data.columns)."""
    alpaca, sharegpt, tools, columns = [], [], [], []
    for i in range(count):
        words = rng.sample(WORDS, rng.randint(2, 6))
        ask, answer = f"Say the last word: {' '.join(words)}", words[-1]
        earlier = rng.sample(WORDS, 3)
        row = {"instruction": "Say the last word:", "input": " ".join(words), "output": answer}
        if i % 3 == 0:
            row["system"] = "You answer with one word."
        if i % 4 == 0:
            row["history"] = [[f"Say the last word: {' '.join(earlier)}", earlier[-1]]]
        alpaca.append(row)
        turns = [{"from": "human", "value": ask}, {"from": "gpt", "value": answer}]
        sharegpt.append({"conversations": turns, **({"system": "You answer with one word."} if i % 2 else {})})
        call = {"id": f"call_{i}", "type": "function", "function": {"name": "last_word", "arguments": {"words": words}}}
        tools.append(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": ask}]},  # OpenAI content parts
                    {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "content": answer, "tool_call_id": f"call_{i}"},
                    {"role": "assistant", "content": answer},
                ],
                "tools": [LAST_WORD_TOOL],
            }
        )
        columns.append({"question": ask, "answer": answer, "id": i})
    return {"alpaca": alpaca, "sharegpt": sharegpt, "tools": tools, "columns": columns}


LAST_WORD_TOOL = {
    "type": "function",
    "function": {
        "name": "last_word",
        "description": "The last word of a list of words.",
        "parameters": {
            "type": "object",
            "properties": {"words": {"type": "array", "items": {"type": "string"}}},
            "required": ["words"],
        },
    },
}


def calculator_call(expression: str) -> str:
    """An assistant turn that calls the `calculate` tool on `expression`, in the Hermes format (compact JSON: every
    character is a token of the tiny tokenizer)."""
    call = {"name": "calculate", "arguments": {"expression": expression}}
    return f"<tool_call>{json.dumps(call, separators=(',', ':'))}</tool_call>"


def make_calculator_task(rng: random.Random, sft: int, prompts: int, held_out: int) -> dict[str, list[dict]]:
    """The calculator task: "What is A + B?" for four-digit A and B, which a tiny model cannot add from its weights;
    it answers right by calling the `calculate` tool and repeating its result. Two SFT rows in five show that: the
    call, the tool's turn, the answer. The other three answer at once with an estimate (the sum to the nearest
    hundred), as a model does that answers from memory where it should look up: SFT teaches the call's format and
    both habits, and RL is left to learn when the tool is needed. The RL and held-out prompts ask questions no SFT
    row asks."""
    drawn: dict[tuple[int, int], None] = {}
    while len(drawn) < sft + prompts + held_out:
        drawn[(rng.randint(1000, 9999), rng.randint(1000, 9999))] = None
    questions = list(drawn)

    def prompt(a: int, b: int) -> list[dict]:
        return [{"role": "user", "content": f"What is {a} + {b}?"}]

    def conversation(a: int, b: int, with_tool: bool) -> dict:
        value = str(a + b)
        if not with_tool:
            return {"messages": prompt(a, b) + [{"role": "assistant", "content": f"about {round(a + b, -2)}"}]}
        turns = [
            {"role": "assistant", "content": calculator_call(f"{a}+{b}")},
            {"role": "tool", "content": value},
            {"role": "assistant", "content": value},
        ]
        return {"messages": prompt(a, b) + turns}

    return {
        "calculator-train.jsonl": [conversation(*q, with_tool=i % 5 < 2) for i, q in enumerate(questions[:sft])],
        "calculator-prompts-train.jsonl": [{"prompt": prompt(*q)} for q in questions[sft : sft + prompts]],
        "calculator-prompts-eval.jsonl": [{"prompt": prompt(*q)} for q in questions[sft + prompts :]],
    }


def write_jsonl(name: str, rows: list[dict]) -> None:
    """One JSON object per line."""
    with open(HERE / name, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    """Write the corpus, the SFT task, its preference pairs and its prompts (train and eval splits)."""
    rng = random.Random(1234)
    (HERE / "corpus.txt").write_text("\n".join(make_corpus(rng, 3000)) + "\n")
    (HERE / "corpus-eval.txt").write_text("\n".join(make_corpus(rng, 150)) + "\n")
    for name, count in [("last-word-train.jsonl", 2000), ("last-word-eval.jsonl", 100)]:
        write_jsonl(name, make_last_word_task(rng, count))
    # a second generator, so the files above stay byte-identical to the first release
    rng = random.Random(4321)
    pref_train, pref_eval = make_last_word_preferences(rng, 1000), make_last_word_preferences(rng, 100)
    write_jsonl("last-word-pref-train.jsonl", pref_train)
    write_jsonl("last-word-pref-eval.jsonl", pref_eval)
    write_jsonl("last-word-prompts-train.jsonl", make_last_word_prompts(rng, 400))
    write_jsonl("last-word-prompts-eval.jsonl", make_last_word_prompts(rng, 50))
    # KTO's feedback is the pairs above taken apart, with a generator of its own, so no file above changes
    feedback_rng = random.Random(8642)
    write_jsonl("last-word-feedback-train.jsonl", make_last_word_feedback(pref_train, feedback_rng))
    write_jsonl("last-word-feedback-eval.jsonl", make_last_word_feedback(pref_eval, feedback_rng))
    samples = make_format_samples(random.Random(2468), 64)
    (HERE / "formats").mkdir(exist_ok=True)
    (HERE / "formats" / "alpaca.json").write_text(json.dumps(samples["alpaca"], indent=1) + "\n")  # one JSON array
    write_jsonl("formats/sharegpt.jsonl", samples["sharegpt"])
    write_jsonl("formats/tools.jsonl", samples["tools"])
    write_jsonl("formats/columns.jsonl", samples["columns"])
    for name, rows in make_calculator_task(random.Random(9753), sft=3000, prompts=400, held_out=50).items():
        write_jsonl(name, rows)


if __name__ == "__main__":
    main()
