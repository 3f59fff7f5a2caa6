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


def test_train_rounds_form_refuses_a_team_without_accounts(app, workbench_home):
    app.switch_page("../pages/train.py")
    app.run()
    app.selectbox(key="rounds_labeler").set_value("team").run()
    next(b for b in app.button if b.label == "Run rounds").click().run()
    assert "needs labeler accounts" in " | ".join(str(e.value) for e in app.error)
    assert Store(workbench_home / "workbench.db").list_runs() == []
