"""Load and save the recipe's models: a base (bundled, local HF directory, or hub id), the policy
(causal LM) and reward/value models (the same backbone with a scalar head).

Safety: weights load from safetensors only and `trust_remote_code` is never set.
"""

from __future__ import annotations

import json
import os
import threading
from contextlib import contextmanager, nullcontext
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
from transformers.activations import ACT2FN, NewGELUActivation

from core.config import DEVICES, PRECISIONS, resolved_precision
from core.models.chat import template_of
from core.models.lora import (
    ADAPTER_DIR,
    CONFIG_OVERRIDES,
    AdapterOff,
    adapter_base,
    config_overrides,
    is_adapter_dir,
    is_lora,
    load_merged,
    merged_copy,
)
from core.paths import BUNDLED_MODEL_DIR, atomic_dir

BUNDLED_NAMES = ("bundled", "tiny", "tiny-gpt2")
# An ensemble of reward models (core/models/ensemble.py) is one directory: its first member at the top (a plain
# HF reward-model directory, which every single-RM loader reads), the others in sub-directories this file lists.
ENSEMBLE_FILE = "ensemble.json"


def ensemble_members(path: str | os.PathLike) -> list[Path]:
    """The member directories of an ensemble directory (just `path` for a plain model directory), each one
    checked to be there with its config and safetensors weights: a missing member is a ValueError."""
    path = Path(path)
    listing = path / ENSEMBLE_FILE
    if not listing.is_file():
        return [path]
    try:
        names = json.loads(listing.read_text())["members"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"reward-model ensemble {path}: {ENSEMBLE_FILE} is unreadable ({exc})") from None
    members = []
    for name in names:
        member = (path / name).resolve()
        if path.resolve() not in (member, *member.parents):
            raise ValueError(f"reward-model ensemble {path}: member {name!r} lies outside the directory")
        if not (member / "config.json").is_file() or not any(member.glob("*.safetensors")):
            raise ValueError(f"reward-model ensemble {path} is missing its member {name!r} (no model in {member}); "
                             "train the ensemble again")
        members.append(member)
    return members


@dataclass(frozen=True)
class Device:
    """Where to run and in which precision. `precision` is resolved ('fp32' or 'bf16'): 'bf16' runs the
    matmuls under bf16 autocast while weights, optimizer states and log-prob arithmetic stay fp32."""

    type: str
    precision: str = "fp32"

    @property
    def torch(self) -> torch.device:
        return torch.device(self.type)

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.type, dtype=torch.bfloat16)
        return nullcontext()

    @property
    def frozen_dtype(self) -> torch.dtype:
        """The weights' dtype of PPO's frozen networks (reference policy, reward model). bf16 on a GPU, where
        memory is the limit and their matmuls run in bf16 under autocast anyway. On a CPU they keep fp32
        weights even under bf16 autocast: they then compute exactly as the policy does, so the first
        step's KL to the reference reads 0, not rounding noise, and RAM is rarely what runs out."""
        return torch.bfloat16 if self.type == "cuda" and self.precision == "bf16" else torch.float32


def pick_device(requested: str = "auto", precision: str = "auto") -> Device:
    """`requested`: 'auto' (CUDA when present), 'cpu' or 'cuda'. `precision`: 'auto' (bf16 autocast on a GPU
    that has bf16, else fp32), 'fp32', or 'bf16' (on a CPU it pays where the CPU has bf16 instructions
    (AVX-512 BF16, AMX) and the layers are wide enough: docs/NOTES.md, "Precision")."""
    if requested not in DEVICES:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', not {requested!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but this machine has no CUDA GPU; use 'cpu' or 'auto'")
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if requested == "auto" else requested
    gpu_bf16 = kind == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16" and kind == "cuda" and not gpu_bf16:
        raise ValueError("precision 'bf16' was requested but this GPU has no bf16; use 'fp32' or 'auto'")
    return Device(kind, resolved_precision(precision, kind, gpu_bf16))


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
        gguf_file = gguf_in(path)
        if gguf_file is not None:
            return str(gguf_to_hf(gguf_file))
        if not path.is_dir():
            raise ValueError(f"model path {path} is a file; give the Hugging Face model directory (or a .gguf file)")
        if is_adapter_dir(path):
            # A LoRA adapter: usable when its weights are safetensors and its base model is there.
            if not (path / "adapter_model.safetensors").is_file():
                raise ValueError(f"adapter directory {path} has no adapter_model.safetensors")
            try:
                resolve_model(adapter_base(path))
            except ValueError as exc:
                raise ValueError(f"adapter directory {path}: its base model is not usable ({exc})") from None
            return str(path)
        if not (path / "config.json").is_file():
            raise ValueError(f"model directory {path} has no config.json: not a Hugging Face model directory")
        if not any(path.glob("*.safetensors")):
            if any(path.glob("*.bin")) or any(path.glob("*.pt")):
                raise ValueError(
                    f"model directory {path} holds only pickle weights (.bin/.pt); for safety we load "
                    "safetensors only. Convert it with model.save_pretrained(dir, safe_serialization=True)."
                )
            raise ValueError(f"model directory {path} has no weights (*.safetensors)")
        ensemble_members(path)  # an ensemble must have every member
        return str(path)
    # Hub ids are 'name' or 'org/name'; anything else that is not on disk is a missing directory.
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise ValueError(f"model directory {ref} does not exist")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ValueError(
            f"model {ref!r} is not a local directory and the hub is offline (HF_HUB_OFFLINE=1)"
        )
    return ref


def gguf_in(path: Path) -> Path | None:
    """The GGUF file a model reference names: the file itself, or the one .gguf in a directory that
    is not a Hugging Face model directory; None otherwise."""
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if (path / "config.json").is_file():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise ValueError(f"{path} holds several GGUF files ({', '.join(f.name for f in found)}): name one")
    return found[0] if found else None


def gguf_to_hf(gguf_file: Path) -> Path:
    """A GGUF model as a plain Hugging Face directory (safetensors, fp32), converted once through
    transformers' GGUF support and kept under the data home, keyed by the file's path, size and time.

    transformers dequantises every tensor while loading; the model then carries a GGUF quantizer
    that refuses `save_pretrained`, so it is dropped: the weights are plain fp32 by then, the
    precision every stage trains in (bf16 runs as autocast over fp32 weights)."""
    import hashlib
    import logging

    from core.paths import data_home

    stat = gguf_file.stat()
    key = hashlib.sha1(f"{gguf_file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = data_home() / "gguf" / f"{gguf_file.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader; an optional extra)
    except ImportError:
        raise ValueError(f"{gguf_file.name} is a GGUF model, which needs the 'gguf' package: "
                         "pip install 'rlhf-workbench[gguf]'") from None
    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        with _LOAD_LOCK:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:  # transformers' own reason: an architecture it cannot read, a damaged file
        raise ValueError(f"cannot load the GGUF model {gguf_file}: {exc}") from None
    quantization = getattr(model.config, "quantization_config", None)
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (Path(tmp) / "gguf_source.json").write_text(json.dumps(
            {"gguf_file": str(gguf_file.resolve()), "quantization": str(quantization), "dtype": "float32"}))
    logging.getLogger(__name__).warning(
        "%s: GGUF weights dequantised to fp32 (the training precision) and saved as a Hugging Face "
        "directory at %s", gguf_file.name, target)
    return target


_LOAD_KW = dict(use_safetensors=True, trust_remote_code=False)
# from_pretrained is not thread-safe: it builds the model under a process-wide "meta device"
# init patch, so a second load in another thread (the app's Chat while a job loads its models)
# gets meta tensors ("Cannot copy out of meta tensor"). One load at a time.
_LOAD_LOCK = threading.Lock()


def load_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerBase:
    ref = resolve_model(name_or_path)
    if is_adapter_dir(ref) and not (Path(ref) / "tokenizer_config.json").is_file():
        ref = resolve_model(adapter_base(ref))  # an adapter saved without its tokenizer reads its base's
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


def _from_pretrained(auto_class, ref: str, what: str, dtype: torch.dtype, **kwargs) -> PreTrainedModel:
    try:
        with _LOAD_LOCK:
            model = auto_class.from_pretrained(ref, **_LOAD_KW, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not load {what} from {ref}: {exc}") from exc
    return fuse_gelu(model)


def load_policy(
    name_or_path: str | os.PathLike, device: Device | None = None, dropout: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """A causal LM (the base, an SFT checkpoint or a PPO policy). From a LoRA adapter directory: its
    base with the adapter merged in, a plain model. Weights load in fp32 whatever the checkpoint's
    precision (hub models are mostly bf16, which transformers would keep): the optimizer updates
    fp32 weights and matmuls run in bf16 under autocast on a GPU. Frozen networks on a GPU ask for
    bf16 (`dtype`)."""
    ref = resolve_model(name_or_path)
    device = device or pick_device()
    if is_adapter_dir(ref):
        return load_merged(load_policy(adapter_base(ref), device, dropout, dtype), ref)
    config = AutoConfig.from_pretrained(ref, trust_remote_code=False)
    model = _from_pretrained(AutoModelForCausalLM, ref, "a causal LM", dtype, **_dropout_overrides(config, dropout))
    return model.to(device.torch)


def load_scalar_model(
    name_or_path: str | os.PathLike, pad_token_id: int, device: Device | None = None,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """Backbone + scalar head: a reward model, or a value model initialised from one.

    From a causal-LM directory the head is new (randomly initialised); from a reward-model
    directory it is the trained head; from an adapter directory, its base with the adapter (and
    its head) merged in.
    """
    ref = resolve_model(name_or_path)
    device = device or pick_device()
    if is_adapter_dir(ref):
        return load_merged(load_scalar_model(adapter_base(ref), pad_token_id, device, dtype), ref)
    model = _from_pretrained(AutoModelForSequenceClassification, ref, "a reward/value model", dtype,
                             num_labels=1, pad_token_id=pad_token_id)
    model.config.pad_token_id = pad_token_id
    return model.to(device.torch)


def fuse_gelu(model: torch.nn.Module) -> torch.nn.Module:
    """Swap GPT-2's "gelu_new" (written out as ~6 elementwise ops, each with its own backward) for
    torch's tanh-approximate GELU: the same function (max difference ~1e-7) in one fused kernel.
    Profiling the PPO update on CPU put those elementwise ops at ~30% of the time; an SFT step
    runs ~20% faster with the swap, a reward model's forward ~25% (benchmarks/RESULTS.md, CPU section).
    Every model this module loads runs it (training, sampling, scoring); the config, and so the saved
    model, keeps "gelu_new"."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, NewGELUActivation):
                setattr(module, name, ACT2FN["gelu_pytorch_tanh"])
    return model


def token_scores(model: PreTrainedModel, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
    """Scalar head applied at every position: shape (batch, seq).

    We pick the position ourselves (the last response token) instead of relying on the
    pad-token search of *ForSequenceClassification, which breaks when pad == EOS.
    Left-padded batches (PPO rollouts) pass `position_ids` so each row's positions start at 0,
    as they did when the reward model was trained.
    """
    return hidden_and_scores(model, input_ids, attention_mask, position_ids)[1]


def hidden_and_scores(model: PreTrainedModel, input_ids, attention_mask, position_ids=None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the backbone's final hidden states, `token_scores`): for heads read off the same features
    (`core.models.ensemble.ScoreHeads`)."""
    with hf_model(model) as model:
        hidden = last_hidden_state(model, input_ids, attention_mask, position_ids)
        return hidden, model.score(hidden).squeeze(-1) + reward_bias(model)


@contextmanager
def hf_model(model):
    """The plain HF model (backbone + head) that `model` runs, for code that calls its backbone and head
    apart: the model itself; under LoRA the HF model inside PEFT's wrapper (its layers carry the adapter;
    PEFT's own wrappers shadow names like `model` that the backbone lookup needs); for `AdapterOff`
    (PPO's reference policy or reward model under LoRA) that model with the adapter off while the block runs."""
    if isinstance(model, AdapterOff):
        with model.peft_model.disable_adapter():
            yield model.peft_model.get_base_model()
    else:
        yield model.get_base_model() if is_lora(model) else model


def last_hidden_state(model: PreTrainedModel, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
    """The backbone's final hidden states (after its last norm), the input of the LM or score head. One pass
    over the whole sequence: no KV cache is kept (it would hold every layer's keys and values to the end)."""
    backbone = getattr(model, model.base_model_prefix)
    return backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=False).last_hidden_state


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

    def write(net: PreTrainedModel, directory: Path) -> None:
        net.save_pretrained(directory, safe_serialization=True)  # a LoRA-wrapped model saves its adapter
        tokenizer.save_pretrained(directory)
        if is_lora(net) and config_overrides(net):
            (directory / CONFIG_OVERRIDES).write_text(json.dumps(config_overrides(net)))

    with atomic_dir(target) as tmp:
        write(model, tmp)
        for name, sub_model in (extra_models or {}).items():
            write(sub_model, tmp / name)
        for name, obj in (extra or {}).items():
            torch.save(obj, tmp / name)
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2))
    return target


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: str | os.PathLike,
               extra_json: dict[str, dict] | None = None, extra_models: dict | None = None) -> Path:
    """A stage's output model: a plain HF directory any `from_pretrained` loads. A LoRA-trained model
    is saved merged, with its adapter kept inside in `ADAPTER_DIR`."""
    if is_lora(model):
        return save_checkpoint(merged_copy(model), tokenizer, target, extra_json=extra_json,
                               extra_models={ADAPTER_DIR: model, **(extra_models or {})})
    return save_checkpoint(model, tokenizer, target, extra_json=extra_json, extra_models=extra_models)


def check_same_tokenizer(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase, what: str) -> None:
    """Policy and reward model must read the same token ids, or the RM scores gibberish."""
    if a.get_vocab() != b.get_vocab():
        raise ValueError(f"{what}: the tokenizers differ (different vocabularies); use checkpoints from one base model")
    # ...and see answers in the same format: an RM trained on one chat template scores another's text.
    if template_of(a) != template_of(b):
        raise ValueError(f"{what}: the chat templates differ, so the reward model would score answers in "
                         "another format than the policy writes them; use checkpoints from one base model")
