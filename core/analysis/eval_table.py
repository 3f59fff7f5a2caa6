"""The Evaluate page's and `rlhf eval`'s table: checkpoints of any stage side by side on one prompt set.

Every checkpoint answers every prompt once, sampled at `temperature` with one seed (the same seed for
every checkpoint, so two copies of one model give the very same answers), and each row holds:

- `rm_score`: the chosen reward model's mean raw score of the answers (`answer_rm_scores`, as PPO reads it; an
  ensemble's: the mean of its members');
- `gold`: the demo labeler's mean score, only when every prompt is one of the demo's (else empty);
- `kl`: KL(pi || reference) per answer, on the same answers (`core.stages.evaluate.measure_answers`, the one KL
  measurement of every method);
- `length`: mean answer tokens, EOS included;
- `reward/<term>`: with `reward` (reward terms, core/stages/reward_terms.py), each term's mean on the same
  answers: a verifier's pass rate beside RM score, gold and KL;
- `win_rate`: the share of prompts on which the RM scores this checkpoint's answer above the baseline's,
  ties counting half (the baseline against itself: exactly 0.5).

One code path for the CLI and the app: `run` is the job the Evaluate page submits and what `rlhf eval`
calls; it writes `eval.json` and `eval.csv` into its output directory. `eval.json` also keeps every prompt
(`prompts`: its turns and its row's other columns) and each checkpoint's answer to it with that answer's own
numbers (`answers`), for the Evaluate page's per-prompt view.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from core.config import DEVICES, ConfigMixin, option, parse_reward
from core.data.store import Store
from core.paths import atomic_write_text

if TYPE_CHECKING:  # the CLI reads EvalConfig's fields for --help without importing torch
    from core.stages.events import Events
    from core.stages.reward_terms import Reward

RESULTS_JSON, RESULTS_CSV = "eval.json", "eval.csv"
COLUMNS = ("checkpoint", "path", "prompts", "rm_score", "gold", "kl", "length", "win_rate")


@dataclass
class EvalConfig(ConfigMixin):
    """What `rlhf eval` and the Evaluate page compare, on which prompts, under which judges."""

    checkpoints: str = option("", "comma-separated policies to compare: checkpoint names in the store, model "
                                  "directories, or 'bundled'")
    baseline: str = option("", "the checkpoint every win rate is measured against, one of `checkpoints` "
                               "(default: the first)")
    reward_model: str = option("", "the reward model that scores every answer and judges the win rates")
    reward: str = option("", "reward terms whose means become columns (a verifier's pass rate), as stage 3's "
                             "reward field: e.g. exact,eos or python:my_rewards.py:strict")
    reference: str = option("", "KL is measured to this policy, e.g. the SFT model (default: the baseline)")
    prompts: str = option("demo", "'demo' (the demo's held-out prompts: gold applies), 'store' (the workbench's "
                                  "prompts) or a JSONL/CSV file with a \"prompt\" column")
    n_prompts: int = option(100, "evaluate on the first n prompts of the set")
    temperature: float = option(1.0, "sampling temperature (the rollout temperature: KL is measured on samples)")
    max_new_tokens: int = option(24, "max new tokens per answer")
    seed: int = option(1234, "sampling seed, the same for every checkpoint")
    device: str = option("auto", "'auto' (CUDA when present), 'cpu' or 'cuda'")

    _bounds = {"n_prompts": (1, None, True), "temperature": (0, None, False), "max_new_tokens": (1, 1024, True)}
    _choices = {"device": DEVICES}

    def validate(self) -> None:
        super().validate()
        names = self.checkpoint_names()
        if not names:
            raise ValueError("checkpoints is empty: pick at least one checkpoint to evaluate")
        if len(set(names)) != len(names):
            raise ValueError(f"checkpoints lists one checkpoint twice: {', '.join(names)}")
        if self.baseline and self.baseline not in names:
            raise ValueError(f"baseline {self.baseline!r} is not one of the checkpoints ({', '.join(names)})")
        if not self.reward_model:
            raise ValueError("reward_model is empty: name the reward model that scores the answers")
        if self.reward:
            parse_reward(self.reward)

    def checkpoint_names(self) -> list[str]:
        return [c.strip() for c in self.checkpoints.split(",") if c.strip()]

    @property
    def baseline_name(self) -> str:
        return self.baseline or self.checkpoint_names()[0]


@dataclass
class Plan:
    """The checked inputs of one evaluation: checkpoint name -> model directory, and the prompts."""

    paths: dict[str, str]
    reward_model: str
    reference: str
    prompts: list[str]
    gold: bool  # every prompt is one of the demo's, so its labeler can score the answers
    columns: list[dict]  # each prompt's row's other columns (`answer`, ...), for the reward terms
    reward: Reward | None = None  # the `reward` terms, resolved once (a user's file runs once per evaluation)


def locate(name: str, store: Store | None, what: str) -> str:
    """A checkpoint name in the store -> its directory; otherwise a directory or 'bundled', checked."""
    from core.models.loading import resolve_model

    known = {c["name"]: c for c in store.list_checkpoints()} if store is not None else {}
    if name in known:
        if what != "reward model" and known[name]["kind"] == "rm":
            raise ValueError(f"{what} {name!r} is a reward model: it scores answers but cannot write them")
        name = known[name]["path"]
    try:
        path = resolve_model(name)
    except ValueError as exc:
        raise ValueError(f"{what} {name!r}: {exc}") from None
    config = Path(path) / "config.json"
    if what != "reward model" and config.is_file():
        # A reward model's directory loads as a causal LM with a random LM head: gibberish, not an error.
        architectures = json.loads(config.read_text()).get("architectures") or []
        if any(a.endswith("ForSequenceClassification") for a in architectures):
            raise ValueError(f"{what} {name!r} is a reward model: it scores answers but cannot write them")
    return path


def load_eval_prompts(config: EvalConfig, store: Store | None) -> tuple[list[str], list[dict]]:
    """(prompts, each prompt's row's other columns)."""
    from core.data import demo
    from core.data.sources import load_prompt_rows

    if config.prompts == "demo":  # held out: no stage trains on these
        tasks = demo.heldout_tasks(config.n_prompts)
        prompts, columns = [t.prompt for t in tasks], [{"answer": t.answer} for t in tasks]
    else:
        try:
            prompts, columns = load_prompt_rows(config.prompts, store)
        except FileNotFoundError:
            raise ValueError(f"prompts file {config.prompts} does not exist") from None
        prompts, columns = prompts[: config.n_prompts], columns[: config.n_prompts]
    if not prompts:
        raise ValueError(f"no prompts in {config.prompts!r}: the evaluation needs at least one")
    return prompts, columns


def check_inputs(config: EvalConfig, store: Store | None) -> Plan:
    """Every check a user can fail, before any model loads: missing checkpoints, a reward model among
    the policies, tokenizers that differ from the RM's, an empty or malformed prompt set."""
    from core.models.loading import check_same_tokenizer, load_tokenizer, pick_device
    from core.stages.evaluate import all_demo

    config.validate()
    pick_device(config.device)
    paths = {name: locate(name, store, "checkpoint") for name in config.checkpoint_names()}
    reward_model = locate(config.reward_model, store, "reward model")
    reference = locate(config.reference, store, "reference") if config.reference else paths[config.baseline_name]
    rm_tokenizer = load_tokenizer(reward_model)
    for name, path in {**paths, f"reference {config.reference}": reference}.items():
        check_same_tokenizer(load_tokenizer(path), rm_tokenizer,
                             f"reward model {config.reward_model} does not match checkpoint {name}")
    prompts, columns = load_eval_prompts(config, store)
    reward = None
    if config.reward:
        from core.stages.reward_terms import resolve_reward

        reward = resolve_reward(config.reward)
        reward.check_rows(prompts, columns)
    return Plan(paths, reward_model, reference, prompts, all_demo(prompts), columns, reward)


def win_rate(scores, baseline_scores) -> float:
    """Share of prompts where `scores` beats `baseline_scores` (the RM's judgement), ties counting half."""
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline_scores, strict=True))
    return wins / len(scores)


def table_csv(rows: list[dict]) -> str:
    """The table as CSV, floats written in full (`repr`), an empty cell where a value does not apply; the
    reward terms' columns (`reward/<term>`) after the fixed ones."""
    out = io.StringIO()
    columns = [*COLUMNS, *dict.fromkeys(k for row in rows for k in row if k.startswith("reward/"))]
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else repr(row[k]) if isinstance(row[k], float) else row[k]
                         for k in columns})
    return out.getvalue()


def run(config: EvalConfig | dict, store: Store | None, events: Events, output_dir: str | Path,
        plan: Plan | None = None) -> Path:
    """Evaluate every checkpoint; writes OUTPUT/eval.json (the rows and the inputs) and OUTPUT/eval.csv.
    Stopped between checkpoints, the rows done so far are kept (win rates once the baseline is done).
    `plan`: `check_inputs`'s, when the caller checked already (the CLI, before recording the run)."""
    import torch

    from core.stages.evaluate import score_answers
    from core.models.chat import as_messages
    from core.models.ensemble import load_reward_model
    from core.models.loading import load_policy, load_tokenizer, pick_device

    if not isinstance(config, EvalConfig):  # the job manager hands over the stored dict
        config = EvalConfig.from_dict(config)
    plan = plan or check_inputs(config, store)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(config.device)
    tokenizer = load_tokenizer(plan.reward_model)  # every checkpoint's tokenizer matches it (check_inputs)
    reward_model = load_reward_model(plan.reward_model, tokenizer.pad_token_id, device)  # an ensemble: its mean
    reference = load_policy(plan.reference, device, dropout=0.0)
    reward = None
    if plan.reward is not None:
        from core.stages.reward_terms import RewardModelTerm

        reward = plan.reward.with_reward_model(RewardModelTerm(reward_model, tokenizer.pad_token_id, device))
    rows, scores, per_prompt = [], {}, {}
    for i, (name, path) in enumerate(plan.paths.items()):
        if events.should_stop():
            events.log(f"stopped after {i} of {len(plan.paths)} checkpoints")
            break
        events.progress(i, len(plan.paths), f"evaluating {name}")
        policy = load_policy(path, device, dropout=0.0)
        answers = score_answers(policy, tokenizer, plan.prompts, reward_model, config.temperature,
                                config.max_new_tokens, config.seed, reference=reference, reward=reward,
                                columns=plan.columns)
        scores[name] = answers["rm"]
        per_prompt[name] = prompt_answers(answers, plan.gold)
        n = len(plan.prompts)
        rows.append({
            "checkpoint": name, "path": path, "prompts": n, "rm_score": sum(answers["rm"]) / n,
            "gold": sum(answers["gold"]) / n if plan.gold else None,
            "kl": sum(answers["kl"]) / n,
            "length": sum(answers["length"]) / n,
            **{f"reward/{term}": sum(values) / n for term, values in (answers["terms"] or {}).items()},
        })
        events.log(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in rows[-1].items()
                                           if isinstance(v, float)))
        del policy
        if device.type == "cuda":
            torch.cuda.empty_cache()
    baseline = scores.get(config.baseline_name)
    for row in rows:
        row["win_rate"] = win_rate(scores[row["checkpoint"]], baseline) if baseline is not None else None
    events.progress(len(rows), len(plan.paths), "done")
    atomic_write_text(output_dir / RESULTS_JSON, json.dumps(
        {"config": config.to_dict(), "baseline": config.baseline_name, "reference": plan.reference,
         "gold_applies": plan.gold, "rows": rows,
         "prompts": [{"turns": as_messages(p), "columns": c} for p, c in zip(plan.prompts, plan.columns)],
         "answers": per_prompt}, indent=2, default=str))
    atomic_write_text(output_dir / RESULTS_CSV, table_csv(rows))
    events.close()
    return output_dir


def prompt_answers(answers: dict, gold_applies: bool) -> list[dict]:
    """`score_answers`' columns as one record per prompt: the answer's text, RM score, gold (demo prompts),
    KL, length and each reward term's value (`reward/<term>`)."""
    terms = answers["terms"] or {}
    return [{"text": text, "rm_score": answers["rm"][j], "gold": answers["gold"][j] if gold_applies else None,
             "kl": answers["kl"][j], "length": answers["length"][j],
             **{f"reward/{term}": values[j] for term, values in terms.items()}}
            for j, text in enumerate(answers["texts"])]


def load_results(output_dir: str | Path) -> dict | None:
    """eval.json of a finished (or stopped) evaluation, or None before it is written."""
    path = Path(output_dir) / RESULTS_JSON
    return json.loads(path.read_text()) if path.is_file() else None
