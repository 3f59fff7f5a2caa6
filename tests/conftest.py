"""Shared fixtures. Every test gets its own data directory, so no test sees another's store."""

from __future__ import annotations

import pytest

from core.store import Store


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
