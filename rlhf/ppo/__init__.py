"""PPO with a critic, its roles as Ray actor groups: maths, roles, placement and the controller loop."""

from tuneyard.rlhf.ppo.controller import run_ppo

__all__ = ["run_ppo"]
