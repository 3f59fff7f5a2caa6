"""The one data loader of every stage: a source is 'demo' (the built-in task), 'store' (the
workbench database) or a file path (JSONL or CSV, read by the same parser as the app's imports,
with line-numbered errors).

    load_demonstrations  -> [{"prompt", "completion"}]      SFT
    load_rankings        -> [Ranking(prompt, responses)]    reward model (best to worst)
    load_prompts         -> [prompt]                        PPO (and later GRPO, RLOO)
    load_ptx_texts       -> [document]                      PPO's pretraining term

Demo rankings are not here: they are sampled from the SFT policy, so the reward stage makes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.data import demo
from core.data.formats import detect_kind, normalise, read_bytes, read_table
from core.data.store import Store, check_ranking

SOURCES_HELP = "'demo', 'store' or a JSONL/CSV path"


@dataclass
class Ranking:
    prompt: str
    responses: list[str]  # best to worst


def _need_store(store: Store | None, what: str) -> Store:
    if store is None:
        raise ValueError(f"{what}='store' needs the workbench store, but none was given")
    return store


def _rows(path: str | Path, kind: str, what: str) -> list[tuple[int, dict]]:
    """The rows of a file that must hold `kind` (demonstrations | rankings)."""
    path = Path(path).expanduser()
    try:
        rows = read_table(path)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    if detect_kind(set(rows[0][1])) != kind:
        shapes = {"demonstrations": "prompt/completion or instruction/output",
                  "rankings": "prompt/responses or prompt/chosen/rejected"}
        raise ValueError(f"{what}: {path} does not hold {kind} ({shapes[kind]})")
    return rows


def _column(path: Path, column: str, what: str) -> list[str]:
    """One text column of a table file (a conversational prompt column gives its user turn)."""
    try:
        rows = read_table(path)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    texts = []
    for number, row in rows:
        try:
            value = normalise(row, "prompts")[column] if column == "prompt" else row.get(column)
        except ValueError as exc:
            raise ValueError(f"{what}: {path.name} line {number}: {exc}") from None
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f'{what}: {path.name} line {number} has no "{column}" text')
        texts.append(value.strip())
    return texts


def load_demonstrations(source: str, store: Store | None, n_demo: int = 2000,
                        ramble_rate: float = demo.RAMBLE_RATE, seed: int = 0) -> list[dict]:
    """Rows of {"prompt", "completion", "context"} (context: the earlier turns of a multi-turn
    demonstration, or None); `n_demo`, `ramble_rate` and `seed` shape the demo set only."""
    if source == "demo":
        return demo.demonstrations(demo.train_tasks(n_demo), ramble_rate, seed=seed + 3)
    if source == "store":
        rows = [{"prompt": d["prompt"], "completion": d["output"], "context": d["context"]}
                for d in _need_store(store, "data").list_demonstrations()]
    else:
        rows = []
        for number, row in _rows(source, "demonstrations", "data"):
            try:
                r = normalise(row, "demonstrations")
                Store._check_demonstration(r)
            except ValueError as exc:
                raise ValueError(f"data: {source} line {number}: {exc}") from None
            rows.append({"prompt": Store.prompt_text(r["instruction"], r["input"]), "completion": r["output"],
                         "context": r.get("context")})
    if not rows:
        raise ValueError(f"no demonstrations found in {source!r}: add some before training SFT")
    return rows


def load_rankings(source: str, store: Store | None) -> list[Ranking]:
    """Rankings from the store or a file (best to worst; ties and duplicates rejected with the line)."""
    if source == "store":
        return [Ranking(r["prompt"], r["responses"]) for r in _need_store(store, "data").list_rankings()]
    out = []
    for number, row in _rows(source, "rankings", "data"):
        try:
            r = normalise(row, "rankings")
            out.append(Ranking(str(r["prompt"]).strip(), check_ranking(r.get("responses"))))
        except ValueError as exc:
            raise ValueError(f"{source} line {number}: {exc}") from None
    return out


def one_per_item(rankings: list[Ranking]) -> list[Ranking]:
    """The first ranking of each item (a prompt and its set of answers): when several labelers ranked
    the same answers (a labeling batch's shared items, core/labeling/), the RM sees that item once."""
    seen: set[tuple[str, frozenset[str]]] = set()
    out = []
    for r in rankings:
        key = (r.prompt, frozenset(r.responses))
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def load_prompts(source: str, store: Store | None) -> list[str]:
    """'demo' -> the demo's training prompts; 'store' -> the workbench's prompts; else a JSONL/CSV file."""
    if source == "demo":
        return [t.prompt for t in demo.train_tasks()]
    if source == "store":
        prompts = [row["text"] for row in _need_store(store, "prompts").list_prompts()]
        if not prompts:
            raise ValueError("the store has no prompts; add some on the Prompts page or import a JSONL file")
        return prompts
    return _column(Path(source).expanduser(), "prompt", "prompts file")


def load_ptx_texts(source: str) -> list[str]:
    """'demo' -> the demo pretraining corpus; else a text file (one document a line) or JSONL/CSV with "text"."""
    if source == "demo":
        return demo.pretraining_corpus()
    path = Path(source).expanduser()
    if path.suffix in (".jsonl", ".csv", ".parquet") or path.is_dir():
        return _column(path, "text", "ptx_data file")
    try:
        lines = [ln for ln in read_bytes(path).decode("utf-8", errors="replace").splitlines() if ln.strip()]
    except ValueError as exc:
        raise ValueError(f"ptx_data file: {exc}") from None
    if not lines:
        raise ValueError(f"ptx_data file {path} is empty")
    return lines
