"""Stage 2: a reward model trained on K-wise rankings.

InstructGPT section 3.5: a labeler ranks K = 4..9 answers to a prompt; all C(K,2) pairs of
one prompt go into the same step (as one batch element) so the model does not overfit from
seeing the same answer in many separate pairs, and each answer is forwarded **once**: its
score is reused in all K-1 pairs it belongs to. That is also where the speed over TRL's
pairwise RewardTrainer comes from (2 forwards per pair there, K forwards per C(K,2) pairs here).

loss = -mean over pairs (winner w, loser l) of log sigmoid(r(x, y_w) - r(x, y_l))

After training, a bias is set so the SFT demonstrations score mean 0, which keeps PPO's
rewards centred and the value model's targets small.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from core.config import RewardConfig
from core.data import demo
from core.data.sources import Ranking, load_rankings, one_per_item
from core.data.store import Store
from core.stages.events import Events
from core.models.chat import encode_answer, fit_prompt
from core.models.generate import sample
from core.models.loading import (
    Device,
    hf_model,
    last_hidden_state,
    load_policy,
    load_scalar_model,
    load_tokenizer,
    pick_device,
    save_model,
    token_scores,
)
from core.models.ensemble import ScoreHeads, save_ensemble
from core.models.lora import prepare_for_training
from core.paths import atomic_write_text, checkpoints_dir
from core.models import optim
from core.stages import microbatch
from core.stages.resume import (
    checkpoint_path,
    latest_checkpoint,
    load_training_checkpoint,
    optimizer_state,
    restore_optimizer,
    save_training_checkpoint,
)

SUMMARY_FILE = "rm_summary.json"
RANKINGS_FILE = "rankings.json"  # the run's train/held-out rankings, kept so a resume trains on the same ones


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def distinct_by_gold(prompt: str, responses: list[str]) -> list[str]:
    """Drop exact duplicates and answers the labeler scores equal: a ranking cannot hold ties."""
    kept, scores = [], set()
    for r in responses:
        s = round(demo.gold_score(prompt, r), 6)
        if r.strip() and s not in scores:
            kept.append(r)
            scores.add(s)
    return kept


def sample_demo_rankings(
    policy, tokenizer, tasks: list[demo.Task], k: int, sample_temperature: float, labeler_temperature: float,
    seed: int, events: Events, what: str, batch_prompts: int = 64,
) -> list[Ranking]:
    """Sample K answers per prompt from the SFT policy and let the simulated labeler rank them."""
    rankings = []
    for i in range(0, len(tasks), batch_prompts):
        chunk = tasks[i : i + batch_prompts]
        prompts = [t.prompt for t in chunk for _ in range(k)]
        texts = sample(policy, tokenizer, prompts, max_new_tokens=32, temperature=sample_temperature, seed=seed + i).texts
        for j, task in enumerate(chunk):
            answers = distinct_by_gold(task.prompt, texts[j * k : (j + 1) * k])
            if len(answers) < 2:
                continue
            order = demo.rank(task.prompt, answers, temperature=labeler_temperature, seed=seed + i + j)
            rankings.append(Ranking(task.prompt, [answers[o] for o in order]))
        events.progress(min(i + batch_prompts, len(tasks)), len(tasks), f"sampling {what} rankings")
    return rankings


def split_heldout(rankings: list[Ranking], seed: int) -> tuple[list[Ranking], list[Ranking]]:
    rankings = rankings[:]
    random.Random(seed).shuffle(rankings)
    n = len(rankings) // 10 if len(rankings) >= 10 else 0
    return rankings[n:], rankings[:n]


# ---------------------------------------------------------------------------------------------
# Scoring and the K-wise loss
# ---------------------------------------------------------------------------------------------


def encode_answer_fitted(tokenizer, prompt: str | list[dict], response: str, max_length: int
                         ) -> tuple[list[int], int]:
    """(prompt + answer + EOS ids in the model's chat format, as PPO samples and scores it; how many
    earlier turns were left out): the answer cut to half of `max_length` (its EOS kept last, where the
    score is read), and a conversation that does not fit the rest keeps its most recent whole turns."""
    prompt_ids, answer = encode_answer(tokenizer, prompt, response)
    if len(answer) > max_length // 2:
        answer = [*answer[: max_length // 2 - 1], answer[-1]]
    fitted, dropped = fit_prompt(tokenizer, prompt, max_length - len(answer))
    if dropped:  # only a cut conversation renders differently
        prompt_ids = encode_answer(tokenizer, fitted, response)[0]
    return prompt_ids + answer, dropped


def encode_answers(tokenizer, prompt: str | list[dict], responses: list[str], max_length: int) -> list[list[int]]:
    """Each response after the prompt (`encode_answer_fitted`)."""
    return [encode_answer_fitted(tokenizer, prompt, r, max_length)[0] for r in responses]


def truncation_note(tokenizer, rankings: list[Ranking], max_length: int) -> str | None:
    """The run-log line for rankings whose conversations lose their oldest turns to fit `max_length`."""
    dropped = [max(encode_answer_fitted(tokenizer, r.prompt, a, max_length)[1] for a in r.responses)
               for r in rankings if not isinstance(r.prompt, str)]
    cut = [d for d in dropped if d]
    if not cut:
        return None
    return (f"{len(cut)} of {len(rankings)} rankings have conversations longer than max_length ({max_length} "
            f"tokens with their answer): their oldest {min(cut)}-{max(cut)} turns are left out, the most recent "
            "whole turns kept")


class TokenScores(torch.nn.Module):
    """`token_scores` as a module's forward: DDP syncs the gradients of what runs through the forward of
    the module it wraps, and the scalar model's own forward pools at a pad-token search instead."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return token_scores(self.model, input_ids, attention_mask)


def score_sequences(model, sequences: list[list[int]], pad_id: int, device: Device, scorer=None,
                    call_tokens: int | None = None) -> torch.Tensor:
    """The score of each sequence, read at its last token. `scorer`: the (prepared) `TokenScores` to train
    through, or any (ids, mask) -> (batch, seq[, members]) scores (a reward ensemble's members: then (sequences,
    members) come back), else `model` is read directly. `call_tokens`: cut the sequences by length into several
    forwards, each padded only to its own longest (`core/stages/microbatch.py`; a sequence's score does
    not depend on the others in its forward); None: one forward for all."""
    buckets = microbatch.length_buckets([len(s) for s in sequences], call_tokens)
    return microbatch.in_given_order(buckets, [_score_padded(model, [sequences[i] for i in bucket], pad_id, device,
                                                             scorer) for bucket in buckets])


def _score_padded(model, sequences: list[list[int]], pad_id: int, device: Device, scorer) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    ids, mask = ids.to(device.torch), mask.to(device.torch)
    with device.autocast():
        per_token = scorer(ids, mask) if scorer is not None else token_scores(model, ids, mask)
    last = mask.sum(1) - 1
    return per_token[torch.arange(len(sequences), device=ids.device), last].float()


def pair_indices(group_sizes: list[int], device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(winner, loser, group) indices into the flat score vector for all C(K,2) pairs per group."""
    win, lose, group, offset = [], [], [], 0
    for g, k in enumerate(group_sizes):
        for i in range(k):
            for j in range(i + 1, k):
                win.append(offset + i)
                lose.append(offset + j)
                group.append(g)
        offset += k
    as_t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return as_t(win), as_t(lose), as_t(group)


def pair_margins(scores: torch.Tensor, group_sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_w - r_l for every pair, each pair's group index): the chosen-minus-rejected score gaps."""
    win, lose, group = pair_indices(group_sizes, scores.device)
    return scores[win] - scores[lose], group


def kwise_loss(scores: torch.Tensor, group_sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """InstructGPT's loss: each prompt's C(K,2) pairs averaged, then averaged over prompts
    (the 1/C(K,2) factor keeps prompts with large K from dominating). Returns (loss, accuracy)."""
    margin, group = pair_margins(scores, group_sizes)
    per_pair = -F.logsigmoid(margin)
    pairs_per_group = torch.bincount(group, minlength=len(group_sizes)).clamp(min=1)
    per_group = torch.zeros(len(group_sizes), device=scores.device).index_add(0, group, per_pair) / pairs_per_group
    return per_group.mean(), (margin > 0).float().mean()


@torch.no_grad()
def pairwise_accuracy(model, tokenizer, rankings: list[Ranking], max_length: int, device: Device, batch: int = 16) -> dict:
    """Held-out accuracy over all pairs; for demo prompts, also split by preference kind. Beside it, over
    every held-out answer: the scores' spread (`score_std`, whose drift across epochs the run doctor
    watches) and their Pearson correlation with the answer's length in tokens (`length_corr`: an RM that
    prefers longer answers whatever they say invites PPO to pad them)."""
    was_training = model.training
    model.eval()
    hits: dict[str, list[bool]] = {"all": []}
    all_scores: list[float] = []
    lengths: list[int] = []
    for i in range(0, len(rankings), batch):
        chunk = rankings[i : i + batch]
        seqs = [s for r in chunk for s in encode_answers(tokenizer, r.prompt, r.responses, max_length)]
        scores = score_sequences(model, seqs, tokenizer.pad_token_id, device)
        win, lose, group = pair_indices([len(r.responses) for r in chunk], scores.device)
        answers = [a for r in chunk for a in r.responses]
        all_scores += scores.tolist()
        lengths += [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
        for w, l, g, hit in zip(win.tolist(), lose.tolist(), group.tolist(), (scores[win] > scores[lose]).tolist()):
            prompt = chunk[g].prompt
            hits["all"].append(hit)
            if demo.expected_answer(prompt) is not None:
                hits.setdefault(demo.preference_kind(prompt, answers[w], answers[l]), []).append(hit)
    model.train(was_training)
    out = {f"accuracy_{k}" if k != "all" else "accuracy": sum(v) / len(v) for k, v in hits.items() if v}
    out.update({f"pairs_{k}": len(v) for k, v in hits.items()})
    if len(all_scores) > 1:
        out["score_std"] = statistics.pstdev(all_scores)
        try:
            out["length_corr"] = statistics.correlation(all_scores, lengths)
        except statistics.StatisticsError:  # every answer the same length, or every score the same
            pass
    return out


def demonstrations_for_bias(config: RewardConfig, store: Store | None, train: list[Ranking]) -> list[tuple[str, str]]:
    """What 'the SFT demonstrations' are for centring: the demo set, the store's, or (for a plain
    rankings file) the top-ranked answers."""
    if config.data == "demo":
        rows = demo.demonstrations(demo.train_tasks(500))
        return [(r["prompt"], r["completion"]) for r in rows]
    if store is not None and store.list_demonstrations():
        return [(d["prompt"], d["output"]) for d in store.list_demonstrations()]
    return [(r.prompt, r.responses[0]) for r in train]


@torch.no_grad()
def centre_on_demonstrations(model, tokenizer, pairs: list[tuple[str, str]], max_length: int, device: Device) -> float:
    """Set config.reward_bias so the demonstrations score mean 0; returns the new bias."""
    model.eval()
    scores = []
    for i in range(0, len(pairs), 64):
        seqs = [encode_answers(tokenizer, p, [c], max_length)[0] for p, c in pairs[i : i + 64]]
        scores += score_sequences(model, seqs, tokenizer.pad_token_id, device).tolist()
    model.config.reward_bias = getattr(model.config, "reward_bias", 0.0) - sum(scores) / len(scores)
    return model.config.reward_bias


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def demo_heldout_rankings(config: RewardConfig, policy, tokenizer, events: Events) -> list[Ranking]:
    """Held-out rankings from the noise-free labeler on the demo's held-out prompts: accuracy against
    the gold order, on prompts no stage trains on."""
    return sample_demo_rankings(policy, tokenizer, demo.heldout_tasks(config.heldout_prompts), config.k,
                                config.sample_temperature, 0.0, config.seed + 99, events, "held-out")


def gather_rankings(config: RewardConfig, store: Store | None, tokenizer, device: Device, events: Events):
    if config.data == "demo":
        policy = load_policy(config.sft_model, device, dropout=0.0)
        train_tasks = demo.train_tasks(config.n_prompts)
        train = sample_demo_rankings(policy, tokenizer, train_tasks, config.k, config.sample_temperature,
                                     config.labeler_temperature, config.seed, events, "training")
        heldout = demo_heldout_rankings(config, policy, tokenizer, events)
        del policy
        return train, heldout
    rankings = load_rankings(config.data, store)
    if config.one_ranking_per_item:
        rankings = one_per_item(rankings)
    if len(rankings) < 2:
        raise ValueError(f"need at least 2 rankings to train a reward model, found {len(rankings)} in {config.data!r}")
    if config.heldout == "none":
        return rankings, []
    if config.heldout == "demo":
        # The demo through the store (core/runs/demo_import.py): train on every stored ranking, hold out
        # the demo's own noise-free rankings, as on data='demo'.
        policy = load_policy(config.sft_model, device, dropout=0.0)
        heldout = demo_heldout_rankings(config, policy, tokenizer, events)
        del policy
        return rankings, heldout
    return split_heldout(rankings, config.seed)


def _rankings_once(config: RewardConfig, store: Store | None, tokenizer, device: Device, events: Events,
                   output_dir: Path) -> tuple[list[Ranking], list[Ranking]]:
    """The run's rankings, gathered (demo: sampled, minutes of work) once and kept beside its checkpoints."""
    path = checkpoints_dir(output_dir) / RANKINGS_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        return tuple([Ranking(**r) for r in saved[part]] for part in ("train", "heldout"))
    train, heldout = gather_rankings(config, store, tokenizer, device, events)
    atomic_write_text(path, json.dumps({part: [vars(r) for r in rows] for part, rows in
                                        (("train", train), ("heldout", heldout))}))
    return train, heldout


def run(config: RewardConfig, store: Store | None, events: Events, output_dir: str | Path) -> Path:
    """Train the RM from `config.sft_model`; returns `output_dir` (HF sequence-classification dir).

    Every saved model, epoch checkpoints included, is centred on the demonstrations (reward_bias),
    so any checkpoint the app offers as a reward model scores on the same scale. Re-running with the
    same `output_dir` resumes after the last finished epoch, on the same rankings.

    With `ensemble` = N > 1, N members train one after another on the same rankings, each with its own seed
    (its head's initialisation and its data order; member 0 trains as the single RM would), each into
    `checkpoints_dir(output_dir)/member-<i>` and resumable as a single RM; once all are done they become one
    ensemble directory at `output_dir` (`core/models/ensemble.py`). Its metrics continue one step axis,
    member after member."""
    config.validate()
    if not config.sft_model:
        raise ValueError("sft_model is empty: the reward model starts from an SFT checkpoint")
    dist = events.dist  # one process, or this rank of several (core/distributed.py)
    dist.check_batches("rm", config)
    output_dir = Path(output_dir)
    device = pick_device(config.device, config.precision)
    torch.manual_seed(config.seed)
    tokenizer = load_tokenizer(config.sft_model)
    # Rank 0 gathers the rankings (demo: samples them) and writes them down; the others read that file,
    # so every rank trains on the same rankings.
    if dist.is_main:
        train, heldout = _rankings_once(config, store, tokenizer, device, events, output_dir)
        note = truncation_note(tokenizer, train + heldout, config.max_length)
        if note:
            events.log(note)
    dist.barrier()
    if not dist.is_main:
        train, heldout = _rankings_once(config, store, tokenizer, device, events, output_dir)
    if not train:
        raise ValueError("no usable rankings: every sampled group collapsed to one distinct answer")
    events.log(f"reward model: {len(train)} training rankings ({sum(len(r.responses) for r in train)} answers), "
               f"{len(heldout)} held out")
    centring = demonstrations_for_bias(config, store, train)
    prefix = events.run_id or "rm"
    if config.ensemble == 1:
        summary = train_member(config, events, output_dir, tokenizer, device, train, heldout, centring, prefix)
        if summary is None:
            # Nothing centred to offer yet: leave no reward model behind (a resume starts the first epoch again).
            events.log("stopped before the first epoch ended; resume with the same output directory")
    else:
        summary = _train_ensemble(config, events, output_dir, tokenizer, device, train, heldout, centring, prefix)
    if summary is None:
        events.close()
        return output_dir
    if dist.is_main:
        atomic_write_text(output_dir.with_name(output_dir.name + "-rankings.jsonl"), "".join(
            json.dumps({"prompt": r.prompt, "responses": r.responses}) + "\n" for r in train))
        if (output_dir / SUMMARY_FILE).is_file():
            events.checkpoint(prefix, "rm", output_dir, summary["steps"])
    dist.barrier()  # the other ranks return once the output is written
    events.close()
    return output_dir


MEMBER_SEED_STRIDE = 1000  # member i trains with seed + 1000 i: no member's data order repeats another's epoch


def member_dir(output_dir: Path, i: int) -> Path:
    """Where member i of an ensemble trains and keeps its final model until the ensemble is assembled."""
    return checkpoints_dir(output_dir) / f"member-{i}"


def _train_ensemble(config: RewardConfig, events: Events, output_dir: Path, tokenizer, device: Device,
                    train: list[Ranking], heldout: list[Ranking], centring, prefix: str) -> dict | None:
    """The members one after another (a finished member is skipped on resume), then the ensemble directory and
    its summary; None when stopped (no ensemble is written until every member is done)."""
    dist = events.dist
    n = config.ensemble
    members, summaries = [member_dir(output_dir, i) for i in range(1 if config.ensemble_heads else n)], []
    for i, directory in enumerate(members):
        done = directory / SUMMARY_FILE
        if done.is_file() and not json.loads(done.read_text())["stopped"]:
            summaries.append(json.loads(done.read_text()))
            continue
        events.log(f"reward-model ensemble: member {i + 1} of {n}")
        if i:  # member 0 starts from the run's seed, as a single RM would
            torch.manual_seed(config.seed + MEMBER_SEED_STRIDE * i)
        seed = config.seed + MEMBER_SEED_STRIDE * i
        data = bootstrap(train, seed) if config.ensemble_bootstrap and i else train
        summary = train_member(config, events, directory, tokenizer, device, data, heldout, centring,
                               f"{prefix}-member-{i}", seed=seed, member=(i, n))
        if summary is None or summary["stopped"]:
            events.log(f"stopped while training member {i + 1} of {n}; resume with the same output directory")
            return None
        summaries.append(summary)
    heads = None
    if config.ensemble_heads:
        heads, head_summaries = fit_heads(config, events, members[0], tokenizer, device, train, heldout, centring)
        summaries += head_summaries
    accuracies = [s["heldout_accuracy"] for s in summaries if s.get("heldout_accuracy") is not None]
    summary = {"stage": "rm", "ensemble": n, "members": summaries,
               "heldout_accuracy": sum(accuracies) / len(accuracies) if accuracies else None,
               "train_rankings": len(train), "heldout_rankings": len(heldout),
               "steps": summaries[0 if heads is not None else -1]["steps"], "stopped": False,
               **({"heads": n - 1} if heads is not None else {})}
    if dist.is_main:
        save_ensemble(output_dir, members, extra_json={SUMMARY_FILE: summary}, heads=heads)
        events.log(f"reward-model ensemble of {n}: held-out accuracy per member "
                   + ", ".join(f"{a:.3f}" for a in accuracies))
    return summary


# A head refitted on fixed features, from the first member's head: full-batch AdamW steps. On separable
# rankings the K-wise loss keeps growing the weights, so the fit is short: the heads stay on the first
# member's scale and move apart only as their resamples pull.
HEAD_STEPS = 200
HEAD_LEARNING_RATE = 1e-3


def hf_score_weight(model) -> torch.Tensor:
    """The scalar head's weight (1, hidden) of a reward model (under LoRA, of the HF model inside)."""
    with hf_model(model) as m:
        return m.score.weight.detach().float().cpu()


@torch.no_grad()
def answer_features(model, tokenizer, rankings: list[Ranking], max_length: int, device: Device,
                    batch: int = 64) -> tuple[torch.Tensor, list[int]]:
    """(answers, hidden): the backbone's final hidden state at each ranked answer's last token, what a score
    head reads, and each ranking's answer count."""
    call_tokens = microbatch.scoring_call_tokens(device)
    seqs = [s for r in rankings for s in encode_answers(tokenizer, r.prompt, r.responses, max_length)]
    model.eval()
    with hf_model(model) as backbone:
        parts = [score_sequences(backbone, seqs[i : i + batch], tokenizer.pad_token_id, device,
                                 scorer=lambda ids, mask: last_hidden_state(backbone, ids, mask), call_tokens=call_tokens)
                 for i in range(0, len(seqs), batch)]
    return torch.cat(parts).cpu(), [len(r.responses) for r in rankings]


def fit_heads(config: RewardConfig, events: Events, first: Path, tokenizer, device: Device, train: list[Ranking],
              heldout: list[Ranking], centring) -> tuple[ScoreHeads, list[dict]]:
    """An ensemble of heads' members after the first: score heads on the first member's frozen backbone, head i
    fitted with the K-wise loss on a bootstrap resample of the rankings (seed + 1000 i). On fixed features the
    fit is convex, so heads fitted on the same rankings would all find one head: the resamples are what make
    them differ. Each is centred on the demonstrations as a whole member is."""
    model = load_scalar_model(first, tokenizer.pad_token_id, device)
    features, sizes = answer_features(model, tokenizer, train, config.max_length, device)
    starts = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    held = answer_features(model, tokenizer, heldout, config.max_length, device) if heldout else None
    demo_features = answer_features(model, tokenizer, [Ranking(p, [c]) for p, c in centring], config.max_length,
                                    device)[0]
    count = config.ensemble - 1
    heads = ScoreHeads(features.shape[1], count)
    summaries = []
    for i in range(1, count + 1):
        seed = config.seed + MEMBER_SEED_STRIDE * i
        head = torch.nn.Linear(features.shape[1], 1)
        with torch.no_grad():  # from the first member's own head: the heads part only where their resamples do
            head.weight.copy_(hf_score_weight(model))
            head.bias.zero_()
        picked = bootstrap_indices(len(train), seed)
        rows = torch.tensor([j for r in picked for j in range(starts[r], starts[r + 1])])
        x, k = features[rows], [sizes[r] for r in picked]
        optimizer = torch.optim.AdamW(head.parameters(), HEAD_LEARNING_RATE)
        for _ in range(HEAD_STEPS):
            loss, _ = kwise_loss(head(x).squeeze(-1), k)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            head.bias -= head(demo_features).mean()  # centred: the demonstrations score 0 on average
            accuracy = float(kwise_loss(head(held[0]).squeeze(-1), held[1])[1]) if held else None
            heads.linear.weight[i - 1] = head.weight[0]
            heads.linear.bias[i - 1] = head.bias[0]
        summaries.append({"stage": "rm", "head": i, "heldout_accuracy": accuracy, "seed": seed,
                          "train_rankings": len(train), "final_loss": loss.item()})
        events.log(f"reward-model ensemble: head {i} of {count} on the first member's backbone, final loss "
                   f"{loss.item():.4f}" + (f", held-out accuracy {accuracy:.3f}" if accuracy is not None else ""))
    heads.requires_grad_(False)
    return heads.to(device.torch), summaries


def bootstrap(train: list[Ranking], seed: int) -> list[Ranking]:
    """A bootstrap resample of the rankings: as many as there are, drawn with replacement (about 63 % of them
    distinct). Members trained on resamples agree where rankings are dense and part where they are thin, which
    is where a policy that games one reward model goes (the ensemble's std then flags it)."""
    return [train[i] for i in bootstrap_indices(len(train), seed)]


def bootstrap_indices(n: int, seed: int) -> list[int]:
    """`n` indices into `n` items drawn with replacement (`bootstrap`'s draw)."""
    rng = random.Random(seed)
    return [rng.randrange(n) for _ in range(n)]


def train_member(config: RewardConfig, events: Events, output_dir: Path, tokenizer, device: Device,
                 train: list[Ranking], heldout: list[Ranking], centring, prefix: str, seed: int | None = None,
                 member: tuple[int, int] = (0, 1)) -> dict | None:
    """Train one reward model into `output_dir` (resuming after its last finished epoch) and save it there with
    its summary; None when stopped before its first epoch ended. `seed`: its data order (default the config's);
    `member`: (i, N) of an ensemble, whose steps continue after the i members before it."""
    dist = events.dist
    seed = config.seed if seed is None else seed
    resume_from = latest_checkpoint(output_dir, "epoch")
    # With LoRA the base loads as it is and the checkpoint's adapter (and head) goes back on top of it.
    model = load_scalar_model(config.sft_model if config.lora else (resume_from or config.sft_model),
                              tokenizer.pad_token_id, device)
    model = prepare_for_training(model, config, "score", resume_from if config.lora else None)

    batch_starts = dist.batch_starts(len(train), config.batch_size)
    total_steps = len(batch_starts) * config.epochs
    offset = member[0] * total_steps  # the steps of the members trained before this one
    optimizer = optim.adamw([p for p in model.parameters() if p.requires_grad], config.learning_rate)
    scheduler = optim.make_schedule(optimizer, total_steps, config.warmup_ratio)
    state = {"epoch": 0, "step": 0, "summary": {}}
    if resume_from is not None:
        state, training = load_training_checkpoint(resume_from, device)
        restore_optimizer(optimizer, training, events.log)
        scheduler.load_state_dict(training["scheduler"])
        events.log(f"resuming the reward model after epoch {state['epoch']} (step {state['step']})")
    # `model` stays the plain module (evaluation, centring, saving); training runs through `trained`.
    trained, optimizer = dist.prepare(TokenScores(model), optimizer)
    # Answers cut by length where that saves computing padding (core/stages/microbatch.py).
    call_tokens = microbatch.call_tokens_for(device, dist)
    model.train()
    stopped = False
    for epoch in range(state["epoch"] + 1, config.epochs + 1):
        order = list(range(len(train)))
        random.Random(seed + epoch).shuffle(order)
        start, pairs_seen = time.perf_counter(), 0
        for i in batch_starts:
            if events.should_stop():
                stopped = True
                break
            chunk = [train[j] for j in dist.shard(order[i : i + config.batch_size])]
            seqs = [s for r in chunk for s in encode_answers(tokenizer, r.prompt, r.responses, config.max_length)]
            sizes = [len(r.responses) for r in chunk]
            scores = score_sequences(model, seqs, tokenizer.pad_token_id, device, trained, call_tokens)
            loss, accuracy = kwise_loss(scores, sizes)
            optim.step(loss, model, optimizer, scheduler, dist=dist)
            state["step"] += 1
            pairs_seen += sum(k * (k - 1) // 2 for k in sizes)
            events.metrics(offset + state["step"], {"rm_loss": loss.item(), "rm_accuracy": accuracy.item(),
                                                    "rm_margin": pair_margins(scores.detach(), sizes)[0].mean().item(),
                                                    "pairs_per_s": pairs_seen / (time.perf_counter() - start)})
            events.progress(offset + state["step"], total_steps * member[1], "reward model")
        if stopped:
            break
        state["epoch"] = epoch
        state["processes"] = dist.world_size  # who wrote it (a record: every checkpoint resumes on any number)
        training = {**optimizer_state(optimizer, dist.sharded), "scheduler": scheduler.state_dict()}
        # Every rank evaluates and centres the same weights (same numbers); rank 0 alone writes.
        with dist.full_weights(model):
            if heldout:
                state["summary"] = pairwise_accuracy(model, tokenizer, heldout, config.max_length, device)
                events.metrics(offset + state["step"], {"heldout_accuracy": state["summary"]["accuracy"],
                                                        **{f"heldout_{k}": state["summary"][k]
                                                           for k in ("score_std", "length_corr") if k in state["summary"]}})
                events.log(f"epoch {epoch}: held-out pairwise accuracy {state['summary']['accuracy']:.3f}")
            centre_on_demonstrations(model, tokenizer, centring, config.max_length, device)
            model.train()
            if dist.is_main:
                ckpt = save_training_checkpoint(model, tokenizer, checkpoint_path(output_dir, "epoch", epoch), state,
                                                training, device)
                events.checkpoint(f"{prefix}-epoch-{epoch}", "rm", ckpt, offset + state["step"])
        dist.barrier()  # a stop below reloads this checkpoint on every rank

    if stopped and state["epoch"] == 0:
        return None
    if stopped:
        # The last centred epoch stands as the model; the partial epoch's updates are dropped.
        model = load_scalar_model(latest_checkpoint(output_dir, "epoch"), tokenizer.pad_token_id, device)
    summary = state["summary"]
    summary = {"stage": "rm", "heldout_accuracy": summary.get("accuracy"), **summary,
               "reward_bias": float(model.config.reward_bias), "train_rankings": len(train),
               "heldout_rankings": len(heldout), "epochs_done": state["epoch"], "stopped": stopped,
               "seed": seed, "steps": offset + state["step"]}
    with dist.full_weights(model):
        if dist.is_main:
            save_model(model, tokenizer, output_dir, extra_json={SUMMARY_FILE: summary})
    dist.barrier()
    return summary
