"""The over-optimisation study (Gao, Schulman, Hilton 2022, "Scaling laws for reward model
overoptimization") on the demo task, whose simulated labeler (gold) stands beside the learned
reward model (the proxy).

Two ways of pushing a policy away from the SFT model, both measured against d = sqrt(KL):

- **KL sweep (RL).** Several short PPO runs (`core/stages/ppo.run`) from the same SFT and RM at
  different `kl_coef` (beta). Every `eval_every` PPO steps the run writes a step checkpoint; each
  is evaluated on held-out demo prompts (`core/stages/evaluate.policy_eval`): mean gold, mean RM score and
  KL to the SFT model of answers sampled at the rollout temperature.
- **Best-of-n** from the SFT model: n answers per prompt, keep the RM's favourite, score its gold;
  KL_bon = log n - (n - 1) / n (the paper's analytic value).

The proxy is the study's `reward` (core/stages/reward_terms.py): the RM by default, or a list of terms beside
it (`rm,length:target=12:weight=-0.05`), which the sweep's PPO runs optimise, best-of-n picks by and the
evaluations report as `rm` (the reward's weighted total; each term's mean under `terms`). Gold stays the
demo's labeler.

The paper's functional forms, with R the gain over the SFT model (gold or RM score minus the SFT
model's), fitted by least squares (both are linear in alpha, beta):

    best-of-n:  R(d) = d (alpha - beta d)        peak at d* = alpha / (2 beta)
    RL:         R(d) = d (alpha - beta log d)    peak at d* = exp(alpha / beta - 1)

DIR/study.json is rewritten atomically as points arrive, so a re-run (the same command, or Resume
on the Train page) skips what is done: the SFT/RM models once trained, best-of-n once measured,
every finished sweep run, every evaluated checkpoint; an unfinished sweep run resumes in place
from its last step checkpoint under the same run name. Its keys:

    config, name, models {sft, rm},           config.reward: the proxy's terms (default "rm")
    sft  {gold, rm, kl, terms}                the RL baseline (the SFT model on the eval prompts)
    rl   [{kl_coef, step, episodes, kl, sqrt_kl, rm, gold, terms}, ...]
    bon  [{n, kl, sqrt_kl, rm, gold, terms}, ...]    n = 1 is the best-of-n baseline
                                      rm: the proxy (the reward's total), terms: {term: mean} of the same answers
    runs {"<kl_coef>": {run_id, output_dir, done}}
    fits {"bon": {alpha, beta, peak_sqrt_kl, peak_gold_gain, rm: {alpha, beta}}, "rl": {...}}

    ensemble {models {rm, trained}, sft, rl, bon, runs, fits}   with `--ensemble N` only: the same arm with
                                      an ensemble of N RMs, its reward `reward_aggregate` (conservative:
                                      the min, or mean - uncertainty_coef x std; Coste et al. 2023); its
                                      runs `<name>-ens-kl<beta>` in DIR/ppo-ensemble, its RM DIR/rm-ensemble

The fits' alpha/beta are those of the gold curve; `rm` holds the proxy's (in the ensemble arm, the
aggregate reward's). A fit is null until it has two points with d > 0. Nothing here imports torch at module level (`core.runs.jobs` imports this).
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

from core.config import MAX_ENSEMBLE, PRESETS, parse_reward

STUDY_FILE = "study.json"
DEFAULT_KL_COEFS = (0.2, 0.1, 0.05, 0.02, 0.005)
DEFAULT_NS = (1, 2, 4, 8, 16, 32, 64)
FORMS = ("bon", "rl")


# ---------------------------------------------------------------------------------------------
# Pure functions: KL of best-of-n, the fits, their peaks
# ---------------------------------------------------------------------------------------------


def kl_bon(n: int) -> float:
    """KL(best-of-n || base) = log n - (n - 1) / n (Stiennon et al. 2020; Gao et al. 2022)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def _features(form: str, d):
    import numpy as np

    d = np.asarray(d, dtype=float)
    if form == "bon":
        return np.stack([d, -d * d], 1)
    if form == "rl":
        # d log d -> 0 as d -> 0: the form passes through the origin.
        safe = np.where(d > 0, d, 1.0)
        return np.stack([d, -np.where(d > 0, d * np.log(safe), 0.0)], 1)
    raise ValueError(f"unknown form {form!r}: choose one of {', '.join(FORMS)}")


def predict(form: str, alpha: float, beta: float, d):
    """R(d) of a fitted form, for a number or an array of d >= 0."""
    import numpy as np

    out = _features(form, np.atleast_1d(d)) @ np.array([alpha, beta])
    return float(out[0]) if np.ndim(d) == 0 else out


def fit(form: str, d, r) -> tuple[float, float] | None:
    """Least-squares (alpha, beta) of `form` ('bon': R = d(alpha - beta d); 'rl': R = d(alpha - beta log d))
    through the points (d, r); points with d <= 0 carry no information (every form is 0 there) and are
    left out. None when fewer than two points remain or they do not determine both parameters."""
    import numpy as np

    d, r = np.asarray(d, dtype=float), np.asarray(r, dtype=float)
    keep = np.isfinite(d) & np.isfinite(r) & (d > 0)
    if keep.sum() < 2:
        return None
    A = _features(form, d[keep])
    solution, _, rank, _ = np.linalg.lstsq(A, r[keep], rcond=None)
    if rank < 2:
        return None
    return float(solution[0]), float(solution[1])


def peak(form: str, alpha: float, beta: float) -> float | None:
    """The d >= 0 where the fitted R(d) is largest: bon alpha/(2 beta), rl exp(alpha/beta - 1). None when
    beta <= 0 (R keeps rising: no peak within reach). A bon curve with alpha <= 0 peaks at d = 0."""
    if beta <= 0:
        return None
    if form == "bon":
        return max(0.0, alpha / (2 * beta))
    if form == "rl":
        return math.exp(alpha / beta - 1)
    raise ValueError(f"unknown form {form!r}: choose one of {', '.join(FORMS)}")


def gains(study: dict) -> dict[str, list[dict]]:
    """Points relative to the SFT model, per form: {'rl': [{d, gold, rm, ...}], 'bon': [...]}. RL points are
    relative to the SFT model's evaluation (`sft`); best-of-n ones to n = 1 on the same prompts."""
    out: dict[str, list[dict]] = {"rl": [], "bon": []}
    base = study.get("sft")
    if base:
        out["rl"] = [{**p, "d": p["sqrt_kl"], "gold_gain": p["gold"] - base["gold"], "rm_gain": p["rm"] - base["rm"]}
                     for p in study.get("rl", [])]
    one = next((p for p in study.get("bon", []) if p["n"] == 1), None)
    if one:
        out["bon"] = [{**p, "d": p["sqrt_kl"], "gold_gain": p["gold"] - one["gold"], "rm_gain": p["rm"] - one["rm"]}
                      for p in study.get("bon", [])]
    return out


def fits(study: dict) -> dict:
    """{'bon': {...}, 'rl': {...}}: the gold fit's alpha, beta, its peak (sqrt_kl and gain) and the RM's fit."""
    out = {}
    for form, points in gains(study).items():
        d = [p["d"] for p in points]
        gold = fit(form, d, [p["gold_gain"] for p in points])
        rm = fit(form, d, [p["rm_gain"] for p in points])
        entry: dict = {"alpha": None, "beta": None, "peak_sqrt_kl": None, "peak_gold_gain": None,
                       "rm": {"alpha": rm[0], "beta": rm[1]} if rm else {"alpha": None, "beta": None}}
        if gold:
            entry.update(alpha=gold[0], beta=gold[1])
            d_star = peak(form, *gold)
            if d_star is not None:
                entry.update(peak_sqrt_kl=d_star, peak_kl=d_star ** 2, peak_gold_gain=predict(form, *gold, d_star))
        out[form] = entry
    return out


def curves(study: dict, points: int = 100) -> dict:
    """What the Study page draws: the relative points and, per fitted form, the fitted gold and RM curves
    over [0, the largest d measured (or the peak, if further)]."""
    import numpy as np

    rel, fitted = gains(study), study.get("fits") or fits(study)
    out: dict = {"points": rel, "curves": {}}
    for form in FORMS:
        f = fitted.get(form) or {}
        ds = [p["d"] for p in rel[form]] + ([f["peak_sqrt_kl"]] if f.get("peak_sqrt_kl") else [])
        if not ds:
            continue
        grid = np.linspace(0.0, max(ds) * 1.05, points)
        entry: dict = {"d": grid.tolist()}
        if f.get("alpha") is not None:
            entry["gold"] = predict(form, f["alpha"], f["beta"], grid).tolist()
        if (f.get("rm") or {}).get("alpha") is not None:
            entry["rm"] = predict(form, f["rm"]["alpha"], f["rm"]["beta"], grid).tolist()
        out["curves"][form] = entry
    return out


# ---------------------------------------------------------------------------------------------
# The study's settings
# ---------------------------------------------------------------------------------------------


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    return value


def parse_list(text: str, what: str) -> list[str]:
    """'0.1, 0.05 0.02' -> ['0.1', '0.05', '0.02'] (the CLI's and the page's list fields)."""
    items = [s for s in re.split(r"[,\s]+", str(text).strip()) if s]
    if not items:
        raise ValueError(f"{what} is empty")
    return items


def study_config(
    preset: str = "quick", kl_coefs=DEFAULT_KL_COEFS, ns=DEFAULT_NS, episodes: int = 2048, eval_every: int = 4,
    eval_prompts: int = 100, bon_prompts: int = 50, sft_model: str | None = None, reward_model: str | None = None,
    ptx_coef: float = 0.0, seed: int = 1234, ppo: dict | None = None, pipeline: dict | None = None,
    ensemble: int = 0, reward_aggregate: str = "mean_minus_std", uncertainty_coef: float = 1.0,
    ensemble_model: str | None = None, reward: str | list = "rm",
) -> dict:
    """The study's settings as a plain (JSON) dict, every value checked before any work starts.

    kl_coefs: the sweep's betas (finite, >= 0, distinct); ns: best-of-n sizes (powers of two >= 1; 1 is
    always measured, it is the baseline); episodes: PPO episodes per sweep run; eval_every: PPO steps
    between evaluations (= between step checkpoints); eval_prompts / bon_prompts: held-out demo prompts
    per evaluation / for best-of-n; sft_model + reward_model: reuse these (both or neither; otherwise the
    study trains them with run_pipeline, stages sft,rm); ptx_coef: the sweep's ptx term (0: plain PPO, as
    in the paper); seed: the evaluations' sampling seed (the same answers' randomness for every point);
    ppo: further PPO config overrides; pipeline: per-stage overrides when SFT/RM are trained; ensemble: N >= 2
    adds the ensemble arm (the same best-of-n and KL sweep scored by an ensemble of N reward models through
    `reward_aggregate` with `uncertainty_coef`), its ensemble reused from `ensemble_model` or trained as the
    study's RM was with `ensemble` = N; 0: no ensemble arm; reward: the proxy, reward terms as PPO's `reward`
    field (default 'rm'; e.g. 'rm,length:target=12:weight=-0.05'): what the sweep optimises and best-of-n
    picks by (in the ensemble arm its `rm` term is the ensemble's aggregate)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    if isinstance(kl_coefs, str):
        kl_coefs = parse_list(kl_coefs, "kl_coefs")
    coefs = []
    for c in list(kl_coefs or []):
        try:
            value = float(c)
        except (TypeError, ValueError):
            raise ValueError(f"kl_coefs: {c!r} is not a number") from None
        if isinstance(c, bool) or not math.isfinite(value) or value < 0:
            raise ValueError(f"kl_coefs must be finite numbers >= 0, got {c!r}")
        coefs.append(value)
    if not coefs:
        raise ValueError("kl_coefs is empty: give at least one beta for the KL sweep (the study wants 4 or more)")
    if len(set(coefs)) != len(coefs):
        raise ValueError(f"kl_coefs has duplicates: {coefs}")
    if isinstance(ns, str):
        ns = parse_list(ns, "ns")
    sizes = []
    for n in list(ns or []):
        if isinstance(n, str) and n.strip().isdigit():
            n = int(n)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n & (n - 1):
            raise ValueError(f"best-of-n sizes must be powers of two >= 1 (1, 2, 4, ..., 64), got {n!r}")
        sizes.append(n)
    if not sizes:
        raise ValueError("ns is empty: give the best-of-n sizes, e.g. 1,2,4,...,64")
    sizes = sorted(set(sizes) | {1})
    for name, value in (("episodes", episodes), ("eval_every", eval_every), ("eval_prompts", eval_prompts),
                        ("bon_prompts", bon_prompts)):
        _positive_int(name, value)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be a whole number, got {seed!r}")
    if bool(sft_model) != bool(reward_model):
        raise ValueError("give both sft_model and reward_model (reuse them), or neither (the study trains them)")
    try:
        ptx = float(ptx_coef)
    except (TypeError, ValueError):
        raise ValueError(f"ptx_coef must be a number, got {ptx_coef!r}") from None
    if not math.isfinite(ptx) or ptx < 0:
        raise ValueError(f"ptx_coef must be a finite number >= 0, got {ptx_coef!r}")
    parse_reward(reward)
    if "reward" in (ppo or {}):
        raise ValueError("give the study's reward as its own setting (rlhf study --reward ...), not as a PPO "
                         "override: best-of-n and every evaluation score by it too")
    config = {
        "preset": preset, "kl_coefs": coefs, "ns": sizes, "episodes": episodes, "eval_every": eval_every,
        "eval_prompts": eval_prompts, "bon_prompts": bon_prompts, "sft_model": str(sft_model) if sft_model else None,
        "reward_model": str(reward_model) if reward_model else None, "ptx_coef": ptx, "seed": seed,
        "ppo": dict(ppo or {}), "pipeline": {k: dict(v) for k, v in (pipeline or {}).items()}, "reward": reward,
    }
    if isinstance(ensemble, bool) or not isinstance(ensemble, int) or not (ensemble == 0 or 2 <= ensemble <= MAX_ENSEMBLE):
        raise ValueError(f"ensemble must be 0 (no ensemble arm) or a number of reward models from 2 to {MAX_ENSEMBLE}, "
                         f"got {ensemble!r}")
    if ensemble_model and not (ensemble and sft_model):
        raise ValueError("ensemble_model is the ensemble arm's reward model, reused with the SFT model and the single "
                         "RM it is compared with: give ensemble N, sft_model and reward_model too")
    if ensemble:
        # Only a study with an ensemble arm carries these keys: an older study.json resumes unchanged.
        config.update(ensemble=ensemble, reward_aggregate=reward_aggregate, uncertainty_coef=uncertainty_coef,
                      ensemble_model=str(ensemble_model) if ensemble_model else None)
    for c in coefs:  # every sweep config valid now, not after the models are trained
        sweep_config(config, "sft", "rm", c)
        if ensemble:
            sweep_config(config, "sft", "rm", c, ensemble=True)
    from core.stages import make_config

    for stage, values in config["pipeline"].items():
        if stage not in ("sft", "rm"):
            raise ValueError(f"pipeline overrides are for the sft and rm stages, got {stage!r}")
        make_config(stage, preset, values)
    return config


def study_config_from_dict(values: dict | None) -> dict:
    """`study_config` from a dict (a job's stored config): unknown keys are refused with their names."""
    import inspect

    values = dict(values or {})
    unknown = sorted(set(values) - set(inspect.signature(study_config).parameters))
    if unknown:
        raise ValueError(f"unknown study setting(s): {', '.join(unknown)}")
    return study_config(**values)


def sweep_config(config: dict, sft_model: str, reward_model: str, kl_coef: float, ensemble: bool = False):
    """The PPO config of one sweep run: the preset's, a fixed beta, a step checkpoint every eval_every steps
    (each one evaluated by the study), PPO's own held-out evaluation off (the study measures). The KL is in
    the reward only, as in the paper's RL (no exact KL term unless `ppo` sets one): the swept beta alone
    decides how far the policy may go from SFT, down to the one that games the RM. `ensemble`: the ensemble
    arm's run, its reward the ensemble's `reward_aggregate`."""
    from core.stages import make_config

    scoring = {k: config[k] for k in ("reward_aggregate", "uncertainty_coef")} if ensemble else {}
    return make_config("ppo", config["preset"], {
        "total_episodes": config["episodes"], "ptx_coef": config["ptx_coef"], "kl_loss_coef": 0.0, **config["ppo"],
        "sft_model": str(sft_model), "reward_model": str(reward_model), "kl_coef": kl_coef, "adaptive_kl": False,
        "save_every": config["eval_every"], "eval_every": 0, "eval_prompts": 0, "reward": config.get("reward", "rm"),
        **scoring,
    })


def check_models(config: dict) -> None:
    """When the study reuses an SFT model and an RM: both exist, hold safetensors weights and share a
    tokenizer, and the device exists (the PPO stage's own checks, `core.stages.check_models`), before
    anything is recorded."""
    from core.stages import check_models as check_stage_models

    if config["sft_model"]:
        check_stage_models("ppo", sweep_config(config, config["sft_model"], config["reward_model"],
                                               config["kl_coefs"][0]))
    if config.get("ensemble_model"):
        check_stage_models("ppo", sweep_config(config, config["sft_model"], config["ensemble_model"],
                                               config["kl_coefs"][0], ensemble=True))


def coef_key(kl_coef: float) -> str:
    return f"{kl_coef:g}"


# ---------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------


def load_study(output_dir: str | Path) -> dict | None:
    path = Path(output_dir) / STUDY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _save(study: dict, output_dir: Path) -> None:
    from core.paths import atomic_write_text

    study["fits"] = fits(study)
    if study.get("ensemble"):
        study["ensemble"]["fits"] = fits(study["ensemble"])
    atomic_write_text(output_dir / STUDY_FILE, json.dumps(study, indent=2))


def run_study(config: dict, output_dir: str | Path, store, events, name: str | None = None) -> dict:
    """Run (or resume) the study into `output_dir`; returns the study (also DIR/study.json).

    The study is a run of its own in the store (stage 'study'): the job manager creates it for the app,
    this function creates it for the CLI (as `run_pipeline` does). Its SFT/RM stage runs are
    `<name>-sft`/`<name>-rm` and its sweep runs `<name>-kl<beta>`, each a normal run on the Monitor page."""
    from core.paths import validate_name

    config = study_config_from_dict(config)
    output_dir = Path(output_dir).resolve()
    previous = load_study(output_dir)
    # A study.json written before the reward was a setting was scored by the RM alone.
    before = {"reward": "rm", **(previous or {}).get("config", {})}
    if previous is not None and before != config:
        changed = sorted(k for k in {**before, **config} if before.get(k) != config.get(k))
        raise ValueError(f"{output_dir / STUDY_FILE} holds a study with other settings (differs in: "
                         f"{', '.join(changed)}): run it with the same options to resume it, or choose another output")
    name = validate_name(name or events.run_id or (previous or {}).get("name")
                         or f"study-{time.strftime('%Y%m%d-%H%M%S')}", "run name")
    study = previous or {"config": config, "name": name, "models": None, "sft": None, "rl": [], "bon": [],
                         "runs": {}}
    study["name"] = name
    output_dir.mkdir(parents=True, exist_ok=True)
    if events.run_id is None:  # the CLI: the study becomes a run of its own, as in the app
        store.start_run(name, "study", config, str(output_dir))
        events = events.child(store, name)
        try:
            _run(study, config, output_dir, store, events)
        except BaseException as exc:
            store.set_run_status(name, "failed", str(exc))
            raise
        store.set_run_status(name, "stopped" if events.should_stop() else "done")
        return study
    _run(study, config, output_dir, store, events)
    return study


def _run(study: dict, config: dict, output_dir: Path, store, events) -> None:
    from core.models.ensemble import load_reward_model
    from core.models.loading import load_policy, load_tokenizer, pick_device
    from core.stages.reward_terms import RewardModelTerm, resolve_reward

    # The proxy's terms, resolved once (a user's file loaded) and checked against the demo's rows before any
    # model trains; each arm adds its own reward model to the `rm` term.
    reward = resolve_reward(config.get("reward", "rm"))
    tasks = _eval_tasks(config)
    reward.check_rows([t.prompt for t in tasks], task_columns(tasks))
    name = study["name"]
    arm_units = 2 + len(config["kl_coefs"])  # the SFT baseline, best-of-n, one unit per sweep run
    total = 1 + arm_units + (1 + arm_units if config.get("ensemble") else 0)  # + the models (and the ensemble)
    events.progress(0, total, "study: models")
    if study.get("models") is None:
        if config["sft_model"]:
            study["models"] = {"sft": config["sft_model"], "rm": config["reward_model"], "trained": False}
        else:
            from core.runs.pipeline import run_pipeline

            events.log("training the SFT and reward models first (demo pipeline, stages sft,rm)")
            run_pipeline(config["preset"], output_dir, store, events, stages=("sft", "rm"),
                         overrides=config["pipeline"], no_ptx_baseline=False, name=name,
                         eval_prompts=config["eval_prompts"])
            if events.should_stop():
                return
            study["models"] = {"sft": str(output_dir / "sft"), "rm": str(output_dir / "rm"), "trained": True}
        _save(study, output_dir)
    sft_ref, rm_ref = study["models"]["sft"], study["models"]["rm"]

    probe = sweep_config(config, sft_ref, rm_ref, config["kl_coefs"][0])
    device = pick_device(probe.device)
    tokenizer = load_tokenizer(sft_ref)
    sft = load_policy(sft_ref, device, dropout=0.0).eval()

    def scored_by(rm_ref: str, **aggregate) -> object:
        """The proxy with its `rm` term (if any) scored by this reward model (an ensemble: by `aggregate`)."""
        if not reward.uses_reward_model:
            return reward
        rm = load_reward_model(rm_ref, tokenizer.pad_token_id, device, **aggregate)
        return reward.with_reward_model(RewardModelTerm(rm, tokenizer.pad_token_id, device))

    # Best-of-n's SFT answers, sampled once for both arms: the ensemble arm then pays only for its scoring.
    bon_answers = functools.cache(lambda temperature, length: sample_best_of_n(
        sft, tokenizer, _bon_tasks(config), max(config["ns"]), temperature, length, config["seed"]))
    arm = dict(config=config, output_dir=output_dir, store=store, events=events, sft=sft, tokenizer=tokenizer,
               device=device, total=total, bon_answers=bon_answers)
    if not _arm(study, study, scored_by(rm_ref), 1, **arm):
        return
    if config.get("ensemble"):
        events.progress(1 + arm_units, total, "study: the reward-model ensemble")
        ensemble_ref = _ensemble_model(study, config, output_dir, store, events)
        if ensemble_ref is None:
            return  # stopped while its members trained: they resume next time
        ensemble = scored_by(ensemble_ref, how=config["reward_aggregate"], uncertainty_coef=config["uncertainty_coef"])
        if not _arm(study, study["ensemble"], ensemble, 2 + arm_units, **arm):
            return
    events.progress(total, total, "study: done")


def _eval_tasks(config: dict) -> list:
    from core.data import demo

    return demo.heldout_tasks(config["eval_prompts"])


def _bon_tasks(config: dict) -> list:
    from core.data import demo

    return demo.heldout_tasks(config["bon_prompts"])


def task_columns(tasks) -> list[dict]:
    """The demo tasks' prompt-row columns, as the reward terms read them (`answer`)."""
    return [{"answer": t.answer} for t in tasks]


def _arm(study: dict, arm: dict, reward, first_unit: int, config: dict, output_dir: Path, store, events, sft,
         tokenizer, device, total: int, bon_answers) -> bool:
    """One arm of the study, its proxy `reward` (a `Reward`, its `rm` term the arm's reward model): the SFT
    baseline, best-of-n (its answers `bon_answers(temperature, length)`, shared by the arms) and the KL sweep,
    each skipped when done. `arm`: the study itself (the single RM) or its `ensemble` entry (the ensemble and
    its reward aggregate), both in the same form. Returns False when stopped."""
    from core.stages.evaluate import policy_eval

    probe = sweep_config(config, study["models"]["sft"], arm["models"]["rm"], config["kl_coefs"][0])
    temperature, length = probe.temperature, probe.response_length
    eval_tasks = _eval_tasks(config)
    label = "study: " + ("ensemble, " if arm is not study else "")

    def measure(policy) -> dict:
        return policy_eval(policy, sft, reward, tokenizer, eval_tasks, temperature, length, config["seed"],
                           columns=task_columns(eval_tasks))

    events.progress(first_unit, total, label + "the SFT model")
    if arm.get("sft") is None:
        arm["sft"] = measure(sft)
        events.log(f"{label}SFT model: gold {arm['sft']['gold']:.3f}, RM {arm['sft']['rm']:.3f}")
        _save(study, output_dir)

    events.progress(first_unit + 1, total, label + "best-of-n")
    if not set(config["ns"]) <= {p["n"] for p in arm.get("bon", [])}:
        arm["bon"] = best_of_n(bon_answers(temperature, length), reward, config["ns"])
        events.log(label + "best-of-n: " + ", ".join(f"n={p['n']} gold {p['gold']:.3f} RM {p['rm']:.3f}"
                                                    for p in arm["bon"]))
        _save(study, output_dir)

    for i, kl_coef in enumerate(config["kl_coefs"]):
        if events.should_stop():
            return False
        events.progress(first_unit + 2 + i, total, f"{label}beta={kl_coef:g}")
        if (arm["runs"].get(coef_key(kl_coef)) or {}).get("done"):
            continue
        if not _sweep_run(study, arm, config, output_dir, store, events, kl_coef, i, measure, device):
            return False  # stopped: the run resumes in place next time
    return True


def _ensemble_model(study: dict, config: dict, output_dir: Path, store, events) -> str | None:
    """The ensemble arm's reward model: `ensemble_model`, or an ensemble of `ensemble` RMs trained as the study's
    own RM was (its run's config, the same rankings; member 0 trains as that RM did), as run `<name>-rm-ensemble`
    into DIR/rm-ensemble. None when stopped before it was whole."""
    from core.runs.pipeline import run_stage
    from core.stages import make_config

    arm = study.setdefault("ensemble", {"models": None, "sft": None, "rl": [], "bon": [], "runs": {}})
    if arm["models"] is None:
        if config["ensemble_model"]:
            arm["models"] = {"rm": config["ensemble_model"], "trained": False}
        else:
            trained = study["models"]["trained"]
            values = (store.get_run(f"{study['name']}-rm")["config"] if trained
                      else {"sft_model": study["models"]["sft"], **config["pipeline"].get("rm", {})})
            rm_config = make_config("rm", config["preset"], {**values, "ensemble": config["ensemble"]})
            run_id, out = f"{study['name']}-rm-ensemble", output_dir / "rm-ensemble"
            if run_stage(events, store, run_id, "rm", rm_config, out).stopped:
                return None
            arm["models"] = {"rm": str(out), "trained": True}
        _save(study, output_dir)
    return arm["models"]["rm"]


def _sweep_run(study, arm, config, output_dir, store, events, kl_coef, index, measure, device) -> bool:
    """One PPO run at `kl_coef` in `arm`, each step checkpoint evaluated as it is written (and, after a resume,
    any written but not yet evaluated). Returns False when the run was stopped."""
    from core.stages.events import Events
    from core.models.loading import load_policy
    from core.paths import checkpoints_dir
    from core.stages import get_stage

    ensemble = arm is not study
    label = "ensemble, " if ensemble else ""
    key = coef_key(kl_coef)
    run_id = f"{study['name']}-{'ens-' if ensemble else ''}kl{key}"
    out = output_dir / ("ppo-ensemble" if ensemble else "ppo") / f"kl{key}"
    ppo_config = sweep_config(config, study["models"]["sft"], arm["models"]["rm"], kl_coef, ensemble)
    arm["runs"][key] = {"run_id": run_id, "output_dir": str(out), "done": False}
    _save(study, output_dir)

    def evaluate(step: int, path: Path, run_events: Events) -> None:
        if any(p["kl_coef"] == kl_coef and p["step"] == step for p in arm["rl"]):
            return
        policy = load_policy(path, device, dropout=0.0).eval()
        m = measure(policy)
        arm["rl"].append({"kl_coef": kl_coef, "step": step, "episodes": step * ppo_config.batch_size,
                          "kl": m["kl"], "sqrt_kl": math.sqrt(max(m["kl"], 0.0)), "rm": m["rm"], "gold": m["gold"],
                          "terms": m["terms"]})
        arm["rl"].sort(key=lambda p: (-p["kl_coef"], p["step"]))
        run_events.metrics(step, {"heldout_gold": m["gold"], "heldout_reward": m["rm"], "heldout_kl": m["kl"]})
        _save(study, output_dir)

    class SweepEvents(Events):
        def checkpoint(self, name, kind, path, step=0):
            super().checkpoint(name, kind, path, step)
            if Path(path).name == f"step-{step}" and not self.should_stop():  # stopping: evaluated on resume
                evaluate(step, Path(path), self)

    n_runs = len(config["kl_coefs"])

    def on_progress(done: int, total: int, message: str) -> None:
        if events.on_progress:
            events.on_progress(done, total, f"{label}beta={kl_coef:g} ({index + 1}/{n_runs}): {message}")

    store.start_run(run_id, "ppo", ppo_config.to_dict(), str(out))
    run_events = events.child(store, run_id, on_progress, SweepEvents)
    try:
        get_stage("ppo").runner(ppo_config, store, run_events, out)
        # Checkpoints written before a crash or a stop but never evaluated (the run resumed after them).
        written = {int(p.name[5:]): p for p in checkpoints_dir(out).glob("step-*")
                   if p.name[5:].isdigit() and (p / "config.json").is_file()}
        for step in [] if events.should_stop() else sorted(written):
            evaluate(step, written[step], run_events)
    except BaseException as exc:
        store.set_run_status(run_id, "failed", str(exc))
        raise
    if events.should_stop():
        store.set_run_status(run_id, "stopped")
        events.log(f"stopped during the beta={kl_coef:g} run; resume the study to continue it")
        return False
    store.set_run_status(run_id, "done")
    arm["runs"][key]["done"] = True
    _save(study, output_dir)
    last = max((p for p in arm["rl"] if p["kl_coef"] == kl_coef), key=lambda p: p["step"], default=None)
    if last:
        events.log(f"{label}beta={kl_coef:g}: KL {last['kl']:.2f}, RM {last['rm']:.3f}, gold {last['gold']:.3f}")
    return True


@dataclass
class BestOfNAnswers:
    """Best-of-n's answers: `n` per task sampled from one policy, in batches as the reward terms read them
    (`Answers`), and each answer's gold. Sampled once, scored by as many rewards as asked: both arms of the
    study pick from the same SFT answers."""
    tasks: list
    n: int
    batches: list
    gold: list[float]


def sample_best_of_n(policy, tokenizer, tasks, n: int, temperature: float = 1.0, max_new_tokens: int = 24,
                     seed: int = 1234, batch_size: int = 64) -> BestOfNAnswers:
    """`n` answers per task from `policy` at `temperature`, each batch sampled with its own seed."""
    import torch

    from core.data import demo
    from core.models.generate import sample
    from core.stages.reward_terms import Answers

    repeated = [t for t in tasks for _ in range(n)]
    prompts, columns = [t.prompt for t in repeated], task_columns(repeated)
    batches, gold = [], []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            out = sample(policy, tokenizer, chunk, max_new_tokens, temperature, seed=seed + i)
            gold += [demo.gold_score(p, text) for p, text in zip(chunk, out.texts)]
            batches.append(Answers.of_samples(out, chunk, columns[i : i + batch_size]))
    return BestOfNAnswers(list(tasks), n, batches, gold)


def best_of_n(answers: BestOfNAnswers, reward, ns) -> list[dict]:
    """Best-of-n points from `answers` (`sample_best_of_n`, n = max(ns)): for each n they are split into
    max(ns)/n disjoint groups of n, the favourite of `reward` (a `core.stages.reward_terms.Reward`: the RM, or
    terms beside it) kept in each group, and its gold, proxy reward (`rm`, the reward's total) and each term
    averaged over groups and prompts (every sample used for every n). KL is the analytic log n - (n - 1)/n."""
    import torch

    n_max = max(ns)
    if answers.n != n_max:
        raise ValueError(f"best-of-n up to n={n_max} needs {n_max} answers per prompt, got {answers.n}")
    total, terms = [], {}
    with torch.no_grad():
        for batch in answers.batches:
            scored = reward(batch)
            total += scored.total.tolist()
            for name, values in scored.terms.items():
                terms.setdefault(name, []).extend(values.tolist())

    def grid(values) -> torch.Tensor:
        return torch.tensor(values).view(len(answers.tasks), n_max)

    G, R, T = grid(answers.gold), grid(total), {name: grid(values) for name, values in terms.items()}
    points = []
    for n in sorted(ns):
        r = R.view(len(answers.tasks), n_max // n, n)
        best = r.argmax(-1, keepdim=True)

        def chosen(values: torch.Tensor) -> float:
            return float(values.view(len(answers.tasks), n_max // n, n).gather(-1, best).mean())

        kl = kl_bon(n)
        points.append({"n": n, "kl": kl, "sqrt_kl": math.sqrt(kl), "rm": chosen(R), "gold": chosen(G),
                       "terms": {name: chosen(values) for name, values in T.items()}})
    return points


__all__ = ["kl_bon", "fit", "peak", "predict", "fits", "gains", "curves", "study_config", "study_config_from_dict",
           "check_models", "run_study", "best_of_n", "sample_best_of_n", "BestOfNAnswers", "load_study", "task_columns", "STUDY_FILE", "DEFAULT_KL_COEFS", "DEFAULT_NS"]
