"""Pieces every policy-gradient stage shares (PPO today; GRPO and RLOO next): log-probs of a
sampled response, the KL to the reference policy (the reward's penalty, and the exact per-token KL a loss
can add), masked statistics, prompt sampling.

Kept out of `ppo.py` so a stage without a value model does not import PPO.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from core.models.lm_head import MAX_CHUNK_LOGITS, check_plain_logits, chunk_rows
from core.models.loading import hf_model, last_hidden_state

AllReduceSum = Callable[[torch.Tensor], torch.Tensor]  # a tensor summed element-wise over the ranks


def masked_mean(x: torch.Tensor, mask: torch.Tensor, all_reduce_sum: AllReduceSum | None = None,
                count: torch.Tensor | None = None) -> torch.Tensor:
    """The mean over the real (unmasked) entries; with `all_reduce_sum` (several processes, each holding
    its share of the batch) the mean over every rank's entries: sum and count are summed over the ranks
    (a statistic: no gradient flows through the reduction). `count`: divide this rank's sum by it instead
    of its own count (a loss under several processes: `Distributed.loss_denominator`)."""
    if count is not None:
        return (x * mask).sum() / count
    if all_reduce_sum is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    total, count = all_reduce_sum(torch.stack([(x * mask).sum(), mask.sum().to(x.dtype)])).to(x.device)
    return total / count.clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
           all_reduce_sum: AllReduceSum | None = None) -> torch.Tensor:
    """Normalise over the real (unmasked) tokens only, so padding does not skew the statistics.
    `all_reduce_sum` (`Distributed.all_reduce_sum`): the statistics of the global batch, so N ranks
    whiten as one process would (docs/NOTES.md, "Several processes")."""
    mean = masked_mean(x, mask, all_reduce_sum)
    var = masked_mean((x - mean) ** 2, mask, all_reduce_sum)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    # Left-padded prompts: each row's first real token is position 0, as in training and sampling.
    return (mask.cumsum(-1) - 1).clamp(min=0)


class TokenStats(NamedTuple):
    """Per response token, each (B, T): log pi(y_t); the entropy of pi (a detached statistic) when asked for;
    the exact KL(pi || pi_ref) over the whole vocabulary, with gradients, when a `ReferenceHead` is given."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None = None
    kl: torch.Tensor | None = None


@dataclass
class ReferenceHead:
    """What the exact per-token KL to the reference policy needs, kept from the rollout's scoring pass: the
    reference's final hidden states at the positions that predict the answer tokens, and its LM head's
    weights. The update recomputes the reference's logits chunk by chunk beside the policy's instead of
    keeping them, (B, T, vocabulary), from the scoring pass: (B, T, width) is 170 times smaller at
    Qwen2-0.5B's 152k-word vocabulary. The weights are taken as tensors, so under LoRA (where the
    reference is the policy with its adapter off) they stay the reference's outside that context."""

    hidden: torch.Tensor  # (B, T, width), detached
    weight: torch.Tensor  # (vocabulary, width)
    bias: torch.Tensor | None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight, self.bias)

    def rows(self, index: torch.Tensor, answer_width: int | None = None) -> ReferenceHead:
        """The same head over a minibatch's rows (and only their first `answer_width` answer positions)."""
        return ReferenceHead(self.hidden[index, :answer_width], self.weight, self.bias)


def response_hidden(lm, ids, mask, positions, prompt_len: int) -> torch.Tensor:
    """The final hidden states at positions P-1 .. P+T-2 of a plain HF causal LM (`hf_model`): the inputs
    of the LM head that predict the response tokens ids[:, P:]."""
    check_plain_logits(lm.config)
    return last_hidden_state(lm, ids, mask, positions)[:, prompt_len - 1 : -1]


def reference_head(model, ids, mask, positions, prompt_len: int) -> ReferenceHead:
    """The reference policy's `ReferenceHead` over a batch (no gradients: the reference is frozen)."""
    with torch.no_grad(), hf_model(model) as lm:
        head = lm.get_output_embeddings()
        return ReferenceHead(response_hidden(lm, ids, mask, positions, prompt_len).detach(), head.weight.detach(),
                             None if getattr(head, "bias", None) is None else head.bias.detach())


def response_logprobs(model, ids, mask, positions, prompt_len: int, temperature: float, with_entropy: bool = False,
                      max_chunk_logits: int = MAX_CHUNK_LOGITS, reference: ReferenceHead | None = None) -> TokenStats:
    """`TokenStats` of the response tokens y = ids[:, P:], from the logits at positions P-1 .. P+T-2 of the
    full sequence; with `reference` (its rows those of `ids`) the exact KL to the reference policy too.

    Dividing the logits by the rollout temperature makes these the log-probs of the distribution we
    actually sampled from (Huang et al. 2022 detail). The backbone runs once; the LM head and the
    log-softmax run on the final hidden states chunk by chunk (`chunked_logprobs`), so the full
    response logits never exist (docs/NOTES.md, "Stage 3: PPO-ptx").
    """
    with hf_model(model) as lm:
        hidden = response_hidden(lm, ids, mask, positions, prompt_len)
        return chunked_logprobs(hidden, lm.get_output_embeddings(), ids[:, prompt_len:], temperature, with_entropy,
                                max_chunk_logits, reference)


def chunked_logprobs(hidden: torch.Tensor, lm_head: torch.nn.Module, tokens: torch.Tensor, temperature: float,
                     with_entropy: bool = False, max_chunk_logits: int = MAX_CHUNK_LOGITS,
                     reference: ReferenceHead | None = None) -> TokenStats:
    """log-softmax(lm_head(hidden) / temperature) at `tokens` (the entropy, detached: a statistic; with
    `reference` the exact KL to it), over chunks of at most `max_chunk_logits` logits. With gradients each
    chunk runs under activation checkpointing: the forward keeps only the chunk's hidden states, and the
    backward recomputes that chunk's logits, so one chunk's logits are alive at a time in both passes."""
    width, vocab = hidden.shape[-1], lm_head.weight.shape[0]
    rows = chunk_rows(vocab, max_chunk_logits)
    checkpointed = torch.is_grad_enabled() and (hidden.requires_grad or lm_head.weight.requires_grad)
    ref_chunks = (reference.hidden.reshape(-1, reference.hidden.shape[-1]).split(rows) if reference is not None
                  else itertools.repeat(None))
    logprobs, entropies, kls = [], [], []
    for h, y, ref_h in zip(hidden.reshape(-1, width).split(rows), tokens.reshape(-1).split(rows), ref_chunks):
        if checkpointed:
            stats = checkpoint(_chunk_logprobs, h, y, lm_head, temperature, with_entropy, reference, ref_h,
                               use_reentrant=False)
        else:
            stats = _chunk_logprobs(h, y, lm_head, temperature, with_entropy, reference, ref_h)
        logprobs.append(stats.logprobs)
        entropies.append(stats.entropy)
        kls.append(stats.kl)
    return TokenStats(torch.cat(logprobs).view(tokens.shape),
                      torch.cat(entropies).view(tokens.shape) if with_entropy else None,
                      torch.cat(kls).view(tokens.shape) if reference is not None else None)


def _chunk_logprobs(hidden, tokens, lm_head, temperature: float, with_entropy: bool, reference, ref_hidden) -> TokenStats:
    logits = lm_head(hidden).float() / temperature  # fp32 log-prob arithmetic, whatever autocast's matmul dtype
    all_logprobs = logits.log_softmax(-1)
    logprobs = torch.gather(all_logprobs, -1, tokens[..., None]).squeeze(-1)
    kl = None
    if reference is not None:
        with torch.no_grad():
            ref_logprobs = (reference(ref_hidden).float() / temperature).log_softmax(-1)
        kl = (all_logprobs.exp() * (all_logprobs - ref_logprobs)).sum(-1)
    if not with_entropy:
        return TokenStats(logprobs, None, kl)
    # Last and without gradients, so the backward's recomputation (which stops once the saved tensors
    # are back) skips it.
    with torch.no_grad():
        return TokenStats(logprobs, entropy_from_logits(logits), kl)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(-1)
    return torch.logsumexp(logits, -1) - (probs * logits).sum(-1)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate that goes into the *reward*: k1 = log pi - log pi_ref.

    Why k1 and not k3 = (r - 1) - log r (r = pi_ref / pi), though k3 is never negative: a reward
    is differentiated through the score function, E_pi[k * grad log pi]. For k1 that is exactly
    grad KL(pi || pi_ref); for k3 it is grad KL(pi || ref) - grad KL(ref || pi), which nearly
    vanishes near the reference, so the penalty would barely pull the policy back.
    (tests/test_rl_math.py checks both on a small categorical distribution.)
    """
    return logprobs - ref_logprobs


def token_kl(policy, reference_policy, ids: torch.Tensor, mask: torch.Tensor, prompt_len: int,
             temperature: float) -> torch.Tensor:
    """k1 per response token, (B, T): log pi(y_t) - log pi_ref(y_t) of the response ids[:, prompt_len:]
    under the temperature-scaled distributions (unmasked: the caller masks padding). The one measurement
    behind `evaluate.measure_answers` and the Chat page's token view (`core/analysis/token_kl.py`)."""
    positions = positions_from_mask(mask)
    logprobs = response_logprobs(policy, ids, mask, positions, prompt_len, temperature).logprobs
    ref_logprobs = response_logprobs(reference_policy.to(ids.device), ids, mask, positions, prompt_len, temperature).logprobs
    return kl_penalty(logprobs, ref_logprobs)


def k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r, r = pi_ref / pi: an unbiased, non-negative estimate of KL's *value*.

    Use it to report a KL or as a loss term differentiated pathwise (GRPO does); not as a reward.
    """
    log_ratio = logprobs - ref_logprobs
    return torch.expm1(-log_ratio) + log_ratio


class PromptSampler:
    """Shuffled passes over the prompts, `batch_size` at a time (a DataLoader with a saved position)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def next(self) -> list[int]:
        out: list[int] = []
        while len(out) < self.batch_size:
            if not self.order:
                self.order = torch.randperm(self.n, generator=self.generator).tolist()
            take = self.batch_size - len(out)
            out += self.order[:take]
            self.order = self.order[take:]
        return out

    def state(self) -> dict:
        return {"order": self.order, "generator": self.generator.get_state()}

    def load(self, state: dict) -> None:
        self.order = list(state["order"])
        self.generator.set_state(state["generator"])
