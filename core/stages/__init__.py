"""The stage registry: every stage of the recipe declared once, so the CLI, the job manager, the
pipeline and the app's pages read the list from here instead of keeping their own.

Each stage module (`core.stages.sft`, `.reward`, `.ppo`) has one entry point

    run(config, store, events, output_dir) -> Path   # the stage's final HF model directory

and writes intermediate checkpoints under `core.paths.checkpoints_dir(output_dir)`. Modules are
imported only when a stage runs: listing stages (`rlhf --help`, the Train page) does not import torch.

Beside the stages live what every stage shares: the events a stage reports through (events, with the
metric sinks), the held-out measurements every stage logs (evaluate), the RL math (rl), micro-batching
and resuming. The layer imports models, data and the ground; never analysis, runs or the app.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.config import PRESETS, ConfigMixin, DPOConfig, GRPOConfig, PPOConfig, RewardConfig, RLOOConfig, SFTConfig


@dataclass(frozen=True)
class Stage:
    name: str  # the CLI verb and the run's stage in the store
    title: str  # as the Train page shows it
    summary: str  # one line for --help
    config_class: type[ConfigMixin]
    module: str  # imported when the stage runs
    model_fields: tuple[str, ...]  # config fields that name an input checkpoint
    checkpoint_kind: str  # the kind its checkpoints have in the store
    policy: bool  # its checkpoints are causal LMs one can sample from (Rank, Chat)

    @property
    def runner(self) -> Callable[..., Path]:
        return importlib.import_module(self.module).run


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("sft", "1 · SFT", "supervised fine-tuning on demonstrations", SFTConfig, "core.stages.sft",
          ("model",), "sft", policy=True),
    Stage("rm", "2 · Reward model", "reward model on K-wise rankings", RewardConfig, "core.stages.reward",
          ("sft_model",), "rm", policy=False),
    Stage("ppo", "3 · PPO-ptx", "PPO with a KL penalty and a pretraining term", PPOConfig, "core.stages.ppo",
          ("sft_model", "reward_model"), "ppo", policy=True),
    # Alternative third stages on the same SFT model and data, through TRL's trainers (core/stages/trl_bridge.py).
    Stage("dpo", "3 · DPO", "DPO on preference pairs from the rankings (no RM, no sampling; TRL)", DPOConfig,
          "core.stages.dpo", ("sft_model",), "dpo", policy=True),
    Stage("grpo", "3 · GRPO", "GRPO: group-normalised advantages on RM-scored samples (no value model; TRL)",
          GRPOConfig, "core.stages.grpo", ("sft_model", "reward_model"), "grpo", policy=True),
    Stage("rloo", "3 · RLOO", "RLOO: leave-one-out baseline on RM-scored samples (no value model; TRL)",
          RLOOConfig, "core.stages.rloo", ("sft_model", "reward_model"), "rloo", policy=True),
)}
# The recipe itself, which the demo pipeline runs by default; the alternatives join it with --stages.
RECIPE: tuple[str, ...] = ("sft", "rm", "ppo")


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}: choose one of {', '.join(STAGES)}")
    return STAGES[name]


def make_config(stage: str, preset: str | None = None, overrides: dict | None = None) -> ConfigMixin:
    """The config for `stage`: dataclass defaults, then the preset, then explicit overrides."""
    spec = get_stage(stage)
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    values = dict(PRESETS[preset].get(stage, {})) if preset else {}
    values.update(overrides or {})
    return spec.config_class.from_dict(values)


def check_models(stage: str, config) -> None:
    """Fail before a run is created if an input checkpoint is missing or unusable, the device is
    not there, or (PPO) the reward model reads other token ids than the policy."""
    from core.models.loading import check_same_tokenizer, load_tokenizer, pick_device, resolve_model

    pick_device(config.device, config.precision)
    optional = config.optional_models() if hasattr(config, "optional_models") else ()
    fields = tuple(f for f in get_stage(stage).model_fields if f not in optional)
    for field in fields:
        value = getattr(config, field)
        if not value:
            raise ValueError(f"{field} is empty: name the checkpoint this stage starts from")
        try:
            resolve_model(value)
        except ValueError as exc:
            raise ValueError(f"{field}: {exc}") from None
    if "reward_model" in fields and "sft_model" in fields:
        check_same_tokenizer(load_tokenizer(config.sft_model), load_tokenizer(config.reward_model),
                             f"reward_model {config.reward_model} does not match sft_model {config.sft_model}")


__all__ = ["Stage", "STAGES", "RECIPE", "get_stage", "make_config", "check_models"]
