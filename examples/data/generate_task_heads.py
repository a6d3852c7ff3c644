"""Regenerate the shipped GENERATED data of the task-head stages (classify, token-classify).

Every row here is made up by this script from templates and word lists, not collected from people:
- sentiment-generated-{train,eval}.jsonl: {text, label} reviews, label positive / negative / neutral.
  Negations ("was not great", "anything but awful"), turns ("looked great at first but in the end it was
  awful": the clause after "but" decides) and factual sentences with no opinion make the set more than a
  bag of opinion words.
- ner-generated-{train,eval}.jsonl: {tokens, tags} sentences tagged in BIO with PER, LOC and ORG, multi-word
  entities included; a third of the eval names never occur in train.

Run `python examples/data/generate_task_heads.py` to rebuild; the output is deterministic for a given seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

SUBJECTS = [
    "the pasta", "this phone", "the hotel room", "our waiter", "the movie", "the delivery", "customer support",
    "the battery", "this book", "the concert", "the laptop", "the coffee", "the tour guide", "the app",
    "the headphones", "the train ride", "the museum", "the new update", "the mattress", "the pizza",
    "the camera", "the checkout process", "the soundtrack", "the staff", "this jacket", "the sequel",
]  # fmt: skip
POSITIVE = [
    "great", "wonderful", "excellent", "delightful", "superb", "fantastic", "lovely", "reliable", "impressive",
    "charming", "brilliant", "comfortable", "friendly", "fast", "tasty", "helpful", "solid", "gorgeous",
]  # fmt: skip
NEGATIVE = [
    "awful", "terrible", "disappointing", "dreadful", "broken", "rude", "bland", "useless", "overpriced",
    "boring", "slow", "noisy", "flimsy", "confusing", "stale", "unreliable", "dirty", "painful",
]  # fmt: skip
INTENSIFIERS = ["", "", "really ", "very ", "truly ", "quite ", "absolutely ", "incredibly "]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
FRIENDS = ["my sister", "a colleague", "my parents", "two friends", "my neighbour", "the kids"]
TIMES = ["last week", "in March", "two days ago", "on my birthday", "yesterday", "this morning"]

POSITIVE_TEMPLATES = [
    "{S} was {i}{p}.",
    "I really loved {s}, it was {p}.",
    "{S} was not {n} at all.",
    "Honestly, {s} was {i}{p}; would recommend.",
    "Five stars: {s} was {p} and exceeded my expectations.",
    "{S} was a bit {n} at first but in the end it was {i}{p}.",
    "What a {p} experience, {s} made my day!",
    "I was worried, yet {s} turned out {p}.",
    "No complaints, {s} was {p}.",
    "{S} could not have been more {p}.",
    "I would not call {s} {n}, far from it.",
    "{S} was anything but {n}.",
    "Nobody could say {s} was {n}.",
    "I expected {s} to be {n}, but it was not.",
]
NEGATIVE_TEMPLATES = [
    "{S} was {i}{n}.",
    "I regret choosing {s}; it was {n}.",
    "{S} was not {p} at all.",
    "Never again: {s} was {i}{n}.",
    "One star, {s} was {n} and nobody cared.",
    "{S} looked {p} at first but in the end it was {i}{n}.",
    "What a {n} experience, {s} ruined my day.",
    "I had high hopes, yet {s} turned out {n}.",
    "Sadly {s} was {n}.",
    "{S} could not have been more {n}.",
    "I would not call {s} {p}, far from it.",
    "{S} was anything but {p}.",
    "Nobody could say {s} was {p}.",
    "I expected {s} to be {p}, but it was not.",
]
NEUTRAL_TEMPLATES = [
    "{S} arrived on {d}.",
    "I tried {s} {t}.",
    "We went to {s} with {f} {t}.",
    "{S} comes in three sizes.",
    "I am writing about {s} I ordered {t}.",
    "{S} was delivered to the front desk on {d}.",
    "Has anyone else tried {s}?",
    "{S} is listed under the spring collection.",
    "My order number for {s} ends in {k}.",
    "{S} was replaced by a newer model {t}.",
]
LABELLED_TEMPLATES = {"positive": POSITIVE_TEMPLATES, "negative": NEGATIVE_TEMPLATES, "neutral": NEUTRAL_TEMPLATES}


def review(rng: random.Random, label: str) -> str:
    """One made-up review of `label`'s sentiment."""
    subject = rng.choice(SUBJECTS)
    text = rng.choice(LABELLED_TEMPLATES[label]).format(
        s=subject,
        S=subject[0].upper() + subject[1:],
        p=rng.choice(POSITIVE),
        n=rng.choice(NEGATIVE),
        i=rng.choice(INTENSIFIERS),
        d=rng.choice(DAYS),
        t=rng.choice(TIMES),
        f=rng.choice(FRIENDS),
        k=rng.randint(10, 99),
    )
    if rng.random() < 0.15:
        text = text.lower()
    if rng.random() < 0.1 and text.endswith("."):
        text = text[:-1] + "!"
    return text


FIRST = [
    "Anna", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kofi", "Lucia",
    "Marek", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wei", "Yusuf",
]  # fmt: skip
LAST = ["Smith", "Garcia", "Okafor", "Novak", "Tanaka", "Larsen", "Rossi", "Dubois", "Kim", "Mendes", "Weber"]
PLACES = [
    "Paris", "Lagos", "Oslo", "Lima", "Toronto", "Nairobi", "Kyoto", "Porto", "Dublin", "Denver", "New York",
    "Buenos Aires", "Cape Town", "Hong Kong", "San Diego", "Rio de Janeiro", "Kuala Lumpur", "Tel Aviv",
]  # fmt: skip
ORGS = [
    "Acme Corp", "Globex", "United Nations", "Red Cross", "Bank of Ireland", "Northwind Traders", "Initech",
    "World Health Organization", "Stark Industries", "Blue Harbor Shipping", "Apex Labs", "Zenith Media",
    "City Council", "Open Data Institute", "Greenleaf Foods", "Polar Airlines",
]  # fmt: skip
NER_TEMPLATES = [
    "{PER} works for {ORG} in {LOC} .",
    "{ORG} opened a new office in {LOC} last year .",
    "Yesterday {PER} met {PER} at the {ORG} headquarters .",
    "{PER} flew from {LOC} to {LOC} on Friday .",
    "According to {PER} , {ORG} will hire two hundred people .",
    "The mayor of {LOC} thanked {ORG} for the donation .",
    "{PER} joined {ORG} after ten years in {LOC} .",
    "Shares of {ORG} rose sharply on Monday .",
    "{PER} and {PER} grew up in {LOC} .",
    "A spokesperson for {ORG} said the talks in {LOC} went well .",
    "It rained all week , so we stayed inside .",
    "The meeting was moved to Thursday afternoon .",
    "{PER} wrote a book about {LOC} .",
    "Last summer {ORG} sponsored a festival in {LOC} .",
    "{PER} , a lawyer from {LOC} , represented {ORG} .",
    "Officials at {ORG} declined to comment .",
]


def entity(rng: random.Random, kind: str, held_out: bool) -> list[str]:
    """The words of one entity of `kind`; `held_out` draws from the part of each list train never sees."""

    def pick(items: list[str]) -> str:
        cut = len(items) * 2 // 3
        return rng.choice(items[cut:] if held_out else items[:cut])

    if kind == "PER":
        words = [pick(FIRST)]
        if rng.random() < 0.6:
            words.append(pick(LAST))
        return words
    return pick(PLACES if kind == "LOC" else ORGS).split()


def sentence(rng: random.Random, held_out_share: float) -> dict:
    """One BIO-tagged sentence: {tokens, tags}."""
    tokens, tags = [], []
    for word in rng.choice(NER_TEMPLATES).split():
        kind = word.strip("{}") if word.startswith("{") else None
        if kind is None:
            tokens.append(word)
            tags.append("O")
            continue
        words = entity(rng, kind, rng.random() < held_out_share)
        tokens += words
        tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)
    return {"tokens": tokens, "tags": tags}


def write_jsonl(name: str, rows: list[dict]) -> None:
    """Write rows, one JSON object per line, beside this script."""
    (HERE / name).write_text("".join(json.dumps(row) + "\n" for row in rows))


def main(seed: int = 11) -> None:
    """Write the four generated files."""
    rng = random.Random(seed)
    labels = ["positive", "negative", "neutral"]
    for split, count in (("train", 2400), ("eval", 300)):
        rows = [{"text": review(rng, label), "label": label} for label in (rng.choice(labels) for _ in range(count))]
        write_jsonl(f"sentiment-generated-{split}.jsonl", rows)
    write_jsonl("ner-generated-train.jsonl", [sentence(rng, 0.0) for _ in range(1500)])
    write_jsonl("ner-generated-eval.jsonl", [sentence(rng, 0.33) for _ in range(300)])


if __name__ == "__main__":
    main()
