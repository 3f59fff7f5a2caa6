"""The SQLite store and JSONL/CSV import/export in TRL's shapes."""

import json
import sqlite3

import pytest

from core.data.formats import export_csv, export_jsonl, import_file


def snapshot(store):
    db = sqlite3.connect(store.path)
    return {t: db.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()
            for t in ("prompts", "demonstrations", "rankings", "runs", "metrics", "checkpoints")}


def test_store_is_a_wal_sqlite_file(store):
    assert store.path.is_file()
    assert sqlite3.connect(store.path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_rankings_and_demonstrations_round_trip_through_jsonl(store, tmp_path):
    rankings = [{"prompt": "What is 2 plus 2?", "responses": ["The answer is 4.", "4", "The answer is 5."], "labeler": "ana"},
                {"prompt": "Say hi.", "responses": ["hi", "hello there friend"], "labeler": "bo"}]
    demos = [{"prompt": "What is 2 plus 2?", "completion": "The answer is 4."}]
    assert import_file(store, "".join(json.dumps(r) + "\n" for r in rankings).encode(), "r.jsonl") == ("rankings", 2)
    assert import_file(store, "".join(json.dumps(d) + "\n" for d in demos).encode(), "d.jsonl") == ("demonstrations", 1)
    assert [json.loads(x) for x in export_jsonl(store, "rankings").splitlines()] == rankings
    assert [json.loads(x) for x in export_jsonl(store, "demonstrations").splitlines()] == demos
    pairs = [json.loads(x) for x in export_jsonl(store, "pairs").splitlines()]
    assert len(pairs) == 3 + 1 and pairs[0] == {"prompt": "What is 2 plus 2?", "chosen": "The answer is 4.", "rejected": "4",
                                         "labeler": "ana"}
    # The exported files import into a fresh store identically (CSV too).
    from core.data.store import Store

    other = Store(tmp_path / "other.db")
    import_file(other, export_jsonl(store, "rankings").encode(), "r.jsonl")
    import_file(other, export_csv(store, "demonstrations").encode(), "d.csv")
    assert export_jsonl(other, "rankings") == export_jsonl(store, "rankings")
    assert export_jsonl(other, "demonstrations") == export_jsonl(store, "demonstrations")


def test_instruction_input_output_rows_become_prompts(store):
    row = {"instruction": "Reverse the words:", "input": "a b c", "output": "c b a"}
    import_file(store, (json.dumps(row) + "\n").encode(), "alpaca.jsonl")
    assert store.list_demonstrations()[0]["prompt"] == "Reverse the words:\na b c"


@pytest.mark.parametrize(
    "responses, message",
    [
        (["a", "b", "a"], "responses 1 and 3 are the same"),
        (["only one"], "K = 1"),
        ([f"answer {i}" for i in range(10)], "K = 10"),
        (["fine", "  "], "response 2 is empty"),
        ("not a list", "list"),
    ],
)
def test_bad_rankings_are_rejected_and_change_nothing(store, responses, message):
    pid = store.add_prompt("What is 1 plus 1?")
    store.add_ranking(pid, ["The answer is 2.", "3"])
    before = snapshot(store)
    with pytest.raises(ValueError, match=message):
        store.add_ranking(pid, responses)
    with pytest.raises(ValueError, match=message):
        import_file(store, (json.dumps({"prompt": "new prompt", "responses": responses}) + "\n").encode(), "x.jsonl")
    assert snapshot(store) == before


def test_prompt_edits_are_one_transaction(store):
    a, b, c, d = (store.add_prompt(f"What is {n} plus {n}?") for n in range(1, 5))
    before = snapshot(store)
    # The first edit is fine, the second clashes with prompt c: nothing is written, the delete included.
    with pytest.raises(ValueError, match=f"prompt {b} .*prompt {c} already has this text"):
        store.update_prompts({a: "What is 9 plus 9?", b: "What is 3 plus 3?"}, deleted=[d])
    assert snapshot(store) == before
    with pytest.raises(ValueError, match=f"prompts {a} and {b} are both edited to"):
        store.update_prompts({a: "Say hi.", b: "  Say hi. "})
    with pytest.raises(ValueError, match=f"prompt {b} is empty"):
        store.update_prompts({a: "Say hi.", b: " "})
    with pytest.raises(ValueError, match="no prompt with id 99"):
        store.update_prompts({a: "Say hi.", 99: "Say bye."})
    assert snapshot(store) == before

    store.update_prompts({a: "Say hi.", b: "What is 2 plus 2?"}, added=["Say bye."], deleted=[d])
    assert [p["text"] for p in store.list_prompts()] == ["Say hi.", "What is 2 plus 2?", "What is 3 plus 3?",
                                                         "Say bye."]


def test_ranking_with_tied_ranks_and_unknown_prompt_are_rejected(store):
    from core.data.store import check_ranks

    with pytest.raises(ValueError, match="tie at rank 2"):
        check_ranks([1, 2, 2, 3], 4)
    before = snapshot(store)
    with pytest.raises(ValueError, match="no prompt with id 999"):
        store.add_ranking(999, ["a", "b"])
    assert snapshot(store) == before


def test_a_bad_line_rejects_the_whole_file_naming_the_line(store):
    good = json.dumps({"prompt": "p1", "completion": "c1"})
    lines = [good, good.replace("p1", "p2"), "{not json", good.replace("p1", "p3")]
    before = snapshot(store)
    with pytest.raises(ValueError, match="line 3: malformed JSON"):
        import_file(store, "\n".join(lines).encode(), "demos.jsonl")
    with pytest.raises(ValueError, match="line 2: .*columns"):
        import_file(store, (good + "\n" + json.dumps({"question": "q", "answer": "a"})).encode(), "demos.jsonl")
    with pytest.raises(ValueError, match="unrecognised columns"):
        import_file(store, json.dumps({"question": "q"}).encode(), "demos.jsonl")
    with pytest.raises(ValueError, match="line 2: not valid UTF-8"):
        import_file(store, good.encode() + b"\n\xff\xfe{}", "demos.jsonl")
    assert snapshot(store) == before
