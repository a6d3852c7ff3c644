"""Ulysses sequence parallelism (`training.sequence_parallel`) through DeepSpeed's ALST, as transformers' Trainer
and accelerate wire it: N consecutive ranks share each sequence, each holding 1/N of its tokens between the
attention layers, where an all-to-all trades the sequence shards for shares of the attention heads.

The Trainer does the work: accelerate registers DeepSpeed's `UlyssesSPAttentionHF` in place of the model's
attention function, wraps the training DataLoader in `UlyssesSPDataLoaderAdapter` (which gathers one batch per
rank of a group and gives each rank its slice of every sequence, labels pre-shifted) and builds the DeepSpeed
engine with the sequence-parallel groups; the loss is each rank's slice, weighted by its valid tokens over the group.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist

from tuneyard.training.attention import resolve_attn_implementation
from tuneyard.training.config import TrainSpec
from tuneyard.training.deepspeed_config import zero_stage


def sequence_parallel_args(spec: TrainSpec) -> dict:
    """The SFTConfig fields that share each sequence over training.sequence_parallel ranks ({} for 1)."""
    n = spec.training.sequence_parallel
    if n == 1:
        return {}
    import deepspeed
    from accelerate.utils import DeepSpeedSequenceParallelConfig, ParallelismConfig

    # ALST builds its groups with deepspeed.comm, which wraps the process group the worker already joined
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    attention = resolve_attn_implementation(spec.model.attn_implementation, strict=spec.model.strict_attention)
    parallelism = ParallelismConfig(
        sp_backend="deepspeed",
        sp_size=n,
        dp_replicate_size=dist.get_world_size() // n,
        sp_handler=DeepSpeedSequenceParallelConfig(sp_seq_length_is_variable=True, sp_attn_implementation=attention),
    )
    # every rank of a group takes an equal slice: sequences padded to a multiple of N, no ragged last batch. The
    # adapter gathers the group's batches, of each rank's own length; gloo's all_gather takes equal sizes only, so
    # on gloo every batch is padded to data.max_length (a multiple of N)
    multiple = spec.data.max_length if dist.get_backend() == "gloo" else n
    return {"parallelism_config": parallelism, "pad_to_multiple_of": multiple, "dataloader_drop_last": True}


class SequenceParallelGradients:
    """A trainer mixin that gives ZeRO 1-2 the gradient of the sequence's loss under sequence parallelism.

    The ALST loss gathers the group's per-rank losses with `torch.distributed.nn.all_gather`, whose backward sums
    the N ranks' gradients, so each rank's gradient is N times its share. ZeRO-3 averages gradients over every rank
    (world = N x data-parallel), which takes the factor out; ZeRO 1-2 divide by the data-parallel degree only, so
    there the loss passes 1/N of its gradient on (its value, logged and compared, stays the sequence's loss).
    Measured on 2 gloo ranks against one rank on the same rows: without this the gradient norm under ZeRO-2 is
    twice the single rank's, with it the two agree to 1e-5."""

    gradient_scale: float = 1.0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss = out[0] if return_outputs else out
        loss = loss * self.gradient_scale + (loss * (1.0 - self.gradient_scale)).detach()
        return (loss, *out[1:]) if return_outputs else loss


def with_sequence_parallel(trainer_class: type, spec: TrainSpec) -> type:
    """`trainer_class`, its gradients made those of the whole sequence where ZeRO leaves them N times too large,
    and able to resume mid-epoch (`resumable_sequence_shards`)."""
    n = spec.training.sequence_parallel
    if n == 1:
        return trainer_class
    resumable_sequence_shards()
    if zero_stage(spec.deepspeed) == 3:
        return trainer_class
    return type(trainer_class.__name__, (SequenceParallelGradients, trainer_class), {"gradient_scale": 1.0 / n})


def skip_sequence_shards(adapter, num_batches: int):
    """A copy of a `UlyssesSPDataLoaderAdapter` whose iteration starts `num_batches` of its own batches in.

    The adapter yields N shards for each batch of the loader it wraps (one batch per rank of the group, processed
    in turn), so the copy skips num_batches // N of that loader's batches, and the first num_batches % N shards
    when it is first read (after the Trainer has set its epoch); the adapter itself stays whole for later epochs."""
    import copy

    from accelerate import skip_first_batches

    resumed = copy.copy(adapter)
    resumed.__class__ = _resumed_adapter_class(type(adapter))
    resumed.dl = skip_first_batches(adapter.dl, num_batches // adapter.sp_world_size)
    resumed.iter = iter(resumed.dl)  # a generator: it reads nothing before its first next()
    resumed.micro_batches = type(adapter.micro_batches)()
    resumed.shards_to_skip = num_batches % adapter.sp_world_size
    return resumed


def _resumed_adapter_class(adapter_class: type) -> type:
    class ResumedSequenceShards(adapter_class):
        def __next__(self):
            while self.shards_to_skip:  # every rank of the group skips alike: refill is collective over it
                self.shards_to_skip -= 1
                super().__next__()
            return super().__next__()

    return ResumedSequenceShards


def resumable_sequence_shards() -> None:
    """Let the Trainer skip the trained batches of a resumed epoch through the sequence-parallel adapter, and set
    the epoch of the loader inside it.

    The Trainer's resume calls accelerate's `skip_first_batches` on its training loader, which rebuilds a plain
    DataLoader from the loader's dataset, and DeepSpeed's adapter has none; the Trainer module's name for that
    function is pointed at one that handles the adapter and leaves every other loader to accelerate."""
    import transformers.trainer as hf_trainer
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter

    original = hf_trainer.skip_first_batches
    if getattr(original, "handles_sequence_shards", False):
        return
    # the Trainer sets each epoch (its shuffle) on a loader that has set_epoch; the adapter passes it on
    UlyssesSPDataLoaderAdapter.set_epoch = lambda adapter, epoch: adapter.dl.set_epoch(epoch)

    def skip_first_batches(dataloader, num_batches=0):
        if isinstance(dataloader, UlyssesSPDataLoaderAdapter):
            return skip_sequence_shards(dataloader, num_batches)
        return original(dataloader, num_batches)

    skip_first_batches.handles_sequence_shards = True
    hf_trainer.skip_first_batches = skip_first_batches


def attention_within_documents(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention in which a token of a packed row attends only to the earlier tokens of its own
    example: an example starts where `position_ids` restart at 0, and each example runs causal sdpa on its own.

    Ulysses attention passes the core attention the whole sequence's position ids (gathered from the group) and no
    mask, as a block mask built on one rank's shard would be wrong for the whole sequence; flash-attn reads the
    examples from the position ids itself, sdpa needs this. No [tokens x tokens] mask is built."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    if position_ids is None or position_ids.shape[-1] != query.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    length = query.shape[2]
    rows = []
    for b in range(query.shape[0]):
        starts = [0, *(i for i in (position_ids[b] == 0).nonzero().flatten().tolist() if i > 0), length]
        row = slice(b, b + 1)
        examples = [
            sdpa_attention_forward(
                module, query[row, :, lo:hi], key[row, :, lo:hi], value[row, :, lo:hi], None, **kwargs
            )[0]
            for lo, hi in zip(starts, starts[1:], strict=False)
        ]
        rows.append(torch.cat(examples, dim=1))  # sdpa returns [batch, tokens, heads, head_dim]
    return torch.cat(rows, dim=0), None


def keep_packed_examples_apart(spec: TrainSpec, attention: str) -> None:
    """Under sequence parallelism with packed SFT rows and sdpa, make `attention_within_documents` the sdpa that
    Ulysses wraps (it takes the function registered under the model's kernel when the Trainer prepares the model;
    call this inside `attention_functions_restored`)."""
    if spec.training.sequence_parallel == 1 or spec.stage != "sft" or not spec.data.packing or attention != "sdpa":
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS["sdpa"] = attention_within_documents


@contextlib.contextmanager
def attention_functions_restored() -> Iterator[None]:
    """Undo, when the block ends, ALST's process-wide replacement of the attention function it wraps (a later
    model in this process would otherwise attend through a sequence-parallel wrapper)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    saved = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)  # where a `[key] = value` assignment lands
    try:
        yield
    finally:
        ALL_ATTENTION_FUNCTIONS._local_mapping.clear()
        ALL_ATTENTION_FUNCTIONS._local_mapping.update(saved)
