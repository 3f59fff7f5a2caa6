"""Where things live on disk, and the two rules for writing there: validated names, atomic writes."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ASSETS_DIR = PROJECT_ROOT / "assets"
BUNDLED_MODEL_DIR = ASSETS_DIR / "tiny-gpt2"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def data_home() -> Path:
    """The data directory: `RLHF_WORKBENCH_HOME`, else `~/.rlhf_workbench`."""
    home = Path(os.environ.get("RLHF_WORKBENCH_HOME", Path.home() / ".rlhf_workbench"))
    home.mkdir(parents=True, exist_ok=True)
    return home


def validate_name(name: str, what: str = "name") -> str:
    """Run and checkpoint names become directory names, so they must not traverse paths."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise ValueError(
            f"invalid {what} {name!r}: use 1-100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no '/', no '..')"
        )
    return name


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; on success it is renamed into place.

    A crash (or a full disk) mid-write leaves either the old complete directory or nothing:
    never a half-written checkpoint that a loader would trip over.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_leftovers(target)
    # The writer's pid is in the temp name so a later writer can tell a killed writer's leftovers
    # from a live one's.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):  # sub-directories too (PPO's EMA policy)
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if target.exists():
            trash = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, trash)
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_leftovers(target: Path) -> None:
    """Delete `.NAME.tmp-PID-*` / `.NAME.old-PID` directories left beside `target` by a writer that
    was killed mid-write (SIGKILL, power loss): without this each crash leaks a checkpoint's size."""
    prefix = f".{target.name}."
    for stale in target.parent.iterdir():
        if not stale.name.startswith(prefix) or not stale.is_dir():
            continue
        kind, _, rest = stale.name[len(prefix):].partition("-")
        pid = rest.split("-")[0]
        if kind in ("tmp", "old") and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` beside `path` under a unique name, sync it, rename it over `path`: a reader (another
    thread, job or rank) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def checkpoints_dir(output_dir: str | Path) -> Path:
    """Per-epoch / per-step checkpoints live beside the final model: DIR/sft -> DIR/sft-checkpoints."""
    output_dir = Path(output_dir)
    return output_dir.with_name(output_dir.name + "-checkpoints")
