"""The four PPO roles as Ray actor classes: policy, critic, reference and reward.

Each class is plain Python (tests can build one in-process); `tuneyard.rlhf.ppo.groups` makes Ray actors
of it. The ranks of one role form their own torch.distributed group (gloo on CPU, NCCL on GPUs) and
the trainable roles (policy, critic) hold a DeepSpeed engine with ZeRO 0-3; the reference and the
reward model run inference only, under ZeRO-3 when their `zero_stage` is 3. Batches arrive as the
layout of `tuneyard.rlhf.ppo.batches`; every method a group calls is collective over its ranks.
"""

from __future__ import annotations

import logging
import os
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from tuneyard.cluster.worker_group import join_process_group, rendezvous_address
from tuneyard.rlhf.config import PpoSection, RewardSection
from tuneyard.rlhf.ppo import algorithms as algo
from tuneyard.rlhf.ppo.batches import select_rows
from tuneyard.rlhf.ppo.chunked_logprobs import ChunkedScorer
from tuneyard.rlhf.ppo.generation import HFGenerator, whole_weights
from tuneyard.rlhf.ppo.sampling import StopSet, scoring_distribution
from tuneyard.training.config import ModelConfig, TrainSpec
from tuneyard.training.deepspeed_config import build_deepspeed_config, import_deepspeed_without_mlflow
from tuneyard.training.faults import apply_faults, nan_loss_steps, step_end_faults
from tuneyard.training.finetune_method import apply_finetune_method, keep_adapters_in_fp32, quantization_config
from tuneyard.training.model import load_model, load_tokenizer, resolved_precision
from tuneyard.training.nonfinite import any_rank_true, drop_nonfinite_gradients, innermost_torch_optimizer
from tuneyard.training.run_dir import note_heartbeat, set_status

log = logging.getLogger(__name__)


def micro_batches(batch: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive chunks of at most `size` rows."""
    rows = next(iter(batch.values())).shape[0]
    return [select_rows(batch, slice(i, i + size)) for i in range(0, rows, size)]


def engine_config(spec: TrainSpec, zero_stage: int, micro: int, accumulation: int) -> dict:
    """A complete DeepSpeed dict (no "auto" left: no HF trainer fills them) for one role's engine."""
    section = spec.deepspeed.model_copy(update={"zero_stage": zero_stage}) if spec.deepspeed else None
    config = build_deepspeed_config(section, cuda=torch.cuda.is_available()) if section else {}
    config["zero_optimization"] = {
        k: v for k, v in config.get("zero_optimization", {"stage": 0}).items() if v != "auto"
    }
    precision = resolved_precision(spec.training.precision)
    config.update(
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=accumulation,
        gradient_clipping=spec.training.max_grad_norm,
        bf16={"enabled": precision == "bf16"},
        fp16={"enabled": precision == "fp16"},
        # a client optimizer (torch's AdamW) under ZeRO; DeepSpeed's fused Adam would be JIT-built for CUDA
        zero_allow_untested_optimizer=True,
    )
    return config


class RoleWorker:
    """What every role's actor shares: its rank, the group's rendezvous, logging to RUN_DIR/logs."""

    role = "role"

    def __init__(self, rank: int, world_size: int, run_dir: str, payload: dict):
        self.rank, self.world_size, self.run_dir = rank, world_size, Path(run_dir)
        apply_faults(payload.get("faults", {}))
        self.spec = TrainSpec.model_validate(payload["spec"])
        self.ppo = PpoSection.model_validate(payload["ppo"])
        self.reward = RewardSection.model_validate(payload["reward"])
        self.total_iterations: int = payload["total_iterations"]
        self.critic_source: str | None = payload.get("critic_source")
        # every log-prob is scored under the distribution the answers were sampled from
        self.distribution = scoring_distribution(self.ppo.generation)
        self.scorer = ChunkedScorer(self.ppo.logprob_chunk_tokens, self.distribution)
        self.engine = None
        self.skipped_now = False  # the current optimizer step met a NaN/inf loss or gradient

    def rendezvous_address(self) -> str:
        """tcp://ip:port of this (rank 0) actor, where the group's ranks meet."""
        return rendezvous_address()

    def setup(self, address: str, timeout_s: float = 1800) -> None:
        """Join the role's process group and build the model (a collective over the role's ranks)."""
        from tuneyard.training.worker_start import redirect_output, watch_start_up

        redirect_output(self.run_dir / "logs" / f"{self.role}-{self.rank}.log")
        watch_start_up(self.run_dir, f"{self.role} rank {self.rank}")
        log.info("%s rank %d of %d: pid %d", self.role, self.rank, self.world_size, os.getpid())
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        # Ray shows a role actor only its own GPU (if any), so that GPU is cuda:0 whatever the rank
        join_process_group(self.rank, self.world_size, 0, address, backend, timeout_s)
        import_deepspeed_without_mlflow()
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        torch.manual_seed(self.spec.training.seed)
        if self.rank == 0:
            set_status(self.run_dir, f"{self.role}: loading the model and building its DeepSpeed engine")
        self.build()

    def build(self) -> None:
        """Load the role's model; each role defines it."""
        raise NotImplementedError

    def zero_stage(self) -> int:
        """This role's ZeRO stage (`RolesSection.zero_stage_of`: its own, else the job's or 0 by role)."""
        job_zero_stage = self.spec.deepspeed.zero_stage if self.spec.deepspeed is not None else 0
        return self.ppo.roles.zero_stage_of(self.role, job_zero_stage)

    def _inference_engine(self, model: torch.nn.Module):
        """A ZeRO-3 inference engine over `model` when the role's stage is 3; else None (the model as it is)."""
        if self.zero_stage() != 3 or self.spec.deepspeed is None:
            return None
        import deepspeed

        config = engine_config(self.spec, 3, micro=self.ppo.micro_batch_size, accumulation=1)
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()
        return engine

    def _train_engine(self, model: torch.nn.Module, zero_stage: int, learning_rate: float):
        """A DeepSpeed engine with AdamW and the job's LR schedule over the trainable parameters."""
        import deepspeed
        from transformers import get_scheduler

        per_rank = self.ppo.mini_batch_size // self.world_size
        micro = min(self.ppo.micro_batch_size, per_rank)
        training = self.spec.training
        params = [p for p in model.parameters() if p.requires_grad]
        samples = self.ppo.rollout_batch_size * self.ppo.samples_per_prompt
        total = max(1, self.total_iterations * self.ppo.ppo_epochs * samples // self.ppo.mini_batch_size)
        warmup = training.warmup_steps or int(training.warmup_ratio * total)

        def schedule(opt):
            return get_scheduler(training.lr_scheduler, opt, num_warmup_steps=warmup, num_training_steps=total)

        config = engine_config(self.spec, zero_stage, micro=micro, accumulation=per_rank // micro)
        if "optimizer" in config:  # offloaded optimizer state: DeepSpeed builds its CPU Adam from the config
            config["optimizer"]["params"] = {"lr": learning_rate, "weight_decay": training.weight_decay}
            optimizer = None
        else:
            optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=training.weight_decay)
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, model_parameters=params, lr_scheduler=schedule, config=config
        )
        inner = innermost_torch_optimizer(engine.optimizer)
        if inner is not None:  # ZeRO-0's plain AdamW has no overflow check of its own (tuneyard.training.nonfinite)
            inner.register_step_pre_hook(self._drop_nonfinite_gradients)
        return engine

    def _drop_nonfinite_gradients(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self.skipped_now |= drop_nonfinite_gradients(optimizer)

    def checked_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to step on: NaN on every rank of the role when any rank's is NaN/inf, so all skip the step."""
        step = self.engine.global_steps + 1
        if self.rank == 0 and self.role == "policy" and step in nan_loss_steps():
            loss = loss * float("nan")
        if any_rank_true(not bool(torch.isfinite(loss.detach()).all()), loss.device):
            self.skipped_now = True
            return loss * float("nan")
        return loss

    def began_step(self) -> int:
        """Note in RUN_DIR/ranks that this rank began its next optimizer step; the step's number."""
        step = self.engine.global_steps + 1
        note_heartbeat(self.run_dir, f"{self.role}-{self.rank}", step, "began")
        return step

    def finished_step(self, step: int) -> None:
        """Note that this rank is past every collective of optimizer step `step` (and obey a test's hold)."""
        note_heartbeat(self.run_dir, f"{self.role}-{self.rank}", step, "finished")
        if self.role == "policy":
            step_end_faults(step, self.rank)

    def step_was_skipped(self, skipped_before: int) -> bool:
        """Whether the optimizer step just taken was dropped for NaN/inf (by this hook or DeepSpeed's check)."""
        skipped = self.skipped_now or self.engine.skipped_steps > skipped_before
        self.skipped_now = False
        return skipped

    def save_checkpoint(self, folder: str) -> None:
        """The engine's DeepSpeed state (weights, optimizer, scheduler) into `folder` (collective)."""
        self.engine.save_checkpoint(folder, tag="state")

    def load_checkpoint(self, folder: str) -> None:
        """Restore what `save_checkpoint` wrote."""
        from tuneyard.training.universal_checkpoint import load_engine_checkpoint

        path, _ = load_engine_checkpoint(self.engine, folder, tag="state")  # another rank count: its universal copy
        if path is None:
            raise RuntimeError(f"{self.role}: no DeepSpeed checkpoint in {folder}")

    def save_final(self, folder: str) -> None:
        """The model as a Hugging Face folder (safetensors), written by rank 0 (ZeRO-3 shards gathered)."""
        with whole_weights(self.engine) as module:
            if self.rank == 0:
                module.save_pretrained(folder, safe_serialization=True)
                self.tokenizer.save_pretrained(folder)
        dist.barrier()


def sequence_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """The model's forward over the sample layout (no KV cache)."""
    return model(
        input_ids=batch["sequences"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
    )


def response_tokens(micro: dict[str, torch.Tensor]) -> torch.Tensor:
    """The response tokens of a micro-batch [B, R]: the last R positions of its sequences."""
    return micro["sequences"][:, -micro["action_mask"].shape[1] :]


@torch.no_grad()
def response_logprobs(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    micro_size: int,
    scorer: ChunkedScorer,
    entropy: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-token log-probs of the responses under `model`'s sampling distribution (the scorer's temperature and
    top_p), and its entropy, micro-batched."""
    out: dict[str, list[torch.Tensor]] = {"logprobs": [], "entropy": []}
    for micro in micro_batches(batch, micro_size):
        logprobs, entropies = scorer(model, partial(sequence_forward, model, micro), response_tokens(micro), entropy)
        out["logprobs"].append(logprobs)
        if entropy:
            out["entropy"].append(entropies)
    return {k: torch.cat(v) for k, v in out.items() if v}


class PolicyWorker(RoleWorker):
    """The policy: generates rollouts with its current weights, scores its own log-probs, trains.

    With a LoRA/QLoRA policy it also serves the reference: the same base with the adapter disabled.
    """

    role = "policy"

    def __init__(self, rank: int, world_size: int, run_dir: str, payload: dict):
        super().__init__(rank, world_size, run_dir, payload)
        self.stops = StopSet.from_dict(payload["stops"])
        self.send_tied_head = True  # until the engines say whether their heads keep copies (weight_manifest)
        self.sync_manifest: list = []  # what each sync sends, in order (weight_manifest)
        self.taken_logprobs: dict[str, torch.Tensor] | None = None  # what the last train_step took (update_logprobs)

    def build(self) -> None:
        spec, peft = self.spec, self.spec.peft
        self.tokenizer = load_tokenizer(spec.model, spec.data.chat_template)
        quantization = quantization_config(peft) if peft.method == "qlora" else None
        model = load_model(spec.model, self.tokenizer, quantization)
        model.config.use_cache = False
        model = apply_finetune_method(model, peft, spec.training.gradient_checkpointing)
        if peft.method == "qlora":
            keep_adapters_in_fp32(model)
        self.engine = self._train_engine(model, self.zero_stage(), spec.training.learning_rate)
        self.generator = HFGenerator(lambda: whole_weights(self.engine), self.tokenizer, self.stops)

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, seed: int) -> list[list[int]]:
        """Responses to this rank's prompts (collective under ZeRO-3: the shards are gathered)."""
        return self.generator.generate(prompt_ids, prompt_mask, self.ppo.generation, seed + 7919 * self.rank)

    def weight_sync_address(self, world_size: int, timeout_s: float) -> str:
        """(rank 0) Open the store of the weight-sync group with the rollout engines; its tcp:// address."""
        import ray

        from tuneyard.rlhf.ppo.weight_sync import sync_store

        self.sync_store, address = sync_store(ray.util.get_node_ip_address(), world_size, timeout_s)
        return address

    def join_weight_sync(self, world_size: int, backend: str, timeout_s: float) -> None:
        """(rank 0) Join the weight-sync group as its rank 0 (blocks until every engine worker has joined)."""
        from tuneyard.rlhf.ppo.weight_sync import open_sync_group

        self.sync_group = open_sync_group("", 0, world_size, backend, timeout_s, store=self.sync_store)
        self.sync_timeout_s = timeout_s

    def weight_manifest(self, tied_head: bool) -> list:
        """Name, shape and dtype of each tensor a sync sends (collective under ZeRO-3; rank 0's is the one used);
        `tied_head`: a tied output head is sent too (the engines keep a copy of their own)."""
        from tuneyard.rlhf.ppo.weight_sync import manifest_of

        self.send_tied_head = tied_head
        self.sync_manifest = manifest_of(self.engine.module, tied_head)
        return self.sync_manifest

    def send_weights(self) -> int:
        """Broadcast the current weights to the rollout engines (collective under ZeRO-3); the bytes sent."""
        from tuneyard.rlhf.ppo.weight_sync import send_weights

        group = getattr(self, "sync_group", None) if self.rank == 0 else None
        timeout_s = getattr(self, "sync_timeout_s", 1800.0)
        return send_weights(self.engine.module, group, timeout_s, self.send_tied_head, self.sync_manifest)

    def logprobs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-token log-probs and entropy of the responses under the current weights (the rollout's "old")."""
        module = self.engine.module
        was_training = module.training
        module.eval()
        out = response_logprobs(module, batch, self.ppo.micro_batch_size, self.scorer, entropy=True)
        module.train(was_training)
        return out

    def reference_logprobs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The reference's log-probs: this base with the adapter disabled (LoRA/QLoRA policies only)."""
        module = self.engine.module
        was_training = module.training
        module.eval()
        with module.disable_adapter():
            out = response_logprobs(module, batch, self.ppo.micro_batch_size, self.scorer)
        module.train(was_training)
        return out

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimizer step on this rank's share of a mini-batch (micro-batches accumulate).

        A batch without old log-probs takes them from this step's own forward (the weights before the step; the
        ratio is 1 there), weighs each token by the rollout correction against the engine's log-probs it carries, and
        keeps those log-probs and the entropy for `update_logprobs`."""
        step = self.began_step()
        self.engine.train()
        totals: dict[str, float] = {}
        skipped_before = self.engine.skipped_steps
        chunks = micro_batches(batch, self.engine.train_micro_batch_size_per_gpu())
        ppo = self.ppo
        # clip-higher: each bound its own width where set, else clip_range's
        low = ppo.clip_range if ppo.clip_range_low is None else ppo.clip_range_low
        high = ppo.clip_range if ppo.clip_range_high is None else ppo.clip_range_high
        taken: dict[str, list[torch.Tensor]] = {"logprobs": [], "entropy": []}
        for micro in chunks:
            forward = partial(sequence_forward, self.engine, micro)
            logprobs, entropies = self.scorer(self.engine, forward, response_tokens(micro), entropy=True)
            mask = micro["action_mask"]
            old, weights = micro.get("old_logprobs"), micro.get("behaviour_weights")
            if old is None:
                old = logprobs.detach()
                taken["logprobs"].append(old)
                taken["entropy"].append(entropies.detach())
                if "behaviour_logprobs" in micro:
                    weights = algo.rollout_correction_weights(
                        ppo.rollout_correction, old, micro["behaviour_logprobs"], mask, ppo.tis_cap
                    )
            loss, stats = algo.policy_loss(
                logprobs,
                old,
                micro["advantages"],
                mask,
                low,
                clip_range_high=high,
                dual_clip=ppo.dual_clip,
                aggregation=ppo.loss_aggregation,
                token_weights=weights,
            )
            entropy = algo.aggregate(entropies, mask, ppo.loss_aggregation)
            total = loss - ppo.entropy_coef * entropy if ppo.entropy_coef else loss
            if "kl_coef" in micro:  # ppo.kl.in: loss, the KL to the reference as a term of the policy's loss
                kl = algo.kl_loss(
                    logprobs, micro["ref_logprobs"], mask, ppo.kl.estimator, ppo.kl.clamp, ppo.loss_aggregation
                )
                total = total + micro["kl_coef"][0] * kl
                stats["kl_loss"] = kl.detach()
            self.engine.backward(self.checked_loss(total))
            self.engine.step()
            figures = {"policy_loss": loss.item(), "entropy": entropy.item(), **{k: v.item() for k, v in stats.items()}}
            for key, value in figures.items():
                if key == "ratio_max_dev":
                    totals[key] = max(totals.get(key, 0.0), value)
                else:
                    totals[key] = totals.get(key, 0.0) + value / len(chunks)
        totals["lr"] = self.engine.get_lr()[0]
        totals["policy_skipped"] = float(self.step_was_skipped(skipped_before))
        self.taken_logprobs = {k: torch.cat(v) for k, v in taken.items()} if taken["logprobs"] else None
        self.finished_step(step)
        return totals

    def update_logprobs(self) -> dict[str, torch.Tensor]:
        """The log-probs and entropy the last `train_step` took of its rows before its optimizer step (in its
        batch's order), for a batch that came without old log-probs."""
        if self.taken_logprobs is None:
            raise RuntimeError("policy: the last train_step had old log-probs, so it took none of its own")
        return self.taken_logprobs


class ValueModel(torch.nn.Module):
    """A sequence classifier read at every position: its backbone's hidden states through its one-output head."""

    def __init__(self, classifier: torch.nn.Module):
        super().__init__()
        self.classifier = classifier
        self.backbone = getattr(classifier, classifier.base_model_prefix)
        self.head = getattr(classifier, "score", None) or classifier.classifier

    def forward(self, input_ids, attention_mask, position_ids, use_cache=False) -> torch.Tensor:
        """Values [B, L], one per position."""
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache
        ).last_hidden_state
        return self.head(hidden).squeeze(-1).float()


class CriticWorker(RoleWorker):
    """The critic: a value per response token; trained on the returns with a clipped value loss."""

    role = "critic"

    def build(self) -> None:
        spec = self.spec
        self.tokenizer = load_tokenizer(spec.model, spec.data.chat_template)
        model_cfg = spec.model.model_copy(update={"name_or_path": self.critic_source})  # the policy's settings
        classifier = load_model(model_cfg, self.tokenizer, task="sequence-classification")
        if spec.training.gradient_checkpointing:
            classifier.gradient_checkpointing_enable()
        learning_rate = self.ppo.critic_learning_rate or spec.training.learning_rate
        self.engine = self._train_engine(ValueModel(classifier), self.zero_stage(), learning_rate)

    @torch.no_grad()
    def values(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """V(s_t) for each response token t: the value at the position that predicts it."""
        module = self.engine.module
        module.eval()
        width = batch["action_mask"].shape[1]
        out = [sequence_forward(module, m)[:, -width - 1 : -1] for m in micro_batches(batch, self.ppo.micro_batch_size)]
        module.train()
        return {"values": torch.cat(out)}

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimizer step of the value loss on this rank's share of a mini-batch."""
        step = self.began_step()
        self.engine.train()
        width = batch["action_mask"].shape[1]
        totals: dict[str, float] = {}
        skipped_before = self.engine.skipped_steps
        chunks = micro_batches(batch, self.engine.train_micro_batch_size_per_gpu())
        for micro in chunks:
            values = sequence_forward(self.engine, micro)[:, -width - 1 : -1]
            loss, stats = algo.value_loss(
                values,
                micro["old_values"],
                micro["returns"],
                micro["action_mask"],
                self.ppo.value_clip_range,
                aggregation=self.ppo.loss_aggregation,
            )
            self.engine.backward(self.checked_loss(self.ppo.value_loss_coef * loss))
            self.engine.step()
            for key, value in {"value_loss": loss.item(), **{k: v.item() for k, v in stats.items()}}.items():
                totals[key] = totals.get(key, 0.0) + value / len(chunks)
        totals["critic_skipped"] = float(self.step_was_skipped(skipped_before))
        self.finished_step(step)
        return totals

    def save_final(self, folder: str) -> None:
        """The critic as a Hugging Face sequence-classification folder (its head is the value head)."""
        with whole_weights(self.engine) as module:
            if self.rank == 0:
                module.classifier.save_pretrained(folder, safe_serialization=True)
                self.tokenizer.save_pretrained(folder)
        dist.barrier()


class ReferenceWorker(RoleWorker):
    """The frozen starting policy: per-token log-probs for the KL penalty."""

    role = "reference"

    def build(self) -> None:
        self.tokenizer = load_tokenizer(self.spec.model, self.spec.data.chat_template)
        self.model = load_model(self.spec.model, self.tokenizer).eval()
        self.model.requires_grad_(False)
        self.engine = self._inference_engine(self.model)

    def logprobs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-token reference log-probs of the responses."""
        model = self.engine.module if self.engine is not None else self.model
        return response_logprobs(model, batch, self.ppo.micro_batch_size, self.scorer)


class RewardWorker(RoleWorker):
    """A reward model (from `stage: reward`) scoring decoded conversations with its own tokenizer.

    The policy's responses arrive as text and are re-tokenised here: a reward model trained with
    another tokenizer (or chat template) scores what it was trained on, not the policy's token ids.
    """

    role = "reward"

    def build(self) -> None:
        path = self.reward.model
        assert path is not None
        cfg = ModelConfig(
            name_or_path=path,
            trust_remote_code=self.spec.model.trust_remote_code,
            allow_pickle=self.spec.model.allow_pickle,
        )
        self.tokenizer = load_tokenizer(cfg)
        self.model = load_model(cfg, self.tokenizer, task="sequence-classification").eval()
        self.model.requires_grad_(False)
        self.engine = self._inference_engine(self.model)

    @torch.no_grad()
    def score(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        """One scalar per (prompt, response), read by the reward model from its own rendering of the text."""
        from tuneyard.rlhf.ppo.scoring import reward_model_scores

        model = self.engine.module if self.engine is not None else self.model
        return reward_model_scores(model, self.tokenizer, prompts, responses, self.ppo.micro_batch_size)
