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


# The config fields that name an input model, per stage.
MODEL_FIELDS = {"sft": ("model",), "rm": ("sft_model",), "ppo": ("sft_model", "reward_model")}


def check_models(stage: str, config) -> None:
    """Fail before a run is created if an input checkpoint is missing or unusable, the device is
    not there, or (PPO) the reward model reads other token ids than the policy."""
    from core.models import check_same_tokenizer, load_tokenizer, pick_device, resolve_model

    pick_device(config.device)
    for field in MODEL_FIELDS[stage]:
        value = getattr(config, field)
        if not value:
            raise ValueError(f"{field} is empty: name the checkpoint this stage starts from")
        try:
            resolve_model(value)
        except ValueError as exc:
            raise ValueError(f"{field}: {exc}") from None
    if stage == "ppo":
        check_same_tokenizer(load_tokenizer(config.sft_model), load_tokenizer(config.reward_model),
                             f"reward_model {config.reward_model} does not match sft_model {config.sft_model}")
