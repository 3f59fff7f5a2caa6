"""A real model learning from a verifier on a CPU (issue 30): GRPO with LoRA, rewarded by reward terms only
(no reward model), on generated additions with held-out prompts; never a test.

    /usr/bin/time -v python -m benchmarks.verifier_learning --model /work/models/smollm2-hf \
        --reward numeric --minutes 20 --output /tmp/verifier-run

Prints and writes `<output>/result.json`: the held-out pass rate (the mean of the task's verifier, `numeric`:
the answer's last number equals a + b) before and after training, at temperature 1 (the rollouts') and
(`--greedy`) greedy, the KL of the trained policy to the start (nats per answer, sampled answers), the EOS rate and mean
answer length before and after, training steps and seconds. Training stops after `--minutes` of wall time
(the stop flag the Stop button raises), at a checkpoint, or after `--steps`.
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from pathlib import Path

import torch

from core.config import GRPOConfig
from core.models.loading import load_policy, load_tokenizer, pick_device
from core.stages import get_stage
from core.stages.evaluate import measure_answers
from core.stages.events import Events
from core.stages.reward_terms import resolve_reward

TASK = "What is {a} + {b}? Reply with just the number."


def addition_split(n_heldout: int, seed: int, high: int) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows): every addition of numbers in 1..`high` as a prompt with its `answer`
    column, shuffled with `seed`; the first `n_heldout` are held out, so no held-out prompt is trained on."""
    rows = [{"prompt": TASK.format(a=a, b=b), "answer": str(a + b)} for a in range(1, high + 1)
            for b in range(1, high + 1)]
    random.Random(seed).shuffle(rows)
    return rows[n_heldout:], rows[:n_heldout]


class StopAfter(Events):
    """Events that raise the stop flag once `seconds` of training have passed (checked at each step's log)."""

    def __init__(self, seconds: float):
        super().__init__(stop_flag=threading.Event())
        self.deadline = time.monotonic() + seconds
        self.steps = []

    def metrics(self, step, values):
        super().metrics(step, values)
        if "reward" in values:
            self.steps.append({"step": step, **{k: round(v, 4) for k, v in values.items()
                                                if k.startswith("reward") or k in ("kl", "response_length")}})
            print(json.dumps(self.steps[-1]), flush=True)
        if time.monotonic() > self.deadline:
            self.stop_flag.set()


def evaluate(model_dir: str, reference_dir: str | None, tokenizer, rows: list[dict], reward_spec, max_new_tokens: int,
             device, greedy: bool) -> dict:
    policy = load_policy(model_dir, device, dropout=0.0)
    reference = load_policy(reference_dir, device, dropout=0.0) if reference_dir else None
    prompts, columns = [r["prompt"] for r in rows], [{"answer": r["answer"]} for r in rows]
    reward = resolve_reward(reward_spec)
    out = {}
    for label, temperature in (("sampled", 1.0), ("greedy", 0.0))[: 2 if greedy else 1]:
        measured = measure_answers(policy, tokenizer, prompts, temperature, max_new_tokens, seed=1234, batch_size=50,
                                   reference=reference if temperature > 0 else None, reward=reward, columns=columns)
        out[label] = {f"pass_{name}": sum(v) / len(v) for name, v in measured["terms"].items()}
        out[label].update(eos_rate=sum(measured["finished"]) / len(rows),
                          length=sum(measured["length"]) / len(rows))
        if measured["kl"] is not None:
            out[label]["kl"] = sum(measured["kl"]) / len(rows)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/work/models/smollm2-hf")
    parser.add_argument("--reward", default="numeric", help="the training reward (the `reward` field)")
    parser.add_argument("--verifier", default="numeric", help="the held-out measure")
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--heldout", type=int, default=30)
    parser.add_argument("--high", type=int, default=9, help="the largest addend (9: 81 prompts; SmolLM2-135M "
                                                           "answered none of 30 two-digit ones)")
    parser.add_argument("--greedy", action="store_true", help="also measure greedy answers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    train_file = out / "train_prompts.jsonl"
    train, heldout = addition_split(args.heldout, args.seed, args.high)
    train_file.write_text("".join(json.dumps(r) + "\n" for r in train))
    device = pick_device("cpu")
    tokenizer = load_tokenizer(args.model)
    result: dict = {"args": vars(args), "threads": torch.get_num_threads()}

    t = time.perf_counter()
    result["before"] = evaluate(args.model, None, tokenizer, heldout, args.verifier, args.max_length, device, args.greedy)
    result["eval_seconds"] = time.perf_counter() - t
    print("before", json.dumps(result["before"]), flush=True)

    config = GRPOConfig.from_dict(dict(
        sft_model=args.model, reward=args.reward, prompts=str(train_file), total_episodes=args.steps * args.batch_size,
        batch_size=args.batch_size, num_generations=args.num_generations, max_completion_length=args.max_length,
        learning_rate=args.learning_rate, beta=args.beta, lora_r=args.lora_r, lora_alpha=2 * args.lora_r,
        save_every=10_000, eval_prompts=0, device="cpu", seed=args.seed, precision="fp32"))
    events = StopAfter(args.minutes * 60)
    t = time.perf_counter()
    trained = get_stage("grpo").runner(config, None, events, out / "grpo")
    result["train_seconds"] = time.perf_counter() - t
    result["steps"] = events.steps
    result["trained"] = str(trained)

    result["after"] = evaluate(str(trained), args.model, tokenizer, heldout, args.verifier, args.max_length, device, args.greedy)
    print("after", json.dumps(result["after"]), flush=True)
    (out / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
