"""`report_to`: the store's metrics also in TensorBoard event files or a local trackio database, written
from the one metrics path (core/stages/events.py), with clear messages for a bad value before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from core import config
from core.stages import sinks
from core.cli import main
from core.data.store import Store
from core.stages import make_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parent.parent


def store_curves(store: Store, run_id: str) -> dict[str, list[tuple[int, float]]]:
    curves = defaultdict(list)
    for row in store.metrics([run_id]):
        curves[row["name"]].append((row["step"], row["value"]))
    return dict(curves)


def test_tiny_sft_with_tensorboard_writes_the_stores_metrics(workbench_home, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(["sft", "--preset", "quick", "--name", "sft-tb", "--output", str(tmp_path / "sft"),
                 "--set", "epochs=1", "--set", "n_demonstrations=64", "--set", "batch_size=16",
                 "--set", "eval_prompts=8", "--set", "report_to=tensorboard"]) == 0
    store = Store()
    expected = store_curves(store, "sft-tb")
    assert {"sft_loss", "gold", "val_loss"} <= set(expected) and len(expected["sft_loss"]) == 4  # 64 / 16 steps
    logdir = workbench_home / "tensorboard" / "sft-tb"
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(expected)
    for name, points in expected.items():
        written = [(e.step, e.value) for e in events.Scalars(name)]
        # TensorBoard keeps float32: the store's number, rounded once, at the same step.
        assert written == [(step, float(np.float32(value))) for step, value in points], name
    assert any(f"tensorboard --logdir {logdir.parent}" in line["message"] for line in store.run_log("sft-tb"))


# Run in a fresh interpreter: trackio fixes its directory when first imported, and this test must not
# write to the user's trackio directory. Any outgoing connection fails the run and is counted.
TRACKIO_RUN = """
import json, socket, sys
connections = []
real_connect = socket.socket.connect
def connect(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        connections.append(str(address))
        raise OSError("nothing leaves the machine")
    return real_connect(sock, address)
socket.socket.connect = connect
from core.data.store import Store
from core.stages.events import Events
from core.stages import make_config
store = Store()
store.create_run("ppo-tr", "ppo", make_config("ppo", "quick", {"report_to": "trackio"}).to_dict())
events = Events(store, "ppo-tr")
for step, values in json.loads(sys.argv[1]).items():
    events.metrics(int(step), values)
events.close()
from trackio.sqlite_storage import SQLiteStorage
rows = SQLiteStorage.get_logs("rlhf-workbench", "ppo-tr")
print(json.dumps({"rows": rows, "db": str(SQLiteStorage.get_project_db_path("rlhf-workbench")),
                  "connections": connections, "log": [r["message"] for r in store.run_log("ppo-tr")]}))
"""


def test_trackio_writes_a_local_database_and_opens_no_connection(workbench_home, tmp_path):
    pytest.importorskip("trackio")
    env = {k: v for k, v in os.environ.items() if k not in config.TRACKIO_REMOTE_ENV}
    env["TRACKIO_DIR"] = str(tmp_path / "trackio")
    logged = {1: {"reward": 0.25, "kl": 0.0}, 2: {"reward": 0.5, "kl": 0.125}, 3: {"reward": 0.75, "kl": 0.5}}
    done = subprocess.run([sys.executable, "-c", TRACKIO_RUN, json.dumps(logged)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    assert Path(result["db"]).parent == tmp_path / "trackio" and Path(result["db"]).is_file()
    assert {row["step"]: {k: row[k] for k in ("reward", "kl")} for row in result["rows"]} == logged
    assert result["connections"] == []
    assert any("trackio show --project rlhf-workbench" in line for line in result["log"])


def test_bad_report_to_is_refused_before_any_work(workbench_home, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sft"
    assert main(["sft", "--preset", "quick", "--set", "report_to=wandb", "--output", str(out)]) == 2
    assert "report_to must be one of none, tensorboard, trackio, got 'wandb'" in capsys.readouterr().err
    # Not installed: the message names the extra to install.
    find_spec = config.importlib.util.find_spec
    monkeypatch.setattr(config.importlib.util, "find_spec",
                        lambda name: None if name == "tensorboard" else find_spec(name))
    assert main(["dpo", "--preset", "quick", "--set", "report_to=tensorboard", "--output", str(out)]) == 2
    assert "needs the tensorboard package" in (err := capsys.readouterr().err) and config.INSTALL in err
    # trackio pointed at a Space would upload: refused, whatever the stage.
    monkeypatch.setenv("TRACKIO_SPACE_ID", "someone/space")
    with pytest.raises(ValueError, match="TRACKIO_SPACE_ID would make trackio send the metrics off this machine"):
        make_config("grpo", "quick", {"report_to": "trackio", "reward": "gold"})
    assert not out.exists() and Store().counts()["runs"] == 0
