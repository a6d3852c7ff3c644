"""The memory a training rank needs, from the model's shape and the job's settings: pure arithmetic.

The model is counted on the meta device (no weights are read or downloaded). The figures follow
DeepSpeed's own model-state estimators (`estimate_zero2_model_states_mem_needs`,
`estimate_zero3_model_states_mem_needs`: 2 bytes of 16-bit weights, 18 bytes of gradients and AdamW
state per trainable parameter under mixed precision, the largest layer gathered in full under ZeRO-3)
and, for activations, Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models" (arXiv:2205.05198), eq. (1): s*b*h*(34 + 5*a*s/h) bytes per layer with 16-bit activations.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from tuneyard.training.config import ADAPTER_METHODS, PROMPT_METHODS, ModelConfig, PeftSection
from tuneyard.training.errors import UserError

GiB = 2**30
# NF4/FP4: two weights per byte. Constants per block of 64 weights: one fp32 absmax (4/64 byte a weight), or with
# double quantisation an 8-bit absmax plus an fp32 constant per 256 blocks (QLoRA paper, section 3: 0.127 bits)
NF4_BYTES = 0.5
QUANT_CONSTANTS = {False: 4 / 64, True: 1 / 64 + 4 / (64 * 256)}
# DeepSpeed's `additional_buffer_factor`: CPU memory for offloaded states is 1.5 times the states (pinned staging)
CPU_BUFFER_FACTOR = 1.5
# CUDA context, NCCL's buffers and the caching allocator's fragmentation: a margin, not a measurement
GPU_MARGIN = 1 * GiB
# bytes per logit while the loss runs: the 16-bit logits the model returns, their fp32 upcast in the loss, and
# the fp32 log-softmax cross_entropy keeps for its backward
LOGIT_BYTES_TRAIN = 2 + 4 + 4
LOGIT_BYTES_INFER = 2 + 4  # log-probs of a frozen model: no backward


@dataclass(frozen=True)
class LinearLayer:
    """One nn.Linear of the model: its qualified name and shape."""

    name: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class ModelShape:
    """What the arithmetic needs to know of a model: counts and sizes read off its meta-device build."""

    total: int  # unique parameters (tied ones once)
    largest_layer: int  # the most parameters one module holds itself: what ZeRO-3 gathers at once
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_dim: int  # key/value width per token: kv_heads x head_dim (smaller than hidden under GQA)
    vocab: int  # output width of the head (1 for a reward model or critic)
    gated_mlp: bool  # SwiGLU-style MLP (gate and up projections)
    block: int  # parameters of one decoder block
    head: int  # parameters of the output head (lm_head, or a classifier's score)
    final_norm: int
    linears: tuple[LinearLayer, ...]  # every nn.Linear but the output head: what bitsandbytes quantises
    modules: dict[str, int] = field(default_factory=dict)  # qualified name -> parameters (modules_to_save)


def _config_value(config, *names: str, default: int = 0) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return default


def shape_of_config(config, task: str = "causal-lm") -> ModelShape:
    """Build the model of a transformers config on the meta device and read off its shape (no memory, no download)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    if task != "causal-lm":
        config.num_labels = 1
    with torch.device("meta"):  # parameters without storage: a 70B model builds in about a second
        model = auto.from_config(config)
    head_module = model.get_output_embeddings() if task == "causal-lm" else getattr(model, "score", None)
    head_params = {id(p) for p in head_module.parameters()} if head_module is not None else set()
    linears, modules, largest = [], {}, 0
    for name, module in model.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        largest = max(largest, own)  # DeepSpeed's model_to_params counts a module's own parameters the same way
        modules[name] = sum(p.numel() for p in module.parameters())
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and id(weight) not in head_params:
            linears.append(LinearLayer(name, module.in_features, module.out_features))
    from tuneyard.training.finetune_method import transformer_blocks

    blocks = transformer_blocks(model)
    inner = getattr(model, getattr(model, "base_model_prefix", "model"), model)
    norm = getattr(inner, "norm", None) or getattr(inner, "final_layernorm", None)
    hidden = _config_value(config, "hidden_size", "n_embd", "d_model")
    heads = _config_value(config, "num_attention_heads", "n_head")
    head_dim = _config_value(config, "head_dim", default=hidden // max(heads, 1))
    kv_heads = _config_value(config, "num_key_value_heads", default=heads)
    return ModelShape(
        total=sum(p.numel() for p in model.parameters()),  # parameters() yields a tied tensor once
        largest_layer=largest,
        layers=len(blocks),
        hidden=hidden,
        intermediate=_config_value(config, "intermediate_size", "n_inner", default=4 * hidden),
        heads=heads,
        kv_dim=kv_heads * head_dim,
        vocab=_config_value(config, "vocab_size") if task == "causal-lm" else 1,
        gated_mlp=any(re.search(r"(gate_proj|gate_up_proj|\.w3)$", x.name) for x in linears),
        block=sum(p.numel() for p in blocks[-1].parameters()),
        head=sum(p.numel() for p in head_module.parameters()) if head_module is not None else 0,
        final_norm=sum(p.numel() for p in norm.parameters()) if norm is not None else 0,
        linears=tuple(linears),
        modules=modules,
    )


def model_config_of(model: ModelConfig, architecture: str | None = None, source: str | None = None):
    """The transformers config of the job's model: `architecture` (a config.json or its folder), the job's
    model.architecture, or model.name_or_path when it is a local folder or cached; never a download."""
    from transformers import AutoConfig

    if architecture:
        path = Path(architecture).expanduser()
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise UserError(f"--architecture {architecture}: no such config.json (give the file or its folder)")
        try:
            tree = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"--architecture {file}:{exc.lineno}: malformed JSON ({exc.msg})") from None
        return AutoConfig.for_model(tree.pop("model_type"), **tree) if "model_type" in tree else _no_type(file)
    if model.architecture and "model_type" in model.architecture:
        arch = dict(model.architecture)
        if "vocab_size" not in arch and model.tokenizer and Path(model.tokenizer).is_dir():
            from transformers import AutoTokenizer  # a scratch model's vocabulary is its tokenizer's

            arch["vocab_size"] = len(AutoTokenizer.from_pretrained(model.tokenizer))
        return AutoConfig.for_model(arch.pop("model_type"), **arch)
    name = source or model.name_or_path
    assert name is not None  # the job's validator guarantees a source
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=model.trust_remote_code, local_files_only=True)
    except (OSError, ValueError):
        raise UserError(
            f"the memory planner reads the model's config.json from disk and never downloads, and '{name}' is "
            "neither a local folder nor in the Hugging Face cache; download its config "
            f"(`huggingface-cli download {name} config.json`) and pass `--architecture PATH/config.json`, or set "
            "model.architecture in the job (the transformers config dict, with model_type)"
        ) from None


def _no_type(file: Path):
    raise UserError(f"--architecture {file}: the config has no model_type (e.g. llama)")


# ------------------------------------------------------------------------------------------------ parameters


def adapter_parameters(shape: ModelShape, peft: PeftSection) -> int:
    """Trainable parameters of the adapter: LoRA r x (in + out) per targeted linear (DoRA adds a magnitude per
    output), AdaLoRA init_r x (in + out + 1) (it prunes ranks by masking, not by freeing them), IA3 one vector
    per targeted linear (counted over every linear: an upper bound, and tiny); prompt and prefix tuning their
    virtual tokens (`prompt_parameters`)."""
    if peft.method in PROMPT_METHODS:
        return prompt_parameters(shape, peft)
    if peft.target_modules == "all-linear":
        targets = shape.linears  # PEFT's all-linear: every linear layer but the output head
    else:
        keys = tuple(peft.target_modules)
        targets = tuple(x for x in shape.linears if any(x.name == k or x.name.endswith("." + k) for k in keys))
    if peft.method == "ia3":
        count = sum(x.out_features for x in shape.linears if peft.target_modules == "all-linear" or x in targets)
    elif peft.method == "adalora":
        init_r = peft.init_r or peft.r + peft.r // 2
        count = sum(init_r * (x.in_features + x.out_features + 1) for x in targets)
    else:
        count = sum(peft.r * (x.in_features + x.out_features) + (x.out_features if peft.dora else 0) for x in targets)
    for key in peft.modules_to_save or []:  # a trainable copy beside the frozen original
        count += sum(n for name, n in shape.modules.items() if name == key or name.endswith("." + key))
    return count


def prompt_parameters(shape: ModelShape, peft: PeftSection) -> int:
    """Prompt tuning: one embedding per virtual token. Prefix tuning: a key and a value per token and layer, of the
    key/value width (PEFT sizes them by the KV heads under GQA); with `prefix_projection` a token embedding of that
    width and PEFT's MLP (width -> width -> layers x 2 x width, biases included) instead."""
    tokens = peft.num_virtual_tokens
    if peft.method == "prompt_tuning":
        return tokens * shape.hidden
    width, out = shape.kv_dim, shape.layers * 2 * shape.kv_dim
    if not peft.prefix_projection:
        return tokens * out
    return tokens * width + (width * width + width) + (width * out + out)


def trainable_parameters(shape: ModelShape, peft: PeftSection) -> int:
    """Parameters that get gradients and optimizer state under the fine-tuning method."""
    if peft.method == "full":
        return shape.total
    if peft.method == "freeze":  # the top blocks, the final norm and the head (training/finetune_method.py)
        return min(shape.layers, peft.trainable_layers) * shape.block + shape.head + shape.final_norm
    return adapter_parameters(shape, peft)


def weight_bytes(shape: ModelShape, peft: PeftSection, bytes_per_param: int) -> float:
    """Bytes of every weight held for the forward pass: 16/32-bit, or a 4-bit base plus its constants (QLoRA)."""
    extra = adapter_parameters(shape, peft) if peft.method in ADAPTER_METHODS else 0
    if peft.method != "qlora":
        return (shape.total + extra) * bytes_per_param
    quantised = sum(x.in_features * x.out_features for x in shape.linears)
    four_bit = quantised * (NF4_BYTES + QUANT_CONSTANTS[peft.double_quant])
    # embeddings, norms, biases and the head stay in the compute dtype
    return four_bit + (shape.total - quantised + extra) * bytes_per_param


def optimizer_state_bytes(optim: str, mixed_precision: bool, offloaded: bool) -> float:
    """Bytes of optimizer state per trainable parameter, the fp32 master copy of mixed precision included.

    AdamW keeps two fp32 moments (8 bytes); bitsandbytes' 8-bit optimizers one byte a moment; Lion, SGD
    with momentum, RMSprop and Adagrad one moment; AdEMAMix three; Adafactor factored moments (about none).
    An offloaded optimizer is always DeepSpeed's CPU AdamW. Names we do not know count as AdamW.
    """
    name = "adamw" if offloaded else optim.lower()
    master = 4 if mixed_precision else 0
    per_state = 1 if "8bit" in name else 0.5 if "4bit" in name else 4
    if "adafactor" in name or name in ("sgd", "lomo", "adalomo"):
        states = 0
    elif "ademamix" in name:
        states = 3
    elif any(k in name for k in ("lion", "rmsprop", "adagrad")):
        states = 1
    else:
        states = 2
    return master + states * per_state


# ------------------------------------------------------------------------------------------------ activations


def layer_activation_bytes(
    shape: ModelShape, batch: int, seq: int, eager_attention: bool, tiled_mlp: bool = False
) -> float:
    """Bytes one decoder layer keeps for its backward, with 16-bit activations.

    Korthikanti et al. 2022, eq. (1), per layer: attention 11sbh + 5as^2b, MLP 19sbh, two norms 4sbh = sbh(34 + 5as/h).
    Adapted to today's decoders: no dropout masks (attention 10sbh, the K/V part scaled to the GQA width);
    the MLP counted from its own width (2sbh input + 2sbI per saved I-wide tensor: two for GELU, four for
    SwiGLU's gate, up, activation and product); the s^2 scores only with eager attention (flash and sdpa keep none).
    A tiled gated MLP (training/tiled_mlp.py) keeps its input only (a tile's intermediates live while it runs).
    """
    s, b, h = seq, batch, shape.hidden
    attention = s * b * (2 * h + 2 * h + 2 * 2 * shape.kv_dim + 2 * h + 2 * h)  # input, q, k and v, output, o_proj in
    if eager_attention:
        attention += 5 * shape.heads * s * s * b
    mlp = s * b * (2 * h + (8 if shape.gated_mlp else 4) * shape.intermediate)
    if tiled_mlp and shape.gated_mlp:
        mlp = s * b * 2 * h
    norms = 4 * s * b * h
    return attention + mlp + norms


def activation_bytes(
    shape: ModelShape,
    batch: int,
    seq: int,
    checkpointing: bool,
    eager_attention: bool = False,
    logit_tokens: int | None = None,
    tiled_mlp: bool = False,
) -> float:
    """Activation bytes of one training micro-batch: every layer's, or under gradient checkpointing each layer's
    input (2sbh, Korthikanti's "full recomputation") plus one layer recomputed in the backward; and the logits of
    `logit_tokens` tokens at once (None: every token of the micro-batch)."""
    layer = layer_activation_bytes(shape, batch, seq, eager_attention, tiled_mlp)
    logits = (batch * seq if logit_tokens is None else logit_tokens) * shape.vocab * LOGIT_BYTES_TRAIN
    if checkpointing:
        return shape.layers * 2 * seq * batch * shape.hidden + layer + logits
    return shape.layers * layer + logits


def inference_activation_bytes(shape: ModelShape, batch: int, seq: int, logit_tokens: int | None = None) -> float:
    """A frozen model's forward (no grad): one layer's working set at a time, and the log-probs of the logits of
    `logit_tokens` tokens at once (None: every token of the batch)."""
    layer = layer_activation_bytes(shape, batch, seq, eager_attention=False)
    return layer + (batch * seq if logit_tokens is None else logit_tokens) * shape.vocab * LOGIT_BYTES_INFER


def generation_bytes(shape: ModelShape, batch: int, seq: int) -> float:
    """Sampling `batch` sequences up to `seq` tokens: the KV cache (K and V, 16-bit, every layer) and one step."""
    kv_cache = 2 * shape.layers * batch * seq * shape.kv_dim * 2
    return kv_cache + inference_activation_bytes(shape, batch, 1)


# ------------------------------------------------------------------------------------------------ one rank


@dataclass(frozen=True)
class Setup:
    """How one role runs on its ranks: ZeRO, offloads, precision, fine-tuning method, batch and length."""

    zero_stage: int = 0
    world: int = 1  # data-parallel ranks sharing the ZeRO partitions
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: str = "bf16"  # bf16 | fp16 | fp32
    peft: PeftSection = field(default_factory=PeftSection)
    optim: str = "adamw_torch"
    micro_batch: int = 1  # sequences in one forward/backward (a preference pair counts two)
    seq: int = 512
    gradient_checkpointing: bool = False
    eager_attention: bool = False
    trains: bool = True  # False: a frozen model that only runs forward (reference, reward)
    generation_batch: int = 0  # sequences generated at once (a policy's KV cache)
    logit_tokens: int | None = None  # tokens whose logits exist at once (a tiled loss or log-probs); None: all
    tiled_mlp: bool = False  # gated MLPs run in tiles (training.tiled_mlp)
    reduce_bucket: float | None = None  # elements; None: HF's "auto" (hidden^2)
    prefetch_bucket: float | None = None  # elements; None: HF's "auto" (0.9 hidden^2)

    def changed(self, **updates) -> Setup:
        """A copy with some fields replaced."""
        return replace(self, **updates)


@dataclass(frozen=True)
class RankMemory:
    """Bytes one rank holds on its GPU, and in its node's CPU memory."""

    weights: float
    gradients: float
    optimizer: float
    activations_full: float
    activations_checkpointed: float
    checkpointing: bool
    gathered: float  # ZeRO-3: the largest layer gathered whole (and the next one prefetched)
    buckets: float  # ZeRO's gradient reduce and parameter prefetch buckets
    margin: float
    cpu_weights: float = 0.0
    cpu_gradients: float = 0.0
    cpu_optimizer: float = 0.0
    cpu_load: float = 0.0  # the model materialised in CPU memory while it loads (transient)

    @property
    def activations(self) -> float:
        """The activations of the job's own setting (checkpointed or not)."""
        return self.activations_checkpointed if self.checkpointing else self.activations_full

    @property
    def buffers(self) -> float:
        """Gathered layer, communication buckets and the fixed margin."""
        return self.gathered + self.buckets + self.margin

    @property
    def model_states(self) -> float:
        """GPU bytes of what DeepSpeed's estimators call model states: weights, gradients, optimizer, gathered layer."""
        return self.weights + self.gradients + self.optimizer + self.gathered

    @property
    def gpu(self) -> float:
        """Everything on the GPU."""
        return self.weights + self.gradients + self.optimizer + self.activations + self.buffers

    @property
    def cpu_states(self) -> float:
        """Offloaded weights, gradients and optimizer state."""
        return self.cpu_weights + self.cpu_gradients + self.cpu_optimizer

    @property
    def cpu_buffers(self) -> float:
        """Pinned staging beside offloaded states (DeepSpeed's 1.5 `additional_buffer_factor`)."""
        return self.cpu_states * (CPU_BUFFER_FACTOR - 1)

    @property
    def cpu(self) -> float:
        """Peak CPU memory of the rank: offloaded states with their buffers, or the model while it loads."""
        return max(self.cpu_states + self.cpu_buffers, self.cpu_load)


def _gradient_bytes(stage: int, trainable: int, world: int, mixed: bool, offload: bool) -> tuple[float, float]:
    """(GPU, CPU) gradient bytes of one rank.

    Mixed precision keeps 16-bit gradients (2 bytes) and the fp32 gradients the optimizer steps on (4 bytes):
    ZeRO-0 both whole; ZeRO-1 the fp32 ones partitioned; ZeRO-2 both partitioned (DeepSpeed's 18 bytes =
    2 + 4 of gradients + 12 of optimizer); ZeRO-3 4 bytes partitioned (its 18 = 2 weights + 4 + 12).
    An offloaded optimizer steps on fp32 gradients in CPU memory; the 16-bit ones stream out through the buckets.
    """
    if not mixed:  # fp32: one copy of 4 bytes
        partitioned = 4 * trainable / world
        if offload:
            return (4 * trainable if stage == 1 else 0.0), partitioned
        return (4 * trainable if stage <= 1 else partitioned), 0.0
    if offload:
        return (2 * trainable if stage == 1 else 0.0), 4 * trainable / world
    return {
        0: 6 * trainable,
        1: 2 * trainable + 4 * trainable / world,
        2: 6 * trainable / world,
        3: 4 * trainable / world,
    }[stage], 0.0


def rank_memory(shape: ModelShape, setup: Setup) -> RankMemory:
    """The bytes one rank of a role needs under its setup (see the module's docstring for the sources)."""
    mixed = setup.precision in ("bf16", "fp16")
    width = 2 if mixed else 4
    stage, world = setup.zero_stage, max(1, setup.world)
    weights = weight_bytes(shape, setup.peft, width)
    trainable = trainable_parameters(shape, setup.peft) if setup.trains else 0
    shard = weights / world if stage == 3 else weights
    gpu_weights, cpu_weights = (0.0, shard) if stage == 3 and setup.offload_params else (shard, 0.0)
    offload = setup.offload_optimizer and stage >= 1 and setup.trains
    gpu_grads, cpu_grads = _gradient_bytes(stage, trainable, world, mixed, offload) if trainable else (0.0, 0.0)
    optimizer = trainable * optimizer_state_bytes(setup.optim, mixed, offload)
    optimizer = optimizer / world if stage >= 1 else optimizer
    gpu_optimizer, cpu_optimizer = (0.0, optimizer) if offload else (optimizer, 0.0)
    # ZeRO-3 gathers a layer whole for its forward/backward and prefetches the next: DeepSpeed counts 4 bytes
    # (2 x 16-bit) of the largest layer
    gathered = 2 * width * shape.largest_layer if stage == 3 else 0.0
    # HF's "auto" bucket sizes: reduce_bucket_size = hidden^2 and (ZeRO-3) stage3_prefetch_bucket_size = 0.9 hidden^2
    buckets = 0.0
    if stage >= 2 and setup.trains:
        buckets += width * (setup.reduce_bucket if setup.reduce_bucket is not None else shape.hidden**2)
    if stage == 3:
        buckets += width * (setup.prefetch_bucket if setup.prefetch_bucket is not None else 0.9 * shape.hidden**2)
    if setup.trains:
        full, checkpointed = (
            activation_bytes(
                shape,
                setup.micro_batch,
                setup.seq,
                checkpointing,
                setup.eager_attention,
                setup.logit_tokens,
                setup.tiled_mlp,
            )
            for checkpointing in (False, True)
        )
        if setup.generation_batch:  # a policy generates before it trains: the larger of the two phases counts
            generation = generation_bytes(shape, setup.generation_batch, setup.seq)
            if stage == 3:  # PPO's policy gathers its whole weights to generate (rlhf/ppo/generation.py)
                generation += weights - shard
            full, checkpointed = max(full, generation), max(checkpointed, generation)
    else:
        full = checkpointed = inference_activation_bytes(shape, setup.micro_batch, setup.seq, setup.logit_tokens)
    return RankMemory(
        weights=gpu_weights,
        gradients=gpu_grads,
        optimizer=gpu_optimizer,
        activations_full=full,
        activations_checkpointed=checkpointed,
        checkpointing=setup.gradient_checkpointing,
        gathered=gathered,
        buckets=buckets,
        margin=GPU_MARGIN,
        cpu_weights=cpu_weights,
        cpu_gradients=cpu_grads,
        cpu_optimizer=cpu_optimizer,
        # without ZeRO-3's zero.Init every rank loads the whole model into CPU memory first; with it, its shard
        cpu_load=weights / world if stage == 3 else weights,
    )


def engine_memory(
    shape: ModelShape,
    precision: str,
    shards: int,
    batch: int,
    seq: int,
    budget: float = 0.0,
    reserved_cache: float = 0.0,
) -> RankMemory:
    """One vLLM rollout engine: its weights (over its tensor-parallel shards) and KV cache.

    On a GPU vLLM takes `budget` bytes (gpu_memory_utilization of the GPU) up front whatever the batch needs; on
    CPUs it reserves `reserved_cache` for the cache; else the KV cache of the batch it answers at once counts."""
    weights = shape.total * (2 if precision in ("bf16", "fp16") else 4) / shards
    cache = max(generation_bytes(shape, batch, seq) / shards, budget - weights, reserved_cache)
    return RankMemory(
        weights=weights,
        gradients=0.0,
        optimizer=0.0,
        activations_full=cache,
        activations_checkpointed=cache,
        checkpointing=False,
        gathered=0.0,
        buckets=0.0,
        margin=GPU_MARGIN,
        cpu_load=weights,
    )


def host_bytes(memory: RankMemory) -> float:
    """A rank's bytes in CPU memory when it trains on CPUs: what a GPU rank keeps on its GPU (without the CUDA
    margin) and its offloaded states; the worker process's own base is `cluster.resources.WORKER_BASE_BYTES`."""
    return memory.gpu - memory.margin + memory.cpu_states + memory.cpu_buffers


def gib(value: float) -> str:
    """Bytes as GiB with two decimals."""
    return f"{value / GiB:.2f}"
