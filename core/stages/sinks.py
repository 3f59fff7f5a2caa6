"""Metric sinks besides the store: `report_to: none | tensorboard | trackio` on every stage.

Events.metrics (core/stages/events.py), the one metrics path, writes them, so every stage gets the same
scalars the store gets: our own loops (SFT, RM, PPO) and TRL's trainers (DPO, GRPO, RLOO), whose own
`report_to` stays "none" because their metrics already reach Events through the callback in
core/stages/trl_bridge.py. Both write local files: a TensorBoard log directory per run under the
workbench's data directory, and trackio's own local SQLite database (its TRACKIO_DIR, where `trackio show`
looks), one project for all runs. No account, and nothing leaves the machine (docs/NOTES.md,
"Metric sinks").
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from core.config import check_report_to

if TYPE_CHECKING:
    from core.data.store import Store

TRACKIO_PROJECT = "rlhf-workbench"

class Sink(Protocol):
    def write(self, step: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def tensorboard_dir(store: Store, run_id: str) -> Path:
    """One log directory per run under DATA/tensorboard: `tensorboard --logdir DATA/tensorboard` shows
    every run, a pipeline's stages side by side."""
    return store.path.parent / "tensorboard" / run_id


class TensorBoardSink:
    def __init__(self, logdir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = logdir
        self.writer = SummaryWriter(log_dir=str(logdir))

    def write(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        # Not every caller closes its Events (a stage run killed mid-way, a pipeline's stage runs): what was
        # logged is on disk at once, as in the store.
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class TrackioSink:
    def __init__(self, run_id: str, config: dict):
        # trackio's directory is fixed when it is first imported (TRACKIO_DIR, else its default), so the
        # workbench uses it as it is: `trackio show` finds the runs without further setup.
        import trackio
        from trackio.utils import TRACKIO_DIR

        self.directory = Path(TRACKIO_DIR)
        # space_id/server_url None and check_report_to's environment check: the local SQLite only.
        # resume="allow": a resumed run continues its trackio run, as its step counter continues.
        self.run = trackio.init(project=TRACKIO_PROJECT, name=run_id, config=config, space_id=None, server_url=None,
                                resume="allow", embed=False, auto_log_gpu=False, auto_log_cpu=False)

    def write(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def open_sink(store: Store, run_id: str) -> tuple[Sink | None, str]:
    """The sink the run's config asks for (its `report_to`, read from the run's row in the store, so the
    CLI, the job manager and the pipeline need not pass it), and a line saying where the metrics go."""
    try:
        config = store.get_run(run_id)["config"]
    except ValueError:
        return None, ""
    report_to = config.get("report_to", "none")
    if report_to == "none":
        return None, ""
    check_report_to(report_to)  # the environment may have changed since the config was validated
    if report_to == "tensorboard":
        sink = TensorBoardSink(tensorboard_dir(store, run_id))
        return sink, f"metrics also in TensorBoard: tensorboard --logdir {sink.logdir.parent}"
    sink = TrackioSink(run_id, config)
    return sink, (f"metrics also in trackio (project {TRACKIO_PROJECT}): "
                  f"TRACKIO_DIR={sink.directory} trackio show --project {TRACKIO_PROJECT}")
