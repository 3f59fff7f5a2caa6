"""Import and export in the shapes public datasets come in, all or nothing, errors by line.

Importers only map a file's shape onto the store's one conversation type (a prompt is its turns,
ending with the user turn to answer; see core/data/store.py). The shapes, by the columns they need
(`SHAPES`; README's data-format table has one example row each):

- demonstrations: `messages` (a conversation ending with an assistant turn); ShareGPT `conversations`
  (`from`: human/gpt/system + `value`, or `role` + `content`); `prompt` + `completion` (text, or TRL's
  conversational turns); `instruction` (+ `input`) + `output` (Alpaca)
- rankings: `prompt` + `responses` (best first); explicit pairs `prompt` + `chosen` + `rejected` (the
  prompt text or a multi-turn conversation); implicit-prompt pairs `chosen` + `rejected` alone, as
  conversations or as Anthropic HH-RLHF transcripts (`\n\nHuman: ...\n\nAssistant: ...`): the prompt is
  their longest common run of turns, and each must then end in one assistant turn. Optional:
  `labeler`, `score_chosen` / `score_rejected` (or `scores`)
- prompts: `prompt` alone (text or a conversation ending with a user turn)

Any other column of a prompt or ranking row (`answer`, `solution`, ...) is kept with its prompt as
`extra`. A column mapping renames a file's columns first (`prompt=question,chosen=good`). Files are
JSONL, CSV, Parquet, a directory saved by `datasets` (`save_to_disk`), or a hub dataset id.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from pathlib import Path

import os
import re

from core.data.store import (MAX_PROMPT_CHARS, MAX_RESPONSE_CHARS, Store, as_prompt, check_conversation,
                             check_ranking, check_scores, check_text)

MAX_IMPORT_BYTES = 50 * 1024 * 1024

# (shape, kind, the columns that identify it), most specific first: the first whose columns a row
# has is its shape.
SHAPES: tuple[tuple[str, str, frozenset[str]], ...] = (
    ("messages", "demonstrations", frozenset({"messages"})),
    ("sharegpt", "demonstrations", frozenset({"conversations"})),
    ("prompt-completion", "demonstrations", frozenset({"prompt", "completion"})),
    ("instruction-output", "demonstrations", frozenset({"instruction", "output"})),
    ("ranking", "rankings", frozenset({"prompt", "responses"})),
    ("explicit pair", "rankings", frozenset({"prompt", "chosen", "rejected"})),
    ("implicit pair", "rankings", frozenset({"chosen", "rejected"})),
    ("prompt", "prompts", frozenset({"prompt"})),
)
# Columns a shape reads; any other column of a prompt or ranking row is kept as the prompt's `extra`.
KNOWN_COLUMNS = frozenset({"messages", "conversations", "prompt", "completion", "instruction", "input", "output",
                           "responses", "chosen", "rejected", "labeler", "scores", "score_chosen", "score_rejected"})
# CSV cells that may hold a JSON list (responses, scores, conversations).
JSON_CELLS = frozenset({"responses", "scores", "prompt", "completion", "chosen", "rejected", "messages",
                        "conversations"})
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
HH_SPEAKERS = {"Human": "user", "Assistant": "assistant"}
# A speaker tag opens an HH turn after a blank line (the first may omit it). Other speaker names a
# transcript might use are matched too, to be refused by name; any other "\n\nWord:" is text.
HH_TAG = re.compile(r"(?:^|\n\n)(Human|Assistant|User|System|AI|Bot|Model|GPT|Person|H|A):[ \n]?")


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
            for column in JSON_CELLS & set(row):
                cell = row[column]
                # A conversation or list in a CSV cell is written as JSON; a text prompt stays text.
                if cell and (column in ("responses", "scores") or cell.lstrip().startswith("[{")):
                    try:
                        row[column] = json.loads(cell)
                    except json.JSONDecodeError:
                        raise ValueError(f"{name} line {reader.line_num}: {column!r} must be a JSON list") from None
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


def detect_shape(columns: set[str]) -> tuple[str, str]:
    """(shape, kind) of a row with these columns."""
    for shape, kind, needed in SHAPES:
        if needed <= columns:
            return shape, kind
    expected = "; ".join(" + ".join(sorted(needed)) for _, _, needed in SHAPES)
    raise ValueError(f"unrecognised columns {sorted(columns)}: expected one of {expected}")


def detect_kind(columns: set[str]) -> str:
    return detect_shape(columns)[1]


def parse_columns(spec: str | None) -> dict[str, str]:
    """`prompt=question,chosen=good` as {"prompt": "question", "chosen": "good"} (ours = the file's)."""
    mapping: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        ours, eq, theirs = (x.strip() for x in part.partition("="))
        if not eq or not ours or not theirs:
            raise ValueError(f"column mapping {part!r} must read ours=theirs, e.g. prompt=question")
        if ours not in KNOWN_COLUMNS:
            raise ValueError(f"column mapping {part!r}: {ours!r} is not a column the workbench reads "
                             f"({', '.join(sorted(KNOWN_COLUMNS))})")
        mapping[ours] = theirs
    return mapping


def map_columns(rows: list[tuple[int, dict]], columns: dict[str, str] | None, name: str) -> list[tuple[int, dict]]:
    """Rename the file's columns to ours; a mapping naming a column the file lacks is refused."""
    if not columns:
        return rows
    have = set(rows[0][1])
    missing = sorted(theirs for theirs in columns.values() if theirs not in have)
    if missing:
        raise ValueError(f"the column mapping names {', '.join(map(repr, missing))}, which {name} does not have "
                         f"(its columns: {', '.join(sorted(have))})")
    renamed = {theirs: ours for ours, theirs in columns.items()}
    return [(n, {renamed.get(k, k): v for k, v in row.items()}) for n, row in rows]


def _conversation(value, what: str) -> list[dict]:
    """Turns as {role, content}: TRL's role/content or ShareGPT's from/value (human, gpt, system)."""
    if not isinstance(value, list) or not value or not all(isinstance(t, dict) for t in value):
        raise ValueError(f"{what} must be a list of {{role: system|user|assistant, content: text}} turns")
    turns = []
    for i, t in enumerate(value, 1):
        if "from" in t or "value" in t:
            speaker = t.get("from")
            if speaker not in SHAREGPT_ROLES:
                raise ValueError(f"turn {i} of {what} is from {speaker!r}: expected one of "
                                 f"{', '.join(SHAREGPT_ROLES)}")
            role, content = SHAREGPT_ROLES[speaker], t.get("value")
        else:
            role, content = t.get("role"), t.get("content")
            if role not in ("system", "user", "assistant"):
                raise ValueError(f"{what} must be a list of {{role: system|user|assistant, content: text}} turns")
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"turn {i} of {what} ({role}) is empty")
        turns.append({"role": role, "content": content})
    return turns


def parse_transcript(text, what: str) -> list[dict]:
    """An Anthropic HH-RLHF transcript ("\n\nHuman: ...\n\nAssistant: ...") as turns."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{what} is empty")
    tags = list(HH_TAG.finditer(text))
    if not tags or tags[0].start() != 0 and text[: tags[0].start()].strip():
        raise ValueError(f"{what} must be a transcript opening with 'Human:' (turns as '\\n\\nHuman: ...' and "
                         "'\\n\\nAssistant: ...')")
    turns: list[dict] = []
    for tag, after in zip(tags, [*tags[1:], None]):
        speaker = tag.group(1)
        if speaker not in HH_SPEAKERS:
            raise ValueError(f"{what} has an unknown speaker tag {speaker!r}: expected 'Human' or 'Assistant'")
        content = text[tag.end(): after.start() if after else len(text)].strip()
        role = HH_SPEAKERS[speaker]
        if turns and turns[-1]["role"] == role:
            raise ValueError(f"{what} has two {speaker} turns in a row (turns {len(turns)} and {len(turns) + 1})")
        if not content:
            raise ValueError(f"turn {len(turns) + 1} of {what} ({speaker}) is empty")
        turns.append({"role": role, "content": content})
    if not any(t["role"] == "assistant" for t in turns):
        raise ValueError(f"{what} has no Assistant turn")
    return turns


def _as_turns(value, what: str) -> list[dict]:
    return parse_transcript(value, what) if isinstance(value, str) else _conversation(value, what)


def _split_messages(messages, what: str = "messages") -> tuple[list[dict], str, str]:
    """A conversational demonstration as (earlier turns, last user turn, last assistant turn)."""
    turns = _conversation(messages, what)
    if turns[-1]["role"] != "assistant":
        raise ValueError(f"{what} must end with an assistant turn (the demonstration to learn)")
    if len(turns) < 2 or turns[-2]["role"] != "user":
        raise ValueError(f"the last assistant turn in {what} must answer a user turn")
    return turns[:-2], turns[-2]["content"], turns[-1]["content"]


def _answer(value, what: str) -> str:
    """Text of a plain answer column, or of a conversational one holding exactly one assistant turn."""
    if not isinstance(value, list):  # text, or a wrong type the text check names
        return value
    turns = _conversation(value, what)
    if [t["role"] for t in turns] != ["assistant"]:
        raise ValueError(f"conversational {what} must be a single assistant turn")
    return turns[0]["content"]


def _prompt(value, what: str = "prompt") -> str | list[dict]:
    """A prompt column: text stays text, a conversation is checked (ending with a user turn)."""
    if not isinstance(value, list):  # text, or a wrong type the text check names
        return value
    turns = _conversation(value, what)
    check_conversation(turns, what)
    return turns if len(turns) > 1 else turns[0]["content"]


def implicit_pair(chosen, rejected) -> tuple[str | list[dict], str, str]:
    """(prompt, chosen answer, rejected answer) of a pair that repeats its prompt in both columns: the
    prompt is the longest common run of opening turns, and what follows must be one assistant turn each."""
    chosen_turns, rejected_turns = _as_turns(chosen, "chosen"), _as_turns(rejected, "rejected")
    shared = 0
    for a, b in zip(chosen_turns, rejected_turns):
        if a != b:
            break
        shared += 1
    if shared == 0:
        raise ValueError("chosen and rejected share no opening turns: an implicit-prompt pair repeats the same "
                         "conversation before its two answers")
    for what, turns in (("chosen", chosen_turns), ("rejected", rejected_turns)):
        tail = turns[shared:]
        if not tail:
            raise ValueError(f"{what} ends where the shared conversation ends: it holds no answer of its own")
        if [t["role"] for t in tail] != ["assistant"]:
            raise ValueError(f"after the {shared} shared turns, {what} continues with "
                             f"{' + '.join(t['role'] for t in tail)} turns: it must end in one assistant turn")
    prompt = chosen_turns[:shared]
    check_conversation(prompt)
    return (prompt if len(prompt) > 1 else prompt[0]["content"]), chosen_turns[-1]["content"], \
        rejected_turns[-1]["content"]


def _scores(row: dict) -> list | None:
    if row.get("scores") is not None:
        return row["scores"]
    if row.get("score_chosen") is not None or row.get("score_rejected") is not None:
        return [row.get("score_chosen"), row.get("score_rejected")]
    return None


def _extra(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in KNOWN_COLUMNS}


def normalise(row: dict, kind: str) -> dict:
    """One row in the store's own shape for its kind: demonstrations {instruction, input, output,
    context}; rankings {prompt (text or turns), responses, labeler, scores, extra}; prompts {prompt, extra}."""
    shape, _ = detect_shape(set(row))
    if kind == "demonstrations":
        if shape in ("messages", "sharegpt"):
            column = "messages" if shape == "messages" else "conversations"
            context, instruction, output = _split_messages(row[column], column)
            return {"instruction": instruction, "input": "", "output": output, "context": context or None}
        if shape == "prompt-completion":
            prompt = _prompt(row.get("prompt"))
            context, instruction = (None, prompt) if not isinstance(prompt, list) else (prompt[:-1], prompt[-1]["content"])
            return {"instruction": instruction, "input": "", "output": _answer(row.get("completion"), "completion"),
                    "context": context}
        return {"instruction": row.get("instruction"), "input": row.get("input") or "", "output": row.get("output")}
    if kind == "rankings":
        common = {"labeler": row.get("labeler"), "scores": _scores(row), "extra": _extra(row)}
        if shape == "ranking":
            return {"prompt": _prompt(row.get("prompt")), "responses": row.get("responses"), **common}
        if shape == "implicit pair":
            prompt, chosen, rejected = implicit_pair(row.get("chosen"), row.get("rejected"))
        else:
            prompt = _prompt(row.get("prompt"))
            chosen, rejected = _answer(row.get("chosen"), "chosen"), _answer(row.get("rejected"), "rejected")
        return {"prompt": prompt, "responses": [chosen, rejected], **common}
    return {"prompt": _prompt(row.get("prompt")), "extra": _extra(row)}


def read_rows(rows: list[tuple[int, dict]], name: str, columns: dict[str, str] | None = None
              ) -> tuple[str, str, list[dict]]:
    """(shape, kind, rows in the store's shape) of a file's rows; every row is checked, and the first
    bad one raises naming its line. Nothing is written."""
    rows = map_columns(rows, columns, name)
    shape, kind = detect_shape(set(rows[0][1]))
    normalised = []
    for number, row in rows:
        try:
            if detect_shape(set(row)) != (shape, kind):
                raise ValueError(f"columns {sorted(row)} differ from the first row's ({shape})")
            # Validate each row alone so the error can name its line.
            plain = normalise(row, kind)
            _check_row(row, plain, kind)
            normalised.append(plain)
        except ValueError as exc:
            raise ValueError(f"{name} line {number}: {exc}") from None
    return shape, kind, normalised


def write_rows(store: Store, kind: str, rows: list[dict]) -> int:
    """Rows from `read_rows` into the store, in one transaction."""
    if kind == "demonstrations":
        return len(store.add_demonstrations(rows, source="import"))
    if kind == "rankings":
        return len(store.add_rankings(rows, source="import"))
    return store.add_prompts([r["prompt"] for r in rows], source="import", extras=[r["extra"] for r in rows])


def import_file(store: Store, data: bytes, name: str, columns: dict[str, str] | None = None) -> tuple[str, int]:
    """Validate every row, then write them in one transaction. Returns (kind, rows written)."""
    _, kind, rows = read_rows(parse_rows(data, name), name, columns)
    return kind, write_rows(store, kind, rows)


def import_source(store: Store, source: str, columns: dict[str, str] | None = None) -> tuple[str, int]:
    """`import_file` for a path (file or saved dataset directory) or a hub dataset id."""
    _, kind, rows = read_rows(read_source(source), source, columns)
    return kind, write_rows(store, kind, rows)


def hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def read_source(source: str) -> list[tuple[int, dict]]:
    """(row number, row) pairs of a file, a saved dataset directory, or a hub dataset given as
    `owner/name`, `owner/name:config` or `owner/name:config@split` (split `train` by default), or a
    reasoning-gym set generated here, `reasoning-gym:NAME[:size=N][:seed=S]` (core/data/task_sets.py)."""
    from core.data.task_sets import is_task_set, task_rows

    if is_task_set(source):
        return task_rows(source)
    path = Path(source).expanduser()
    if path.exists() or path.suffix.lower() in (".jsonl", ".json", ".csv", ".parquet", ".txt"):
        return read_table(path)
    match = re.fullmatch(r"([\w.-]+/[\w.-]+)(?::([\w.-]+))?(?:@([\w.\[\]:%+-]+))?", source.strip())
    if not match:
        raise ValueError(f"{source!r} is neither a file here nor a hub dataset id (owner/name[:config][@split])")
    if hub_offline():
        raise ValueError(f"{source!r} is not a file here, and the hub is offline (HF_HUB_OFFLINE): download the "
                         "dataset on a connected machine (save_to_disk or to_json) and import that file")
    import datasets

    dataset_id, config_name, split = match.group(1), match.group(2), match.group(3) or "train"
    try:
        dataset = datasets.load_dataset(dataset_id, config_name, split=split)
    except Exception as exc:  # no network, no such dataset, gated, no such split: the hub's own words
        raise ValueError(f"could not load {dataset_id!r} (config {config_name}, split {split}) from the hub: "
                         f"{exc}") from None
    total = getattr(dataset, "dataset_size", 0) or 0
    if total > MAX_IMPORT_BYTES:
        raise ValueError(f"{dataset_id} split {split} is {total / 2**20:.0f} MB; the import limit is "
                         f"{MAX_IMPORT_BYTES // 2**20} MB: pick a smaller split, e.g. @train[:1000]")
    return _dataset_rows(dataset, dataset_id)


def preview(rows: list[tuple[int, dict]], name: str, columns: dict[str, str] | None = None, n: int = 5) -> dict:
    """What an import would do, before anything is written: the shape and kind detected, the mapping
    applied, the number of rows, and the first `n` rows as the store will hold them (every row is
    checked, so a bad line is reported here too)."""
    shape, kind, normalised = read_rows(rows, name, columns)
    return {"shape": shape, "kind": kind, "columns": columns or {}, "rows": len(normalised),
            "first": normalised[:n]}


def _check_row(row: dict, plain: dict, kind: str) -> None:
    """Check a row as the user wrote it, so messages name the user's columns (prompt/completion,
    chosen/rejected), not the store's."""
    if kind == "demonstrations":
        if "completion" in row and "messages" not in row:
            check_text(plain.get("instruction"), "prompt", MAX_PROMPT_CHARS)
            check_text(plain.get("output"), "completion", MAX_RESPONSE_CHARS)
        Store._check_demonstration(plain)
        return
    check_conversation(plain.get("prompt"))
    if kind == "rankings":
        if "responses" not in row:
            chosen = check_text(plain["responses"][0], "chosen", MAX_RESPONSE_CHARS)
            if chosen == check_text(plain["responses"][1], "rejected", MAX_RESPONSE_CHARS):
                raise ValueError("chosen and rejected are the same text: a tie, which a preference pair cannot express")
        responses = check_ranking(plain.get("responses"))
        check_scores(plain.get("scores"), len(responses))


def ranking_pairs(responses: list[str]) -> list[tuple[str, str]]:
    """A best-to-worst ranking as its C(K,2) (chosen, rejected) pairs, as TRL's RewardTrainer wants."""
    return list(itertools.combinations(responses, 2))


def _uniform(rows: list[dict]) -> list[dict]:
    """Optional columns (labeler, scores, extra) in every row when any row has them: one header per file."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return [{k: r.get(k) for k in keys} for r in rows]


def export_rows(store: Store, kind: str) -> list[dict]:
    """The store's rows in the shapes `import_file` reads: prompt/completion or messages for
    demonstrations, prompt/responses for rankings, prompt/chosen/rejected for pairs, prompt for prompts.
    A prompt with earlier turns is written as its conversation (and pairs' answers as assistant turns,
    TRL's conversational shape); labeler, scores and extra columns are kept."""
    if kind == "demonstrations":
        demos = store.list_demonstrations()
        if any(d["context"] for d in demos):  # one shape per file: conversational when any is multi-turn
            return [{"messages": [*(d["context"] or []), {"role": "user", "content": d["prompt"]},
                                  {"role": "assistant", "content": d["output"]}]} for d in demos]
        return [{"prompt": d["prompt"], "completion": d["output"]} for d in demos]
    if kind == "rankings":
        return _uniform([{"prompt": as_prompt(r["turns"]), "responses": r["responses"], "labeler": r["labeler"],
                          **({"scores": r["scores"]} if r["scores"] else {}), **r["extra"]}
                         for r in store.list_rankings()])
    if kind == "pairs":
        rankings = store.list_rankings()
        conversational = any(len(r["turns"]) > 1 for r in rankings)
        answer = (lambda text: [{"role": "assistant", "content": text}]) if conversational else (lambda text: text)
        rows = []
        for r in rankings:
            index = {text: i for i, text in enumerate(r["responses"])}
            for chosen, rejected in ranking_pairs(r["responses"]):
                row = {"prompt": r["turns"] if conversational else r["prompt"], "chosen": answer(chosen),
                       "rejected": answer(rejected)}
                if r["labeler"]:
                    row["labeler"] = r["labeler"]
                if r["scores"]:
                    row["score_chosen"], row["score_rejected"] = r["scores"][index[chosen]], r["scores"][index[rejected]]
                rows.append({**row, **r["extra"]})
        return _uniform(rows)
    if kind == "prompts":
        return _uniform([{"prompt": as_prompt(p["turns"]), **p["extra"]} for p in store.list_prompts()])
    raise ValueError(f"unknown export kind {kind!r}: demonstrations, rankings, pairs or prompts")


def export_jsonl(store: Store, kind: str) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in export_rows(store, kind))


def export_csv(store: Store, kind: str) -> str:
    """CSV of `export_rows`; lists (responses, conversations, scores) are JSON in their cells."""
    rows = export_rows(store, kind)
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v
                             for k, v in r.items()})
    return out.getvalue()
