"""Background jobs: the stages (and the demo pipeline) run in threads owned by one manager per
process, never by a page session, so closing the browser does not stop a run.

One training job runs at a time (a laptop CPU or a single GPU has room for one); the others wait
in a FIFO queue. Stop is cooperative: the manager sets the job's stop flag, the stage polls it
between steps and leaves a valid checkpoint. The store is the record: every status change is
written there, and every active run carries its owner's process id and a heartbeat. A new
process (a server restart) marks `interrupted` only the runs whose owner is gone, never one a
live CLI process is writing, and can resume them in place — the same run name, stage, config
and output directory; the runners pick up from their last checkpoint.

A job on several processes (`processes > 1` or an accelerate config) cannot be a thread: it runs as
`rlhf <stage> --processes N` in a subprocess (core/runs/launch.py), tracked the same way. The manager
hands the run over to the subprocess's rank 0, whose heartbeat keeps it live (a server restart leaves
it running); progress comes back through the subprocess's output, written to a file (a pipe would
break when the server goes, and the run with it); Stop creates a stop file that every rank acts on
at the same step. The launch request (processes, accelerate config, and the stop file once
launched) is recorded with the run, so a restarted server resumes the run on as many processes with
the same config, and can stop a subprocess run that the previous server launched and that still
runs: it creates the recorded stop file and the run's rank 0 records `stopped` itself. A run another
live process runs in-process (a CLI run, a pipeline's stage) has no stop file and is stopped there.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from core.config import PRESETS, ConfigMixin
from core.data.store import ACTIVE_STATUSES as ACTIVE
from core.data.store import Store
from core.stages.events import Events
from core.paths import checkpoints_dir, data_home, validate_name
from core.stages import RECIPE, STAGES, check_models, get_stage

JOB_STAGES = (*STAGES, "pipeline", "study", "eval", "rounds")
DICT_CONFIG_JOBS = ("pipeline", "study", "eval", "rounds")  # jobs whose config is a plain dict, not a stage config
PIPELINE_STAGES = tuple(STAGES)
RESUMABLE = ("interrupted", "stopped", "failed")
OUTPUT_FILE = "output.log"  # a subprocess job's output, beside its stop file (`_run_subprocess`)

Runner = Callable[..., Path]


def default_runner(stage: str) -> Runner:
    """Stage runners from the registry; the pipeline is adapted to the same call shape."""
    if stage == "study":
        return run_study_job
    if stage == "rounds":
        return run_rounds_job
    if stage == "eval":  # the Evaluate page's table (core/analysis/eval_table.py)
        from core.analysis.eval_table import run as run_eval

        return run_eval
    if stage != "pipeline":
        return get_stage(stage).runner

    def run_pipeline(config: dict, store: Store, events: Events, output_dir: Path) -> Path:
        from core.runs.pipeline import run_pipeline as run

        # Each stage is its own run "<pipeline run>-<stage>"; a resumed pipeline resumes those same
        # runs in place (the stages continue from their checkpoints under output_dir).
        # `no_ptx_baseline=True`: the one-click demo also trains PPO without the ptx term, so Home's
        # results card shows what ptx does to the alignment tax (about a minute more on 2 cores).
        run(config["preset"], output_dir, store, events, stages=tuple(config["stages"]), name=events.run_id,
            no_ptx_baseline=True, **pipeline_test_options())
        return Path(output_dir)

    return run_pipeline


def run_study_job(config: dict, store: Store, events: Events, output_dir: Path) -> Path:
    """The over-optimisation study (core/runs/study.py) as a job: its SFT/RM and sweep runs are runs of their own
    ("<study run>-sft", "<study run>-kl<beta>"); a resumed study skips what DIR/study.json has done."""
    from core.runs.study import run_study

    run_study(config, output_dir, store, events, name=events.run_id)
    return Path(output_dir)


def run_rounds_job(config: dict, store: Store, events: Events, output_dir: Path) -> Path:
    """Iterated RLHF (core/runs/rounds.py) as a job: config {"rounds": RoundsConfig fields, "overrides": per stage};
    its stages are runs of their own ("<rounds run>-round-<r>-rm", ...); a resumed job resumes where its
    DIR/rounds.json stood."""
    from core.config import RoundsConfig
    from core.runs.rounds import run_rounds

    run_rounds(RoundsConfig.from_dict(config["rounds"]), output_dir, store, events, config.get("overrides") or {})
    return Path(output_dir)


def rounds_job_config(store: Store, rounds: dict, overrides: dict | None = None) -> dict:
    """A rounds job's config, checked as the CLI checks it (core/runs/rounds.check_rounds) before it is queued."""
    from core.config import RoundsConfig
    from core.runs.rounds import check_rounds

    config = RoundsConfig.from_dict(rounds)
    overrides = {k: v for k, v in (overrides or {}).items() if v}
    check_rounds(config, store, overrides)
    return {"rounds": config.to_dict(), "overrides": overrides}


PIPELINE_OVERRIDES_ENV = "RLHF_WORKBENCH_PIPELINE_OVERRIDES"


def pipeline_test_options() -> dict:
    """For tests only (the browser test): the app's pipeline job reads per-stage config overrides from
    the environment, e.g. RLHF_WORKBENCH_PIPELINE_OVERRIDES='{"sft": {"epochs": 1}, "eval_prompts": 16}',
    so a real server runs a tiny demo pipeline. Unset (always, in normal use) it changes nothing."""
    raw = os.environ.get(PIPELINE_OVERRIDES_ENV)
    if not raw:
        return {}
    values = json.loads(raw)
    options = {"overrides": {k: v for k, v in values.items() if k in PIPELINE_STAGES}}
    if "eval_prompts" in values:
        options["eval_prompts"] = int(values["eval_prompts"])
    return options


def pipeline_config(preset: str = "quick", stages=RECIPE) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    stages = list(stages)
    if not stages or any(s not in PIPELINE_STAGES for s in stages):
        raise ValueError(f"pipeline stages must be some of {', '.join(PIPELINE_STAGES)}, got {stages}")
    return {"preset": preset, "stages": stages}


@dataclass
class Job:
    """What a page shows about one run. Progress lives in memory; status also lives in the store."""

    run_id: str
    stage: str
    config: dict
    output_dir: str
    status: str
    done: int = 0
    total: int = 0
    message: str = ""
    error: str | None = None
    traceback: str | None = None
    result: str | None = None  # the final model directory, once done
    owned: bool = False  # queued or running in this manager (a pipeline's stage runs are not)
    processes: int = 1  # > 1 (or an accelerate config): run under `accelerate launch` in a subprocess
    accelerate_config: str | None = None
    stop_flag: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total > 0 else 0.0

    def snapshot(self) -> "Job":
        return dataclasses.replace(self, config=dict(self.config))


def new_run_id(stage: str) -> str:
    return f"{stage}-{_dt.datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:4]}"


class JobManager:
    """Queue, run, stop and resume stage jobs.

    `runner` maps a stage name to a function `(config, store, events, output_dir) -> Path`
    (tests inject fakes); `runs_dir` is where app runs write (`<runs_dir>/<run_id>/model`).
    """

    def __init__(self, store: Store, runner: Callable[[str], Runner] = default_runner,
                 runs_dir: str | Path | None = None):
        self.store = store
        self.runner = runner
        self.runs_dir = Path(runs_dir) if runs_dir else data_home() / "runs"
        self._lock = threading.RLock()
        self._jobs: dict[str, Job] = {}
        self._queue: deque[str] = deque()
        self._running: str | None = None
        self._thread: threading.Thread | None = None
        self._recover()

    # -- the record of a previous process --------------------------------------------------------

    def _recover(self) -> None:
        """Mark interrupted the active runs whose owner is gone (a previous server, a killed CLI run)."""
        for run in self.store.list_runs():
            status, error = self._settle(run)
            self._jobs[run["id"]] = self._job_from_run(run, status, error)

    def _settle(self, run: dict) -> tuple[str, str | None]:
        """A run's status, after marking it interrupted if it claims to be active but its owner
        process is gone. A run another live process (a CLI run) is writing stays as it is."""
        status, error = run["status"], run["error"]
        if status in ACTIVE and not self._owns(run["id"]) and not Store.owner_alive(run):
            error = f"the process running it stopped while this run was {status}; " + (
                "resume it to continue from its last checkpoint" if run["output_dir"]
                else "it has no output directory on record (a pipeline stage?): resume its pipeline run")
            self.store.set_run_status(run["id"], "interrupted", error)
            status = "interrupted"
        return status, error

    def _job_from_run(self, run: dict, status: str, error: str | None) -> Job:
        """A Job from the store's record, with its launch request (several processes, an accelerate
        config) when it was a subprocess job; runs recorded without one run on one process."""
        record = self.store.get_run(run["id"])
        launch = record.get("launch") or {}
        return Job(run["id"], run["stage"], record["config"], run["output_dir"] or "", status, error=error,
                   processes=int(launch.get("processes", 1)), accelerate_config=launch.get("accelerate_config"))

    # -- public API --------------------------------------------------------------------------------

    def submit(self, stage: str, config: dict | ConfigMixin | None = None, run_id: str | None = None,
               output_dir: str | Path | None = None, processes: int = 1,
               accelerate_config: str | Path | None = None) -> str:
        """Validate, record the run as queued, and start it when the device is free. Returns the run id.

        For stage jobs `config` is the full stage config (dict or config object); for the
        pipeline it is `pipeline_config(preset, stages)`. Bad input raises ValueError and
        writes nothing.
        """
        config_dict = self._check_config(stage, config)
        run_id = validate_name(run_id, "run name") if run_id else new_run_id(stage)
        output_dir = str(output_dir) if output_dir else str(self.runs_dir / run_id / "model")
        launch = None
        if processes != 1 or accelerate_config:
            if stage in DICT_CONFIG_JOBS:
                raise ValueError(f"a {stage} job runs on one process; several processes apply to its stages' own runs")
            from core.runs.launch import check

            check(stage, STAGES[stage].config_class.from_dict(config_dict), processes, accelerate_config)
            # Absolute: a restarted server (another working directory) relaunches the run with it.
            accelerate_config = str(Path(accelerate_config).resolve()) if accelerate_config else None
            launch = {"processes": processes, "accelerate_config": accelerate_config}
        self.store.create_run(run_id, stage, config_dict, output_dir, launch=launch)
        with self._lock:
            self._jobs[run_id] = Job(run_id, stage, config_dict, output_dir, "queued", processes=processes,
                                     accelerate_config=accelerate_config)
            self._queue.append(run_id)
            self._dispatch()
        return run_id

    def stop(self, run_id: str) -> None:
        """Ask a job to stop. A queued job is dropped from the queue; a running one stops at its next step.

        A running subprocess job that another job manager launched (the server before a restart) is
        stopped through the stop file recorded with the run; any other run this manager does not own
        is refused."""
        with self._lock:
            job = self._get(run_id)
            if job.status in ACTIVE and not self._owns(run_id):
                if job.status in ("running", "stopping") and self._stop_foreign(job):
                    return
                raise ValueError(
                    f"run {run_id!r} is not run by this app's job manager (a stage of a pipeline run, or a "
                    "CLI run): stop the pipeline run or the CLI process instead"
                )
            if job.status == "queued":
                self._queue.remove(run_id)
                job.message = "stopped before it started"
                self._set_status(job, "stopped")
            elif job.status == "running":
                job.stop_flag.set()
                if self._in_subprocess(job):
                    self._stop_file(job).touch()
                self._set_status(job, "stopping")
            elif job.status == "stopping":
                pass  # already asked; the stage stops at its next step
            else:
                raise ValueError(f"run {run_id!r} is {job.status}, not running or queued: there is nothing to stop")

    def resume(self, run_id: str) -> str:
        """Queue an interrupted, stopped or failed run again with the same stage, config and output dir."""
        with self._lock:
            job = self._get(run_id)
            if job.status not in RESUMABLE:
                raise ValueError(f"run {run_id!r} is {job.status}; only {', '.join(RESUMABLE)} runs can be resumed")
            self._check_checkpoint(job)
            job.stop_flag = threading.Event()
            job.error = job.traceback = None
            job.done = job.total = 0
            job.message = "resuming"
            job.status = "queued"
            self.store.claim_run(run_id, "queued")  # refused if another live process writes this run
            self._queue.append(run_id)
            self._dispatch()
        return run_id

    def get(self, run_id: str) -> Job:
        with self._lock:
            return self._snapshot(self._get(run_id))

    def jobs(self) -> list[Job]:
        """Every run this store knows, oldest first: runs created elsewhere (a pipeline's stages, the
        CLI) too, with their status as the store has it."""
        with self._lock:
            for run in self.store.list_runs():
                job = self._jobs.get(run["id"])
                if job is None:
                    job = self._jobs[run["id"]] = self._job_from_run(run, *self._settle(run))
                elif not self._owns(run["id"]):
                    job.status, job.error = self._settle(run)
                if not self._owns(run["id"]) and job.status in ("running", "stopping"):
                    self._follow_output(job, self.store.get_run(run["id"]))
            return [self._snapshot(j) for j in self._jobs.values()]

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._running is not None or bool(self._queue)

    def wait(self, run_id: str, timeout: float | None = None) -> Job:
        """Block until the run leaves queued/running/stopping (tests and the CLI)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (job := self.get(run_id)).status in ACTIVE:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id!r} still {job.status} after {timeout} s")
            time.sleep(0.05)
        return job

    # -- internals ---------------------------------------------------------------------------------

    def _owns(self, run_id: str) -> bool:
        return run_id == self._running or run_id in self._queue

    def _snapshot(self, job: Job) -> Job:
        return dataclasses.replace(job.snapshot(), owned=self._owns(job.run_id))

    def _get(self, run_id: str) -> Job:
        """The job, with its status read from the store unless this manager is running it."""
        if run_id in self._jobs and self._owns(run_id):
            return self._jobs[run_id]
        try:
            run = self.store.get_run(run_id)
        except ValueError:
            raise ValueError(f"no run named {run_id!r}") from None
        job = self._jobs.setdefault(run_id, self._job_from_run(run, run["status"], run["error"]))
        job.status, job.error = run["status"], run["error"]
        self._follow_output(job, run)
        return job

    @staticmethod
    def _follow_output(job: Job, run: dict) -> None:
        """Progress of a running subprocess run this manager does not own (launched by the server before a
        restart): the last progress line of the output file beside its recorded stop file."""
        stop_file = (run.get("launch") or {}).get("stop_file")
        if job.status not in ("running", "stopping") or not stop_file:
            return
        from core.runs.launch import PROGRESS_PREFIX, parse_progress

        try:
            with open(Path(stop_file).parent / OUTPUT_FILE, "rb") as output:
                output.seek(max(0, output.seek(0, os.SEEK_END) - 4096))  # the tail holds the latest line
                tail = output.read().decode(errors="replace")
        except OSError:
            return
        for line in reversed(tail.splitlines()):
            if line.startswith(PROGRESS_PREFIX):  # the latest; one cut by the tail's start shows no progress
                if (progress := parse_progress(line)) is not None:
                    job.done, job.total, job.message = progress
                return

    def _check_config(self, stage: str, config) -> dict:
        if stage not in JOB_STAGES:
            raise ValueError(f"unknown stage {stage!r}: choose one of {', '.join(JOB_STAGES)}")
        if stage == "pipeline":
            config = dict(config or {})
            return pipeline_config(config.get("preset", "quick"), config.get("stages", RECIPE))
        if stage == "study":
            from core.runs.study import check_models as check_study_models
            from core.runs.study import study_config_from_dict

            config = study_config_from_dict(config)
            check_study_models(config)  # reused SFT/RM checkpoints: refused now, not as a failed job later
            return config
        if stage == "rounds":
            config = dict(config or {})
            return rounds_job_config(self.store, config.get("rounds") or {}, config.get("overrides"))
        if stage == "eval":
            from core.analysis.eval_table import EvalConfig, check_inputs

            config = config if isinstance(config, EvalConfig) else EvalConfig.from_dict(config)
            check_inputs(config, self.store)  # missing checkpoints, another tokenizer, no prompts: refused now
            return config.to_dict()
        if isinstance(config, ConfigMixin):
            if not isinstance(config, STAGES[stage].config_class):
                raise ValueError(f"a {type(config).__name__} is not a config for stage {stage!r}")
            config.validate()
        else:
            config = STAGES[stage].config_class.from_dict(config or {})
        # Missing/pickle-only model directories, a CUDA request without CUDA, mismatched
        # tokenizers: refused here, before the run is recorded, not as a failed job later.
        check_models(stage, config)
        return config.to_dict()

    def _check_checkpoint(self, job: Job) -> None:
        """A run that made progress resumes from its checkpoints; if they were deleted, say so."""
        if not job.output_dir:
            raise ValueError(
                f"run {job.run_id!r} has no output directory on record (a stage of a pipeline run?): "
                "resume the pipeline run instead"
            )
        out = Path(job.output_dir)
        started = self.store.last_step(job.run_id) >= 0
        if job.stage in DICT_CONFIG_JOBS:
            has_checkpoint = out.is_dir()
        else:
            has_checkpoint = out.is_dir() or checkpoints_dir(out).is_dir()
        if started and not has_checkpoint:
            raise ValueError(
                f"run {job.run_id!r} cannot resume: its checkpoint directory {checkpoints_dir(out)} "
                "no longer exists (deleted?). Launch a new run instead."
            )

    @staticmethod
    def _in_subprocess(job: Job) -> bool:
        return job.processes != 1 or job.accelerate_config is not None

    def _stop_file(self, job: Job) -> Path:
        return self.runs_dir / job.run_id / "stop"

    def _stop_foreign(self, job: Job) -> bool:
        """Stop a subprocess run launched by another job manager through the stop file its ranks poll
        (recorded at launch; `Store.start_run` drops it when the run is resumed outside a job manager).
        Its rank 0 records `stopped` once they stop. False where the run records no stop file."""
        stop_file = ((self.store.get_run(job.run_id).get("launch") or {}).get("stop_file"))
        if not stop_file:
            return False
        Path(stop_file).parent.mkdir(parents=True, exist_ok=True)
        Path(stop_file).touch()
        # Only over `running`: a run that ended meanwhile keeps its final status.
        if self.store.set_run_status(job.run_id, "stopping", only_from=("running",)):
            job.status = "stopping"
        return True

    def _run_subprocess(self, job: Job, on_progress: Callable[[int, int, str], None]) -> str:
        """`rlhf <stage> --processes N` on the job's config; returns the final model directory. The
        subprocess records metrics, checkpoints and its status in the store like a thread job; its
        output goes to `<runs_dir>/<run>/output.log`, which this thread follows for progress lines."""

        from core.runs.launch import JOB_PARENT_ENV, STOP_FILE_ENV, command, environment, parse_progress
        from core.models.loading import pick_device

        control = self._stop_file(job).parent
        control.mkdir(parents=True, exist_ok=True)
        self._stop_file(job).unlink(missing_ok=True)  # a resumed run's earlier Stop is spent
        # Recorded with the run: a restarted server relaunches it the same way and can stop it (`_stop_foreign`).
        self.store.set_run_launch(job.run_id, {"processes": job.processes, "accelerate_config": job.accelerate_config,
                                               "stop_file": str(self._stop_file(job))})
        config_file = control / "config.yaml"
        config = STAGES[job.stage].config_class.from_dict(job.config)
        config_file.write_text(config.to_yaml())
        cpu = pick_device(config.device).type == "cpu"
        argv = command(job.processes, job.accelerate_config, cpu,
                       [job.stage, "--config", str(config_file), "--output", job.output_dir, "--name", job.run_id])
        env = environment({STOP_FILE_ENV: str(self._stop_file(job)), JOB_PARENT_ENV: str(os.getpid()),
                           "RLHF_WORKBENCH_HOME": str(self.store.path.parent)})
        tail: deque[str] = deque(maxlen=30)  # the last lines, for the error of a failed job

        def read(line: str) -> None:
            if (progress := parse_progress(line)) is not None:
                return on_progress(*progress)
            tail.append(line.rstrip())  # output, or a garbled progress line: kept, the child runs on

        # The child writes to a file, not a pipe: once this server is gone (a restart) a write to a pipe
        # would fail (BrokenPipeError at its next progress line) and take the run down with it.
        output = control / OUTPUT_FILE
        with open(output, "wb") as sink, open(output, "rb") as source:
            child = subprocess.Popen(argv, env=env, stdout=sink, stderr=subprocess.STDOUT)
            pending = b""
            while True:
                exited = child.poll() is not None  # then what it wrote is all in the file: read it to the end
                pending += source.read()
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    read(line.decode(errors="replace"))
                if exited:
                    break
                if not lines:
                    time.sleep(0.2)
            if pending:
                read(pending.decode(errors="replace"))
        if child.returncode != 0:
            errors = [line for line in tail if "rlhf: error:" in line or ("Error" in line and "ChildFailed" not in line)]
            raise RuntimeError(f"the {job.processes}-process run exited with status {child.returncode}: "
                               + (errors[-1] if errors else "\n".join(list(tail)[-5:])))
        return job.output_dir

    def _set_status(self, job: Job, status: str, error: str | None = None) -> None:
        job.status, job.error = status, error
        self.store.set_run_status(job.run_id, status, job.error)

    def _dispatch(self) -> None:
        """Start the next queued job if none is running (caller holds the lock)."""
        if self._running is not None or not self._queue:
            return
        run_id = self._queue.popleft()
        job = self._jobs[run_id]
        self._running = run_id
        self._set_status(job, "running")
        self._thread = threading.Thread(target=self._run, args=(job,), name=f"job-{run_id}", daemon=True)
        self._thread.start()

    def _run(self, job: Job) -> None:
        def on_progress(done: int, total: int, message: str) -> None:
            with self._lock:
                job.done, job.total, job.message = done, total, message

        events = Events(self.store, job.run_id, stop_flag=job.stop_flag, on_progress=on_progress)
        status, error, tb, result = "done", None, None, None
        try:
            if self._in_subprocess(job):
                result = self._run_subprocess(job, on_progress)
                if self._stop_file(job).exists():  # Stop from another job manager (`_stop_foreign`)
                    job.stop_flag.set()
            else:
                run = self.runner(job.stage)
                config = job.config if job.stage in DICT_CONFIG_JOBS else STAGES[job.stage].config_class.from_dict(job.config)
                result = run(config, self.store, events, Path(job.output_dir))
            if job.stop_flag.is_set():
                status = "stopped"
        except Exception as exc:  # the job fails, the server lives on; the page shows why
            status, error, tb = "failed", f"{type(exc).__name__}: {exc}", traceback.format_exc()
        finally:
            events.close()
            with self._lock:
                job.result = str(result) if result is not None else None
                job.traceback = tb
                if status == "done":
                    job.done = max(job.done, job.total)
                    job.message = "done"
                self._set_status(job, status, error)
                self._running = None
                self._dispatch()


__all__ = ["Job", "JobManager", "JOB_STAGES", "default_runner", "pipeline_config", "new_run_id"]
