"""What the Monitor page draws, computed without Streamlit: which runs a selection stands for (a
pipeline run stands for its stage runs, found again on every refresh so stages that start later
join by themselves), curves versus single values, EMA smoothing, and a pipeline's timeline.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from core.data.store import ACTIVE_STATUSES
from core.stages import STAGES

PIPELINE = "pipeline"
RUNS_OF_RUNS = (PIPELINE, "rounds")  # runs whose stages are runs of their own, named '<run>-<key>'
WITHOUT_CURVES = ("eval",)  # runs that log no training curves
# The recipe's order for grouping charts; stages registered later (DPO, GRPO...) follow in registry order.
STAGE_TITLES = {"sft": "SFT", "rm": "Reward model", "ppo": "PPO"}


@dataclass(frozen=True)
class ShownRun:
    id: str
    stage: str
    status: str
    pipeline: str | None = None  # the pipeline run it belongs to
    label: str = ""  # its short name inside the pipeline: sft, rm, ppo, ppo-no-ptx

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATUSES


def stage_order(stage: str) -> int:
    order = list(STAGES)
    return order.index(stage) if stage in order else len(order)


def stage_title(stage: str) -> str:
    return STAGE_TITLES.get(stage) or (STAGES[stage].title.split("·")[-1].strip() if stage in STAGES else stage)


def pipeline_stage_runs(runs: Iterable[dict], pipeline_id: str) -> list[ShownRun]:
    """The stage runs of a pipeline run, named '<pipeline run>-<key>' (core/runs/pipeline.py; a rounds run's
    keys are 'round-<r>-<stage>', core/runs/rounds.py), in the order they started; `runs` are dicts with id,
    stage and status, oldest first."""
    prefix = pipeline_id + "-"
    out = []
    for r in runs:
        rid, stage = r["id"], r["stage"]
        if stage in RUNS_OF_RUNS or not rid.startswith(prefix):
            continue
        key = rid[len(prefix):]
        if key.split("-")[0] in STAGES or (key.startswith("round-") and stage in STAGES):
            out.append(ShownRun(rid, stage, r["status"], pipeline_id, key))
    return out


def parent_pipeline(runs: list[dict], run_id: str) -> str | None:
    pipelines = [r["id"] for r in runs if r["stage"] in RUNS_OF_RUNS]
    for pid in pipelines:
        if any(s.id == run_id for s in pipeline_stage_runs(runs, pid)):
            return pid
    return None


def expand(runs: list[dict], selected: list[str]) -> list[ShownRun]:
    """The runs whose curves to draw for a selection: a pipeline run becomes its stage runs (those that
    exist now), other runs stand for themselves; each run once, in the selection's order."""
    by_id = {r["id"]: r for r in runs}
    out: dict[str, ShownRun] = {}
    for rid in selected:
        run = by_id.get(rid)
        if run is None:
            continue
        if run["stage"] in RUNS_OF_RUNS:
            for s in pipeline_stage_runs(runs, rid):
                out.setdefault(s.id, s)
        else:
            out.setdefault(rid, ShownRun(rid, run["stage"], run["status"]))
    return list(out.values())


def any_active(runs: list[dict], selected: list[str]) -> bool:
    """Should the page refresh: is a selected run, or a stage run of a selected pipeline, still active?"""
    by_id = {r["id"]: r for r in runs}
    if any(by_id[r]["status"] in ACTIVE_STATUSES for r in selected if r in by_id):
        return True
    return any(s.active for s in expand(runs, selected))


def runs_changed(before: list[dict], now: list[dict]) -> bool:
    """Has a run been created since `before` (dicts with an id)? Then the page's run picker, drawn from
    `before`, lacks it."""
    return [r["id"] for r in before] != [r["id"] for r in now]


def default_selection(runs: list[dict]) -> list[str]:
    """The active runs that are not a stage of a selected pipeline (a running pipeline is shown whole),
    else the newest such run; an evaluation (no curves: its table is on the Evaluate page) only when there is
    nothing else."""
    in_pipeline = {s.id for r in runs if r["stage"] in RUNS_OF_RUNS for s in pipeline_stage_runs(runs, r["id"])}
    top = [r for r in runs if r["id"] not in in_pipeline and r["stage"] not in WITHOUT_CURVES] or \
        [r for r in runs if r["id"] not in in_pipeline]
    active = [r["id"] for r in reversed(top) if r["status"] in ACTIVE_STATUSES]
    if active:
        return active
    return [top[-1]["id"]] if top else ([runs[-1]["id"]] if runs else [])


def ema(values: list[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased so the first points are not
    pulled toward 0. weight 0 returns the values unchanged."""
    if weight <= 0:
        return list(values)
    out, last, n = [], 0.0, 0
    for v in values:
        if not math.isfinite(v):
            out.append(v)
            continue
        n += 1
        last = last * weight + (1 - weight) * v
        out.append(last / (1 - weight ** n))
    return out


def split_single_points(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Rows (run_id, step, name, value) -> (curves: names with 2+ points in some run, single values:
    names with one point in every run, such as the final held-out gold)."""
    points: dict[str, dict[str, int]] = {}
    for r in rows:
        points.setdefault(r["name"], {}).setdefault(r["run_id"], 0)
        points[r["name"]][r["run_id"]] += 1
    single = {name for name, per_run in points.items() if max(per_run.values()) == 1}
    return [r for r in rows if r["name"] not in single], [r for r in rows if r["name"] in single]


def timeline_offsets(stage_runs: list[ShownRun], last_steps: dict[str, int]) -> dict[str, int]:
    """One axis for a pipeline: each stage run's steps start where the previous stage run's ended, so
    SFT -> RM -> PPO read left to right with a boundary between them."""
    offsets, at = {}, 0
    for s in stage_runs:
        offsets[s.id] = at
        at += max(0, last_steps.get(s.id, 0))
    return offsets


# The headline curve of each stage on a pipeline's timeline.
TIMELINE_METRICS = {"sft": ["sft_loss"], "rm": ["rm_loss", "rm_accuracy"], "ppo": ["reward", "gold", "kl"]}
