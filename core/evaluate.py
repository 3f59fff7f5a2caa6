"""Held-out evaluation by sampling, scored by the demo's simulated labeler.

docs/ARCHITECTURE.md: PPO's gains show at the rollout temperature, not greedy, so `gold` is the mean over
samples at the given temperature; callers report greedy beside it.
"""

from __future__ import annotations

import torch

from core.data import demo
from core.models.generate import sample


def all_demo(prompts: list[str]) -> bool:
    """Every prompt is one of the demo's, so its labeler can score the answers: gold applies."""
    return bool(prompts) and all(demo.expected_answer(p) is not None for p in prompts)


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


@torch.no_grad()
def kl_to_reference(
    model, reference, tokenizer, prompts: list[str], temperature: float = 1.0, max_new_tokens: int = 24,
    seed: int = 1234, batch_size: int = 64,
) -> float:
    """KL(pi || pi_ref) per answer, measured the same way for every method (PPO, DPO, GRPO, RLOO):
    the mean over `prompts` of sum_t (log pi(y_t) - log pi_ref(y_t)) on one answer per prompt sampled
    from pi at `temperature`, EOS included (k1 summed over the answer: a Monte-Carlo estimate of the
    KL). Log-probs are those of the temperature-scaled distributions, the ones sampled from, as in
    PPO's `kl` metric."""
    from core.stages.rl import token_kl

    if temperature <= 0:
        raise ValueError("the KL is measured on sampled answers: temperature must be > 0")
    was_training = (model.training, reference.training)
    model.eval()
    reference.eval()
    total, n = 0.0, 0
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        out = sample(model, tokenizer, chunk, max_new_tokens, temperature, seed=seed + i)
        ids = torch.cat([out.prompt_ids, out.response_ids], 1)
        mask = torch.cat([out.prompt_mask, out.response_mask], 1)
        kl = token_kl(model, reference, ids, mask, out.prompt_ids.shape[1], temperature)
        total += float((kl * out.response_mask).sum())
        n += len(chunk)
    model.train(was_training[0])
    reference.train(was_training[1])
    return total / max(1, n)


def checkpoint_kl(model_ref, reference_ref, device: str = "auto", n_prompts: int = 200, temperature: float = 1.0,
                  max_new_tokens: int = 24) -> float:
    """`kl_to_reference` between two checkpoints on the demo's held-out prompts (the pipeline's KL to SFT)."""
    from core.models.loading import load_policy, load_tokenizer, pick_device

    dev = pick_device(device)
    tokenizer = load_tokenizer(model_ref)
    model, reference = load_policy(model_ref, dev, dropout=0.0), load_policy(reference_ref, dev, dropout=0.0)
    prompts = [t.prompt for t in demo.heldout_tasks(n_prompts)]
    return kl_to_reference(model, reference, tokenizer, prompts, temperature, max_new_tokens)


@torch.no_grad()
def answer_rm_scores(reward_model, samples) -> torch.Tensor:
    """The reward model's score of each sampled answer (`core.models.generate.Samples`), read at its last
    response token (the EOS, or the last sampled token when cut off), as PPO's `score_responses` reads it
    (raw: no missing-EOS penalty)."""
    from core.models.loading import token_scores
    from core.stages.rl import positions_from_mask

    ids = torch.cat([samples.prompt_ids, samples.response_ids], 1)
    mask = torch.cat([samples.prompt_mask, samples.response_mask], 1)
    P = samples.prompt_ids.shape[1]
    last = (samples.response_mask.sum(1).long() - 1).clamp(min=0)
    scores = token_scores(reward_model, ids, mask, positions_from_mask(mask))[:, P:].float()
    return scores.gather(1, last[:, None]).squeeze(1)


@torch.no_grad()
def score_answers(
    model, tokenizer, prompts: list[str], reward_model, temperature: float = 1.0, max_new_tokens: int = 24,
    seed: int = 1234, batch_size: int = 64,
) -> dict[str, list | None]:
    """One answer per prompt sampled from `model`, and per answer: the raw RM score (`rm`), the gold
    score (`gold`, None unless every prompt is one of the demo's) and the length in tokens, EOS
    included (`length`). Sampled with the seed and batching of `kl_to_reference`, so a KL measured
    with the same arguments is measured on these very answers."""
    gold_applies = all_demo(prompts)
    rm, gold, lengths = [], [], []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        out = sample(model, tokenizer, chunk, max_new_tokens, temperature, seed=seed + i)
        rm += answer_rm_scores(reward_model, out).tolist()
        lengths += out.response_mask.sum(1).tolist()
        if gold_applies:
            gold += [demo.gold_score(p, text) for p, text in zip(chunk, out.texts)]
    return {"rm": rm, "gold": gold if gold_applies else None, "length": lengths}


@torch.no_grad()
def policy_eval(
    model, reference, reward_model, tokenizer, tasks: list[demo.Task], temperature: float = 1.0,
    max_new_tokens: int = 24, seed: int = 1234, batch_size: int = 64,
) -> dict[str, float]:
    """Held-out gold, RM score and KL to `reference` of answers sampled from `model` at `temperature`,
    one per task (the over-optimisation study's measurement, core/study.py): mean `gold`
    (demo.gold_score), mean raw `rm` score, and `kl` = `kl_to_reference` (the mean per-answer sum of
    log pi - log pi_ref), all three on the same answers (`score_answers`)."""
    prompts = [t.prompt for t in tasks]
    answers = score_answers(model, tokenizer, prompts, reward_model, temperature, max_new_tokens, seed, batch_size)
    kl = kl_to_reference(model, reference, tokenizer, prompts, temperature, max_new_tokens, seed, batch_size)
    n = max(1, len(tasks))
    return {"gold": sum(answers["gold"] or []) / n, "rm": sum(answers["rm"]) / n, "kl": kl}
