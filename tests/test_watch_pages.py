"""Issue 11 through the app (AppTest): Home's results card and final-model counts, a Monitor that
follows a pipeline, the rollout browser, and model text shown as text on Chat and Rank."""

from __future__ import annotations

import json

import pytest
import torch

from core.analysis import results
from core.data import demo, rollouts
from core.data.store import Store
from core.models.loading import load_tokenizer
from core.textsafe import escape_html
from tests.test_pages import db, open_page
from tests.test_watch import fake_rollout, sample_report, write_pipeline_run

ATTACK = '![x](http://evil.example/a.png) <img src="http://evil.example/b.png">'


def full_report() -> dict:
    """sample_report with the alternative third stages, each model with its own correctness, and each gold
    the labeler's weighted sum of its parts (as gold_eval measures it), so the stacked gold chart must add
    up to it."""
    report = sample_report()
    for i, key in enumerate(("dpo", "grpo", "rloo")):
        report[key] = {**report["sft"], "kl_to_sft": 0.4 + 0.1 * i, "pretrain_loss": 1.1 + 0.2 * i}
        report["timings_s"][key] = 60.0 + 10 * i
    for i, key in enumerate(("base", *results.COMPARED)):
        report[key]["correct"] = 0.1 * (i + 1)
        report[key]["gold"] = sum(weight * report[key][part] for part, _, weight in results.GOLD_PARTS)
    return report


def figure(at, key: str) -> dict:
    """The plotly figure of the chart with this widget key."""
    return json.loads(next(c for c in at.get("plotly_chart") if c.proto.id.endswith(key)).proto.spec)


def test_home_results_card_shows_the_reports_numbers(app, workbench_home, tmp_path):
    store = db(workbench_home)
    report = full_report()
    write_pipeline_run(store, tmp_path, report)
    store.create_run("pipeline-a-sft", "sft", {})
    for name in ("pipeline-a-sft-epoch-1", "pipeline-a-sft"):
        (tmp_path / name).mkdir()
        store.add_checkpoint(name, "sft", tmp_path / name, run_id="pipeline-a-sft")
    app.run()
    assert not app.exception, app.exception
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["SFT models"] == "1"  # the final model, not its epoch checkpoint
    assert metrics["Gold: SFT → PPO-ptx"] == f"{report['ppo']['gold']:.2f}"
    assert metrics["RM held-out accuracy"] == "0.86"
    assert metrics["KL to SFT (nats/answer)"] == "1.25"  # the one KL measurement, not PPO's training-time kl
    # The comparison table: a row per method, each cell the report's number.
    (table,) = (t.value for t in app.table)
    labels = dict(results.MODELS)
    assert list(table.index) == [labels[k] for k in ("base", "sft", "ppo", "ppo_no_ptx", "dpo", "grpo", "rloo")]
    for key, label in labels.items():
        row = table.loc[label]
        assert (row["gold"], row["correct"], row["format"], row["concise"], row["held-out pretraining loss"]) == (
            report[key]["gold"], report[key]["correct"], report[key]["template"], report[key]["concise"],
            report[key]["pretrain_loss"])
        if key not in ("base", "sft"):
            assert row["KL to SFT"] == report[key]["kl_to_sft"] and row["wall time (s)"] == report["timings_s"][key]
            assert row["time vs PPO-ptx"] == report["timings_s"][key] / report["timings_s"]["ppo"]
    assert table.loc["SFT", "KL to SFT"] == 0.0
    # The charts have bars with the report's numbers: an empty frame (no traces, no points) fails here.
    split = figure(app, "results_gold")
    assert [t["name"] for t in split["data"]] == ["correct", "format", "concise"]
    for i, (key, label) in enumerate(labels.items()):
        assert all(t["y"][i] == label for t in split["data"])
        assert sum(t["x"][i] for t in split["data"]) == pytest.approx(report[key]["gold"])
    rm = figure(app, "results_rm")["data"][0]
    assert rm["y"] == ["all pairs", "format differs", "correctness differs"] and rm["x"] == [0.86, 1.0, 0.5]
    tax = figure(app, "results_tax")["data"][0]
    assert tax["y"] == list(labels.values()) and tax["x"] == [report[k]["pretrain_loss"] for k in labels]


def log_stage(store: Store, run_id: str, stage: str, status: str, metrics: dict[str, list[float]],
              config: dict | None = None) -> None:
    store.create_run(run_id, stage, config or {})
    for name, values in metrics.items():
        for step, value in enumerate(values, 1):
            store.log_metrics(run_id, step, {name: value})
    store.set_run_status(run_id, status)


def chart_titles(at) -> list[str]:
    return [json.loads(c.proto.spec)["layout"].get("title", {}).get("text", "") for c in at.get("plotly_chart")]


def test_monitor_follows_a_pipeline_and_new_stages_join(app, workbench_home):
    store = db(workbench_home)
    store.create_run("pipeline-x", "pipeline", {"preset": "quick", "stages": ["sft", "rm", "ppo"]}, "/nowhere")
    store.set_run_status("pipeline-x", "running")
    log_stage(store, "pipeline-x-sft", "sft", "done", {"sft_loss": [2.0, 1.5, 1.0]})
    log_stage(store, "pipeline-x-rm", "rm", "running", {"rm_loss": [0.7, 0.5], "rm_accuracy": [0.6, 0.8]})
    at = open_page(app, "monitor")
    assert at.multiselect(key="monitor_runs").value == ["pipeline-x"]  # the running pipeline, whole
    titles = chart_titles(at)
    assert {"sft_loss", "rm_loss", "rm_accuracy"} <= set(titles)
    timeline = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert [t["name"] for t in timeline["data"]] == ["sft: sft_loss", "rm: rm_loss", "rm: rm_accuracy"]
    assert len(timeline["layout"]["shapes"]) >= 2  # shaded stages, a boundary between them
    # PPO starts after the page opened: the next refresh shows it, the selection unchanged.
    log_stage(store, "pipeline-x-ppo", "ppo", "running", {"reward": [0.1, 0.2, 0.3], "kl": [0.0, 0.1, 0.2],
                                                          "heldout_gold": [0.8], "reward/exact": [0.0, 0.5, 1.0]})
    at.run()
    assert not at.exception, at.exception
    assert {"reward", "kl"} <= set(chart_titles(at))
    assert "reward/exact" in chart_titles(at)  # each reward term's curve beside the total, without "All metrics"
    assert "heldout_gold" not in chart_titles(at)  # one point: a number, not a lone dot
    assert {m.label: m.value for m in at.metric}["heldout_gold"] == "0.800"
    # Smoothing: the raw curve stays faint behind the EMA.
    at.slider(key="monitor_smoothing").set_value(0.6).run()
    reward = next(json.loads(c.proto.spec) for c in at.get("plotly_chart")
                  if json.loads(c.proto.spec)["layout"].get("title", {}).get("text") == "reward")
    assert len(reward["data"]) == 2 and reward["data"][0]["opacity"] == 0.25


def test_rollout_browser_shows_samples_as_escaped_text(app, workbench_home):
    store = db(workbench_home)
    log_stage(store, "ppo-r", "ppo", "done", {"reward": [0.1, 0.2]},
              config={"reward": "rm,length:target=3"})  # its terms' weights: 1 and -0.05
    tokenizer = load_tokenizer("bundled")
    prompts = [t.prompt for t in demo.train_tasks(8)]
    recorder = rollouts.RolloutRecorder(store, "ppo-r", num_steps=2, tokenizer=tokenizer)
    for step in (1, 2):
        rollout = fake_rollout(8, 5, step, prompts, tokenizer)
        rollout.texts[0] = ATTACK
        rollout.response_ids[0, :3] = torch.tensor(tokenizer(" <img src=x>", add_special_tokens=False)["input_ids"][:3])
        rollout.rm_members = torch.stack([rollout.reward_scores - 0.25, rollout.reward_scores + 0.25])  # an ensemble of 2
        # reward = rm - 0.05 * length beyond 3 tokens: each answer's terms beside its total
        rollout.term_scores = {"rm": rollout.reward_scores + 0.05 * 2, "length": torch.full((8,), 2.0)}
        recorder.record(step, prompts, rollout)
    at = open_page(app, "monitor")
    assert at.selectbox(key="rollout_run").value == "ppo-r"
    bodies = [h.proto.body for h in at.get("html")]
    assert len(bodies) == 8  # the step's kept answers
    assert all("<img" not in b for b in bodies) and any("&lt;" in b for b in bodies)
    assert any("reward +1.000 · members +0.75 +1.25" in b for b in bodies)  # each member's score of the answer
    assert any("reward +1.000 · members +0.75 +1.25" in b and "terms: rm +1.1 · length +2 ×-0.05" in b for b in bodies)
    assert {"Reward, step 2 (the whole batch)", "Reward over training"} <= set(chart_titles(at))
    at.toggle(key="rollout_follow").set_value(False).run()
    at.select_slider(key="rollout_step_ppo-r").set_value(1).run()
    assert "Reward, step 1 (the whole batch)" in chart_titles(at)


def test_rollout_browser_shows_a_grpo_runs_answers_with_terms_advantage_and_no_kl(app, workbench_home, tmp_path):
    """A real (tiny) GRPO run's sample: each answer with its reward, its terms with their weights and its group
    advantage; KL, which GRPO does not measure, reads "—", never "+0.00"."""
    from tests.test_reward_terms import run_group_method

    store = db(workbench_home)
    run_id, _ = run_group_method("grpo", tmp_path, load_tokenizer("bundled"), store, total_episodes=8)
    at = open_page(app, "monitor")
    assert at.selectbox(key="rollout_run").value == run_id
    kept = rollouts.samples(store, run_id, 2)
    bodies = [h.proto.body for h in at.get("html")]
    assert len(bodies) == len(kept) == 4 and "Reward, step 2 (the whole batch)" in chart_titles(at)
    for sample, body in zip(kept, bodies):  # highest reward first, as the page lists them
        terms = sample["terms"]
        assert body.startswith(f'<div style="font-size: 0.85rem; color: #555">reward {sample["reward"]:+.3f}')
        assert f"advantage {sample['advantage']:+.2f} · KL — · {sample['length']} tokens" in body
        assert (f"terms: contains {terms['contains']:+.3g} · eos {terms['eos']:+.3g} ×0.5 · "
                f"length {terms['length']:+.3g} ×-0.1") in body
        assert escape_html(sample["response"]) in body
    assert "No per-token KL" in " ".join(c.value for c in at.caption)


def test_chat_and_rank_show_model_text_as_text(app, workbench_home, monkeypatch):
    import core.models.generate as generate

    monkeypatch.setattr(generate, "stream", lambda *args, **kwargs: iter(["![x](http://evil.example", "/a.png)"]))
    at = open_page(app, "chat")
    at.chat_input[0].set_value("Show me a picture").run()
    assert not at.exception, at.exception
    shown = " ".join(m.value for m in at.chat_message[1].markdown)
    assert "\\!\\[x\\]" in shown and "![x](" not in shown
    assert at.session_state["chat_history"][-1]["content"] == "![x](http://evil.example/a.png)"

    store = db(workbench_home)
    store.add_prompt("What is 3 plus 4?")
    at = open_page(at, "rank")
    monkeypatch.setattr(generate, "sample", lambda *a, **k: type("S", (), {"texts": [ATTACK, "The answer is 7."]})())
    next(b for b in at.button if b.label == "Sample answers").click().run()
    assert not at.exception, at.exception
    answers = [m.value for m in at.markdown if m.value.startswith("**A.**") or m.value.startswith("**B.**")]
    assert len(answers) == 2 and all("![" not in a and "<img" not in a.replace("\\<img", "") for a in answers)


def test_the_doctor_reads_a_finished_run_once_and_a_running_one_on_every_refresh(app, workbench_home, monkeypatch):
    """A finished run's curves cannot change: its findings are kept per (run, status, last update); a running
    run's are read again on every refresh; a resumed run that finishes again is read again."""
    from core.analysis import doctor

    store = db(workbench_home)
    log_stage(store, "ppo-done", "ppo", "done", {"kl": [0.1, 0.2]})
    log_stage(store, "ppo-live", "ppo", "running", {"kl": [0.1, 0.2]})
    reads: list[str] = []
    load_run = doctor.load_run
    monkeypatch.setattr(doctor, "load_run", lambda db_, run_id: reads.append(run_id) or load_run(db_, run_id))
    at = open_page(app, "monitor")
    at.multiselect(key="monitor_runs").set_value(["ppo-done", "ppo-live"]).run()
    at.run()
    assert not at.exception, at.exception
    assert reads.count("ppo-done") == 1
    assert reads.count("ppo-live") >= 3  # page load, the selection, the refresh
    store.set_run_status("ppo-done", "running")  # resumed ...
    store.set_run_status("ppo-done", "done")  # ... and finished again: a new last update
    at.run()
    assert reads.count("ppo-done") == 2
