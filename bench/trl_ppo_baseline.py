"""TRL's own PPOTrainer (trl.experimental.ppo, last shipped in TRL 1.12) timed on the bench's PPO job.

Runs in its own virtualenv (see bench/bench_ppo.py for how to build it), so it imports nothing from
tuneyard: one process, no Ray, no DeepSpeed. It reads a JSON file of paths and settings, trains
`iterations` PPO updates and writes a JSON result: per-update wall seconds, the generate / score / train
split of each update, samples/s (generated responses per second) and the library versions.

    python bench/trl_ppo_baseline.py SETTINGS.json RESULT.json
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path


def chat_prompts(path: str, tokenizer) -> list[list[int]]:
    """The prompts' token ids, rendered the way tuneyard's PPO renders them (chat template, ready for the answer)."""
    ids = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        prompt = json.loads(line)["prompt"]
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids


def install_phase_marks(ppo_trainer_module, marks: dict[str, list]) -> None:
    """Stamp the phase boundaries of each update, and time the trainer's own gc.collect() calls.

    TRL's PPOTrainer.train is one long loop with no phase timers, so the two module-level helpers it
    calls exactly once per update (with whiten_rewards off) are wrapped to stamp the clock. The loop
    also runs gc.collect() twice per update; that is TRL's cost too, but timed apart it explains it.
    """
    generate, whiten, gc_module = (
        ppo_trainer_module.batch_generation,
        ppo_trainer_module.masked_whiten,
        ppo_trainer_module.gc,
    )

    def timed_generation(*args, **kwargs):
        marks["generate_start"].append(time.perf_counter())
        out = generate(*args, **kwargs)
        marks["generate_end"].append(time.perf_counter())
        # (model, queries, ...) -> (query_responses, logits): the generated width, for comparing response lengths
        marks["width"].append(out[0].shape[1] - args[1].shape[1])
        return out

    def timed_whiten(*args, **kwargs):
        marks["scored"].append(time.perf_counter())
        return whiten(*args, **kwargs)

    class TimedGc:
        """The gc module, with collect() timed."""

        def __getattr__(self, name):
            return getattr(gc_module, name)

        def collect(self, *args):
            begin = time.perf_counter()
            try:
                return gc_module.collect(*args)
            finally:
                marks["gc"].append((begin, time.perf_counter()))

    ppo_trainer_module.batch_generation = timed_generation
    ppo_trainer_module.masked_whiten = timed_whiten
    ppo_trainer_module.gc = TimedGc()


def run(settings: dict) -> dict:
    """Train TRL PPO with the bench's settings; per-update timings and the steady-state samples/s."""
    import accelerate
    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_trainer_module

    torch.set_num_threads(settings.get("torch_threads", torch.get_num_threads()))
    torch.manual_seed(settings["seed"])
    tokenizer = AutoTokenizer.from_pretrained(settings["policy"])
    tokenizer.padding_side = "left"  # TRL's PPO expects left-padded queries
    dataset = datasets.Dataset.from_dict({"input_ids": chat_prompts(settings["prompts"], tokenizer)})
    fp32 = {"dtype": torch.float32}
    policy = AutoModelForCausalLM.from_pretrained(settings["policy"], **fp32)
    reference = AutoModelForCausalLM.from_pretrained(settings["policy"], **fp32)
    # TRL's value model starts from the reward model, as tuneyard's critic does with init: reward_model
    value_model = AutoModelForSequenceClassification.from_pretrained(settings["reward_model"], num_labels=1, **fp32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(settings["reward_model"], num_labels=1, **fp32)

    rollout, micro, mini = settings["rollout_batch_size"], settings["micro_batch_size"], settings["mini_batch_size"]
    config = PPOConfig(
        output_dir=settings["output_dir"],
        per_device_train_batch_size=micro,
        # TRL's rollout batch is per_device_train_batch_size x gradient_accumulation_steps prompts, one sample each
        gradient_accumulation_steps=rollout // micro,
        num_mini_batches=rollout // mini,
        num_ppo_epochs=settings["ppo_epochs"],
        total_episodes=settings["iterations"] * rollout,
        response_length=settings["max_new_tokens"],
        temperature=settings["temperature"],
        stop_token="eos",
        learning_rate=settings["learning_rate"],
        lr_scheduler_type="constant",
        kl_coef=settings["kl_coef"],
        cliprange=settings["clip_range"],
        cliprange_value=settings["value_clip_range"],
        vf_coef=settings["value_loss_coef"],
        gamma=settings["gamma"],
        lam=settings["lam"],
        seed=settings["seed"],
        # PPOConfig defaults to bf16 and gradient checkpointing; the bench compares fp32 without checkpointing
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        num_sample_generations=0,  # no extra eval generations inside the timed loop
        save_strategy="no",
        report_to=[],
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    ends: list[float] = []

    class StepClock(TrainerCallback):
        """Stamps the start of training and the end of every PPO update."""

        def on_train_begin(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    marks: dict = {"generate_start": [], "generate_end": [], "scored": [], "gc": [], "width": []}
    install_phase_marks(ppo_trainer_module, marks)
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=reference,
        reward_model=reward_model,
        train_dataset=dataset,
        value_model=value_model,
        callbacks=[StepClock()],
    )
    started = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - started

    updates = []
    for i in range(len(ends) - 1):
        begin, end = ends[i], ends[i + 1]
        updates.append(
            {
                "step": i + 1,
                "seconds": end - begin,
                # the previous update's clean-up (a gc.collect()) and fetching the next prompts
                "between_s": marks["generate_start"][i] - begin,
                # generation returns the logits too: TRL's old log-probs need no forward of their own
                "generate_s": marks["generate_end"][i] - marks["generate_start"][i],
                "score_s": marks["scored"][i] - marks["generate_end"][i],
                "train_s": end - marks["scored"][i],
                "gc_s": sum(b - a for a, b in marks["gc"] if begin <= a < end),
                "samples_per_s": rollout / (end - begin),
                "generated_width": marks["width"][i],
            }
        )
    steady = [u for u in updates if u["step"] > settings["skip"]]
    return {
        "updates": updates,
        "samples_per_s": statistics.median(u["samples_per_s"] for u in steady),
        "generate_s": statistics.median(u["generate_s"] for u in steady),
        "score_s": statistics.median(u["score_s"] for u in steady),
        "train_s": statistics.median(u["train_s"] for u in steady),
        "between_s": statistics.median(u["between_s"] for u in steady),
        "gc_s": statistics.median(u["gc_s"] for u in steady),
        "train_seconds": total,
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "python": sys.version.split()[0],
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "accelerate": accelerate.__version__,
            "datasets": datasets.__version__,
            "torch": torch.__version__,
        },
    }


def main() -> None:
    """Read the settings file, run, write the result file."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    settings_path, result_path = sys.argv[1:3]
    result = run(json.loads(Path(settings_path).read_text()))
    Path(result_path).write_text(json.dumps(result, indent=2))
    print(f"TRL PPO: {result['samples_per_s']:.1f} samples/s (steady state)", flush=True)


if __name__ == "__main__":
    main()
