"""The driver's checks of a job before any worker starts: the model source, the training options, trackers, the
chat template, the rows of the stage's data (each stage's `preflight` in training/stages.py), the disk, and the
checkpoint a run would resume from."""

from __future__ import annotations

import importlib
from pathlib import Path

from tuneyard.launch.config import JobConfig
from tuneyard.training.config import ADAPTER_METHODS
from tuneyard.training.data.shards import plan_tasks
from tuneyard.training.data.sources import read_splits
from tuneyard.training.data.tokenize import CHAT_FORMATS, cache_key, default_cache_dir, tokenize_chat
from tuneyard.training.errors import UserError
from tuneyard.training.model import check_model_source, load_tokenizer
from tuneyard.training.run_dir import resume_checkpoint
from tuneyard.training.stages import stage_spec, stages_where
from tuneyard.training.tracking import check_trackers
from tuneyard.training.universal_checkpoint import prepare_resize, written_ranks

TORCH_ADAMW = ("adamw_torch", "adamw_torch_fused")  # the default; PPO's roles build torch's AdamW themselves


def preflight(job: JobConfig) -> None:
    """Catch the user's mistakes on the driver, before any worker starts."""
    if job.model.init == "pretrained":
        assert job.model.name_or_path is not None
        check_model_source(job.model.name_or_path, allow_pickle=job.model.allow_pickle)
    check_length_fits_model(job)
    check_sequence_parallel_heads(job)
    check_training_options(job)
    check_trackers(job.training)
    module, _, function = stage_spec(job.stage).preflight.partition(":")
    getattr(importlib.import_module(module), function)(job)


STRETCHING_ROPE = ("linear", "dynamic", "yarn")  # rope scalings that lengthen the positions the model was built for


def usable_length(config) -> int | None:
    """The longest sequence a transformers config's positions cover (None: it sets no limit, e.g. relative ones)."""
    limit = next(
        (
            getattr(config, k)
            for k in ("max_position_embeddings", "n_positions")
            if isinstance(getattr(config, k, None), int)
        ),
        None,
    )
    if limit is None:
        return None
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    # transformers 5 may keep one set of rope parameters per attention type (gemma3: full and sliding)
    ropes = ([r for r in rope.values() if isinstance(r, dict)] or [rope]) if isinstance(rope, dict) else []
    usable = limit
    for rope in ropes:
        factor = rope.get("factor")
        if (
            rope.get("rope_type", rope.get("type")) in STRETCHING_ROPE
            and isinstance(factor, int | float)
            and factor > 1
        ):
            # yarn may give the pre-stretch length as original_max_position_embeddings (then the limit is stretched)
            base = rope.get("original_max_position_embeddings") or limit
            usable = max(usable, int(base * factor))
    return usable


def model_config_for_length(job: JobConfig):
    """The job's model config (the scratch architecture, or a local or cached pretrained one); None if unreadable."""
    from transformers import AutoConfig

    try:
        if job.model.init == "scratch":
            assert job.model.architecture is not None
            architecture = dict(job.model.architecture)
            return AutoConfig.for_model(architecture.pop("model_type"), **architecture)
        assert job.model.name_or_path is not None
        return AutoConfig.from_pretrained(
            job.model.name_or_path, trust_remote_code=job.model.trust_remote_code, local_files_only=True
        )
    except (OSError, ValueError, TypeError, KeyError):  # a hub id not cached yet: the workers download it
        return None


def check_length_fits_model(job: JobConfig) -> None:
    """The sequences the job builds fit the model's positions: data.max_length (PPO: prompt plus answer)."""
    config = model_config_for_length(job)
    limit = usable_length(config) if config is not None else None
    if limit is None:
        return
    source = job.model.name_or_path if job.model.init == "pretrained" else "model.architecture"
    if stage_spec(job.stage).controller:
        length = job.ppo.max_prompt_length + job.ppo.response_tokens
        if length > limit:
            answer = (  # a multi-turn episode's tokens after its prompt are bounded by environment.max_tokens
                f"ppo.environment.max_tokens ({job.ppo.environment.max_tokens})"
                if job.ppo.response_tokens > job.ppo.generation.max_new_tokens
                else f"ppo.generation.max_new_tokens ({job.ppo.generation.max_new_tokens})"
            )
            raise UserError(
                f"ppo.max_prompt_length ({job.ppo.max_prompt_length}) plus {answer} is {length} tokens, more than "
                f"the {limit} positions of the model ({source}); lower one of them so that their sum is at most {limit}"
            )
        return
    if job.data.max_length > limit:
        raise UserError(
            f"data.max_length ({job.data.max_length}) is longer than the {limit} positions of the model ({source}: "
            f"max_position_embeddings, with its rope scaling); set data.max_length to at most {limit}"
        )


def templated_tokenizer(job: JobConfig):
    """The job's tokenizer with its data.chat_template, the template checked (check_chat_template)."""
    tokenizer = load_tokenizer(job.model, job.data.chat_template)
    check_chat_template(job, tokenizer)
    return tokenizer


def check_causal_lm_rows(job: JobConfig) -> None:
    """pretrain and sft: the chat template, and the rows unless the tokenised cache already holds them."""
    tokenizer = templated_tokenizer(job)
    if job.data.streaming:  # rows are checked as the shards are tokenised: reading them all here is what it avoids
        plan_tasks(job.data)  # the sources exist and are files it reads
        return
    cache = default_cache_dir(job.data, job.output) / cache_key(job.stage, job.data, tokenizer, job.training.seed)
    if not (cache / "ready").exists():
        train, _ = read_splits(job.data, job.training.seed)  # malformed rows, missing fields, empty data
        calling = next((row for row in train if any(m.get("tool_calls") for m in row.get("messages", []))), None)
        if calling is not None:  # refused when the chat template would leave the calls out
            tokenize_chat(tokenizer, calling["messages"], job.data.train_on, calling.get("tools"))


def check_preference_rows(job: JobConfig) -> None:
    """The TRL stages: format, fields, pairs and empty data; their rewards and their teacher."""
    from tuneyard.rlhf.preference_recipe import check_teacher, reward_functions
    from tuneyard.rlhf.trl_rows import rlhf_datasets

    tokenizer = templated_tokenizer(job)
    rlhf_datasets(job.stage, job.data, tokenizer, job.training.seed)
    sections = stage_spec(job.stage).sections
    if "reward" in sections:  # named functions registered, the reward model a one-output classifier
        reward_functions(job.stage, job.stage_sections(), allow_pickle=job.model.allow_pickle)
    if "distill" in sections and job.distill.teacher:  # a model folder of the student's vocabulary
        check_teacher(job.distill.teacher, tokenizer, allow_pickle=job.model.allow_pickle)


def check_task_head_rows(job: JobConfig) -> None:
    """classify and token-classify: fields, BIO tags and label sets, each refused at its file:line."""
    from tuneyard.training.data.labels import task_datasets

    tokenizer = templated_tokenizer(job)
    task_datasets(job.stage, job.data, tokenizer, job.training.seed)


def check_ppo_job(job: JobConfig) -> None:
    """PPO: the prompts and their lengths, the rewards, and where the critic starts."""
    from tuneyard.rlhf.ppo.controller import prepare_ppo

    prepare_ppo(job.train_spec(), job.ppo, job.reward)


def check_sequence_parallel_heads(job: JobConfig) -> None:
    """Ulysses attention gives each of training.sequence_parallel ranks an equal share of the attention heads."""
    n = job.training.sequence_parallel
    config = model_config_for_length(job) if n > 1 else None
    if config is None:
        return
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads is None:
        return
    source = job.model.name_or_path if job.model.init == "pretrained" else "model.architecture"
    if heads % n or (kv_heads % n and n % kv_heads):
        raise UserError(
            f"training.sequence_parallel ({n}) must divide the model's {heads} attention heads, and divide its "
            f"{kv_heads} key/value heads or be a multiple of them ({source}): Ulysses attention gives each rank an "
            f"equal share of the heads; choose a sequence_parallel that does"
        )


def check_training_options(job: JobConfig) -> None:
    """training.optim names an optimizer transformers has; early stopping and keep_best have evaluations to read."""
    training, output = job.training, job.output
    if training.optim not in TORCH_ADAMW:  # transformers has these: its Trainer's modules cost the driver 1 s
        from transformers.training_args import OptimizerNames

        names = sorted(o.value for o in OptimizerNames)
        if training.optim not in names:
            raise UserError(
                f"training.optim: '{training.optim}' is not an optimizer transformers has; names are {names}"
            )
    if stage_spec(job.stage).controller and (
        training.optim not in TORCH_ADAMW or training.early_stopping or output.keep_best
    ):
        raise UserError(
            "training.optim, training.early_stopping and output.keep_best apply to the stages that run a Hugging Face "
            "trainer; PPO's roles use AdamW and keep the last checkpoints: remove them from this job"
        )
    watched = [
        (key, metric)
        for key, metric in (
            ("training.early_stopping", training.early_stopping and training.early_stopping.metric),
            ("output.keep_best", output.keep_best),
        )
        if metric
    ]
    if not watched:
        return
    key = watched[0][0]
    if len({metric.removeprefix("eval_") for _, metric in watched}) > 1:
        raise UserError(
            f"training.early_stopping.metric ({watched[0][1]}) and output.keep_best ({watched[1][1]}) differ; the "
            "trainer tracks one best metric: give both the same"
        )
    if not stage_spec(job.stage).evaluates(job.data) or not training.eval_steps:
        unevaluated = " and ".join(stages_where(lambda s: not s.trainer_evaluates and not s.controller))
        raise UserError(
            f"{key} reads evaluations: give held-out data (data.eval or data.eval_fraction; {unevaluated} have "
            "none) and training.eval_steps"
        )
    if output.keep_best and (not output.save_steps or output.save_steps % training.eval_steps):
        raise UserError(
            f"output.keep_best keeps a checkpoint saved where an evaluation scored best, so output.save_steps "
            f"({output.save_steps}) must be a multiple of training.eval_steps ({training.eval_steps})"
        )


def check_chat_template(job: JobConfig, tokenizer) -> None:
    """A chat SFT needs a template to render turns; new template tokens need embeddings that train."""
    source = job.model.tokenizer or job.model.name_or_path
    if stage_spec(job.stage).tokenised_on_driver and job.data.format in CHAT_FORMATS and not tokenizer.chat_template:
        raise UserError(
            f"the tokenizer of '{source}' has no chat template (a base model), and data.format "
            f"'{job.data.format}' is rendered with one; set data.chat_template: chatml (or a template TRL ships "
            "such as llama3 or qwen3, or a .jinja file)"
        )
    if job.data.chat_template and job.peft.method in ADAPTER_METHODS:
        base = load_tokenizer(job.model)
        added = [t for t in tokenizer.get_vocab() if t not in base.get_vocab()]
        if added:
            raise UserError(
                f"data.chat_template '{job.data.chat_template}' uses tokens the tokenizer of '{source}' lacks "
                f"({', '.join(sorted(added))}); their new embedding rows would stay untrained under "
                f"peft.method {job.peft.method}, so the model could not learn to end a turn. Use peft.method full "
                "or freeze, or a template whose tokens the tokenizer has"
            )


def check_disk(job: JobConfig, run_dir: Path) -> None:
    """Refuse before any worker starts when keep_last checkpoints and final/ would not fit on the output disk."""
    from tuneyard.launch.disk_check import check_free_space

    spec = stage_spec(job.stage)
    saves = job.output.save_steps or (spec.controller and job.ppo.save_every)
    # a scratch model's embeddings are as many as the tokenizer's tokens; a pretrained one has its own
    vocab = len(load_tokenizer(job.model, job.data.chat_template)) if job.model.init == "scratch" else 0
    check_free_space(job.train_spec(), run_dir, vocab, job.output.keep_last if saves else 0, spec.saved_models)


def prepare_resume_world_size(job: JobConfig, run_dir: Path, single: bool) -> None:
    """Make the checkpoint a run resumes from loadable on the job's ranks: a ZeRO save written by another number of
    ranks gets its universal copy (once, beside the original), or is refused with the reason."""
    checkpoint = resume_checkpoint(run_dir, job.output.resume)
    if checkpoint is None:
        return
    log_file = run_dir / "logs" / "universal-checkpoint.log"
    nvme = optimizer_on_nvme(job)
    if stage_spec(job.stage).controller:
        for role in ("policy", "critic") if job.ppo.has_critic else ("policy",):
            workers = getattr(job.ppo.roles, role).workers
            prepare_resize(checkpoint / role, workers, f"ppo.roles.{role}.workers", log_file, nvme)
        return
    written = written_ranks(checkpoint)
    if single and written is not None and written > 1:
        raise UserError(
            f"{checkpoint} was written by {written} workers under DeepSpeed ZeRO (its optimizer state is split "
            f"{written} ways), and --single runs without DeepSpeed, which alone can load it; run the job on Ray (drop "
            "--single; any cluster.workers, the checkpoint is converted), or start anew (another output.dir, or "
            "output.overwrite: true)"
        )
    if not single:
        prepare_resize(checkpoint, job.cluster.workers, "cluster.workers", log_file, nvme)


def optimizer_on_nvme(job: JobConfig) -> bool:
    """Whether the job's raw deepspeed.config offloads the optimizer state to NVMe (the switches offer CPU only)."""
    if not job.deepspeed.config:
        return False
    from tuneyard.training.deepspeed_config import build_deepspeed_config

    zero = build_deepspeed_config(job.deepspeed).get("zero_optimization", {})
    return (zero.get("offload_optimizer") or {}).get("device") == "nvme"
