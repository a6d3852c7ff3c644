"""PPO's checkpoints and outputs: the trained roles' DeepSpeed states and the controller's own state in
checkpoints/checkpoint-N (marked complete last), resume from the newest complete one, and final/ (the policy) and
critic/ published atomically."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from tuneyard.rlhf.config import PpoSection
from tuneyard.rlhf.ppo import algorithms as algo
from tuneyard.rlhf.ppo.groups import RoleGroup
from tuneyard.training.config import TrainSpec
from tuneyard.training.interrupts import driver_phase
from tuneyard.training.metrics import COMPLETE_MARKER
from tuneyard.training.preemption import RECORD_FILE, REQUEST_FILE
from tuneyard.training.run_dir import (
    DiskFull,
    disk_full_message,
    out_of_space,
    publish_final,
    resume_checkpoint,
    retire_old_checkpoints,
)

log = logging.getLogger(__name__)
KLController = algo.FixedKLController | algo.AdaptiveKLController


@dataclass
class ControllerState:
    """What a checkpoint needs beside the engines: where the loop is, where it reads the prompts, the KL coefficient."""

    iteration: int = 0
    data_position: int = 0  # prompts drawn so far (dynamic sampling draws more than rollout_batch_size a time)
    kl_coef: float = 0.0
    kl_controller: dict | None = None


def trained(groups: dict[str, RoleGroup]) -> list[str]:
    """The roles that train and checkpoint: the policy, and the critic when there is one."""
    return [role for role in ("policy", "critic") if role in groups]


def save_checkpoint(groups: dict[str, RoleGroup], run_dir: Path, state: ControllerState, keep_last: int) -> Path:
    """Engines and controller state into checkpoints/checkpoint-N, marked complete last; older ones go after."""
    folder = run_dir / "checkpoints" / f"checkpoint-{state.iteration}"
    shutil.rmtree(folder, ignore_errors=True)
    try:
        folder.mkdir(parents=True)
        saving = {role: groups[role].broadcast("save_checkpoint", str(folder / role)) for role in trained(groups)}
        for role, refs in saving.items():
            groups[role].results(refs)
        (folder / "controller.json").write_text(json.dumps(asdict(state)))
    except Exception as exc:
        if not out_of_space(exc, folder):
            raise
        shutil.rmtree(folder, ignore_errors=True)  # never marked complete; resume would skip it anyway
        raise DiskFull(disk_full_message(f"saving {folder.name}", run_dir)) from None
    (folder / COMPLETE_MARKER).write_text(str(state.iteration))
    retire_old_checkpoints(run_dir, keep_last)
    return folder


def resume_state(groups: dict[str, RoleGroup], run_dir: Path, resume: str, kl_ctl: KLController) -> ControllerState:
    """Load the engines and KL coefficient from the checkpoint `resume` names; where the loop goes on."""
    state = ControllerState(kl_coef=kl_ctl.value)
    checkpoint = resume_checkpoint(run_dir, resume)
    if checkpoint is None:
        return state
    state = ControllerState(**json.loads((checkpoint / "controller.json").read_text()))
    kl_ctl.load_state_dict(state.kl_controller or {"value": state.kl_coef})
    for role in trained(groups):
        groups[role].results(groups[role].broadcast("load_checkpoint", str(checkpoint / role)))
    log.info("resumed from %s at iteration %d", checkpoint, state.iteration)
    return state


def checkpoint_or_stop(
    groups: dict[str, RoleGroup],
    spec: TrainSpec,
    ppo: PpoSection,
    run_dir: Path,
    state: ControllerState,
    iterations: int,
) -> bool:
    """Save a checkpoint when one is due or a stop is asked for; True when the run stops here to be resumed.

    The last iteration saves no periodic checkpoint: final/ follows it. A stop asked for during the last
    iteration saves one and lets the run finish.
    """
    save_every = ppo.save_every or spec.output.save_steps
    stop_requested = (run_dir / REQUEST_FILE).exists()
    last = state.iteration == iterations
    if stop_requested or (save_every and state.iteration % save_every == 0 and not last):
        driver_phase("saving a checkpoint", run_dir, f"checkpoint-{state.iteration}")
        folder = save_checkpoint(groups, run_dir, state, spec.output.keep_last)
    if stop_requested and not last:
        (run_dir / RECORD_FILE).write_text(
            json.dumps({"step": state.iteration, "max_steps": iterations, "checkpoint": str(folder)})
        )
        return True
    return False


def publish_models(groups: dict[str, RoleGroup], run_dir: Path) -> None:
    """final/ (the policy, a Hugging Face folder) and critic/ beside it, each published atomically."""
    for role in trained(groups):
        name = "final" if role == "policy" else role
        staging = run_dir / f"{name}.staging"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            groups[role].results(groups[role].broadcast("save_final", str(staging)))
        except Exception as exc:
            if not out_of_space(exc, staging):
                raise
            shutil.rmtree(staging, ignore_errors=True)
            raise DiskFull(disk_full_message(f"writing {name}/", run_dir)) from None
        publish_final(staging, run_dir / name)
