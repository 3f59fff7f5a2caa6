"""The LM head and the cross entropy over a large vocabulary without the full logits.

A causal LM's own loss (`model(..., labels=...)`) runs the LM head over every position, prompt and
padding included, and keeps the (batch, length, vocabulary) logits, their fp32 copy and the log-softmax
alive for the backward pass: at SmolLM2-135M's 49,152 words a batch of 8 x 96 tokens is 144 MiB a copy,
at Qwen2.5's 151,936, 445 MiB. `linear_cross_entropy` takes the backbone's final hidden states at the
positions that carry loss only (an SFT batch's answer tokens) and runs head and loss over chunks of at
most `MAX_CHUNK_LOGITS` logits; each chunk's gradient (softmax minus the one-hot target, times the
hidden states and the head's weight) is computed in the forward pass, while the chunk's logits exist,
so the backward pass only scales it: the same three matmuls as the unchunked head, with one chunk's
logits in memory instead of the whole batch's, and no LM head over positions whose loss is masked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from core.models.loading import hf_model, last_hidden_state

# At most this many logits (tokens x vocabulary) exist at once: 2^26 fp32 values, 256 MiB a copy. A chunk
# is still 1,365 tokens at a 49k vocabulary and 441 at 152k, so the head runs as a few large matmuls.
MAX_CHUNK_LOGITS = 2**26
# Config fields of architectures whose logits are not the LM head's output alone (soft-capping,
# scaling): a head run on the hidden states apart from the model would silently get them wrong.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def check_plain_logits(config) -> None:
    """Refuse architectures whose logits are transformed after the LM head (see `LOGIT_TRANSFORMS`)."""
    transforms = [name for name in LOGIT_TRANSFORMS if getattr(config, name, None) not in (None, 1, 1.0)]
    if transforms:
        raise ValueError(f"{config.model_type} models transform their logits ({', '.join(transforms)}), "
                         "which the per-token log-prob computation does not reproduce: use another model family")


def chunk_rows(vocab: int, max_chunk_logits: int = MAX_CHUNK_LOGITS) -> int:
    """Tokens per chunk: as many as keep the chunk's logits within `max_chunk_logits`."""
    return max(1, max_chunk_logits // vocab)


def linear_cross_entropy(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                         max_chunk_logits: int = MAX_CHUNK_LOGITS) -> torch.Tensor:
    """sum over rows of cross_entropy(head(hidden), targets), in fp32, with the gradients of `hidden` and of
    the head's weight and bias (those that require them) equal to the unchunked computation's.

    `hidden` (N, width): the final hidden states at the positions whose next token is `targets` (N,), every
    row carrying loss. Under autocast the head's matmuls run in its dtype, as the model's own head does."""
    return _LinearCrossEntropy.apply(hidden, head.weight, getattr(head, "bias", None), targets,
                                     chunk_rows(head.weight.shape[0], max_chunk_logits))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows: int):
        needs_grad = ctx.needs_input_grad
        grad_hidden = torch.empty_like(hidden) if needs_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_grad[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and needs_grad[2] else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            h, y = hidden[start : start + rows], targets[start : start + rows]
            logits = F.linear(h, weight, bias).float()
            lse = logits.logsumexp(-1)
            loss += (lse - logits.gather(-1, y[:, None]).squeeze(-1)).sum()
            if grad_hidden is None and grad_weight is None and grad_bias is None:
                continue
            # d loss / d logits = softmax - one_hot(target), written over the logits to hold one copy.
            grad_logits = logits.sub_(lse[:, None]).exp_()
            grad_logits[torch.arange(len(y), device=y.device), y] -= 1
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
            grad_logits = grad_logits.to(torch.get_autocast_dtype(hidden.device.type)
                                         if torch.is_autocast_enabled(hidden.device.type) else weight.dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + rows] = grad_logits @ weight.to(grad_logits.dtype)
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ h.to(grad_logits.dtype)).float()
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        return (None if grad_hidden is None else grad_hidden * grad_loss.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * grad_loss).to(weight_dtype),
                None if grad_bias is None else (grad_bias * grad_loss).to(bias_dtype), None, None)


def causal_lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor, num_items: int, ignore_index: int = -100) -> torch.Tensor:
    """The causal-LM loss HF's `model(input_ids, attention_mask, labels=labels, num_items_in_batch=num_items)`
    computes (the summed cross entropy of every next token whose label is not `ignore_index`, over
    `num_items`), with the LM head run over those positions only, chunk by chunk (`linear_cross_entropy`).
    `model`: a causal LM, or PEFT's wrapper of one; not a DDP/DeepSpeed wrapper, whose forward it bypasses."""
    with hf_model(model) as lm:
        check_plain_logits(lm.config)
        hidden = last_hidden_state(lm, input_ids, attention_mask)[:, :-1]
        targets = labels[:, 1:]
        keep = targets != ignore_index
        return linear_cross_entropy(hidden[keep], lm.get_output_embeddings(), targets[keep]) / num_items
