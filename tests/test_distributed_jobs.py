"""Subprocess jobs (2 CPU processes, gloo) through the job manager: Stop and resume of a PPO job, and a
server restart (a new JobManager on the same store) while a 2-process job runs: the new manager leaves
it running, can stop it through its stop file, and resumes it on 2 processes with the same accelerate
config, read back from the store."""

from __future__ import annotations

import json
import os
import sqlite3
import time

import pytest
import yaml
from transformers import AutoModelForCausalLM

from core.data.store import Store
from core.runs.jobs import JobManager
from core.runs.launch import CONFIGS_DIR, free_port
from core.stages import make_config
from core.stages.resume import STATE_FILE, checkpoint_path, latest_checkpoint

# 1,000 PPO steps of 8 episodes (4 per rank): a run that only ends when it is stopped.
PPO = dict(sft_model="bundled", reward_model="bundled", batch_size=8, total_episodes=8000, response_length=8,
           ptx_batch_size=4, eval_prompts=0, device="cpu")
# 200 demonstrations, 10 held out: 190 training rows at a global batch of 8 give 24 steps an epoch
# (range(0, 189, 8)), two epochs; a checkpoint after each epoch.
SFT = dict(epochs=2, n_demonstrations=200, batch_size=8, eval_prompts=0, device="cpu")
SFT_STEPS_PER_EPOCH = 24


@pytest.fixture
def home(workbench_home, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return workbench_home


def steps_of(store: Store, run_id: str, name: str) -> list[int]:
    return [m["step"] for m in store.metrics([run_id], [name])]


def wait_for_step(store: Store, manager: JobManager, run_id: str, step: int, timeout: float = 300) -> None:
    """Until the run has logged `step` (while the manager still shows it running)."""
    deadline = time.monotonic() + timeout
    while store.last_step(run_id) < step:
        job = manager.get(run_id)
        assert job.status == "running", (job.status, job.error)
        assert time.monotonic() < deadline, f"run {run_id} logged no step {step} in {timeout} s"
        time.sleep(0.1)


def log_of(store: Store, run_id: str) -> list[str]:
    return [line["message"] for line in store.run_log(run_id, limit=500)]


def test_ppo_job_on_two_processes_stops_and_resumes_its_step_counter(home, store, tmp_path):
    manager = JobManager(store, runs_dir=tmp_path / "runs")
    run_id = manager.submit("ppo", make_config("ppo", "quick", PPO), processes=2)
    wait_for_step(store, manager, run_id, 1)
    manager.stop(run_id)
    asked_at = store.last_step(run_id)
    job = manager.wait(run_id, timeout=300)
    assert job.status == "stopped", job.error
    steps = steps_of(store, run_id, "reward")
    assert steps == list(range(1, len(steps) + 1))  # one row per step: rank 1 wrote none of its own
    last = steps[-1]
    assert asked_at <= last <= asked_at + 1  # the step in flight at most, then both ranks stopped
    # The stop-time checkpoint is the latest step checkpoint, written once, and loads.
    assert latest_checkpoint(job.output_dir, "step") == checkpoint_path(job.output_dir, "step", last)
    assert AutoModelForCausalLM.from_pretrained(checkpoint_path(job.output_dir, "step", last)) is not None
    state = json.loads((checkpoint_path(job.output_dir, "step", last) / STATE_FILE).read_text())
    assert (state["step"], state["episodes"], state["processes"]) == (last, 8 * last, 2)
    assert store.get_run(run_id)["status"] == "stopped"

    # Resume: the same run on 2 processes again, picking up after the stopped step.
    manager.resume(run_id)
    assert manager.get(run_id).processes == 2
    wait_for_step(store, manager, run_id, last + 1)
    manager.stop(run_id)
    job = manager.wait(run_id, timeout=300)
    assert job.status == "stopped", job.error
    assert f"resuming PPO after step {last} from {checkpoint_path(job.output_dir, 'step', last)}" in log_of(store, run_id)
    resumed = steps_of(store, run_id, "reward")
    assert resumed == list(range(1, len(resumed) + 1)) and resumed[-1] >= last + 1
    state = json.loads((latest_checkpoint(job.output_dir, "step") / STATE_FILE).read_text())
    assert (state["step"], state["episodes"]) == (resumed[-1], 8 * resumed[-1])  # episodes counted on


def test_a_restarted_server_leaves_a_two_process_job_running_stops_it_and_resumes_it_on_two(home, store, tmp_path):
    # The shipped DDP config on a free port (another test's launch on this machine must not collide).
    accelerate = tmp_path / "ddp.yaml"
    accelerate.write_text(yaml.safe_dump({**yaml.safe_load((CONFIGS_DIR / "ddp.yaml").read_text()),
                                          "main_process_port": free_port()}))
    first = JobManager(store, runs_dir=tmp_path / "runs")
    run_id = first.submit("sft", make_config("sft", "quick", SFT), processes=2, accelerate_config=accelerate)
    # Into the second epoch: the first epoch's checkpoint is on disk.
    wait_for_step(store, first, run_id, SFT_STEPS_PER_EPOCH + 1)

    restarted = JobManager(store, runs_dir=tmp_path / "runs")  # a server restart, the job still running
    job = restarted.get(run_id)
    assert job.status == "running" and not job.owned  # not marked interrupted: its rank 0 is alive
    assert store.get_run(run_id)["status"] == "running"
    assert store.get_run(run_id)["owner_pid"] != os.getpid()  # its rank 0, a process of its own, owns it
    assert (job.processes, job.accelerate_config) == (2, str(accelerate.resolve()))
    # Its progress, read from the output file the first server's subprocess writes: past the first epoch.
    assert job.total == 2 * SFT_STEPS_PER_EPOCH and SFT_STEPS_PER_EPOCH < job.done <= job.total
    listed = next(j for j in restarted.jobs() if j.run_id == run_id)
    assert listed.total == job.total and listed.done >= job.done
    restarted.stop(run_id)
    asked_at = store.last_step(run_id)
    assert restarted.get(run_id).status in ("stopping", "stopped")
    # The run ends stopped from the child's side; the first manager (still alive in this test) agrees.
    assert first.wait(run_id, timeout=300).status == "stopped"
    assert restarted.wait(run_id, timeout=60).status == "stopped"
    steps = steps_of(store, run_id, "sft_loss")
    assert steps == list(range(1, len(steps) + 1))
    stopped_at = steps[-1]
    assert SFT_STEPS_PER_EPOCH < stopped_at <= asked_at + 1 < 2 * SFT_STEPS_PER_EPOCH  # well before the end

    third = JobManager(store, runs_dir=tmp_path / "runs")  # and another restart: the launch request is on record
    job = third.get(run_id)
    assert (job.status, job.processes, job.accelerate_config) == ("stopped", 2, str(accelerate.resolve()))
    third.resume(run_id)
    assert (third.get(run_id).processes, third.get(run_id).accelerate_config) == (2, str(accelerate.resolve()))
    job = third.wait(run_id, timeout=300)
    assert job.status == "done", job.error
    run = store.get_run(run_id)
    assert run["status"] == "done" and run["owner_pid"] != os.getpid()  # run by a child process again
    assert run["launch"]["processes"] == 2 and run["launch"]["accelerate_config"] == str(accelerate.resolve())
    # Resumed after epoch 1 (the second epoch's rows are rewritten from its first step): one curve, 1..48.
    assert f"resuming SFT after epoch 1 (step {SFT_STEPS_PER_EPOCH})" in log_of(store, run_id)
    assert steps_of(store, run_id, "sft_loss") == list(range(1, 2 * SFT_STEPS_PER_EPOCH + 1))
    state = json.loads((checkpoint_path(job.output_dir, "epoch", 2) / STATE_FILE).read_text())
    assert (state["epoch"], state["step"], state["processes"]) == (2, 2 * SFT_STEPS_PER_EPOCH, 2)
    assert AutoModelForCausalLM.from_pretrained(job.output_dir) is not None


# -- the record, without processes ------------------------------------------------------------------


def test_a_database_from_before_launch_requests_opens_and_its_runs_run_on_one_process(workbench_home, tmp_path):
    path = workbench_home / "workbench.db"
    with sqlite3.connect(path) as db:  # the runs table as the first release wrote it
        db.execute("""CREATE TABLE runs (id TEXT PRIMARY KEY, stage TEXT NOT NULL, status TEXT NOT NULL,
                      config TEXT NOT NULL, output_dir TEXT, error TEXT, created_at REAL NOT NULL,
                      updated_at REAL NOT NULL)""")
        db.execute("INSERT INTO runs VALUES ('old', 'sft', 'stopped', '{}', '/tmp/old', NULL, 1.0, 1.0)")
    store = Store(path)
    assert store.get_run("old")["launch"] is None
    job = JobManager(store, runs_dir=tmp_path / "runs").get("old")
    assert (job.status, job.processes, job.accelerate_config) == ("stopped", 1, None)


def test_only_runs_with_a_recorded_stop_file_are_stopped_from_another_manager(store, tmp_path):
    stop_file = tmp_path / "runs" / "sub" / "stop"
    # A subprocess run another manager launched (its live owner here: this process) ...
    store.create_run("sub", "sft", {}, str(tmp_path / "sub"),
                     launch={"processes": 2, "accelerate_config": None, "stop_file": str(stop_file)})
    store.set_run_status("sub", "running")
    # ... the same, resumed from a terminal (`rlhf sft --name cli --processes 2`): it polls no stop file ...
    store.create_run("cli", "sft", {}, str(tmp_path / "cli"),
                     launch={"processes": 2, "accelerate_config": None, "stop_file": str(tmp_path / "cli-stop")})
    store.set_run_status("cli", "stopped")
    store.start_run("cli", "sft", {}, str(tmp_path / "cli"))
    assert store.get_run("cli")["launch"] == {"processes": 2, "accelerate_config": None}
    # ... and a run in its owner's process (a CLI run on one process, a pipeline's stage).
    store.create_run("thread", "sft", {}, str(tmp_path / "thread"))
    store.set_run_status("thread", "running")

    manager = JobManager(store, runs_dir=tmp_path / "elsewhere")
    manager.stop("sub")
    assert stop_file.exists()
    assert manager.get("sub").status == "stopping" and store.get_run("sub")["status"] == "stopping"
    manager.stop("sub")  # asked already: nothing more to do
    for run_id in ("cli", "thread"):
        with pytest.raises(ValueError, match="not run by this app's job manager"):
            manager.stop(run_id)
        assert store.get_run(run_id)["status"] == "running"
    assert not (tmp_path / "cli-stop").exists()
    # A run that ended meanwhile keeps its final status.
    store.set_run_status("sub", "stopped")
    assert not store.set_run_status("sub", "stopping", only_from=("running",))
    assert store.get_run("sub")["status"] == "stopped"
    for run_id in ("sub", "cli", "thread"):  # leave no "active" run behind for the heartbeat thread
        store.set_run_status(run_id, "stopped")


SERVER = """
import sys, time
from core.data.store import Store
from core.runs.jobs import JobManager
from core.stages import make_config
jobs = JobManager(Store(sys.argv[1]), runs_dir=sys.argv[2])
config = make_config("sft", "quick", dict(epochs=1, n_demonstrations=1200, batch_size=8, eval_prompts=0, device="cpu"))
print(jobs.submit("sft", config, processes=2), flush=True)
time.sleep(600)
"""


def test_a_two_process_job_outlives_a_killed_server_and_the_next_one_stops_it(home, store, tmp_path):
    """The server that launched the job is killed (SIGKILL, no clean-up): its ranks run on (their output
    does not go through a pipe to the dead server), and the next server stops them through the stop file."""
    import subprocess
    import sys
    from pathlib import Path

    server = subprocess.Popen([sys.executable, "-c", SERVER, str(store.path), str(tmp_path / "runs")],
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
    restarted = None
    try:
        run_id = server.stdout.readline().strip()
        assert run_id.startswith("sft-"), server.wait(timeout=60)
        deadline = time.monotonic() + 300
        while store.last_step(run_id) < 2:
            assert store.get_run(run_id)["status"] in ("queued", "running") and time.monotonic() < deadline
            time.sleep(0.1)
        server.kill()
        server.wait()
        reached = store.last_step(run_id)
        restarted = JobManager(store, runs_dir=tmp_path / "elsewhere")  # the stop file is found from the record
        job = restarted.get(run_id)
        assert (job.status, job.processes) == ("running", 2)
        # The ranks go on without the server that read their output: the run logs another step.
        deadline = time.monotonic() + 300
        while store.last_step(run_id) <= reached + 1:
            assert restarted.get(run_id).status == "running" and time.monotonic() < deadline
            time.sleep(0.1)
        restarted.stop(run_id)
        asked_at = store.last_step(run_id)
        job = restarted.wait(run_id, timeout=300)
        assert job.status == "stopped", job.error
        steps = steps_of(store, run_id, "sft_loss")
        assert steps == list(range(1, len(steps) + 1)) and reached + 2 <= steps[-1] <= asked_at + 1
        assert AutoModelForCausalLM.from_pretrained(job.output_dir) is not None
        assert any(line.startswith("rlhf-progress ") for line in
                   (tmp_path / "runs" / run_id / "output.log").read_text().splitlines())
    finally:
        server.kill()
        if restarted is not None and store.get_run(run_id)["status"] in ("running", "stopping"):
            restarted.stop(run_id)  # never leave ranks behind
            restarted.wait(run_id, timeout=300)


def test_a_stop_file_reaches_the_stage_a_run_of_runs_is_running(tmp_path):
    """A pipeline, rounds or study job run as a subprocess is stopped by its stop file: the stage it is running
    sees the file too (Events.child), so it stops at its next step rather than after training to its end."""
    from core.runs.pipeline import run_stage
    from core.stages.events import Events

    store = Store(tmp_path / "workbench.db")
    stop = tmp_path / "stop"
    store.start_run("parent", "pipeline", {}, str(tmp_path))
    parent = Events(store, "parent", stop_file=stop)
    stop.touch()  # Stop pressed while the run of runs starts its stage
    ran = run_stage(parent, store, "parent-sft", "sft", make_config("sft", "quick", {}), tmp_path / "sft")
    assert ran.stopped and ran.events.stopped and store.get_run("parent-sft")["status"] == "stopped"
    assert steps_of(store, "parent-sft", "sft_loss") == []  # not one training step after the Stop
