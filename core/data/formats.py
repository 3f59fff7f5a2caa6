"""Import and export in the ecosystem's shapes (TRL columns), all or nothing, errors by line.

- demonstrations: {"prompt", "completion"} or {"instruction", "input", "output"}
- preference pairs: {"prompt", "chosen", "rejected"} (a ranking with K = 2)
- rankings: {"prompt", "responses": [best, ..., worst]}, optionally "labeler"
- prompts alone: {"prompt"}
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
    "demonstrations": ({"prompt", "completion"}, {"instruction", "output"}),
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
    """(line number, row) pairs from JSONL or CSV bytes; CSV 'responses' cells hold a JSON list."""
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


def detect_kind(columns: set[str]) -> str:
    for kind, shapes in SHAPES.items():
        if any(shape <= columns for shape in shapes):
            return kind
    expected = "; ".join(" + ".join(sorted(s)) for shapes in SHAPES.values() for s in shapes)
    raise ValueError(f"unrecognised columns {sorted(columns)}: expected one of {expected}")


def normalise(row: dict, kind: str) -> dict:
    """One row in the store's own shape for its kind."""
    if kind == "demonstrations":
        if "completion" in row:
            return {"instruction": row.get("prompt"), "input": "", "output": row.get("completion")}
        return {"instruction": row.get("instruction"), "input": row.get("input") or "", "output": row.get("output")}
    if kind == "rankings" and "responses" not in row:
        return {"prompt": row.get("prompt"), "responses": [row.get("chosen"), row.get("rejected")], "labeler": row.get("labeler")}
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
        if "completion" in row:
            check_text(row.get("prompt"), "prompt", MAX_PROMPT_CHARS)
            check_text(row.get("completion"), "completion", MAX_RESPONSE_CHARS)
        Store._check_demonstration(normalise(row, kind))
    elif kind == "rankings":
        check_text(row.get("prompt"), "prompt", MAX_PROMPT_CHARS)
        if "responses" not in row:
            chosen = check_text(row.get("chosen"), "chosen", MAX_RESPONSE_CHARS)
            if chosen == check_text(row.get("rejected"), "rejected", MAX_RESPONSE_CHARS):
                raise ValueError("chosen and rejected are the same text: a tie, which a preference pair cannot express")
        check_ranking(normalise(row, kind).get("responses"))
    else:
        check_text(row.get("prompt"), "prompt", MAX_PROMPT_CHARS)


def ranking_pairs(responses: list[str]) -> list[tuple[str, str]]:
    """A best-to-worst ranking as its C(K,2) (chosen, rejected) pairs, as TRL's RewardTrainer wants."""
    return list(itertools.combinations(responses, 2))


def export_jsonl(store: Store, kind: str) -> str:
    """TRL shapes: prompt/completion for demonstrations, prompt/responses for rankings."""
    if kind == "demonstrations":
        rows = [{"prompt": d["prompt"], "completion": d["output"]} for d in store.list_demonstrations()]
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
