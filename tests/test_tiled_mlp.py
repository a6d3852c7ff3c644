"""`training.tiled_mlp`: the gated MLPs run in tiles of max(hidden_size, 512) tokens (DeepSpeed's TiledMLP) with
the same loss and gradients as whole, keeping a fraction of the activations for the backward."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from tuneyard.training.errors import UserError
from tuneyard.training.tiled_mlp import tile_mlps, tiled_mlp_wanted

LLAMA = LlamaConfig(
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
    max_position_embeddings=4096,
)


def spec_of(tiled_mlp: bool | str = True, max_length: int = 512, sequence_parallel: int = 1):
    """The fields of a TrainSpec that tiling reads."""
    return SimpleNamespace(
        training=SimpleNamespace(tiled_mlp=tiled_mlp, sequence_parallel=sequence_parallel),
        data=SimpleNamespace(max_length=max_length),
    )


def twin_llamas() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    whole = LlamaForCausalLM(LLAMA)
    tiled = LlamaForCausalLM(LLAMA)
    tiled.load_state_dict(whole.state_dict())
    assert tile_mlps(tiled, spec_of()) == LLAMA.num_hidden_layers
    return whole, tiled


def loss_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiled_mlps_give_the_whole_loss_and_gradients(checkpointing):
    """1100 tokens: tiles of 512, the last shorter; with gradient checkpointing too (the MLP then runs three
    times). Every parameter's gradient equal to 1e-5."""
    whole, tiled = twin_llamas()
    if checkpointing:
        for model in (whole, tiled):
            model.gradient_checkpointing_enable()
            model.train()
    ids = torch.randint(0, LLAMA.vocab_size, (2, 1100), generator=torch.Generator().manual_seed(1))
    loss_a, grads_a = loss_and_grads(whole, ids)
    loss_b, grads_b = loss_and_grads(tiled, ids)
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == len(list(whole.parameters()))
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_tiled_mlps_train_a_lora_adapter_alike():
    """LoRA on the MLP's projections: the adapter's gradients are the whole MLP's."""
    from peft import LoraConfig, get_peft_model

    whole, tiled = twin_llamas()
    lora = LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"], init_lora_weights=False)
    torch.manual_seed(2)
    whole = get_peft_model(whole, lora)
    torch.manual_seed(2)
    tiled = get_peft_model(tiled, lora)
    ids = torch.randint(0, LLAMA.vocab_size, (1, 700), generator=torch.Generator().manual_seed(3))
    loss_a, grads_a = loss_and_grads(whole, ids)
    loss_b, grads_b = loss_and_grads(tiled, ids)
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    assert any("mlp" in name for name in grads_a) and grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def saved_activation_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for the backward of one forward (measured, each storage once)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return sum(size for ptr, size in storages.items() if ptr not in parameters)


def test_tiled_mlps_keep_a_fraction_of_the_activations():
    """At 4096 tokens a layer's MLP saves its input only: the activations the backward keeps (the whole model's,
    attention and the loss included) fall to under 0.6x."""
    whole, tiled = twin_llamas()
    ids = torch.randint(0, LLAMA.vocab_size, (1, 4096), generator=torch.Generator().manual_seed(4))
    kept_whole, kept_tiled = saved_activation_bytes(whole, ids), saved_activation_bytes(tiled, ids)
    assert kept_tiled < 0.6 * kept_whole, (kept_tiled, kept_whole)


def test_auto_tiles_long_or_shared_rows_only():
    assert not tiled_mlp_wanted(spec_of("auto", max_length=4096))
    assert tiled_mlp_wanted(spec_of("auto", max_length=8192))
    assert tiled_mlp_wanted(spec_of("auto", max_length=2048, sequence_parallel=2))
    assert tiled_mlp_wanted(spec_of(True, max_length=128))
    assert not tiled_mlp_wanted(spec_of(False, max_length=32768, sequence_parallel=4))


def test_a_model_without_gated_mlps_is_refused_when_asked_and_left_whole_on_auto():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=64))
    with pytest.raises(UserError) as error:
        tile_mlps(gpt2, spec_of(True))
    assert str(error.value) == (
        "training.tiled_mlp: true tiles gated MLPs (gate_proj, up_proj, down_proj, act_fn: the Llama, Qwen, Mistral "
        "and Gemma families), and GPT2LMHeadModel has none; set training.tiled_mlp: false"
    )
    assert tile_mlps(gpt2, spec_of("auto", max_length=8192)) == 0
