"""The optimisation step shared by pretraining, SFT and the reward model."""

from __future__ import annotations

import torch

from core.distributed import Distributed


def adamw(params, learning_rate: float, **kwargs) -> torch.optim.AdamW:
    """AdamW with its fused kernel (CPU and CUDA): one pass over each parameter per step instead of
    the foreach path's dozen, about twice as fast on the small models here and the same update to
    float rounding (benchmarks/RESULTS.md, CPU section)."""
    return torch.optim.AdamW(params, lr=learning_rate, fused=True, **kwargs)


def make_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    """Linear warmup then cosine decay to 0, the schedule InstructGPT's SFT and RM used."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, int(warmup_ratio * total_steps), total_steps)


def step(loss: torch.Tensor, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
         max_grad_norm: float = 1.0, dist: Distributed | None = None) -> None:
    """Backward, clip the global gradient norm (a bad batch cannot blow up a tiny model), step.
    `dist` (several processes) runs backward and clipping through accelerate, so gradients are
    averaged over the ranks before the norm is taken."""
    dist = dist or Distributed()
    dist.backward(loss)
    dist.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
