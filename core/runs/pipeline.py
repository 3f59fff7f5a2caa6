"""The demo pipeline: base -> SFT -> RM -> PPO-ptx (and PPO without ptx, for the alignment tax),
with one evaluation of every model on the same held-out prompts and corpus, into report.json.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from core.data import demo
from core.runs.demo_import import import_demo_data, import_demo_rankings
from core.data.store import Store
from core.stages.evaluate import gold_eval
from core.stages.events import Events
from core.models.loading import load_policy, load_tokenizer, pick_device
from core.models.pretrain import demo_pretrain_loss
from core.paths import atomic_write_text
from core.analysis import doctor
from core.analysis.results import comparison
from core.config import STAGE3_METHODS
from core.stages import RECIPE, get_stage, make_config

ALL_STAGES = ("sft", "rm", "ppo", "dpo", "grpo", "rloo")  # the recipe's order; each stage's inputs are the earlier stages' outputs


def evaluate_checkpoint(model_ref: str | Path, device: str = "auto", n_prompts: int = 200, temperature: float = 1.0,
                        reference: str | Path | None = None) -> dict:
    """Gold (sampled at the rollout temperature), gold greedy, and held-out pretraining loss; with
    `reference` (the SFT model), `kl_to_sft`: the KL to it of the very answers gold was measured on
    (`core.stages.evaluate.measure_answers`, the one KL measurement of every method)."""
    dev = pick_device(device)
    tokenizer = load_tokenizer(model_ref)
    model = load_policy(model_ref, dev, dropout=0.0)
    ref = None if reference is None else load_policy(reference, dev, dropout=0.0)
    tasks = demo.heldout_tasks(n_prompts)
    sampled = gold_eval(model, tokenizer, tasks, temperature=temperature, reference=ref)
    greedy = gold_eval(model, tokenizer, tasks, temperature=0.0)
    result = {
        "gold": sampled["gold"], "gold_greedy": greedy["gold"], "correct": sampled["correct"],
        "template": sampled["template"], "concise": sampled["concise"], "length": sampled["length"], "eos_rate": sampled["eos_rate"],
        "pretrain_loss": demo_pretrain_loss(model, tokenizer, dev),
    }
    if ref is not None:
        result["kl_to_sft"] = sampled["kl"]
    return result


def correlation(xs: list[float], ys: list[float]) -> float | None:
    """Pearson correlation, or None when there are too few points or a curve is flat."""
    if len(xs) < 3:
        return None
    try:
        return statistics.correlation(xs, ys)
    except statistics.StatisticsError:
        return None


def reward_gold_correlation(store: Store, run_id: str) -> float | None:
    """Pearson correlation of per-step RM reward and gold: do they rise together?"""
    rows = store.metrics([run_id], names=["reward", "gold"])
    by_step: dict[int, dict] = {}
    for r in rows:
        by_step.setdefault(r["step"], {})[r["name"]] = r["value"]
    pairs = [(v["reward"], v["gold"]) for v in by_step.values() if "reward" in v and "gold" in v]
    return correlation([p[0] for p in pairs], [p[1] for p in pairs])


@dataclass
class StageRun:
    output: Path  # the stage's output directory
    stopped: bool  # stopped before it ended: run again, it resumes in place from its checkpoints
    events: Events  # the stage run's own channel (its log)


def run_stage(parent: Events, store: Store, run_id: str, stage: str, config, output_dir: Path,
              before: Callable[[Events], None] | None = None) -> StageRun:
    """One stage as a run of its own under a run of runs (the pipeline, the rounds, the study), sharing
    its stop flag: `before` (given the stage run's events), then the stage. A failure marks the run
    failed and goes on up; otherwise it ends done, or stopped when the run of runs was asked to stop."""
    store.start_run(run_id, stage, config.to_dict(), str(output_dir))
    events = parent.child(store, run_id)
    try:
        if before is not None:
            before(events)
        output = get_stage(stage).runner(config, store, events, output_dir)
    except BaseException as exc:
        store.set_run_status(run_id, "failed", str(exc))
        raise
    stopped = parent.should_stop()
    store.set_run_status(run_id, "stopped" if stopped else "done")
    return StageRun(Path(output), stopped, events)


def run_pipeline(
    preset: str, output_dir: str | Path, store: Store, events: Events, stages: tuple[str, ...] = RECIPE,
    overrides: dict[str, dict] | None = None, no_ptx_baseline: bool = True, name: str | None = None,
    eval_prompts: int = 200, through_store: bool = True,
) -> dict:
    """Run the chosen stages on the demo task; returns (and writes) DIR/report.json.

    `through_store`: the demo's prompts, demonstrations and (after SFT) the simulated labeler's rankings
    are imported into the store first (core/runs/demo_import.py), and the stages train from the store
    (data='store'), the path a user's own data takes. Without it they read the built-in task directly.
    The pipeline is itself a run in the store (stage 'pipeline', its output directory holds report.json);
    the job manager creates it for the app, the pipeline creates it for the CLI."""
    unknown = set(stages) - set(ALL_STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}: choose from {', '.join(ALL_STAGES)}")
    overrides = overrides or {}
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    name = name or events.run_id or f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}"
    store_data = ({"sft": {"data": "store"}, "rm": {"data": "store", "heldout": "demo"}, "ppo": {"prompts": "store"}}
                  if through_store else {})
    sft_config = make_config("sft", preset, {**store_data.get("sft", {}), **overrides.get("sft", {})})
    configs = {
        "sft": sft_config,
        "rm": make_config("rm", preset, {"sft_model": str(output_dir / "sft"), **store_data.get("rm", {}),
                                         **overrides.get("rm", {})}),
        "ppo": make_config("ppo", preset, {"sft_model": str(output_dir / "sft"), "reward_model": str(output_dir / "rm"),
                                           **store_data.get("ppo", {}), **overrides.get("ppo", {})}),
    }
    # The alternative third stages on the same SFT model, the same data (DPO: the RM's rankings) and the same RM.
    configs.update({
        "dpo": make_config("dpo", preset, {"sft_model": str(output_dir / "sft"), "data": "store" if through_store else
                                           str(output_dir / "rm-rankings.jsonl"), **overrides.get("dpo", {})}),
        **{alt: make_config(alt, preset, {"sft_model": str(output_dir / "sft"), "reward_model": str(output_dir / "rm"),
                                          "prompts": "store" if through_store else "demo", **overrides.get(alt, {})})
           for alt in ("grpo", "rloo")},
    })
    if events.run_id is None:  # the CLI: the pipeline becomes a run of its own, as in the app
        store.start_run(name, "pipeline", {"preset": preset, "stages": list(stages)}, str(output_dir))
        events = events.child(store, name)
        try:
            report = _run_stages(preset, output_dir, store, events, stages, configs, no_ptx_baseline, name,
                                 eval_prompts, through_store)
        except BaseException as exc:
            store.set_run_status(name, "failed", str(exc))
            raise
        store.set_run_status(name, "stopped" if events.should_stop() else "done")
        return report
    return _run_stages(preset, output_dir, store, events, stages, configs, no_ptx_baseline, name, eval_prompts,
                       through_store)


def _run_stages(preset: str, output_dir: Path, store: Store, events: Events, stages: tuple[str, ...], configs: dict,
                no_ptx_baseline: bool, name: str, eval_prompts: int, through_store: bool) -> dict:
    sft_config = configs["sft"]
    report: dict = {"preset": preset, "timings_s": {}}
    if through_store:
        report["imported"] = import_demo_data(store, sft_config.n_demonstrations, sft_config.ramble_rate,
                                              sft_config.seed)
        events.log(f"demo data in the store: added {report['imported']['prompts']} prompts and "
                   f"{report['imported']['demonstrations']} demonstrations (source 'demo')")
    t0 = time.perf_counter()
    report["base"] = evaluate_checkpoint(sft_config.model, sft_config.device, eval_prompts)
    report["timings_s"]["base_eval"] = time.perf_counter() - t0

    def import_rankings(config, run_events: Events) -> None:
        """Rankings are sampled from the SFT policy, so they enter the store after SFT, as the RM run starts."""
        report["imported"]["rankings"] = import_demo_rankings(store, config, run_events)

    plan = [(s, s, configs[s]) for s in stages]
    if "ppo" in stages and no_ptx_baseline:
        plan.append(("ppo_no_ptx", "ppo", configs["ppo"].replace(ptx_coef=0.0)))
    for key, stage, config in plan:
        if events.should_stop():
            break
        t0 = time.perf_counter()
        run_id = f"{name}-{key.replace('_', '-')}"
        before = partial(import_rankings, config) if stage == "rm" and through_store and config.data == "store" else None
        run = run_stage(events, store, run_id, stage, config, output_dir / key, before)
        out, run_events = run.output, run.events
        report["timings_s"][key] = time.perf_counter() - t0
        # Every method's KL to the SFT model, measured the same way (core/stages/evaluate.measure_answers).
        kl_to_sft = stage in STAGE3_METHODS and (output_dir / "sft").is_dir()
        if stage == "rm":
            report["rm"] = json.loads((out / "rm_summary.json").read_text())
        else:
            report[key] = evaluate_checkpoint(out, config.device, eval_prompts,
                                              reference=output_dir / "sft" if kl_to_sft else None)
        if stage == "ppo":
            summary = out / "ppo_summary.json"
            if summary.is_file():
                ppo = json.loads(summary.read_text())
                report[key].update({k: ppo[k] for k in ("kl", "reward", "ptx_loss") if k in ppo})
            report[key]["reward_gold_correlation"] = reward_gold_correlation(store, run_id)
        if stage in ("grpo", "rloo", "dpo"):
            summary = out / f"{stage}_summary.json"
            if summary.is_file():
                alt = json.loads(summary.read_text())
                report[key].update({k: alt[k] for k in ("kl", "reward", "train_pair_accuracy") if k in alt})
            if stage != "dpo":
                report[key]["reward_gold_correlation"] = reward_gold_correlation(store, run_id)
        if kl_to_sft:
            report[key]["wall_s"] = report["timings_s"][key]
        if "sft" in report and stage in STAGE3_METHODS:
            report[key]["pretrain_drift"] = report[key]["pretrain_loss"] - report["sft"]["pretrain_loss"]
        # The run doctor on the stage run just finished: its findings join the report, its verdict the run's log.
        findings = doctor.diagnose(doctor.load_run(store, run_id))
        report.setdefault("doctor", []).extend(f.to_dict() for f in findings)
        run_events.log(doctor.summary_line(findings, run_id))
        atomic_write_text(output_dir / "report.json", json.dumps(report, indent=2))
    report["doctor"] = report.get("doctor", []) + [{**f.to_dict(), "run": name} for f in doctor.diagnose_report(report)]
    report["comparison"] = comparison(report)
    report["timings_s"]["total"] = sum(report["timings_s"].values())
    atomic_write_text(output_dir / "report.json", json.dumps(report, indent=2))
    return report
