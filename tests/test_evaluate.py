"""`rlhf eval` and the Evaluate page's table (core/analysis/eval_table.py) on the bundled tiny model, on the CPU.

Two policies: the bundled model saved as "SFT", and a copy pushed away from it (its final layer norm's
scale doubled), so KL and win rates have something to measure; a reward model from the bundled backbone with
a random head judges them.
"""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch

from core.cli import main
from core.data import demo
from core.data.store import Store
from core.analysis.eval_table import EvalConfig, check_inputs, load_results, run
from core.stages.evaluate import gold_eval
from core.stages.events import Events
from core.runs.jobs import JobManager
from core.models.loading import load_policy, load_scalar_model, load_tokenizer, pick_device, save_checkpoint

CPU = pick_device("cpu")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(sft_dir, moved_dir, rm_dir)."""
    root = tmp_path_factory.mktemp("eval-models")
    tok = load_tokenizer("bundled")
    torch.manual_seed(0)
    sft = save_checkpoint(load_policy("bundled", CPU), tok, root / "sft")
    moved = load_policy("bundled", CPU)
    with torch.no_grad():  # sharper logits (as at a lower temperature): a KL well above 0 on any prompts
        moved.transformer.ln_f.weight.mul_(2.0)
    moved = save_checkpoint(moved, tok, root / "moved")
    rm = save_checkpoint(load_scalar_model("bundled", tok.pad_token_id, CPU), tok, root / "rm")
    return sft, moved, rm


def _config(sft, moved, rm, **changes) -> EvalConfig:
    values = dict(checkpoints=f"{sft},{moved}", baseline=str(sft), reward_model=str(rm), reference=str(sft),
                  n_prompts=16, max_new_tokens=8, device="cpu")
    return EvalConfig.from_dict({**values, **changes})


def test_table_has_a_row_per_checkpoint_and_self_comparisons_are_exact(models, tmp_path):
    """Against itself a checkpoint wins exactly half (every answer ties) and has KL 0; the other's win
    rate is the complement of the baseline's when the roles swap; gold and length are those
    gold_eval measures on the same samples; the CSV reads back to the same numbers."""
    sft, moved, rm = models
    out = run(_config(sft, moved, rm), None, Events(), tmp_path / "a")
    doc = load_results(out)
    rows = doc["rows"]
    assert [r["checkpoint"] for r in rows] == [str(sft), str(moved)]
    base, other = rows
    assert base["win_rate"] == 0.5 and base["kl"] == pytest.approx(0.0, abs=1e-6)
    assert other["kl"] > 0.2 and other["prompts"] == 16 and doc["gold_applies"]
    direct = gold_eval(load_policy(moved, CPU), load_tokenizer(moved), demo.heldout_tasks(16), max_new_tokens=8)
    assert other["gold"] == pytest.approx(direct["gold"]) and other["length"] == pytest.approx(direct["length"])

    swapped = load_results(run(_config(sft, moved, rm, baseline=str(moved)), None, Events(), tmp_path / "b"))
    by_name = {r["checkpoint"]: r for r in swapped["rows"]}
    assert by_name[str(moved)]["win_rate"] == 0.5
    assert by_name[str(sft)]["win_rate"] == pytest.approx(1.0 - other["win_rate"])
    assert by_name[str(moved)]["rm_score"] == pytest.approx(other["rm_score"])  # one seed: the same answers

    read = list(csv.DictReader(io.StringIO((out / "eval.csv").read_text())))
    assert len(read) == 2
    for row, back in zip(rows, read):
        assert back["checkpoint"] == row["checkpoint"] and int(back["prompts"]) == row["prompts"]
        for key in ("rm_score", "gold", "kl", "length", "win_rate"):
            assert float(back[key]) == row[key], key


def test_gold_only_on_demo_prompts(models, tmp_path):
    sft, moved, rm = models
    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Write me a poem.", "What is 3 plus 4?")))
    out = run(_config(sft, moved, rm, prompts=str(mine)), None, Events(), tmp_path / "own")
    doc = load_results(out)
    assert not doc["gold_applies"] and all(r["gold"] is None and r["prompts"] == 2 for r in doc["rows"])
    assert all(row["gold"] == "" for row in csv.DictReader(io.StringIO((out / "eval.csv").read_text())))


def test_bad_input_is_refused_before_any_work(models, tmp_path, store):
    sft, moved, rm = models
    from core.models.tiny import make_models, make_tokenizer

    other = save_checkpoint(make_models(layers=1, embd=16, heads=2, vocab=64)[3], make_tokenizer(64), tmp_path / "o")
    cases = {
        "does not exist": _config(sft, tmp_path / "nowhere", rm, baseline=""),
        "tokenizers differ": _config(sft, moved, other),
        "is a reward model": _config(sft, rm, rm),
        "the store has no prompts": _config(sft, moved, rm, prompts="store"),
    }
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "What is 3 plus 4?"}\n{"prompt": \n')
    cases["bad.jsonl"] = _config(sft, moved, rm, prompts=str(bad))
    cases["prompts file"] = _config(sft, moved, rm, prompts=str(tmp_path / "missing.jsonl"))
    for message, config in cases.items():
        with pytest.raises(ValueError, match=message):
            run(config, store, Events(), tmp_path / "out")
    with pytest.raises(ValueError, match="baseline .* is not one of the checkpoints"):
        _config(sft, moved, rm, baseline=str(rm))
    with pytest.raises(ValueError, match="checkpoints is empty"):
        _config(sft, moved, rm, checkpoints=" , ")
    with pytest.raises(ValueError, match="reward_model is empty"):
        _config(sft, moved, "")
    assert not (tmp_path / "out").exists()


def test_cli_eval_by_store_names_records_a_run(models, tmp_path, store, capsys):
    """`rlhf eval` takes checkpoint names from the store, prints the CSV and records the run; a refused
    evaluation (another tokenizer) exits 2 with the reason and records nothing."""
    sft, moved, rm = models
    store.add_checkpoint("my-sft", "sft", sft)
    store.add_checkpoint("my-rm", "rm", rm)
    code = main(["eval", "--checkpoints", "my-sft", "--reward-model", "my-rm", "--n-prompts", "4",
                 "--max-new-tokens", "4", "--device", "cpu", "--output", str(tmp_path / "cli"), "--name", "ev"])
    assert code == 0
    out = capsys.readouterr().out  # the run's log lines, then the CSV
    printed = list(csv.DictReader(io.StringIO(out[out.index("checkpoint,path"):])))
    assert [r["checkpoint"] for r in printed] == ["my-sft"] and float(printed[0]["win_rate"]) == 0.5
    assert store.get_run("ev")["status"] == "done" and store.get_run("ev")["stage"] == "eval"
    code = main(["eval", "--checkpoints", "my-sft", "--reward-model", str(tmp_path / "none"), "--device", "cpu",
                 "--output", str(tmp_path / "cli2")])
    assert code == 2 and "reward model" in capsys.readouterr().err
    assert [r["id"] for r in store.list_runs()] == ["ev"]


def test_eval_runs_as_a_background_job(models, tmp_path, store):
    sft, moved, rm = models
    jobs = JobManager(store, runs_dir=tmp_path / "runs")
    with pytest.raises(ValueError, match="does not exist"):
        jobs.submit("eval", _config(sft, moved, rm).to_dict() | {"reference": str(tmp_path / "gone")})
    run_id = jobs.submit("eval", _config(sft, moved, rm, n_prompts=4))
    job = jobs.wait(run_id, timeout=300)
    assert job.status == "done", job.error
    assert [r["checkpoint"] for r in load_results(job.output_dir)["rows"]] == [str(sft), str(moved)]
    assert check_inputs(_config(sft, moved, rm), Store(store.path)).gold


def test_evaluate_page_runs_an_evaluation_and_shows_the_table(app, models, workbench_home):
    """The page asks for a reward model until one exists, refuses an empty pick with the config's message,
    then runs the job (with reward terms picked on the page) and shows one row per checkpoint (the baseline's
    win rate 0.5, a column per term) and a CSV download."""
    import time

    sft, moved, rm = models
    app.switch_page("../pages/evaluate.py")
    app.run()
    assert not app.exception, app.exception
    assert "Reward model: none yet" in " | ".join(str(e.value) for e in app.error)
    assert "No evaluation yet" in " | ".join(str(e.value) for e in app.info)

    store = Store(workbench_home / "workbench.db")
    store.add_checkpoint("my-sft", "sft", sft)
    store.add_checkpoint("my-ppo", "ppo", moved)
    store.add_checkpoint("my-rm", "rm", rm)
    app.run()
    next(b for b in app.button if b.label == "Evaluate").click().run()
    assert "checkpoints is empty" in " | ".join(str(e.value) for e in app.error)
    app.multiselect(key="eval_checkpoints").set_value(["my-sft (sft)", "my-ppo (ppo)"]).run()
    app.selectbox(key="eval_reference").set_value("my-sft (sft)")
    app.number_input(key="eval_n_prompts").set_value(4)
    app.number_input(key="eval_max_new_tokens").set_value(4).run()
    app.toggle(key="eval_terms").set_value(True).run()  # verifiers on the same answers, from the reward picker
    assert app.text_input(key="eval_reward__advanced").value == "exact,eos"
    next(b for b in app.button if b.label == "Evaluate").click().run()
    assert not app.exception and not app.error, app.error
    deadline = time.monotonic() + 240
    while not app.dataframe and time.monotonic() < deadline:
        time.sleep(1)
        app.run()
    table = app.dataframe[0].value
    assert list(table["checkpoint"]) == ["my-sft", "my-ppo"] and "gold" in table
    assert table["win_rate"][0] == 0.5 and table["kl"][0] == pytest.approx(0.0, abs=1e-6) and table["kl"][1] > 0
    assert all(0.0 <= v <= 1.0 for v in table["reward/exact"]) and all(0.0 <= v <= 1.0 for v in table["reward/eos"])
    assert app.get("download_button")


def test_evaluate_page_shows_each_prompts_earlier_turns_and_every_checkpoints_answer(app, models, workbench_home):
    """eval.json keeps every prompt (its turns, its row) and each checkpoint's answer with its own numbers,
    whose means are the table's; the page shows a picked prompt's earlier turns as chat messages, then each
    checkpoint's answer with its RM score (against the baseline's answer), KL and reward terms."""
    from core.textsafe import escape_markdown

    sft, moved, rm = models
    conversation = [{"role": "system", "content": "Answer with a number."},
                    {"role": "user", "content": "I have 3 apples."}, {"role": "assistant", "content": "Three apples."},
                    {"role": "user", "content": "And 4 more: how many now?"}]
    prompts = workbench_home / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is 2 plus 2?", "answer": "4"}) + "\n"
                       + json.dumps({"prompt": conversation, "answer": "7"}) + "\n")
    output = workbench_home / "runs" / "eval-turns"
    config = _config(sft, moved, rm, prompts=str(prompts), reward="exact,eos")
    doc = load_results(run(config, None, Events(), output))
    assert [p["turns"] for p in doc["prompts"]] == [[{"role": "user", "content": "What is 2 plus 2?"}], conversation]
    assert [p["columns"] for p in doc["prompts"]] == [{"answer": "4"}, {"answer": "7"}]
    for row in doc["rows"]:
        answers = doc["answers"][row["checkpoint"]]
        assert len(answers) == 2
        for key in ("rm_score", "kl", "length", "reward/eos"):
            assert sum(a[key] for a in answers) / 2 == pytest.approx(row[key]), key
    assert all(a["kl"] == pytest.approx(0.0, abs=1e-6) for a in doc["answers"][str(sft)])  # the baseline vs itself

    store = Store(workbench_home / "workbench.db")
    store.create_run("eval-turns", "eval", config.to_dict(), str(output))
    store.set_run_status("eval-turns", "done")
    app.switch_page("../pages/evaluate.py")
    app.run()
    assert not app.exception, app.exception
    app.selectbox(key="eval_prompt_eval-turns").set_value(1).run()
    assert not app.exception, app.exception
    shown = [(m.name, [t.value for t in m.text], [c.value for c in m.caption]) for m in app.chat_message]
    assert [(name, text) for name, text, _ in shown[:3]] == [("assistant", ["Answer with a number."]),
                                                            ("user", ["I have 3 apples."]),
                                                            ("assistant", ["Three apples."])]
    assert f"**User:** {escape_markdown('And 4 more: how many now?')}" in [m.value for m in app.markdown]
    answers = shown[3:]
    assert [text for _, text, _ in answers] == [[doc["answers"][c][1]["text"] or "(empty answer)"]
                                               for c in (str(sft), str(moved))]
    base, other = (doc["answers"][c][1] for c in (str(sft), str(moved)))
    assert answers[0][2][0].startswith(f"RM score {base['rm_score']:+.3f} · ")  # the baseline: no verdict
    margin = other["rm_score"] - base["rm_score"]
    assert margin != 0  # two different models' answers
    verdict = f"{'beats' if margin > 0 else 'loses to'} the baseline by {abs(margin):.2g}"
    assert answers[1][2][0].startswith(f"RM score {other['rm_score']:+.3f} ({verdict})")
    assert f"exact {other['reward/exact']:+.3g} · eos {other['reward/eos']:+.3g}" in answers[1][2][0]
    assert "answer = 7" in " ".join(c.value for c in app.caption)


def test_one_sampling_pass_gives_gold_rm_score_and_kl_of_the_same_answers(models, monkeypatch):
    """`measure_answers` samples each chunk once and takes every measure from those answers: the sampler
    runs once per chunk with everything asked for, each measure agrees with the functions that read it,
    and the KL of a model to itself is 0 on every answer."""
    import core.stages.evaluate as evaluate

    sft, moved, rm = models
    tok = load_tokenizer(sft)
    policy, reference = load_policy(moved, CPU, dropout=0.0), load_policy(sft, CPU, dropout=0.0)
    reward_model = load_scalar_model(rm, tok.pad_token_id, CPU)
    tasks = demo.heldout_tasks(20)
    prompts = [t.prompt for t in tasks]
    calls = []
    sample = evaluate.sample
    monkeypatch.setattr(evaluate, "sample", lambda *a, **kw: calls.append(1) or sample(*a, **kw))
    measured = evaluate.measure_answers(policy, tok, prompts, max_new_tokens=8, batch_size=8,
                                        reward_model=reward_model, reference=reference)
    assert len(calls) == 3  # 20 prompts in chunks of 8
    assert all(len(measured[k]) == 20 for k in ("parts", "length", "finished", "rm", "kl"))
    assert sum(measured["kl"]) / 20 > 0.05  # a sharper copy: KL well above 0 (one answer's k1 sum may be < 0)

    scored = evaluate.score_answers(policy, tok, prompts, reward_model, max_new_tokens=8, batch_size=8,
                                    reference=reference)
    assert scored["rm"] == pytest.approx(measured["rm"]) and scored["kl"] == pytest.approx(measured["kl"])
    assert scored["gold"] == pytest.approx([p.score for p in measured["parts"]])
    means = gold_eval(policy, tok, tasks, max_new_tokens=8, batch_size=8, reference=reference)
    assert means["kl"] == pytest.approx(sum(measured["kl"]) / 20)
    assert means["gold"] == pytest.approx(sum(scored["gold"]) / 20)
    itself = evaluate.measure_answers(reference, tok, prompts, max_new_tokens=8, batch_size=8, reference=reference)
    assert max(abs(k) for k in itself["kl"]) < 1e-4


def test_evaluate_pages_terminal_line_follows_the_picks_and_the_reward_terms(app, workbench_home):
    def line() -> str:
        return next(c.value for c in app.caption if c.value.startswith("Same from a terminal"))

    app.switch_page("../pages/evaluate.py")
    app.run()
    assert not app.exception, app.exception
    assert line() == ("Same from a terminal: `rlhf eval --checkpoints my-sft,my-ppo --reward-model my-rm "
                      "--output out/eval`")
    app.multiselect(key="eval_checkpoints").set_value(["bundled (base)"]).run()
    app.number_input(key="eval_n_prompts").set_value(4).run()
    assert line() == ("Same from a terminal: `rlhf eval --checkpoints bundled --baseline bundled --reward-model "
                      "my-rm --n-prompts 4 --output out/eval`")
    app.toggle(key="eval_terms").set_value(True).run()  # terms picked: --reward SPEC, as the picker wrote it
    assert "--reward-model my-rm --reward exact,eos --n-prompts 4 --output" in line()
    app.text_input(key="eval_reward__advanced").input("exact, regex:pattern= x ").run()
    assert "--reward 'exact,regex:pattern= x ' --n-prompts" in line()  # quoted for the shell, its spaces kept
    app.toggle(key="eval_terms").set_value(False).run()
    assert "--reward " not in line()
