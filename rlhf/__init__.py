"""Preference stages: reward modelling, DPO and GRPO on the Ray + DeepSpeed path."""
