"""The token-level view of log π − log π_ref: what each token of an answer adds to the KL that PPO's
reward penalises, and the coloured HTML the Chat page and Monitor's rollout browser draw it with.

The numbers come from PPO's own functions (`core/stages/rl.py`: `response_logprobs` divides by the
sampling temperature, `kl_penalty` = k1), so an answer's sum here is the `kl`
PPO's reward subtracts β times for the same tokens (docs/NOTES.md, "KL estimators").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.textsafe import escape_html, token_text

@dataclass
class AnswerKL:
    """One answer, token by token: `tokens` = [(token text, log π − log π_ref)], `kl` their sum; `rm_score` the
    reward model's (an ensemble's aggregate), `rm_members` each member's score (one for a single RM) and
    `rm_spread` their disagreement (the std the conservative reward subtracts)."""

    tokens: list[tuple[str, float]]
    kl: float
    rm_score: float | None = None
    rm_members: list[float] | None = None
    rm_spread: float | None = None


@torch.no_grad()
def answer_token_kl(policy, reference_policy, prompt_ids: list[int], answer_ids: list[int],
                    temperature: float) -> list[float]:
    """log π(y_t) − log π_ref(y_t) for each answer token y_t after the prompt, from the
    temperature-scaled distributions (the ones PPO samples from and scores)."""
    from core.stages.rl import token_kl

    if temperature <= 0:
        raise ValueError("log-probs are those of the sampling distribution: the temperature must be > 0")
    if not prompt_ids or not answer_ids:
        raise ValueError("both the prompt and the answer need at least one token")
    device = next(policy.parameters()).device
    ids = torch.tensor([prompt_ids + answer_ids], device=device)
    return token_kl(policy, reference_policy, ids, torch.ones_like(ids), len(prompt_ids), temperature)[0].tolist()


@torch.no_grad()
def answer_view(policy, reference_policy, tokenizer, conversation: str | list[dict], answer_ids: list[int],
                temperature: float, reward_model=None) -> AnswerKL:
    """An answer's tokens (as sampled: EOS included when it stopped) after `conversation` (its turns
    so far, encoded as generation encodes them): each token's log π − log π_ref, their sum, and the
    RM's score at the last token, as PPO reads it: a `RewardEnsemble`'s aggregate with each member's
    score, or a plain reward model's. The models must share the policy's tokenizer (`check_same_tokenizer`,
    at the caller)."""
    from core.models.ensemble import answer_scores, disagreement
    from core.models.generate import encode_prompts

    prompt_ids = encode_prompts(tokenizer, [conversation])[0][0].tolist()  # one row: no padding
    per_token = answer_token_kl(policy, reference_policy, prompt_ids, answer_ids, temperature)
    tokens = [(token_text(tokenizer, t), k) for t, k in zip(answer_ids, per_token)]
    if reward_model is None:
        return AnswerKL(tokens, sum(per_token))
    device = next(reward_model.parameters()).device
    ids = torch.tensor([prompt_ids + answer_ids], device=device)
    reward, members = answer_scores(reward_model, ids, torch.ones_like(ids), None, len(prompt_ids),
                                    torch.tensor([len(answer_ids) - 1], device=device))
    return AnswerKL(tokens, sum(per_token), float(reward[0]), members[:, 0].tolist(), float(disagreement(members)[0]))


def token_html(tokens: list[tuple[str, float]]) -> str:
    """Each token on a colour for log π − log π_ref: red where the policy likes it more than the
    reference, blue where less. Every token's text is HTML-escaped (model text is never markup)."""
    spans = []
    for text, k in tokens:
        alpha = min(1.0, abs(k) / 2.0) * 0.85
        rgb = "220,50,47" if k > 0 else "38,139,210"
        spans.append(f'<span title="log π − log π_ref = {k:+.3f}" style="background: rgba({rgb},{alpha:.2f});'
                     f' border-radius: 3px; padding: 1px 0">{escape_html(text)}</span>')
    return "".join(spans)
