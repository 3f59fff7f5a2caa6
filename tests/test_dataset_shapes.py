"""Every public dataset shape imports onto the one conversation type, exports back, and bad rows are
refused whole, naming the line (issue 29)."""

from __future__ import annotations

import json

import pytest

from core.data.formats import export_csv, export_jsonl, import_file, import_source, parse_columns, parse_rows, preview
from core.data.sources import load_prompts, load_ptx_texts, load_rankings
from core.data.store import Store

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731
S = lambda text: {"role": "system", "content": text}  # noqa: E731
CONTEXT = [S("Be brief."), U("I have a cat called Tom."), A("Nice name.")]
QUESTION = U("What is my cat called?")

HH = {"chosen": "\n\nHuman: I have a cat called Tom.\n\nAssistant: Nice name.\n\nHuman: What is my cat called?"
                "\n\nAssistant: Tom.",
      "rejected": "\n\nHuman: I have a cat called Tom.\n\nAssistant: Nice name.\n\nHuman: What is my cat called?"
                  "\n\nAssistant: I do not know."}
HH_TURNS = [U("I have a cat called Tom."), A("Nice name."), QUESTION]
# One row of every shape, and the prompt (turns) + answers the store must hold for it.
SHAPES = {
    "hh-transcript": ("rankings", HH, HH_TURNS, ["Tom.", "I do not know."]),
    "implicit-conversational": ("rankings", {"chosen": [*CONTEXT, QUESTION, A("Tom.")],
                                             "rejected": [*CONTEXT, QUESTION, A("No idea.")]},
                                [*CONTEXT, QUESTION], ["Tom.", "No idea."]),
    "explicit-multi-turn-pair": ("rankings", {"prompt": [*CONTEXT, QUESTION], "chosen": [A("Tom.")],
                                              "rejected": [A("No idea.")], "score_chosen": 8.0,
                                              "score_rejected": 2.0, "labeler": "ann"},
                                 [*CONTEXT, QUESTION], ["Tom.", "No idea."]),
    "multi-turn-ranking": ("rankings", {"prompt": [*CONTEXT, QUESTION], "responses": ["Tom.", "A cat.", "?"]},
                           [*CONTEXT, QUESTION], ["Tom.", "A cat.", "?"]),
    "multi-turn-prompt-only": ("prompts", {"prompt": [*CONTEXT, QUESTION], "answer": "Tom"},
                               [*CONTEXT, QUESTION], None),
    "sharegpt": ("demonstrations", {"conversations": [{"from": "system", "value": "Be brief."},
                                                      {"from": "human", "value": "I have a cat called Tom."},
                                                      {"from": "gpt", "value": "Nice name."},
                                                      {"from": "human", "value": "What is my cat called?"},
                                                      {"from": "gpt", "value": "Tom."}]},
                 [*CONTEXT, QUESTION], ["Tom."]),
    "sharegpt-role-content": ("demonstrations", {"conversations": [*CONTEXT, QUESTION, A("Tom.")]},
                              [*CONTEXT, QUESTION], ["Tom."]),
    "conversational-prompt-completion": ("demonstrations", {"prompt": [*CONTEXT, QUESTION], "completion": [A("Tom.")]},
                                         [*CONTEXT, QUESTION], ["Tom."]),
}


def jsonl(*rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def held(store: Store, kind: str):
    """What the store holds of a kind: (turns, answers) per row, plus the optional columns."""
    if kind == "rankings":
        return [(r["turns"], r["responses"], r["labeler"], r["scores"], r["extra"]) for r in store.list_rankings()]
    if kind == "prompts":
        return [(p["turns"], p["extra"]) for p in store.list_prompts()]
    return [([*(d["context"] or []), U(d["prompt"])], [d["output"]]) for d in store.list_demonstrations()]


@pytest.mark.parametrize("shape", SHAPES)
def test_each_shape_imports_and_exports_back_to_an_equal_store(shape, tmp_path):
    kind, row, turns, answers = SHAPES[shape]
    store = Store(tmp_path / "a.db")
    assert import_file(store, jsonl(row), f"{shape}.jsonl") == (kind, 1)
    first = held(store, kind)
    assert first[0][0] == turns
    if answers:
        assert first[0][1] == answers
    # The export (JSONL and CSV) imports into a fresh store as the same rows.
    for i, (text, name) in enumerate(((export_jsonl(store, kind), "x.jsonl"), (export_csv(store, kind), "x.csv"))):
        other = Store(tmp_path / f"b{i}.db")
        import_file(other, text.encode(), name)
        assert held(other, kind) == first, name
    if kind == "rankings":  # and the pairs export too, scores and labeler kept
        other = Store(tmp_path / "c.db")
        import_file(other, export_jsonl(store, "pairs").encode(), "pairs.jsonl")
        assert [h[0] for h in held(other, kind)] == [turns] * (len(answers) - 1 if len(answers) == 2 else 3)


def test_canonical_shapes_export_to_an_equal_file(store):
    pair = SHAPES["explicit-multi-turn-pair"][1]
    import_file(store, jsonl(pair), "pairs.jsonl")
    assert [json.loads(line) for line in export_jsonl(store, "pairs").splitlines()] == [
        {"prompt": pair["prompt"], "chosen": pair["chosen"], "rejected": pair["rejected"], "labeler": "ann",
         "score_chosen": 8.0, "score_rejected": 2.0}]
    prompts = [{"prompt": [*CONTEXT, QUESTION], "answer": "Tom"}, {"prompt": "Say hi.", "answer": "hi"}]
    other = Store(store.path.parent / "p.db")
    import_file(other, jsonl(*prompts), "prompts.jsonl")
    assert [json.loads(line) for line in export_jsonl(other, "prompts").splitlines()] == prompts
    assert other.list_prompts()[0]["extra"] == {"answer": "Tom"}


def test_stages_read_the_whole_conversation(store, tmp_path):
    import_file(store, jsonl(HH), "hh.jsonl")
    assert load_rankings("store", store)[0].prompt == HH_TURNS
    path = tmp_path / "hh.jsonl"
    path.write_bytes(jsonl(HH))
    assert load_rankings(str(path), None)[0].prompt == HH_TURNS
    import_file(store, jsonl({"prompt": "Say hi."}, {"prompt": [*CONTEXT, QUESTION]}), "p.jsonl")
    assert load_prompts("store", store)[-2:] == ["Say hi.", [*CONTEXT, QUESTION]]


def test_a_column_mapping_renames_before_detection_and_preview_writes_nothing(store):
    rows = jsonl({"question": "Which is bigger, 3 or 7?", "good": "7", "bad": "3", "id": 12})
    mapping = parse_columns("prompt=question, chosen=good,rejected=bad")
    seen = preview(parse_rows(rows, "q.jsonl"), "q.jsonl", mapping)
    assert (seen["shape"], seen["kind"], seen["rows"]) == ("explicit pair", "rankings", 1)
    assert seen["first"][0]["responses"] == ["7", "3"] and seen["first"][0]["extra"] == {"id": 12}
    assert store.counts()["prompts"] == 0
    assert import_file(store, rows, "q.jsonl", mapping) == ("rankings", 1)
    with pytest.raises(ValueError, match="names 'query', which q.jsonl does not have \\(its columns: bad, good, id"):
        import_file(store, rows, "q.jsonl", {"prompt": "query", "chosen": "good", "rejected": "bad"})
    with pytest.raises(ValueError, match="must read ours=theirs"):
        parse_columns("prompt")
    assert store.counts()["rankings"] == 1


def test_a_hub_id_while_offline_is_refused_at_once(store, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="the hub is offline"):
        import_source(store, "Anthropic/hh-rlhf")
    with pytest.raises(ValueError, match="the hub is offline"):
        load_ptx_texts("someone/corpus:en@train")
    with pytest.raises(ValueError, match="neither a file here nor a hub dataset id"):
        import_source(store, "no such thing")
    assert store.counts()["prompts"] == 0


def test_ptx_text_from_parquet_and_txt(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"text": "one document"}, {"text": "another"}]).to_parquet(str(tmp_path / "c.parquet"))
    assert load_ptx_texts(str(tmp_path / "c.parquet")) == ["one document", "another"]
    (tmp_path / "c.txt").write_text("first line\n\nsecond line\n")
    assert load_ptx_texts(str(tmp_path / "c.txt")) == ["first line", "second line"]


HH_BAD = {
    "no-common-prefix": ({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Yo\n\nAssistant: Hey"},
                         "line 2: chosen and rejected share no opening turns"),
    "tail-not-assistant": ({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye",
                            "rejected": "\n\nHuman: Hi\n\nAssistant: Hey"},
                           "line 2: after the 1 shared turns, chosen continues with assistant \\+ user turns"),
    "no-assistant": ({"chosen": "\n\nHuman: Hi", "rejected": "\n\nHuman: Hi there"}, "line 2: chosen has no Assistant turn"),
    "two-human-turns": ({"chosen": "\n\nHuman: Hi\n\nHuman: Again\n\nAssistant: Hello",
                         "rejected": "\n\nHuman: Hi\n\nHuman: Again\n\nAssistant: Hey"},
                        "line 2: chosen has two Human turns in a row"),
    "unknown-speaker": ({"chosen": "\n\nHuman: Hi\n\nUser: Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: Hey"},
                        "line 2: chosen has an unknown speaker tag 'User'"),
    "empty-turn": ({"chosen": "\n\nHuman: Hi\n\nAssistant:", "rejected": "\n\nHuman: Hi\n\nAssistant: Hey"},
                   "line 2: turn 2 of chosen \\(Assistant\\) is empty"),
    "roles-out-of-order": ({"prompt": [U("a"), U("b")], "chosen": "x", "rejected": "y"},
                           "line 2: turn 2 of the prompt is a user turn where a assistant turn belongs"),
    "sharegpt-unknown-from": ({"conversations": [{"from": "bot", "value": "x"}]},
                              "line 2: turn 1 of conversations is from 'bot'"),
}


@pytest.mark.parametrize("case", HH_BAD)
def test_bad_conversations_are_refused_whole_naming_the_line(store, case):
    row, message = HH_BAD[case]
    good = HH if "chosen" in row and "prompt" not in row else (
        {"prompt": [U("q")], "chosen": "x", "rejected": "y"} if "prompt" in row else SHAPES["sharegpt"][1])
    with pytest.raises(ValueError, match=message):
        import_file(store, jsonl(good, row), "bad.jsonl")
    assert store.counts()["prompts"] == 0


def test_cli_import_maps_columns_and_dry_run_writes_nothing(tmp_path, capsys):
    from core.cli import main

    path = tmp_path / "q.jsonl"
    path.write_bytes(jsonl({"question": "Which is bigger, 3 or 7?", "good": "7", "bad": "3"}))
    db = tmp_path / "w.db"
    args = ["import", str(path), "--columns", "prompt=question,chosen=good,rejected=bad", "--db", str(db)]
    assert main([*args, "--dry-run"]) == 0
    assert "1 rows, shape explicit pair -> rankings" in capsys.readouterr().out
    assert Store(db).counts()["rankings"] == 0
    assert main(args) == 0
    assert [(r["prompt"], r["responses"]) for r in Store(db).list_rankings()] == [("Which is bigger, 3 or 7?", ["7", "3"])]
    assert main(["import", str(path), "--columns", "prompt=query", "--db", str(db)]) == 2
    assert "names 'query'" in capsys.readouterr().err
