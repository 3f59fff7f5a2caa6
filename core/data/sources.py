"""The one data loader of every stage: a source is 'demo' (the built-in task), 'store' (the
workbench database) or a file path (JSONL or CSV, read by the same parser as the app's imports,
with line-numbered errors).

    load_demonstrations  -> [{"prompt", "completion", "context"}]  SFT
    load_rankings        -> [Ranking(prompt, responses)]              reward model, DPO (best to worst)
    load_prompts         -> [prompt]                                  PPO, GRPO, RLOO
    load_prompt_rows     -> ([prompt], [{column: value}])             their reward terms (`answer`, ...)
    load_ptx_texts       -> [document]                                PPO's pretraining term

A prompt is what `core.models.chat` renders: its text when it is one user turn, else the whole
conversation (a list of {role, content} turns ending with the user turn to answer).

Demo rankings are not here: they are sampled from the SFT policy, so the reward stage makes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from core.data import demo
from core.data.formats import detect_kind, normalise, read_bytes, read_source
from core.data.store import Store, as_prompt, check_conversation, check_ranking, prompt_turns

SOURCES_HELP = "'demo', 'store' or a JSONL/CSV/Parquet path or saved dataset directory"

Prompt = str | list[dict]  # one user turn's text, or a conversation ending with the user turn


@dataclass
class Ranking:
    prompt: Prompt
    responses: list[str]  # best to worst


def prompt_key(prompt: Prompt) -> str:
    """A prompt as a hashable key (a conversation is a list)."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def _need_store(store: Store | None, what: str) -> Store:
    if store is None:
        raise ValueError(f"{what}='store' needs the workbench store, but none was given")
    return store


def _rows(path: str | Path, kind: str, what: str) -> list[tuple[int, dict]]:
    """The rows of a file that must hold `kind` (demonstrations | rankings)."""
    path = Path(path).expanduser()
    rows = _read(str(path), what)
    if detect_kind(set(rows[0][1])) != kind:
        shapes = {"demonstrations": "prompt/completion or instruction/output",
                  "rankings": "prompt/responses or prompt/chosen/rejected"}
        raise ValueError(f"{what}: {path} does not hold {kind} ({shapes[kind]})")
    return rows


def _read(source: str, what: str) -> list[tuple[int, dict]]:
    """(line number, row) of a table file, saved dataset or hub dataset id; a read error names `what`."""
    try:
        return read_source(source)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None


def _column(source: str, column: str, what: str, rows: list[tuple[int, dict]] | None = None) -> list:
    """One column of a table file, saved dataset or hub dataset id (or of its `rows`, already read): the
    "prompt" column as prompts (text or a conversation, checked as an import checks it), any other as text."""
    name = Path(source).name
    if rows is None:
        rows = _read(source, what)
    values: list = []
    for number, row in rows:
        try:
            if column == "prompt":
                prompt = normalise(row, "prompts")["prompt"]
                context, text = check_conversation(prompt)
                values.append(text if context is None else prompt)
                continue
        except ValueError as exc:
            raise ValueError(f"{what}: {name} line {number}: {exc}") from None
        value = row.get(column)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f'{what}: {name} line {number} has no "{column}" text')
        values.append(value.strip())
    return values


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
        return [Ranking(as_prompt(r["turns"]), r["responses"]) for r in _need_store(store, "data").list_rankings()]
    out = []
    for number, row in _rows(source, "rankings", "data"):
        try:
            r = normalise(row, "rankings")
            context, text = check_conversation(r["prompt"])
            out.append(Ranking(as_prompt(prompt_turns(text, context)),
                               check_ranking(r.get("responses"))))
        except ValueError as exc:
            raise ValueError(f"{source} line {number}: {exc}") from None
    return out


def one_per_item(rankings: list[Ranking]) -> list[Ranking]:
    """The first ranking of each item (a prompt and its set of answers): when several labelers ranked
    the same answers (a labeling batch's shared items, core/labeling/), the RM sees that item once."""
    seen: set[tuple[str, frozenset[str]]] = set()
    out = []
    for r in rankings:
        key = (prompt_key(r.prompt), frozenset(r.responses))
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def load_prompts(source: str, store: Store | None) -> list[Prompt]:
    """'demo' -> the demo's training prompts; 'store' -> the workbench's prompts; else a JSONL/CSV file.
    A multi-turn prompt comes as its whole conversation."""
    return load_prompt_rows(source, store)[0]


def load_prompt_rows(source: str, store: Store | None) -> tuple[list[Prompt], list[dict]]:
    """(prompts, each prompt's other columns): what reward terms read (`answer`, `solution`, ...). A file's
    rows keep every column but the prompt, the store's their `extra`; the demo's prompts (built in or
    stored) know their `answer`."""
    if source == "demo":
        tasks = demo.train_tasks()
        return [t.prompt for t in tasks], [{"answer": t.answer} for t in tasks]
    if source == "store":
        rows = _need_store(store, "prompts").list_prompts()
        if not rows:
            raise ValueError("the store has no prompts; add some on the Prompts page or import a JSONL file")
        prompts = [as_prompt(row["turns"]) for row in rows]
        return prompts, [{**demo_columns(p), **row["extra"]} for p, row in zip(prompts, rows)]
    rows = _read(source, "prompts file")  # once: a hub dataset id would be loaded again
    prompts = _column(source, "prompt", "prompts file", rows)
    return prompts, [{k: v for k, v in row.items() if k != "prompt"} for _, row in rows]


def demo_columns(prompt: Prompt) -> dict:
    """A demo prompt's `answer` (recomputed from the prompt), or nothing for any other prompt."""
    answer = demo.expected_answer(prompt)
    return {} if answer is None else {"answer": answer}


def load_ptx_texts(source: str) -> list[str]:
    """'demo' -> the demo pretraining corpus; else your own pretraining text: a plain text file (one
    document a line), or the "text" column of a JSONL/CSV/Parquet file, saved dataset or hub dataset id."""
    if source == "demo":
        return demo.pretraining_corpus()
    path = Path(source).expanduser()
    if not path.is_file() or path.suffix.lower() in (".jsonl", ".json", ".csv", ".parquet"):
        return _column(source, "text", "ptx_data")
    try:
        lines = [ln for ln in read_bytes(path).decode("utf-8", errors="replace").splitlines() if ln.strip()]
    except ValueError as exc:
        raise ValueError(f"ptx_data file: {exc}") from None
    if not lines:
        raise ValueError(f"ptx_data file {path} is empty")
    return lines
