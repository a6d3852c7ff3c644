"""Preference stages: DPO maths against TRL, the LoRA reference, bad preference input, and learning
under real Ray + DeepSpeed ZeRO-3 with 2 workers (reward model, DPO, GRPO)."""

from __future__ import annotations

import json
import math

import datasets
import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import AutoModelForCausalLM

from tests.conftest import EXAMPLES, job_dict
from tuneyard.launch.config import job_from_dict
from tuneyard.launch.preflight import preflight
from tuneyard.launch.run_job import run_job
from tuneyard.rlhf.losses import dpo_loss, trl_loss_terms
from tuneyard.rlhf.preference_recipe import check_reward_model
from tuneyard.rlhf.rewards import REGISTRY, calculator_exact, last_word_exact, lookup
from tuneyard.rlhf.trl_rows import to_trl_rows
from tuneyard.training.config import ModelConfig, PeftSection
from tuneyard.training.data.formats import normalize_row
from tuneyard.training.errors import UserError
from tuneyard.training.finetune_method import apply_finetune_method, lora_config
from tuneyard.training.metrics import read_metrics
from tuneyard.training.model import load_tokenizer

DATA = EXAMPLES / "data"
PREFERENCE_JOB = {
    "stage": "dpo",
    "model": {"name_or_path": "set-by-test"},
    "data": {
        "format": "preference",
        "train": str(DATA / "last-word-pref-train.jsonl"),
        "eval": str(DATA / "last-word-pref-eval.jsonl"),
        "max_length": 128,
    },
    "training": {"batch_size": 8, "seed": 7, "precision": "fp32"},
    "deepspeed": {"zero_stage": 3},
    "cluster": {"workers": 2},
    "output": {"dir": "set-by-test"},
}


def test_dpo_loss_by_hand():
    one = torch.tensor
    # policy gains 1 nat on chosen, loses 1 on rejected, against the reference: delta = 2
    args = (one([-1.0]), one([-3.0]), one([-2.0]), one([-2.0]))
    assert dpo_loss(*args, beta=0.5).item() == pytest.approx(math.log(1 + math.exp(-1)))  # -log sigmoid(1)
    cdpo = 0.9 * math.log(1 + math.exp(-1)) + 0.1 * math.log(1 + math.exp(1))
    assert dpo_loss(*args, beta=0.5, label_smoothing=0.1).item() == pytest.approx(cdpo)
    assert dpo_loss(*args, beta=0.5, loss_type="hinge").item() == 0.0
    ipo = dpo_loss(*args, beta=0.5, loss_type="ipo", chosen_tokens=one([2.0]), rejected_tokens=one([4.0]))
    assert ipo.item() == pytest.approx((1 / 2 + 1 / 4 - 1) ** 2)


def test_cdpo_and_rpo_map_onto_trl_terms():
    assert trl_loss_terms("ipo", 0.0) == (["ipo"], None)
    types, weights = trl_loss_terms("sigmoid", 0.1)
    assert types == ["sigmoid", "robust"] and weights == pytest.approx([1.8, -0.8])
    assert trl_loss_terms("sigmoid", 0.0, sft_weight=0.5) == (["sigmoid", "sft"], [1.0, 0.5])


def completion_logps(model, batch) -> torch.Tensor:
    """Summed log-probs of the completion tokens, computed here from TRL's own batch."""
    kwargs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    logits = model(**kwargs).logits[:, :-1].float()
    token_logps = F.log_softmax(logits, -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return (token_logps * batch["completion_mask"][:, 1:]).sum(-1)


def test_lora_dpo_has_no_second_copy_and_trl_loss_equals_the_math(pretrained_base, tmp_path):
    from trl import DPOConfig, DPOTrainer

    tokenizer = load_tokenizer(ModelConfig(name_or_path=pretrained_base))
    base = AutoModelForCausalLM.from_pretrained(pretrained_base)
    base_params = sum(p.numel() for p in base.parameters())
    peft = PeftSection(method="lora", r=4, alpha=8)
    model = apply_finetune_method(base, peft, wrap_adapter=False)  # as rlhf/preference_recipe.py does for DPO
    rows = [
        normalize_row(json.loads(line), "preference", "eval")
        for line in (DATA / "last-word-pref-eval.jsonl").read_text().splitlines()[:4]
    ]
    types, weights = trl_loss_terms("sigmoid", 0.1)
    args = DPOConfig(
        output_dir=str(tmp_path),
        beta=0.5,
        loss_type=types,
        loss_weights=weights,
        label_smoothing=0.1,
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to="none",
        max_length=128,
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        processing_class=tokenizer,
        peft_config=lora_config(peft),
        train_dataset=datasets.Dataset.from_list(to_trl_rows("dpo", rows, conversational=True)),
    )
    with torch.no_grad():  # move the fresh adapter away from zero, so the policy differs from its reference
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))

    # the reference is the base with the adapter disabled: no reference model, no cloned "ref" adapter
    assert trainer.ref_model is None and list(trainer.model.peft_config) == ["default"]
    lora = sum(p.numel() for n, p in trainer.model.named_parameters() if "lora_" in n)
    assert sum(p.numel() for p in trainer.model.parameters()) == base_params + lora

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        policy = completion_logps(trainer.model, batch)
        with trainer.model.disable_adapter():
            reference = completion_logps(trainer.model, batch)
    (pc, pr), (rc, rr) = policy.chunk(2), reference.chunk(2)
    assert not torch.allclose(policy, reference)
    expected = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="sigmoid", label_smoothing=0.1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_bad_preference_rows_are_named():
    where = "pairs.jsonl:4"
    with pytest.raises(UserError, match="pairs.jsonl:4: 'chosen' and 'rejected' are identical"):
        normalize_row({"prompt": "q", "chosen": "a", "rejected": "a"}, "preference", where)
    with pytest.raises(UserError, match="field 'chosen' is empty"):
        normalize_row({"prompt": "q", "chosen": "", "rejected": "a"}, "preference", where)
    with pytest.raises(UserError, match="row is missing field 'rejected'"):
        normalize_row({"prompt": "q", "chosen": "a"}, "preference", where)
    user = {"role": "user", "content": "Say the last word: a b"}
    other = {"role": "user", "content": "Say the last word: c d"}
    pair = {
        "chosen": [user, {"role": "assistant", "content": "b"}],
        "rejected": [other, {"role": "assistant", "content": "a"}],
    }
    with pytest.raises(UserError, match="the prompt turns of 'chosen' and 'rejected' differ"):
        normalize_row(pair, "preference", where)
    pair["rejected"][0] = user
    assert normalize_row(pair, "preference", where)["prompt"] == [user]


def test_unknown_reward_function_lists_the_registered_ones():
    with pytest.raises(UserError) as info:
        lookup("exact_answer")
    assert "unknown reward function 'exact_answer'" in str(info.value)
    assert all(name in str(info.value) for name in REGISTRY)


def test_a_causal_lm_folder_is_not_a_reward_model(pretrained_base):
    with pytest.raises(UserError, match="is not a reward model"):
        check_reward_model(pretrained_base)


def test_reward_function_checks_the_answer():
    prompt = [{"role": "user", "content": "Say the last word: red fox owl"}]
    answers = [[{"role": "assistant", "content": a}] for a in (" owl", "fox", "owl owl")]
    assert last_word_exact([prompt] * 3, answers) == [1.0, 0.0, 0.0]


def test_the_calculator_reward_checks_the_value_asked_for():
    add, subtract = [{"role": "user", "content": "What is 5619 + 7724?"}], "What is 7724 - 5619?"
    answers = [" 13343", "13349", "1334", "2105", "2105", "2105"]
    prompts = [add, add, add, subtract, add, [{"role": "user", "content": "Hi"}]]
    completions = [[{"role": "assistant", "content": a}] for a in answers]
    assert calculator_exact(prompts, completions) == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]


def test_grpo_preflight_refuses_unknown_function(tmp_path, sft_base):
    job = job_dict(
        {**PREFERENCE_JOB, "stage": "grpo"},
        tmp_path / "run",
        data={"format": "prompt", "train": str(DATA / "last-word-prompts-train.jsonl"), "eval": None},
        reward={"functions": [{"name": "nope"}]},
    )
    job["model"] = {"name_or_path": sft_base}
    with pytest.raises(UserError, match="unknown reward function 'nope'"):
        preflight(job_from_dict(job))


@pytest.mark.integration
def test_reward_model_reaches_high_pair_accuracy(ray_session, sft_base, tmp_path):
    job = job_dict(
        {**PREFERENCE_JOB, "stage": "reward"},
        tmp_path / "reward",
        training={"learning_rate": 1e-3, "max_steps": 500, "eval_steps": 250},
    )
    job["model"] = {"name_or_path": sft_base}
    result = run_job(job_from_dict(job), show_progress=False)
    before, after = result.figures["pair accuracy"]
    assert after >= 0.9 and after > before, result.figure()
    final_eval = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "eval_accuracy" in r][-1]
    assert final_eval["eval_accuracy"] >= 0.85  # TRL's own count agrees
    # ZeRO-3 shards the weights as they load: no embedding "grows" from a shard's 0 rows, counts are whole
    log = (result.run_dir / "logs" / "worker-0.log").read_text()
    assert "embeddings grow" not in log
    from transformers import AutoModelForSequenceClassification

    whole = AutoModelForSequenceClassification.from_pretrained(result.run_dir / "final").num_parameters()
    assert f"model: {whole:,} parameters" in log


@pytest.mark.integration
def test_dpo_raises_margin_and_greedy_accuracy(ray_session, sft_base, tmp_path):
    job = job_dict(
        PREFERENCE_JOB,
        tmp_path / "dpo",
        training={"learning_rate": 1e-3, "max_steps": 120},
        dpo={"beta": 0.1, "sft_weight": 1.0},
    )
    job["model"] = {"name_or_path": sft_base}
    result = run_job(job_from_dict(job), show_progress=False)
    margin, accuracy = result.figures["logp margin"], result.figures["greedy = chosen"]
    assert margin[1] > margin[0] + 0.5, result.figure()
    assert accuracy[1] > accuracy[0] + 0.05, result.figure()
    from tuneyard.training.metrics import figure_panels, read_metrics

    panels = [key for key, _ in figure_panels([read_metrics(result.run_dir / "metrics.jsonl")])]
    assert panels == ["loss", "rewards/margins", "rewards/accuracies"]  # `tuneyard plot` draws DPO's own figures


@pytest.mark.integration
def test_grpo_raises_the_programmatic_reward(ray_session, sft_base, tmp_path):
    """GRPO on 2 workers under ZeRO-3: the sampled reward of the last 20 steps beats the first 20.

    A constant learning rate: with cosine decay the second half barely moves and the gain drowns in
    sampling noise at this tiny budget."""
    job = job_dict(
        {**PREFERENCE_JOB, "stage": "grpo"},
        tmp_path / "grpo",
        data={"format": "prompt", "train": str(DATA / "last-word-prompts-train.jsonl"), "eval": None},
        training={"learning_rate": 1e-3, "lr_scheduler": "constant", "max_steps": 100, "batch_size": 16},
        grpo={"num_generations": 8, "max_completion_length": 8, "temperature": 0.7},
        reward={"functions": [{"name": "last_word_exact"}, {"name": "one_word", "weight": 0.2}]},
    )
    job["model"] = {"name_or_path": sft_base}
    result = run_job(job_from_dict(job), show_progress=False)
    rewards = [r["reward"] for r in read_metrics(result.run_dir / "metrics.jsonl") if "reward" in r]
    assert len(rewards) == 100
    first, last = sum(rewards[:20]) / 20, sum(rewards[-20:]) / 20
    assert last > first + 0.03, (first, last)


def test_pipeline_runs_stages_in_order_and_skips_finished_ones(pretrained_base, tmp_path, capsys):
    from tests.conftest import SFT_JOB
    from tuneyard.launch.pipeline import run_pipeline

    sft = job_dict(SFT_JOB, tmp_path / "sft", training={"max_steps": 3}, cluster={"workers": 1})
    sft["model"] = {"name_or_path": pretrained_base}
    dpo = job_dict(
        PREFERENCE_JOB, tmp_path / "dpo", training={"max_steps": 2}, cluster={"workers": 1}, deepspeed={"zero_stage": 2}
    )
    dpo["model"] = {"name_or_path": str(tmp_path / "sft" / "final")}  # the earlier stage's output
    files = []
    for name, job in [("sft", sft), ("dpo", dpo)]:
        files.append(tmp_path / f"{name}.yaml")
        files[-1].write_text(yaml.safe_dump(job))
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"stages": [{"job": str(f)} for f in files]}))

    first = run_pipeline(pipeline, single=True)
    assert [(stage, skipped) for stage, _, skipped in first] == [("sft", False), ("dpo", False)]
    assert (tmp_path / "dpo" / "final" / "model.safetensors").exists()
    second = run_pipeline(pipeline, single=True)
    assert [skipped for _, _, skipped in second] == [True, True]
    assert "[dpo] skipped, finished earlier" in capsys.readouterr().out
