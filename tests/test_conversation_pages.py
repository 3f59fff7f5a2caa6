"""Multi-turn prompts on the pages and in labeling (issue 29): the Prompts page previews a file's
detected shape and mapping before writing; Rank shows the earlier turns; labeling batches take
conversations and an "all bad" answer keeps them."""

from __future__ import annotations

import json

from core.data.store import Store
from core.labeling.store import LabelingStore

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731
TURNS = [U("I have a cat called Tom."), A("Nice name."), U("What is my cat called?")]


def open_page(at, name: str):
    at.switch_page(f"../pages/{name}.py")
    at.run()
    assert not at.exception, at.exception
    return at


def test_prompts_page_previews_shape_and_mapping_before_writing(app, workbench_home):
    store = Store(workbench_home / "workbench.db")
    at = open_page(app, "prompts")
    rows = [{"question": "Say hi.", "good": "Hello!", "bad": "Go away.", "topic": "greeting"}]
    at.get("file_uploader")[0].upload("mine.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode()).run()
    assert "unrecognised columns" in " ".join(e.value for e in at.error)  # no mapping yet: said, nothing written
    at.text_input(key="import_columns").input("prompt=question,chosen=good,rejected=bad").run()
    assert not at.exception, at.exception
    caption = " ".join(c.value for c in at.caption)
    assert "1 rows, detected shape **explicit pair** → rankings" in caption and "prompt=question" in caption
    assert store.counts()["rankings"] == 0  # the preview wrote nothing
    next(b for b in at.button if b.label == "Import").click().run()
    assert [(r["prompt"], r["responses"], r["extra"]) for r in store.list_rankings()] == [
        ("Say hi.", ["Hello!", "Go away."], {"topic": "greeting"})]


def test_rank_page_shows_the_earlier_turns(app, workbench_home):
    Store(workbench_home / "workbench.db").add_prompt(TURNS)
    at = open_page(app, "rank")
    assert "Earlier in this conversation (2 turns)" in " ".join(c.value for c in at.caption)
    assert [m.name for m in at.chat_message] == ["user", "assistant"]
    next(b for b in at.button if b.label == "Sample answers").click().run()
    assert not at.exception, at.exception
    assert len(at.session_state["rank_answers"]["answers"]) >= 1


def test_labeling_batches_take_conversations(store):
    labeling = LabelingStore(store)
    labeling.add_user("ada", "a long enough password")
    result = labeling.create_batch("week1", [(TURNS, ["Tom.", "I do not know."]), ("Say hi.", ["hi", "hello"])],
                                   ["ada"], overlap=0.0)
    assert result.items == 2
    item = labeling.next_item("ada")
    assert item["turns"] == TURNS and item["prompt"] == "What is my cat called?"
    demo_id = labeling.all_bad("ada", item["item_id"], "Your cat is called Tom.")
    demo = next(d for d in store.list_demonstrations() if d["id"] == demo_id)
    assert demo["context"] == TURNS[:2] and demo["prompt"] == "What is my cat called?"


def test_a_ranked_batch_hands_its_conversations_on_whole(store):
    """What a team round trains on (`ranked_items`): each ranked item's whole conversation, not its last turn."""
    labeling = LabelingStore(store)
    labeling.add_user("ada", "a long enough password")
    labeling.create_batch("round-1", [(TURNS, ["Tom.", "I do not know."]), ("Say hi.", ["hi", "hello"])],
                          ["ada"], overlap=0.0)
    for _ in range(2):
        labeling.submit_ranking("ada", labeling.next_item("ada")["item_id"], [2, 1])
    batch = labeling.list_batches()[0]["id"]
    assert labeling.ranked_items(batch) == [{"prompt": TURNS, "responses": ["I do not know.", "Tom."]},
                                            {"prompt": "Say hi.", "responses": ["hello", "hi"]}]
