"""The job file: YAML plus `key.sub=value` overrides, validated into one `JobConfig`."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tuneyard.cluster.config import ClusterConfig
from tuneyard.rlhf.config import StageSections
from tuneyard.training.config import (
    PROMPT_METHODS,
    DataConfig,
    DeepSpeedSection,
    ModelConfig,
    OutputConfig,
    PeftSection,
    TrainingConfig,
    TrainSpec,
)
from tuneyard.training.data.labels import task_head_problem
from tuneyard.training.errors import UserError
from tuneyard.training.stages import STAGES, stage_spec, stages_where

Stage = Literal[tuple(STAGES)]  # type: ignore[valid-type]  # the registered stages, in the table's order
# the sections only some stages read; a job's identity leaves out those its stage does not read
OPTIONAL_SECTIONS = tuple(StageSections.model_fields)


class JobConfig(StageSections):
    """One training job: the stage, the sections every stage shares, and the stage sections (StageSections)."""

    model_config = ConfigDict(extra="forbid")

    stage: Stage = Field(description="what the job trains: one of the registered stages (training/stages.py)")
    model: ModelConfig = Field(description="which model and tokenizer to start from")
    data: DataConfig = Field(description="the rows, their format, and how they become token sequences")
    training: TrainingConfig = Field(
        default_factory=TrainingConfig, description="optimisation: schedule, batch, run length, precision, eval"
    )
    peft: PeftSection = Field(
        default_factory=PeftSection, description="how much of the model trains: all of it, its top blocks, an adapter"
    )
    deepspeed: DeepSpeedSection = Field(
        default_factory=DeepSpeedSection, description="ZeRO stage and offloads, or a raw DeepSpeed JSON"
    )
    cluster: ClusterConfig = Field(
        default_factory=ClusterConfig, description="where the workers run (a Ray address) and what each one gets"
    )
    output: OutputConfig = Field(description="the run directory, checkpoints and resume")

    @model_validator(mode="after")
    def _sections_agree(self) -> JobConfig:
        spec = stage_spec(self.stage)
        policy_zero = self.ppo.roles.policy.zero_stage if spec.controller else None
        zero_stage = policy_zero if policy_zero is not None else self.deepspeed.zero_stage
        problem = task_head_problem(self.stage, self.data.format, self.peft.method)
        if problem:
            raise ValueError(problem)
        if self.peft.method not in spec.peft_methods:
            raise ValueError(peft_method_problem(self.peft.method, self.stage))
        if self.peft.method in PROMPT_METHODS:
            prompt_methods_fit(self)
        if self.stage == "kto" and self.kto.loss_type == "kto" and self.training.batch_size < 2:
            # TRL estimates KTO's KL term from each row's completion paired with another row's prompt in the batch
            raise ValueError(
                "stage kto estimates its KL term from the other rows of a worker's batch, so training.batch_size "
                "must be at least 2 (or use kto.loss_type apo_zero_unpaired, which has no KL term)"
            )
        if self.peft.method == "qlora" and zero_stage == 3 and spec.controller:
            raise ValueError(
                "peft.method qlora under ZeRO-3 (a 4-bit base sharded across ranks) runs in the stages on a Hugging "
                "Face trainer; PPO's policy gathers its whole weights to generate, which 4-bit storage does not "
                "support: use ppo.roles.policy.zero_stage 0-2 with qlora, or peft.method lora with ZeRO-3"
            )
        if self.stage == "distill" and not self.distill.teacher:
            raise ValueError(
                "stage distill needs a teacher: set distill.teacher to the teacher's model folder (e.g. "
                "runs/sft-tiny/final) or a hub id; it must share the student's tokenizer"
            )
        if self.reward.remote is not None and self.stage != "ppo" and "reward" in spec.sections:
            raise ValueError(
                f"reward.remote is scored by stage ppo's own loop, which leaves an answer whose call failed out of "
                f"the loss; stage {self.stage} runs TRL's trainer, which has no such answer. Use stage ppo (with "
                f"ppo.advantage: {'rloo' if self.stage == 'rloo' else 'grpo'} for this method), or remove reward.remote"
            )
        if self.training.sequence_parallel > 1:
            problem = sequence_parallel_problem(self)
            if problem:
                raise ValueError(problem)
        if self.data.streaming and not (spec.streaming and self.data.format == "text"):
            streamed = " and ".join(stages_where(lambda s: s.streaming))
            raise ValueError(
                f"data.streaming tokenises plain-text corpora for stage {streamed} (data.format: text); for stage "
                f"{self.stage} with data.format {self.data.format} remove it: those rows are read into memory"
            )
        return self

    def identity_dump(self) -> dict:
        """The job as a dict without the sections its stage does not read (what `job_identity` hashes).

        So a new stage's section, or a change to another stage's defaults, leaves existing runs' identity alone.
        """
        dump = self.model_dump(mode="json")
        for section in OPTIONAL_SECTIONS:
            if section not in stage_spec(self.stage).sections:
                dump.pop(section)
        return dump

    def train_spec(self, use_deepspeed: bool = True) -> TrainSpec:
        """The sections a training worker needs (all but `cluster`); no DeepSpeed for a single process."""
        spec = TrainSpec.model_validate(self.model_dump(exclude={"cluster", *OPTIONAL_SECTIONS}))
        return spec if use_deepspeed else spec.model_copy(update={"deepspeed": None})

    def stage_sections(self) -> StageSections:
        """The stage sections alone, for the workers of the stages that read them."""
        return StageSections.model_validate(self.model_dump(include=set(OPTIONAL_SECTIONS)))


def peft_method_problem(method: str, stage: str) -> str:
    """Why `method` does not train in `stage`: the stages it does train in, by the registry."""
    causal = stages_where(lambda s: method in s.peft_methods and s.task == "causal-lm")
    heads = stages_where(lambda s: method in s.peft_methods and s.task != "causal-lm")
    also = f" (it also trains in stages {' and '.join(heads)})" if heads and causal else ""
    where = " and ".join(causal or heads)
    return f"peft.method {method} trains in stages {where}; for stage {stage} use peft.method lora or qlora{also}"


SEQUENCE_PARALLEL_STAGES = ("pretrain", "sft")


def sequence_parallel_problem(job: JobConfig) -> str | None:
    """Why the job cannot share its sequences over training.sequence_parallel ranks (None: it can)."""
    n = job.training.sequence_parallel
    key = f"training.sequence_parallel ({n})"
    if job.stage not in SEQUENCE_PARALLEL_STAGES:
        return (
            f"{key} runs in stages pretrain and sft: DeepSpeed's sequence-parallel data adapter shards the input_ids "
            f"and labels of a causal-LM batch, and stage {job.stage}'s trainer feeds its model other batches "
            "(chosen/rejected pairs, prompts and completions, roles' rollouts); set it to 1"
        )
    if job.cluster.workers % n:
        return (
            f"{key} must divide cluster.workers ({job.cluster.workers}): each group of {n} consecutive ranks shares "
            f"a sequence; use {n * max(1, job.cluster.workers // n)} workers, or another sequence_parallel"
        )
    if job.data.max_length % n:
        return (
            f"{key} must divide data.max_length ({job.data.max_length}): each rank of a group takes an equal slice "
            f"of every sequence; use a max_length that is a multiple of {n}"
        )
    if job.deepspeed.config is None and job.deepspeed.zero_stage == 0:
        return (
            f"{key} runs under DeepSpeed ZeRO 1-3 (its sequence-parallel groups are built with ZeRO's): set "
            "deepspeed.zero_stage to 1, 2 or 3"
        )
    if job.model.attn_implementation == "eager":
        return f"{key} needs model.attn_implementation sdpa, flash_attention_2 or auto (Ulysses wraps those, not eager)"
    if job.peft.method in PROMPT_METHODS:
        return (
            f"{key} shares each sequence's tokens over ranks, and peft.method {job.peft.method} adds its virtual "
            "tokens on every rank's share: use peft.method lora or qlora, or sequence_parallel 1"
        )
    if job.training.neftune_noise_alpha is not None:
        return (
            f"{key}: NEFTune scales its noise by each rank's share of the sequence, not by the sequence; remove "
            "training.neftune_noise_alpha"
        )
    return None


def prompt_methods_fit(job: JobConfig) -> None:
    """Refuse what prompt and prefix tuning cannot train on: packed SFT rows, and a prefix under checkpointing."""
    method, tokens = job.peft.method, job.peft.num_virtual_tokens
    if job.stage == "sft" and job.data.packing:
        # PEFT puts the virtual tokens once before the row and drops (prompt) or shifts (prefix) the position ids
        # that restart at each packed example and keep it from attending to the one before
        raise ValueError(
            f"peft.method {method} puts its {tokens} virtual tokens before each row, and data.packing (on by "
            "default) packs several examples into a row whose later examples would then attend to the earlier "
            "ones rather than see the virtual tokens first (PEFT does not apply the position ids that keep them "
            "apart): set data.packing: false"
        )
    if method == "prefix_tuning" and job.training.gradient_checkpointing:
        # the prefix is a key/value cache; recomputing a layer appends to it a second time
        raise ValueError(
            "peft.method prefix_tuning hands the model its prefix as a key/value cache, which "
            "training.gradient_checkpointing's recomputation extends a second time (the shapes then disagree): set "
            "training.gradient_checkpointing: false, or use peft.method prompt_tuning"
        )


def apply_override(tree: dict, override: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (so 3e-4, true, [1,2] work)."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise UserError(f"override '{override}' is not of the form key.sub=value (e.g. training.max_steps=20)")
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"override '{override}': '{part}' holds a value, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(
            f"override '{override}': the value is not valid YAML ({problem}); close its brackets, or quote it "
            "as a string"
        ) from None


def _line_of(root: yaml.Node | None, path: tuple) -> int | None:
    """The 1-based line of the YAML node at `path` (keys and list indexes), if the file has it."""
    node, line = root, None
    for part in path:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if match is None:
                return line
            node, line = match[1], match[0].start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _fields_at(path: tuple) -> list[str]:
    """The valid keys of the config section that holds `path`'s last element."""
    model: Any = JobConfig
    for part in path[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        for candidate in candidates:
            for inner in [candidate, *getattr(candidate, "__args__", ())]:
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    model = inner
                    break
            else:
                continue
            break
        else:
            return []
    return list(getattr(model, "model_fields", {}))


def describe_validation_error(error: ValidationError, source: str, root: yaml.Node | None) -> str:
    """Turn pydantic's errors into lines naming the file, line, key and the fix."""
    lines = []
    for item in error.errors():
        path = tuple(p for p in item["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        dotted = ".".join(str(p) for p in path) or "(top level)"
        line = _line_of(root, path)
        where = f"{source}:{line}" if line else source
        if item["type"] == "extra_forbidden":
            valid = _fields_at(path)
            close = difflib.get_close_matches(str(path[-1]), valid, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys here: {', '.join(valid)}"
            lines.append(f"{where}: unknown key '{dotted}'; {hint}")
        elif item["type"] == "missing":
            lines.append(f"{where}: missing required key '{dotted}'")
        else:
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: '{dotted}': {message}")
    return "\n".join(lines)


def describe_yaml_error(exc: yaml.YAMLError, path: Path) -> str:
    """One line for a YAML syntax error: file:line:column, what is wrong, and the usual cause when it is a tab."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    text = f"{where}: not valid YAML ({f'{context}: ' if context else ''}{problem})"
    if "\\t" in problem or "tab" in problem:
        text += "; YAML indents with spaces, not tabs: replace the tab characters"
    return text


def repeated_keys(root: yaml.Node | None, source: str | Path) -> list[str]:
    """A line for each mapping key given twice anywhere in the composed YAML (PyYAML keeps the last silently)."""
    problems: list[tuple[int, str]] = []  # (line of the repeat, text), reported in file order
    seen_nodes: set[int] = set()  # an alias points at a node already walked (and may point back up)
    stack: list[tuple[yaml.Node, tuple]] = [(root, ())] if root is not None else []
    while stack:
        node, path = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first_line: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    line = key.start_mark.line + 1
                    dotted = ".".join(str(p) for p in (*path, key.value))
                    if (key.tag, key.value) in first_line:
                        first = first_line[(key.tag, key.value)]
                        problems.append(
                            (line, f"{source}:{first} and {source}:{line}: '{dotted}' is given twice; keep one")
                        )
                    else:
                        first_line[(key.tag, key.value)] = line
                    stack.append((value, (*path, key.value)))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, (*path, i)) for i, item in enumerate(node.value))
    return [text for _, text in sorted(problems)]


def load_yaml(text: str, source: str | Path) -> Any:
    """`yaml.safe_load`, refusing a mapping key given twice (UserError); YAML syntax errors are raised as they are."""
    problems = repeated_keys(yaml.compose(text), source)
    if problems:
        raise UserError("\n".join(problems))
    return yaml.safe_load(text)


def load_job(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Read a job YAML, apply overrides, validate; raise UserError listing every problem."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"job file {path} is a folder; give the job's YAML file")
    if not path.is_file():
        raise UserError(f"job file {path} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise UserError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the job file as UTF-8"
        ) from None
    try:
        tree = yaml.safe_load(text) or {}
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise UserError(describe_yaml_error(exc, path)) from None
    repeated = repeated_keys(root, path)
    if repeated:
        raise UserError("\n".join(repeated))
    if not isinstance(tree, dict):
        raise UserError(f"{path}: a job file is a mapping of sections (stage, model, data, ...)")
    for override in overrides or []:
        apply_override(tree, override)
    return job_from_dict(tree, source=str(path), root=root)


def job_from_dict(tree: dict, source: str = "<job>", root: yaml.Node | None = None) -> JobConfig:
    """Validate a job given as a nested dict."""
    try:
        job = JobConfig.model_validate(tree)
    except ValidationError as exc:
        raise UserError(f"{source} has errors:\n{describe_validation_error(exc, source, root)}") from None
    job = resolve_paths(job)
    if job.deepspeed.config:
        line = _line_of(root, ("deepspeed", "config"))
        check_deepspeed_json(Path(job.deepspeed.config), f"{source}:{line}" if line else source)
    return job


def check_deepspeed_json(path: Path, where: str) -> None:
    """The raw DeepSpeed config of deepspeed.config is part of the job: it must exist and be a JSON object."""
    if not path.is_file():
        raise UserError(
            f"{where}: deepspeed.config '{path}' does not exist (or is a folder); give a DeepSpeed JSON file"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{where}: deepspeed.config {path} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{where}: deepspeed.config {path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})"
        ) from None
    if not isinstance(config, dict):
        raise UserError(f'{where}: deepspeed.config {path} must hold a JSON object ({{"zero_optimization": ...}})')


def _absolute(path: str | None, must_exist_to_count: bool = False) -> str | None:
    """An absolute form of a local path; hub-style names (no such file, not path-like) stay as they are."""
    if path is None:
        return None
    from tuneyard.training.model import looks_like_local_path

    candidate = Path(path).expanduser()
    if must_exist_to_count and not (candidate.exists() or looks_like_local_path(path)):
        return path
    return str(candidate.resolve())


def resolve_paths(job: JobConfig) -> JobConfig:
    """Make every local path absolute (relative to the current directory): workers run elsewhere."""
    job.model.name_or_path = _absolute(job.model.name_or_path, must_exist_to_count=True)
    job.model.tokenizer = _absolute(job.model.tokenizer, must_exist_to_count=True)
    for source in [*job.data.train, *(job.data.eval or [])]:
        local = Path(source.path).suffix.lower() in (".jsonl", ".json", ".parquet", ".txt")
        source.path = _absolute(source.path) if local else _absolute(source.path, must_exist_to_count=True)
    job.data.cache_dir = _absolute(job.data.cache_dir)
    job.deepspeed.config = _absolute(job.deepspeed.config)
    job.output.dir = _absolute(job.output.dir)
    job.reward.model = _absolute(job.reward.model, must_exist_to_count=True)
    job.distill.teacher = _absolute(job.distill.teacher, must_exist_to_count=True)
    if job.output.resume not in ("auto", "never"):
        job.output.resume = _absolute(job.output.resume)
    return job


def dump_job(job: JobConfig) -> str:
    """The resolved job as YAML, defaults included: the shared sections first, then the stage sections."""
    dump = job.model_dump(mode="json")
    shared = {key: value for key, value in dump.items() if key not in OPTIONAL_SECTIONS}
    return yaml.safe_dump(shared | {key: dump[key] for key in OPTIONAL_SECTIONS}, sort_keys=False)
