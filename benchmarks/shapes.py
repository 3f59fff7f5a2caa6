"""The model shape a benchmark runs: a real model's `config.json` (`--config DIR`) or an architecture with
sizes (`--arch llama|qwen2|gpt2 --layers --embd --heads ...`), always with random weights, so nothing
is downloaded and TRL's side gets the very same weights.

`rlhf bench sft|rm` without either option keep the bundled model (as before this module); `rlhf bench
ppo` without them builds the reference GPT-2 shape from `--layers/--embd/--heads/--vocab`.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
)

from core.models.tiny import EOS_ID, PAD_ID


def model_config(args: argparse.Namespace) -> PretrainedConfig | None:
    """The shape asked for, or None when neither `--config` nor `--arch` was given."""
    if getattr(args, "config", None):
        path = Path(args.config)
        if not (path / "config.json").is_file():
            raise ValueError(f"--config {path}: no config.json there (give a model directory)")
        return AutoConfig.from_pretrained(path)
    if not getattr(args, "arch", None):
        return None
    kv = args.kv_heads or args.heads
    intermediate = args.intermediate or 4 * args.embd
    if args.arch == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=args.vocab, n_positions=1024, n_embd=args.embd,
                                    n_layer=args.layers, n_head=args.heads, n_inner=intermediate)
    return AutoConfig.for_model(args.arch, vocab_size=args.vocab, hidden_size=args.embd, num_hidden_layers=args.layers,
                                num_attention_heads=args.heads, num_key_value_heads=kv,
                                intermediate_size=intermediate, max_position_embeddings=4096,
                                tie_word_embeddings=args.vocab > 100_000)


def describe(config: PretrainedConfig) -> dict:
    """The shape as `rlhf bench` prints it, with the parameter count of one causal LM of it."""
    with torch.device("meta"):
        parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    return {"arch": config.model_type, "layers": config.num_hidden_layers, "hidden": config.hidden_size,
            "heads": config.num_attention_heads,
            "kv_heads": getattr(config, "num_key_value_heads", config.num_attention_heads),
            "intermediate": getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
            or 4 * config.hidden_size, "vocab": config.vocab_size,
            "tied_embeddings": bool(getattr(config, "tie_word_embeddings", True)), "parameters": parameters}


def _quiet(config: PretrainedConfig) -> PretrainedConfig:
    """A copy with dropout off (both sides train the same deterministic network)."""
    config = copy.deepcopy(config)
    for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout"):
        if hasattr(config, name):
            setattr(config, name, 0.0)
    return config


def save_random_model(config: PretrainedConfig, source: str | None, target: Path, seed: int = 0) -> Path:
    """A random-init causal LM of `config` saved with a tokenizer as an HF directory both sides load: the
    tokenizer of `source` (the `--config` directory) when it has one, else the bundled model's."""
    from core.models.loading import load_tokenizer

    has_tokenizer = source is not None and (Path(source) / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(source) if has_tokenizer else load_tokenizer("bundled")
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the shape's vocabulary is "
                         f"{config.vocab_size}: give --vocab {len(tokenizer)} or more")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = _quiet(config)
    config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target


def ppo_models(config: PretrainedConfig, seed: int = 0):
    """(policy, reference_policy, value_model, reward_model) of one shape, random weights, for the tiny
    word-level tokenizer (`core.models.tiny.make_tokenizer`: EOS id 0, pad id 1), as `make_models` builds
    GPT-2 ones."""
    config = _quiet(config)
    config.pad_token_id, config.eos_token_id, config.bos_token_id, config.num_labels = PAD_ID, EOS_ID, EOS_ID, 1
    torch.manual_seed(seed)
    policy = AutoModelForCausalLM.from_config(config)
    return (policy, copy.deepcopy(policy), AutoModelForSequenceClassification.from_config(config),
            AutoModelForSequenceClassification.from_config(config))


def ppo_parts(args: argparse.Namespace):
    """(the four networks, the tiny tokenizer's vocabulary size, the shape as printed) for `rlhf bench ppo`
    and TRL's side of it: `--config`/`--arch` when given, else the reference GPT-2 shape of `make_models`."""
    from core.models.tiny import make_models

    config = model_config(args)
    if config is None:
        # 256 positions, or room for the prompt and answer asked for (`--response-length 256`).
        positions = max(256, args.prompt_length + args.response_length)
        parts = make_models(args.layers, args.embd, args.heads, args.vocab, args.seed, positions)
        return parts, args.vocab, describe(parts[0].config)
    return ppo_models(config, args.seed), config.vocab_size, describe(config)
