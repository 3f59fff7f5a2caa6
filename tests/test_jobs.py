"""The job manager with real threads: queueing, cooperative stop, failures, resume after a restart."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import orphan

from core.runs.jobs import JobManager
from core.stages import make_config
from core.paths import atomic_write_text
from core.paths import checkpoints_dir


class FakeStage:
    """A stage runner with the real contract: steps = config.epochs, a checkpoint after every step,
    resume from the last checkpoint, poll the stop flag between steps. `gate` paces the steps so a
    test can act mid-run without sleeping."""

    def __init__(self, fail_at: int | None = None):
        self.fail_at = fail_at
        self.gate = threading.Semaphore(0)
        self.started = threading.Event()
        self.calls: list[tuple[str, int]] = []  # (run_id, first step of this call)

    def __call__(self, config, store, events, output_dir: Path) -> Path:
        ckpts = checkpoints_dir(output_dir)
        done = sorted(int(p.name.split("-")[1]) for p in ckpts.glob("step-*")) if ckpts.is_dir() else []
        start = done[-1] + 1 if done else 0
        self.calls.append((events.run_id, start))
        self.started.set()
        for step in range(start, config.epochs):
            if events.should_stop():
                break
            assert self.gate.acquire(timeout=20), "test never released the next step"
            if step == self.fail_at:
                raise RuntimeError(f"loss is NaN at step {step}")
            events.metrics(step, {"sft_loss": 1.0 / (step + 1)})
            atomic_write_text(ckpts / f"step-{step}" / "weights.txt", str(step))
            events.progress(step + 1, config.epochs, "training")
        atomic_write_text(output_dir / "weights.txt", "final")
        return output_dir

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self.gate.release()

    def advance(self, jobs: JobManager, run_id: str, n: int) -> None:
        """Let `n` steps run and wait until the job has reported them."""
        self.release(n)
        while jobs.get(run_id).done < n:
            threading.Event().wait(0.02)


def manager(store, tmp_path, stage: FakeStage) -> JobManager:
    return JobManager(store, runner=lambda name: stage, runs_dir=tmp_path / "runs")


def test_jobs_run_one_at_a_time_in_fifo_order(store, tmp_path):
    stage = FakeStage()
    jobs = manager(store, tmp_path, stage)
    first = jobs.submit("sft", {"epochs": 2})
    second = jobs.submit("sft", {"epochs": 2})
    third = jobs.submit("sft", {"epochs": 1})
    assert stage.started.wait(10)
    assert [jobs.get(r).status for r in (first, second, third)] == ["running", "queued", "queued"]
    assert store.get_run(second)["status"] == "queued"
    stage.release(5)
    for run_id in (first, second, third):
        assert jobs.wait(run_id, timeout=20).status == "done"
    assert [c[0] for c in stage.calls] == [first, second, third]
    done = jobs.get(first)
    assert (done.done, done.total, done.fraction) == (2, 2, 1.0)
    assert store.get_run(first)["status"] == "done"
    assert [m["value"] for m in store.metrics([first])] == [1.0, 0.5]


def test_stop_mid_run_leaves_a_valid_checkpoint(store, tmp_path):
    stage = FakeStage()
    jobs = manager(store, tmp_path, stage)
    run_id = jobs.submit("sft", {"epochs": 50})
    stage.advance(jobs, run_id, 3)
    jobs.stop(run_id)
    assert jobs.get(run_id).status == "stopping"
    stage.release(1)  # the step in flight finishes, then the stage sees the flag
    job = jobs.wait(run_id, timeout=20)
    assert job.status == "stopped" and job.error is None
    assert store.get_run(run_id)["status"] == "stopped"
    ckpts = sorted(p.name for p in checkpoints_dir(job.output_dir).iterdir())
    assert ckpts[-1] in ("step-2", "step-3") and len(ckpts) in (3, 4)
    assert (Path(job.output_dir) / "weights.txt").read_text() == "final"
    with pytest.raises(ValueError, match="nothing to stop"):
        jobs.stop(run_id)


def test_stop_a_queued_job_drops_it(store, tmp_path):
    stage = FakeStage()
    jobs = manager(store, tmp_path, stage)
    first = jobs.submit("sft", {"epochs": 1})
    queued = jobs.submit("sft", {"epochs": 1})
    jobs.stop(queued)
    assert jobs.get(queued).status == "stopped"
    stage.release(1)
    assert jobs.wait(first, timeout=20).status == "done"
    assert [c[0] for c in stage.calls] == [first]


def test_failure_is_captured_with_its_message_and_the_queue_moves_on(store, tmp_path):
    stage = FakeStage(fail_at=1)
    jobs = manager(store, tmp_path, stage)
    failing = jobs.submit("sft", {"epochs": 3})
    after = jobs.submit("sft", {"epochs": 1})
    stage.release(3)
    job = jobs.wait(failing, timeout=20)
    assert job.status == "failed"
    assert job.error == "RuntimeError: loss is NaN at step 1"
    assert "Traceback" in job.traceback
    assert store.get_run(failing)["error"] == "RuntimeError: loss is NaN at step 1"
    assert jobs.wait(after, timeout=20).status == "done"


def test_bad_config_raises_before_anything_is_written(store, tmp_path):
    jobs = manager(store, tmp_path, FakeStage())
    with pytest.raises(ValueError, match="learning_rate"):
        jobs.submit("sft", {"learning_rate": -1.0})
    with pytest.raises(ValueError, match="unknown stage"):
        jobs.submit("kto", {})
    with pytest.raises(ValueError, match="sft_model is empty"):
        jobs.submit("dpo", {})  # a registered stage: its inputs are checked before a run exists
    with pytest.raises(ValueError, match="invalid run name"):
        jobs.submit("sft", {}, run_id="../escape")
    with pytest.raises(ValueError, match="unknown preset"):
        jobs.submit("pipeline", {"preset": "huge"})
    assert store.list_runs() == []


def test_restart_marks_running_jobs_interrupted_and_resume_continues(store, tmp_path):
    stage = FakeStage()
    jobs = manager(store, tmp_path, stage)
    run_id = jobs.submit("sft", {"epochs": 4})
    queued = jobs.submit("sft", {"epochs": 1})
    stage.advance(jobs, run_id, 2)
    # Simulated server restart: a new manager on the same store while the old thread is "dead"
    # (the fake blocks on its gate, like a process that was killed mid-step).
    orphan(store, run_id, queued)  # their owner, the old server process, is gone
    stage2 = FakeStage()
    restarted = manager(store, tmp_path, stage2)
    job = restarted.get(run_id)
    assert job.status == "interrupted" and "process running it stopped" in job.error
    assert restarted.get(queued).status == "interrupted"
    assert store.get_run(run_id)["status"] == "interrupted"
    with pytest.raises(ValueError, match="nothing to stop"):
        restarted.stop(run_id)

    restarted.resume(run_id)
    stage2.release(2)
    assert restarted.wait(run_id, timeout=20).status == "done"
    assert stage2.calls == [(run_id, 2)]  # picked up after its last checkpoint (step-1)
    assert sorted(m["step"] for m in store.metrics([run_id])) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="only interrupted, stopped, failed"):
        restarted.resume(run_id)
    stage.release(10)  # let the old manager's thread finish so it does not outlive the test


LIVE_CLI_RUN = """
import sys, time
from core.data.store import Store
store = Store(sys.argv[1])
store.create_run("cli-run", "sft", {}, sys.argv[2])
store.set_run_status("cli-run", "running")
print("started", flush=True)
time.sleep(120)
"""


def test_a_server_start_leaves_a_live_cli_run_alone(store, tmp_path):
    """A CLI process writing a run in the same data directory is live: a server (job manager) starting
    beside it neither marks it interrupted nor resumes it; once that process is gone, it is interrupted."""
    cli = subprocess.Popen([sys.executable, "-c", LIVE_CLI_RUN, str(store.path), str(tmp_path / "cli-out")],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert cli.stdout.readline().strip() == "started"
        jobs = manager(store, tmp_path, FakeStage())
        assert jobs.get("cli-run").status == "running"
        assert store.get_run("cli-run")["owner_pid"] == cli.pid
        with pytest.raises(ValueError, match="only interrupted, stopped, failed"):
            jobs.resume("cli-run")
        with pytest.raises(ValueError, match="another live process"):
            store.claim_run("cli-run")
    finally:
        cli.kill()
        cli.wait()
    by_id = {j.run_id: j for j in jobs.jobs()}  # the next look at the runs notices the owner is gone
    assert by_id["cli-run"].status == "interrupted"
    assert store.get_run("cli-run")["status"] == "interrupted"


def test_resume_without_checkpoints_is_a_clear_error(store, tmp_path):
    import shutil

    stage = FakeStage()
    jobs = manager(store, tmp_path, stage)
    run_id = jobs.submit("sft", {"epochs": 10})
    stage.advance(jobs, run_id, 2)
    jobs.stop(run_id)
    stage.release(1)
    job = jobs.wait(run_id, timeout=20)
    shutil.rmtree(checkpoints_dir(job.output_dir))
    shutil.rmtree(job.output_dir)
    with pytest.raises(ValueError, match="no longer exists"):
        jobs.resume(run_id)
    assert jobs.get(run_id).status == "stopped"


def test_real_tiny_sft_job(store, tmp_path):
    jobs = JobManager(store, runs_dir=tmp_path / "runs")
    config = make_config("sft", "quick", {"epochs": 1, "n_demonstrations": 64, "eval_prompts": 8})
    run_id = jobs.submit("sft", config)
    job = jobs.wait(run_id, timeout=120)
    assert job.status == "done", job.traceback
    assert (Path(job.result) / "config.json").is_file()
    assert store.metrics([run_id]), "the stage logged no metrics"
    # The stage's messages reach the store (the Train page shows them), not only a console.
    log = [line["message"] for line in store.run_log(run_id)]
    assert any(line.startswith("epoch 1: epoch=1 val_loss=") for line in log), log


def test_pipeline_job_gets_its_preset_and_stages(store, tmp_path):
    seen = {}

    def pipeline(config, store_, events, output_dir):
        seen.update(config=config, output_dir=output_dir)
        return output_dir

    jobs = JobManager(store, runner=lambda stage: pipeline, runs_dir=tmp_path / "runs")
    run_id = jobs.submit("pipeline", {"preset": "quick", "stages": ["sft", "rm"]})
    assert jobs.wait(run_id, timeout=20).status == "done"
    assert seen["config"] == {"preset": "quick", "stages": ["sft", "rm"]}
    assert seen["output_dir"] == tmp_path / "runs" / run_id / "model"


def test_a_resumed_pipeline_resumes_its_stage_runs_in_place(store, tmp_path, monkeypatch):
    """The pipeline names its stage runs '<pipeline run>-<stage>'; resuming the pipeline takes the same
    stage runs over again (no '-r2' copies, the old ones not left interrupted), and a stage run cannot be
    stopped from the job manager while its pipeline runs it."""
    import core.runs.pipeline

    names = []

    def fake_pipeline(preset, output_dir, store_, events, stages, name, no_ptx_baseline):
        names.append(name)
        store_.start_run(f"{name}-sft", "sft", {}, str(output_dir / "sft"))
        if len(names) == 1:
            raise RuntimeError("killed")
        store_.log_metrics(f"{name}-sft", 2, {"sft_loss": 0.5})
        store_.set_run_status(f"{name}-sft", "done")
        return {}

    monkeypatch.setattr(core.runs.pipeline, "run_pipeline", fake_pipeline)
    jobs = JobManager(store, runs_dir=tmp_path / "runs")
    run_id = jobs.submit("pipeline", {"preset": "quick", "stages": ["sft"]})
    assert jobs.wait(run_id, timeout=20).status == "failed"
    child = f"{run_id}-sft"
    store.log_metrics(child, 1, {"sft_loss": 1.0})
    (tmp_path / "runs" / run_id / "model").mkdir(parents=True)
    jobs.resume(run_id)
    assert jobs.wait(run_id, timeout=20).status == "done"
    assert names == [run_id, run_id]
    runs = {r["id"]: r for r in store.list_runs()}
    assert sorted(runs) == sorted([run_id, child])
    assert runs[child]["status"] == "done"
    # One curve, continued: the step before the crash and the step after it.
    assert [(m["step"], m["value"]) for m in store.metrics([child], ["sft_loss"])] == [(1, 1.0), (2, 0.5)]


def test_a_stage_run_of_a_live_pipeline_is_not_stopped_directly(store, tmp_path, monkeypatch):
    import core.runs.pipeline

    release = threading.Event()

    def fake_pipeline(preset, output_dir, store_, events, stages, name, no_ptx_baseline):
        store_.start_run(f"{name}-sft", "sft", {}, str(output_dir / "sft"))
        release.wait(10)
        store_.set_run_status(f"{name}-sft", "done")
        return {}

    monkeypatch.setattr(core.runs.pipeline, "run_pipeline", fake_pipeline)
    jobs = JobManager(store, runs_dir=tmp_path / "runs")
    run_id = jobs.submit("pipeline", {"preset": "quick", "stages": ["sft"]})
    while not any(r["id"] == f"{run_id}-sft" for r in store.list_runs()):
        time.sleep(0.01)
    try:
        with pytest.raises(ValueError, match="not run by this app's job manager"):
            jobs.stop(f"{run_id}-sft")
        # A second manager (the same process) sees a live owner: the stage run is not "interrupted".
        assert JobManager(store, runs_dir=tmp_path / "runs").get(f"{run_id}-sft").status == "running"
    finally:
        release.set()
    assert jobs.wait(run_id, timeout=20).status == "done"


def test_models_load_while_another_thread_loads():
    """The app loads a chat model while a job loads its own: from_pretrained must not race
    (unguarded, transformers hands one of them meta tensors)."""
    from core.models.loading import load_policy, load_scalar_model, load_tokenizer

    pad = load_tokenizer("bundled").pad_token_id
    errors: list[str] = []

    def load(fn) -> None:
        for _ in range(3):
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(repr(exc))

    threads = [threading.Thread(target=load, args=(lambda: load_policy("bundled"),)),
               threading.Thread(target=load, args=(lambda: load_scalar_model("bundled", pad),))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
