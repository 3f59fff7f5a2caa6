"""Validate the memory planner (`core/models/memory.py`) against measurement.

For each shape, stage (sft, rm, ppo) and mode (full, LoRA) a fresh subprocess
  1. imports torch, transformers and the stage code, and reads its resident memory (the baseline);
  2. loads the networks with the stages' own loaders (`load_policy`, `load_scalar_model`,
     `ppo.load_models`), wraps them as the stage does (`prepare_for_training`), builds the optimizer;
  3. on CPU, resets the kernel's peak-RSS mark (`/proc/self/clear_refs` = 5) so model loading's
     transient copies are not counted; on CUDA, resets torch's peak counters;
  4. runs `--steps` training steps with the stages' own step code (SFT: `optim.step` on the causal-LM
     loss; RM: `reward.score_sequences` + `kwise_loss` + `optim.step`; PPO: `ppo.ppo_step`, ptx on);
  5. reports the **measured peak**: CPU: peak RSS during the steps (VmHWM) minus the baseline RSS
     after imports; CUDA: `torch.cuda.max_memory_allocated()` (everything on the GPU is the run's).
The planner's estimate for the same config (`plan(stage, config, prompt_length=...)`) is computed in
the parent, and one JSON line per run is printed: planned, measured, error % = (planned - measured)
/ measured. Models are random-init from a config (nothing downloaded) and saved as safetensors in a
temporary directory, so the loaders read them as they would a real checkpoint.

    python benchmarks/memory_check.py                       # the three default CPU shapes, full and LoRA
    python benchmarks/memory_check.py --device cuda --shape qwen2:24:896:14:2:4864:151936 --batch 64 \\
        --response-length 128 --stages ppo --modes full
A shape is ARCH:LAYERS:HIDDEN:HEADS:KV_HEADS:INTERMEDIATE:VOCAB (ARCH: gpt2, llama, qwen2, mistral, gpt_neox),
`:tied` after it for tied input and output embeddings (SmolLM2-135M: llama:30:576:9:3:1536:49152:tied).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# About 34M, 50M and 98M parameters per network: big enough that the tensors dominate the
# process's own memory, small enough for a few steps on 2 CPU cores.
DEFAULT_SHAPES = ("gpt2:8:512:8:8:2048:16000", "llama:6:512:8:2:1408:32000", "qwen2:8:640:10:2:1728:50000")


def parse_shape(text: str) -> dict:
    """ARCH:LAYERS:HIDDEN:HEADS:KV_HEADS:INTERMEDIATE:VOCAB, with `:tied` after it for tied embeddings."""
    tied = text.endswith(":tied")
    try:
        arch, *numbers = text.removesuffix(":tied").split(":")
        layers, hidden, heads, kv_heads, intermediate, vocab = map(int, numbers)
    except ValueError:
        raise SystemExit(f"bad --shape {text!r}: want ARCH:LAYERS:HIDDEN:HEADS:KV_HEADS:INTERMEDIATE:VOCAB") from None
    return dict(arch=arch, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
                intermediate=intermediate, vocab=vocab, tied=tied, name=text)


def save_model(shape: dict, path: Path) -> Path:
    """A random-init causal LM of `shape`, fp32, with a word-level tokenizer of its vocabulary."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from core.models.tiny import EOS_ID, PAD_ID, make_tokenizer

    arch = shape["arch"]
    if arch == "gpt2":
        kwargs = dict(n_layer=shape["layers"], n_embd=shape["hidden"], n_head=shape["heads"],
                      n_inner=shape["intermediate"], n_positions=512, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        kwargs = dict(num_hidden_layers=shape["layers"], hidden_size=shape["hidden"],
                      num_attention_heads=shape["heads"], intermediate_size=shape["intermediate"],
                      max_position_embeddings=512, tie_word_embeddings=shape.get("tied", False))
        if arch != "gpt_neox":
            kwargs["num_key_value_heads"] = shape["kv_heads"]
    config = AutoConfig.for_model(arch, vocab_size=shape["vocab"], bos_token_id=EOS_ID, eos_token_id=EOS_ID,
                                  pad_token_id=PAD_ID, **kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path, safe_serialization=True)
    make_tokenizer(shape["vocab"]).save_pretrained(path)
    return path


def stage_config(stage: str, model_dir: str, lora: bool, args) -> object:
    from core.config import PPOConfig, RewardConfig, SFTConfig

    common = dict(lora_r=16 if lora else 0, gradient_checkpointing=args.gradient_checkpointing, device=args.device)
    if stage == "sft":
        return SFTConfig(model=model_dir, batch_size=args.batch, max_length=args.length, dropout=0.0, **common)
    if stage == "rm":
        return RewardConfig(sft_model=model_dir, batch_size=max(1, args.batch // args.k), k=args.k,
                            max_length=args.length, **common)
    return PPOConfig(sft_model=model_dir, reward_model=model_dir, batch_size=args.batch, ppo_epochs=1,
                     num_minibatches=1, response_length=args.response_length, ptx_coef=1.0,
                     ptx_batch_size=args.ptx_batch, temperature=1.0, **common)


# ---------------------------------------------------------------------------------------------
# The child: one measured run
# ---------------------------------------------------------------------------------------------


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: reset VmHWM to the current RSS
        return True
    except OSError:
        return False


def ppo_models(config, tokenizer, device):
    """PPO's four networks as `ppo.load_models` builds them; under LoRA, if that function does not
    build adapters yet, as core/models/lora.py describes (reference = policy with its adapter off,
    reward model = value model with its adapter off)."""
    from core.models.loading import load_policy, load_scalar_model
    from core.models.lora import AdapterOff, is_lora, prepare_for_training
    from core.stages import ppo

    models = ppo.load_models(config, tokenizer, device)
    if not config.lora or is_lora(models.policy):
        return models, "ppo.load_models"
    del models
    import gc

    gc.collect()
    policy = prepare_for_training(load_policy(config.sft_model, device, dropout=0.0), config, "causal")
    value = prepare_for_training(load_scalar_model(config.reward_model, tokenizer.pad_token_id, device), config, "score")
    return (ppo.assemble(policy, AdapterOff(policy), value, AdapterOff(value), tokenizer, config, device),
            "built per core/models/lora.py (ppo.load_models has no LoRA yet)")


def child(spec: dict) -> dict:
    import resource

    import torch

    from core.config import PPOConfig, RewardConfig, SFTConfig
    from core.models.loading import load_policy, load_scalar_model, load_tokenizer, pick_device
    from core.models.lora import prepare_for_training
    from core.models import optim
    from core.stages import ppo, reward, sft  # noqa: F401  (imported before the baseline)

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    stage = spec["stage"]
    config = {"sft": SFTConfig, "rm": RewardConfig, "ppo": PPOConfig}[stage].from_dict(spec["config"])
    device = pick_device(config.device)
    cuda = device.type == "cuda"
    baseline = _status("VmRSS")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model_dir = spec["model_dir"]
    tokenizer = load_tokenizer(model_dir)
    vocab, steps, P = spec["vocab"], spec["steps"], spec["prompt_length"]
    g = torch.Generator().manual_seed(0)
    built = "stage loaders"
    if stage == "sft":
        model = prepare_for_training(load_policy(model_dir, device, dropout=config.dropout), config, "causal")
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        scheduler = optim.make_schedule(optimizer, 100, 0.0)
    elif stage == "rm":
        model = prepare_for_training(load_scalar_model(model_dir, tokenizer.pad_token_id, device), config, "score")
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        scheduler = optim.make_schedule(optimizer, 100, 0.0)
    else:
        models, built = ppo_models(config, tokenizer, device)
        blocks = torch.randint(2, vocab, (64, ppo.PTX_BLOCK_SIZE), generator=g)
        ptx = ppo.ptx_batch_stream(blocks, config.ptx_batch_size, torch.Generator().manual_seed(0))
    reset = _reset_peak_rss() if not cuda else True
    for _ in range(steps):
        if stage == "sft":
            L = config.max_length
            ids = torch.randint(2, vocab, (config.batch_size, L), generator=g)
            labels = ids.clone()
            labels[:, : L // 2] = -100  # the prompt half carries no loss, as in SFT
            batch = {"input_ids": ids.to(device.torch), "attention_mask": torch.ones_like(ids).to(device.torch),
                     "labels": labels.to(device.torch)}
            with device.autocast():  # SFT's own loss: the LM head over the answer tokens, in chunks
                loss = sft.answer_loss(model, model, batch, int((labels[:, 1:] != -100).sum()))
            optim.step(loss, model, optimizer, scheduler)
        elif stage == "rm":
            seqs = torch.randint(2, vocab, (config.batch_size * config.k, config.max_length), generator=g).tolist()
            loss, _ = reward.kwise_loss(reward.score_sequences(model, seqs, tokenizer.pad_token_id, device),
                                        [config.k] * config.batch_size)
            optim.step(loss, model, optimizer, scheduler)
        else:
            prompts = torch.randint(2, vocab, (config.batch_size, P), generator=g).to(device.torch)
            ppo.ppo_step(models, prompts, torch.ones_like(prompts), config, config.kl_coef, ptx)
    if cuda:
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated()
    else:
        measured = _status("VmHWM") - baseline
    return {"measured_bytes": int(measured), "baseline_rss_bytes": baseline, "peak_reset": reset,
            "ru_maxrss_minus_baseline_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline,
            "built": built}


# ---------------------------------------------------------------------------------------------
# The parent: plan, measure in a subprocess, compare
# ---------------------------------------------------------------------------------------------


def run_one(shape: dict, stage: str, lora: bool, model_dir: Path, args) -> dict:
    from core.models.memory import DeviceBudget, plan

    config = stage_config(stage, str(model_dir), lora, args)
    planned = plan(stage, config, DeviceBudget(args.device, args.device, None), prompt_length=args.prompt_length)
    spec = {"stage": stage, "config": config.to_dict(), "model_dir": str(model_dir), "vocab": shape["vocab"],
            "steps": args.steps, "prompt_length": args.prompt_length, "threads": args.threads}
    runs = {}
    for kind in ("default", "live") if args.device == "cpu" and args.live else ("default",):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        if kind == "live":
            # A fixed mmap threshold: every tensor above 64 KiB is its own mapping, returned to the
            # kernel when freed, so RSS follows the live tensors instead of what glibc's heap keeps.
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                              text=True, env=env, cwd=ROOT)
        line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("{")), None)
        if proc.returncode or line is None:
            return {"shape": shape["name"], "stage": stage, "mode": "lora" if lora else "full",
                    "error": (proc.stderr or proc.stdout)[-2000:]}
        runs[kind] = json.loads(line)
    measured = runs["default"]
    m = measured["measured_bytes"]
    live = runs.get("live", {}).get("measured_bytes")
    return {
        "shape": shape["name"], "stage": stage, "mode": "lora" if lora else "full", "device": args.device,
        "params_per_network": planned.networks[next(iter(planned.networks))].base_params,
        "planned_gib": round(planned.peak_bytes / 2**30, 3), "measured_gib": round(m / 2**30, 3),
        "error_pct": round(100 * (planned.peak_bytes - m) / m, 1),
        **({"measured_live_gib": round(live / 2**30, 3), "error_live_pct": round(100 * (planned.peak_bytes - live) / live, 1)}
           if live else {}),
        "planned_phases_gib": {k: round(v / 2**30, 3) for k, v in planned.phases.items()},
        "measured": "peak RSS during the steps minus RSS after imports" if args.device == "cpu"
                    else "torch.cuda.max_memory_allocated",
        "whole_run_ru_maxrss_minus_baseline_gib": round(measured["ru_maxrss_minus_baseline_bytes"] / 2**30, 3),
        "peak_reset": measured["peak_reset"], "models": measured["built"],
        "config": {k: getattr(planned, "assumptions", {}).get(k) for k in ("prompt_length", "minibatch")}
                  | {"batch": args.batch, "length": args.length, "response_length": args.response_length,
                     "steps": args.steps, "gradient_checkpointing": args.gradient_checkpointing},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--shape", action="append", help="ARCH:LAYERS:HIDDEN:HEADS:KV_HEADS:INTERMEDIATE:VOCAB "
                                                         "(repeatable; default: three CPU-sized shapes)")
    parser.add_argument("--stages", default="sft,rm,ppo")
    parser.add_argument("--modes", default="full,lora", help="full, lora or both (comma-separated)")
    parser.add_argument("--batch", type=int, default=8, help="SFT batch, PPO rollout batch; RM: batch // k rankings")
    parser.add_argument("--k", type=int, default=4, help="RM answers per ranking")
    parser.add_argument("--length", type=int, default=128, help="SFT/RM tokens per sequence")
    parser.add_argument("--prompt-length", type=int, default=32, help="PPO prompt tokens")
    parser.add_argument("--response-length", type=int, default=24)
    parser.add_argument("--ptx-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--live", action="store_true", help="CPU: also measure with MALLOC_MMAP_THRESHOLD_=65536, "
                                                            "so RSS follows the live tensors (see run_one)")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    sys.path.insert(0, str(ROOT))
    shapes = [parse_shape(s) for s in (args.shape or DEFAULT_SHAPES)]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        for i, shape in enumerate(shapes):
            model_dir = save_model(shape, Path(tmp) / f"shape{i}")
            for stage in [s.strip() for s in args.stages.split(",") if s.strip()]:
                for mode in modes:
                    print(json.dumps(run_one(shape, stage, mode == "lora", model_dir, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
