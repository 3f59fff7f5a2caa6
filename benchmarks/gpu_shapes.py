"""PPO-ptx at real model shapes on a GPU: a random-init Qwen2-0.5B shape (full weights) and a
Qwen2-1.5B shape (LoRA), through the stage's own loading path (`core.stages.ppo.load_models`,
checkpoints written to disk first) and its `ppo_step`.

    python -m benchmarks.gpu_shapes --shape qwen2-0.5b --steps 3
    python -m benchmarks.gpu_shapes --shape qwen2-1.5b --lora-r 16 --steps 3

Prints one JSON line: episodes/s, generated tokens/s, the share of time per phase, peak GPU memory
(torch.cuda.max_memory_allocated) beside the memory planner's estimate when `core.models.memory`
has one, and the update's model FLOP/s (6 FLOPs per parameter per token for a fully trained
network, 4 for a LoRA-adapted one, whose weight gradients are skipped; attention's quadratic
term left out).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from core.config import PPOConfig
from core.models.loading import pick_device
from core.models.tiny import EOS_ID, PAD_ID, make_tokenizer
from core.stages.ppo import load_models, ppo_step

SHAPES = {  # the Qwen2.5 family's published shapes
    "qwen2-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "qwen2-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                       intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, tie_word_embeddings=True),
}


def build_checkpoints(shape: str, root: Path) -> tuple[Path, Path]:
    """Random-init SFT policy and reward model of one shape, saved in bf16 as hub models are."""
    config = AutoConfig.for_model("qwen2", **SHAPES[shape], max_position_embeddings=4096, eos_token_id=EOS_ID,
                                  pad_token_id=PAD_ID, bos_token_id=EOS_ID, num_labels=1)
    tokenizer = make_tokenizer(config.vocab_size)
    torch.manual_seed(0)
    for cls, name in ((AutoModelForCausalLM, "sft"), (AutoModelForSequenceClassification, "rm")):
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = cls.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        del model
    return root / "sft", root / "rm"


def model_flops(models, config: PPOConfig, tokens: int) -> float:
    total = 0.0
    for net in (models.policy, models.value_model):
        params = sum(p.numel() for p in net.parameters())
        total += (4 if config.lora else 6) * params * tokens
    return total * config.ppo_epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-0.5b")
    parser.add_argument("--lora-r", type=int, default=0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--response-length", type=int, default=128)
    parser.add_argument("--num-minibatches", type=int, default=4)
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed PPO steps, after one warm-up step")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        sft_dir, rm_dir = build_checkpoints(args.shape, Path(tmp))
        config = PPOConfig(sft_model=str(sft_dir), reward_model=str(rm_dir), batch_size=args.batch,
                           num_minibatches=args.num_minibatches, ppo_epochs=args.ppo_epochs,
                           response_length=args.response_length, total_episodes=args.batch * (args.steps + 1),
                           ptx_coef=1.0, ptx_batch_size=4, missing_eos_penalty=None, lora_r=args.lora_r,
                           gradient_checkpointing=args.gradient_checkpointing, learning_rate=1e-6, device=args.device)
        tokenizer = make_tokenizer(SHAPES[args.shape]["vocab_size"])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        models = load_models(config, tokenizer, device)
        vocab = SHAPES[args.shape]["vocab_size"]
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(2, vocab, (args.batch, args.prompt_length), generator=g).to(device.torch)
        ptx_blocks = torch.randint(2, vocab, (16, 128), generator=g)

        def ptx_stream():
            while True:
                for i in range(0, len(ptx_blocks), config.ptx_batch_size):
                    yield ptx_blocks[i : i + config.ptx_batch_size]

        ptx = ptx_stream()
        ppo_step(models, prompts, torch.ones_like(prompts), config, config.kl_coef, ptx)  # warm-up
        timings = {"generation": 0.0, "scoring": 0.0, "advantages": 0.0, "update": 0.0}
        generated = 0
        start = time.perf_counter()
        for _ in range(args.steps):
            result = ppo_step(models, prompts, torch.ones_like(prompts), config, config.kl_coef, ptx)
            generated += int(result.rollout.response_mask.sum())
            for k, v in result.timings.items():
                timings[k] += v
        elapsed = time.perf_counter() - start
        tokens = args.batch * (args.prompt_length + args.response_length)
        out = {
            "shape": args.shape, "lora_r": args.lora_r, "batch": args.batch, "response_length": args.response_length,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "parameters_per_model": sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(sft_dir, dtype=torch.bfloat16).parameters()),
            "trainable_parameters": sum(p.numel() for p in models.trainable_parameters()),
            "episodes_per_s": args.batch * args.steps / elapsed,
            "generated_tokens_per_s": generated / elapsed,
            "timings_share": {k: round(v / elapsed, 3) for k, v in timings.items()},
            "update_tflops": model_flops(models, config, tokens) / (timings["update"] / args.steps) / 1e12,
            "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        }
        try:
            from core.models.memory import plan
        except ImportError:
            plan = None
        if plan is not None:
            out["planned_peak_gib"] = plan("ppo", config, device.type).peak_bytes / 2**30
        print(json.dumps(out))


if __name__ == "__main__":
    main()
