"""The optimisation step shared by pretraining, SFT and the reward model."""

from __future__ import annotations

import torch


def make_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    """Linear warmup then cosine decay to 0, the schedule InstructGPT's SFT and RM used."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, int(warmup_ratio * total_steps), total_steps)


def step(loss: torch.Tensor, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
         max_grad_norm: float = 1.0) -> None:
    """Backward, clip the global gradient norm (a bad batch cannot blow up a tiny model), step."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm, foreach=True)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
