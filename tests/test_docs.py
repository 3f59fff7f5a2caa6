"""docs/ARCHITECTURE.md is a map a newcomer trusts: short, and every repository path it names exists, so a
module moved without updating the map fails here rather than misleading the next reader."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAP = ROOT / "docs" / "ARCHITECTURE.md"


def named_paths(markdown: str) -> set[str]:
    """Repository paths a document names: tokens in backticks or code blocks with a '/' or a .py/.md/.toml
    ending (`core/models/generate.sample` names the module core/models/generate.py and its `sample`)."""
    spans = re.findall(r"`([^`\n]+)`", markdown) + re.findall(r"```\n(.*?)```", markdown, re.S)
    tokens = {t.strip("(),;:'\"") for span in spans for t in span.split()}
    return {t for t in tokens if re.fullmatch(r"[\w.\-/]+", t) and not t.startswith(("/", "."))
            and ("/" in t or re.search(r"\.(py|md|toml)$", t))
            and t != "import/export"}  # formats' job, not a path


def missing(paths: set[str], root: Path) -> list[str]:
    out = []
    for path in sorted(paths):
        if "/" not in path:  # a bare file name in a listing: somewhere under the root
            if not any(root.glob(f"**/{path}")):
                out.append(path)
        elif not (root / path).exists():
            module, _, name = path.rpartition(".")
            source = root / f"{module}.py"
            if not (source.is_file() and re.search(rf"^\s*(def|class)\s+{name}\b|^{name}\s*[:=]",
                                                   source.read_text(), re.M)):
                out.append(path)
    return out


def test_the_map_is_short_and_names_only_paths_that_exist():
    text = MAP.read_text()
    assert len(text.splitlines()) <= 250
    paths = named_paths(text)
    assert {"core/stages/__init__.py", "core/models/generate.sample", "pages/rank.py"} <= paths
    assert missing(paths, ROOT) == []


def test_a_moved_module_is_caught():
    paths = named_paths("Sampling: `core/models/generate.sample`, events in `core/events.py`, "
                        "`core/stages/evaluate.no_such_function`.\n```\ncore/stages/  ghost.py\n```\n")
    assert missing(paths, ROOT) == ["core/events.py", "core/stages/evaluate.no_such_function", "ghost.py"]
