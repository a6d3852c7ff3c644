"""The RL log-prob pass in chunks of response tokens equals the whole-logits pass, and needs a fraction of its memory.

Tiny fp32 models of the families whose output head is post-processed (Gemma's softcapping, Cohere's logit scale,
Granite's logits scaling) and of plain ones (Llama with a tied head, Qwen2), at
temperatures 1 and 0.7, with and without a top-p nucleus; gradients as the policy's update takes them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tests.conftest import ROOT
from tuneyard.rlhf.ppo.batches import build_samples, left_pad
from tuneyard.rlhf.ppo.chunked_logprobs import ChunkedScorer
from tuneyard.rlhf.ppo.roles import response_logprobs, response_tokens, sequence_forward

ARCH = {
    "vocab_size": 300,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
FAMILIES = {
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "qwen2": ("qwen2", {}),
    "gemma2-softcap": ("gemma2", {"final_logit_softcapping": 0.5}),
    "cohere-logit-scale": ("cohere", {"logit_scale": 0.25}),
    "granite-logits-scaling": ("granite", {"logits_scaling": 4.0}),
}


def tiny_model(model_type: str, extra: dict, seed: int = 0) -> torch.nn.Module:
    """A 1-layer fp32 model of the family; its head's weights scaled so that its logits are far from 0."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **ARCH, **extra)).float()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    return model.eval()


def sample_batch(seed: int = 0, samples: int = 4, prompt: int = 5, answer: int = 9) -> dict[str, torch.Tensor]:
    """Left-padded prompts and right-padded answers of several lengths, in the policy's sample layout."""
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 300, (prompt - i % 2,), generator=generator).tolist() for i in range(samples)]
    answers = [torch.randint(3, 300, (answer - 2 * (i % 3),), generator=generator).tolist() for i in range(samples)]
    ids, mask = left_pad(prompts, 0)
    return build_samples(ids, mask, answers, 0)


def update_gradients(model: torch.nn.Module, scorer: ChunkedScorer, batch: dict) -> dict[str, torch.Tensor]:
    """The gradients of a policy-update-like loss: weighted log-probs plus the entropy over the response tokens."""
    model.zero_grad()
    tokens = response_tokens(batch)
    logprobs, entropy = scorer(model, partial(sequence_forward, model, batch), tokens, True)
    weights = torch.linspace(-1.0, 1.0, tokens.numel()).reshape(tokens.shape)
    mask = batch["action_mask"].float()
    ((logprobs * weights * mask).sum() + 0.1 * (entropy * mask).sum()).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (0.7, 0.9)])
def test_chunks_equal_the_whole_logits(family, temperature, top_p):
    """Log-probs, entropy and the update's gradients in chunks of 5 tokens (the last one shorter) equal the whole
    pass to 1e-5, and the family's head is reproduced (the chunked path ran, not the fallback)."""
    model = tiny_model(*FAMILIES[family])
    batch = sample_batch()
    whole = ChunkedScorer(0, (temperature, top_p))
    chunked = ChunkedScorer(5, (temperature, top_p))
    want = response_logprobs(model, batch, 2, whole, entropy=True)
    got = response_logprobs(model, batch, 2, chunked, entropy=True)
    assert chunked.reproduces_head is True
    mask = batch["action_mask"].bool()
    assert want["logprobs"][mask].abs().mean() > 0.5  # far from uniform: a wrong head processing would show
    for key in ("logprobs", "entropy"):
        torch.testing.assert_close(got[key][mask], want[key][mask], atol=1e-5, rtol=1e-5)
    want_grads = update_gradients(model, whole, batch)
    got_grads = update_gradients(model, chunked, batch)
    assert want_grads.keys() == got_grads.keys() and len(want_grads) > 5
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_a_head_processed_in_an_unknown_way_is_scored_with_the_whole_logits(caplog):
    """A config field the family does not apply (softcapping on a Llama) makes the chunked head differ from the
    model's own last position: the scorer falls back to the whole logits, says so once, and its numbers are right."""
    model = tiny_model("llama", {"final_logit_softcapping": 0.5})
    batch = sample_batch(seed=1)
    fallback = ChunkedScorer(5, (0.7, 1.0))
    with caplog.at_level("WARNING"):
        got = response_logprobs(model, batch, 2, fallback, entropy=True)
        response_logprobs(model, batch, 2, fallback, entropy=True)
    assert fallback.reproduces_head is False
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "llama model's output logits are post-processed" in caplog.records[0].message
    want = response_logprobs(model, batch, 2, ChunkedScorer(0, (0.7, 1.0)), entropy=True)
    for key in ("logprobs", "entropy"):
        torch.testing.assert_close(got[key], want[key], atol=0, rtol=0)


def test_a_lora_policy_and_its_disabled_adapter_score_the_same_in_chunks():
    """LoRA on the attention and on the output head: the policy's log-probs and, with the adapter disabled, the
    reference's equal the whole pass; the adapter moves them (so the head's adapter is applied in the chunks)."""
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama", {"tie_word_embeddings": False})
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batch = sample_batch(seed=2)
    scores = {}
    for adapter in (True, False):
        for chunk in (0, 4):
            scorer = ChunkedScorer(chunk, (0.7, 0.9))
            if adapter:
                scores[adapter, chunk] = response_logprobs(peft_model, batch, 4, scorer)["logprobs"]
            else:
                with peft_model.disable_adapter():
                    scores[adapter, chunk] = response_logprobs(peft_model, batch, 4, scorer)["logprobs"]
    mask = batch["action_mask"].bool()
    for adapter in (True, False):
        torch.testing.assert_close(scores[adapter, 4][mask], scores[adapter, 0][mask], atol=1e-5, rtol=1e-5)
    assert (scores[True, 4] - scores[False, 4])[mask].abs().max() > 1e-2


PEAK_SCRIPT = """
import json, resource, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
from tuneyard.rlhf.ppo.batches import build_samples, left_pad
from tuneyard.rlhf.ppo.chunked_logprobs import ChunkedScorer
from tuneyard.rlhf.ppo.roles import response_logprobs

vocab, answer = (int(x) for x in sys.argv[1:3])
torch.manual_seed(0)
config = AutoConfig.for_model("llama", vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=answer + 16)
model = AutoModelForCausalLM.from_config(config).float().eval()
ids, mask = left_pad([list(range(3, 11))], 0)
batch = build_samples(ids, mask, [torch.randint(3, vocab, (answer,)).tolist()], 0)
figures, start = {}, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for chunk in (512, 0):  # the smaller pass first: the peak only ever rises
    out = response_logprobs(model, batch, 1, ChunkedScorer(chunk, (0.7, 1.0)), entropy=True)
    figures[chunk] = {"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start,
                      "logprob_sum": out["logprobs"].sum().item()}
print(json.dumps(figures))
"""


def test_the_chunked_pass_at_vocab_32k_and_4k_response_tokens_peaks_at_a_quarter_of_the_memory_or_less():
    """Measured, not estimated: the rise of the process's peak resident memory over a log-prob and entropy pass in
    chunks of 512 tokens, then over the whole pass (a [4096, 32000] float32 block is 500 MiB, a chunk's 62 MiB)."""
    proc = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, "32000", "4096"], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    chunked, whole = figures["512"], figures["0"]
    assert chunked["logprob_sum"] == pytest.approx(whole["logprob_sum"], rel=1e-5)
    assert whole["peak_kib"] > 1_000_000, figures  # the whole pass holds at least two [4096, 32000] float32 blocks
    assert whole["peak_kib"] >= 4 * chunked["peak_kib"], figures


def test_the_fused_head_our_sft_and_pretrain_losses_go_through_equals_the_plain_loss():
    """TRL's SFTTrainer patches a fused, tiled output head into the model it trains (so no [tokens, vocab] logits of
    a long row exist); over 2 x 2600 tokens (two 4096-token tiles) with the prompt's labels masked, its loss and every
    gradient equal the plain cross-entropy's to 1e-5."""
    from trl.trainer.utils import add_fused_lm_head

    model = tiny_model("llama", {"tie_word_embeddings": True, "max_position_embeddings": 4096})
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 300, (2, 2600), generator=generator)
    labels = ids.clone()
    labels[:, :700] = -100  # a prompt the loss skips
    model.zero_grad()
    model(input_ids=ids, labels=labels).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    plain_loss = model(input_ids=ids, labels=labels).loss.item()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    model.zero_grad()
    fused = model(input_ids=ids, labels=labels, fused_lm_head=True)
    fused.loss.backward()
    assert fused.loss.item() == pytest.approx(plain_loss, rel=1e-5)
    assert getattr(fused, "logits", None) is None  # no logits tensor came back
    for name, grad in plain.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, atol=1e-5, rtol=1e-4, msg=name)
