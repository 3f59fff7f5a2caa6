"""The one generation path: batched sampling with a KV cache, used by rollouts, evaluation,
the Rank page and (streamed) the Chat page.

Hand-written instead of `model.generate` because PPO's rollouts are the hot loop on small
models: generate's per-step bookkeeping (logits processors, stopping criteria, cache classes)
costs more than the tiny forward pass itself. The loop is the textbook one: left-padded
prompts, explicit position ids, sample, append, stop when every row has emitted EOS.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.models.chat import encode_prompt, fit_prompt
from core.models.static_cache import cache_width, check_kv_cache, decode_step, key_dtype, static_cache


@dataclass
class Samples:
    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, T) EOS kept, pad after it
    response_mask: torch.Tensor  # (B, T) 1 up to and including EOS
    finished: torch.Tensor  # (B,) bool: the answer emitted EOS
    texts: list[str]  # decoded answers, EOS and padding removed

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) of prompt + answer side by side: what a teacher-forced forward over the answers reads
        (the answers start at column `prompt_ids.shape[1]`)."""
        return (torch.cat([self.prompt_ids, self.response_ids], 1),
                torch.cat([self.prompt_mask, self.response_mask], 1))


# The prompt budget of sampling outside a stage (the Chat page); PPO, GRPO and RLOO take theirs from their
# config's `max_prompt_length`, whose default is this number.
MAX_PROMPT_TOKENS = 96


def encode_prompts(tokenizer, prompts: list, max_prompt_tokens: int = MAX_PROMPT_TOKENS, device=None):
    """Chat-formatted, left-padded prompt ids and mask (left so every row ends where generation starts).
    A prompt is a string (one user turn) or a conversation (`core.models.chat`); one longer than
    `max_prompt_tokens` keeps its most recent whole turns (`fit_prompt`; stages log it, `fit_report`)."""
    ids = []
    for p in prompts:
        x = encode_prompt(tokenizer, p)
        if len(x) > max_prompt_tokens:  # render the cut conversation only when the whole one does not fit
            x = encode_prompt(tokenizer, fit_prompt(tokenizer, p, max_prompt_tokens)[0])
        ids.append(x)
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
    return input_ids, mask


def _next_token(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # always keeps the top token
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def _decode_steps(model, prompt_ids, prompt_mask, max_new_tokens, temperature, top_p, eos_id, pad_id, generator,
                  kv_cache: str = "dynamic") -> Iterator[torch.Tensor]:
    """Yield one (B,) token tensor per step; finished rows get pad. `kv_cache`: core/models/static_cache.py."""
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    cache, step, mask = None, model, prompt_mask
    if kv_cache != "dynamic":
        width = cache_width(prompt_ids.shape[1], max_new_tokens)
        cache = static_cache(model, prompt_ids.shape[0], width, key_dtype(model, prompt_ids.device))
        step = decode_step(model, compiled=kv_cache == "compiled")
        mask = F.pad(prompt_mask, (0, width - prompt_ids.shape[1]), value=1)  # the causal mask hides unwritten slots
    out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                use_cache=True)
    position = positions[:, -1:]
    finished = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
    for _ in range(max_new_tokens):
        token = _next_token(out.logits[:, -1, :], temperature, top_p, generator)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        yield token
        finished |= token == eos_id
        if bool(finished.all()):
            return
        if cache is None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position = position + 1
        out = step(input_ids=token[:, None], attention_mask=mask, position_ids=position,
                   past_key_values=out.past_key_values if cache is None else cache, use_cache=True)


def _generator(seed: int | None, device) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def sample(
    model, tokenizer, prompts: list[str], max_new_tokens: int = 24, temperature: float = 1.0,
    top_p: float = 1.0, seed: int | None = None, prompt_ids=None, prompt_mask=None, kv_cache: str = "dynamic",
) -> Samples:
    """Sample one answer per prompt. Pass `prompt_ids/mask` to skip re-tokenising (PPO does). `kv_cache`
    "static" or "compiled" samples the same tokens through a preallocated cache (core/models/static_cache.py)."""
    check_kv_cache(kv_cache)
    device = next(model.parameters()).device
    if prompt_ids is None:
        prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device=device)
    was_training = model.training
    model.eval()  # no dropout while sampling (docs/NOTES.md: it biases the first-step KL)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    steps = list(_decode_steps(model, prompt_ids, prompt_mask, max_new_tokens, temperature, top_p, eos, pad,
                               _generator(seed, device), kv_cache))
    model.train(was_training)
    response = torch.stack(steps, dim=1) if steps else prompt_ids[:, :0]
    is_eos = response == eos
    finished = is_eos.any(dim=1)
    # Mask covers the answer up to and including its first EOS.
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    response_mask = (~after_eos).long()
    response = torch.where(after_eos, torch.full_like(response, pad), response)
    texts = [decode_answer(tokenizer, row, eos) for row in response.tolist()]
    return Samples(prompt_ids, prompt_mask, response, response_mask, finished, texts)


def decode_answer(tokenizer, ids: list[int], eos_id: int) -> str:
    if eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def stream(model, tokenizer, prompt: str | list[dict], max_new_tokens: int = 64, temperature: float = 1.0,
           top_p: float = 1.0, seed: int | None = None, sampled: list[int] | None = None) -> Iterator[str]:
    """Yield the answer's text as it grows, token by token (the Chat page); `prompt` is one user turn
    or a whole conversation. `sampled`, when given, receives the answer's token ids, EOS included when
    it stopped (the Chat page's token view scores those very tokens, as PPO scores its rollouts)."""
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [prompt], device=device)
    model.eval()
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    shown = ""
    for token in _decode_steps(model, prompt_ids, prompt_mask, max_new_tokens, temperature, top_p, eos,
                               tokenizer.pad_token_id, _generator(seed, device)):
        if sampled is not None:
            sampled.append(int(token[0]))
        if int(token[0]) == eos:
            return
        ids.append(int(token[0]))
        text = tokenizer.decode(ids, skip_special_tokens=True).lstrip()  # as decode_answer: no leading space
        if not text.endswith("\ufffd"):  # wait for a whole UTF-8 character
            yield text[len(shown):]
            shown = text
