"""The round strip on Home and Monitor (workbench/rounds_view.py) from a rounds run's DIR/rounds.json, Home's
policy count over every stage-3 method, and the Train page's rounds form refusing bad input; AppTest, no
training."""

from __future__ import annotations

import json

from core.data.store import Store
from core.runs.rounds import round_rows

STATE = {
    "name": "rounds-a", "overrides": {}, "state": "waiting for labels", "round": 1,
    "config": {"rounds": 3, "method": "ppo", "labeler": "team"},
    "sft": {"model": "bundled", "gold": 0.76},
    "rounds": [{"round": 0, "gold": 0.9, "kl_to_sft": 1.2, "rankings": 250, "rm_accuracy_after": 0.97},
               {"round": 1, "rankings": None}],
}


def write_rounds(home, tmp_path) -> Store:
    store = Store(home / "workbench.db")
    out = tmp_path / "rounds-a"
    out.mkdir()
    (out / "rounds.json").write_text(json.dumps(STATE))
    store.create_run("rounds-a", "rounds", {"rounds": STATE["config"]}, str(out))
    store.set_run_status("rounds-a", "stopped")
    store.create_run("rounds-a-round-0-ppo", "ppo", {})
    store.set_run_status("rounds-a-round-0-ppo", "done")
    for step in range(3):
        store.log_metrics("rounds-a-round-0-ppo", step, {"reward": 0.1 * step})
    return store


def test_round_rows_say_where_each_round_stands():
    rows = round_rows(STATE)
    assert [r["round"] for r in rows] == ["SFT", 0, 1, 2]
    assert [r["state"] for r in rows] == ["done", "done", "waiting for labels", "planned"]
    assert rows[1]["gold"] == 0.9 and rows[1]["rm_accuracy_after"] == 0.97 and rows[2]["gold"] is None


def test_home_and_monitor_show_the_round_strip(app, workbench_home, tmp_path):
    store = write_rounds(workbench_home, tmp_path)
    grpo = tmp_path / "grpo-model"
    grpo.mkdir()
    store.add_checkpoint("grpo-a", "grpo", grpo)  # a GRPO policy is a policy: Home counts it
    app.run()
    assert not app.exception, app.exception
    assert [m.value for m in app.metric][3] == "1"
    page = " | ".join(str(m.value) for m in app.markdown)
    assert "**Rounds rounds-a** · ppo · labeler `team` · `waiting for labels`" in page
    assert "**round 1**  \n`waiting for labels`" in page and "gold 0.90" in page

    app.switch_page("../pages/monitor.py")
    app.run()
    app.multiselect(key="monitor_runs").set_value(["rounds-a"]).run()
    assert not app.exception, app.exception
    assert "**Rounds rounds-a**" in " | ".join(str(m.value) for m in app.markdown)
    # The rounds run stands for its stage runs, as a pipeline does: round 0's PPO curve is drawn.
    names = [t["name"] for c in app.get("plotly_chart") for t in json.loads(c.proto.spec)["data"]]
    assert "rounds-a-round-0-ppo" in names
    # The round strip's chart keeps SFT's point on a category axis: "SFT", "0", ... as written.
    [strip] = [json.loads(c.proto.spec) for c in app.get("plotly_chart")
               if any(t["name"] == "gold" for t in json.loads(c.proto.spec)["data"])]
    assert strip["layout"]["xaxis"]["type"] == "category" and strip["data"][0]["x"][0] == "SFT"


def test_train_rounds_form_refuses_a_team_without_accounts(app, workbench_home):
    app.switch_page("../pages/train.py")
    app.run()
    app.selectbox(key="rounds_labeler").set_value("team").run()
    next(b for b in app.button if b.label == "Run rounds").click().run()
    assert "needs labeler accounts" in " | ".join(str(e.value) for e in app.error)
    assert Store(workbench_home / "workbench.db").list_runs() == []


def rounds_form(app, **values):
    app.switch_page("../pages/train.py")
    app.run()
    for key, value in values.items():
        widget = app.number_input(key=key) if key in ("rounds_n", "rounds_prompts", "rounds_episodes",
                                                      "rounds_sample_temperature") else app.selectbox(key=key)
        widget.set_value(value)
        app.run()
    assert not app.exception, app.exception
    return app


def test_train_rounds_form_takes_the_prompt_pool_temperature_and_a_reward_labeler(app, workbench_home, monkeypatch):
    import time

    import core.runs.jobs

    ran = []
    monkeypatch.setattr(core.runs.jobs, "run_rounds_job", lambda config, store, events, out: ran.append(config) or out)
    store = Store(workbench_home / "workbench.db")
    questions = [f"How many letters has the word number {i}?" for i in range(6)]  # not demo prompts: no answers
    store.add_prompts(questions)
    app = rounds_form(app, rounds_n=2, rounds_prompts=3, rounds_labeler="reward", rounds_pool="store",
                      rounds_sample_temperature=0.7, rounds_policy_init="sft")
    assert app.text_input(key="rounds_reward__advanced").value == "exact"  # the reward picker, a verifier
    run = next(b for b in app.button if b.label == "Run rounds")
    run.click().run()
    # The labeler's term reads the prompts' answer column, which the store's prompts lack: refused, nothing queued.
    assert "'answer'" in " | ".join(str(e.value) for e in app.error)
    assert store.list_runs() == []

    store.update_prompts({}, deleted=[p["id"] for p in store.list_prompts()])
    store.add_prompts(questions, extras=[{"answer": str(i + 1)} for i in range(6)])
    next(b for b in app.button if b.label == "Run rounds").click().run()
    assert not app.exception and not app.error, app.error
    (run_id,) = [r["id"] for r in store.list_runs()]
    rounds = store.get_run(run_id)["config"]["rounds"]
    assert (rounds["prompts"], rounds["labeler"], rounds["sample_temperature"]) == ("store", "reward:exact", 0.7)
    assert (rounds["rounds"], rounds["prompts_per_round"], rounds["policy_init"]) == (2, 3, "sft")
    assert ("rlhf rounds --demo --preset quick --rounds 2 --method ppo --labeler reward:exact --prompts store "
            "--prompts-per-round 3 --episodes-per-round 512 --policy-init sft --set sample_temperature=0.7 "
            "--output runs/rounds") in " | ".join(c.value for c in app.caption)
    deadline = time.monotonic() + 30
    while not ran and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ran and ran[0]["rounds"]["labeler"] == "reward:exact"


def test_train_rounds_form_refuses_a_reward_model_term_as_labeler_and_a_file_pool_that_is_missing(app, tmp_path):
    app = rounds_form(app, rounds_labeler="reward")
    app.text_input(key="rounds_reward__advanced").input("rm,exact").run()
    assert "a reward model ranks as labeler rm:PATH" in " | ".join(str(e.value) for e in app.error)
    assert next(b for b in app.button if b.label == "Run rounds").disabled
    app.selectbox(key="rounds_labeler").set_value("rm").run()
    assert "Pick the reward model" in " | ".join(str(e.value) for e in app.error)  # none in the store yet
    assert next(b for b in app.button if b.label == "Run rounds").disabled
    app.selectbox(key="rounds_labeler").set_value("simulated").run()
    app.selectbox(key="rounds_pool").set_value("file").run()
    app.text_input(key="rounds_prompts_file").input(str(tmp_path / "missing.jsonl")).run()
    next(b for b in app.button if b.label == "Run rounds").click().run()
    assert "missing.jsonl" in " | ".join(str(e.value) for e in app.error)
