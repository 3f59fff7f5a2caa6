"""`rlhf bench ppo`: PPO throughput on randomly initialised models of a given shape (`benchmarks/shapes.py`).

Policy, reference, value and reward model all have the same shape (as in TRL's PPOTrainer
examples), the prompts are random token ids, and the loop is `core.stages.ppo.ppo_step` itself: the
same code `core.stages.ppo.run` trains with, so a speed-up measured here is a speed-up there.
`benchmarks/compare_trl_ppo.sh` runs TRL's PPOTrainer on the same shape for comparison.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.options import add_args, batch_size
from benchmarks.shapes import ppo_parts
from core.config import PPOConfig
from core.models.loading import pick_device
from core.models.tiny import make_tokenizer
from core.stages.ppo import assemble, ppo_step


def synthetic_prompts(n: int, prompt_length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Random prompt ids, avoiding EOS/pad, all of one length (no padding)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (n, prompt_length), generator=g)


def bench_ppo(args: argparse.Namespace) -> dict:
    """Our PPO steps on the shape of `args` (the options of `benchmarks/options.py`)."""
    batch, response_length, ppo_epochs, episodes = batch_size(args, "ppo"), args.response_length, \
        args.ppo_epochs, args.episodes
    prompt_length, num_minibatches, ptx_coef, device, precision = args.prompt_length, args.num_minibatches, \
        args.ptx_coef, args.device, args.precision
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = pick_device(device, precision)
    config = PPOConfig(batch_size=batch, num_minibatches=num_minibatches, ppo_epochs=ppo_epochs,
                       response_length=response_length, total_episodes=episodes, learning_rate=3e-6,
                       kl_coef=0.05, ptx_coef=ptx_coef, missing_eos_penalty=None, temperature=1.0, device=device,
                       precision=precision)
    networks, vocab, shape = ppo_parts(args)
    tokenizer = make_tokenizer(vocab)
    models = assemble(*[m.to(dev.torch) for m in networks], tokenizer, config, dev)
    prompts = synthetic_prompts(episodes, prompt_length, vocab, args.seed).to(dev.torch)
    ptx_batches = None
    if ptx_coef > 0:
        blocks = torch.randint(2, vocab, (64, 128))

        def cycle():
            while True:
                for i in range(0, len(blocks), config.ptx_batch_size):
                    yield blocks[i : i + config.ptx_batch_size]
        ptx_batches = cycle()

    steps = max(1, episodes // batch)
    timings = {"generation": 0.0, "scoring": 0.0, "advantages": 0.0, "update": 0.0}
    update_times = []
    start = time.perf_counter()
    for step in range(steps):
        prompt_ids = prompts[step * batch : (step + 1) * batch]
        result = ppo_step(models, prompt_ids, torch.ones_like(prompt_ids), config, config.kl_coef, ptx_batches)
        for k, v in result.timings.items():
            timings[k] += v
        update_times.append(result.timings["update"])
    elapsed = time.perf_counter() - start
    done = steps * batch
    # The update's model FLOPs: forward + backward (6 per parameter per token) of the policy body and
    # the value body over prompt + response, and of the LM head over the response positions only
    # (`logits_to_keep`); attention's sequence-squared term is left out at these lengths.
    embeddings = models.policy.get_input_embeddings().weight.numel()
    body = sum(p.numel() for p in models.policy.parameters()) - embeddings
    value_body = sum(p.numel() for p in models.value_model.parameters()) - embeddings
    tokens = batch * (prompt_length + response_length)
    update_flops = ppo_epochs * 6 * ((body + value_body) * tokens + embeddings * batch * (response_length + 1))
    steady = sorted(update_times[1:] or update_times)[len(update_times[1:] or update_times) // 2]
    return {
        "impl": "rlhf-workbench", "episodes": done, "seconds": elapsed, "episodes_per_s": done / elapsed,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "timings_share": {k: round(v / elapsed, 3) for k, v in timings.items()},
        "shape": {**shape, "batch": batch, "response_length": response_length, "ppo_epochs": ppo_epochs,
                  "prompt_length": prompt_length, "num_minibatches": num_minibatches},
        "threads": torch.get_num_threads(), "device": dev.type, "precision": dev.precision,
        "parameters_per_model": body + embeddings, "update_flops_per_step": update_flops,
        "update_s_per_step_median": steady, "update_tflops": update_flops / steady / 1e12,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None,
        "last_response_length": result.metrics["response_length"],
    }


def main(args: argparse.Namespace) -> dict:
    """Run the benchmark from parsed arguments; options a caller's parser lacks take the defaults."""
    defaults = vars(_parser().parse_args([]))
    result = bench_ppo(argparse.Namespace(**{**defaults, **{k: v for k, v in vars(args).items() if k in defaults}}))
    if not getattr(args, "json", False):
        shares = ", ".join(f"{k} {v:.0%}" for k, v in result["timings_share"].items())
        print(f"ours: {result['episodes_per_s']:.1f} episodes/s ({shares})")
    print(json.dumps(result))
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(parser)
    return parser


if __name__ == "__main__":
    main(_parser().parse_args())
