"""TRL's PPOTrainer (trl.experimental.ppo, TRL 1.12) on the shape `rlhf bench ppo` uses.

Run by benchmarks/compare_trl_ppo.sh inside .bench-venv (which holds trl==1.12.0). Models,
tokenizer and prompts come from benchmarks.bench_ppo, so both sides start from identical weights and
data; this script only swaps in TRL's training loop. Prints one JSON object as its last line.
"""

from __future__ import annotations

import json
import tempfile
import time

import torch
import trl
from datasets import Dataset
from trl.experimental.ppo import PPOConfig, PPOTrainer

from benchmarks.bench_ppo import synthetic_prompts
from benchmarks.options import batch_size, parse
from benchmarks.shapes import ppo_parts
from core.models.loading import pick_device
from core.models.tiny import make_tokenizer


def main() -> None:
    args = parse(__doc__.splitlines()[0])
    args.batch = batch_size(args, "ppo")
    (policy, reference_policy, value_model, reward_model), vocab, _ = ppo_parts(args)
    tokenizer = make_tokenizer(vocab)
    prompts = synthetic_prompts(args.episodes, args.prompt_length, vocab, args.seed)
    dataset = Dataset.from_dict({"input_ids": prompts.tolist()})
    with tempfile.TemporaryDirectory() as out:
        config = PPOConfig(
            output_dir=out, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
            local_rollout_forward_batch_size=args.batch, num_mini_batches=args.num_minibatches,
            num_ppo_epochs=args.ppo_epochs, response_length=args.response_length, total_episodes=args.episodes,
            learning_rate=3e-6, kl_coef=0.05, temperature=1.0, stop_token="eos", missing_eos_penalty=None,
            num_sample_generations=0, report_to="none", save_strategy="no", logging_steps=10_000,
            disable_tqdm=True, use_cpu=args.device == "cpu", seed=args.seed, dataloader_num_workers=0,
            bf16=pick_device(args.device, args.precision).precision == "bf16",  # as ours (bench_ppo)
        )
        trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=reference_policy,
                             reward_model=reward_model, value_model=value_model, train_dataset=dataset)
        start = time.perf_counter()
        trainer.train()
        elapsed = time.perf_counter() - start
    steps = -(-args.episodes // args.batch)
    done = steps * args.batch
    print(json.dumps({"impl": f"trl-{trl.__version__}", "episodes": done, "seconds": elapsed,
                      "episodes_per_s": done / elapsed, "threads": torch.get_num_threads(),
                      "precision": "bf16" if config.bf16 else "fp32"}))


if __name__ == "__main__":
    main()
