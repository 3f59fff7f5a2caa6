"""Pieces every policy-gradient stage shares (PPO today; GRPO and RLOO next): log-probs of a
sampled response, the KL penalty to the reference policy, masked statistics, prompt sampling.

Kept out of `ppo.py` so a stage without a value model does not import PPO.
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise over the real (unmasked) tokens only, so padding does not skew the statistics."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    # Left-padded prompts: each row's first real token is position 0, as in training and sampling.
    return (mask.cumsum(-1) - 1).clamp(min=0)


def response_logits(model, ids, mask, positions, prompt_len: int, temperature: float) -> torch.Tensor:
    """Logits that predict each response token: positions P-1 .. P+T-2 of the full sequence.

    `logits_to_keep` skips the LM head on prompt positions. Dividing by the rollout temperature
    makes these the log-probs of the distribution we actually sampled from (Huang et al. 2022 detail).
    """
    response_len = ids.shape[1] - prompt_len
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                   logits_to_keep=response_len + 1).logits[:, :-1]
    return logits.float() / temperature


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.gather(logits.log_softmax(-1), 2, tokens[..., None]).squeeze(-1)


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
