"""The results card on Home: what one demo pipeline did, read from its report.json.

Every number is the report's own (core/runs/pipeline.py writes it; the pipeline run's output directory
holds it), never recomputed, so the card and `rlhf pipeline`'s printout agree. `comparison` lives here,
free of torch, so Home can build the same rows the pipeline writes as report["comparison"].
"""

from __future__ import annotations

import json
from pathlib import Path

from core.data.demo import CONCISE_WEIGHT, CORRECT_WEIGHT, TEMPLATE_WEIGHT
from core.data.store import Store

REPORT_FILE = "report.json"
# report key -> label, in the recipe's order: the base model, SFT, then each third stage on that SFT model.
MODELS = (("base", "Base"), ("sft", "SFT"), ("ppo", "PPO-ptx"), ("ppo_no_ptx", "PPO without ptx"), ("dpo", "DPO"),
          ("grpo", "GRPO"), ("rloo", "RLOO"))
COMPARED = tuple(key for key, _ in MODELS if key != "base")  # the methods; the base model is where they start
# The demo labeler's gold = 0.5 correct + 0.2 format + 0.3 concise (report key, title, weight); "template" is
# its format part. Gold is linear in the parts, so the weighted means add up to the mean gold.
GOLD_PARTS = (("correct", "correct", CORRECT_WEIGHT), ("template", "format", TEMPLATE_WEIGHT),
              ("concise", "concise", CONCISE_WEIGHT))
# comparison row key -> the card's column title.
COLUMNS = (("gold", "gold"), *((key, title) for key, title, _ in GOLD_PARTS), ("kl_to_sft", "KL to SFT"),
           ("pretrain_loss", "held-out pretraining loss"),
           ("wall_s", "wall time (s)"), ("time_vs_ppo", "time vs PPO-ptx"))
RM_KINDS = (("accuracy", "pairs_all", "all pairs"), ("accuracy_format", "pairs_format", "format differs"),
            ("accuracy_correctness", "pairs_correctness", "correctness differs"),
            ("accuracy_arithmetic", "pairs_arithmetic", "arithmetic differs"))


def comparison(report: dict, keys: tuple[str, ...] = COMPARED) -> list[dict]:
    """One row per method in the report: gold and its parts, KL to SFT, alignment tax, wall time (and
    relative to PPO-ptx's)."""
    timings = report.get("timings_s", {})
    rows = []
    for key in keys:
        if key not in report:
            continue
        r = report[key]
        row = {"method": key, **{k: r.get(k) for k in ("gold", "correct", "template", "concise", "pretrain_loss")},
               "kl_to_sft": 0.0 if key == "sft" else r.get("kl_to_sft"), "wall_s": timings.get(key)}
        if key != "sft" and timings.get("ppo") and row["wall_s"] is not None:
            row["time_vs_ppo"] = row["wall_s"] / timings["ppo"]
        rows.append(row)
    return rows


def report_path(run: dict) -> Path | None:
    out = run.get("output_dir")
    return Path(out) / REPORT_FILE if out else None


def latest_report(store: Store) -> tuple[dict, dict] | None:
    """(pipeline run, its report) for the newest pipeline run that wrote a report, or None."""
    for run in reversed(store.list_runs()):
        if run["stage"] != "pipeline":
            continue
        path = report_path(run)
        if path is not None and path.is_file():
            try:
                return run, json.loads(path.read_text())
            except (OSError, ValueError):
                continue
    return None


def card(report: dict) -> dict:
    """The card's content: one row per model the report evaluated (the comparison table: gold, its
    parts, KL to SFT, alignment tax, wall time), each gold part's weighted share per model, the RM's
    held-out accuracy by preference kind, the alignment tax (held-out pretraining loss per model), and the
    run doctor's findings on every stage run (core/analysis/doctor.py, as the pipeline wrote them)."""
    labels = dict(MODELS)
    models = [{"model": labels[row["method"]], "key": row["method"],
               **{title: row.get(field) for field, title in COLUMNS}}
              for row in comparison(report, keys=tuple(labels))]
    rm = report.get("rm") or {}
    reward_model = [{"preference": label, "accuracy": rm.get(acc), "pairs": rm.get(pairs)}
                    for acc, pairs, label in RM_KINDS if rm.get(acc) is not None]
    tax = {m["model"]: m["held-out pretraining loss"] for m in models if m["held-out pretraining loss"] is not None}
    # Each part's share of gold (weight x mean): stacked, a model's bar is its gold.
    gold_split = {title: {m["model"]: weight * m[title] for m in models if m[title] is not None}
                  for _, title, weight in GOLD_PARTS}
    return {"models": models, "gold_split": gold_split, "reward_model": reward_model, "alignment_tax": tax,
            "preset": report.get("preset"), "doctor": report.get("doctor", []),
            "complete": all(k in report for k in ("base", "sft", "rm", "ppo"))}
