"""Shared fixtures. A test that asks for `workbench_home` gets its own data directory, so no test sees
another's store; every other test shares the session's, never the user's."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest

from core.data.store import Store


@pytest.fixture(autouse=True, scope="session")
def session_data_home(tmp_path_factory):
    """Tests that do not ask for a data directory of their own (`workbench_home`) share one of the
    session's, so nothing a test writes (the packed-text cache, a stage's store) lands in the user's."""
    import os

    before = os.environ.get("RLHF_WORKBENCH_HOME")
    os.environ["RLHF_WORKBENCH_HOME"] = str(tmp_path_factory.mktemp("session-home"))
    yield
    if before is None:
        os.environ.pop("RLHF_WORKBENCH_HOME", None)
    else:
        os.environ["RLHF_WORKBENCH_HOME"] = before


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain little from a second thread, and on a shared 2-core machine an oversubscribed
    thread pool makes each step many times slower. Modules that train use it:
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    """The bundled tokenizer, loaded once per test module."""
    from core.models.loading import load_tokenizer

    return load_tokenizer("bundled")


@pytest.fixture
def bucket_counts(monkeypatch) -> list[int]:
    """How many micro-batches each call of `microbatch.length_buckets` (the stages' cut by length) made."""
    from core.stages import microbatch

    counts: list[int] = []
    real = microbatch.length_buckets

    def counting(lengths, call_tokens):
        groups = real(lengths, call_tokens)
        counts.append(len(groups))
        return groups

    monkeypatch.setattr(microbatch, "length_buckets", counting)
    return counts


@pytest.fixture
def workbench_home(tmp_path, monkeypatch):
    """A fresh RLHF_WORKBENCH_HOME (and offline hub) for one test."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("RLHF_WORKBENCH_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


@pytest.fixture
def store(workbench_home):
    return Store(workbench_home / "workbench.db")


APP = str(__import__("pathlib").Path(__file__).resolve().parent.parent / "workbench" / "app.py")


@pytest.fixture
def app(workbench_home):
    """An AppTest of the whole app (st.navigation included) on a fresh data directory.

    Call `app.switch_page("../pages/<name>.py")` then `app.run()` to open a page.
    """
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return at


def orphan(store: Store, *run_ids: str) -> None:
    """Make runs look as if a process that has since exited owned them (a killed server or CLI run)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # its process id now belongs to no live process
    with sqlite3.connect(store.path) as db:
        db.executemany("UPDATE runs SET owner_pid = ? WHERE id = ?", [(child.pid, r) for r in run_ids])
