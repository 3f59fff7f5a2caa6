"""The one channel between a running stage and the outside world.

A stage calls `progress`, `metrics`, `checkpoint` and `log` as it goes and polls `should_stop`
between steps. The CLI gives it a console progress bar; the job manager gives it a stop flag
and a progress callback; both record metrics and checkpoints in the store.

Under several processes (`dist`, core/distributed.py) every rank calls the same methods: `metrics`
reduces across ranks, `should_stop` gives every rank rank 0's answer; only rank 0's Events has a
store, a console and a progress callback, so one row, one message and one bar come out.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from core.stages import sinks
from core.data.store import Store
from core.distributed import Distributed


class Events:
    def __init__(
        self,
        store: Store | None = None,
        run_id: str | None = None,
        stop_flag: threading.Event | None = None,
        on_progress: Callable[[int, int, str], None] | None = None,
        console: bool = False,
        log_every: int = 25,
        dist: Distributed | None = None,
        stop_file: str | Path | None = None,
    ):
        self.store = store
        self.run_id = run_id
        self.stop_flag = stop_flag or threading.Event()
        self.on_progress = on_progress
        self.console = console
        self.log_every = log_every
        self._bar: tqdm | None = None
        self._bar_key: tuple | None = None
        self.dist = dist or Distributed()
        # A job run as a subprocess (core/runs/jobs.py) is stopped by this file appearing.
        self.stop_file = Path(stop_file) if stop_file else None
        self.stopped = False
        self._sink: sinks.Sink | None = None
        self._sink_opened = False  # opened at the first metrics, from the run's `report_to` (core/stages/sinks.py)

    def child(self, store: Store | None, run_id: str, on_progress: Callable[[int, int, str], None] | None = None,
              cls: type[Events] | None = None) -> Events:
        """Events of a run started under this one (a stage of the pipeline, the rounds or the study, or the
        run of runs the CLI makes): the same stop flag *and* stop file, so a Stop reaches the stage that is
        running, not only the run of runs after that stage ends; the same console, and this run's progress
        callback unless another is given."""
        return (cls or Events)(store, run_id, self.stop_flag, on_progress or self.on_progress, self.console,
                               stop_file=self.stop_file)

    def progress(self, done: int, total: int, message: str = "") -> None:
        if self.on_progress:
            self.on_progress(done, total, message)
        if self.console:
            if self._bar_key != (message, total):
                self._close_bar()
                self._bar = tqdm(total=total, desc=message, leave=False, dynamic_ncols=True)
                self._bar_key = (message, total)
            self._bar.n = done
            self._bar.refresh()

    def metrics(self, step: int, values: dict[str, float]) -> None:
        values = self.dist.reduce_metrics(values)
        clean = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}
        if self.store and self.run_id:
            self.store.log_metrics(self.run_id, step, clean)
            if not self._sink_opened:
                self._sink_opened = True
                self._sink, where = sinks.open_sink(self.store, self.run_id)
                if where:
                    self.log(where)
            if self._sink is not None:
                self._sink.write(step, clean)
        if self.console and step % self.log_every == 0:
            shown = " ".join(f"{k}={v:.4g}" for k, v in clean.items())
            tqdm.write(f"[{self.run_id or 'run'}] step {step}: {shown}")

    def checkpoint(self, name: str, kind: str, path: Path, step: int = 0) -> None:
        if self.store:
            self.store.add_checkpoint(name, kind, path, run_id=self.run_id, step=step)
        if self.console:
            tqdm.write(f"[{self.run_id or 'run'}] checkpoint {name} -> {path}")

    def log(self, message: str) -> None:
        """A message for the person running the stage (resume notices, epoch summaries): kept in the
        run's log in the store, which the Train page shows, and printed on the console."""
        if self.store and self.run_id:
            self.store.add_log(self.run_id, message)
        if self.console:
            tqdm.write(f"[{self.run_id}] {message}" if self.run_id else message)

    def should_stop(self) -> bool:
        asked = self.stop_flag.is_set() or (self.stop_file is not None and self.stop_file.exists())
        agreed = self.dist.agree(asked)  # a collective: every rank asks at the same step
        self.stopped = self.stopped or agreed
        return agreed

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None
        self._close_bar()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._bar_key = None
