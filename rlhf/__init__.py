"""Preference, RL and distillation stages on the Ray + DeepSpeed path.

`preference_recipe` runs the stages TRL trains in one SPMD worker group (reward models, DPO, KTO, GRPO, RLOO,
distillation); `ppo/` is PPO with a critic, its policy, critic, reference and reward roles as Ray actor groups under
one controller; `rewards` is the registry of named reward functions that GRPO, RLOO and PPO score with; `config`
holds the stages' job sections (`StageSections`).
"""
