"""One resume rule for every stage.

A stage writes a *training checkpoint* under `checkpoints_dir(output_dir)/<unit>-<n>` (SFT and the
reward model per epoch, PPO per step): a plain HF model directory plus, inside the same atomic
write, `trainer_state.json` (plain values: counters, best score, history) and `training_state.pt`
(optimizer, LR schedule, RNG states, anything else with tensors). Re-running a stage with the same
output directory continues after the newest complete checkpoint, under the same run name, so its
metrics (keyed by step) continue the same curves.

Under DeepSpeed or FSDP the optimizer state is sharded over the ranks and rank 0, the one writer, holds
only its own shard: such checkpoints leave the optimizer state out, and a resume restores the weights,
counters, schedule and data position while the optimizer's moments start afresh (said in the run's log).
So every checkpoint resumes on any number of processes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from core.models.loading import Device, save_checkpoint
from core.paths import checkpoints_dir

STATE_FILE = "trainer_state.json"
TRAINING_FILE = "training_state.pt"


def checkpoint_path(output_dir: str | Path, unit: str, n: int) -> Path:
    return checkpoints_dir(output_dir) / f"{unit}-{n}"


def latest_checkpoint(output_dir: str | Path, unit: str) -> Path | None:
    """The newest `<unit>-<n>` checkpoint whose write completed (its state file is there)."""
    found = [p for p in checkpoints_dir(output_dir).glob(f"{unit}-*")
             if p.name[len(unit) + 1:].isdigit() and (p / STATE_FILE).is_file() and (p / TRAINING_FILE).is_file()]
    return max(found, key=lambda p: int(p.name[len(unit) + 1:])) if found else None


def rng_state(device: Device) -> dict:
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict, device: Device) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_training_checkpoint(model, tokenizer, path: Path, state: dict, training: dict, device: Device,
                             extra_models: dict | None = None) -> Path:
    """The model, its trainer state and its training state (plus the RNG) in one atomic directory."""
    return save_checkpoint(model, tokenizer, path, extra={TRAINING_FILE: {**training, "rng": rng_state(device)}},
                           extra_json={STATE_FILE: state}, extra_models=extra_models)


def load_training_checkpoint(path: Path, device: Device) -> tuple[dict, dict]:
    """(trainer state, training state) of a checkpoint; the RNG is restored as a side effect."""
    state = json.loads((path / STATE_FILE).read_text())
    # On the CPU: RNG states must be CPU tensors; the optimizer moves its state to its parameters' device.
    training = torch.load(path / TRAINING_FILE, weights_only=True, map_location="cpu")
    restore_rng(training["rng"], device)
    return state, training


def optimizer_state(optimizer: torch.optim.Optimizer, sharded: bool) -> dict:
    """The optimizer's entry of a training checkpoint: {"optimizer": state}, or {} where the state is
    sharded over the ranks (`Distributed.sharded`)."""
    return {} if sharded else {"optimizer": optimizer.state_dict()}


def restore_optimizer(optimizer: torch.optim.Optimizer, training: dict, log) -> None:
    """Load a checkpoint's optimizer state; `log` says so when it holds none (written sharded)."""
    if "optimizer" in training:
        optimizer.load_state_dict(training["optimizer"])
    else:
        log("this checkpoint was written with optimizer state sharded over the ranks (DeepSpeed/FSDP), which is "
            "not saved: weights, step, schedule and data position resume; the optimizer's moments start afresh")
