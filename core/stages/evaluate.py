"""Held-out evaluation by sampling, scored by the demo's simulated labeler.

docs/NOTES.md: PPO's gains show at the rollout temperature, not greedy, so `gold` is the mean over
samples at the given temperature; callers report greedy beside it.
"""

from __future__ import annotations

import torch

from core.data import demo
from core.models.generate import sample
from core.stages.reward_terms import Answers


def all_demo(prompts: list[str]) -> bool:
    """Every prompt is one of the demo's, so its labeler can score the answers: gold applies."""
    return bool(prompts) and all(demo.expected_answer(p) is not None for p in prompts)


@torch.no_grad()
def measure_answers(
    model, tokenizer, prompts: list[str], temperature: float = 1.0, max_new_tokens: int = 24, seed: int = 1234,
    batch_size: int = 64, reward_model=None, reference=None, reward=None, columns: list[dict] | None = None,
) -> dict[str, list | None]:
    """One answer per prompt sampled from `model` at `temperature` (seeded per chunk of `batch_size`, so the
    same arguments draw the same answers) and, per answer, every measure asked for, all on those very
    answers in one sampling pass:

    - `parts`: the labeler's `demo.GoldParts` (None unless every prompt is one of the demo's);
    - `texts`: the answers themselves; `length`: tokens, EOS included; `finished`: the answer emitted EOS;
    - `rm` (with `reward_model`): the raw RM score (`answer_rm_scores`; when `reward` has an `rm` term over
      this very model, that term's values: the RM scores each answer once, not twice);
    - `kl` (with `reference`): KL(pi || pi_ref) of the answer, sum_t (log pi(y_t) - log pi_ref(y_t)), EOS
      included (k1 summed over the answer: a Monte-Carlo estimate of the KL), under the temperature-scaled
      distributions, the ones sampled from, as in PPO's `kl` metric: the one KL measurement of every method;
    - `terms` (with `reward`, a `core.stages.reward_terms.Reward`, and the prompts' rows' `columns`): each
      term's value per answer, {term: [...]}: a verifier's pass rate is its mean; `reward`: the weighted total.
    """
    if reference is not None and temperature <= 0:
        raise ValueError("the KL is measured on sampled answers: temperature must be > 0")
    networks = [m for m in (model, reward_model, reference) if m is not None]
    was_training = [m.training for m in networks]
    for m in networks:
        m.eval()
    gold_applies = all_demo(prompts)
    out: dict[str, list | None] = {"parts": [] if gold_applies else None, "texts": [], "length": [], "finished": [],
                                   "rm": None if reward_model is None else [],
                                   "kl": None if reference is None else [], "terms": None if reward is None else {},
                                   "reward": None if reward is None else []}
    rm_term = reward.term_scored_by(reward_model) if reward is not None and reward_model is not None else None
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            answers = sample(model, tokenizer, chunk, max_new_tokens, temperature, seed=seed + i)
            out["texts"] += answers.texts
            out["length"] += answers.response_mask.sum(1).tolist()
            out["finished"] += answers.finished.tolist()
            if gold_applies:
                out["parts"] += [demo.gold_parts(p, text) for p, text in zip(chunk, answers.texts)]
            if reward is not None:
                rows = columns[i : i + batch_size] if columns is not None else None
                scored = reward(Answers.of_samples(answers, chunk, rows))
                out["reward"] += scored.total.tolist()
                for name, values in scored.terms.items():
                    out["terms"].setdefault(name, []).extend(values.tolist())
            if reward_model is not None:
                rm = scored.terms[rm_term] if rm_term is not None else answer_rm_scores(reward_model, answers)
                out["rm"] += rm.tolist()
            if reference is not None:
                out["kl"] += answer_kl(model, reference, answers, temperature).tolist()
    finally:
        for m, mode in zip(networks, was_training):
            m.train(mode)
    return out


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / max(1, len(xs))


def gold_eval(
    model, tokenizer, tasks: list[demo.Task], temperature: float = 1.0, max_new_tokens: int = 24,
    seed: int = 1234, batch_size: int = 64, reference=None,
) -> dict[str, float]:
    """Mean gold score and its parts over `tasks`, one sampled answer each; with `reference`, also the mean
    KL to it (`kl`) of the same answers."""
    answers = measure_answers(model, tokenizer, [t.prompt for t in tasks], temperature, max_new_tokens, seed,
                              batch_size, reference=reference)
    parts = answers["parts"] or []
    means = {
        "gold": _mean(p.score for p in parts),
        "correct": _mean(p.correct for p in parts),
        "template": _mean(p.template for p in parts),
        "concise": _mean(p.concise for p in parts),
        "length": _mean(answers["length"]),
        "eos_rate": _mean(answers["finished"]),
    }
    if reference is not None:
        means["kl"] = _mean(answers["kl"])
    return means


@torch.no_grad()
def answer_kl(model, reference, samples, temperature: float) -> torch.Tensor:
    """Per sampled answer (`core.models.generate.Samples`), sum_t log pi(y_t) - log pi_ref(y_t) over its
    tokens, EOS included (`core.stages.rl.token_kl`, masked)."""
    from core.stages.rl import token_kl

    ids, mask = samples.sequences()
    kl = token_kl(model, reference, ids, mask, samples.prompt_ids.shape[1], temperature)
    return (kl * samples.response_mask).sum(1)


def _answer_scores(reward_model, samples) -> tuple[torch.Tensor, torch.Tensor]:
    from core.models.ensemble import answer_scores
    from core.stages.rl import positions_from_mask

    ids, mask = samples.sequences()
    last = (samples.response_mask.sum(1).long() - 1).clamp(min=0)
    return answer_scores(reward_model, ids, mask, positions_from_mask(mask), samples.prompt_ids.shape[1], last)


@torch.no_grad()
def answer_rm_scores(reward_model, samples) -> torch.Tensor:
    """The reward model's score of each sampled answer (`core.models.generate.Samples`), read at its last
    response token (the EOS, or the last sampled token when cut off), as PPO's `score_responses` reads it
    (raw: no missing-EOS penalty; of an ensemble, its aggregate reward)."""
    return _answer_scores(reward_model, samples)[0]


@torch.no_grad()
def member_means(reward_model, model, tokenizer, prompts: list, temperature: float = 1.0, max_new_tokens: int = 24,
                 seed: int = 1234, batch_size: int = 64) -> list[float]:
    """Each member's mean score (one RM: its own) of `model`'s answers to `prompts`, one sampled answer each:
    where the members of an ensemble sit on that policy's answers (`rlhf ensemble --align-on`)."""
    total = None
    for i in range(0, len(prompts), batch_size):
        answers = sample(model, tokenizer, prompts[i : i + batch_size], max_new_tokens, temperature, seed=seed + i)
        scores = _answer_scores(reward_model, answers)[1].sum(1)
        total = scores if total is None else total + scores
    return (total / len(prompts)).tolist()


def policy_member_means(members: list, policy: str, prompts: list) -> list[float]:
    """`member_means` of the reward-model directories `members` on the answers of the policy directory `policy`
    (the SFT model an ensemble will judge), whose tokenizer must be theirs: `rlhf ensemble --align-on`."""
    from core.models.ensemble import RewardEnsemble
    from core.models.loading import check_same_tokenizer, load_policy, load_scalar_model, load_tokenizer, pick_device

    device = pick_device("auto")
    tokenizer = load_tokenizer(policy)
    check_same_tokenizer(tokenizer, load_tokenizer(members[0]), f"--align-on {policy}")
    reward_models = RewardEnsemble([load_scalar_model(m, tokenizer.pad_token_id, device) for m in members])
    return member_means(reward_models, load_policy(policy, device, dropout=0.0), tokenizer, prompts)


def score_answers(
    model, tokenizer, prompts: list[str], reward_model, temperature: float = 1.0, max_new_tokens: int = 24,
    seed: int = 1234, batch_size: int = 64, reference=None, reward=None, columns: list[dict] | None = None,
) -> dict[str, list | None]:
    """One answer per prompt sampled from `model` (`texts`), and per answer: the raw RM score (`rm`), the gold
    score (`gold`, None unless every prompt is one of the demo's), the length in tokens, EOS included
    (`length`), with `reference` the KL to it (`kl`, else None) and with `reward` (reward terms) each
    term's values (`terms`, {term: [...]}, else None): `measure_answers`."""
    answers = measure_answers(model, tokenizer, prompts, temperature, max_new_tokens, seed, batch_size,
                              reward_model=reward_model, reference=reference, reward=reward, columns=columns)
    gold = None if answers["parts"] is None else [p.score for p in answers["parts"]]
    return {"texts": answers["texts"], "rm": answers["rm"], "gold": gold, "length": answers["length"],
            "kl": answers["kl"], "terms": answers["terms"]}


def policy_eval(
    model, reference, reward, tokenizer, tasks: list[demo.Task], temperature: float = 1.0,
    max_new_tokens: int = 24, seed: int = 1234, batch_size: int = 64, columns: list[dict] | None = None,
) -> dict:
    """Held-out gold, proxy reward and KL to `reference` of answers sampled from `model` at `temperature`,
    one per task (the over-optimisation study's measurement, core/runs/study.py): mean `gold`
    (demo.gold_score), mean `rm`, the proxy: `reward`'s total (a `core.stages.reward_terms.Reward`, the RM
    score when the reward is the RM alone; `columns`: the tasks' rows), each term's mean (`terms`), and mean
    `kl` (the per-answer sum of log pi - log pi_ref), all on the same answers (`measure_answers`)."""
    answers = measure_answers(model, tokenizer, [t.prompt for t in tasks], temperature, max_new_tokens, seed,
                              batch_size, reference=reference, reward=reward, columns=columns)
    return {"gold": _mean(p.score for p in answers["parts"] or []), "rm": _mean(answers["reward"]),
            "kl": _mean(answers["kl"]), "terms": {name: _mean(v) for name, v in answers["terms"].items()}}
