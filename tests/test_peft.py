"""Fine-tuning methods in single-process mode: QLoRA on CPU, LoRA, AdaLoRA, IA3, prompt and prefix tuning,
freeze; adapter and merged export."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import PRETRAIN_JOB, SFT_JOB, job_dict
from tuneyard.launch.config import job_from_dict
from tuneyard.launch.export import export_adapter, export_merged
from tuneyard.launch.run_job import run_job
from tuneyard.training.config import PROMPT_METHODS, ModelConfig, PeftSection
from tuneyard.training.errors import UserError
from tuneyard.training.finetune_method import (
    apply_finetune_method,
    disable_cpu_inference_repacking,
    memory_footprint,
    quantization_config,
)
from tuneyard.training.metrics import read_metrics
from tuneyard.training.model import load_model, load_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    """The tiny Llama after a short single-process pretraining: adapters need a base that knows the text."""
    run_dir = tmp_path_factory.mktemp("base") / "pretrain"
    job = job_dict(PRETRAIN_JOB, run_dir, training={"max_steps": 60}, cluster={"workers": 1})
    run_job(job_from_dict(job), show_progress=False, single=True)
    return str(run_dir / "final")


def single_run(base: str, run_dir, peft: dict, data: dict | None = None, output: dict | None = None, **training):
    job = job_dict(SFT_JOB, run_dir, peft=peft, training={"max_steps": 40, "learning_rate": 1e-2, **training})
    job["model"] = {"name_or_path": base}
    job["cluster"] = {"workers": 1}
    job["data"].update(data or {})
    job["output"].update(output or {})
    return run_job(job_from_dict(job), show_progress=False, single=True)


PROMPT_INIT = "Answer with the last word of the sentence."
ADAPTERS = {
    "qlora": {"method": "qlora", "r": 16, "alpha": 32},
    "lora": {"method": "lora", "r": 16, "alpha": 32},
    "adalora": {"method": "adalora", "r": 16, "alpha": 32},
    "ia3": {"method": "ia3"},
    "prompt_tuning": {"method": "prompt_tuning", "prompt_init_text": PROMPT_INIT},
    "prefix_tuning": {"method": "prefix_tuning", "prefix_projection": True},
}
MERGEABLE = [m for m in ADAPTERS if m not in PROMPT_METHODS]
# the prefix run checkpoints halfway, for the resume test
PROMPT_RUN = {"data": {"packing": False}, "output": {"save_steps": 20}}  # packed rows are refused for them


@pytest.fixture(scope="module", params=list(ADAPTERS))
def adapter_run(request, base, tmp_path_factory):
    method = request.param
    run_dir = tmp_path_factory.mktemp(method) / "run"
    return method, single_run(base, run_dir, ADAPTERS[method], **(PROMPT_RUN if method in PROMPT_METHODS else {}))


def test_qlora_base_is_4bit_and_only_lora_trains(base):
    import bitsandbytes as bnb

    tokenizer = load_tokenizer(ModelConfig(name_or_path=base))
    peft = PeftSection(method="qlora")
    model = load_model(ModelConfig(name_or_path=base), tokenizer, quantization_config(peft))
    layer = model.model.layers[0]
    linears = [layer.self_attn.q_proj, layer.self_attn.v_proj, layer.mlp.down_proj]
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in linears)
    model = apply_finetune_method(model, peft)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in name or "lora_B" in name for name in trainable)
    assert "4-bit (uint8 packed)" in memory_footprint(model)


def test_adapter_training_lowers_eval_loss(adapter_run):
    method, result = adapter_run
    # IA3 learns one scaling vector per targeted layer, a few hundred parameters here, prompt tuning 16 input
    # embeddings (1,024) and prefix tuning 16 keys and values per layer: they move the loss less than LoRA
    gain = {"ia3": 0.3, "prompt_tuning": 0.5, "prefix_tuning": 1.0}.get(method, 1.5)
    assert result.eval_loss_after < result.eval_loss_before - gain, (method, result.figure())
    final = result.run_dir / "final"
    assert (final / "adapter_model.safetensors").exists() and not (final / "model.safetensors").exists()


def adapter_model_logits(method: str, run_dir, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the trained adapter on its base as training saw it (4-bit for QLoRA)."""
    import json

    from peft import PeftModel

    base_path = json.loads((run_dir / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
    quant = quantization_config(PeftSection(method="qlora")) if method == "qlora" else None
    base_model = AutoModelForCausalLM.from_pretrained(base_path, quantization_config=quant)
    disable_cpu_inference_repacking(base_model)  # bitsandbytes' eval-mode repacking is not what training ran
    model = PeftModel.from_pretrained(base_model, run_dir / "final").eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("adapter_run", MERGEABLE, indirect=True)
def test_merged_export_gives_the_adapter_models_logits(adapter_run, tmp_path):
    method, result = adapter_run
    out = export_merged(result.run_dir, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no PEFT
    assert not any("lora" in name for name, _ in merged.named_parameters())
    ids = torch.randint(0, merged.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = merged(ids).logits
    torch.testing.assert_close(got, adapter_model_logits(method, result.run_dir, ids), atol=2e-4, rtol=1e-4)


def test_chat_and_generate_load_the_adapter_as_it_trained(adapter_run):
    """`tuneyard chat`/`generate` load an adapter run as the merge does: the adapter on its (dequantised) base."""
    from tuneyard.launch.inference import load_run_model

    method, result = adapter_run
    model, tokenizer = load_run_model(result.run_dir)
    assert type(model).__name__ == "PeftModelForCausalLM" and tokenizer.pad_token_id is not None
    ids = torch.randint(0, 400, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, adapter_model_logits(method, result.run_dir, ids), atol=2e-4, rtol=1e-4)


def test_adapter_export_loads_with_peft(adapter_run, tmp_path, base):
    from peft import PeftModel

    method, result = adapter_run
    out = export_adapter(result.run_dir, tmp_path / "adapter")
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("adapter")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    quant = quantization_config(PeftSection(method="qlora")) if method == "qlora" else None
    base_model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant)
    disable_cpu_inference_repacking(base_model)
    model = PeftModel.from_pretrained(base_model, out).eval()
    ids = torch.randint(0, 400, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, adapter_model_logits(method, result.run_dir, ids))


@pytest.mark.parametrize("adapter_run", ["adalora", "ia3"], indirect=True)
def test_adalora_prunes_to_its_rank_budget_and_ia3_trains_only_its_vectors(adapter_run):
    import json

    method, result = adapter_run
    config = json.loads((result.run_dir / "final" / "adapter_config.json").read_text())
    if method == "adalora":
        # init_r 24 (1.5 r) per matrix at the start; after the last pruning the kept ranks average r = 16
        masks = config["rank_pattern"]
        assert config["init_r"] == 24 and masks and all(len(mask) == 24 for mask in masks.values())
        assert sum(sum(mask) for mask in masks.values()) == 16 * len(masks)
        assert len({sum(mask) for mask in masks.values()}) > 1  # ranks went where importance was, not evenly
    else:
        from safetensors.torch import load_file

        weights = load_file(result.run_dir / "final" / "adapter_model.safetensors")
        assert weights and all("ia3_l" in name and 1 in tensor.shape for name, tensor in weights.items())
        assert config["peft_type"] == "IA3" and sorted(config["target_modules"]) == ["down_proj", "k_proj", "v_proj"]


def test_adalora_on_ray_and_new_adapters_in_preference_stages_are_refused(base, tmp_path):
    job = job_dict(SFT_JOB, tmp_path / "run", peft={"method": "adalora"})
    job["model"] = {"name_or_path": base}
    with pytest.raises(
        UserError, match=r"peft.method adalora .* runs in one process: `tuneyard train JOB.yaml --single`"
    ):
        run_job(job_from_dict(job), show_progress=False)
    job["stage"], job["data"]["format"] = "dpo", "preference"
    job["peft"] = {"method": "ia3"}
    with pytest.raises(UserError, match="peft.method ia3 trains in stages pretrain and sft; for stage dpo use"):
        job_from_dict(job)


def trainer_eval_loss(run_dir, model, tmp_path) -> float:
    """The run's eval split scored by TRL's SFT evaluation, as the run's own trainer scored it, in this process."""
    from trl import SFTTrainer

    from tuneyard.launch.config import load_job
    from tuneyard.training.causal_lm_recipe import build_trainer_args
    from tuneyard.training.data.tokenize import default_cache_dir, prepare_datasets

    spec = load_job(run_dir / "job.yaml").train_spec(use_deepspeed=False)
    tokenizer = load_tokenizer(spec.model)
    cache = default_cache_dir(spec.data, spec.output)
    splits, _ = prepare_datasets(spec.stage, spec.data, tokenizer, spec.training.seed, cache)
    args = build_trainer_args(spec, tmp_path, has_eval=True)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=splits["train"], eval_dataset=splits["eval"], processing_class=tokenizer
    )
    return trainer.evaluate()["eval_loss"]


@pytest.mark.parametrize("adapter_run", PROMPT_METHODS, indirect=True)
def test_prompt_adapters_reload_to_the_model_they_trained_and_cannot_merge(adapter_run, tmp_path):
    """final/ reloaded (PEFT on its base) scores the eval split exactly as the trained model did at the end."""
    import json

    from safetensors.torch import load_file

    from tuneyard.launch.export import load_adapter_model

    method, result = adapter_run
    got = trainer_eval_loss(result.run_dir, load_adapter_model(result.run_dir), tmp_path)
    assert got == pytest.approx(result.eval_loss_after, rel=1e-5)
    config = json.loads((result.run_dir / "final" / "adapter_config.json").read_text())
    (prompt,) = load_file(result.run_dir / "final" / "adapter_model.safetensors").values()
    if method == "prompt_tuning":  # 16 embeddings of the hidden width, started from the text's tokens
        assert config["prompt_tuning_init"] == "TEXT" and config["prompt_tuning_init_text"] == PROMPT_INIT
        assert prompt.shape == (16, 64)
    else:  # the MLP's output is kept: a key and a value per layer of the KV width (2 heads of 16 under GQA)
        assert config["prefix_projection"] and prompt.shape == (16, 2 * 2 * 32)
    with pytest.raises(UserError, match=f"trained peft.method {method}: .* nothing to merge .* --adapter"):
        export_merged(result.run_dir, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("adapter_run", ["prefix_tuning"], indirect=True)
def test_projected_prefix_resumes_in_one_process(adapter_run, base, tmp_path):
    """PEFT saves a projected prefix as the MLP's output; the checkpoint also keeps the MLP, so training goes on."""
    _, result = adapter_run
    checkpoint = result.run_dir / "checkpoints" / "checkpoint-20"
    resumed = single_run(
        base, tmp_path / "resumed", ADAPTERS["prefix_tuning"], PROMPT_RUN["data"], {"resume": str(checkpoint)}
    )
    assert resumed.eval_loss_after == pytest.approx(result.eval_loss_after, rel=1e-5)


def test_prompt_methods_refuse_packed_rows_checkpointed_prefixes_and_other_stages(tmp_path):
    job = job_dict(SFT_JOB, tmp_path / "run", peft={"method": "prompt_tuning"})
    with pytest.raises(UserError, match="prompt_tuning puts its 16 virtual tokens .* data.packing: false"):
        job_from_dict(job)
    job["data"]["packing"] = False
    job_from_dict(job)  # unpacked rows: accepted
    job["peft"], job["training"]["gradient_checkpointing"] = {"method": "prefix_tuning"}, True
    with pytest.raises(UserError, match="set training.gradient_checkpointing: false, or use peft.method prompt_tuning"):
        job_from_dict(job)
    job["peft"], job["training"]["gradient_checkpointing"] = {"method": "lora", "prompt_init_text": "hi"}, False
    with pytest.raises(UserError, match="peft.prompt_init_text is for peft.method prompt_tuning, not lora"):
        job_from_dict(job)
    job["stage"], job["data"]["format"], job["peft"] = "dpo", "preference", {"method": "prefix_tuning"}
    with pytest.raises(UserError, match="peft.method prefix_tuning trains in stages pretrain and sft; for stage dpo"):
        job_from_dict(job)


@pytest.mark.integration
@pytest.mark.parametrize("peft", [ADAPTERS["prompt_tuning"], ADAPTERS["prefix_tuning"]], ids=PROMPT_METHODS)
def test_prompt_adapters_train_under_zero3_as_under_zero2(ray_session, base, tmp_path, peft):
    """PEFT saves them from rank 0 alone by running the ZeRO-3-partitioned encoder: every rank computes it first."""
    from safetensors.torch import load_file

    curves, saved = {}, {}
    for stage in (2, 3):
        run_dir = tmp_path / f"zero{stage}"
        job = job_dict(
            SFT_JOB,
            run_dir,
            peft=peft,
            deepspeed={"zero_stage": stage},
            training={"max_steps": 4, "learning_rate": 1e-2},
            output={"dir": str(run_dir), "save_steps": 2},  # a checkpoint midway saves the adapter too
        )
        job["model"], job["data"]["packing"] = {"name_or_path": base}, False
        run_job(job_from_dict(job), show_progress=False)
        curves[stage] = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
        saved[stage] = load_file(run_dir / "final" / "adapter_model.safetensors")["prompt_embeddings"]
    assert len(curves[3]) == 4 and curves[3] == pytest.approx(curves[2], rel=1e-5)
    assert curves[3][-1] < curves[3][0]
    torch.testing.assert_close(saved[3], saved[2])
    assert (tmp_path / "zero3" / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors").exists()


def test_freeze_trains_only_the_top_blocks(base, tmp_path):
    result = single_run(
        base, tmp_path / "freeze", {"method": "freeze", "trainable_layers": 1}, max_steps=5, learning_rate=1e-3
    )
    before = AutoModelForCausalLM.from_pretrained(base).state_dict()
    after = AutoModelForCausalLM.from_pretrained(result.run_dir / "final").state_dict()
    bottom = [k for k in before if k.startswith("model.layers.0.")]
    top = [k for k in before if k.startswith("model.layers.1.")]
    assert bottom and top
    assert all(torch.equal(before[k], after[k]) for k in bottom)  # bit-identical
    assert all(not torch.equal(before[k], after[k]) for k in top if "weight" in k)
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])  # the head trains
    with pytest.raises(UserError, match="holds full weights, not a LoRA adapter"):
        export_merged(result.run_dir, tmp_path / "nothing")


@pytest.mark.integration
def test_qlora_under_zero3_shards_the_4bit_base_and_trains_as_under_zero2(ray_session, base, tmp_path):
    """The 4-bit base stored in the compute dtype (bnb_4bit_quant_storage) is partitioned like any weight."""
    curves = {}
    for stage in (2, 3):
        run_dir = tmp_path / f"zero{stage}"
        job = job_dict(
            SFT_JOB,
            run_dir,
            peft={"method": "qlora", "r": 16, "alpha": 32},
            deepspeed={"zero_stage": stage},
            training={"max_steps": 4, "learning_rate": 1e-2},
        )
        job["model"] = {"name_or_path": base}
        run_job(job_from_dict(job), show_progress=False)
        curves[stage] = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
        assert (run_dir / "final" / "adapter_model.safetensors").exists()
    assert len(curves[3]) == 4 and curves[3] == pytest.approx(curves[2], rel=1e-5)
    assert curves[3][-1] < curves[3][0]
    for rank in (0, 1):
        log = (tmp_path / "zero3" / "logs" / f"worker-{rank}.log").read_text()
        share = re.search(r"of the 4-bit base ([\d,]+) of ([\d,]+) \(50\.0%\)", log)
        assert share, log[-2000:]
    zero2_log = (tmp_path / "zero2" / "logs" / "worker-0.log").read_text()
    assert "ZeRO-3: this rank holds" not in zero2_log
    # the same parameter count whether the packed 4-bit values sit in uint8 (ZeRO-2) or fp32 (ZeRO-3) elements
    counts = [
        re.search(r"parameters: ([\d,]+) total", (tmp_path / f"zero{s}" / "logs" / "worker-0.log").read_text())
        for s in (2, 3)
    ]
    assert counts[0].group(1) == counts[1].group(1)


def test_qlora_under_zero3_is_refused_for_ppo_with_the_alternative():
    job = job_dict(
        SFT_JOB, __import__("pathlib").Path("/tmp/unused"), peft={"method": "qlora"}, deepspeed={"zero_stage": 3}
    )
    job_from_dict(job)  # SFT: accepted
    job["stage"] = "ppo"
    with pytest.raises(UserError, match="PPO's policy gathers its whole weights to generate"):
        job_from_dict(job)


@pytest.mark.integration
def test_single_process_and_ray_give_the_same_first_losses(ray_session, base, tmp_path):
    curves = []
    for single in (True, False):
        run_dir = tmp_path / ("single" if single else "ray")
        job = job_dict(SFT_JOB, run_dir, training={"max_steps": 4, "learning_rate": 3e-3})
        job["model"] = {"name_or_path": base}
        job["cluster"] = {"workers": 1}
        run_job(job_from_dict(job), show_progress=False, single=single)
        curves.append([r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r])
    assert len(curves[0]) == 4 and curves[0] == pytest.approx(curves[1], rel=1e-5)
