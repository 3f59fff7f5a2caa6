"""The stage registry: what the CLI and the job manager call. Each runner has the shape

    run(config, store, events, output_dir) -> Path   # the stage's final HF model directory

and writes intermediate checkpoints under `checkpoints_dir(output_dir)`.
"""

from __future__ import annotations

from pathlib import Path


def checkpoints_dir(output_dir: str | Path) -> Path:
    """Per-epoch / per-step checkpoints live beside the final model: DIR/sft -> DIR/sft-checkpoints."""
    output_dir = Path(output_dir)
    return output_dir.with_name(output_dir.name + "-checkpoints")


def runner(stage: str):
    """Import lazily: a page that only lists stages should not pay for torch imports."""
    if stage == "sft":
        from core.sft import run
    elif stage == "rm":
        from core.reward import run
    elif stage == "ppo":
        from core.ppo import run
    else:
        raise ValueError(f"unknown stage {stage!r}: choose sft, rm or ppo")
    return run
