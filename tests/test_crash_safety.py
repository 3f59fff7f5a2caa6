"""Crash safety (issue 6, promise 1): a PPO run killed with SIGKILL, three times, at three kinds of
moment, loses nothing committed, never leaves a half-written checkpoint where a loader would find
it, shows as interrupted, and resumes from its last checkpoint with steps and curves continuing.

The trials, on one run (tiny: batch 4, 8-token answers, a checkpoint every 3 steps):
  1. the `rlhf ppo` CLI process, killed between checkpoints (mid-steps, a random moment);
  2. a server process (a JobManager resuming the run), killed while a checkpoint directory is
     being written (its `.step-N.tmp-*` directory exists);
  3. another server process, killed just after a checkpoint was recorded (random delay);
then this process resumes the run to the end. After every kill: every row committed before it
is still in the store; every `step-N` directory is complete and loads with plain transformers;
temp directories are never listed; a new JobManager marks the run interrupted.
The seed of the random kill moments is printed (RLHF_CRASH_SEED reproduces a run).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from core.stages import resume
from core.runs.jobs import JobManager
from core.paths import checkpoints_dir

ROOT = Path(__file__).resolve().parent.parent
RUN = "crash"
STEPS, SAVE_EVERY, BATCH = 18, 3, 4
SETTINGS = dict(sft_model="bundled", reward_model="bundled", total_episodes=STEPS * BATCH, batch_size=BATCH,
                response_length=8, ppo_epochs=1, ptx_coef=0.5, ptx_batch_size=2, learning_rate=1e-4,
                save_every=SAVE_EVERY, kl_coef=0.1, device="cpu")
# A "server" process: a fresh JobManager over the store (which marks the killed run interrupted),
# resuming the run in its job thread as the app would after a restart.
SERVER = """
import sys, torch
torch.set_num_threads(1)
from core.runs.jobs import JobManager
from core.data.store import Store
jobs = JobManager(Store())
assert jobs.get(sys.argv[1]).status == "interrupted", jobs.get(sys.argv[1])
jobs.resume(sys.argv[1])
job = jobs.wait(sys.argv[1])
print("finished", job.status, job.error)
"""


def _rows(db_path: Path) -> dict[str, set]:
    db = sqlite3.connect(db_path)
    try:
        return {t: set(db.execute(f"SELECT * FROM {t}").fetchall())
                for t in ("prompts", "demonstrations", "rankings", "metrics")}
    finally:
        db.close()


def _metric_keys(rows: set) -> set:
    return {(run, step, name) for run, step, name, _ in rows}


class Trial:
    def __init__(self, home: Path, store, output: Path):
        self.home, self.store, self.output = home, store, output
        self.env = {**os.environ, "RLHF_WORKBENCH_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": str(ROOT)}
        self.verified: set[str] = set()
        self.log: list[str] = []

    def start(self, argv: list[str]) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, *argv], cwd=self.home, env=self.env,
                                stdout=subprocess.DEVNULL, stderr=open(self.home / "stderr.log", "ab"))

    def wait_for(self, proc: subprocess.Popen, condition, what: str, timeout: float = 240):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = condition()
            if found:
                return found
            if proc.poll() is not None:
                raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}: "
                                     + (self.home / "stderr.log").read_text()[-2000:])
            time.sleep(0.002)
        raise AssertionError(f"timed out waiting for {what}")

    def kill(self, proc: subprocess.Popen, phase: str) -> dict[str, set]:
        before = _rows(self.store.path)  # everything committed up to now (the run may add more)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        self.log.append(f"{phase}: killed at step {self.store.last_step(RUN)}, "
                        f"checkpoints on disk {self.step_dirs()}, temp dirs {self.temp_dirs()}")
        self.check_after_kill(before)
        return before

    def step_dirs(self) -> list[int]:
        ckpts = checkpoints_dir(self.output)
        return sorted(int(p.name[5:]) for p in ckpts.glob("step-*")) if ckpts.is_dir() else []

    def temp_dirs(self) -> list[str]:
        ckpts = checkpoints_dir(self.output)
        return sorted(p.name for p in ckpts.iterdir() if p.name.startswith(".")) if ckpts.is_dir() else []

    def check_after_kill(self, before: dict[str, set]) -> None:
        after = _rows(self.store.path)
        for table in ("prompts", "demonstrations", "rankings", "metrics"):
            assert before[table] <= after[table], f"{table} lost rows committed before the kill"
        # Every step-N directory is complete: it loads with plain transformers and has its state.
        for step in self.step_dirs():
            path = checkpoints_dir(self.output) / f"step-{step}"
            if str(path) in self.verified:
                continue
            assert json.loads((path / resume.STATE_FILE).read_text())["step"] == step
            torch.load(path / resume.TRAINING_FILE, weights_only=True)
            AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
            self.verified.add(str(path))
        listed = self.store.list_checkpoints()
        assert all(not Path(c["path"]).name.startswith(".") and Path(c["path"]).is_dir() for c in listed)
        assert {str(Path(c["path"])) for c in listed} <= self.verified
        latest = resume.latest_checkpoint(self.output, "step")
        assert latest is None or str(latest) in self.verified
        # A new manager over the same store (a restarted server) marks the run interrupted.
        job = JobManager(self.store, runs_dir=self.home / "runs").get(RUN)
        assert job.status == "interrupted" and "resume it" in job.error


def test_sigkill_at_three_moments_then_resume(store, workbench_home):
    seed = int(os.environ.get("RLHF_CRASH_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    print(f"\ncrash-safety seed {seed} (RLHF_CRASH_SEED={seed} reproduces the kill moments)")
    # Labelers' work already in the store: none of it may be lost.
    pid = store.add_prompt("What is 2 plus 2?")
    store.add_demonstration("What is 2 plus 2?", "The answer is 4.")
    store.add_ranking(pid, ["The answer is 4.", "4", "The answer is 5."], labeler="ana")
    output = workbench_home / "runs" / RUN / "model"
    trial = Trial(workbench_home, store, output)
    ckpts = checkpoints_dir(output)

    # 1. The CLI run, killed mid-steps: after the first checkpoint, before the second.
    cli = trial.start(["-m", "core.cli", "ppo", "--name", RUN, "--output", str(output)]
                      + [a for k, v in SETTINGS.items() for a in ("--set", f"{k}={v}")])
    trial.wait_for(cli, lambda: store.last_step(RUN) >= SAVE_EVERY + 1 and SAVE_EVERY in trial.step_dirs(),
                   "step 4")
    time.sleep(rng.uniform(0, 0.3))
    trial.kill(cli, "mid-steps (CLI)")
    assert store.get_run(RUN)["status"] == "interrupted"
    assert trial.step_dirs()[-1] >= SAVE_EVERY

    # 2. A server resuming it, killed while a checkpoint directory is being written.
    known = set(trial.temp_dirs())
    server = trial.start(["-c", SERVER, RUN])
    caught = trial.wait_for(server, lambda: [p for p in trial.temp_dirs() if ".tmp-" in p and p not in known],
                            "a checkpoint write")
    trial.kill(server, "during a checkpoint write (server)")
    writing = int(caught[0].split(".")[1][5:])  # ".step-6.tmp-<pid>-xxxx" -> 6
    assert writing not in trial.step_dirs() or str(ckpts / f"step-{writing}") in trial.verified

    # 3. Another server, killed just after a checkpoint was recorded in the store.
    seen = {c["step"] for c in store.list_checkpoints()}
    server = trial.start(["-c", SERVER, RUN])
    trial.wait_for(server, lambda: {c["step"] for c in store.list_checkpoints()} - seen, "a new checkpoint")
    time.sleep(rng.uniform(0, 0.05))
    before_last = trial.kill(server, "after a checkpoint (server)")
    resume_step = resume.latest_checkpoint(output, "step")
    resume_step = int(resume_step.name[5:])
    assert resume_step > SAVE_EVERY  # progress survived three kills

    # Resume here to the end; the step counter and curves continue from the last checkpoint.
    jobs = JobManager(store, runs_dir=workbench_home / "runs")
    jobs.resume(RUN)
    job = jobs.wait(RUN, timeout=600)
    assert job.status == "done", job.traceback
    print("\n".join(trial.log) + f"\nresumed in-process from step {resume_step}")

    after = _rows(store.path)
    for table in ("prompts", "demonstrations", "rankings"):
        assert before_last[table] <= after[table]
    assert _metric_keys(before_last["metrics"]) <= _metric_keys(after["metrics"])
    rewards = store.metrics([RUN], ["reward"])
    assert [m["step"] for m in rewards] == list(range(1, STEPS + 1))  # no gap, no duplicate
    # The optimizer took exactly one step per PPO step across four processes: each resume
    # continued from a checkpoint's optimizer state, none restarted from zero.
    final = torch.load(ckpts / f"step-{STEPS}" / resume.TRAINING_FILE, weights_only=True)["optimizer"]
    assert next(iter(final["state"].values()))["step"].item() == STEPS
    assert json.loads((ckpts / f"step-{STEPS}" / resume.STATE_FILE).read_text())["episodes"] == STEPS * BATCH
    AutoModelForCausalLM.from_pretrained(output, use_safetensors=True)
    # Leftovers of the killed writers were swept when their checkpoint was written again.
    assert trial.temp_dirs() == []
    listed = [c for c in store.list_checkpoints() if c["run_id"] == RUN]
    assert listed and all(Path(c["path"]).is_dir() and not Path(c["path"]).name.startswith(".") for c in listed)


def test_a_cli_run_with_a_relative_output_resumes_from_a_server_elsewhere(store, workbench_home, tmp_path,
                                                                        monkeypatch):
    """`rlhf sft --output out/sft` interrupted (Ctrl-C, or killed): the app's server, started in
    another directory, must find the run's checkpoints to resume it."""
    import core.stages.sft
    from core import cli

    def interrupted(config, store, events, output_dir):
        events.metrics(1, {"sft_loss": 1.0})
        (checkpoints_dir(output_dir) / "epoch-1").mkdir(parents=True)
        raise KeyboardInterrupt

    def finish(config, store, events, output_dir):
        assert (checkpoints_dir(output_dir) / "epoch-1").is_dir(), output_dir
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        return Path(output_dir)

    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    monkeypatch.setattr(core.stages.sft, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["sft", "--name", "rel", "--output", "out/sft", "--set", "epochs=1"])
    assert store.get_run("rel")["status"] == "interrupted"

    monkeypatch.chdir(workbench_home)  # the server runs from somewhere else
    jobs = JobManager(store, runner=lambda stage: finish, runs_dir=workbench_home / "runs")
    jobs.resume("rel")
    job = jobs.wait("rel", timeout=30)
    assert job.status == "done", job.error
    assert Path(job.result) == tmp_path / "project" / "out" / "sft"
