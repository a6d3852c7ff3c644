"""The job sections that describe one SPMD training run: model, data, training, deepspeed, output."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

Precision = Literal["auto", "bf16", "fp16", "fp32"]
DataFormat = Literal[
    "text", "alpaca", "sharegpt", "messages", "preference", "unpaired_preference", "prompt", "classification", "bio"
]
Tracker = Literal["tensorboard", "wandb", "mlflow"]
# a PEFT adapter on a frozen base: the run's final/ is the adapter, `tuneyard export --merge` folds it in
ADAPTER_METHODS = ("lora", "qlora", "adalora", "ia3", "prompt_tuning", "prefix_tuning")
# adapters that add virtual tokens before each sequence instead of changing weights: nothing to merge
PROMPT_METHODS = ("prompt_tuning", "prefix_tuning")


class ModelConfig(BaseModel):
    """Which model and tokenizer to start from, and how to run attention."""

    model_config = ConfigDict(extra="forbid")

    name_or_path: str | None = Field(
        default=None, description="the model to start from: a local Hugging Face folder or a hub id (org/name)"
    )
    init: Literal["pretrained", "scratch"] = Field(
        default="pretrained",
        description="pretrained: load name_or_path; scratch: a new model from architecture and tokenizer",
    )
    architecture: dict | None = Field(default=None, description="a transformers config dict (with model_type)")
    tokenizer: str | None = Field(default=None, description="defaults to name_or_path")
    dtype: Precision = Field(
        default="auto", description="the dtype the weights load in; auto: bf16 on a CUDA GPU that has it, else fp32"
    )
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = Field(
        default="auto", description="auto: flash_attention_2 when flash-attn imports and CUDA is present, else sdpa"
    )
    strict_attention: bool = Field(
        default=False,
        description="a requested attention kernel that cannot run here is an error, not a fallback to sdpa/eager",
    )
    trust_remote_code: bool = Field(
        default=False, description="run the model's own modelling code from its folder or hub repository"
    )
    allow_pickle: bool = Field(
        default=False,
        description="load .bin/.pt/.pkl weights (unpickling runs code), else safetensors only; covers reward.model",
    )

    @model_validator(mode="after")
    def _source_is_complete(self) -> ModelConfig:
        if self.init == "scratch":
            if not self.architecture or "model_type" not in self.architecture:
                raise ValueError("model.init: scratch needs model.architecture with a model_type (e.g. llama)")
            if not self.tokenizer:
                raise ValueError("model.init: scratch needs model.tokenizer (a tokenizer folder or hub id)")
        elif not self.name_or_path:
            raise ValueError("set model.name_or_path (hub id or local folder), or model.init: scratch")
        return self

    def loading(self, folder: str) -> ModelConfig:
        """These loading options (dtype, attention, trust_remote_code...) pointed at another model's folder or hub
        id, as a distillation teacher or a reward model is loaded: its own config and tokenizer."""
        return self.model_copy(
            update={"init": "pretrained", "name_or_path": folder, "architecture": None, "tokenizer": None}
        )


PLAIN_SOURCE_KEYS = ("path", "weight", "split", "name")


class DataSource(BaseModel):
    """One dataset: a local .jsonl/.json/.parquet/.txt file or a `datasets` hub name; or one as LLaMA-Factory
    describes it (a dataset_info.json entry) or as Axolotl does (a `datasets:` entry with its type)."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="the data file or folder, or hub name; with dataset_info: that file")
    weight: float = Field(default=1.0, gt=0, description="2.0 repeats the source twice, 0.5 keeps a seeded half")
    split: str = Field(
        default="train", description="the split of a hub dataset, or of a save_to_disk folder holding several"
    )
    name: str | None = Field(default=None, description="hub dataset config name; with dataset_info: the entry's name")
    dataset_info: str | None = Field(
        default=None, description="LLaMA-Factory's dataset_info.json: its entry `name` gives file, format and columns"
    )
    # an Axolotl `datasets:` entry: its type and the keys it reads, with Axolotl's meaning and defaults
    type: str | None = Field(
        default=None,
        description="Axolotl's dataset type: chat_template, alpaca, chat_template.default or "
        "chat_template.argilla_chat (DPO)",
    )
    field_messages: str | None = Field(default=None, description="Axolotl: the conversation's column (messages)")
    message_property_mappings: dict[str, str] | None = Field(
        default=None, description="Axolotl: a message's keys, {role: from, content: value}"
    )
    roles: dict[str, list[str]] | None = Field(
        default=None, description="Axolotl: {role: [the names the data uses for it]}"
    )
    roles_to_train: list[str] | None = Field(
        default=None, description="Axolotl: the roles whose turns carry loss (default: data.train_on)"
    )
    train_on_eos: Literal["turn", "all", "last", "none"] | None = Field(
        default=None, description="Axolotl: which end-of-turn/EOS tokens carry loss (default turn)"
    )
    message_field_training: str | None = Field(
        default=None, description="Axolotl: a message's true/false key that says whether the turn carries loss"
    )
    field_tools: str | None = Field(default=None, description="Axolotl: the tool definitions' column (tools)")
    field_system: str | None = Field(default=None, description="Axolotl: the system prompt's column (system)")
    field_chosen: str | None = Field(default=None, description="Axolotl chat_template.default: chosen's column")
    field_rejected: str | None = Field(default=None, description="Axolotl chat_template.default: rejected's column")

    @model_validator(mode="before")
    @classmethod
    def _registry_entry(cls, data: object) -> object:
        from tuneyard.training.data.registry_entries import check_source_entry

        return check_source_entry(data)

    @model_serializer(mode="wrap")
    def _without_unset_entry_keys(self, handler: SerializerFunctionWrapHandler) -> dict:
        # a plain source dumps as it always has, so existing runs keep their identity (and `validate` stays short)
        dump = {k: v for k, v in handler(self).items() if v is not None or k in PLAIN_SOURCE_KEYS}
        if self.dataset_info is not None:  # its split is the entry's, not a key of its own
            dump.pop("split", None)
        return dump


class ShareGptTags(BaseModel):
    """How ShareGPT turns name their keys and speakers, in LLaMA-Factory's `tags` words."""

    model_config = ConfigDict(extra="forbid")

    role_tag: str = Field(default="from", description="the key that names the speaker")
    content_tag: str = Field(default="value", description="the key that holds the text")
    user_tag: str = Field(default="human", description="the speaker name of the user's turns")
    assistant_tag: str = Field(default="gpt", description="the speaker name of the assistant's turns")
    observation_tag: str = Field(default="observation", description="a tool's result")
    function_tag: str = Field(default="function_call", description="a tool call, its text the call as JSON")
    system_tag: str = Field(default="system", description="the speaker name of a system turn")


def _as_sources(value: object) -> object:
    """Accept a bare path or a list of paths where a list of sources is expected."""
    if value is None:
        return value
    if isinstance(value, str | dict):
        value = [value]
    if not isinstance(value, list | tuple):
        return value  # a number or a bool: pydantic's "Input should be a valid list" names the key
    return [{"path": item} if isinstance(item, str) else item for item in value]  # type: ignore[union-attr]


class DataConfig(BaseModel):
    """Where the rows come from, their format, and how they become token sequences."""

    model_config = ConfigDict(extra="forbid")

    format: DataFormat = Field(
        description="the rows' shape: text, alpaca, sharegpt, messages, preference, unpaired_preference, prompt, "
        "classification or bio"
    )
    train: list[DataSource] = Field(
        description="the training data: a file, folder or hub name, a source entry, or a list of them"
    )
    eval: list[DataSource] | None = Field(
        default=None, description="held-out data, given as train is; none: eval_fraction, or no eval"
    )
    eval_fraction: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="the share of the train rows held out when eval is not given"
    )
    text_field: str = Field(default="text", description="the key of the text in text and classification rows")
    max_length: int = Field(
        default=512, gt=8, description="tokens per sequence: pretrain's block length, the longest example otherwise"
    )
    overlength: Literal["error", "drop", "truncate"] = Field(
        default="error", description="SFT examples longer than max_length: an error naming them, dropped, or cut"
    )
    packing: bool = Field(
        default=True,
        description="SFT: several examples in a row, padding-free, no attention across them (pretrain always packs)",
    )
    num_proc: int = Field(
        default=1, ge=1, description="processes that tokenise on the driver (used from 1,000 rows on)"
    )
    streaming: bool = Field(
        default=False,
        description="pretrain on corpora larger than memory: tokenise into memory-mapped shards by parallel tasks",
    )
    shard_mb: float = Field(default=64.0, gt=0, description="streaming: megabytes of text per preparation task")
    prepare_workers: int = Field(
        default=0, ge=0, description="streaming: preparation tasks at once (0: one per CPU of the Ray cluster)"
    )
    cache_dir: str | None = Field(default=None, description="defaults to <output.dir>/../.tokenized")
    eval_generations: int = Field(default=0, ge=0, description="held-out examples scored by greedy exact match")
    columns: dict[str, str] | None = Field(
        default=None, description="the format's field -> the file's column, e.g. {instruction: question}"
    )
    chat_template: str | None = Field(
        default=None, description="chatml, a template TRL ships (llama3, qwen3, ...) or a .jinja file"
    )
    train_on: Literal["assistant", "all", "last_assistant"] = Field(
        default="assistant",
        description="which tokens of a conversation carry loss; a turn's loss_weight (0 or 1) decides its own",
    )
    tags: ShareGptTags | None = Field(
        default=None, description="ShareGPT turns' keys and speaker names (LLaMA-Factory's tags), e.g. {role_tag: role}"
    )

    _sources = field_validator("train", "eval", mode="before")(lambda cls, v: _as_sources(v))

    @field_validator("train", "eval")
    @classmethod
    def _sources_named(cls, sources: list[DataSource] | None, info: ValidationInfo) -> list[DataSource] | None:
        # an empty list would only fail at training time, and an empty path means the current directory
        if sources is not None and not sources and info.field_name == "train":
            raise ValueError("lists no data; give at least one source, e.g. train: data/train.jsonl")
        if any(not source.path.strip() for source in sources or []):
            raise ValueError("a source has an empty path; give a data file, a dataset folder or a hub dataset name")
        return sources

    @model_serializer(mode="wrap")
    def _without_unset_tags(self, handler: SerializerFunctionWrapHandler) -> dict:
        # a job without data.tags dumps as it did before they existed, so existing runs keep their identity
        dump = handler(self)
        if dump.get("tags") is None:
            dump.pop("tags", None)
        return dump

    @model_validator(mode="after")
    def _streamed_sources_are_files(self) -> DataConfig:
        described = [s for s in [*self.train, *(self.eval or [])] if s.dataset_info is not None or s.type is not None]
        if self.streaming and described:
            raise ValueError(
                "data.streaming reads plain text files; a dataset_info or Axolotl entry is read whole: give the text "
                "files themselves"
            )
        return self


class EarlyStopping(BaseModel):
    """Stop when an eval metric has not improved for `patience` evaluations."""

    model_config = ConfigDict(extra="forbid")

    metric: str = Field(default="eval_loss", description="the eval metric watched (a key the evaluation logs)")
    mode: Literal["min", "max"] = Field(default="min", description="min: lower is better; max: higher is better")
    patience: int = Field(default=3, ge=1, description="evaluations without improvement before stopping")
    threshold: float = Field(default=0.0, ge=0.0, description="an improvement smaller than this does not count")


class TrainingConfig(BaseModel):
    """Optimisation: schedule, batch, length of the run, precision and evaluation cadence."""

    model_config = ConfigDict(extra="forbid")

    learning_rate: float = Field(default=1e-4, gt=0, description="the peak learning rate, after warm-up")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "polynomial"] = Field(
        default="cosine", description="the learning-rate schedule after warm-up (transformers' schedulers)"
    )
    warmup_steps: int = Field(default=0, ge=0, description="steps of linear warm-up; wins over warmup_ratio when > 0")
    warmup_ratio: float = Field(default=0.0, ge=0.0, lt=1.0, description="warm-up as a share of the run's steps")
    weight_decay: float = Field(default=0.0, description="the optimizer's decoupled weight decay (AdamW's)")
    max_grad_norm: float = Field(default=1.0, description="gradients are clipped to this global norm")
    batch_size: int = Field(default=8, ge=1, description="per worker")
    grad_accum: int = Field(default=1, ge=1, description="micro-batches accumulated into one optimizer step")
    epochs: float = Field(default=1.0, gt=0, description="passes over the training data (unless max_steps > 0)")
    max_steps: int = Field(default=-1, description="wins over epochs when > 0")
    seed: int = Field(default=42, description="seeds initialisation, data order and sampling")
    precision: Precision = Field(
        default="auto", description="the training precision; auto: bf16 on a GPU that has it, fp32 otherwise"
    )
    gradient_checkpointing: bool = Field(
        default=False, description="recompute activations in the backward pass: less memory, more compute"
    )
    sequence_parallel: int = Field(
        default=1,
        ge=1,
        description="ranks that share each sequence (Ulysses attention, DeepSpeed's ALST; stages pretrain and sft): "
        "each holds 1/N of its tokens' activations, and the data-parallel degree is cluster.workers / N",
    )
    tiled_mlp: bool | Literal["auto"] = Field(
        default="auto",
        description="run each gated MLP (Llama, Qwen, Mistral, Gemma families) over the sequence in tiles of "
        "max(hidden_size, 512) tokens (DeepSpeed's TiledMLP): its intermediates exist for one tile at a time, for "
        "one more MLP forward per step; auto: on for data.max_length >= 8192 or sequence_parallel > 1",
    )
    eval_steps: int | None = Field(default=None, ge=1, description="None: evaluate at start and end only")
    logging_steps: int = Field(default=1, ge=1, description="optimizer steps between logged training figures")
    max_failures: int = Field(
        default=2, ge=0, description="restarts after a lost worker (or PPO role actor), each from the newest checkpoint"
    )
    max_nonfinite_steps: int = Field(
        default=5, ge=0, description="NaN/inf steps skipped in a row before the run stops (0: stop at the first)"
    )
    report_to: list[Tracker] = Field(
        default_factory=lambda: ["tensorboard"], description="trackers fed the figures of metrics.jsonl ([]: none)"
    )
    optim: str = Field(default="adamw_torch_fused", description="a transformers optimizer, e.g. adamw_bnb_8bit")
    neftune_noise_alpha: float | None = Field(default=None, gt=0, description="NEFTune embedding noise (SFT)")
    early_stopping: EarlyStopping | None = Field(
        default=None, description="stop when an eval metric stops improving (needs eval_steps); none: off"
    )


class DeepSpeedSection(BaseModel):
    """ZeRO stage and offload switches, or a raw DeepSpeed JSON that wins over them."""

    model_config = ConfigDict(extra="forbid")

    zero_stage: Literal[0, 1, 2, 3] = Field(
        default=2,
        description="what ZeRO shards over the workers: 0 nothing, 1 optimizer state, 2 and gradients, 3 and weights",
    )
    offload_optimizer: bool = Field(default=False, description="keep the optimizer state in CPU memory (ZeRO 1-3)")
    offload_params: bool = Field(default=False, description="keep the weights in CPU memory (ZeRO-3 only)")
    config: str | None = Field(default=None, description="path to a DeepSpeed JSON dict; wins when set")

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> DeepSpeedSection:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("deepspeed.offload_params needs zero_stage: 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs zero_stage 1, 2 or 3")
        return self


class OutputConfig(BaseModel):
    """Where the run directory is, how often to checkpoint, and whether to resume."""

    model_config = ConfigDict(extra="forbid")

    dir: str = Field(description="the run directory: job.yaml, metrics, logs, checkpoints and final/")
    save_steps: int = Field(default=0, ge=0, description="0: no intermediate checkpoints")
    keep_last: int = Field(
        default=2, ge=1, description="complete checkpoints kept; an older one goes once a newer one is complete"
    )
    keep_best: str | None = Field(
        default=None, description="also keep the checkpoint with the best value of this eval metric (e.g. eval_loss)"
    )
    best_mode: Literal["min", "max"] = Field(
        default="min", description="keep_best: min (lower is better) or max (higher is better)"
    )
    resume: str = Field(default="auto", description="auto | never | PATH to a checkpoint folder")
    overwrite: bool = Field(
        default=False, description="empty the run directory (another job's, or a finished run) and start again"
    )


class PeftSection(BaseModel):
    """How much of the model trains: all of it, its top blocks, or an adapter (LoRA, on a 4-bit base, AdaLoRA, IA3,
    prompt or prefix tuning)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal[
        "full", "freeze", "lora", "qlora", "adalora", "ia3", "prompt_tuning", "prefix_tuning", "feature-based"
    ] = Field(
        default="full",
        description="full: every weight; freeze: the top blocks; lora, qlora (on a 4-bit base), adalora, ia3: an "
        "adapter; prompt_tuning, prefix_tuning: virtual tokens; feature-based (classify): logistic regression on "
        "the frozen model's embeddings",
    )
    trainable_layers: int = Field(
        default=2, ge=0, description="freeze: the last N blocks (plus the head) train; 0: the head alone"
    )
    r: int = Field(default=8, ge=1, description="LoRA's rank; adalora: the average rank it prunes down to")
    init_r: int | None = Field(default=None, ge=1, description="adalora: each layer's starting rank (default 1.5 r)")
    alpha: int = Field(default=16, ge=1, description="LoRA's scale: the update is multiplied by alpha / r")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input (LoRA)")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default="all-linear", description="the layers that get an adapter: all-linear, or module names (q_proj, ...)"
    )
    rslora: bool = Field(default=False, description="rank-stabilised LoRA: scale by alpha / sqrt(r)")
    dora: bool = Field(default=False, description="DoRA: learn each weight's magnitude beside LoRA's direction")
    modules_to_save: list[str] | None = Field(
        default=None,
        description="modules trained in full beside the adapter and saved with it (a classifier's head: score)",
    )
    quant_type: Literal["nf4", "fp4"] = Field(default="nf4", description="qlora: the 4-bit type (bitsandbytes)")
    double_quant: bool = Field(default=True, description="qlora: quantise the quantisation constants too")
    compute_dtype: Precision = Field(
        default="auto",
        description="qlora: the dtype the 4-bit layers compute in; auto: bf16 on a GPU that has it, fp32 otherwise",
    )
    num_virtual_tokens: int = Field(
        default=16,
        ge=1,
        description="prompt_tuning: learned input embeddings put before every sequence; prefix_tuning: learned keys "
        "and values per layer, attended to before every sequence",
    )
    prompt_init_text: str | None = Field(
        default=None,
        description="prompt_tuning: start the virtual tokens from this text's token embeddings (repeated or cut to "
        "num_virtual_tokens); default: random",
    )
    prefix_projection: bool = Field(
        default=False,
        description="prefix_tuning: learn the prefix through a two-layer MLP (the paper's reparameterisation, "
        "steadier training, more trainable parameters); final/ keeps the prefix it computes",
    )

    @model_validator(mode="after")
    def _options_of_the_method(self) -> PeftSection:
        # an option another method reads would be silently ignored
        if self.prompt_init_text is not None and self.method != "prompt_tuning":
            raise ValueError(f"peft.prompt_init_text is for peft.method prompt_tuning, not {self.method}: remove it")
        if self.prefix_projection and self.method != "prefix_tuning":
            raise ValueError(f"peft.prefix_projection is for peft.method prefix_tuning, not {self.method}: remove it")
        return self


class TrainSpec(BaseModel):
    """Everything one training worker needs: the job less its `cluster` section."""

    model_config = ConfigDict(extra="forbid")

    stage: str = Field(description="the job's stage")
    model: ModelConfig = Field(description="the job's model section")
    data: DataConfig = Field(description="the job's data section")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="the job's training section")
    peft: PeftSection = Field(default_factory=PeftSection, description="the job's peft section")
    deepspeed: DeepSpeedSection | None = Field(default_factory=DeepSpeedSection, description="None: no DeepSpeed")
    output: OutputConfig = Field(description="the job's output section")
