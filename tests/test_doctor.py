"""The run doctor (core/analysis/doctor.py): every check on synthetic metric series, firing on the bad series
and silent on the good one; every suggestion a config field that exists with a value it accepts; the CLI."""

from __future__ import annotations

import json
import statistics

import pytest

from core.analysis import doctor
from core.analysis.doctor import RunData
from core.config import parse_reward
from core.stages import STAGES, make_config


def curve(values, start: int = 1) -> list[tuple[int, float]]:
    return [(start + i, float(v)) for i, v in enumerate(values)]


def ramp(a: float, b: float, n: int = 24) -> list[float]:
    return [a + (b - a) * i / (n - 1) for i in range(n)]


def run(stage: str, config: dict | None = None, summary: dict | None = None, samples=None, **metrics) -> RunData:
    return RunData(f"{stage}-test", stage, make_config(stage, "quick", config or {}).to_dict(),
                   {name: curve(values) for name, values in metrics.items()}, summary or {}, samples or [])


def checks(findings) -> list[str]:
    return [f.check for f in findings]


def assert_suggestion_applies(finding: doctor.Finding, config: dict | None = None) -> None:
    """The field exists in its stage's config and the suggested value passes the config's validation."""
    assert finding.field is not None, finding
    stage = finding.stage
    base = make_config(stage, "quick", config or {}).to_dict()
    changed = STAGES[stage].config_class.from_dict(doctor.with_suggestion(base, finding))
    assert getattr(changed, finding.field) == finding.value


# -- SFT ----------------------------------------------------------------------------------------------


def test_sft_loss_flat_or_rising_is_named_and_a_falling_one_is_not():
    flat = doctor.diagnose(run("sft", sft_loss=ramp(3.0, 2.9)))
    assert checks(flat) == ["sft.loss_flat"] and flat[0].value == pytest.approx(3e-3)
    rising = doctor.diagnose(run("sft", sft_loss=ramp(2.0, 6.0)))
    assert checks(rising) == ["sft.loss_rising"] and rising[0].severity == "error" and rising[0].value == 1e-4
    assert doctor.diagnose(run("sft", sft_loss=ramp(3.0, 1.0))) == []
    for f in flat + rising:
        assert_suggestion_applies(f)


def test_sft_overfitting_names_the_best_epoch_and_the_kept_one():
    bad = run("sft", summary={"epoch": 5, "selected_by": "gold"}, sft_loss=ramp(3.0, 0.2),
              val_loss=[2.0, 1.5, 1.4, 1.7, 2.1], epoch=[1, 2, 3, 4, 5])
    [f] = doctor.diagnose(bad)
    assert (f.check, f.severity, f.field, f.value) == ("sft.overfitting", "warning", "epochs", 3)
    assert "lowest at epoch 3 (1.4)" in f.seen and "rose to 2.1 by epoch 5" in f.seen and "epoch 5 was kept" in f.seen
    assert_suggestion_applies(f)
    kept_best = run("sft", summary={"epoch": 3, "selected_by": "val_loss"}, sft_loss=ramp(3.0, 0.2),
                    val_loss=[2.0, 1.5, 1.4, 1.7, 2.1], epoch=[1, 2, 3, 4, 5])
    assert [f.severity for f in doctor.diagnose(kept_best)] == ["info"]
    healthy = run("sft", sft_loss=ramp(3.0, 0.5), val_loss=[2.0, 1.5, 1.4, 1.38, 1.41], epoch=[1, 2, 3, 4, 5])
    assert doctor.diagnose(healthy) == []


def test_answers_that_do_not_end_are_named_in_sft_and_stage_three():
    [f] = doctor.diagnose(run("sft", eos_rate=[0.4, 0.5]))
    assert f.check == "sft.no_eos" and f.value == 256 and "50%" in f.seen
    assert_suggestion_applies(f)
    assert doctor.diagnose(run("sft", eos_rate=[0.9, 0.97])) == []
    [f] = doctor.diagnose(run("ppo", eos_rate=ramp(0.9, 0.3), reward=ramp(0, 0.1)))
    assert (f.check, f.field, f.value) == ("ppo.missing_eos", "missing_eos_penalty", 2.0)
    assert_suggestion_applies(f)


# -- Reward model -------------------------------------------------------------------------------------


def test_a_reward_model_at_chance_is_an_error_and_a_good_one_is_silent():
    [f] = doctor.diagnose(run("rm", summary={"pairs_all": 1200}, heldout_accuracy=[0.52],
                              rm_accuracy=ramp(0.5, 0.53)))
    assert (f.check, f.severity) == ("rm.chance", "error")
    assert "0.520 on 1200 pairs" in f.seen and "best first" in f.try_
    assert_suggestion_applies(f)
    assert doctor.diagnose(run("rm", heldout_accuracy=[0.95], rm_accuracy=ramp(0.6, 0.95))) == []


def test_a_preference_kind_at_chance_is_information_when_the_rest_is_learned():
    summary = {"accuracy": 0.93, "accuracy_format": 0.99, "pairs_format": 300, "accuracy_arithmetic": 0.51,
               "pairs_arithmetic": 40, "accuracy_rare": 0.2, "pairs_rare": 3}
    [f] = doctor.diagnose(run("rm", summary=summary, heldout_accuracy=[0.93]))
    assert (f.check, f.severity) == ("rm.kind_chance", "info") and "40 pairs that differ in arithmetic" in f.seen
    assert_suggestion_applies(f)


def test_a_collapsing_margin_is_named_and_a_growing_one_is_not():
    [f] = doctor.diagnose(run("rm", rm_margin=ramp(0.1, 2.0, 16) + ramp(2.0, 0.3, 16)))
    assert f.check == "rm.margin_collapse" and f.value == pytest.approx(1.67e-4)
    assert_suggestion_applies(f)
    assert doctor.diagnose(run("rm", rm_margin=ramp(0.1, 2.0, 32))) == []


def test_length_bias_and_scale_drift_of_the_reward_model():
    [f] = doctor.diagnose(run("rm", heldout_length_corr=[0.82]))
    assert f.check == "rm.length_bias" and "+0.82" in f.seen and f.stage == "ppo"
    assert_suggestion_applies(f)
    assert doctor.diagnose(run("rm", heldout_length_corr=[-0.4])) == []
    [f] = doctor.diagnose(run("rm", heldout_score_std=[0.5, 1.1, 2.0]))
    assert (f.check, f.field, f.value) == ("rm.scale_drift", "epochs", 1) and "x4.0" in f.seen
    assert doctor.diagnose(run("rm", heldout_score_std=[1.0, 1.2, 1.1])) == []


# -- Stage 3 ------------------------------------------------------------------------------------------


HEALTHY_PPO = dict(kl=ramp(0.0, 2.0), reward=ramp(-0.5, 0.3), gold=ramp(0.5, 0.6), response_length=ramp(12, 10),
                   entropy=ramp(1.2, 0.9), clip_frac=ramp(0.05, 0.15), approx_kl=ramp(0.001, 0.02),
                   value_loss=ramp(0.5, 0.2), eos_rate=ramp(0.9, 1.0), ptx_loss=ramp(2.0, 1.9),
                   explained_variance=ramp(-0.4, 0.6))


def test_a_healthy_ppo_run_has_no_findings():
    assert doctor.diagnose(run("ppo", **HEALTHY_PPO)) == []


def test_negative_kl_is_named():
    [f] = doctor.diagnose(run("ppo", **{**HEALTHY_PPO, "kl": [-1.2, -0.8] * 12}))
    assert f.check == "ppo.kl_negative" and (f.field, f.value) == ("batch_size", 128)
    assert_suggestion_applies(f)


def test_exploding_kl_blames_the_learning_rate_when_updates_are_clipped_else_the_kl_coef():
    big_steps = {**HEALTHY_PPO, "kl": ramp(0.5, 150), "clip_frac": ramp(0.2, 0.6)}
    found = doctor.diagnose(run("ppo", **big_steps))
    explode = next(f for f in found if f.check == "ppo.kl_explode")
    assert explode.severity == "error" and (explode.field, explode.value) == ("learning_rate", 2e-5)
    assert "ppo.clip_frac" in checks(found)
    weak = doctor.diagnose(run("ppo", {"kl_coef": 0.0005}, **{**HEALTHY_PPO, "kl": ramp(0.5, 40)}))
    assert [(f.check, f.severity, f.field, f.value) for f in weak] == [("ppo.kl_explode", "warning", "kl_coef", 0.1)]
    for f in [explode, *weak]:
        assert_suggestion_applies(f, {"kl_coef": 0.0005})


# The issue's quick GRPO run (reward = gold): per-answer k3 KL 0.6-5 on most steps, 84.8, 39.2 and 119.3 on single
# steps, held-out KL 1.26 at the end.
GRPO_KL = [0.6, 1.1, 1.8, 2.4, 84.8, 2.9, 3.3, 2.1, 39.2, 3.8, 4.4, 3.0, 119.3, 4.1, 5.0, 3.6, 4.2, 2.8, 3.9, 4.6,
           3.1, 4.8, 2.2, 3.5]


def test_grpo_kl_spikes_with_a_modest_heldout_kl_are_explained_as_estimator_noise():
    quiet = run("grpo", {"reward": "gold"}, kl=GRPO_KL, heldout_kl=[1.26], reward=ramp(0.4, 0.7), gold=ramp(0.4, 0.7))
    [f] = doctor.diagnose(quiet)
    assert (f.check, f.severity, f.field) == ("grpo.kl_spikes", "info", None)
    assert "84.8 at step 5, 39.2 at step 9, 119 at step 13" in f.seen and "1.26" in f.seen
    assert f.cause.startswith("estimator noise, not drift")
    drifted = run("grpo", {"reward": "gold"}, kl=GRPO_KL, heldout_kl=[60.0])
    [f] = doctor.diagnose(drifted)
    assert (f.check, f.severity) == ("grpo.kl_spikes", "warning") and "did drift" in f.cause
    assert_suggestion_applies(f)
    assert doctor.diagnose(run("grpo", kl=ramp(0.5, 4.0), heldout_kl=[1.3])) == []


def test_adaptive_kl_far_from_its_target_is_named():
    [f] = doctor.diagnose(run("ppo", {"adaptive_kl": True, "target_kl": 6.0}, **{**HEALTHY_PPO, "kl": ramp(10, 18)}))
    assert (f.check, f.field, f.value) == ("ppo.kl_off_target", "kl_horizon", 2500)
    assert doctor.diagnose(run("ppo", {"adaptive_kl": True, "target_kl": 6.0},
                               **{**HEALTHY_PPO, "kl": ramp(2, 7)})) == []


def test_reward_up_while_gold_falls_is_over_optimisation():
    gamed = {**HEALTHY_PPO, "reward": ramp(-0.5, 1.5), "gold": ramp(0.5, 0.7, 8) + ramp(0.7, 0.45, 16)}
    [f] = doctor.diagnose(run("ppo", {"kl_coef": 0.0005}, **gamed))
    assert (f.check, f.field, f.value) == ("ppo.overoptimisation", "kl_coef", 0.1)
    assert "gold peaked at 0.675 (steps 9-12) and fell to 0.492 (steps 19-24)" in f.seen
    assert_suggestion_applies(f)
    # RLOO and GRPO name their own coefficient.
    [f] = doctor.diagnose(run("rloo", {"beta": 0.05}, reward=gamed["reward"], gold=gamed["gold"]))
    assert (f.check, f.field, f.value) == ("rloo.overoptimisation", "beta", 0.5)
    assert_suggestion_applies(f)



def test_a_group_methods_recorded_answers_reach_the_doctor(store):
    """GRPO and RLOO record their rollouts as PPO does; `load_run` reads the last recorded step's answers for
    all three, so length hacking names the within-step correlation for a GRPO run too."""
    from core.data.rollouts import RolloutRecorder, Sample

    store.create_run("grpo-long", "grpo", {"beta": 0.04}, "")
    recorder = RolloutRecorder(store, "grpo-long", num_steps=24, tokenizer=None)
    answers = [Sample("Say hi.", "hi " * n, r, n, True) for r, n in ((0.1, 10), (0.5, 16), (0.9, 24), (1.0, 24))]
    recorder.write(24, [a.reward for a in answers], answers)
    for step, (reward, length) in enumerate(zip(ramp(-0.5, 1.0), ramp(10, 24)), start=1):
        store.log_metrics("grpo-long", step, {"reward": reward, "response_length": length})
    data = doctor.load_run(store, "grpo-long")
    assert sorted(s["length"] for s in data.samples) == [10, 16, 24, 24] and {s["step"] for s in data.samples} == {24}
    [f] = [f for f in doctor.diagnose(data) if f.check == "grpo.length_hacking"]
    assert "within step 24's kept answers" in f.seen and (f.field, f.value) == ("loss_type", "dr_grpo")

def test_a_heldout_reward_that_does_not_follow_the_training_reward_is_named_on_user_data():
    user = {k: v for k, v in HEALTHY_PPO.items() if k != "gold"}
    [f] = doctor.diagnose(run("ppo", **{**user, "heldout_reward": [-0.6]}))
    assert f.check == "ppo.heldout_reward" and "-0.6" in f.seen
    assert doctor.diagnose(run("ppo", **{**user, "heldout_reward": [0.25]})) == []


def test_length_growing_with_reward_is_length_hacking():
    hacked = {**HEALTHY_PPO, "reward": ramp(-0.5, 1.0), "response_length": ramp(10, 24)}
    samples = [{"step": 24, "reward": r, "length": n} for r, n in ((0.1, 10), (0.5, 16), (0.9, 24), (1.0, 24))]
    [f] = doctor.diagnose(run("ppo", samples=samples, **hacked))
    assert (f.check, f.field, f.value) == ("ppo.length_hacking", "kl_coef", 0.9)
    assert "from 11.5 (steps 1-6) to 22.5 (steps 19-24) tokens" in f.seen and "within step 24's kept answers" in f.seen
    # The length term it suggests is the run's reward plus a term at the starting length, and it parses.
    suggested = f.try_.split("price length directly: reward=")[1]
    assert suggested == "rm,length:target=12:weight=-0.05"
    assert [term.kind for term in parse_reward(suggested)] == ["rm", "length"]
    [f] = doctor.diagnose(run("grpo", reward=hacked["reward"], response_length=hacked["response_length"]))
    assert (f.check, f.field, f.value) == ("grpo.length_hacking", "loss_type", "dr_grpo")
    assert_suggestion_applies(f)


def test_entropy_collapse_update_size_value_loss_and_ptx_drift():
    found = doctor.diagnose(run("ppo", **{**HEALTHY_PPO, "entropy": ramp(1.5, 0.1), "approx_kl": ramp(0.1, 0.3),
                                          "value_loss": ramp(0.1, 1.0), "ptx_loss": ramp(2.0, 3.2)}))
    assert sorted(checks(found)) == ["ppo.approx_kl", "ppo.entropy_collapse", "ppo.ptx_drift", "ppo.value_loss"]
    by = {f.check: f for f in found}
    assert by["ppo.ptx_drift"].value == pytest.approx(0.3) and by["ppo.value_loss"].value == pytest.approx(0.2)
    for f in found:
        assert_suggestion_applies(f)


def test_explained_variance_that_stays_at_or_below_zero_late_is_named():
    """Early steps below 0 are a fresh value head; a last quarter that never rises above 0 is not."""
    [f] = doctor.diagnose(run("ppo", **{**HEALTHY_PPO, "explained_variance": ramp(-0.8, -0.02)}))
    assert (f.check, f.severity, f.field, f.value) == ("ppo.explained_variance", "warning", "vf_coef", 0.2)
    assert "at most -0.02" in f.seen and "steps 19-24" in f.seen
    assert_suggestion_applies(f)
    # One step above 0 in the last quarter: it is climbing out, not stuck.
    climbing = ramp(-0.8, -0.02)[:-1] + [0.05]
    assert doctor.diagnose(run("ppo", **{**HEALTHY_PPO, "explained_variance": climbing})) == []
    # Too few points make no trend.
    assert doctor.diagnose(run("ppo", **{**HEALTHY_PPO, "explained_variance": [-1.0] * 3})) == []


def test_pipeline_report_findings():
    [f] = doctor.diagnose_report({"base": {"pretrain_loss": 1.19}, "sft": {"pretrain_loss": 7.2},
                                  "ppo": {"pretrain_drift": 0.1}})
    assert (f.check, f.stage, f.field) == ("sft.alignment_tax", "ppo", "ptx_coef")
    [f] = doctor.diagnose_report({"base": {"pretrain_loss": 1.19}, "sft": {"pretrain_loss": 2.0},
                                  "ppo_no_ptx": {"pretrain_drift": 1.8}})
    assert f.check == "ppo.pretrain_drift" and "1.8 nats" in f.seen
    assert doctor.diagnose_report({"base": {"pretrain_loss": 1.19}, "sft": {"pretrain_loss": 2.0},
                                   "ppo": {"pretrain_drift": 0.2}}) == []


def test_findings_are_ordered_and_serialised_with_the_fields_the_cli_promises():
    found = doctor.diagnose(run("ppo", **{**HEALTHY_PPO, "kl": ramp(0.5, 150), "clip_frac": ramp(0.2, 0.6)}))
    assert [f.severity for f in found] == sorted((f.severity for f in found), key=doctor.SEVERITIES.index,
                                                 reverse=True)
    row = found[0].to_dict()
    assert {"severity", "check", "seen", "cause", "try", "field", "value", "run"} <= set(row)
    assert row["run"] == "ppo-test" and row["severity"] in doctor.SEVERITIES
    line = doctor.summary_line(found, "ppo-test")
    assert line.startswith("doctor: 1 error, 1 warning (ppo.kl_explode)") and "rlhf doctor ppo-test" in line


def test_a_suggestion_for_a_field_the_run_lacks_is_refused():
    f = doctor.Finding("info", "x", "", "", "", "no_such_field", 1)
    with pytest.raises(ValueError, match="names no field"):
        doctor.with_suggestion({"kl_coef": 0.1}, f)


# -- From the store, through the CLI --------------------------------------------------------------------


def test_rlhf_doctor_reads_a_run_from_the_store(store, capsys):
    from core.cli import main

    config = make_config("ppo", "quick").to_dict()
    store.create_run("ppo-broken", "ppo", config)
    for step, (kl, clip) in enumerate(zip(ramp(0.5, 150), ramp(0.2, 0.6)), 1):
        store.log_metrics("ppo-broken", step, {"kl": kl, "clip_frac": clip})
    assert main(["doctor", "ppo-broken", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["check"] for r in rows] == ["ppo.kl_explode", "ppo.clip_frac"]
    assert rows[0]["field"] == "learning_rate" and rows[0]["value"] == pytest.approx(2e-5)
    assert main(["doctor", "ppo-broken"]) == 0
    text = capsys.readouterr().out
    assert "ERROR   ppo.kl_explode" in text and "try:   learning_rate=2e-05" in text
    assert main(["doctor", "no-such-run"]) == 2
    assert "no run named 'no-such-run'" in capsys.readouterr().err


# -- The pages only display findings ----------------------------------------------------------------------


def test_monitor_shows_the_doctor_per_run_and_relaunches_with_the_suggestion_as_a_new_run(app, workbench_home):
    import time

    from tests.test_pages import db, open_page

    store = db(workbench_home)
    # A tiny PPO run's config (bundled model as policy and RM), so the relaunched run finishes in seconds.
    config = make_config("ppo", None, dict(sft_model="bundled", reward_model="bundled", total_episodes=2, batch_size=2,
                                           ppo_epochs=1, response_length=4, ptx_coef=0.0, eval_prompts=0,
                                           kl_coef=0.0005, device="cpu")).to_dict()
    store.create_run("ppo-weak", "ppo", config)
    for step, kl in enumerate(ramp(0.5, 40), 1):
        store.log_metrics("ppo-weak", step, {"kl": kl, "clip_frac": 0.1})
    store.set_run_status("ppo-weak", "done")
    store.create_run("ppo-fine", "ppo", config)
    for step, kl in enumerate(ramp(0.0, 2.0), 1):
        store.log_metrics("ppo-fine", step, {"kl": kl})
    store.set_run_status("ppo-fine", "done")
    at = open_page(app, "monitor")
    at.multiselect(key="monitor_runs").set_value(["ppo-weak", "ppo-fine"]).run()
    titles = [e.label for e in at.expander]
    assert "Doctor · ppo-weak: 1 warning (ppo.kl_explode)" in titles
    assert "Doctor · ppo-fine: nothing looks wrong" in titles
    assert "KL per answer went from" in " ".join(m.value for m in at.markdown)
    buttons = [b for b in at.button if b.label.startswith("Relaunch")]
    assert [b.label for b in buttons] == ["Relaunch as a new run with kl_coef=0.1"]
    buttons[0].click().run()
    assert not at.exception, at.exception
    new = [r for r in store.list_runs() if r["id"] not in ("ppo-weak", "ppo-fine")]
    assert len(new) == 1 and new[0]["stage"] == "ppo"
    assert store.get_run(new[0]["id"])["config"] == {**config, "kl_coef": 0.1}
    assert store.get_run("ppo-weak")["config"] == config and store.get_run("ppo-weak")["status"] == "done"
    deadline = time.monotonic() + 120
    while store.get_run(new[0]["id"])["status"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert store.get_run(new[0]["id"])["status"] == "done"


def test_home_results_card_lists_the_pipelines_findings(app, workbench_home, tmp_path):
    from tests.test_pages import db
    from tests.test_watch import sample_report, write_pipeline_run

    report = sample_report()
    report["doctor"] = [doctor.Finding("warning", "ppo.overoptimisation", "gold peaked at 0.675 (steps 9-12)", "c",
                                       "kl_coef=0.1", "kl_coef", 0.1, "ppo", "pipeline-a-ppo").to_dict()]
    write_pipeline_run(db(workbench_home), tmp_path, report)
    app.run()
    assert not app.exception, app.exception
    shown = " ".join(m.value for m in app.markdown)
    assert "**Doctor:** 1 warning(s) or error(s), 0 note(s)" in shown
    assert "**ppo.overoptimisation** (pipeline-a-ppo): gold peaked at 0.675 (steps 9-12). *Try:* kl_coef=0.1" in shown
    report["doctor"] = []
    write_pipeline_run(db(workbench_home), tmp_path, report, run_id="pipeline-b")  # the newest report is shown
    app.run()
    assert "**Doctor:** nothing looks wrong in any stage's curves." in " ".join(m.value for m in app.markdown)


# -- End to end on the tiny model: deliberately broken runs, named by the doctor ------------------------------


def test_a_reward_model_trained_on_shuffled_rankings_is_named_at_chance(store, tmp_path, one_torch_thread):
    """Target (c): the same rankings as a learnable RM's, each one's order shuffled."""
    import random

    from core.data import demo
    from core.stages import reward
    from core.stages.events import Events

    rng = random.Random(0)
    rows = demo.synthetic_rankings(240, 4)
    for r in rows:
        rng.shuffle(r["responses"])
    path = tmp_path / "shuffled.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = make_config("rm", "quick", dict(sft_model="bundled", data=str(path), device="cpu"))
    store.create_run("rm-shuffled", "rm", config.to_dict(), str(tmp_path / "rm"))
    reward.run(config, store, Events(store, "rm-shuffled"), tmp_path / "rm")
    found = doctor.diagnose_run(store, "rm-shuffled")
    assert checks(found)[0] == "rm.chance" and found[0].severity == "error"
    accuracy = doctor.load_run(store, "rm-shuffled").last("heldout_accuracy")
    assert accuracy < 0.6 and f"held-out pairwise accuracy {accuracy:.3f} on 144 pairs" in found[0].seen


def test_a_tiny_kl_coef_against_a_misled_reward_model_is_named_over_optimisation(store, tmp_path, one_torch_thread):
    """Target (a) in miniature: kl_coef 0.0005 and a reward model that prefers rambling (the stop-cleanly probe of
    tests/test_ppo.py, negated), which the demo's labeler scores down: the RM reward rises while gold falls."""
    import torch

    from core.data import demo
    from core.models.loading import load_scalar_model, load_tokenizer, pick_device, save_checkpoint
    from core.stages import ppo
    from core.stages.events import Events
    from tests.test_ppo import _stop_cleanly_probe

    tok = load_tokenizer("bundled")
    torch.manual_seed(0)
    rambler = _stop_cleanly_probe(load_scalar_model("bundled", tok.pad_token_id, pick_device("cpu")), tok)
    rambler.score.weight.data.neg_()
    rm = save_checkpoint(rambler, tok, tmp_path / "rm-rambler")
    # Prompts of the kinds the bundled base answers in a familiar shape (tests/test_ppo.py), so gold has room to fall.
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t.prompt}) + "\n" for t in demo.train_tasks(400)
                               if t.kind in ("add", "repeat", "reverse", "last")))
    config = make_config("ppo", None, dict(sft_model="bundled", reward_model=str(rm), prompts=str(prompts),
                                           total_episodes=160, batch_size=16, ppo_epochs=2, learning_rate=1e-3,
                                           response_length=16, kl_coef=0.0005, ptx_coef=0.0, eval_prompts=0,
                                           device="cpu"))
    store.create_run("ppo-beta-tiny", "ppo", config.to_dict(), str(tmp_path / "ppo"))
    ppo.run(config, store, Events(store, "ppo-beta-tiny"), tmp_path / "ppo")
    found = {f.check: f for f in doctor.diagnose_run(store, "ppo-beta-tiny")}
    assert "ppo.overoptimisation" in found, list(found)
    f = found["ppo.overoptimisation"]
    assert (f.field, f.value) == ("kl_coef", 0.1)
    data = doctor.load_run(store, "ppo-beta-tiny")
    gold, reward = [v for _, v in data.series("gold")], [v for _, v in data.series("reward")]
    assert max(gold) - statistics.fmean(gold[-2:]) > 0.05 and statistics.fmean(reward[-2:]) > reward[0]
