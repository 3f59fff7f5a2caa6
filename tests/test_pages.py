"""Each page's main path and its bad-input path, through streamlit's AppTest (no browser)."""

from __future__ import annotations

import json
import time

from core.data.store import Store


def open_page(at, name: str):
    at.switch_page(f"../pages/{name}.py")
    at.run()
    assert not at.exception, at.exception
    return at


def db(home) -> Store:
    return Store(home / "workbench.db")


def button(at, label: str):
    return next(b for b in at.button if b.label == label)


def texts(elements) -> str:
    return " | ".join(str(e.value) for e in elements)


def test_home_says_what_to_do_next(app, workbench_home, tmp_path):
    assert "Nothing trained yet" in texts(app.info)
    sft_dir = tmp_path / "sft-model"
    sft_dir.mkdir()
    db(workbench_home).add_checkpoint("sft-a", "sft", sft_dir)
    app.run()
    assert "train a reward model" in texts(app.info)
    assert [m.value for m in app.metric][:4] == ["bundled", "1", "0", "0"]


def test_prompts_add_edit_delete_and_reject_empty(app, workbench_home):
    at = open_page(app, "prompts")
    store = db(workbench_home)
    at.text_area[0].input("What is 2 plus 2?")
    button(at, "Add prompt").click().run()
    assert [p["text"] for p in store.list_prompts()] == ["What is 2 plus 2?"]

    at.text_area[0].input("   ")
    button(at, "Add prompt").click().run()
    assert "prompt is empty" in texts(at.error)
    assert len(store.list_prompts()) == 1

    # Table edits: one cell edited to empty and one good row added -> nothing saved at all.
    at.session_state["prompts_editor"] = {"edited_rows": {0: {"text": ""}}, "added_rows": [{"text": "New one"}],
                                          "deleted_rows": []}
    at.run()
    button(at, "Save prompts changes").click().run()
    assert "Nothing saved" in texts(at.error)
    assert [p["text"] for p in store.list_prompts()] == ["What is 2 plus 2?"]

    at.session_state["prompts_editor"] = {"edited_rows": {0: {"text": "What is 2 plus 3?"}},
                                          "added_rows": [{"text": "Reverse the words: a b c."}], "deleted_rows": []}
    at.run()
    button(at, "Save prompts changes").click().run()
    assert not at.exception, at.exception
    assert [p["text"] for p in store.list_prompts()] == ["What is 2 plus 3?", "Reverse the words: a b c."]

    at.session_state["prompts_editor"] = {"edited_rows": {}, "added_rows": [], "deleted_rows": [0]}
    at.run()
    button(at, "Save prompts changes").click().run()
    assert [p["text"] for p in store.list_prompts()] == ["Reverse the words: a b c."]


def test_prompt_table_save_is_atomic(app, workbench_home):
    store = db(workbench_home)
    store.add_prompts(["What is 1 plus 1?", "What is 2 plus 2?", "What is 3 plus 3?"])
    at = open_page(app, "prompts")
    # Row 1's edit is fine, row 2's clashes with row 3: neither is written, nor the delete.
    at.session_state["prompts_editor"] = {"edited_rows": {0: {"text": "What is 5 plus 5?"},
                                                          1: {"text": "What is 3 plus 3?"}},
                                          "added_rows": [{"text": "What is 9 plus 9?"}], "deleted_rows": [2]}
    at.run()
    button(at, "Save prompts changes").click().run()
    assert [p["text"] for p in store.list_prompts()] == ["What is 1 plus 1?", "What is 2 plus 2?", "What is 3 plus 3?"]
    assert "Nothing saved" in texts(at.error) and "prompt 3 already has this text" in texts(at.error)


def test_demonstrations_table_edits(app, workbench_home):
    store = db(workbench_home)
    store.add_demonstration("What is 1 plus 1?", "The answer is 2.")
    at = open_page(app, "prompts")
    at.session_state["demonstrations_editor"] = {"edited_rows": {0: {"output": "The answer is two."}},
                                                 "added_rows": [], "deleted_rows": []}
    at.run()
    button(at, "Save demonstrations changes").click().run()
    assert [d["output"] for d in store.list_demonstrations()] == ["The answer is two."]
    at.session_state["demonstrations_editor"] = {"edited_rows": {}, "added_rows": [{"instruction": "Hi"}],
                                                 "deleted_rows": []}
    at.run()
    button(at, "Save demonstrations changes").click().run()
    assert "output" in texts(at.error)
    assert len(store.list_demonstrations()) == 1


def test_import_is_all_or_nothing_with_line_numbers(app, workbench_home):
    at = open_page(app, "prompts")
    store = db(workbench_home)
    good = "".join(json.dumps({"prompt": f"Say {w}.", "completion": f"The answer is {w}."}) + "\n"
                   for w in ("cat", "dog"))
    bad = good + '{"prompt": "Say sun.", "completion": ""}\n'
    at.get("file_uploader")[0].upload("demos.jsonl", bad.encode()).run()
    button(at, "Import").click().run()
    assert "line 3" in texts(at.error) and "Nothing imported" in texts(at.error)
    assert store.counts()["demonstrations"] == 0

    at.get("file_uploader")[0].clear().upload("demos.jsonl", good.encode()).run()
    button(at, "Import").click().run()
    assert "Imported 2 demonstrations" in texts(at.success)
    assert store.counts()["demonstrations"] == 2
    assert [d.label for d in at.get("download_button")] == ["Download demonstrations.jsonl"]


def test_prompts_table_shows_each_rows_other_columns(app, workbench_home):
    store = db(workbench_home)
    store.add_prompts(["What is 6 times 7?", "Say hi.", "What is 1 plus 1?"],
                      extras=[{"answer": "42", "solution": "6*7=42"}, None, {"answer": "2", "level": [1, 2]}])
    at = open_page(app, "prompts")
    table = at.dataframe(key="prompts_editor").value
    assert list(table.columns) == ["id", "text", "earlier_turns", "source", "extra:answer", "extra:solution",
                                   "extra:level", "demonstrations", "rankings"]
    shown = {k: [v if isinstance(v, str) else None for v in table[f"extra:{k}"]] for k in ("answer", "solution", "level")}
    assert shown == {"answer": ["42", None, "2"], "solution": ["6*7=42", None, None],
                     "level": [None, None, "[1, 2]"]}  # not a string: shown as JSON
    assert "Other columns (read-only, what reward terms check against): answer, solution, level" in texts(at.caption)
    # Editing a prompt's text keeps its columns.
    at.session_state["prompts_editor"] = {"edited_rows": {0: {"text": "What is 7 times 6?"}}, "added_rows": [],
                                          "deleted_rows": []}
    at.run()
    button(at, "Save prompts changes").click().run()
    assert store.list_prompts()[0]["text"] == "What is 7 times 6?"
    assert store.list_prompts()[0]["extra"] == {"answer": "42", "solution": "6*7=42"}


GYM_OPTIONS = "min_terms=2:max_terms=2:min_digits=1:max_digits=1"


def gym_preview(at, name: str, size: int = 5, seed: int = 0, options: str = GYM_OPTIONS):
    at.selectbox(key="gym_name").set_value(name)
    at.number_input(key="gym_size").set_value(size)
    at.number_input(key="gym_seed").set_value(seed)
    at.text_input(key="gym_options").input(options)
    button(at, "Preview set").click().run()
    assert not at.exception, at.exception
    return at


def test_a_reasoning_gym_set_is_previewed_then_imported_as_the_cli_would(app, workbench_home):
    from core.data.task_sets import generate, parse_task_set

    store = db(workbench_home)
    spec = f"reasoning-gym:chain_sum:size=5:seed=3:{GYM_OPTIONS}"
    expected = generate(parse_task_set(spec))
    at = gym_preview(open_page(app, "prompts"), "chain_sum", seed=3)
    preview = next(d.value for d in at.dataframe if list(d.value.columns) == ["prompt", "answer"])
    assert preview["prompt"].tolist() == [r["prompt"] for r in expected]
    assert preview["answer"].tolist() == [r["answer"] for r in expected]
    assert f"`{spec}`: 5 rows → prompts" in texts(at.caption)
    assert f"Same from a terminal: `rlhf import {spec}`" in texts(at.caption)
    assert store.counts()["prompts"] == 0  # the preview writes nothing

    button(at, "Import 5 prompts").click().run()
    assert f"Imported 5 prompts from {spec}." in texts(at.success)
    stored = store.list_prompts()
    assert [p["text"] for p in stored] == [r["prompt"] for r in expected]
    assert [p["extra"] for p in stored] == [{"answer": r["answer"], "metadata": r["metadata"]} for r in expected]
    assert at.dataframe(key="prompts_editor").value["extra:answer"].tolist() == [r["answer"] for r in expected]


def test_a_reasoning_gym_name_unknown_or_the_extra_missing_is_said_and_nothing_imported(app, workbench_home,
                                                                                       monkeypatch):
    import sys

    from core.data import task_sets

    # A name typed in the box (AppTest picks only listed options: the misspelling is listed here).
    monkeypatch.setattr(task_sets, "EXAMPLES", (*task_sets.EXAMPLES, "chain_sums"))
    at = gym_preview(open_page(app, "prompts"), "chain_sums")
    assert "no dataset 'chain_sums': e.g. chain_sum" in texts(at.error)
    assert len(at.dataframe) == 2 and not [b for b in at.button if b.label.startswith("Import ")]
    at = gym_preview(at, "chain_sum", options="colour=red")
    assert "unknown option(s) colour" in texts(at.error)
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # `import reasoning_gym` now raises ImportError
    at = gym_preview(at, "chain_sum")
    assert "pip install 'rlhf-workbench[verifiers]'" in texts(at.error)
    assert db(workbench_home).counts()["prompts"] == 0


def test_rank_samples_orders_and_saves(app, workbench_home):
    store = db(workbench_home)
    store.add_prompts(["What is 3 plus 4?", "Reverse the words: cat dog sun."])
    at = open_page(app, "rank")
    at.number_input(key="rank_k").set_value(3)
    at.text_input(key="rank_labeler").input("ada")
    button(at, "Sample answers").click().run()
    assert not at.exception, at.exception
    answers = at.session_state["rank_answers"]["answers"]
    assert len(answers) >= 2

    rank_boxes = [s for s in at.selectbox if s.key and s.key.startswith("rank_1_")]
    rank_boxes[0].set_value(2)  # A and B both rank 2: a tie
    rank_boxes[1].set_value(2)
    at.run()
    button(at, "Save ranking").click().run()
    assert "tie" in texts(at.error)
    assert store.list_rankings() == []

    rank_boxes = [s for s in at.selectbox if s.key and s.key.startswith("rank_1_")]
    rank_boxes[0].set_value(2)
    rank_boxes[1].set_value(1)
    at.run()
    button(at, "Save ranking").click().run()
    assert not at.exception, at.exception
    saved = store.list_rankings()
    assert len(saved) == 1 and saved[0]["labeler"] == "ada"
    assert saved[0]["responses"][:2] == [answers[1], answers[0]]
    assert at.selectbox(key="rank_prompt").value == 2  # moved on to the next prompt


def test_rank_resample_starts_unranked(app, workbench_home):
    db(workbench_home).add_prompts(["What is 3 plus 4?"])
    at = open_page(app, "rank")
    at.number_input(key="rank_k").set_value(4)
    button(at, "Sample answers").click().run()
    rank_boxes = [s for s in at.selectbox if s.key and s.key.startswith("rank_1_")]
    assert [s.value for s in rank_boxes] == list(range(1, len(rank_boxes) + 1))
    rank_boxes[0].set_value(2)
    rank_boxes[1].set_value(1)
    at.run()
    old_keys = {s.key for s in rank_boxes}

    button(at, "Sample answers").click().run()
    assert not at.exception, at.exception
    # The new answers get fresh widgets in sample order, not the ranks given to the old ones.
    rank_boxes = [s for s in at.selectbox if s.key and s.key.startswith("rank_1_")]
    assert len(rank_boxes) == len(at.session_state["rank_answers"]["answers"])
    assert [s.value for s in rank_boxes] == list(range(1, len(rank_boxes) + 1))
    assert not old_keys & {s.key for s in rank_boxes}
    assert all(s.key in at.session_state for s in rank_boxes)
    assert not any(key in at.session_state for key in old_keys)  # streamlit dropped the undrawn widgets' state


def test_rank_skip_and_all_bad_store_no_ranking(app, workbench_home):
    store = db(workbench_home)
    store.add_prompts(["What is 3 plus 4?", "What is 1 plus 1?"])
    at = open_page(app, "rank")
    button(at, "Skip prompt").click().run()
    assert at.selectbox(key="rank_prompt").value == 2
    button(at, "Sample answers").click().run()
    button(at, "All bad").click().run()
    assert "Nothing stored" in texts(at.info)
    at.text_area[0].input("The answer is 2.")
    button(at, "Save as demonstration").click().run()
    assert store.list_rankings() == []
    assert [d["output"] for d in store.list_demonstrations()] == ["The answer is 2."]


def test_rank_without_prompts_offers_demo_prompts(app, workbench_home):
    at = open_page(app, "rank")
    assert "No prompts yet" in texts(at.info)
    button(at, "Add 20 demo prompts").click().run()
    assert db(workbench_home).counts()["prompts"] == 20


def test_train_validates_fields_and_launches_sft(app, workbench_home):
    at = open_page(app, "train")
    prefix = "cfg_sft_quick_"
    at.text_input(key=prefix + "learning_rate").input("-1").run()
    assert "learning_rate must be > 0" in texts(at.error)
    assert button(at, "Launch").disabled
    at.text_input(key=prefix + "learning_rate").input("abc").run()
    assert "learning_rate must be of type float" in texts(at.error)
    at.text_input(key=prefix + "learning_rate").input("nan").run()
    assert "learning_rate must be a finite number, got nan" in texts(at.error)
    assert button(at, "Launch").disabled

    at.text_input(key=prefix + "learning_rate").input("1e-3")
    at.number_input(key=prefix + "epochs").set_value(1)
    at.number_input(key=prefix + "n_demonstrations").set_value(32)
    at.number_input(key=prefix + "eval_prompts").set_value(4)
    at.text_input(key="train_run_name").input("sft-page-test")
    at.run()
    assert not at.error, texts(at.error)
    assert "epochs: 1" in texts(at.code) and "rlhf sft --config sft.yaml" in texts(at.code)
    button(at, "Launch").click().run()
    assert "Launched **sft-page-test**" in texts(at.success)
    store = db(workbench_home)
    run = store.get_run("sft-page-test")
    assert run["config"]["epochs"] == 1 and run["config"]["learning_rate"] == 1e-3

    # The same name twice is refused with the store's message.
    button(at, "Launch").click().run()
    assert "already exists" in texts(at.error)
    deadline = time.monotonic() + 120
    while store.get_run("sft-page-test")["status"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert store.get_run("sft-page-test")["status"] == "done", store.get_run("sft-page-test")["error"]
    at.run()  # the job's log (the stage's epoch summary) shows under it on the Train page
    assert any("epoch 1: epoch=1" in c.value for c in at.code), texts(at.code)


def test_train_rm_needs_an_sft_checkpoint(app):
    at = open_page(app, "train")
    at.get("button_group")[0].set_value("rm").run()
    assert "SFT checkpoint: none yet" in texts(at.error)
    assert button(at, "Launch").disabled
    assert at.text_input(key="cfg_rm_quick_learning_rate").value == "0.0005"
    assert not any(w.key == "cfg_rm_quick_sft_model" for w in at.text_input)
    at.number_input(key="cfg_rm_quick_ensemble").set_value(17).run()  # an ensemble of 1..16 reward models
    assert "ensemble must be <= 16" in texts(at.error)


def test_monitor_overlays_runs_and_exports_csv(app, workbench_home):
    store = db(workbench_home)
    for run_id in ("ppo-a", "ppo-b"):
        store.create_run(run_id, "ppo", {})
        store.set_run_status(run_id, "done")
        for step in range(5):
            store.log_metrics(run_id, step, {"reward": step * 0.1, "kl": step * 0.01})
    at = open_page(app, "monitor")
    at.multiselect(key="monitor_runs").set_value(["ppo-a", "ppo-b"]).run()
    charts = at.get("plotly_chart")
    assert len(charts) == 2
    figure = json.loads(charts[0].proto.spec)
    assert figure["layout"]["title"]["text"] == "reward"
    assert [t["name"] for t in figure["data"]] == ["ppo-a", "ppo-b"]
    assert at.get("download_button")[0].label == "Download ppo-b metrics (CSV)"  # the newest run first


def test_monitor_without_runs_or_metrics(app, workbench_home):
    at = open_page(app, "monitor")
    assert "No runs yet" in texts(at.info)
    db(workbench_home).create_run("sft-empty", "sft", {})
    at.run()
    assert "No metrics logged yet" in texts(at.info)


def perturbed_copy_of_bundled(target):
    """A second policy that answers differently from the base (for a side-by-side vote)."""
    import torch

    from core.models.loading import load_policy, load_tokenizer, save_checkpoint

    model = load_policy("bundled", dropout=None)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return save_checkpoint(model, load_tokenizer("bundled"), target)


def test_chat_streams_and_side_by_side_vote_becomes_a_ranking(app, workbench_home, tmp_path):
    store = db(workbench_home)
    store.add_checkpoint("base-copy", "base", perturbed_copy_of_bundled(tmp_path / "noisy"))
    at = open_page(app, "chat")
    at.chat_input[0].set_value("What is 3 plus 4?").run()
    assert not at.exception, at.exception
    assert [m.name for m in at.chat_message] == ["user", "assistant"]

    at.multiselect(key="sbs_models").set_value(["bundled (base)"]).run()
    at.text_area(key="sbs_prompt").input("What is 3 plus 4?")
    button(at, "Generate").click().run()
    assert "Pick between 2 and 5 checkpoints" in texts(at.error)

    at.multiselect(key="sbs_models").set_value(["bundled (base)", "base-copy (base)"])
    at.number_input(key="chat_seed").set_value(1)
    button(at, "Generate").click().run()
    answers = list(at.session_state["sbs"]["answers"].values())
    assert len(answers) == 2
    at.radio(key="sbs_vote").set_value("Tie").run()
    button(at, "Save vote").click().run()
    assert "Not stored" in texts(at.info)
    assert store.list_rankings() == []
    assert answers[0] != answers[1]
    at.radio(key="sbs_vote").set_value("B better").run()
    button(at, "Save vote").click().run()
    assert [r["responses"] for r in store.list_rankings()] == [[answers[1], answers[0]]]


def test_train_loads_a_config_file_or_rejects_it_whole(app):
    at = open_page(app, "train")
    at.get("file_uploader")[0].upload("sft.yaml", b"epochs: 2\nlearning_rate: 0.002\n").run()
    assert not at.exception, at.exception
    assert at.number_input(key="cfg_sft_quick_epochs").value == 2
    assert at.text_input(key="cfg_sft_quick_learning_rate").value == "0.002"
    at.get("file_uploader")[0].clear().upload("bad.yaml", b"epochs: 3\nbeta: 0.1\n").run()
    assert "Config not loaded: unknown config key(s) for SFTConfig: beta" in texts(at.error)
    assert at.number_input(key="cfg_sft_quick_epochs").value == 2


def test_chat_same_answers_offer_no_vote(app, workbench_home):
    from core.paths import BUNDLED_MODEL_DIR

    db(workbench_home).add_checkpoint("base-again", "base", BUNDLED_MODEL_DIR)  # same weights, same seed
    at = open_page(app, "chat")
    at.multiselect(key="sbs_models").set_value(["bundled (base)", "base-again (base)"])
    at.text_area(key="sbs_prompt").input("What is 3 plus 4?")
    button(at, "Generate").click().run()
    assert "no order to vote on" in texts(at.info)
    assert not any(b.label == "Save vote" for b in at.button)
