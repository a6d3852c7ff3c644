"""Ulysses sequence parallelism (`training.sequence_parallel`) on two gloo ranks with real DeepSpeed: the same
steps as one rank that holds whole sequences, under ZeRO-2 and ZeRO-3; and what `tuneyard plan` makes of it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import PRETRAIN_JOB, SFT_JOB, TINY_ARCH, job_dict
from tests.test_faults import kill_when_paused
from tests.test_plan import LLAMA_7B
from tuneyard.launch.config import job_from_dict
from tuneyard.launch.plan import Hardware, plan_job
from tuneyard.launch.plan.memory import GiB
from tuneyard.launch.run_job import run_job
from tuneyard.training.metrics import read_metrics

LENGTH = 2048


def pretrain_job(tmp_path, name: str, workers: int, sharing: int, zero: int) -> dict:
    """Five SGD steps on two 2048-token rows of the tiny corpus (rows of packed text), fp32.

    SGD makes every weight move by lr x its gradient, so equal final weights mean equal gradients at every step;
    `max_grad_norm` stays on, so a gradient N times too large would also be clipped differently."""
    job = job_dict(PRETRAIN_JOB, tmp_path / name)
    job["model"]["architecture"] = {**TINY_ARCH, "max_position_embeddings": LENGTH}
    job["data"]["max_length"] = LENGTH
    job["data"]["eval"] = None
    job["training"].update(
        batch_size=2,
        max_steps=5,
        sequence_parallel=sharing,
        optim="sgd",
        learning_rate=0.5,
        warmup_steps=0,
        lr_scheduler="constant",
        max_grad_norm=1.0,
    )
    job["cluster"] = {"workers": workers}
    job["deepspeed"] = {"zero_stage": zero}
    return job


def steps_of(run_dir) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def one_rank(ray_session, tmp_path_factory):
    """The reference: one rank, whole sequences, ZeRO-2."""
    job = pretrain_job(tmp_path_factory.mktemp("sp"), "one", workers=1, sharing=1, zero=2)
    return run_job(job_from_dict(job), show_progress=False).run_dir


@pytest.mark.integration
@pytest.mark.parametrize("zero", [2, 3])
def test_two_ranks_sharing_each_sequence_train_as_one_rank(one_rank, tmp_path, monkeypatch, zero):
    """Per-step losses and gradient norms equal to 1e-4 and the final weights to 1e-5: the loss is the whole
    sequence's, and the gradient too (ZeRO-2 alone would make it twice as large, training/sequence_parallel.py).

    The ZeRO-2 run is also killed once checkpoint-3 is complete: its restart resumes there mid-epoch, skipping the
    trained batches through the sequence-parallel data adapter (one whole batch of each rank's loader, then one
    shard: the group trains on its ranks' batches in turn), and its steps 4 and 5 are the straight run's too.
    The ZeRO-3 run's MLPs run in tiles (`training.tiled_mlp`), the one rank's whole."""
    job = pretrain_job(tmp_path, "two", 2, 2, zero)
    job["training"]["tiled_mlp"] = zero == 3  # ZeRO-3 gathers the MLP's weights for every tile
    killed = None
    if zero == 2:
        monkeypatch.setenv("TUNEYARD_FAULT_PAUSE", "marked@3")
        job["training"]["max_failures"] = 1
        job["output"].update(save_steps=3, keep_last=1)
        killed = kill_when_paused(tmp_path / "two", "marked", 3)
    shared = run_job(job_from_dict(job), show_progress=False).run_dir
    if killed is not None:
        assert killed["pid"] is not None
        records = read_metrics(shared / "metrics.jsonl")
        assert [r["step"] for r in records if r.get("event") == "start"] == [0, 3]
    tiling = "tiled MLP: 2 layers' MLPs run in tiles" in (shared / "logs" / "worker-1.log").read_text()
    assert tiling == (zero == 3)
    want, got = steps_of(one_rank), steps_of(shared)
    assert [s for s, _, _ in got] == [1, 2, 3, 4, 5]
    assert want[-1][1] < want[0][1] - 0.3  # the steps learn: equal numbers are not equal no-ops
    for (_, loss_a, norm_a), (_, loss_b, norm_b) in zip(want, got, strict=True):
        assert loss_b == pytest.approx(loss_a, rel=1e-4) and norm_b == pytest.approx(norm_a, rel=1e-4)
    a, b = load_file(one_rank / "final" / "model.safetensors"), load_file(shared / "final" / "model.safetensors")
    common = a.keys() & b.keys()  # ZeRO-3's save leaves the tied head to the embeddings
    assert len(common) >= len(a) - 1
    for name in common:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.integration
@pytest.mark.parametrize("packing", [False, True])
def test_sft_rows_share_their_sequences(ray_session, tmp_path, packing):
    """SFT rows (the loss on the answers only): two ranks sharing each sequence give one rank's losses and gradient
    norms to 1e-4.

    Unpacked, each batch has its own length (on gloo every batch is padded to data.max_length: the group's batches
    of different lengths could not be gathered otherwise). Packed, several examples share a row, their position
    ids restarting at each: one rank keeps them apart with a block-diagonal mask, the shared row's attention (which
    sees no mask) with `attention_within_documents`; an example attending to the one before it would change every
    loss."""
    runs = {}
    for workers in (1, 2):
        job = job_dict(SFT_JOB, tmp_path / f"sft{workers}")
        job["data"].update(packing=packing, eval=None)
        job["training"].update(batch_size=2, max_steps=4, sequence_parallel=workers)
        job["cluster"] = {"workers": workers}
        runs[workers] = steps_of(run_job(job_from_dict(job), show_progress=False).run_dir)
    assert len(runs[1]) == 4
    for (_, loss_a, norm_a), (_, loss_b, norm_b) in zip(runs[1], runs[2], strict=True):
        assert loss_b == pytest.approx(loss_a, rel=1e-4) and norm_b == pytest.approx(norm_a, rel=1e-4)


def test_attention_within_documents_is_the_block_diagonal_mask():
    """Per-example causal sdpa over a row whose position ids restart equals sdpa with the block-diagonal causal
    mask (grouped-query heads, two rows with different example boundaries), and differs from one causal pass."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from tuneyard.training.data.packing import restarting_positions
    from tuneyard.training.sequence_parallel import attention_within_documents

    torch.manual_seed(0)
    module = SimpleNamespace(is_causal=True, num_key_value_groups=2, training=False)
    q = torch.randn(2, 4, 12, 8)
    k, v = torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8)
    position_ids = torch.tensor([restarting_positions([5, 4], 12), restarting_positions([1, 7, 2], 12)])
    same_example = (position_ids.unsqueeze(2) - position_ids.unsqueeze(1)) == (
        torch.arange(12).view(1, 12, 1) - torch.arange(12).view(1, 1, 12)
    )
    mask = (same_example & torch.ones(12, 12, dtype=torch.bool).tril()).unsqueeze(1)
    want, _ = sdpa_attention_forward(module, q, k, v, mask)
    got, _ = attention_within_documents(module, q, k, v, None, position_ids=position_ids)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    causal, _ = sdpa_attention_forward(module, q, k, v, None)
    assert (causal - want).abs().max() > 0.1


def test_the_plan_shares_activations_and_suggests_sequence_parallel(tmp_path):
    """At 32k tokens a 7B Llama's activations do not fit an 80 GiB GPU; sequence_parallel 4 holds a quarter of the
    tokens' activations on each rank (the fused loss head's 4096 tokens of logits stay whole), and the suggestions
    offer it among the changes. Tiled MLPs keep under half the activations again."""
    from tuneyard.launch.plan.memory import LOGIT_BYTES_TRAIN

    llama_7b = {**LLAMA_7B, "max_position_embeddings": 32768}
    plans = {}
    for sharing, tiled in ((1, False), (4, False), (4, True)):
        job = job_dict(PRETRAIN_JOB, tmp_path / f"sp{sharing}{tiled}")
        job["model"] = {"name_or_path": "meta-llama/Llama-2-7b-hf", "architecture": llama_7b}
        job["data"]["max_length"] = 32768
        job["training"].update(batch_size=1, sequence_parallel=sharing, precision="bf16", tiled_mlp=tiled)
        job["cluster"] = {"workers": 4, "gpus_per_worker": 1}
        job["deepspeed"] = {"zero_stage": 3}
        plans[sharing, tiled] = plan_job(job_from_dict(job), Hardware(gpu_memory=80 * GiB))
    whole, shared, tiled = (plans[key].devices[0].parts[0][1] for key in ((1, False), (4, False), (4, True)))
    logits = 4096 * LLAMA_7B["vocab_size"] * LOGIT_BYTES_TRAIN
    assert shared.activations - logits == pytest.approx((whole.activations - logits) / 4, rel=1e-6)
    assert any("each sequence shared by 4 ranks (8192 tokens each)" in line for line in plans[4, False].summary)
    assert tiled.activations < 0.6 * shared.activations

    from tuneyard.launch.plan.shapes import Shapes
    from tuneyard.launch.plan.suggestions import suggest

    job = job_from_dict(
        {
            **job_dict(PRETRAIN_JOB, tmp_path / "big"),
            "model": {"name_or_path": "meta-llama/Llama-2-7b-hf", "architecture": llama_7b},
            "data": {**PRETRAIN_JOB["data"], "max_length": 32768},
            "training": {**PRETRAIN_JOB["training"], "batch_size": 1, "precision": "bf16"},
            "cluster": {"workers": 4, "gpus_per_worker": 1},
            "deepspeed": {"zero_stage": 3},
        }
    )
    plan = plan_job(job, Hardware(gpu_memory=80 * GiB))
    assert not plan.fits
    suggestions = suggest(job, plan, Shapes(), limit=10)
    assert any("training.sequence_parallel=2" in s.overrides for s in suggestions), [s.overrides for s in suggestions]
