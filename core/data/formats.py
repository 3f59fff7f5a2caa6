"""Import and export in the ecosystem's shapes (TRL columns), all or nothing, errors by line.

- demonstrations: {"prompt", "completion"}, {"instruction", "input", "output"}, or conversational
  {"messages": [{"role", "content"}, ...]} ending with an assistant turn
- preference pairs: {"prompt", "chosen", "rejected"} (a ranking with K = 2), plain text or
  conversational (prompt a list of turns, chosen/rejected a one-turn assistant list)
- rankings: {"prompt", "responses": [best, ..., worst]}, optionally "labeler"
- prompts alone: {"prompt"}

Files are JSONL, CSV, Parquet, or a directory saved by `datasets` (`save_to_disk`); the last two
are read through `datasets`, with the same checks.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from pathlib import Path

from core.data.store import MAX_PROMPT_CHARS, MAX_RESPONSE_CHARS, Store, check_ranking, check_text

MAX_IMPORT_BYTES = 50 * 1024 * 1024

SHAPES = {
    "demonstrations": ({"prompt", "completion"}, {"instruction", "output"}, {"messages"}),
    "rankings": ({"prompt", "responses"}, {"prompt", "chosen", "rejected"}),
    "prompts": ({"prompt"},),
}


def _decode(data: bytes, name: str) -> str:
    if len(data) > MAX_IMPORT_BYTES:
        raise ValueError(f"{name} is {len(data) / 2**20:.0f} MB; the import limit is {MAX_IMPORT_BYTES // 2**20} MB")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ValueError(f"{name} line {line}: not valid UTF-8 text (byte {exc.start})") from None


def read_bytes(path: str | Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    if path.stat().st_size > MAX_IMPORT_BYTES:
        raise ValueError(f"{path.name} is {path.stat().st_size / 2**20:.0f} MB; the import limit is {MAX_IMPORT_BYTES // 2**20} MB")
    return path.read_bytes()


def parse_rows(data: bytes, name: str) -> list[tuple[int, dict]]:
    """(line number, row) pairs from JSONL, CSV or Parquet bytes; CSV 'responses' cells hold a JSON list."""
    if name.lower().endswith(".parquet"):
        if len(data) > MAX_IMPORT_BYTES:
            raise ValueError(f"{name} is {len(data) / 2**20:.0f} MB; the import limit is {MAX_IMPORT_BYTES // 2**20} MB")
        return _parquet_rows(data, name)
    text = _decode(data, name)
    rows: list[tuple[int, dict]] = []
    if name.lower().endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text))
        for row in reader:
            if "responses" in row and row["responses"]:
                try:
                    row["responses"] = json.loads(row["responses"])
                except json.JSONDecodeError:
                    raise ValueError(f"{name} line {reader.line_num}: 'responses' must be a JSON list") from None
            rows.append((reader.line_num, {k: v for k, v in row.items() if k is not None}))
    else:
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{name} line {number}: malformed JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{name} line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append((number, row))
    if not rows:
        raise ValueError(f"{name} holds no rows")
    return rows


def _dataset_rows(dataset, name: str) -> list[tuple[int, dict]]:
    if not hasattr(dataset, "column_names") or isinstance(dataset.column_names, dict):
        raise ValueError(f"{name} holds several splits ({', '.join(dataset)}): import one split's directory")
    rows = [(i + 1, dict(row)) for i, row in enumerate(dataset)]
    if not rows:
        raise ValueError(f"{name} holds no rows")
    return rows


def read_table(path: str | Path) -> list[tuple[int, dict]]:
    """(row number, row) pairs of a JSONL, CSV or Parquet file, or of a directory saved by `datasets`."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = [f for f in path.rglob("*") if f.is_file()]
        if sum(f.stat().st_size for f in files) > MAX_IMPORT_BYTES:
            raise ValueError(f"{path.name} is over the import limit of {MAX_IMPORT_BYTES // 2**20} MB")
        import datasets

        try:
            return _dataset_rows(datasets.load_from_disk(str(path)), path.name)
        except FileNotFoundError as exc:
            raise ValueError(f"{path} is not a directory saved by datasets' save_to_disk ({exc})") from None
    return parse_rows(read_bytes(path), path.name)


def _parquet_rows(data: bytes, name: str) -> list[tuple[int, dict]]:
    import tempfile

    import datasets

    with tempfile.NamedTemporaryFile(suffix=".parquet") as tmp:
        tmp.write(data)
        tmp.flush()
        try:
            return _dataset_rows(datasets.Dataset.from_parquet(tmp.name, keep_in_memory=True), name)
        except Exception as exc:  # pyarrow's own errors for a damaged file
            raise ValueError(f"{name}: not a readable Parquet file ({exc})") from None


def detect_kind(columns: set[str]) -> str:
    for kind, shapes in SHAPES.items():
        if any(shape <= columns for shape in shapes):
            return kind
    expected = "; ".join(" + ".join(sorted(s)) for shapes in SHAPES.values() for s in shapes)
    raise ValueError(f"unrecognised columns {sorted(columns)}: expected one of {expected}")


def _conversation(value, what: str) -> list[dict]:
    if not isinstance(value, list) or not value or not all(
            isinstance(t, dict) and t.get("role") in ("system", "user", "assistant") and isinstance(t.get("content"), str)
            for t in value):
        raise ValueError(f"{what} must be a list of {{role: system|user|assistant, content: text}} turns")
    return [{"role": t["role"], "content": t["content"]} for t in value]


def _split_messages(messages) -> tuple[list[dict], str, str]:
    """A conversational demonstration as (earlier turns, last user turn, last assistant turn)."""
    turns = _conversation(messages, "messages")
    if turns[-1]["role"] != "assistant":
        raise ValueError("messages must end with an assistant turn (the demonstration to learn)")
    if len(turns) < 2 or turns[-2]["role"] != "user":
        raise ValueError("the last assistant turn in messages must answer a user turn")
    return turns[:-2], turns[-2]["content"], turns[-1]["content"]


def _single_turn(value, what: str, role: str) -> str:
    """Text of a plain column, or of a conversational one holding exactly one `role` turn."""
    if isinstance(value, str) or value is None:
        return value
    turns = _conversation(value, what)
    if [t["role"] for t in turns] != [role]:
        raise ValueError(f"conversational {what} must be a single {role} turn (multi-turn preference "
                         "prompts are not supported yet)")
    return turns[0]["content"]


def normalise(row: dict, kind: str) -> dict:
    """One row in the store's own shape for its kind."""
    if kind == "demonstrations":
        if "messages" in row:
            context, instruction, output = _split_messages(row["messages"])
            return {"instruction": instruction, "input": "", "output": output, "context": context or None}
        if "completion" in row:
            return {"instruction": row.get("prompt"), "input": "", "output": row.get("completion")}
        return {"instruction": row.get("instruction"), "input": row.get("input") or "", "output": row.get("output")}
    if kind == "rankings" and "responses" not in row:
        return {"prompt": _single_turn(row.get("prompt"), "prompt", "user"),
                "responses": [_single_turn(row.get("chosen"), "chosen", "assistant"),
                              _single_turn(row.get("rejected"), "rejected", "assistant")],
                "labeler": row.get("labeler")}
    if kind == "prompts":
        return {**row, "prompt": _single_turn(row.get("prompt"), "prompt", "user")}
    return row


def import_file(store: Store, data: bytes, name: str) -> tuple[str, int]:
    """Validate every row, then write them in one transaction. Returns (kind, rows written)."""
    rows = parse_rows(data, name)
    kind = detect_kind(set(rows[0][1]))
    normalised = []
    for number, row in rows:
        try:
            if detect_kind(set(row)) != kind:
                raise ValueError(f"columns {sorted(row)} differ from the first row's ({kind})")
            # Validate each row alone so the error can name its line.
            _check_row(row, kind)
            normalised.append(normalise(row, kind))
        except ValueError as exc:
            raise ValueError(f"{name} line {number}: {exc}") from None
    if kind == "demonstrations":
        return kind, len(store.add_demonstrations(normalised, source="import"))
    if kind == "rankings":
        return kind, len(store.add_rankings(normalised, source="import"))
    with_text = [r["prompt"] for r in normalised]
    return kind, store.add_prompts(with_text, source="import")


def _check_row(row: dict, kind: str) -> None:
    """Check a row as the user wrote it, so messages name the user's columns (prompt/completion,
    chosen/rejected), not the store's."""
    if kind == "demonstrations":
        if "completion" in row and "messages" not in row:
            check_text(row.get("prompt"), "prompt", MAX_PROMPT_CHARS)
            check_text(row.get("completion"), "completion", MAX_RESPONSE_CHARS)
        Store._check_demonstration(normalise(row, kind))
    elif kind == "rankings":
        plain = normalise(row, kind)
        check_text(plain.get("prompt"), "prompt", MAX_PROMPT_CHARS)
        if "responses" not in row:
            chosen = check_text(plain["responses"][0], "chosen", MAX_RESPONSE_CHARS)
            if chosen == check_text(plain["responses"][1], "rejected", MAX_RESPONSE_CHARS):
                raise ValueError("chosen and rejected are the same text: a tie, which a preference pair cannot express")
        check_ranking(normalise(row, kind).get("responses"))
    else:
        check_text(normalise(row, kind).get("prompt"), "prompt", MAX_PROMPT_CHARS)


def ranking_pairs(responses: list[str]) -> list[tuple[str, str]]:
    """A best-to-worst ranking as its C(K,2) (chosen, rejected) pairs, as TRL's RewardTrainer wants."""
    return list(itertools.combinations(responses, 2))


def export_jsonl(store: Store, kind: str) -> str:
    """TRL shapes: prompt/completion for demonstrations, prompt/responses for rankings."""
    if kind == "demonstrations":
        demos = store.list_demonstrations()
        if any(d["context"] for d in demos):  # one shape per file: conversational when any is multi-turn
            rows = [{"messages": [*(d["context"] or []), {"role": "user", "content": d["prompt"]},
                                  {"role": "assistant", "content": d["output"]}]} for d in demos]
        else:
            rows = [{"prompt": d["prompt"], "completion": d["output"]} for d in demos]
    elif kind == "rankings":
        rows = [{"prompt": r["prompt"], "responses": r["responses"], "labeler": r["labeler"]} for r in store.list_rankings()]
    elif kind == "pairs":
        rows = [{"prompt": r["prompt"], "chosen": chosen, "rejected": rejected}
                for r in store.list_rankings() for chosen, rejected in ranking_pairs(r["responses"])]
    elif kind == "prompts":
        rows = [{"prompt": p["text"]} for p in store.list_prompts()]
    else:
        raise ValueError(f"unknown export kind {kind!r}: demonstrations, rankings, pairs or prompts")
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def export_csv(store: Store, kind: str) -> str:
    rows = [json.loads(line) for line in export_jsonl(store, kind).splitlines()]
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    return out.getvalue()
