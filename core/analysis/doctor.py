"""The run doctor: reads a run's curves, rollouts and config and says what looks wrong, why, and what to try.

Every check is a pure function of a `RunData` (the run's metric series, its stage summary, a sample of its
last rollouts, its config) returning `Finding`s: a severity (info | warning | error), the check's name, what
was seen (numbers and steps), the likely cause, and what to try, naming a config field that exists with a
value (`field`, `value`; the Monitor page relaunches the run with it as a new run). Every number a check
compares against lives in `THRESHOLDS`, with where it comes from. Pages and the CLI only display findings;
`load_run` is the one place that reads them from the store.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from core.analysis.monitor import pipeline_stage_runs
from core.data import rollouts as rollout_store
from core.data.store import Store
from core.stages import STAGES

SEVERITIES = ("info", "warning", "error")
THIRD_STAGES = ("ppo", "grpo", "rloo")  # the sampling stage-3 methods: a KL, a reward, answers with lengths


@dataclass(frozen=True)
class Threshold:
    value: float
    source: str  # where the number comes from


# The one table. "Quick demo" figures are the quick preset's runs on 2 CPU cores (docs/NOTES.md, "The run
# doctor", lists each run these were read from).
THRESHOLDS: dict[str, Threshold] = {
    "min_points": Threshold(4, "fewer points than this make no trend: a check stays silent"),
    "sft_min_drop": Threshold(0.1, "share the SFT loss must fall from its first to its last quarter of steps; the "
                                   "quick demo's fell by 0.48 (0.361 -> 0.187)"),
    "sft_diverged": Threshold(1.5, "last quarter's SFT loss over the first's: above it the loss rose (diverging)"),
    "overfit_rise": Threshold(0.1, "share the held-out (validation) loss rose above its best epoch's: below it is "
                                   "the noise of a small validation split"),
    "eos_min": Threshold(0.8, "share of sampled answers that must end with EOS; the quick demo's SFT answers "
                              "end at 0.89-0.91"),
    "alignment_tax_ratio": Threshold(3.0, "SFT's held-out pretraining loss over the base's; the design notes "
                                          "measured a response-only SFT at 7.2 / 1.19 = 6x, the quick demo's SFT "
                                          "is at 2.05 / 0.79 = 2.6x (its PPO's ptx term brings it to 1.28)"),
    "rm_chance": Threshold(0.6, "held-out pairwise accuracy below it is chance: the design notes measured a "
                                "tiny RM on pairs it cannot perceive at 0.46-0.59; the quick demo's RM reaches "
                                "0.96-1.0, one on its rankings shuffled 0.48"),
    "rm_kind_pairs": Threshold(20, "held-out pairs of a preference kind needed to judge that kind's accuracy"),
    "margin_collapse": Threshold(0.5, "last quarter's chosen-rejected margin over its best window's: below it "
                                      "the margin collapsed"),
    "margin_floor": Threshold(0.5, "a best margin under this never separated anything, so it cannot collapse: "
                                   "an RM on shuffled demo rankings wanders within -0.25..0.44 per step, the quick "
                                   "demo's RM grows to 5-6"),
    "length_corr": Threshold(0.5, "Pearson correlation of the RM's score with answer length on held-out answers; "
                                  "the quick demo's RM scores long (rambling) answers lower (-0.88), an RM on "
                                  "the same rankings reordered longest first reads +0.94"),
    "scale_drift": Threshold(3.0, "ratio of the largest to the smallest held-out score spread across epochs"),
    "kl_negative": Threshold(-0.5, "mean per-answer KL over the second half of the run below it is not noise: "
                                   "k1 summed over an answer is >= 0 in expectation (the design notes' dropout "
                                   "bug read -0.13 at the first step)"),
    "kl_high": Threshold(20.0, "nats per answer: the median over the last quarter of steps above it is drift; "
                               "the quick demo's PPO ends at 0.9 (12 steps), the issue's GRPO run's held-out KL "
                               "is 1.26"),
    "spike_ratio": Threshold(8.0, "a step whose KL exceeds the run's median by this factor (and kl_high) is a spike; "
                                  "the quick demo's GRPO logs 0.6-5 on most steps and 39-119 on single steps"),
    "target_band": Threshold(2.0, "adaptive_kl: the last quarter's KL more than this factor from target_kl"),
    "gold_drop": Threshold(0.05, "gold below its best window's mean by more than this while the RM reward rose "
                                 "is over-optimisation; a 64-answer batch's gold has a standard error of ~0.04"),
    "length_growth": Threshold(0.3, "share the mean answer length grew from the first to the last quarter"),
    "length_reward_corr": Threshold(0.7, "correlation across steps of mean reward and mean length above which the "
                                         "reward's rise is carried by length"),
    "entropy_collapse": Threshold(0.25, "last quarter's entropy over the first's below it is a collapse; "
                                        "the quick demo's PPO kept 0.48 of it over 12 steps (0.188 -> 0.091)"),
    "clip_high": Threshold(0.3, "mean clip fraction above it: updates far outside the trust region (CleanRL's "
                                "PPO runs at 0.1-0.2); the quick demo's PPO clipped under 0.015"),
    "approx_kl_high": Threshold(0.1, "mean KL(pi_old || pi_new) per token of one update above it: the step is too "
                                     "large (stable-baselines3 stops an update at 1.5 x target_kl = 0.015-0.05); "
                                     "the quick demo's PPO peaked at 0.039"),
    "value_rise": Threshold(3.0, "last quarter's value loss over the first's above it: the value model is not "
                                 "keeping up with the returns; the quick demo's fell 3.82 -> 0.79"),
    "explained_variance_floor": Threshold(0.0, "1 - Var(returns - V) / Var(returns): at or below 0 the value model "
                                               "predicts the returns no better than their mean (CleanRL logs it; a "
                                               "value model that learns climbs towards 1)"),
    "ptx_drift": Threshold(0.5, "nats the pretraining (ptx) loss may rise from its first to its last quarter; the "
                                "quick demo's fell 1.76 -> 1.28"),
    "pretrain_drift": Threshold(1.0, "nats a stage-3 model's held-out pretraining loss may sit above SFT's"),
}


def threshold(name: str) -> float:
    return THRESHOLDS[name].value


@dataclass(frozen=True)
class Finding:
    severity: str  # info | warning | error
    check: str  # e.g. "ppo.overoptimisation"
    seen: str  # what the curves show, with numbers and steps
    cause: str  # the likely cause
    try_: str  # what to try, as a sentence naming the field and value
    field: str | None = None  # the config field `try_` names (None: a field of no config, said in `try_`)
    value: float | int | str | bool | None = None
    stage: str = ""  # whose config `field` belongs to
    run: str = ""

    def to_dict(self) -> dict:
        out = asdict(self)
        out["try"] = out.pop("try_")
        return out


@dataclass
class RunData:
    """What the checks read, gathered once (`load_run`); tests build it from synthetic series."""

    run_id: str
    stage: str
    config: dict
    metrics: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # name -> [(step, value)], by step
    summary: dict = field(default_factory=dict)  # the stage's <stage>_summary.json ({} while it runs)
    samples: list[dict] = field(default_factory=list)  # the last recorded rollout step's answers (stage 3)

    def series(self, name: str) -> list[tuple[int, float]]:
        return [(s, v) for s, v in self.metrics.get(name, []) if math.isfinite(v)]

    def last(self, name: str) -> float | None:
        points = self.series(name)
        return points[-1][1] if points else None


def with_suggestion(config: dict, finding: Finding) -> dict:
    """The run's config with the finding's suggested value: what the Monitor's relaunch button submits."""
    if finding.field is None or finding.field not in config:
        raise ValueError(f"the finding {finding.check} names no field of this run's config to change")
    return {**config, finding.field: finding.value}


# -- small helpers over series ---------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    mean: float
    first_step: int
    last_step: int

    def __str__(self) -> str:
        steps = f"step {self.first_step}" if self.first_step == self.last_step else \
            f"steps {self.first_step}-{self.last_step}"
        return f"{self.mean:.3g} ({steps})"


def _span(points: list[tuple[int, float]]) -> Span:
    return Span(statistics.fmean(v for _, v in points), points[0][0], points[-1][0])


def quarters(points: list[tuple[int, float]]) -> tuple[Span, Span]:
    """The means of the first and the last quarter of a series (at least one point each)."""
    k = max(1, len(points) // 4)
    return _span(points[:k]), _span(points[-k:])


def windows(points: list[tuple[int, float]], count: int = 6) -> list[Span]:
    """The series cut into `count` consecutive windows (fewer for short series), each a mean."""
    size = max(1, len(points) // count)
    return [_span(points[i : i + size]) for i in range(0, len(points) - size + 1, size)]


def enough(points: list) -> bool:
    return len(points) >= threshold("min_points")


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _scaled(value: float, factor: float) -> float:
    return float(f"{value * factor:.3g}")


# -- SFT -------------------------------------------------------------------------------------------


def sft_loss_not_falling(run: RunData) -> list[Finding]:
    points = run.series("sft_loss")
    if not enough(points):
        return []
    first, last = quarters(points)
    lr = run.config.get("learning_rate")
    if last.mean > first.mean * threshold("sft_diverged"):
        return [Finding("error", "sft.loss_rising", f"training loss rose from {first} to {last}",
                        "the learning rate is too high for this model: updates overshoot",
                        f"learning_rate={_scaled(lr, 0.1)} (a tenth)", "learning_rate", _scaled(lr, 0.1), run.stage)]
    if last.mean > first.mean * (1 - threshold("sft_min_drop")):
        return [Finding("warning", "sft.loss_flat", f"training loss went only from {first} to {last}",
                        "the model is not learning the demonstrations: the learning rate is too low, or the "
                        "answers carry no loss (all masked as prompt)",
                        f"learning_rate={_scaled(lr, 3)} (three times)", "learning_rate", _scaled(lr, 3), run.stage)]
    return []


def sft_overfitting(run: RunData) -> list[Finding]:
    """Held-out loss rising after its best epoch while the training loss still falls."""
    val = run.series("val_loss")
    if len(val) < 3:
        return []
    epochs = [int(v) for _, v in run.series("epoch")] or list(range(1, len(val) + 1))
    best = min(range(len(val)), key=lambda i: val[i][1])
    if best == len(val) - 1 or val[-1][1] < val[best][1] * (1 + threshold("overfit_rise")):
        return []
    train = run.series("sft_loss")
    falling = ""
    if enough(train):
        first, last = quarters(train)
        falling = f", while the training loss fell from {first} to {last}"
    kept = run.summary.get("epoch")
    by = run.summary.get("selected_by")
    kept_text = f"; epoch {int(kept)} was kept (by {by})" if kept is not None else ""
    best_epoch = epochs[best] if best < len(epochs) else best + 1
    severity = "info" if kept is not None and int(kept) == best_epoch else "warning"
    return [Finding(severity, "sft.overfitting",
                    f"held-out loss was lowest at epoch {best_epoch} ({_fmt(val[best][1])}) and rose to "
                    f"{_fmt(val[-1][1])} by epoch {epochs[-1] if epochs else len(val)}{falling}{kept_text}",
                    "the model memorises the training demonstrations (too many epochs for this much data)",
                    f"epochs={best_epoch}, the best held-out epoch (or more demonstrations)", "epochs", best_epoch,
                    run.stage)]


def answers_do_not_end(run: RunData) -> list[Finding]:
    """SFT (per epoch) and stage 3 (per step) log `eos_rate`: the share of sampled answers that emitted EOS."""
    points = run.series("eos_rate")
    if not points:
        return []
    recent = quarters(points)[1] if enough(points) else _span(points[-1:])
    if recent.mean >= threshold("eos_min"):
        return []
    steps = str(recent).split(" ", 1)[1]  # "(steps a-b)"
    seen = f"only {recent.mean:.0%} of sampled answers ended with EOS {steps}"
    if run.stage == "sft":
        length = run.config.get("max_length", 128)
        return [Finding("warning", "sft.no_eos", seen,
                        "demonstrations cut by max_length lose their EOS, so the model never learns to stop",
                        f"max_length={length * 2}", "max_length", length * 2, run.stage)]
    penalty = run.config.get("missing_eos_penalty") or 0.0
    value = max(1.0, _scaled(penalty, 2))
    return [Finding("warning", f"{run.stage}.missing_eos", seen,
                    "answers run to the length limit: the reward does not punish rambling on",
                    f"missing_eos_penalty={value}", "missing_eos_penalty", value, run.stage)]


# -- Reward model ----------------------------------------------------------------------------------


def rm_at_chance(run: RunData) -> list[Finding]:
    heldout = run.series("heldout_accuracy")
    if not heldout:
        return []
    step, accuracy = heldout[-1]
    out = []
    pairs = run.summary.get("pairs_all")
    pair_text = f" on {pairs} pairs" if pairs else ""
    if accuracy < threshold("rm_chance"):
        train = run.series("rm_accuracy")
        train_text = f"; training accuracy {quarters(train)[1]}" if enough(train) else ""
        lr = run.config.get("learning_rate")
        out.append(Finding(
            "error", "rm.chance", f"held-out pairwise accuracy {accuracy:.3f}{pair_text} at step {step}{train_text}",
            "the rankings carry no order the model can learn: shuffled or reversed (best must come first), "
            "labelers who disagree, or preferences the model cannot perceive",
            f"check that every ranking lists its answers best first; if they do, learning_rate={_scaled(lr, 3)}",
            "learning_rate", _scaled(lr, 3), run.stage))
    else:
        for key, value in sorted(run.summary.items()):
            kind = key.removeprefix("accuracy_")
            if key.startswith("accuracy_") and value is not None and value < threshold("rm_chance") \
                    and run.summary.get(f"pairs_{kind}", 0) >= threshold("rm_kind_pairs"):
                out.append(Finding(
                    "info", "rm.kind_chance",
                    f"held-out accuracy {value:.3f} on the {run.summary[f'pairs_{kind}']} pairs that differ in "
                    f"{kind} (overall {accuracy:.3f})",
                    f"a small reward model cannot check {kind}; it learns the preferences it can perceive",
                    "k=6 (more answers per prompt, more pairs of each kind), or a larger base model", "k", 6, run.stage))
    return out


def rm_margin_collapse(run: RunData) -> list[Finding]:
    points = run.series("rm_margin")
    if len(points) < 2 * threshold("min_points"):
        return []
    spans = windows(points)
    best = max(spans, key=lambda s: s.mean)
    last = quarters(points)[1]
    if best.mean < threshold("margin_floor") or last.mean >= best.mean * threshold("margin_collapse"):
        return []
    lr = run.config.get("learning_rate")
    return [Finding("warning", "rm.margin_collapse",
                    f"chosen-rejected margin peaked at {best} and fell to {last}",
                    "the scores lose their spread late in training: the learning rate stays too high (or the "
                    "rankings contradict each other)",
                    f"learning_rate={_scaled(lr, 1 / 3)} (a third)", "learning_rate", _scaled(lr, 1 / 3), run.stage)]


def rm_length_bias(run: RunData) -> list[Finding]:
    corr = run.last("heldout_length_corr")
    if corr is None or corr <= threshold("length_corr"):
        return []
    return [Finding("warning", "rm.length_bias",
                    f"the score correlates with answer length at {corr:+.2f} on held-out answers",
                    "the rankings mostly put the longer answer first, so the RM rewards length itself; "
                    "PPO will pad its answers to win it (length hacking)",
                    "rebalance the rankings; in stage 3 keep a strong KL penalty (ppo: kl_coef=0.3, the quick "
                    "preset's) and watch response_length, or use GRPO with loss_type=dr_grpo",
                    "kl_coef", 0.3, "ppo")]


def rm_scale_drift(run: RunData) -> list[Finding]:
    spread = run.series("heldout_score_std")
    if len(spread) < 2:
        return []
    low, high = min(v for _, v in spread), max(v for _, v in spread)
    if low <= 0 or high / low <= threshold("scale_drift"):
        return []
    return [Finding("warning", "rm.scale_drift",
                    "the held-out scores' spread moved from " + ", ".join(f"{v:.3g}" for _, v in spread)
                    + f" across epochs (x{high / low:.1f})",
                    "further epochs stretch the scores rather than order them better: stage 3's reward "
                    "scale (and the KL coefficient's meaning) changes with the epoch picked",
                    "epochs=1 (InstructGPT: one epoch; more overfits)", "epochs", 1, run.stage)]


# -- Stage 3: PPO, GRPO, RLOO ----------------------------------------------------------------------


def _kl_coef_field(run: RunData) -> str:
    return "kl_coef" if run.stage == "ppo" else "beta"


def _stronger_kl(run: RunData, factor: float = 10.0) -> tuple[str, float]:
    name = _kl_coef_field(run)
    current = run.config.get(name) or 0.0
    return name, max(_scaled(current, factor), 0.1)


def kl_checks(run: RunData) -> list[Finding]:
    """Negative, exploding, spiking (noise or drift: the held-out KL decides), or far from target_kl."""
    points = run.series("kl")
    if not enough(points):
        return []
    values = [v for _, v in points]
    second_half = values[len(values) // 2:]
    out = []
    if statistics.fmean(second_half) < threshold("kl_negative"):
        # Sampled at another temperature than scored, the answers are not pi's own; else more answers per step.
        name, value = (("temperature", 1.0) if run.config.get("temperature", 1.0) != 1.0
                       else ("batch_size", run.config.get("batch_size", 64) * 2))
        out.append(Finding(
            "warning", f"{run.stage}.kl_negative",
            f"mean KL per answer {statistics.fmean(second_half):.3g} over steps {points[len(values) // 2][0]}-"
            f"{points[-1][0]}",
            "log pi - log pi_ref averages >= 0 on answers sampled from pi; below 0 the answers are not pi's own "
            "(dropout on while sampling, another temperature, or a reference that is not the SFT model)",
            f"{name}={value}", name, value, run.stage))
    median = statistics.median(values)
    first, last = quarters(points)
    recent_median = statistics.median(values[-max(1, len(values) // 4):])
    heldout = run.last("heldout_kl")
    heldout_text = f"; the held-out KL at the end is {heldout:.3g}" if heldout is not None else ""
    # Clipping or a large KL(pi_old || pi_new) says the updates themselves are too large (a learning rate
    # problem); without them the penalty is too weak for the reward's pull.
    update_measured = bool(run.series("clip_frac") or run.series("approx_kl"))
    step_too_large = bool(update_size(run))
    if recent_median > threshold("kl_high"):
        if step_too_large or not update_measured:
            lr = run.config.get("learning_rate")
            name, value = "learning_rate", _scaled(lr, 0.1)
            try_text = f"learning_rate={value} (a tenth): the update steps are too large"
        else:
            name, value = _stronger_kl(run)
            try_text = f"{name}={value}"
        out.append(Finding(
            "error" if recent_median > 5 * threshold("kl_high") else "warning", f"{run.stage}.kl_explode",
            f"KL per answer went from {first} to {last} (median {recent_median:.3g} over the last quarter)"
            + heldout_text,
            "the policy drifts far from the SFT model: the KL penalty is too weak for the reward's pull, or the "
            "updates are too large",
            try_text, name, value, run.stage))
    else:
        floor = max(threshold("kl_high"), threshold("spike_ratio") * max(median, 1e-6))
        spikes = [(s, v) for s, v in points if v > floor]
        if spikes:
            shown = ", ".join(f"{v:.3g} at step {s}" for s, v in spikes[:5]) + (" ..." if len(spikes) > 5 else "")
            estimator = ("TRL's k3 per token times the answer length: k3 = e^x - x - 1 with x = log pi_ref - log "
                         "pi grows exponentially on the rare sampled token the reference finds far likelier, so "
                         "single batches spike" if run.stage == "grpo" else
                         "a per-answer sum of log-ratios over one batch: a few answers with rare tokens dominate "
                         "a step")
            if heldout is not None and heldout <= threshold("kl_high"):
                out.append(Finding(
                    "info", f"{run.stage}.kl_spikes",
                    f"KL per answer {median:.3g} (median) with {len(spikes)} single-step spikes: {shown}; the "
                    f"held-out KL at the end, measured on fresh answers as for every method, is {heldout:.3g}",
                    f"estimator noise, not drift: {estimator}; the held-out KL stays modest", "nothing: this "
                    f"run is healthy in KL (a stronger penalty would be {_stronger_kl(run, 2)[0]}="
                    f"{_stronger_kl(run, 2)[1]})", None, None, run.stage))
            else:
                name, value = _stronger_kl(run, 2)
                out.append(Finding(
                    "warning" if heldout is not None else "info", f"{run.stage}.kl_spikes",
                    f"KL per answer {median:.3g} (median) with {len(spikes)} single-step spikes: {shown}"
                    + (heldout_text if heldout is not None else "; no held-out KL was measured"),
                    f"{estimator}; " + ("the held-out KL is large too, so the policy did drift" if heldout is not None
                                        else "noise or drift: the held-out KL (rlhf eval) tells them apart"),
                    f"{name}={value}", name, value, run.stage))
    if run.stage == "ppo" and run.config.get("adaptive_kl"):
        target = run.config.get("target_kl", 6.0)
        band = threshold("target_band")
        if not target / band <= last.mean <= target * band:
            horizon = run.config.get("kl_horizon", 10_000)
            out.append(Finding(
                "warning", "ppo.kl_off_target", f"KL per answer {last} against target_kl {target:g}",
                "the adaptive controller moves kl_coef by at most 20% per kl_horizon episodes: too slowly for this run",
                f"kl_horizon={max(1, horizon // 4)}", "kl_horizon", max(1, horizon // 4), run.stage))
    return out


def over_optimisation(run: RunData) -> list[Finding]:
    """RM reward up while gold (demo) falls; on a user's data, a held-out reward that does not follow."""
    reward = run.series("reward")
    if not enough(reward) or run.config.get("reward") == "gold":
        return []
    name, value = _stronger_kl(run)
    gold = run.series("gold")
    if enough(gold):
        spans = windows(gold)
        best = max(spans, key=lambda s: s.mean)
        last_gold = quarters(gold)[1]
        reward_at_best = _span([p for p in reward if best.first_step <= p[0] <= best.last_step] or reward[:1])
        last_reward = quarters(reward)[1]
        if best.mean - last_gold.mean > threshold("gold_drop") and last_reward.mean > reward_at_best.mean:
            return [Finding("warning", f"{run.stage}.overoptimisation",
                            f"gold peaked at {best} and fell to {last_gold} while the RM reward rose from "
                            f"{reward_at_best} to {last_reward}",
                            "the policy games the reward model (over-optimisation): it wins RM score the labeler "
                            "does not give, the KL penalty too weak to hold it near the SFT model",
                            f"{name}={value}", name, value, run.stage)]
        return []
    heldout = run.last("heldout_reward")
    if heldout is None:
        return []
    first, last = quarters(reward)
    if last.mean > first.mean and heldout <= first.mean:
        return [Finding("warning", f"{run.stage}.heldout_reward",
                        f"the training reward rose from {first} to {last}, but held-out prompts score {heldout:.3g}",
                        "the policy's gains do not carry to prompts it did not train on: it exploits the reward "
                        "model on its own prompts", f"{name}={value}", name, value, run.stage)]
    return []


def _with_length_term(reward, target: int) -> str:
    """The run's reward with a length term (core/stages/reward_terms.py) at the length it started from; the
    weight is the term's documented default, -0.05 per token beyond the target."""
    term = f"length:target={target}:weight=-0.05"
    return f"reward={reward},{term}" if isinstance(reward, str) else f"a '{term}' term added to reward"


def length_hacking(run: RunData) -> list[Finding]:
    reward, length = run.series("reward"), run.series("response_length")
    if not (enough(reward) and enough(length)):
        return []
    first, last = quarters(length)
    r_first, r_last = quarters(reward)
    grew = last.mean > first.mean * (1 + threshold("length_growth")) and last.mean - first.mean >= 2
    if not grew or r_last.mean <= r_first.mean:
        return []
    by_step = dict(length)
    pairs = [(v, by_step[s]) for s, v in reward if s in by_step]
    try:
        corr = statistics.correlation([p[0] for p in pairs], [p[1] for p in pairs])
    except statistics.StatisticsError:
        return []
    if corr < threshold("length_reward_corr"):
        return []
    within = ""
    lengths = [s["length"] for s in run.samples]
    if len(lengths) >= 3:
        try:
            within = (f"; within step {run.samples[0]['step']}'s kept answers, reward and length correlate at "
                      f"{statistics.correlation([s['reward'] for s in run.samples], lengths):+.2f}")
        except statistics.StatisticsError:
            pass
    priced = f"or price length directly: {_with_length_term(run.config.get('reward', 'rm'), round(first.mean))}"
    if run.stage == "grpo" and run.config.get("loss_type") != "dr_grpo":
        name, value = "loss_type", "dr_grpo"
        try_text = f"loss_type=dr_grpo (normalises by a constant, not each answer's length); {priced}"
    else:
        name, value = _stronger_kl(run, 3)
        try_text = f"{name}={value}; {priced}"
    return [Finding("warning", f"{run.stage}.length_hacking",
                    f"answers grew from {first} to {last} tokens while the reward rose from {r_first} to "
                    f"{r_last} (correlation across steps {corr:+.2f}){within}",
                    "the reward model pays for length, and the policy pads its answers to collect it",
                    try_text, name, value, run.stage)]


def entropy_collapse(run: RunData) -> list[Finding]:
    points = run.series("entropy")
    if not enough(points):
        return []
    first, last = quarters(points)
    if first.mean <= 0 or last.mean >= first.mean * threshold("entropy_collapse"):
        return []
    lr = run.config.get("learning_rate")
    return [Finding("warning", f"{run.stage}.entropy_collapse", f"entropy per token fell from {first} to {last}",
                    "the policy became near-deterministic: it stopped exploring and repeats one answer shape",
                    f"learning_rate={_scaled(lr, 1 / 3)} (a third)", "learning_rate", _scaled(lr, 1 / 3), run.stage)]


def update_size(run: RunData) -> list[Finding]:
    """Clip fraction and PPO's approx KL(pi_old || pi_new): the update's size."""
    lr = run.config.get("learning_rate")
    out = []
    for metric, limit, what in (("clip_frac", "clip_high", "of tokens clipped"),
                                ("approx_kl", "approx_kl_high", "KL(pi_old || pi_new) per token")):
        points = run.series(metric)
        if not enough(points):
            continue
        recent = _span(points[len(points) // 2:])
        if recent.mean > threshold(limit):
            out.append(Finding("warning", f"{run.stage}.{metric}",
                               f"{recent.mean:.3g} {what} over steps {recent.first_step}-{recent.last_step}",
                               "each update moves the policy far past the trust region the clip allows",
                               f"learning_rate={_scaled(lr, 1 / 3)} (a third)", "learning_rate", _scaled(lr, 1 / 3),
                               run.stage))
    return out


def value_not_fitting(run: RunData) -> list[Finding]:
    points = run.series("value_loss")
    if not enough(points):
        return []
    first, last = quarters(points)
    if first.mean <= 0 or last.mean <= first.mean * threshold("value_rise"):
        return []
    coef = run.config.get("vf_coef", 0.1)
    return [Finding("warning", "ppo.value_loss", f"value loss rose from {first} to {last}",
                    "the value model lags the returns (rising rewards or a drifting policy), so the advantages "
                    "are noisy", f"vf_coef={_scaled(coef, 2)}", "vf_coef", _scaled(coef, 2), run.stage)]


def value_not_explaining(run: RunData) -> list[Finding]:
    """Explained variance that stays at or below 0 over the last quarter of the run: early steps start there
    (the value head is fresh), so only a run that never climbs out is named."""
    points = run.series("explained_variance")
    if not enough(points):
        return []
    late = points[-max(1, len(points) // 4):]
    if max(v for _, v in late) > threshold("explained_variance_floor"):
        return []
    coef = run.config.get("vf_coef", 0.1)
    return [Finding("warning", "ppo.explained_variance",
                    f"the value model's explained variance stayed at or below 0 over the last quarter: "
                    f"{_span(late)}, at most {max(v for _, v in late):.3g}",
                    "the value model predicts the returns no better than their mean, so GAE's advantages are "
                    "as noisy as the returns themselves: it learns too slowly, or the returns are noise it "
                    "cannot predict (a reward that varies between answers to one prompt by chance)",
                    f"vf_coef={_scaled(coef, 2)} (twice)", "vf_coef", _scaled(coef, 2), run.stage)]


def ptx_drift(run: RunData) -> list[Finding]:
    points = run.series("ptx_loss")
    if not enough(points):
        return []
    first, last = quarters(points)
    if last.mean - first.mean <= threshold("ptx_drift"):
        return []
    coef = run.config.get("ptx_coef", 0.0)
    value = max(_scaled(coef, 3), 0.1)
    return [Finding("warning", "ppo.ptx_drift", f"pretraining (ptx) loss rose from {first} to {last}",
                    "the policy forgets its pretraining distribution (the alignment tax)",
                    f"ptx_coef={value}", "ptx_coef", value, run.stage)]


CHECKS = {
    "sft": (sft_loss_not_falling, sft_overfitting, answers_do_not_end),
    "rm": (rm_at_chance, rm_margin_collapse, rm_length_bias, rm_scale_drift),
    "ppo": (kl_checks, over_optimisation, length_hacking, entropy_collapse, update_size, value_not_fitting,
            value_not_explaining, answers_do_not_end, ptx_drift),
    "grpo": (kl_checks, over_optimisation, length_hacking, entropy_collapse, update_size, answers_do_not_end),
    "rloo": (kl_checks, over_optimisation, length_hacking, entropy_collapse, update_size, answers_do_not_end),
}


def diagnose(run: RunData) -> list[Finding]:
    """Every check of the run's stage, most severe first; a stage without checks (DPO) gets none."""
    findings = [f for check in CHECKS.get(run.stage, ()) for f in check(run)]
    findings = [Finding(**{**asdict(f), "run": run.run_id}) for f in findings]
    return sorted(findings, key=lambda f: -SEVERITIES.index(f.severity))


def diagnose_report(report: dict) -> list[Finding]:
    """Findings only a pipeline's report can show: models compared on the same held-out corpus."""
    out = []
    base, sft = report.get("base") or {}, report.get("sft") or {}
    if base.get("pretrain_loss") and sft.get("pretrain_loss") and \
            sft["pretrain_loss"] > base["pretrain_loss"] * threshold("alignment_tax_ratio"):
        out.append(Finding("warning", "sft.alignment_tax",
                           f"held-out pretraining loss {sft['pretrain_loss']:.3g} after SFT against the base's "
                           f"{base['pretrain_loss']:.3g}",
                           "response-only SFT moved the model far from its pretraining distribution",
                           "ppo: ptx_coef=1.0 (the ptx term pulls it back during PPO)", "ptx_coef", 1.0, "ppo"))
    for key in ("ppo", "ppo_no_ptx", "grpo", "rloo", "dpo"):
        drift = (report.get(key) or {}).get("pretrain_drift")
        if drift is not None and drift > threshold("pretrain_drift"):
            stage = "ppo" if key.startswith("ppo") else key
            value = 1.0 if stage == "ppo" else None
            out.append(Finding("warning", f"{stage}.pretrain_drift",
                               f"{key}'s held-out pretraining loss sits {drift:.3g} nats above SFT's",
                               "stage 3 pulled the policy off its pretraining distribution (the alignment tax)",
                               "ptx_coef=1.0" if stage == "ppo" else "a stronger KL to the SFT model (beta)",
                               "ptx_coef" if stage == "ppo" else None, value, stage, ""))
    return out


def summary_line(findings: list[Finding], run_id: str) -> str:
    """One line for a stage's CLI summary and its run log."""
    counts = {s: sum(f.severity == s for f in findings) for s in SEVERITIES}
    if not findings:
        return f"doctor: nothing looks wrong in {run_id}"
    worst = [f.check for f in findings if f.severity == findings[0].severity]
    said = ", ".join(f"{n} {s}{'s' if n > 1 else ''}" for s, n in reversed(counts.items()) if n)
    return f"doctor: {said} ({', '.join(worst)}); `rlhf doctor {run_id}` explains"


def format_text(findings: list[Finding]) -> str:
    """The findings as `rlhf doctor` prints them."""
    blocks = []
    for f in findings:
        blocks.append(f"{f.severity.upper():8s}{f.check}  [{f.run}]\n  seen:  {f.seen}\n  cause: {f.cause}\n"
                      f"  try:   {f.try_}")
    return "\n\n".join(blocks)


# -- reading a run from the store --------------------------------------------------------------------


def summary_file(stage: str) -> str:
    return f"{stage}_summary.json"


def load_run(store: Store, run_id: str) -> RunData:
    """The run's metric series, its summary (once it has one) and its last recorded rollouts."""
    run = store.get_run(run_id)
    metrics: dict[str, list[tuple[int, float]]] = {}
    for row in store.metrics([run_id]):
        metrics.setdefault(row["name"], []).append((row["step"], row["value"]))
    summary = {}
    if run.get("output_dir"):
        path = Path(run["output_dir"]) / summary_file(run["stage"])
        try:
            summary = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            summary = {}  # written atomically, but a hand-edited file should not stop the doctor
    samples = []
    # PPO records its rollouts, GRPO and RLOO theirs (`trl_bridge.GroupRollouts`): every sampling stage 3.
    steps = rollout_store.steps(store, run_id) if run["stage"] in THIRD_STAGES else []
    if steps:
        samples = [{**s, "step": steps[-1]} for s in rollout_store.samples(store, run_id, steps[-1])]
    # The stage's defaults under the run's values: a config recorded before a field existed still names it.
    defaults = dataclasses.asdict(STAGES[run["stage"]].config_class()) if run["stage"] in STAGES else {}
    config = {**defaults, **(run["config"] if isinstance(run["config"], dict) else {})}
    return RunData(run_id, run["stage"], config, metrics, summary, samples)


def stage_runs(store: Store, run_id: str) -> list[str]:
    """A pipeline run stands for its stage runs ('<pipeline>-<key>'), another run for itself."""
    run = store.get_run(run_id)
    if run["stage"] != "pipeline":
        return [run_id]
    return [s.id for s in pipeline_stage_runs(store.list_runs(), run_id)]


def diagnose_run(store: Store, run_id: str) -> list[Finding]:
    """`rlhf doctor RUN`: a stage run's findings; a pipeline's, every stage run's and its report's."""
    findings = [f for rid in stage_runs(store, run_id) for f in diagnose(load_run(store, rid))]
    run = store.get_run(run_id)
    if run["stage"] == "pipeline" and run.get("output_dir"):
        path = Path(run["output_dir"]) / "report.json"
        if path.is_file():
            findings += [Finding(**{**asdict(f), "run": run_id}) for f in diagnose_report(json.loads(path.read_text()))]
    return findings
