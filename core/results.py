"""The results card on Home: what one demo pipeline did, read from its report.json.

Every number is the report's own (core/pipeline.py writes it; the pipeline run's output directory
holds it), never recomputed, so the card and `rlhf pipeline`'s printout agree.
"""

from __future__ import annotations

import json
from pathlib import Path

from core.data.store import Store

REPORT_FILE = "report.json"
MODELS = (("base", "Base"), ("sft", "SFT"), ("ppo", "PPO-ptx"), ("ppo_no_ptx", "PPO without ptx"))
# report key -> column title; "template" is the demo labeler's format part ("The answer is X.").
COLUMNS = (("gold", "gold"), ("gold_greedy", "gold (greedy)"), ("correct", "correct"), ("template", "format"),
           ("concise", "concise"), ("kl", "KL to SFT"), ("pretrain_loss", "held-out pretraining loss"))
RM_KINDS = (("accuracy", "pairs_all", "all pairs"), ("accuracy_format", "pairs_format", "format differs"),
            ("accuracy_correctness", "pairs_correctness", "correctness differs"))


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
    """The card's content: one row per model the report evaluated, the RM's held-out accuracy by
    preference kind, and the alignment tax (held-out pretraining loss per model)."""
    models = []
    for key, label in MODELS:
        if key not in report:
            continue
        row = {"model": label, "key": key}
        row.update({title: report[key].get(field) for field, title in COLUMNS})
        models.append(row)
    rm = report.get("rm") or {}
    reward_model = [{"preference": label, "accuracy": rm.get(acc), "pairs": rm.get(pairs)}
                    for acc, pairs, label in RM_KINDS if rm.get(acc) is not None]
    tax = {label: report[key]["pretrain_loss"] for key, label in MODELS
           if key in report and report[key].get("pretrain_loss") is not None}
    return {"models": models, "reward_model": reward_model, "alignment_tax": tax, "preset": report.get("preset"),
            "complete": all(k in report for k in ("base", "sft", "rm", "ppo"))}
