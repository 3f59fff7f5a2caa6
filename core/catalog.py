"""Which checkpoints are models a person would count, and how pickers list the rest.

A stage's final model is recorded under the run's own name (`events.checkpoint(run_id, ...)`); its
training checkpoints are `<run>-epoch-<n>` (SFT, RM) and `<run>-step-<n>` (PPO). Home counts final
models; pickers list final models first and every training checkpoint after them, under its run.
"""

from __future__ import annotations

import re

_TRAINING = re.compile(r"^(?P<run>.+)-(?P<unit>epoch|step)-(?P<n>\d+)$")


def is_final(checkpoint: dict) -> bool:
    """A run's final model, or a checkpoint added by hand (no run)."""
    if _TRAINING.match(checkpoint["name"]) and checkpoint.get("run_id") != checkpoint["name"]:
        return False
    return checkpoint.get("run_id") in (None, checkpoint["name"])


def final_models(checkpoints: list[dict]) -> list[dict]:
    return [c for c in checkpoints if is_final(c)]


def training_label(checkpoint: dict) -> str:
    """'<run> › epoch 2' for a training checkpoint (its run first, so a sorted list groups by run)."""
    m = _TRAINING.match(checkpoint["name"])
    if m is None:
        return checkpoint["name"]
    return f"{checkpoint.get('run_id') or m['run']} › {m['unit']} {m['n']}"


def grouped(checkpoints: list[dict]) -> tuple[list[dict], list[dict]]:
    """(final models in the given order, training checkpoints grouped by run then step)."""
    finals = [c for c in checkpoints if is_final(c)]
    training = sorted((c for c in checkpoints if not is_final(c)),
                      key=lambda c: (training_label(c).split(" › ")[0], c["step"]))
    return finals, training


def method_finals(checkpoints_by_kind: dict[str, list[dict]], pipeline_run: str | None) -> dict[str, dict]:
    """Each method's (policy kind's) final model, to compare side by side: the one the pipeline run
    `pipeline_run` made (its stage run '<pipeline>-<kind>', core/runs/pipeline.py), else the newest final
    model of that kind (`checkpoints_by_kind` oldest first, as the store lists them). Kinds with no
    final model are left out."""
    picked = {}
    for kind, checkpoints in checkpoints_by_kind.items():
        finals = final_models(checkpoints)
        from_pipeline = [c for c in finals if pipeline_run and c.get("run_id") == f"{pipeline_run}-{kind}"]
        if from_pipeline or finals:
            picked[kind] = (from_pipeline or finals)[-1]
    return picked
