"""Conversational data in TRL's shapes: `messages` demonstrations (multi-turn too) and conversational
prompt/chosen/rejected preferences, from JSONL, Parquet and a directory saved by `datasets`, with the
same all-or-nothing checks and line-numbered errors; SFT learns every assistant turn of a conversation."""

from __future__ import annotations

import json
import sqlite3

import datasets
import pytest

from core.config import SFTConfig
from core.data.formats import export_jsonl, import_file
from core.data.sources import load_demonstrations, load_prompts, load_rankings
from core.stages.events import Events
from core.models.loading import load_tokenizer
from core.stages import sft

CONVERSATION = [
    {"role": "system", "content": "Answer in one sentence."},
    {"role": "user", "content": "What is 2 plus 2?"},
    {"role": "assistant", "content": "The answer is 4."},
    {"role": "user", "content": "And 3 plus 3?"},
    {"role": "assistant", "content": "The answer is 6."},
]
SINGLE = [{"role": "user", "content": "Repeat the word cat."}, {"role": "assistant", "content": "The answer is cat."}]
PAIR = {"prompt": [{"role": "user", "content": "Which is larger, 3 or 7?"}],
        "chosen": [{"role": "assistant", "content": "The answer is 7."}],
        "rejected": [{"role": "assistant", "content": "The answer is 3."}]}


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def snapshot(store) -> dict:
    with sqlite3.connect(store.path) as db:
        return {t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("prompts", "demonstrations", "rankings")}


def test_messages_import_round_trips_through_the_store(store):
    assert import_file(store, jsonl([{"messages": CONVERSATION}, {"messages": SINGLE}]), "chat.jsonl") == (
        "demonstrations", 2)
    demos = store.list_demonstrations()
    assert demos[0]["prompt"] == "And 3 plus 3?" and demos[0]["output"] == "The answer is 6."
    assert demos[0]["context"] == CONVERSATION[:3] and demos[1]["context"] is None
    exported = [json.loads(line) for line in export_jsonl(store, "demonstrations").splitlines()]
    assert exported == [{"messages": CONVERSATION}, {"messages": SINGLE}]


@pytest.mark.parametrize("rows, message", [
    ([{"messages": SINGLE}, {"messages": CONVERSATION[:4]}], "line 2: messages must end with an assistant turn"),
    ([{"messages": [{"role": "assistant", "content": "hi"}]}], "line 1: the last assistant turn in messages must "
                                                                 "answer a user turn"),
    ([{"messages": SINGLE}, {"messages": [{"role": "narrator", "content": "x"}]}], "line 2: messages must be a list"),
    ([{**PAIR, "prompt": CONVERSATION[:3]}], "line 1: the prompt must end with a user turn"),
    ([{**PAIR, "rejected": PAIR["chosen"]}], "line 1: chosen and rejected are the same text"),
])
def test_bad_conversational_rows_are_refused_whole(store, rows, message):
    before = snapshot(store)
    with pytest.raises(ValueError, match=message):
        import_file(store, jsonl(rows), "bad.jsonl")
    assert snapshot(store) == before


def test_parquet_and_saved_datasets_import_like_jsonl(store, tmp_path):
    pairs = datasets.Dataset.from_list([PAIR, {**PAIR, "prompt": [{"role": "user", "content": "Repeat dog."}]}])
    pairs.to_parquet(str(tmp_path / "pairs.parquet"))
    assert import_file(store, (tmp_path / "pairs.parquet").read_bytes(), "pairs.parquet") == ("rankings", 2)
    assert store.list_rankings()[0]["responses"] == ["The answer is 7.", "The answer is 3."]
    demos = datasets.Dataset.from_list([{"messages": CONVERSATION}, {"messages": SINGLE}])
    demos.save_to_disk(str(tmp_path / "demos"))
    rows = load_demonstrations(str(tmp_path / "demos"), None)
    assert [r["completion"] for r in rows] == ["The answer is 6.", "The answer is cat."]
    assert load_rankings(str(tmp_path / "pairs.parquet"), None)[1].prompt == "Repeat dog."
    assert load_prompts(str(tmp_path / "pairs.parquet"), None) == ["Which is larger, 3 or 7?", "Repeat dog."]
    datasets.DatasetDict({"train": demos, "test": demos}).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(ValueError, match="holds several splits"):
        load_demonstrations(str(tmp_path / "splits"), None)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match="not a readable Parquet file"):
        import_file(store, (tmp_path / "broken.parquet").read_bytes(), "broken.parquet")


def test_a_long_demonstration_keeps_its_most_recent_whole_exchanges():
    """SFT cuts a conversation too long for max_length by the prompts' rule (chat.recent_turns): the oldest
    exchange goes, the system turn stays; with only the last exchange left, it is cut as a single turn."""
    tok = load_tokenizer("bundled")
    whole, _ = sft.encode(tok, "And 3 plus 3?", "The answer is 6.", 256, context=CONVERSATION[:3])
    ids, labels = sft.encode(tok, "And 3 plus 3?", "The answer is 6.", len(whole) - 1, context=CONVERSATION[:3])
    assert tok.decode(ids).startswith("Answer in one sentence.\n\nUser: And 3 plus 3?")
    assert tok.decode([t for t in labels if t != -100]) == " The answer is 6.<|endoftext|>"
    single, _ = sft.encode(tok, "And 3 plus 3?", "The answer is 6.", 256)
    cut, cut_labels = sft.encode(tok, "And 3 plus 3?", "The answer is 6.", len(single) - 1, context=CONVERSATION[:3])
    assert (cut, cut_labels) == sft.encode(tok, "And 3 plus 3?", "The answer is 6.", len(single) - 1)
    assert len(cut) < len(single) and not tok.decode(cut).startswith("Answer in one sentence.")


def test_sft_learns_every_assistant_turn_of_a_conversation(tmp_path):
    tok = load_tokenizer("bundled")
    ids, labels = sft.encode(tok, "And 3 plus 3?", "The answer is 6.", 256, context=CONVERSATION[:3])
    assert tok.decode([t for t in labels if t != -100]) == " The answer is 4.<|endoftext|> The answer is 6.<|endoftext|>"
    assert tok.decode(ids).startswith("Answer in one sentence.")
    path = tmp_path / "chat.jsonl"
    path.write_bytes(jsonl([{"messages": CONVERSATION}] * 6 + [{"messages": SINGLE}] * 6))
    events = Events()
    logs = []
    events.log = logs.append
    out = sft.run(SFTConfig(model="bundled", data=str(path), epochs=2, batch_size=4, learning_rate=1e-3,
                            eval_prompts=0, device="cpu"), None, events, tmp_path / "sft")
    summary = json.loads((out / sft.SUMMARY_FILE).read_text())
    assert summary["selected_by"] == "val_loss" and summary["validation_rows"] == 1


def test_too_few_demonstrations_keep_the_last_epoch_and_say_so(tmp_path):
    path = tmp_path / "few.jsonl"
    path.write_bytes(jsonl([{"messages": SINGLE}] * 4))
    logs = []
    events = Events()
    events.log = logs.append
    out = sft.run(SFTConfig(model="bundled", data=str(path), epochs=2, batch_size=2, eval_prompts=0, device="cpu"),
                  None, events, tmp_path / "sft")
    summary = json.loads((out / sft.SUMMARY_FILE).read_text())
    assert summary["selected_by"] == "last_epoch" and summary["epoch"] == 2 and summary["validation_rows"] == 0
    assert any("too few to hold out a validation split" in line for line in logs)
