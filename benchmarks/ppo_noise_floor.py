"""How much sampled correctness PPO's own update costs: the diagnostic behind docs/NOTES.md,
"It is the update's noise, not the RM".

Runs the PPO stage from a demo SFT model and RM with the RM's score in every rollout replaced by
`--reward-scale` x the simulated labeler's gold score (0: no reward at all, only the KL penalty acts),
then scores each model on the 200 held-out demo prompts x 5 sampled answers (T = 1, the seeds of the
NOTES tables): gold, correctness, and correctness on copy and reverse. A diagnostic, not a
feature: a PPO run against the gold labeler is not part of the recipe (the labeler is what the RM is
meant to stand in for).

    python -m benchmarks.ppo_noise_floor --sft OUT/sft --rm OUT/rm --output /tmp/noise \
        --reward-scale 0 --set learning_rate=5e-5

`OUT` is an `rlhf pipeline --demo --preset quick` output; `--set` overrides the quick preset's PPO
fields, as on the CLI. `--reward-scale rm` keeps the RM (the preset itself).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from core.cli import parse_sets
from core.data import demo
from core.stages.events import Events
from core.stages.evaluate import measure_answers
from core.models.loading import load_policy, load_tokenizer, pick_device
from core.stages import make_config, ppo

ANSWERS_PER_PROMPT = 5
CHUNK = 100  # prompts sampled per call, each call seeded with its offset (`measure_answers`)


def replace_rewards(scale: float, tokenizer) -> None:
    """Wrap `ppo.score_responses` so each rollout's scores are `scale` x gold (the prompts are read back
    from the rollout's own prompt ids)."""
    score_responses = ppo.score_responses

    def gold_scored(models, samples, config, old_policy=True):
        rollout = score_responses(models, samples, config, old_policy)
        prompts = tokenizer.batch_decode(samples.prompt_ids, skip_special_tokens=True)
        # The bundled template renders `User: {prompt}\nAssistant:` (core.data.demo.PROMPT_TEMPLATE).
        prompts = [p.split("User:", 1)[-1].rsplit("\nAssistant:", 1)[0].strip() for p in prompts]
        gold = [demo.gold_score(p, t) for p, t in zip(prompts, samples.texts)]
        rollout.scores = torch.tensor(gold, dtype=rollout.scores.dtype, device=rollout.scores.device) * scale
        return rollout

    ppo.score_responses = gold_scored


def score(model_dir: Path) -> dict[str, float]:
    tokenizer = load_tokenizer(model_dir)
    model = load_policy(model_dir, pick_device("cpu"), dropout=0.0)
    tasks = demo.heldout_tasks(200) * ANSWERS_PER_PROMPT
    parts = measure_answers(model, tokenizer, [t.prompt for t in tasks], 1.0, 24, seed=0, batch_size=CHUNK)["parts"]

    def correct(kind: str | None = None) -> float:
        chosen = [p.correct for t, p in zip(tasks, parts) if kind is None or t.kind == kind]
        return round(sum(chosen) / len(chosen), 3)

    return {"gold": round(sum(p.score for p in parts) / len(parts), 3), "correct": correct(),
            "copy": correct("copy"), "reverse": correct("reverse"),
            "concise": round(sum(p.concise for p in parts) / len(parts), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft", required=True, help="the demo SFT model")
    parser.add_argument("--rm", required=True, help="the demo reward model (the value model starts from it)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--reward-scale", default="0", help="a number (x gold), or 'rm' to keep the RM's score")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a quick-preset PPO field")
    args = parser.parse_args()
    values = {"sft_model": args.sft, "reward_model": args.rm, "prompts": "demo", **parse_sets(args.set)}
    config = make_config("ppo", "quick", values)
    if args.reward_scale != "rm":
        replace_rewards(float(args.reward_scale), load_tokenizer(args.sft))
    output = ppo.run(config, None, Events(), args.output)
    print(json.dumps({"reward_scale": args.reward_scale, "set": args.set, "sft": score(Path(args.sft)),
                      "ppo": score(Path(output))}))


if __name__ == "__main__":
    main()
