"""Numbered schema migrations: a database written by an older workbench opens, is copied, migrates in
one transaction and reads back every row."""

import json
import sqlite3

import pytest

from core.data import store as store_module
from core.data.store import SCHEMA, SCHEMA_VERSION, Store

TABLES = ("prompts", "demonstrations", "rankings", "runs", "run_log", "metrics", "checkpoints")


def old_database(path):
    """A workbench.db as the schema before migrations wrote it (version 0), with rows in every table."""
    db = sqlite3.connect(path)
    db.executescript(SCHEMA)
    db.executescript("""
        ALTER TABLE runs ADD COLUMN owner_pid INTEGER; ALTER TABLE runs ADD COLUMN owner_host TEXT;
        ALTER TABLE runs ADD COLUMN heartbeat REAL; ALTER TABLE runs ADD COLUMN launch TEXT;
        ALTER TABLE demonstrations ADD COLUMN context TEXT;
        PRAGMA foreign_keys=ON;
        INSERT INTO prompts(id, text, source, created_at) VALUES (1, 'What is 2 plus 2?', 'user', 1.0),
            (2, 'Say hi.', 'import', 2.0), (5, 'Name a colour.', 'demo', 3.0);
        INSERT INTO demonstrations(id, prompt_id, instruction, input, output, created_at, context) VALUES
            (1, 1, 'What is 2 plus 2?', '', 'The answer is 4.', 4.0, NULL),
            (2, 5, 'Name a colour.', '', 'Red.', 5.0, '[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]');
        INSERT INTO rankings(id, prompt_id, responses, labeler, created_at) VALUES
            (1, 1, '["4", "5"]', 'ana', 6.0), (2, 2, '["hi", "go away", "..."]', '', 7.0);
        INSERT INTO runs(id, stage, status, config, created_at, updated_at) VALUES ('r1', 'sft', 'done', '{}', 8.0, 9.0);
        INSERT INTO run_log(run_id, created_at, message) VALUES ('r1', 8.5, 'started');
        INSERT INTO metrics VALUES ('r1', 0, 'loss', 1.5), ('r1', 1, 'loss', 1.25);
        INSERT INTO checkpoints(run_id, name, kind, step, path, created_at) VALUES ('r1', 'sft-1', 'sft', 1, '/x', 9.0);
    """)
    db.commit()
    db.close()


def rows(path, table, columns="*"):
    db = sqlite3.connect(path)
    try:
        return db.execute(f"SELECT {columns} FROM {table} ORDER BY 1").fetchall()
    finally:
        db.close()


def test_an_old_database_migrates_in_place_keeping_every_row(tmp_path):
    path = tmp_path / "workbench.db"
    old_database(path)
    before = {t: rows(path, t) for t in TABLES}
    store = Store(path)
    assert rows(path, "sqlite_master", "1") and sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    # Every row of every table is still there, equal in the columns it had (prompts' come first, in order).
    for table in TABLES:
        after = rows(path, table)
        assert len(after) == len(before[table]) > 0, table
        if table == "prompts":
            assert rows(path, table, "id, text, source, created_at") == before[table]
        else:
            assert [r[: len(before[table][0])] for r in after] == before[table], table
    # ...and reads back through the store's API as before, with the new keys empty.
    prompts = store.list_prompts()
    assert [(p["id"], p["text"], p["turns"], p["extra"], p["rankings"]) for p in prompts] == [
        (1, "What is 2 plus 2?", [{"role": "user", "content": "What is 2 plus 2?"}], {}, 1),
        (2, "Say hi.", [{"role": "user", "content": "Say hi."}], {}, 1),
        (5, "Name a colour.", [{"role": "user", "content": "Name a colour."}], {}, 0)]
    assert [(r["prompt"], r["responses"], r["labeler"], r["scores"]) for r in store.list_rankings()] == [
        ("What is 2 plus 2?", ["4", "5"], "ana", None), ("Say hi.", ["hi", "go away", "..."], "", None)]
    assert store.list_demonstrations()[1]["context"][1] == {"role": "assistant", "content": "Hello"}
    # The copy taken before migrating is the old database, unchanged.
    backup = tmp_path / "workbench.db.v0.bak"
    assert {t: rows(backup, t) for t in TABLES} == before
    assert sqlite3.connect(backup).execute("PRAGMA user_version").fetchone()[0] == 0
    # Opening again changes nothing and takes no second copy.
    Store(path)
    assert {t: rows(path, t) for t in TABLES} != {} and not (tmp_path / "workbench.db.v1.bak").exists()


def test_a_failing_migration_leaves_the_old_database_whole(tmp_path, monkeypatch):
    path = tmp_path / "workbench.db"
    old_database(path)
    before = {t: rows(path, t) for t in TABLES}
    broken = ((1, "half done, then a typo", """
        CREATE TABLE prompts_v1 (id INTEGER PRIMARY KEY, text TEXT NOT NULL);
        INSERT INTO prompts_v1(id, text) SELECT id, text FROM prompts;
        DROP TABLE prompts;
        ALTER TABLE prompts_v1 RENAM TO prompts;
    """),)
    monkeypatch.setattr(store_module, "MIGRATIONS", broken)
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", 1)
    with pytest.raises(sqlite3.OperationalError):
        Store(path)
    assert {t: rows(path, t) for t in TABLES} == before
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 0


def test_a_newer_database_is_refused(tmp_path):
    path = tmp_path / "workbench.db"
    Store(path)
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(ValueError, match="newer workbench"):
        Store(path)


def test_conversations_extra_columns_and_scores_round_trip(store):
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "I have a cat."},
             {"role": "assistant", "content": "Nice."}, {"role": "user", "content": "What pet do I have?"}]
    conv = store.add_prompt(turns, extra={"answer": "a cat"})
    plain = store.add_prompt("What pet do I have?")
    assert conv != plain  # the same last question after another conversation is another prompt
    assert store.add_prompt(turns) == conv
    assert store.get_prompt(conv)["turns"] == turns and store.get_prompt(conv)["extra"] == {"answer": "a cat"}
    ids = store.add_rankings([{"prompt": turns, "responses": ["A cat.", "A dog."], "labeler": "hh",
                               "scores": [9, 2.5]}])
    ranking = store.list_rankings()[0]
    assert (ranking["id"], ranking["prompt_id"], ranking["turns"], ranking["scores"], ranking["labeler"],
            ranking["extra"]) == (ids[0], conv, turns, [9.0, 2.5], "hh", {"answer": "a cat"})
    # Editing the last user turn keeps the earlier turns; a clash is judged with them.
    store.update_prompt(conv, "And what colour is it?")
    assert store.get_prompt(conv)["turns"] == [*turns[:3], {"role": "user", "content": "And what colour is it?"}]
    store.update_prompt(plain, "And what colour is it?")  # no clash: no earlier turns
    assert json.loads(json.dumps(store.list_prompts()))[0]["extra"] == {"answer": "a cat"}


@pytest.mark.parametrize("turns, message", [
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "turn 2 .* user turn where a assistant"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "must end with a user turn"),
    ([{"role": "user", "content": "  "}], "turn 1 of the prompt \\(user\\) is empty"),
    ([{"role": "narrator", "content": "a"}], "turn 1 of the prompt must be"),
    ([], "non-empty list"),
])
def test_bad_conversations_write_nothing(store, turns, message):
    store.add_prompt("kept")
    with pytest.raises(ValueError, match=message):
        store.add_prompts(["fine", turns])
    with pytest.raises(ValueError, match="scores must be a list of 2"):
        store.add_rankings([{"prompt": "x", "responses": ["a", "b"], "scores": [1]}])
    with pytest.raises(ValueError, match="not a finite number"):
        store.add_rankings([{"prompt": "x", "responses": ["a", "b"], "scores": [1, float("nan")]}])
    assert [p["text"] for p in store.list_prompts()] == ["kept"]



def test_two_processes_opening_an_older_file_at_once_both_open_it(tmp_path, monkeypatch):
    """The in-place column additions read the columns under the write lock: another opener adding the
    column between this one's look and its ALTER (two `rlhf` commands started together on a fresh home)
    would have made that ALTER fail with 'duplicate column'. The other opener tries exactly there."""
    path = tmp_path / "workbench.db"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA)  # the schema before the `context` column
    db.commit()
    assert "context" not in {row[1] for row in db.execute("PRAGMA table_info(demonstrations)")}
    tried: list[str] = []

    def other_opener(statement: str) -> None:
        if statement.strip() != "PRAGMA table_info(demonstrations)" or tried:
            return
        other = sqlite3.connect(path, isolation_level=None, timeout=0)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("ALTER TABLE demonstrations ADD COLUMN context TEXT")
            other.execute("COMMIT")
            tried.append("added")
        except sqlite3.OperationalError as exc:  # the write lock is held: it would wait its turn
            tried.append(str(exc))
        finally:
            other.close()

    plain_conn = Store._conn

    def traced_conn(self):
        conn = plain_conn(self)
        conn.set_trace_callback(other_opener)
        return conn

    monkeypatch.setattr(Store, "_conn", traced_conn)
    store = Store(path)
    assert tried == ["database is locked"]
    columns = [row[1] for row in db.execute("PRAGMA table_info(demonstrations)")]
    assert columns.count("context") == 1
    assert store.counts()["demonstrations"] == 0
