"""The over-optimisation study (core/runs/study.py): the fits and their peaks on synthetic points, the
best-of-n KL, a tiny end-to-end study on the bundled model that stops, resumes and skips what is done,
and bad settings refused before any work. Nothing here asserts wall-clock times."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from core.runs import study
from core.stages.events import Events

# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form, alpha, beta", [("bon", 0.8, 0.3), ("bon", 0.5, 0.05), ("rl", 0.6, 0.4),
                                               ("rl", 0.3, 0.2)])
def test_fits_recover_known_alpha_beta_and_the_analytic_peak(form, alpha, beta):
    d = np.linspace(0.1, 4.0, 25)
    r = d * (alpha - beta * (d if form == "bon" else np.log(d)))
    got = study.fit(form, d, r)
    assert got == pytest.approx((alpha, beta), abs=1e-9)
    d_star = study.peak(form, *got)
    analytic = alpha / (2 * beta) if form == "bon" else math.exp(alpha / beta - 1)
    assert d_star == pytest.approx(analytic, rel=1e-9)
    # It is the maximum of the fitted curve: the derivative is 0 there and the neighbours are lower.
    grid = np.linspace(d_star * 0.5, d_star * 1.5, 201)
    assert study.predict(form, *got, d_star) >= study.predict(form, *got, grid).max() - 1e-12
    # With noise the fit still lands near the truth (least squares over many points).
    noisy = r + np.random.default_rng(0).normal(0, 0.01, r.shape)
    assert study.fit(form, d, noisy) == pytest.approx((alpha, beta), abs=0.05)


def test_fit_needs_two_informative_points_and_leaves_out_d_zero():
    assert study.fit("bon", [0.0, 1.0], [0.0, 0.5]) is None  # one point with d > 0
    assert study.fit("rl", [1.0, 1.0], [0.2, 0.3]) is None  # d log d = 0 at d = 1: beta undetermined
    assert study.fit("bon", [0.0, 1.0, 2.0], [5.0, 0.5, 0.0]) == pytest.approx((1.0, 0.5))  # d=0 point ignored
    assert study.peak("bon", 1.0, -0.1) is None and study.peak("rl", 1.0, 0.0) is None  # no peak: R keeps rising
    with pytest.raises(ValueError, match="form"):
        study.fit("linear", [1, 2], [1, 2])


def test_kl_of_best_of_n():
    assert study.kl_bon(1) == 0.0
    assert study.kl_bon(2) == pytest.approx(math.log(2) - 0.5)
    assert study.kl_bon(64) == pytest.approx(math.log(64) - 63 / 64)
    values = [study.kl_bon(2 ** k) for k in range(7)]
    assert values == sorted(values)
    with pytest.raises(ValueError):
        study.kl_bon(0)


def test_fits_and_curves_from_a_study_are_relative_to_the_sft_model():
    alpha, beta = 0.5, 0.25
    ds = [0.5, 1.0, 1.5, 2.0, 2.5]
    doc = {"sft": {"gold": 0.6, "rm": 0.1, "kl": 0.0},
           "rl": [{"kl_coef": 0.1, "step": i, "kl": d * d, "sqrt_kl": d, "gold": 0.6 + d * (alpha - beta * math.log(d)),
                   "rm": 0.1 + 2 * d} for i, d in enumerate(ds)],
           "bon": [{"n": n, "kl": study.kl_bon(n), "sqrt_kl": math.sqrt(study.kl_bon(n)),
                    "gold": 0.5 + math.sqrt(study.kl_bon(n)) * (alpha - beta * math.sqrt(study.kl_bon(n))),
                    "rm": 0.2 + math.sqrt(study.kl_bon(n))} for n in (1, 2, 4, 8, 16, 32, 64)]}
    fitted = study.fits(doc)
    assert (fitted["rl"]["alpha"], fitted["rl"]["beta"]) == pytest.approx((alpha, beta))
    assert (fitted["bon"]["alpha"], fitted["bon"]["beta"]) == pytest.approx((alpha, beta))
    assert fitted["bon"]["peak_sqrt_kl"] == pytest.approx(alpha / (2 * beta))
    assert fitted["rl"]["peak_sqrt_kl"] == pytest.approx(math.exp(alpha / beta - 1))
    assert fitted["bon"]["rm"]["alpha"] == pytest.approx(1.0) and fitted["bon"]["rm"]["beta"] == pytest.approx(0, abs=1e-9)
    drawn = study.curves(doc)
    assert set(drawn["curves"]) == {"bon", "rl"} and len(drawn["curves"]["rl"]["gold"]) == 100
    assert drawn["points"]["bon"][0]["gold_gain"] == 0.0  # n = 1 is the best-of-n baseline


def test_the_sweep_puts_the_kl_in_the_reward_only():
    """The paper's RL: whatever the preset's exact KL term, the swept beta alone holds the policy (a user's
    `ppo` settings may still set one)."""
    from core.config import PRESETS

    assert PRESETS["quick"]["ppo"].get("kl_loss_coef", 0) > 0  # the preset's term, which the sweep turns off
    config = study.study_config()
    assert study.sweep_config(config, "sft", "rm", 0.01).kl_loss_coef == 0.0
    assert study.sweep_config(study.study_config(ppo={"kl_loss_coef": 0.5}), "sft", "rm", 0.01).kl_loss_coef == 0.5


# ---------------------------------------------------------------------------------------------
# Bad input: a clear ValueError before any work
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, message", [
    ({"kl_coefs": []}, "kl_coefs is empty"),
    ({"kl_coefs": [0.1, float("nan")]}, "finite"),
    ({"kl_coefs": [0.1, float("inf")]}, "finite"),
    ({"kl_coefs": [-0.1]}, ">= 0"),
    ({"kl_coefs": ["abc"]}, "not a number"),
    ({"kl_coefs": [0.1, 0.1]}, "duplicates"),
    ({"ns": [1, 3]}, "powers of two"),
    ({"ns": [0, 2]}, "powers of two"),
    ({"ns": [-4]}, "powers of two"),
    ({"ns": []}, "ns is empty"),
    ({"episodes": 0}, "episodes"),
    ({"eval_prompts": 0}, "eval_prompts"),
    ({"sft_model": "some/dir"}, "both sft_model and reward_model"),
    ({"preset": "huge"}, "unknown preset"),
    ({"ptx_coef": float("nan")}, "ptx_coef"),
    ({"ppo": {"learning_rate": -1}}, "learning_rate"),
    ({"ppo": {"no_such_field": 1}}, "unknown config key"),
    ({"ensemble": 1}, "ensemble must be 0"),
    ({"ensemble": 17}, "ensemble must be 0"),
    ({"ensemble_model": "some/dir"}, "ensemble_model is the ensemble arm"),
    ({"ensemble": 4, "uncertainty_coef": float("nan")}, "uncertainty_coef must be a finite number"),
    ({"ensemble": 4, "uncertainty_coef": -1.0}, "uncertainty_coef must be >= 0"),
    ({"ensemble": 4, "reward_aggregate": "max"}, "reward_aggregate must be one of"),
])
def test_bad_settings_are_refused_before_any_work(changes, message):
    with pytest.raises(ValueError, match=message):
        study.study_config(**changes)


def test_the_cli_and_the_job_manager_refuse_bad_settings(workbench_home, store, tmp_path, capsys):
    from core.cli import main
    from core.runs.jobs import JobManager

    out = tmp_path / "study"
    assert main(["study", "overopt", "--demo", "--output", str(out), "--kl-coefs", "0.1,nan"]) == 2
    assert main(["study", "overopt", "--demo", "--output", str(out), "--ns", "1,2,3"]) == 2
    assert main(["study", "overopt", "--output", str(out)]) == 2
    assert "--demo" in capsys.readouterr().err
    assert not out.exists() and store.list_runs() == []
    jobs = JobManager(store, runs_dir=tmp_path / "runs")
    with pytest.raises(ValueError, match="kl_coefs is empty"):
        jobs.submit("study", {"kl_coefs": []})
    with pytest.raises(ValueError, match="unknown study setting"):
        jobs.submit("study", {"kl_coef": [0.1]})
    assert store.list_runs() == []


# ---------------------------------------------------------------------------------------------
# A tiny study end to end on the bundled model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(sft_dir, rm_dir): the bundled model as the SFT policy and a reward model with a seeded random head."""
    from core.models.loading import load_policy, load_scalar_model, load_tokenizer, pick_device, save_checkpoint

    cpu = pick_device("cpu")
    root = tmp_path_factory.mktemp("study-models")
    tok = load_tokenizer("bundled")
    torch.manual_seed(0)
    sft = save_checkpoint(load_policy("bundled", cpu), tok, root / "sft")
    rm = save_checkpoint(load_scalar_model("bundled", tok.pad_token_id, cpu), tok, root / "rm")
    return str(sft), str(rm)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY_PPO = {"batch_size": 8, "ppo_epochs": 1, "response_length": 8, "device": "cpu"}


def test_tiny_study_writes_study_json_stops_resumes_and_skips_done_points(models, store, tmp_path, monkeypatch,
                                                                          one_thread):
    from core.stages import ppo

    sft, rm = models
    config = study.study_config(kl_coefs=[0.1, 0.01], ns=[2, 4], episodes=16, eval_every=1, eval_prompts=6,
                                bon_prompts=3, sft_model=sft, reward_model=rm, ppo=TINY_PPO)
    assert config["ns"] == [1, 2, 4]  # n = 1, the baseline, is always measured
    calls = []
    real_run = ppo.run

    def counting_run(cfg, *args, **kwargs):
        calls.append(cfg.kl_coef)
        return real_run(cfg, *args, **kwargs)

    monkeypatch.setattr(ppo, "run", counting_run)
    out = tmp_path / "study"

    # First pass: stopped once the second sweep run (beta = 0.01) has made a step.
    events = Events(store, None)

    def stop_in_second_run(done, total, message):
        if "(2/2)" in message and done >= 1:
            events.stop_flag.set()

    events.on_progress = stop_in_second_run
    first = study.run_study(config, out, store, events, name="tiny-study")
    assert store.get_run("tiny-study")["status"] == "stopped"
    assert first["runs"]["0.1"]["done"] and not first["runs"]["0.01"]["done"]
    assert store.get_run("tiny-study-kl0.01")["status"] == "stopped"
    assert calls == [0.1, 0.01]
    assert {p["step"] for p in first["rl"] if p["kl_coef"] == 0.1} == {1, 2}

    # Second pass: the same command resumes; the finished run is not redone.
    doc = study.run_study(config, out, store, Events(store, None))  # the name comes back from study.json
    assert calls == [0.1, 0.01, 0.01]
    assert store.get_run("tiny-study")["status"] == "done"
    assert store.get_run("tiny-study-kl0.01")["status"] == "done"
    saved = json.loads((out / study.STUDY_FILE).read_text())
    assert saved["rl"] == doc["rl"]
    for key in ("config", "sft", "rl", "bon", "fits", "runs", "models"):
        assert key in saved
    assert [(p["kl_coef"], p["step"]) for p in saved["rl"]] == [(0.1, 1), (0.1, 2), (0.01, 1), (0.01, 2)]
    for p in saved["rl"]:
        assert set(p) >= {"kl_coef", "kl", "sqrt_kl", "rm", "gold"}
        assert p["sqrt_kl"] == pytest.approx(math.sqrt(max(p["kl"], 0.0)))
        assert 0.0 <= p["gold"] <= 1.0 and math.isfinite(p["rm"])
    assert [p["n"] for p in saved["bon"]] == [1, 2, 4]
    for p in saved["bon"]:
        assert set(p) >= {"n", "kl", "rm", "gold"} and p["kl"] == pytest.approx(study.kl_bon(p["n"]))
    rms = [p["rm"] for p in saved["bon"]]
    assert rms == sorted(rms)  # the RM's favourite of more answers scores at least as high
    assert set(saved["fits"]) == {"bon", "rl"} and set(saved["fits"]["bon"]) >= {"alpha", "beta"}
    assert saved["sft"]["kl"] == pytest.approx(0.0, abs=1e-6)  # the SFT model against itself
    # The sweep runs are normal runs with the held-out evaluation in their curves (the Monitor page).
    names = {r["name"] for r in store.metrics(["tiny-study-kl0.1"])}
    assert {"heldout_gold", "heldout_reward", "heldout_kl", "reward", "kl"} <= names

    # Third pass: everything is done, nothing runs again.
    study.run_study(config, out, store, Events(store, None))
    assert calls == [0.1, 0.01, 0.01]
    assert json.loads((out / study.STUDY_FILE).read_text())["rl"] == saved["rl"]

    # Other settings in the same directory are refused, not mixed in.
    with pytest.raises(ValueError, match="other settings"):
        study.run_study({**config, "episodes": 32}, out, store, Events(store, None))


def test_a_study_with_an_ensemble_arm_stops_resumes_and_compares_like_with_like(models, store, tmp_path, monkeypatch,
                                                                                one_thread):
    from core.models.ensemble import save_ensemble
    from core.models.loading import load_scalar_model, load_tokenizer, pick_device, save_checkpoint
    from core.stages import ppo

    sft, rm = models
    tok = load_tokenizer(sft)
    torch.manual_seed(1)
    other = save_checkpoint(load_scalar_model("bundled", tok.pad_token_id, pick_device("cpu")), tok, tmp_path / "rm1")
    ensemble = str(save_ensemble(tmp_path / "ensemble", [rm, other]))
    config = study.study_config(kl_coefs=[0.1], ns=[2, 4], episodes=16, eval_every=1, eval_prompts=6, bon_prompts=3,
                                sft_model=sft, reward_model=rm, ppo=TINY_PPO, ensemble=2, reward_aggregate="min",
                                ensemble_model=ensemble)
    calls = []
    real_run = ppo.run

    def counting_run(cfg, *args, **kwargs):
        calls.append((cfg.reward_model, cfg.reward_aggregate))
        return real_run(cfg, *args, **kwargs)

    monkeypatch.setattr(ppo, "run", counting_run)
    sampled = []
    real_sample = study.sample_best_of_n
    monkeypatch.setattr(study, "sample_best_of_n", lambda *a, **kw: sampled.append(1) or real_sample(*a, **kw))
    out = tmp_path / "study"
    events = Events(store, None)

    def stop_in_the_ensemble_run(done, total, message):
        if message.startswith("ensemble, beta") and done >= 1:
            events.stop_flag.set()

    events.on_progress = stop_in_the_ensemble_run
    first = study.run_study(config, out, store, events, name="ens-study")
    assert first["runs"]["0.1"]["done"] and not first["ensemble"]["runs"]["0.1"]["done"]
    assert store.get_run("ens-study-ens-kl0.1")["status"] == "stopped"
    assert calls == [(rm, "mean"), (ensemble, "min")]
    assert len(sampled) == 1  # best-of-n's answers sampled once, scored by both arms

    doc = study.run_study(config, out, store, Events(store, None))  # resumes the ensemble arm's run only
    assert calls == [(rm, "mean"), (ensemble, "min"), (ensemble, "min")]
    assert store.get_run("ens-study")["status"] == "done"
    saved = json.loads((out / study.STUDY_FILE).read_text())
    arm = saved["ensemble"]
    assert set(arm) >= {"models", "sft", "rl", "bon", "runs", "fits"} and set(arm["fits"]) == {"bon", "rl"}
    assert arm["rl"] == doc["ensemble"]["rl"] and [p["step"] for p in arm["rl"]] == [1, 2]
    assert [p["n"] for p in arm["bon"]] == [1, 2, 4]
    # The same answers (same seed) scored by another reward: gold and KL as in the single arm, the RM score the
    # ensemble's minimum, never above its first member (the single RM) on any answer.
    assert arm["sft"]["gold"] == saved["sft"]["gold"] and arm["sft"]["kl"] == pytest.approx(saved["sft"]["kl"])
    assert arm["sft"]["rm"] < saved["sft"]["rm"]
    assert arm["bon"][0]["gold"] == saved["bon"][0]["gold"] and arm["bon"][0]["rm"] < saved["bon"][0]["rm"]
    names = {r["name"] for r in store.metrics(["ens-study-ens-kl0.1"])}
    assert {"ensemble_std", "heldout_gold", "heldout_reward"} <= names
    assert "ensemble_std" not in {r["name"] for r in store.metrics(["ens-study-kl0.1"])}

    study.run_study(config, out, store, Events(store, None))  # everything done: nothing runs again
    assert len(calls) == 3

    # A study without the arm keeps its old settings: an older study.json resumes unchanged.
    assert "ensemble" not in study.study_config(kl_coefs=[0.1])


# ---------------------------------------------------------------------------------------------
# The Study page
# ---------------------------------------------------------------------------------------------


def _synthetic_study(config: dict) -> dict:
    alpha, beta = 0.5, 0.25
    doc = {"config": config, "name": "study-page", "models": None, "runs": {}, "sft": {"gold": 0.6, "rm": 0.0, "kl": 0.0},
           "rl": [{"kl_coef": 0.02, "step": i + 1, "episodes": 64 * (i + 1), "kl": d * d, "sqrt_kl": d,
                   "gold": 0.6 + d * (alpha - beta * math.log(d)), "rm": d} for i, d in enumerate([0.5, 1, 2, 3])],
           "bon": [{"n": n, "kl": study.kl_bon(n), "sqrt_kl": math.sqrt(study.kl_bon(n)), "rm": math.sqrt(study.kl_bon(n)),
                    "gold": 0.6 + math.sqrt(study.kl_bon(n)) * (alpha - beta * math.sqrt(study.kl_bon(n)))}
                   for n in (1, 2, 4, 8, 16, 32, 64)]}
    doc["fits"] = study.fits(doc)
    return doc


def test_study_page_refuses_bad_input_and_draws_a_study(app, workbench_home, tmp_path):
    from core.data.store import Store

    at = app
    at.switch_page("../pages/study.py")
    at.run()
    assert not at.exception, at.exception
    assert "No study yet" in " ".join(str(i.value) for i in at.info)
    at.text_input(key="study_kl_coefs").input("0.1, nan").run()
    next(b for b in at.button if b.label == "Launch study").click().run()
    assert "finite" in " ".join(str(e.value) for e in at.error)
    store = Store(workbench_home / "workbench.db")
    assert store.list_runs() == []

    out = tmp_path / "study-page"
    config = study.study_config()
    (out).mkdir()
    (out / study.STUDY_FILE).write_text(json.dumps(_synthetic_study(config)))
    store.create_run("study-page", "study", config, str(out))
    store.set_run_status("study-page", "done")
    at.run()
    assert not at.exception, at.exception
    charts = at.get("plotly_chart")
    assert len(charts) == 1
    names = [t["name"] for t in json.loads(charts[0].proto.spec)["data"]]
    assert any("RL (PPO KL sweep): gold peak" in n for n in names)
    assert any("best-of-n: gold peak" in n for n in names)
    assert "best-of-n: RM" in names and "RL (PPO KL sweep): gold fit" in names
    assert not any(n.startswith("ensemble") for n in names)

    # A study with an ensemble arm: both arms' points, fits and peaks on the one chart, and in the fits table.
    with_arm = _synthetic_study(config)
    arm = _synthetic_study(config)
    for p in arm["rl"] + arm["bon"]:
        p["gold"] += 0.05 * p["sqrt_kl"]  # the conservative reward's curve stays higher
    arm["fits"] = study.fits(arm)
    with_arm["ensemble"] = {key: arm[key] for key in ("sft", "rl", "bon", "fits")}
    (out / study.STUDY_FILE).write_text(json.dumps(with_arm))
    at.run()
    assert not at.exception, at.exception
    names = [t["name"] for t in json.loads(at.get("plotly_chart")[0].proto.spec)["data"]]
    assert "best-of-n: RM" in names and "ensemble · best-of-n: RM" in names
    assert any(n.startswith("ensemble · RL (PPO KL sweep): gold peak") for n in names)
    methods = at.dataframe[0].value["method"].tolist()
    assert methods == ["best-of-n", "RL (PPO KL sweep)", "ensemble · best-of-n", "ensemble · RL (PPO KL sweep)"]


def test_study_page_takes_a_proxy_reward_and_shows_the_one_a_study_used(app, workbench_home, tmp_path, monkeypatch):
    import time

    import core.runs.jobs
    from core.data.store import Store

    ran = []
    monkeypatch.setattr(core.runs.jobs, "run_study_job", lambda config, store, events, out: ran.append(config) or out)
    at = app
    at.switch_page("../pages/study.py")
    at.run()
    assert at.text_input(key="study_reward__advanced").value == "rm"  # the reward picker, the RM alone by default
    at.text_input(key="study_reward__advanced").input("rm,regex:pattern=(").run()
    assert "does not compile" in " ".join(str(e.value) for e in at.error)
    assert next(b for b in at.button if b.label == "Launch study").disabled
    spec = "rm,length:target=12:weight=-0.1"
    at.text_input(key="study_reward__advanced").input(spec).run()
    assert not at.error, at.error
    assert f"--reward {spec}`" in " ".join(c.value for c in at.caption)
    next(b for b in at.button if b.label == "Launch study").click().run()
    assert not at.exception and not at.error, at.error
    store = Store(workbench_home / "workbench.db")
    (run,) = store.list_runs()
    assert store.get_run(run["id"])["config"]["reward"] == spec
    deadline = time.monotonic() + 30
    while not ran and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ran and ran[0]["reward"] == spec

    # A finished study's page names the proxy it was scored by (its study.json's config).
    out = tmp_path / "study-terms"
    out.mkdir()
    used = "rm,eos:weight=0.5"
    (out / study.STUDY_FILE).write_text(json.dumps(_synthetic_study(study.study_config(reward=used))))
    store.create_run("study-terms", "study", study.study_config(), str(out))
    store.set_run_status("study-terms", "done")
    at.run()
    at.selectbox(key="study_run").set_value("study-terms").run()
    assert not at.exception, at.exception
    assert f"Proxy reward: `{used}`" in " ".join(c.value for c in at.caption)


def test_missing_reused_models_are_refused_before_any_work(workbench_home, store, tmp_path, capsys):
    from core.cli import main
    from core.runs.jobs import JobManager

    missing = str(tmp_path / "nope")
    out = tmp_path / "study"
    assert main(["study", "overopt", "--demo", "--output", str(out), "--sft", missing, "--rm", missing]) == 2
    assert "sft_model" in capsys.readouterr().err
    with pytest.raises(ValueError, match="sft_model"):
        JobManager(store, runs_dir=tmp_path / "runs").submit("study", {"sft_model": missing, "reward_model": missing})
    assert not out.exists() and store.list_runs() == []


# ---------------------------------------------------------------------------------------------
# A reward of terms as the proxy (`rlhf study --reward rm,length:...`): the sweep optimises it, best-of-n
# picks by it, gold stays the demo's labeler
# ---------------------------------------------------------------------------------------------

PROXY = "rm,length:target=3:weight=-0.5"


def test_best_of_n_picks_by_the_rewards_total(one_thread):
    """A proxy of only a length penalty (-1 per token beyond 0): the favourite of a group is its shortest
    answer, so the chosen answers' length can only fall as n doubles (a group of 2n is two groups of n), and
    the proxy is minus that length. Picking by anything else would not give this order."""
    from core.data import demo
    from core.models.loading import load_policy, load_tokenizer, pick_device
    from core.stages.reward_terms import resolve_reward

    tok = load_tokenizer("bundled")
    policy = load_policy("bundled", pick_device("cpu"), dropout=0.0)
    answers = study.sample_best_of_n(policy, tok, demo.heldout_tasks(6), 8, max_new_tokens=12, seed=3)
    points = study.best_of_n(answers, resolve_reward("length:target=0:weight=-1"), [1, 2, 4, 8])
    lengths = [p["terms"]["length"] for p in points]
    assert lengths == sorted(lengths, reverse=True) and lengths[-1] < lengths[0]
    for p in points:
        assert p["rm"] == pytest.approx(-p["terms"]["length"])
        assert 0.0 <= p["gold"] <= 1.0


def test_a_study_with_terms_optimises_and_records_them(models, store, tmp_path, one_thread):
    sft, rm = models
    config = study.study_config(kl_coefs=[0.1], ns=[2], episodes=8, eval_every=1, eval_prompts=4, bon_prompts=2,
                                sft_model=sft, reward_model=rm, ppo=TINY_PPO, reward=PROXY)
    out = tmp_path / "study"
    doc = study.run_study(config, out, store, Events(store, None), name="terms-study")
    saved = json.loads((out / study.STUDY_FILE).read_text())
    assert saved["config"]["reward"] == PROXY
    for point in [saved["sft"], *saved["bon"], *saved["rl"]]:
        # The proxy is the weighted total of the terms, on the same answers.
        assert point["rm"] == pytest.approx(point["terms"]["rm"] - 0.5 * point["terms"]["length"], abs=1e-5)
        assert 0.0 <= point["gold"] <= 1.0
    assert [p["n"] for p in saved["bon"]] == [1, 2] and saved["bon"][1]["rm"] >= saved["bon"][0]["rm"]
    assert len(doc["rl"]) == 1
    # The sweep's PPO run optimised the same terms: each logged beside the total.
    logged = {r["name"] for r in store.metrics(["terms-study-kl0.1"])}
    assert {"reward", "reward/rm", "reward/length"} <= logged
    # Another reward in the same directory is refused, naming what changed.
    with pytest.raises(ValueError, match=r"differs in: reward"):
        study.run_study({**config, "reward": "rm"}, out, store, Events(store, None))


def test_a_study_json_from_before_the_reward_setting_resumes_as_rm(models, store, tmp_path, one_thread):
    """An older study.json has no reward in its config: it was scored by the RM, and resumes with reward rm."""
    sft, rm = models
    config = study.study_config(kl_coefs=[0.1], ns=[2], episodes=8, eval_every=1, eval_prompts=2, bon_prompts=2,
                                sft_model=sft, reward_model=rm, ppo=TINY_PPO)
    out = tmp_path / "old"
    out.mkdir()
    old = {k: v for k, v in config.items() if k != "reward"}
    (out / study.STUDY_FILE).write_text(json.dumps({"config": old, "name": "old", "models": None, "sft": None,
                                                    "rl": [], "bon": [], "runs": {}}))
    with pytest.raises(ValueError, match=r"differs in: reward"):
        study.run_study({**config, "reward": PROXY}, out, store, Events(store, None))
    assert config["reward"] == "rm"


@pytest.mark.parametrize("changes, message", [
    ({"reward": "vibes"}, "unknown reward term 'vibes'"),
    ({"reward": "rm:weight=nan"}, "finite number"),
    ({"ppo": {"reward": "rm"}}, "give the study's reward as its own setting"),
])
def test_a_bad_study_reward_is_refused_before_any_work(changes, message):
    with pytest.raises(ValueError, match=message):
        study.study_config(**{"kl_coefs": [0.1], **changes})


def test_a_reward_column_the_demo_lacks_is_refused_before_models_train(store, tmp_path):
    """A user's function reading a column the demo's prompts lack stops the study before SFT trains."""
    path = tmp_path / "mine.py"
    path.write_text("def score(prompts, completions, solution):\n    return [0.0] * len(prompts)\n")
    config = study.study_config(kl_coefs=[0.1], ns=[2], episodes=8, reward=f"rm,python:{path}:score")
    with pytest.raises(ValueError, match="reads the column 'solution'"):
        study.run_study(config, tmp_path / "s", store, Events(store, None), name="bad-study")
    assert not (tmp_path / "s" / "sft").exists()


def test_the_cli_takes_the_study_reward_and_refuses_a_bad_one(workbench_home, store, tmp_path, capsys):
    from core.cli import main

    out = tmp_path / "study"
    assert main(["study", "overopt", "--demo", "--output", str(out), "--reward", "rm,length:target=x"]) == 2
    assert "length: target must be a number" in capsys.readouterr().err
    assert not out.exists() and store.list_runs() == []
