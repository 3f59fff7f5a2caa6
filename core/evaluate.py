"""Held-out evaluation by sampling, scored by the demo's simulated labeler.

docs/ARCHITECTURE.md: PPO's gains show at the rollout temperature, not greedy, so `gold` is the mean over
samples at the given temperature; callers report greedy beside it.
"""

from __future__ import annotations

import torch

from core.data import demo
from core.models.generate import sample


@torch.no_grad()
def gold_eval(
    model, tokenizer, tasks: list[demo.Task], temperature: float = 1.0, max_new_tokens: int = 24,
    seed: int = 1234, batch_size: int = 64,
) -> dict[str, float]:
    """Mean gold score and its parts over `tasks`, one sampled answer each."""
    parts, lengths, finished = [], [], []
    for i in range(0, len(tasks), batch_size):
        chunk = tasks[i : i + batch_size]
        out = sample(model, tokenizer, [t.prompt for t in chunk], max_new_tokens, temperature, seed=seed + i)
        parts += [demo.gold_parts(t.prompt, text) for t, text in zip(chunk, out.texts)]
        lengths += out.response_mask.sum(1).tolist()
        finished += out.finished.tolist()
    n = max(1, len(parts))
    return {
        "gold": sum(p.score for p in parts) / n,
        "correct": sum(p.correct for p in parts) / n,
        "template": sum(p.template for p in parts) / n,
        "concise": sum(p.concise for p in parts) / n,
        "length": sum(lengths) / n,
        "eos_rate": sum(finished) / n,
    }
