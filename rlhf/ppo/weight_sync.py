"""The policy's weights into the vLLM rollout engines, over a process group of their own.

Policy rank 0 and every engine worker form a separate, stateless group that never touches the roles' default
groups: NCCL between GPUs of their own, gloo on CPU and where an engine shares the policy's GPU (NCCL refuses two
ranks on one device), the tensors then staged through host memory. A sync is a series of broadcasts from policy
rank 0, in the order of a manifest both sides hold: consecutive tensors of one dtype packed into one flat buffer of
at most `BUCKET_BYTES` (`bucket_bounds`, computed alike on both sides), so a small model goes in one broadcast
instead of one per tensor, and each side holds at most one bucket beyond the model. Each engine worker hands a
bucket's tensors to vLLM's `reload_weights` as the bucket arrives, and then checks what vLLM loaded.

Under ZeRO-3 every policy rank walks the same parameters, gathering one at a time (a collective over the
policy's ranks); a LoRA/QLoRA policy sends its merged weights (the 4-bit base dequantized, the adapter's
delta added, nothing written back into the model) and the trained copies of its modules_to_save; a model with tied
embeddings sends `lm_head.weight` too where the engine's head keeps a copy of its own (`output_head_keeps_own_copy`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from urllib.parse import urlparse

import torch
import torch.distributed as dist

# (name, shape, dtype name): what a receiver allocates before each broadcast
Manifest = list[tuple[str, list[int], str]]

# the most bytes one broadcast of a sync carries (a larger tensor goes alone): per-broadcast latency paid once for a
# small model, and a bounded staging copy on each side for a large one
BUCKET_BYTES = 256 * 2**20


def bucket_bounds(manifest: Manifest, limit: int = BUCKET_BYTES) -> list[tuple[int, int]]:
    """[start, end) runs of the manifest sent as one broadcast each: consecutive tensors of one dtype, at most
    `limit` bytes together (a tensor larger than `limit` is a run of its own)."""
    bounds, start, size = [], 0, 0
    for i, (_, shape, dtype) in enumerate(manifest):
        nbytes = math.prod(shape) * getattr(torch, dtype).itemsize
        if i > start and (dtype != manifest[start][2] or size + nbytes > limit):
            bounds.append((start, i))
            start, size = i, 0
        size += nbytes
    if manifest:
        bounds.append((start, len(manifest)))
    return bounds


def bucket_name(manifest: Manifest, start: int, end: int) -> str:
    """A broadcast's tensors as an error names them: the first, and how many more."""
    more = f" (and {end - start - 1} more in its broadcast)" if end - start > 1 else ""
    return f"{manifest[start][0]}{more}"


class WeightSyncTimeout(RuntimeError):
    """A broadcast of the weight sync did not finish within the collective timeout."""


def open_sync_group(
    address: str, rank: int, world_size: int, backend: str, timeout_s: float, store: dist.Store | None = None
) -> dist.ProcessGroup:
    """A process group of its own over `address` (tcp://host:port; rank 0 holds the store). Blocks until all join."""
    if store is None:
        url = urlparse(address)
        store = dist.TCPStore(url.hostname, url.port, world_size, is_master=False, timeout=timedelta(seconds=timeout_s))
    timeout = timedelta(seconds=timeout_s)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, options)
    return dist.ProcessGroupGloo(store, rank, world_size, timeout)


def sync_store(host: str, world_size: int, timeout_s: float) -> tuple[dist.TCPStore, str]:
    """The rendezvous store of a sync group on this host (a free port), and its tcp:// address."""
    store = dist.TCPStore(
        host, 0, world_size, is_master=True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False
    )
    return store, f"tcp://{host}:{store.port}"


def broadcast(group: dist.ProcessGroup, tensor: torch.Tensor, name: str, timeout_s: float) -> None:
    """Broadcast `tensor` from rank 0 of `group`; a timeout names the parameter it waited on."""
    options = dist.BroadcastOptions()
    options.rootRank = 0
    try:
        group.broadcast([tensor], options).wait(timedelta(seconds=timeout_s))
    except RuntimeError as exc:
        if "timed out" in str(exc).lower() or "timeout" in str(exc).lower():
            raise WeightSyncTimeout(
                f"the weight sync timed out: parameter {name} did not reach every rollout engine within "
                f"cluster.collective_timeout_s ({timeout_s:g} s)"
            ) from None
        raise


# (name, the parameters to gather under ZeRO-3, the function that makes the tensor to send once they are whole)
WeightUnit = tuple[str, list[torch.nn.Parameter], Callable[[], torch.Tensor]]


def weight_units(model: torch.nn.Module, tied_head: bool) -> list[WeightUnit]:
    """The tensors a serving engine loads, in checkpoint names: merged LoRA layers, the trained copies of PEFT's
    modules_to_save under their modules' own names, and (`tied_head`) a tied output head."""
    lora_layers, saved_copies, inner = {}, {}, model
    if hasattr(model, "peft_config"):
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import ModulesToSaveWrapper

        inner = model.get_base_model()
        lora_layers = {name: m for name, m in inner.named_modules() if isinstance(m, LoraLayer)}
        saved_copies = {name: m for name, m in inner.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    units: list[WeightUnit] = []
    for prefix, layer in lora_layers.items():
        base = layer.get_base_layer()
        units.append((f"{prefix}.weight", list(layer.parameters()), lambda layer=layer: merged_lora_weight(layer)))
        if getattr(base, "bias", None) is not None:
            units.append((f"{prefix}.bias", [base.bias], lambda b=base.bias: b.data))
    for prefix, wrapper in saved_copies.items():
        # the copy that trains stands in for the module the engine knows; the frozen original is not sent
        active = (
            wrapper.modules_to_save[wrapper.active_adapters[0]] if wrapper.active_adapters else wrapper.original_module
        )
        units.extend((f"{prefix}.{name}", [param], lambda p=param: p.data) for name, param in active.named_parameters())
    handled = tuple(f"{prefix}." for prefix in [*lora_layers, *saved_copies])
    # a 4/8-bit linear outside the adapter's target modules holds packed bytes: it is sent dequantized too
    quantized = {
        f"{name}.weight": module
        for name, module in inner.named_modules()
        if hasattr(getattr(module, "weight", None), "quant_state") and not f"{name}.".startswith(handled)
    }
    for name, param in inner.named_parameters():
        if name in quantized:
            units.append((name, [param], lambda m=quantized[name]: dequantized_weight(m)))
        elif not name.startswith(handled):
            units.append((name, [param], lambda p=param: p.data))
    config = getattr(inner, "config", None)
    tied = config is not None and getattr(config, "tie_word_embeddings", False) and inner.get_output_embeddings()
    if tied and tied_head:
        head = inner.get_output_embeddings().weight
        units.append(("lm_head.weight", [head], lambda p=head: p.data))
    return units


def dequantized_weight(module: torch.nn.Module) -> torch.Tensor:
    """A linear's weight in its compute dtype: dequantized when bitsandbytes holds it in 4 or 8 bits."""
    from peft.utils.integrations import dequantize_module_weight

    return dequantize_module_weight(module) if hasattr(module.weight, "quant_state") else module.weight.data


def merged_lora_weight(layer: torch.nn.Module) -> torch.Tensor:
    """A LoRA layer's base weight (dequantized when 4/8-bit) plus its active adapters' deltas; the layer unchanged."""
    weight = dequantized_weight(layer.get_base_layer())
    if getattr(layer, "merged", False):  # already merged into the base: the base is the merged weight
        return weight
    weight = weight.clone()
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A:
            weight += layer.get_delta_weight(adapter).to(weight.dtype)
    return weight


@contextlib.contextmanager
def whole(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """The parameters gathered for the block when ZeRO-3 partitions them (a collective over the policy's ranks)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


@torch.no_grad()
def manifest_of(model: torch.nn.Module, tied_head: bool) -> Manifest:
    """Each tensor's name, shape and dtype, in the order `send_weights` sends them (collective under ZeRO-3)."""
    manifest = []
    for name, params, make in weight_units(model, tied_head):
        with whole(params):
            tensor = make()
            manifest.append((name, list(tensor.shape), str(tensor.dtype).removeprefix("torch.")))
    return manifest


@torch.no_grad()
def send_weights(
    model: torch.nn.Module, group: dist.ProcessGroup | None, timeout_s: float, tied_head: bool, manifest: Manifest
) -> int:
    """Broadcast the model's weights to the engines (`manifest`: what `manifest_of` said of them); bytes sent. The
    policy ranks past 0 (group None) only take part in the ZeRO-3 gathers."""

    def tensors() -> Iterator[torch.Tensor]:
        for _, params, make in weight_units(model, tied_head):
            with whole(params):
                yield make()  # copied into its bucket before the gather is released

    if group is None:
        for _ in tensors():
            pass
        return 0
    return send_tensors(group, manifest, tensors(), timeout_s)


def send_tensors(
    group: dist.ProcessGroup, manifest: Manifest, tensors: Iterable[torch.Tensor], timeout_s: float
) -> int:
    """Broadcast `tensors` (the manifest's, in its order) a bucket at a time; bytes sent. Over gloo a GPU tensor
    goes through host memory."""
    staged = group.name() == "gloo"
    stream, sent = iter(tensors), 0
    for start, end in bucket_bounds(manifest):
        flat, offset = None, 0
        for _ in range(start, end):
            tensor = next(stream)
            if flat is None:
                total = sum(math.prod(shape) for _, shape, _ in manifest[start:end])
                dtype = getattr(torch, manifest[start][2])
                flat = torch.empty(total, dtype=dtype, device="cpu" if staged else tensor.device)
            flat[offset : offset + tensor.numel()].copy_(tensor.reshape(-1))
            offset += tensor.numel()
        broadcast(group, flat, bucket_name(manifest, start, end), timeout_s)
        sent += flat.numel() * flat.element_size()
    return sent


def received_weights(
    group: dist.ProcessGroup, manifest: Manifest, device: torch.device, timeout_s: float
) -> Iterator[tuple[str, torch.Tensor]]:
    """The manifest's tensors as the broadcasts deliver them, a bucket at a time (an engine worker's side)."""
    arrives_on = torch.device("cpu") if group.name() == "gloo" else device
    for start, end in bucket_bounds(manifest):
        entries = manifest[start:end]
        flat = torch.empty(
            sum(math.prod(shape) for _, shape, _ in entries), dtype=getattr(torch, entries[0][2]), device=arrives_on
        )
        broadcast(group, flat, bucket_name(manifest, start, end), timeout_s)
        offset = 0
        for name, shape, _ in entries:
            size = math.prod(shape)
            yield name, flat[offset : offset + size].view(shape).to(device)
            offset += size


class WeightSyncMismatch(RuntimeError):
    """What an engine loaded from a sync differs from what the policy sent."""


def output_head_keeps_own_copy(model: torch.nn.Module) -> bool:
    """Whether a served model's output head computes from a copy of its own rather than the tied embeddings' storage.

    Probed, not assumed: one row of the shared weight is changed for a moment and the head's own matmul is asked
    whether it saw the change. vLLM's CPU layers repack every weight after loading, so there the head keeps its own
    copy, which an in-place reload refreshes only when `lm_head.weight` itself is sent; on GPUs the head reads the
    embeddings' storage and sending it again would be wasted bytes."""
    head = getattr(model, "lm_head", None)
    weight = getattr(head, "weight", None)
    if weight is None:
        return False  # no head of its own (Gemma-2 computes its logits with the embeddings): nothing to send it to
    if not any(m is not head and getattr(m, "weight", None) is weight for m in model.modules()):
        return True  # the engine holds the head as a parameter of its own
    if getattr(head, "quant_method", None) is None:
        return True  # nothing to probe with: send the head, which the engine loads like any tensor
    with torch.no_grad():
        probe = torch.zeros(1, weight.shape[1], dtype=weight.dtype, device=weight.device)
        probe[0, 0] = 1.0
        saved = weight[0].clone()
        before = head.quant_method.apply(head, probe)[0, 0].item()
        weight[0, 0] += 1.0
        after = head.quant_method.apply(head, probe)[0, 0].item()
        weight[0].copy_(saved)
    return after == before


def loaded_names(model: torch.nn.Module, load: Callable[[], None]) -> set[str] | None:
    """The parameter names `model.load_weights` reported loading while `load()` ran (None: the model reports none)."""
    original, seen = model.load_weights, {}

    def recording(weights):
        seen["names"] = original(weights)
        return seen["names"]

    model.load_weights = recording
    try:
        load()
    finally:
        del model.load_weights
    return seen.get("names")


class WeightReceiver:
    """vLLM worker extension (`LLM(worker_extension_cls=...)`): joins the sync group, reloads the weights it receives
    and checks that the engine took every one of its parameters from them.

    Its methods run inside vLLM's worker, reached by `LLM.collective_rpc`.
    """

    def join_weight_sync(self, address: str, first_rank: int, world_size: int, backend: str, timeout_s: float) -> bool:
        """Join the sync group as rank `first_rank` + this worker's tensor-parallel rank; whether the engine's output
        head keeps a copy of its own (then a tied model's head is sent with every sync)."""
        from vllm.distributed import get_tensor_model_parallel_rank

        rank = first_rank + get_tensor_model_parallel_rank()
        self.weight_sync_group = open_sync_group(address, rank, world_size, backend, timeout_s)
        self.weight_sync_timeout_s = timeout_s
        return output_head_keeps_own_copy(self.model_runner.get_model())

    def receive_weights(self, manifest: Manifest) -> None:
        """Reload the model in place from the broadcasts of the manifest's tensors; refuse a sync that leaves any of
        the engine's parameters as they were, or that sends a tensor the engine has no place for."""
        model = self.model_runner.get_model()
        expected = {name for name, _ in model.named_parameters()}
        stream = received_weights(self.weight_sync_group, manifest, self.device, self.weight_sync_timeout_s)
        try:
            loaded = loaded_names(model, lambda: self.model_runner.reload_weights(weights_iterator=stream))
        except (ValueError, KeyError, AssertionError) as exc:  # no parameter for a tensor, or one of another shape
            what = " ".join(str(exc).split())[:300] or f"{type(exc).__name__} (a tensor of another shape)"
            raise WeightSyncMismatch(
                f"the rollout engine cannot load what the policy sends: {what}; the sync "
                "sends the policy's parameter names (merged LoRA/QLoRA layers and modules_to_save copies under their "
                "modules' names), and other adapters or models whose checkpoints transformers renames on load are "
                "not served by the engines: use ppo.generation.engine: hf for this policy"
            ) from None
        missing = sorted(expected - loaded) if loaded is not None else []
        if missing:
            raise WeightSyncMismatch(
                f"the weight sync left {len(missing)} of the rollout engine's parameters as they were "
                f"({', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}): the policy sent no tensor that "
                "vLLM loads into them, so the engine would answer with other weights than the policy's; use "
                "ppo.generation.engine: hf for this policy"
            )
