"""Load and save the recipe's models: a base (bundled, local HF directory, or hub id), the policy
(causal LM) and reward/value models (the same backbone with a scalar head).

Safety: weights load from safetensors only and `trust_remote_code` is never set.
"""

from __future__ import annotations

import json
import os
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from core.paths import BUNDLED_MODEL_DIR, atomic_dir

BUNDLED_NAMES = ("bundled", "tiny", "tiny-gpt2")


@dataclass(frozen=True)
class Device:
    """Where to run and in which precision: CUDA with bf16 autocast where available, else CPU fp32."""

    type: str

    @property
    def torch(self) -> torch.device:
        return torch.device(self.type)

    def autocast(self):
        # Weights stay fp32 (optimizer states too); matmuls run in bf16 on GPUs that have it.
        if self.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()


def pick_device(requested: str = "auto") -> Device:
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', not {requested!r}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but this machine has no CUDA GPU; use 'cpu' or 'auto'")
    if requested == "auto":
        return Device("cuda" if torch.cuda.is_available() else "cpu")
    return Device(requested)


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """Turn a user's model reference into something `from_pretrained` can load.

    'bundled' (or 'tiny') is the model in assets/; an existing directory must hold a config and
    safetensors weights; anything else is taken as a hub id, which only works online.
    """
    ref = str(name_or_path).strip()
    if not ref:
        raise ValueError("no model given: name a directory, a hub id, or 'bundled'")
    if ref in BUNDLED_NAMES:
        ref = str(BUNDLED_MODEL_DIR)
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"model path {path} is a file; give the Hugging Face model directory")
        if not (path / "config.json").is_file():
            raise ValueError(f"model directory {path} has no config.json: not a Hugging Face model directory")
        if not any(path.glob("*.safetensors")):
            if any(path.glob("*.bin")) or any(path.glob("*.pt")):
                raise ValueError(
                    f"model directory {path} holds only pickle weights (.bin/.pt); for safety we load "
                    "safetensors only. Convert it with model.save_pretrained(dir, safe_serialization=True)."
                )
            raise ValueError(f"model directory {path} has no weights (*.safetensors)")
        return str(path)
    # Hub ids are 'name' or 'org/name'; anything else that is not on disk is a missing directory.
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise ValueError(f"model directory {ref} does not exist")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ValueError(
            f"model {ref!r} is not a local directory and the hub is offline (HF_HUB_OFFLINE=1)"
        )
    return ref


_LOAD_KW = dict(use_safetensors=True, trust_remote_code=False)
# from_pretrained is not thread-safe: it builds the model under a process-wide "meta device"
# init patch, so a second load in another thread (the app's Chat while a job loads its models)
# gets meta tensors ("Cannot copy out of meta tensor"). One load at a time.
_LOAD_LOCK = threading.Lock()


def load_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerBase:
    ref = resolve_model(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(ref, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not load a tokenizer from {ref}: {exc}") from exc
    if tok.eos_token is None:
        raise ValueError(f"tokenizer of {ref} has no EOS token; the recipe needs one to stop answers")
    if tok.pad_token is None:
        # Right-padded batches need a pad id; reusing EOS is the common convention for LMs.
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def _dropout_overrides(config, dropout: float | None) -> dict:
    """Config keys for residual/attention dropout, whichever names this architecture uses."""
    if dropout is None:
        return {}
    keys = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout")
    return {k: dropout for k in keys if hasattr(config, k)}


def load_policy(
    name_or_path: str | os.PathLike, device: Device | None = None, dropout: float | None = None
) -> PreTrainedModel:
    """A causal LM (the base, an SFT checkpoint or a PPO policy)."""
    ref = resolve_model(name_or_path)
    device = device or pick_device()
    config = AutoConfig.from_pretrained(ref, trust_remote_code=False)
    try:
        with _LOAD_LOCK:
            model = AutoModelForCausalLM.from_pretrained(ref, **_LOAD_KW, **_dropout_overrides(config, dropout))
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not load a causal LM from {ref}: {exc}") from exc
    return model.to(device.torch)


def load_scalar_model(
    name_or_path: str | os.PathLike, pad_token_id: int, device: Device | None = None
) -> PreTrainedModel:
    """Backbone + scalar head: a reward model, or a value model initialised from one.

    From a causal-LM directory the head is new (randomly initialised); from a reward-model
    directory it is the trained head.
    """
    ref = resolve_model(name_or_path)
    device = device or pick_device()
    try:
        with _LOAD_LOCK:
            model = AutoModelForSequenceClassification.from_pretrained(
                ref, num_labels=1, pad_token_id=pad_token_id, **_LOAD_KW
            )
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not load a reward/value model from {ref}: {exc}") from exc
    model.config.pad_token_id = pad_token_id
    return model.to(device.torch)


def token_scores(model: PreTrainedModel, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
    """Scalar head applied at every position: shape (batch, seq).

    We pick the position ourselves (the last response token) instead of relying on the
    pad-token search of *ForSequenceClassification, which breaks when pad == EOS.
    Left-padded batches (PPO rollouts) pass `position_ids` so each row's positions start at 0,
    as they did when the reward model was trained.
    """
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    return model.score(hidden).squeeze(-1) + reward_bias(model)


def reward_bias(model: PreTrainedModel) -> float:
    """Offset set after RM training so SFT demonstrations score mean 0 (InstructGPT 3.5)."""
    return float(getattr(model.config, "reward_bias", 0.0))


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    target: str | os.PathLike,
    extra: dict[str, object] | None = None,
    extra_json: dict[str, dict] | None = None,
    extra_models: dict[str, PreTrainedModel] | None = None,
) -> Path:
    """The one checkpoint writer: an HF directory (safetensors), written atomically.

    `extra` maps file names to tensors-dicts saved with torch.save (optimizer state);
    `extra_json` maps file names to JSON-serialisable dicts (trainer state);
    `extra_models` maps sub-directory names to models saved as HF directories inside the same
    atomic write (PPO's EMA policy), so a crash cannot leave one without the other.
    """
    target = Path(target)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, sub_model in (extra_models or {}).items():
            sub_model.save_pretrained(tmp / name, safe_serialization=True)
            tokenizer.save_pretrained(tmp / name)
        for name, obj in (extra or {}).items():
            torch.save(obj, tmp / name)
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2))
    return target


def check_same_tokenizer(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase, what: str) -> None:
    """Policy and reward model must read the same token ids, or the RM scores gibberish."""
    if a.get_vocab() != b.get_vocab():
        raise ValueError(f"{what}: the tokenizers differ (different vocabularies); use checkpoints from one base model")
