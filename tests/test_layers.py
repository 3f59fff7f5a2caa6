"""core's layers import only downward (pyproject.toml's import-linter contract, core/__init__.py's map).

The contract is run on the real tree, and on a copy with one upward import planted inside a function
(lazy imports count): the linter must refuse that copy and name the import.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = "from importlinter.cli import lint_imports_command; lint_imports_command()"


def lint(tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([sys.executable, "-c", LINT], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=300)


def copy_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    ignore = shutil.ignore_patterns("__pycache__")
    for package in ("core", "workbench"):
        shutil.copytree(ROOT / package, tree / package, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def test_the_tree_keeps_its_layers():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_a_planted_upward_import_breaks_the_contract(tmp_path):
    tree = copy_tree(tmp_path)
    assert lint(tree).returncode == 0  # the copy itself is clean
    store = tree / "core" / "data" / "store.py"
    store.write_text(store.read_text() + "\n\ndef _upward():\n    from core.runs import jobs  # data -> runs\n    return jobs\n")
    result = lint(tree)
    assert result.returncode != 0
    assert "core.data.store -> core.runs.jobs" in result.stdout, result.stdout


def test_core_never_imports_streamlit(tmp_path):
    tree = copy_tree(tmp_path)
    monitor = tree / "core" / "analysis" / "monitor.py"
    monitor.write_text(monitor.read_text() + "\n\nimport streamlit  # noqa: E402\n")
    result = lint(tree)
    assert result.returncode != 0 and "core.analysis.monitor -> streamlit" in result.stdout, result.stdout
