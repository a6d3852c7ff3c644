"""Program-checked figures for the preference stages, computed on the driver from model folders."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tuneyard.rlhf.rewards import RewardFn, text_of
from tuneyard.rlhf.trl_rows import as_messages, unpair
from tuneyard.training.answer_accuracy import greedy_answer


def answer_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: list[dict], completion: list[dict]
) -> tuple[torch.Tensor, int]:
    """The ids of prompt plus completion (chat-rendered when the tokenizer has a template), and the prompt's length."""
    if tokenizer.chat_template:
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    else:
        prompt_text = "\n".join(m["content"] for m in prompt)
        full_text = prompt_text + text_of(completion)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    return torch.tensor([tokenizer(full_text, add_special_tokens=False)["input_ids"]]), len(prompt_ids)


@torch.no_grad()
def completion_logprob(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: list[dict], completion: list[dict]
) -> float:
    """Summed log-probability of the completion's tokens after the chat-rendered prompt."""
    ids, start = answer_ids(tokenizer, prompt, completion)
    ids = ids.to(model.device)
    logps = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    token_logps = logps.gather(-1, targets[:, None])[:, 0]
    return float(token_logps[start - 1 :].sum())


def preference_figures(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[dict]) -> dict:
    """Mean chosen-minus-rejected log-prob margin, and how often the greedy answer is the chosen one."""
    model.eval()
    margins, correct = [], 0
    for row in rows:
        prompt = as_messages(row["prompt"], "user")
        chosen, rejected = as_messages(row["chosen"], "assistant"), as_messages(row["rejected"], "assistant")
        margins.append(
            completion_logprob(model, tokenizer, prompt, chosen)
            - completion_logprob(model, tokenizer, prompt, rejected)
        )
        correct += greedy_answer(model, tokenizer, prompt) == text_of(chosen).strip()
    return {"logp margin": sum(margins) / len(margins), "greedy = chosen": correct / len(rows)}


def feedback_figures(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[dict]) -> dict:
    """Mean log-prob of the desirable completions minus the undesirable ones', and how often greedy is desirable."""
    # the gap's change from the starting model to final/, times kto.beta, is KTO's implicit reward gap on these
    # rows: its reward is beta x the log-prob ratio to the reference, which is the starting model
    model.eval()
    rows = unpair(rows)
    logps: dict[bool, list[float]] = {True: [], False: []}
    desirable: dict[str, tuple[list[dict], set[str]]] = {}  # prompt -> (its messages, its desirable answers)
    for row in rows:
        prompt, completion = as_messages(row["prompt"], "user"), as_messages(row["completion"], "assistant")
        logps[row["label"]].append(completion_logprob(model, tokenizer, prompt, completion))
        if row["label"]:
            desirable.setdefault(repr(prompt), (prompt, set()))[1].add(text_of(completion).strip())
    if not logps[True] or not logps[False]:
        return {}  # no gap to measure with only one kind of feedback
    hits = [greedy_answer(model, tokenizer, prompt) in answers for prompt, answers in desirable.values()]
    return {
        "logp gap": sum(logps[True]) / len(logps[True]) - sum(logps[False]) / len(logps[False]),
        "greedy desirable": sum(hits) / len(hits),
    }


def greedy_answer_figures(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict],
    functions: list[tuple[RewardFn, float]],
    max_new_tokens: int = 16,
    replies: list[str] | None = None,
) -> dict[str, float]:
    """The mean weighted reward of the model's greedy answers to the rows' prompts ("greedy reward"), and where the
    first reward function is a 0/1 check (e.g. last_word_exact) the share it passes: the task's accuracy. `replies`:
    the answers already drawn (a multi-turn episode's final answers); None: one greedy answer each."""
    model.eval()
    prompts = [as_messages(row["prompt"], "user") for row in rows]
    if replies is None:
        replies = [greedy_answer(model, tokenizer, p, max_new_tokens) for p in prompts]
    answers = [[{"role": "assistant", "content": reply}] for reply in replies]
    total = [0.0] * len(rows)
    per_function = []
    for fn, weight in functions:
        values = fn(prompts=prompts, completions=answers)
        per_function.append(values)
        for i, value in enumerate(values):
            total[i] += weight * value
    figures = {"greedy reward": sum(total) / len(total)}
    if set(per_function[0]) <= {0.0, 1.0}:
        figures["task acc."] = sum(per_function[0]) / len(rows)
    return figures


@torch.no_grad()
def reward_model_figures(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[dict]) -> dict:
    """Pair accuracy (chosen scored above rejected) and mean score margin of a reward model."""
    model.eval()
    wins, margins = 0, []
    for row in rows:
        prompt = as_messages(row["prompt"], "user")
        scores = []
        for side in ("chosen", "rejected"):
            text = tokenizer.apply_chat_template(prompt + as_messages(row[side], "assistant"), tokenize=False)
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            scores.append(float(model(ids).logits[0, 0]))
        wins += scores[0] > scores[1]
        margins.append(scores[0] - scores[1])
    return {"pair accuracy": wins / len(rows), "score margin": sum(margins) / len(margins)}


@torch.no_grad()
def teacher_kl(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict],
    max_new_tokens: int = 16,
) -> float:
    """Mean per-token KL(teacher || student) over the answers to the rows' prompts, in nats.

    The answer is a `messages` row's last assistant turn, or for a prompt-only row the teacher's greedy answer: a
    fixed text, so the figures of the starting student and of final/ are measured on the same tokens.
    """
    from tuneyard.rlhf.trl_rows import prompt_of

    student.eval()
    teacher.eval()
    total, tokens = 0.0, 0
    for row in rows:
        prompt = as_messages(prompt_of(row), "user")
        if "messages" in row:
            answer = row["messages"][len(prompt)]["content"]
        else:
            answer = greedy_answer(teacher, tokenizer, prompt, max_new_tokens)
        ids, start = answer_ids(tokenizer, prompt, [{"role": "assistant", "content": answer}])
        # the positions that predict the answer's tokens (and the turn's end marker the template adds)
        teacher_logps = torch.log_softmax(teacher(ids).logits[0, start - 1 : -1].float(), dim=-1)
        student_logps = torch.log_softmax(student(ids).logits[0, start - 1 : -1].float(), dim=-1)
        total += float((teacher_logps.exp() * (teacher_logps - student_logps)).sum())
        tokens += teacher_logps.shape[0]
    return total / max(tokens, 1)
