"""LoRA through PEFT, as a config switch rather than a parallel code path (`lora_r > 0`).

- A stage wraps the network it trains with `prepare_for_training`: a LoRA adapter on the chosen
  linear layers (all of them by default, PEFT's 'all-linear', which leaves the LM head alone; a
  reward/value model's scalar head stays fully trainable), plus gradient checkpointing if asked.
- PPO's frozen networks are *views* of the trained ones with the adapter switched off
  (`AdapterOff`): the reference policy is the policy without its adapter, the reward model is the
  value model without its adapter (and with the RM's own head). One copy of each base's weights.
- Training checkpoints hold the adapter (an adapter directory: `adapter_config.json` +
  `adapter_model.safetensors`); a stage's final output is saved merged, as a plain HF directory,
  with the adapter beside it in `ADAPTER_DIR`. Every loader accepts an adapter directory
  (`core.models.loading.resolve_model`): its base is loaded and the adapter merged in.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

ADAPTER_DIR = "adapter"  # the adapter of a merged final output, inside it
ADAPTER_CONFIG = "adapter_config.json"
# Attributes a stage sets on the model's config (the RM's centring bias) that an adapter directory
# would otherwise lose: PEFT saves the adapter, not the base config.
CONFIG_OVERRIDES = "config_overrides.json"
OVERRIDDEN = ("reward_bias",)


def is_adapter_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def adapter_base(path: str | Path) -> str:
    """The base model an adapter directory was trained on, as its adapter_config.json names it."""
    try:
        base = json.loads((Path(path) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"adapter directory {path}: unreadable {ADAPTER_CONFIG} ({exc})") from None
    if not base:
        raise ValueError(f"adapter directory {path} does not name its base model")
    return base


def _targets(spec: str):
    names = [name.strip() for name in spec.split(",") if name.strip()]
    return "all-linear" if names in ([], ["all-linear"]) else names


def prepare_for_training(model, config, task: str, resume_from: str | Path | None = None):
    """`model` as the stage trains it: with a LoRA adapter when `config.lora_r > 0` (a new one, or
    the one in `resume_from` to continue training) and gradient checkpointing when asked.
    `task` is 'causal' (a policy) or 'score' (a reward or value model)."""
    if config.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (LoRA) without extra hooks.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if not config.lora:
        return model
    from peft import PeftModel, get_peft_model

    if resume_from is not None:
        model = PeftModel.from_pretrained(model, safetensors_adapter(resume_from), is_trainable=True)
        _apply_overrides(model, resume_from)
        return model
    try:
        return get_peft_model(model, lora_config(config, task))
    except ValueError as exc:  # PEFT's "Target modules {...} not found in the base model"
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"})
        raise ValueError(f"lora_target_modules {config.lora_target_modules!r} matches no layer of this "
                         f"{model.config.model_type} model; its linear layers are: {', '.join(linear)}") from exc


def lora_config(config, task: str):
    """PEFT's LoraConfig from a stage config's lora_* fields (also handed to TRL's trainers as `peft_config`)."""
    from peft import LoraConfig, TaskType

    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=_targets(config.lora_target_modules),
                      task_type=TaskType.CAUSAL_LM if task == "causal" else TaskType.SEQ_CLS)


def safetensors_adapter(path: str | Path) -> str:
    """The adapter directory, once it is known to hold safetensors weights: PEFT reads
    adapter_model.safetensors when it is there, so no pickle file is ever loaded."""
    if not (Path(path) / "adapter_model.safetensors").is_file():
        raise ValueError(f"adapter directory {path} has no adapter_model.safetensors (pickle weights are not loaded)")
    return str(path)


def is_lora(model) -> bool:
    return hasattr(model, "peft_config")


def merged_copy(model):
    """A plain HF model with the adapter merged in (the model itself when it has no adapter)."""
    if not is_lora(model):
        return model
    return copy.deepcopy(model).merge_and_unload()


def config_overrides(model) -> dict:
    """What an adapter directory must carry of the model's config (see CONFIG_OVERRIDES)."""
    return {k: getattr(model.config, k) for k in OVERRIDDEN if getattr(model.config, k, None) is not None}


def load_merged(base_model, path: str | Path):
    """`base_model` with the adapter in `path` merged in: a plain HF model."""
    from peft import PeftModel

    from peft import PeftConfig

    config = PeftConfig.from_pretrained(safetensors_adapter(path))
    if config.task_type == "CAUSAL_LM" and not hasattr(base_model, "prepare_inputs_for_generation"):
        # A policy's adapter (SFT) on a reward model's backbone: the same layer names, no LM head;
        # a task-free PeftModel merges it.
        config.task_type = None
    model = PeftModel.from_pretrained(base_model, safetensors_adapter(path), config=config).merge_and_unload()
    _apply_overrides(model, path)
    # A new adapter trained on top of this merged model must name it (not the bare base) as its base,
    # so loading that adapter later merges both; PEFT reads the model's `name_or_path`.
    model.name_or_path = str(path)
    return model


def _apply_overrides(model, path: str | Path) -> None:
    overrides = Path(path) / CONFIG_OVERRIDES
    if overrides.is_file():
        for key, value in json.loads(overrides.read_text()).items():
            setattr(model.config, key, value)


class AdapterOff(torch.nn.Module):
    """A frozen network that is a LoRA-trained one with its adapter switched off: the reference policy
    (policy without adapter) or the reward model (value model without adapter, RM head). It shares the
    base weights and registers no parameters of its own."""

    def __init__(self, peft_model):
        super().__init__()
        object.__setattr__(self, "peft_model", peft_model)  # not a submodule: its parameters are trained elsewhere

    @property
    def config(self):
        return self.peft_model.config

    def forward(self, *args, **kwargs):
        with self.peft_model.disable_adapter():
            return self.peft_model(*args, **kwargs)
