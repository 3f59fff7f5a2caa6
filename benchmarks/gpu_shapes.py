"""PPO-ptx at real model shapes on a GPU: a random-init Qwen2-0.5B shape (full weights or LoRA) and a
Qwen2-1.5B shape (LoRA), through the stage's own loading path (`core.stages.ppo.load_models`,
checkpoints written to disk first) and its `ppo_step`.

    python -m benchmarks.gpu_shapes --shape qwen2-0.5b --steps 2
    python -m benchmarks.gpu_shapes --shape qwen2-0.5b --lora-r 16 --steps 2
    python -m benchmarks.gpu_shapes --shape tiny --device cpu --batch 8 --steps 1   # the CPU dry run

Prints one JSON line: episodes/s, generated tokens/s, the step split (generation / scoring / update),
the first step's KL to the reference (sum over the answer, mean over rows: 0 when the rollout samples
from the forward the scoring repeats), peak GPU memory (torch.cuda.max_memory_allocated) beside the
memory planner's estimate for the same config (`rlhf plan ppo`), and the update's training FLOPs and
MFU by NeMo-RL's definitions (benchmarks/flops.py): over the update's time (NeMo-RL's
"policy training") and over the whole step's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from benchmarks.flops import mfu, peak_bf16, ppo_update_flops
from core.config import PPOConfig
from core.models.loading import pick_device
from core.models.memory import plan
from core.models.tiny import EOS_ID, PAD_ID, make_tokenizer
from core.stages.ppo import PTX_BLOCK_SIZE, load_models, ppo_step

SHAPES = {  # the Qwen2.5 family's published shapes
    "qwen2-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "qwen2-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                       intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, tie_word_embeddings=True),
}


def qwen2_config(shape: str):
    return AutoConfig.for_model("qwen2", **SHAPES[shape], max_position_embeddings=4096, eos_token_id=EOS_ID,
                                pad_token_id=PAD_ID, bos_token_id=EOS_ID, num_labels=1)


def build_checkpoints(shape: str, root: Path) -> tuple[Path, Path]:
    """Random-init SFT policy and reward model of one shape, saved in bf16 as hub models are."""
    config = qwen2_config(shape)
    tokenizer = make_tokenizer(config.vocab_size)
    torch.manual_seed(0)
    for cls, name in ((AutoModelForCausalLM, "sft"), (AutoModelForSequenceClassification, "rm")):
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = cls.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        del model
    return root / "sft", root / "rm"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-0.5b")
    parser.add_argument("--lora-r", type=int, default=0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--response-length", type=int, default=128)
    parser.add_argument("--num-minibatches", type=int, default=4)
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="timed PPO steps, after one warm-up step")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        sft_dir, rm_dir = build_checkpoints(args.shape, Path(tmp))
        config = PPOConfig(sft_model=str(sft_dir), reward_model=str(rm_dir), batch_size=args.batch,
                           num_minibatches=args.num_minibatches, ppo_epochs=args.ppo_epochs,
                           response_length=args.response_length, total_episodes=args.batch * (args.steps + 1),
                           ptx_coef=1.0, ptx_batch_size=4, missing_eos_penalty=None, lora_r=args.lora_r,
                           gradient_checkpointing=args.gradient_checkpointing, learning_rate=1e-6, device=args.device)
        planned = plan("ppo", config, device.type, prompt_length=args.prompt_length)
        tokenizer = make_tokenizer(SHAPES[args.shape]["vocab_size"])
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        models = load_models(config, tokenizer, device)
        vocab = SHAPES[args.shape]["vocab_size"]
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(2, vocab, (args.batch, args.prompt_length), generator=g).to(device.torch)
        ptx_blocks = torch.randint(2, vocab, (16, PTX_BLOCK_SIZE), generator=g)

        def ptx_stream():
            while True:
                for i in range(0, len(ptx_blocks), config.ptx_batch_size):
                    yield ptx_blocks[i : i + config.ptx_batch_size]

        ptx = ptx_stream()
        # The warm-up step is the run's first: the policy is still the reference, so its KL reads 0 unless the
        # rollout's and the scoring's forwards disagree (precision, dropout, adapters).
        first = ppo_step(models, prompts, torch.ones_like(prompts), config, config.kl_coef, ptx)
        timings = {"generation": 0.0, "scoring": 0.0, "advantages": 0.0, "update": 0.0}
        generated = 0
        start = time.perf_counter()
        for _ in range(args.steps):
            result = ppo_step(models, prompts, torch.ones_like(prompts), config, config.kl_coef, ptx)
            generated += int(result.rollout.response_mask.sum())
            for k, v in result.timings.items():
                timings[k] += v
        elapsed = time.perf_counter() - start
        peak_measured = torch.cuda.max_memory_allocated() if cuda else None
    shape = SHAPES[args.shape]
    ptx_sequences = args.ppo_epochs * args.num_minibatches * config.ptx_batch_size
    flops_args = (shape, args.batch, args.prompt_length, args.response_length, args.ppo_epochs, ptx_sequences,
                  PTX_BLOCK_SIZE)
    nemo_flops = ppo_update_flops(*flops_args)
    exact_flops = ppo_update_flops(*flops_args, exact=True, lora=bool(args.lora_r))
    update_s, step_s = timings["update"] / args.steps, elapsed / args.steps
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = peak_bf16(device_name) if cuda else None
    print(json.dumps({
        "part": "b", "shape": args.shape, "lora_r": args.lora_r, "batch": args.batch,
        "prompt_length": args.prompt_length, "response_length": args.response_length,
        "num_minibatches": args.num_minibatches, "ppo_epochs": args.ppo_epochs, "device": device_name,
        "precision": device.precision,
        "parameters_per_model": sum(p.numel() for n, p in models.policy.named_parameters() if "lora_" not in n),
        "trainable_parameters": sum(p.numel() for p in models.trainable_parameters()),
        "episodes_per_s": args.batch * args.steps / elapsed,
        "generated_tokens_per_s": generated / elapsed,
        "step_s": step_s,
        "timings_share": {k: round(v / elapsed, 3) for k, v in timings.items()},
        "first_step_kl": first.metrics["kl"], "first_step_approx_kl": first.metrics["approx_kl"],
        "update_flops_nemo_rl": nemo_flops, "update_flops_exact": exact_flops,
        "peak_bf16_flops": peak,
        "mfu_update": mfu(nemo_flops, update_s, peak), "mfu_step": mfu(nemo_flops, step_s, peak),
        "mfu_update_exact": mfu(exact_flops, update_s, peak),
        "update_tflops": nemo_flops / update_s / 1e12,
        "peak_gpu_memory_gib": None if peak_measured is None else peak_measured / 2**30,
        "planned_peak_gib": planned.peak_bytes / 2**30,
        "planner_error_pct": None if peak_measured is None
                             else round(100 * (planned.peak_bytes - peak_measured) / peak_measured, 1),
    }))


if __name__ == "__main__":
    main()
