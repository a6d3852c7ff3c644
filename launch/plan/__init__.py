"""`tuneyard plan`: the memory each GPU and node needs for a job, the verdict, and the changes that make it fit.

Modules, each importing only those above it: memory (the per-rank arithmetic), types (the records), shapes
(a job's shapes and switches), spmd and ppo (the two kinds of plan), job (picks one), suggestions (changes
that fit), report (the tables, the verdict and the entry points `tuneyard plan`, `train` and `submit` call), host
(what a job's workers ask of the one machine a local Ray runs on).
"""

from tuneyard.launch.plan.job import plan_job
from tuneyard.launch.plan.report import check_job_memory, hardware_from_args, print_plan, run_plan
from tuneyard.launch.plan.types import Hardware

__all__ = ["Hardware", "check_job_memory", "hardware_from_args", "plan_job", "print_plan", "run_plan"]
