"""The workbench's SQLite store: prompts, demonstrations, rankings, runs, metrics, checkpoints.

WAL mode, one short transaction per write and a busy timeout, so several labelers and a
training job can write at once. Every user input is validated before a transaction starts:
a bad row raises ValueError and nothing is written.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from core.paths import data_home, pid_alive, validate_name

MAX_PROMPT_CHARS = 2000
MAX_RESPONSE_CHARS = 4000
MIN_K, MAX_K = 2, 9
RUN_STATUSES = ("queued", "running", "stopping", "done", "failed", "interrupted", "stopped")
ACTIVE_STATUSES = ("queued", "running", "stopping")
# A live owner refreshes its runs' heartbeat every HEARTBEAT_S; one silent for STALE_AFTER_S is gone
# (killed, or its machine rebooted) even if its process id has been reused since.
HEARTBEAT_S = 5.0
STALE_AFTER_S = 60.0
MAX_LOG_LINES = 500  # per run: a short log, not a console capture

SCHEMA = """
CREATE TABLE IF NOT EXISTS prompts (
    id INTEGER PRIMARY KEY,
    text TEXT NOT NULL UNIQUE,
    source TEXT NOT NULL DEFAULT 'user',
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS demonstrations (
    id INTEGER PRIMARY KEY,
    prompt_id INTEGER NOT NULL REFERENCES prompts(id) ON DELETE CASCADE,
    instruction TEXT NOT NULL,
    input TEXT NOT NULL DEFAULT '',
    output TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rankings (
    id INTEGER PRIMARY KEY,
    prompt_id INTEGER NOT NULL REFERENCES prompts(id) ON DELETE CASCADE,
    responses TEXT NOT NULL,           -- JSON list, best to worst
    labeler TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    stage TEXT NOT NULL,
    status TEXT NOT NULL,
    config TEXT NOT NULL,
    output_dir TEXT,
    error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS run_log (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    created_at REAL NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS run_log_by_run ON run_log(run_id, id);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step INTEGER NOT NULL,
    name TEXT NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (run_id, name, step)
);
CREATE INDEX IF NOT EXISTS metrics_by_run_step ON metrics(run_id, step);
CREATE TABLE IF NOT EXISTS checkpoints (
    id INTEGER PRIMARY KEY,
    run_id TEXT REFERENCES runs(id) ON DELETE SET NULL,
    name TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,                -- base | sft | rm | ppo
    step INTEGER NOT NULL DEFAULT 0,
    path TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS demonstrations_by_prompt ON demonstrations(prompt_id);
CREATE INDEX IF NOT EXISTS rankings_by_prompt ON rankings(prompt_id);
"""


# Numbered schema changes after SCHEMA (version 0), applied in order to a database whose
# `PRAGMA user_version` is below their number; each runs in one transaction after a backup copy.
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (1, "conversations: prompts carry their earlier turns and extra columns, rankings their scores", """
        -- A prompt's identity becomes (last user turn, earlier turns): the same question after
        -- different conversations is two prompts. SQLite cannot drop a UNIQUE constraint in place, so
        -- the table is rebuilt (sqlite.org/lang_altertable.html, "making other kinds of changes").
        CREATE TABLE prompts_v1 (
            id INTEGER PRIMARY KEY,
            text TEXT NOT NULL,                -- the last user turn
            context TEXT,                      -- JSON list of the earlier {role, content} turns, NULL if none
            extra TEXT,                        -- JSON object of the row's other columns, NULL if none
            source TEXT NOT NULL DEFAULT 'user',
            created_at REAL NOT NULL
        );
        INSERT INTO prompts_v1(id, text, source, created_at) SELECT id, text, source, created_at FROM prompts;
        DROP TABLE prompts;
        ALTER TABLE prompts_v1 RENAME TO prompts;
        CREATE UNIQUE INDEX prompts_by_conversation ON prompts(text, IFNULL(context, ''));
        ALTER TABLE rankings ADD COLUMN scores TEXT;  -- JSON list, one number (or null) per response
    """),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]


def migrate(conn: sqlite3.Connection, path: Path, backup: bool = True) -> int:
    """Bring a database to SCHEMA_VERSION; returns the version it had. Before the first pending step,
    an existing file is copied to `<name>.v<version>.bak`; each step then runs in one transaction, so a
    failure leaves the database (and every row) as it was."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise ValueError(f"{path} was written by a newer workbench (schema {version}, this one knows "
                         f"{SCHEMA_VERSION}); upgrade the workbench to open it")
    if version == SCHEMA_VERSION:
        return version
    if backup:
        with sqlite3.connect(f"{path}.v{version}.bak") as copy:
            conn.backup(copy)
    # A table rebuild must not cascade the old table's deletion into its children; the pragma only
    # takes effect outside a transaction.
    conn.execute("PRAGMA foreign_keys=OFF")
    try:
        for number, _, sql in MIGRATIONS:
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Another process may have migrated meanwhile: the version is read under the write lock.
                if conn.execute("PRAGMA user_version").fetchone()[0] >= number:
                    conn.execute("ROLLBACK")
                    continue
                for statement in _statements(sql):
                    conn.execute(statement)
                broken = conn.execute("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise sqlite3.IntegrityError(f"migration {number} would break {len(broken)} references")
                conn.execute(f"PRAGMA user_version = {number}")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
    finally:
        conn.execute("PRAGMA foreign_keys=ON")
    return version


def _statements(sql: str) -> list[str]:
    """A migration's statements one by one (executescript would commit the open transaction)."""
    out, current = [], ""
    for line in sql.splitlines():
        current += line.split("--", 1)[0] + "\n"
        if sqlite3.complete_statement(current):
            out.append(current.strip())
            current = ""
    return [s for s in out if s.strip(" ;\n")]


def check_text(value, what: str, limit: int) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be text, got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise ValueError(f"{what} is empty")
    if len(text) > limit:
        raise ValueError(f"{what} is {len(text)} characters long; the limit is {limit}")
    return text


def check_context(context) -> None:
    """The earlier turns of a multi-turn demonstration: None, or a list of {role, content} turns
    (system, user, assistant) of text, within the prompt size limit altogether."""
    if context is None:
        return
    if not isinstance(context, list) or not all(
            isinstance(t, dict) and t.get("role") in ("system", "user", "assistant") and isinstance(t.get("content"), str)
            for t in context):
        raise ValueError("the earlier turns must be a list of {role: system|user|assistant, content: text}")
    if sum(len(t["content"]) for t in context) > MAX_PROMPT_CHARS * 4:
        raise ValueError(f"the earlier turns are longer than {MAX_PROMPT_CHARS * 4} characters")


def check_conversation(turns, what: str = "prompt") -> tuple[list[dict] | None, str]:
    """A prompt as a conversation: system turns first, then user and assistant turns alternating,
    ending with the user turn the model answers. Returns (the earlier turns or None, the last user
    turn's text); every turn must hold text, and the whole must fit the prompt size limit."""
    if isinstance(turns, str):
        return None, check_text(turns, what, MAX_PROMPT_CHARS)
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{what} must be text or a non-empty list of {{role, content}} turns")
    cleaned = []
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or turn.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"turn {i} of the {what} must be {{role: system|user|assistant, content: text}}")
        content = turn.get("content")
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"turn {i} of the {what} ({turn['role']}) is empty")
        cleaned.append({"role": turn["role"], "content": content.strip()})
    roles = [t["role"] for t in cleaned]
    first = next((i for i, r in enumerate(roles) if r != "system"), len(roles))
    for i, role in enumerate(roles[first:], first):
        expected = "user" if (i - first) % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"turn {i + 1} of the {what} is a {role} turn where a {expected} turn belongs "
                             "(system turns first, then user and assistant alternating)")
    if roles[-1] != "user":
        raise ValueError(f"the {what} must end with a user turn (the one the model answers), not a {roles[-1]} turn")
    total = sum(len(t["content"]) for t in cleaned)
    if total > MAX_PROMPT_CHARS * 4:
        raise ValueError(f"the {what}'s turns hold {total} characters; the limit is {MAX_PROMPT_CHARS * 4}")
    text = check_text(cleaned[-1]["content"], f"the {what}'s last user turn", MAX_PROMPT_CHARS)
    return cleaned[:-1] or None, text


def prompt_turns(text: str, context: list[dict] | None) -> list[dict]:
    """The whole conversation of a stored prompt: its earlier turns, then its own user turn."""
    return [*(context or []), {"role": "user", "content": text}]


def as_prompt(turns: list[dict]) -> str | list[dict]:
    """A stored prompt's turns as a stage takes it and a file writes it: a single user turn stays plain
    text (as before conversations were stored, so single-turn data trains and exports exactly as it did)."""
    return turns[0]["content"] if len(turns) == 1 and turns[0]["role"] == "user" else turns


def prompt_display(prompt: str | list[dict]) -> str:
    """A prompt as one text for a table or log: a conversation as its turns, one "role: content" a line."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{t['role']}: {t['content']}" for t in prompt)


def check_extra(extra, what: str = "extra columns") -> dict:
    """A row's other columns (an `answer` a reward term checks against): a JSON object, kept as is."""
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise ValueError(f"{what} must be a mapping of column name to value")
    try:
        encoded = json.dumps(extra, ensure_ascii=False)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must hold JSON values (text, numbers, lists)") from None
    if len(encoded) > MAX_PROMPT_CHARS * 4:
        raise ValueError(f"{what} take {len(encoded)} characters; the limit is {MAX_PROMPT_CHARS * 4}")
    return extra


def check_scores(scores, k: int) -> list[float] | None:
    """Optional scores beside a ranking's responses (a dataset's score_chosen/score_rejected)."""
    if scores is None:
        return None
    if not isinstance(scores, list) or len(scores) != k:
        raise ValueError(f"scores must be a list of {k} numbers, one per response")
    out = []
    for s in scores:
        if s is None:
            out.append(None)
            continue
        try:
            value = float(s)
        except (TypeError, ValueError):
            raise ValueError(f"score {s!r} is not a number") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"score {s!r} is not a finite number")
        out.append(value)
    return out


def check_ranking(responses) -> list[str]:
    """A ranking is K = 2..9 distinct responses, best first. Ties cannot be expressed and
    duplicates would be a tie with itself, so both are rejected, naming the offender."""
    if not isinstance(responses, list):
        raise ValueError("a ranking's responses must be a list ordered best to worst")
    if not MIN_K <= len(responses) <= MAX_K:
        raise ValueError(f"a ranking needs between {MIN_K} and {MAX_K} responses (K), got K = {len(responses)}")
    cleaned = [check_text(r, f"response {i + 1}", MAX_RESPONSE_CHARS) for i, r in enumerate(responses)]
    seen: dict[str, int] = {}
    for i, r in enumerate(cleaned):
        if r in seen:
            raise ValueError(
                f"responses {seen[r] + 1} and {i + 1} are the same text; a ranking needs distinct answers "
                "(a duplicate would tie with itself)"
            )
        seen[r] = i
    return cleaned


def check_ranks(ranks, k: int) -> list[int]:
    """Optional explicit ranks (1 = best) beside the responses: they must be a strict order."""
    if not isinstance(ranks, list) or len(ranks) != k or not all(isinstance(r, int) for r in ranks):
        raise ValueError(f"ranks must be a list of {k} integers (1 = best)")
    if len(set(ranks)) != k:
        tied = sorted({r for r in ranks if ranks.count(r) > 1})
        raise ValueError(f"the ranking has a tie at rank {tied[0]}; order every answer strictly (no ties)")
    if sorted(ranks) != list(range(1, k + 1)):
        raise ValueError(f"ranks must be 1..{k}, got {ranks}")
    return ranks


class Store:
    """One SQLite file. Safe to share between threads: each call opens its own connection."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else data_home() / "workbench.db"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        # executescript commits any open transaction itself, so it runs outside `_tx`.
        fresh = not self._conn().execute("SELECT 1 FROM sqlite_master WHERE name = 'prompts'").fetchone()
        self._conn().executescript(SCHEMA)
        self._migrate()
        migrate(self._conn(), self.path, backup=not fresh)
        self._heartbeat_lock = threading.Lock()
        self._heartbeat_thread: threading.Thread | None = None

    def _migrate(self) -> None:
        """Columns added after the first release, added in place to an older database file. The columns are
        read under the write lock: two processes opening one older file at once (two `rlhf` commands started
        together) would otherwise both see a column missing and the second ALTER would fail."""
        with self._tx() as conn:
            have = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
            # `launch`: a job manager's subprocess job's launch request (JSON, see `create_run`); NULL for the rest.
            for column, kind in (("owner_pid", "INTEGER"), ("owner_host", "TEXT"), ("heartbeat", "REAL"),
                                 ("launch", "TEXT")):
                if column not in have:
                    conn.execute(f"ALTER TABLE runs ADD COLUMN {column} {kind}")
            # A multi-turn demonstration keeps the turns before its last exchange (JSON list of {role, content}).
            if "context" not in {row[1] for row in conn.execute("PRAGMA table_info(demonstrations)")}:
                conn.execute("ALTER TABLE demonstrations ADD COLUMN context TEXT")

    # -- plumbing ------------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoint, no torn writes
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A short write transaction; IMMEDIATE takes the write lock up front, so two writers
        wait on the busy timeout instead of failing mid-transaction."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _rows(self, sql: str, args: Iterable = ()) -> list[dict]:
        return [dict(r) for r in self._conn().execute(sql, tuple(args)).fetchall()]

    def counts(self) -> dict[str, int]:
        tables = ("prompts", "demonstrations", "rankings", "runs", "metrics", "checkpoints", "run_log")
        return {t: self._conn().execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in tables}

    # -- prompts -------------------------------------------------------------------------------

    @staticmethod
    def _prompt_id(db: sqlite3.Connection, text: str, source: str, context: list[dict] | None = None,
                   extra: dict | None = None) -> int:
        """The prompt with this last user turn after these earlier turns, added if new; a row's extra
        columns, when it brings any, replace the stored ones."""
        context_json = json.dumps(context, ensure_ascii=False) if context else None
        extra_json = json.dumps(extra, ensure_ascii=False) if extra else None
        row = db.execute("SELECT id FROM prompts WHERE text = ? AND IFNULL(context, '') = ?",
                         (text, context_json or "")).fetchone()
        if row:
            if extra_json:
                db.execute("UPDATE prompts SET extra = ? WHERE id = ?", (extra_json, row[0]))
            return row[0]
        return db.execute(
            "INSERT INTO prompts(text, context, extra, source, created_at) VALUES (?, ?, ?, ?, ?)",
            (text, context_json, extra_json, source, time.time())
        ).lastrowid

    def add_prompt(self, text: str | list[dict], source: str = "user", extra: dict | None = None) -> int:
        """A prompt: one user turn's text, or a conversation ending with the user turn to answer."""
        context, text = check_conversation(text)
        extra = check_extra(extra)
        with self._tx() as db:
            return self._prompt_id(db, text, source, context, extra)

    def add_prompts(self, texts: list[str | list[dict]], source: str = "import",
                    extras: list[dict | None] | None = None) -> int:
        """Many prompts (texts or conversations) in one transaction; `extras`: each row's other columns."""
        extras = extras if extras is not None else [None] * len(texts)
        if len(extras) != len(texts):
            raise ValueError(f"{len(extras)} extra-column rows for {len(texts)} prompts")
        checked = [(*check_conversation(t), check_extra(e)) for t, e in zip(texts, extras)]
        with self._tx() as db:
            for context, text, extra in checked:
                self._prompt_id(db, text, source, context, extra)
        return len(checked)

    @staticmethod
    def _clash(db: sqlite3.Connection, prompt_id: int, text: str) -> int | None:
        """Another prompt that already has this last user turn after the same earlier turns."""
        row = db.execute(
            """SELECT id FROM prompts WHERE text = ? AND id != ? AND IFNULL(context, '') =
                   (SELECT IFNULL(context, '') FROM prompts WHERE id = ?)""", (text, prompt_id, prompt_id)).fetchone()
        return row[0] if row else None

    def update_prompt(self, prompt_id: int, text: str) -> None:
        text = check_text(text, "prompt", MAX_PROMPT_CHARS)
        with self._tx() as db:
            clash = self._clash(db, prompt_id, text)
            if clash:
                raise ValueError(f"another prompt (id {clash}) already has this text")
            if db.execute("UPDATE prompts SET text = ? WHERE id = ?", (text, prompt_id)).rowcount == 0:
                raise ValueError(f"no prompt with id {prompt_id}")

    def update_prompts(self, changes: dict[int, str], added: Iterable[str] = (), deleted: Iterable[int] = (),
                       source: str = "user") -> None:
        """One table save: edit, add and delete prompts in a single transaction, so a clash in any
        row writes nothing. Edits are applied first, then adds, then deletes."""
        checked = {pid: check_text(text, f"prompt {pid}", MAX_PROMPT_CHARS) for pid, text in changes.items()}
        new_texts = [check_text(t, "new prompt", MAX_PROMPT_CHARS) for t in added]
        # Two edits to the same text (after the same earlier turns) would only fail mid-transaction.
        contexts = {r["id"]: r["context"] for r in self._rows("SELECT id, context FROM prompts")} if checked else {}
        edited_to: dict[tuple[str, str | None], int] = {}
        for pid, text in checked.items():
            key = (text, contexts.get(pid))
            if key in edited_to:
                raise ValueError(f"prompts {edited_to[key]} and {pid} are both edited to the same text {text[:80]!r}")
            edited_to[key] = pid
        with self._tx() as db:
            for pid, text in checked.items():
                clash = self._clash(db, pid, text)
                if clash:
                    raise ValueError(
                        f"prompt {pid} cannot become {text[:80]!r}: prompt {clash} already has this text")
                if db.execute("UPDATE prompts SET text = ? WHERE id = ?", (text, pid)).rowcount == 0:
                    raise ValueError(f"no prompt with id {pid}")
            for text in new_texts:
                self._prompt_id(db, text, source)
            db.executemany("DELETE FROM prompts WHERE id = ?", [(pid,) for pid in deleted])

    def delete_prompt(self, prompt_id: int) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM prompts WHERE id = ?", (prompt_id,))

    @staticmethod
    def _with_conversation(row: dict, text_key: str = "text") -> dict:
        """A prompt row's JSON columns read back: `turns` (the whole conversation, ending with the
        prompt's user turn) and `extra` (its other columns, {} if none)."""
        context = json.loads(row.pop("context")) if row.get("context") else None
        row["turns"] = prompt_turns(row[text_key], context)
        row["extra"] = json.loads(row["extra"]) if row.get("extra") else {}
        return row

    def get_prompt(self, prompt_id: int) -> dict:
        rows = self._rows("SELECT * FROM prompts WHERE id = ?", (prompt_id,))
        if not rows:
            raise ValueError(f"no prompt with id {prompt_id}")
        return self._with_conversation(rows[0])

    def list_prompts(self) -> list[dict]:
        """Every prompt: id, text (its last user turn), source, turns, extra, and how many
        demonstrations and rankings it has."""
        return [self._with_conversation(r) for r in self._rows(
            """SELECT p.id, p.text, p.source, p.context, p.extra,
                      (SELECT COUNT(*) FROM demonstrations d WHERE d.prompt_id = p.id) AS demonstrations,
                      (SELECT COUNT(*) FROM rankings r WHERE r.prompt_id = p.id) AS rankings
               FROM prompts p ORDER BY p.id"""
        )]

    # -- demonstrations ------------------------------------------------------------------------

    @staticmethod
    def _check_demonstration(row: dict) -> tuple[str, str, str]:
        instruction = check_text(row.get("instruction"), "instruction", MAX_PROMPT_CHARS)
        inp = row.get("input") or ""
        if not isinstance(inp, str) or len(inp) > MAX_PROMPT_CHARS:
            raise ValueError(f"input must be text of at most {MAX_PROMPT_CHARS} characters")
        output = check_text(row.get("output"), "output", MAX_RESPONSE_CHARS)
        check_context(row.get("context"))
        return instruction, inp.strip(), output

    @staticmethod
    def prompt_text(instruction: str, inp: str = "") -> str:
        """Instruction-tuning rows (instruction, input) become one prompt, Alpaca style."""
        return f"{instruction}\n{inp}" if inp else instruction

    def add_demonstrations(self, rows: list[dict], source: str = "user") -> list[int]:
        for r in rows:  # every row checked before the transaction starts
            self._check_demonstration(r)
        with self._tx() as db:
            return [self.insert_demonstration(db, r, source) for r in rows]

    @classmethod
    def insert_demonstration(cls, db: sqlite3.Connection, row: dict, source: str = "user") -> int:
        """One demonstration inside a caller's transaction (see `insert_ranking`)."""
        instruction, inp, output = cls._check_demonstration(row)
        pid = cls._prompt_id(db, cls.prompt_text(instruction, inp), source, row.get("context") or None)
        context = json.dumps(row["context"]) if row.get("context") else None
        return db.execute(
            "INSERT INTO demonstrations(prompt_id, instruction, input, output, context, created_at) VALUES (?,?,?,?,?,?)",
            (pid, instruction, inp, output, context, time.time()),
        ).lastrowid

    def add_demonstration(self, instruction: str, output: str, input: str = "") -> int:
        return self.add_demonstrations([{"instruction": instruction, "input": input, "output": output}])[0]

    def update_demonstration(self, demo_id: int, instruction: str, output: str, input: str = "") -> None:
        instruction, inp, output = self._check_demonstration({"instruction": instruction, "input": input, "output": output})
        with self._tx() as db:
            # The edited demonstration keeps its earlier turns, so it stays linked to their prompt.
            row = db.execute("SELECT context FROM demonstrations WHERE id = ?", (demo_id,)).fetchone()
            context = json.loads(row[0]) if row and row[0] else None
            pid = self._prompt_id(db, self.prompt_text(instruction, inp), "user", context)
            n = db.execute(
                "UPDATE demonstrations SET prompt_id=?, instruction=?, input=?, output=? WHERE id=?",
                (pid, instruction, inp, output, demo_id),
            ).rowcount
            if n == 0:
                raise ValueError(f"no demonstration with id {demo_id}")

    def delete_demonstration(self, demo_id: int) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM demonstrations WHERE id = ?", (demo_id,))

    def list_demonstrations(self) -> list[dict]:
        rows = self._rows(
            """SELECT d.id, d.prompt_id, p.text AS prompt, d.instruction, d.input, d.output, d.context
               FROM demonstrations d JOIN prompts p ON p.id = d.prompt_id ORDER BY d.id"""
        )
        for r in rows:
            r["context"] = json.loads(r["context"]) if r["context"] else None
        return rows

    # -- rankings ------------------------------------------------------------------------------

    def add_ranking(self, prompt_id: int, responses: list[str], labeler: str = "",
                    scores: list[float | None] | None = None) -> int:
        """Store one ranking (best to worst) for a prompt that already exists."""
        responses = check_ranking(responses)  # checked before the transaction starts
        scores = check_scores(scores, len(responses))
        with self._tx() as db:
            return self.insert_ranking(db, prompt_id, responses, labeler, scores)

    @staticmethod
    def insert_ranking(db: sqlite3.Connection, prompt_id: int, responses: list[str], labeler: str = "",
                       scores: list[float | None] | None = None) -> int:
        """`add_ranking` inside a caller's transaction (the labeling server marks the queue item
        done in the same one, so a ranking is stored exactly once)."""
        responses = check_ranking(responses)
        scores = check_scores(scores, len(responses))
        labeler = (labeler or "").strip()[:100]
        if not db.execute("SELECT 1 FROM prompts WHERE id = ?", (prompt_id,)).fetchone():
            raise ValueError(f"no prompt with id {prompt_id}: add the prompt before ranking answers to it")
        return db.execute(
            "INSERT INTO rankings(prompt_id, responses, labeler, scores, created_at) VALUES (?,?,?,?,?)",
            (prompt_id, json.dumps(responses), labeler, json.dumps(scores) if scores else None, time.time()),
        ).lastrowid

    def add_rankings(self, rows: list[dict], source: str = "import") -> list[int]:
        """Rankings keyed by their prompt (text or conversation; created as needed), all or nothing.
        A row: {"prompt", "responses", optional "labeler", "scores" (one per response), "extra"}."""
        checked = []
        for r in rows:
            context, prompt = check_conversation(r.get("prompt"))
            responses = check_ranking(r.get("responses"))
            checked.append((context, prompt, responses, str(r.get("labeler") or "")[:100],
                            check_scores(r.get("scores"), len(responses)), check_extra(r.get("extra"))))
        with self._tx() as db:
            return [
                db.execute(
                    "INSERT INTO rankings(prompt_id, responses, labeler, scores, created_at) VALUES (?,?,?,?,?)",
                    (self._prompt_id(db, prompt, source, context, extra), json.dumps(responses), labeler,
                     json.dumps(scores) if scores else None, time.time()),
                ).lastrowid
                for context, prompt, responses, labeler, scores, extra in checked
            ]

    def list_rankings(self, prompt_id: int | None = None) -> list[dict]:
        """Every ranking: id, prompt_id, prompt (its last user turn), turns (the whole conversation),
        extra (the prompt's other columns), responses (best first), labeler, scores (or None)."""
        where, args = ("WHERE r.prompt_id = ?", (prompt_id,)) if prompt_id is not None else ("", ())
        rows = self._rows(
            f"""SELECT r.id, r.prompt_id, p.text AS prompt, p.context, p.extra, r.responses, r.labeler, r.scores,
                       r.created_at
                FROM rankings r JOIN prompts p ON p.id = r.prompt_id {where} ORDER BY r.id""",
            args,
        )
        for r in rows:
            self._with_conversation(r, "prompt")
            r["responses"] = json.loads(r["responses"])
            r["scores"] = json.loads(r["scores"]) if r["scores"] else None
        return rows

    # -- runs, metrics, checkpoints ------------------------------------------------------------

    def create_run(self, run_id: str, stage: str, config: dict, output_dir: str | None = None,
                   launch: dict | None = None) -> str:
        """Record a new run, queued and owned by this process (see `claim_run`).

        `launch`: how a job manager runs it in a subprocess, `{"processes": N, "accelerate_config": path or
        None}`, plus `"stop_file"` once launched (`set_run_launch`); None for a run in the owner's process.
        A restarted server resumes and stops the run from it (core/runs/jobs.py)."""
        validate_name(run_id, "run name")
        now = time.time()
        with self._tx() as db:
            if db.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone():
                raise ValueError(f"a run named {run_id!r} already exists; pick another name")
            db.execute(
                """INSERT INTO runs(id, stage, status, config, output_dir, created_at, updated_at,
                                    owner_pid, owner_host, heartbeat, launch) VALUES (?,?,?,?,?,?,?,?,?,?,?)""",
                (run_id, stage, "queued", json.dumps(config), output_dir, now, now, os.getpid(),
                 socket.gethostname(), now, json.dumps(launch) if launch else None),
            )
        self._start_heartbeat()
        return run_id

    def set_run_status(self, run_id: str, status: str, error: str | None = None,
                       only_from: tuple[str, ...] | None = None) -> bool:
        """Set a run's status; with `only_from`, only if its status is one of those (in the same
        transaction: a run that ended meanwhile keeps its final status). True if the row changed."""
        if status not in RUN_STATUSES:
            raise ValueError(f"unknown run status {status!r}")
        sql, args = "UPDATE runs SET status = ?, error = ?, updated_at = ? WHERE id = ?", [status, error, time.time(), run_id]
        if only_from is not None:
            sql += f" AND status IN ({','.join('?' * len(only_from))})"
            args += list(only_from)
        with self._tx() as db:
            return db.execute(sql, args).rowcount > 0

    def set_run_launch(self, run_id: str, launch: dict | None) -> None:
        """Replace a run's launch request (see `create_run`)."""
        with self._tx() as db:
            db.execute("UPDATE runs SET launch = ? WHERE id = ?", (json.dumps(launch) if launch else None, run_id))

    def start_run(self, run_id: str, stage: str, config_dict: dict, output_dir: str | None,
                  handover_from: int | None = None) -> None:
        """Create the run, or take over the same run again (a resume in place: same name, same curves).

        Taking over is refused for a run another live process is writing, or one whose config differs
        (its checkpoints would continue a different experiment)."""
        try:
            run = self.get_run(run_id)
        except ValueError:
            self.create_run(run_id, stage, config_dict, output_dir)
            self.set_run_status(run_id, "running")
            return
        if run["stage"] != stage:
            raise ValueError(f"a run named {run_id!r} already exists for stage {run['stage']}; pick another name")
        if run["config"] != config_dict:
            changed = sorted(k for k in {**run["config"], **config_dict} if run["config"].get(k) != config_dict.get(k))
            raise ValueError(f"run {run_id!r} exists with another config (differs in: {', '.join(changed)}); "
                             "resume it with the same options or pick another name")
        if output_dir and run["output_dir"] and os.path.abspath(run["output_dir"]) != os.path.abspath(output_dir):
            raise ValueError(f"run {run_id!r} writes to {run['output_dir']}; resume it with that output directory "
                             "or pick another name")
        self.claim_run(run_id, handover_from=handover_from)
        if handover_from is None and (run["launch"] or {}).get("stop_file"):
            # Resumed outside a job manager (`rlhf <stage> --name <run>` in a terminal): this process polls
            # no stop file, so a job manager must not offer to stop it through one.
            self.set_run_launch(run_id, {k: v for k, v in run["launch"].items() if k != "stop_file"})

    def claim_run(self, run_id: str, status: str = "running", handover_from: int | None = None) -> None:
        """This process takes over a run (a resume): it becomes the owner whose heartbeat keeps the
        run live. Refused while another live process owns it: two writers on one output directory.
        `handover_from`: the pid of the job manager that launched this process for this run."""
        run = self.get_run(run_id)
        if (run["status"] in ACTIVE_STATUSES and run["owner_pid"] not in (os.getpid(), handover_from)
                and self.owner_alive(run)):
            raise ValueError(f"run {run_id!r} is {run['status']} in another live process (pid {run['owner_pid']}); "
                             "stop it there first")
        now = time.time()
        with self._tx() as db:
            db.execute("""UPDATE runs SET status = ?, error = NULL, updated_at = ?, owner_pid = ?, owner_host = ?,
                          heartbeat = ? WHERE id = ?""", (status, now, os.getpid(), socket.gethostname(), now, run_id))
        self._start_heartbeat()

    @staticmethod
    def owner_alive(run: dict) -> bool:
        """Is the process that owns this run still there? Its heartbeat must be fresh and, on this
        machine, its process must exist. Runs from before owners were recorded have none: gone."""
        if run.get("owner_pid") is None or run.get("heartbeat") is None:
            return False
        if time.time() - run["heartbeat"] > STALE_AFTER_S:
            return False
        return run.get("owner_host") != socket.gethostname() or pid_alive(int(run["owner_pid"]))

    def _start_heartbeat(self) -> None:
        """One daemon thread per store refreshes the heartbeat of every active run this process owns;
        it ends by itself once there are none."""
        with self._heartbeat_lock:
            if self._heartbeat_thread is not None and self._heartbeat_thread.is_alive():
                return
            self._heartbeat_thread = threading.Thread(target=self._beat, name="run-heartbeat", daemon=True)
            self._heartbeat_thread.start()

    def beat(self) -> int:
        """Refresh this process's active runs; returns how many there are."""
        marks = ",".join("?" * len(ACTIVE_STATUSES))
        with self._tx() as db:
            return db.execute(
                f"UPDATE runs SET heartbeat = ? WHERE owner_pid = ? AND owner_host = ? AND status IN ({marks})",
                (time.time(), os.getpid(), socket.gethostname(), *ACTIVE_STATUSES)).rowcount

    def _beat(self) -> None:
        while True:
            try:
                if self.beat() == 0:
                    with self._heartbeat_lock:
                        self._heartbeat_thread = None
                    return
            except sqlite3.Error:
                pass  # a busy or vanished database: try again at the next beat
            time.sleep(HEARTBEAT_S)

    def get_run(self, run_id: str) -> dict:
        rows = self._rows("SELECT * FROM runs WHERE id = ?", (run_id,))
        if not rows:
            raise ValueError(f"no run named {run_id!r}")
        run = rows[0]
        run["config"] = json.loads(run["config"])
        run["launch"] = json.loads(run["launch"]) if run.get("launch") else None
        return run

    def list_runs(self) -> list[dict]:
        return self._rows("""SELECT id, stage, status, output_dir, error, created_at, updated_at, owner_pid,
                                    owner_host, heartbeat FROM runs ORDER BY created_at""")

    def add_log(self, run_id: str, message: str) -> None:
        """A line of the run's log (resume notices, epoch summaries): the Train page shows it."""
        with self._tx() as db:
            db.execute("INSERT INTO run_log(run_id, created_at, message) VALUES (?,?,?)",
                       (run_id, time.time(), str(message)[:2000]))
            db.execute("""DELETE FROM run_log WHERE run_id = ? AND id NOT IN
                          (SELECT id FROM run_log WHERE run_id = ? ORDER BY id DESC LIMIT ?)""",
                       (run_id, run_id, MAX_LOG_LINES))

    def run_log(self, run_id: str, limit: int = 50) -> list[dict]:
        """The run's latest log lines, oldest first."""
        rows = self._rows("SELECT created_at, message FROM run_log WHERE run_id = ? ORDER BY id DESC LIMIT ?",
                          (run_id, int(limit)))
        return rows[::-1]

    def log_metrics(self, run_id: str, step: int, values: dict[str, float]) -> None:
        """One step's metrics in one short transaction; re-logging a step (after a resume) overwrites it."""
        rows = [(run_id, int(step), k, float(v)) for k, v in values.items() if v is not None and v == v]
        with self._tx() as db:
            db.executemany("INSERT OR REPLACE INTO metrics(run_id, step, name, value) VALUES (?,?,?,?)", rows)

    def metrics(self, run_ids: list[str], names: list[str] | None = None, max_points: int | None = None) -> list[dict]:
        """Rows (run_id, step, name, value); with `max_points`, long curves are thinned evenly
        per run so the Monitor page stays quick on a 2,000-step run."""
        if not run_ids:
            return []
        marks = ",".join("?" * len(run_ids))
        args: list = list(run_ids)
        sql = f"SELECT run_id, step, name, value FROM metrics WHERE run_id IN ({marks})"
        if names:
            sql += f" AND name IN ({','.join('?' * len(names))})"
            args += names
        if max_points:
            # Thin each curve (run, name) on its own, by position rather than step value: every
            # e-th point plus the latest, e = ceil((n - 1) / (max_points - 1)), so a curve has at most
            # max_points points, the Monitor shows the current value, and a sparse curve (an
            # evaluation every 25 steps) is never thinned away by a dense one's spacing.
            sql = f"""WITH m AS ({sql}),
                      r AS (SELECT m.*, ROW_NUMBER() OVER w - 1 AS i, COUNT(*) OVER w_all AS n FROM m
                            WINDOW w AS (PARTITION BY run_id, name ORDER BY step),
                                   w_all AS (PARTITION BY run_id, name))
                      SELECT run_id, step, name, value FROM r
                      WHERE i % MAX(1, (n - 1 + ? - 2) / (? - 1)) = 0 OR i = n - 1"""
            points = max(2, int(max_points))
            args += [points, points]
        return self._rows(sql + " ORDER BY run_id, step", args)

    def last_step(self, run_id: str) -> int:
        row = self._conn().execute("SELECT MAX(step) FROM metrics WHERE run_id = ?", (run_id,)).fetchone()
        return row[0] if row and row[0] is not None else -1

    def add_checkpoint(self, name: str, kind: str, path: str | Path, run_id: str | None = None, step: int = 0) -> None:
        validate_name(name, "checkpoint name")
        with self._tx() as db:
            db.execute(
                """INSERT INTO checkpoints(run_id, name, kind, step, path, created_at) VALUES (?,?,?,?,?,?)
                   ON CONFLICT(name) DO UPDATE SET path = excluded.path, step = excluded.step,
                                                   created_at = excluded.created_at""",
                (run_id, name, kind, int(step), str(path), time.time()),
            )

    def list_checkpoints(self, kind: str | None = None) -> list[dict]:
        """Checkpoints whose directory still exists on disk (a deleted one is not offered)."""
        where, args = ("WHERE kind = ?", (kind,)) if kind else ("", ())
        rows = self._rows(f"SELECT * FROM checkpoints {where} ORDER BY created_at", args)
        return [r for r in rows if Path(r["path"]).is_dir()]
