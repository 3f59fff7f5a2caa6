"""Issue 11, store level: the demo's data through the store (idempotent), the rollout sample (bounded),
the results card (the report's own numbers), final-model counts, and model text that stays text."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import torch

from core import catalog
from core.analysis import monitor, results
from core.config import RewardConfig
from core.data import demo, rollouts, sources
from core.runs.demo_import import LABELER, import_demo_data, import_demo_rankings
from core.stages.events import Events
from core.models.loading import load_tokenizer
from core.paths import BUNDLED_MODEL_DIR
from core.textsafe import ShownStream, escape_markdown


def test_demo_import_is_idempotent_and_is_the_demo_data(store):
    added = import_demo_data(store, n_demonstrations=40, ramble_rate=0.5, seed=0, n_prompts=60)
    assert added == {"prompts": 60, "demonstrations": 40}
    before = store.counts()
    assert import_demo_data(store, n_demonstrations=40, ramble_rate=0.5, seed=0, n_prompts=60) == \
        {"prompts": 0, "demonstrations": 0}
    assert store.counts() == before
    assert {p["source"] for p in store.list_prompts()} == {"demo"}
    # Training on 'store' sees the same rows, in the same order, as training on 'demo'.
    pairs = lambda rows: [(r["prompt"], r["completion"]) for r in rows]  # noqa: E731
    assert pairs(sources.load_demonstrations("store", store)) == pairs(sources.load_demonstrations("demo", None, 40, 0.5, 0))
    assert sources.load_prompts("store", store) == sources.load_prompts("demo", None)[:60]
    # A user's edit is kept: the import only adds what is missing.
    first = store.list_demonstrations()[0]
    store.update_demonstration(first["id"], first["instruction"], "The answer is 42.")
    import_demo_data(store, n_demonstrations=40, ramble_rate=0.5, seed=0, n_prompts=60)
    assert store.counts() == before


def test_demo_rankings_through_the_store_match_the_demo_and_do_not_duplicate(store, tmp_path):
    from core.stages.reward import gather_rankings
    from core.models.loading import pick_device

    config = RewardConfig(sft_model=str(BUNDLED_MODEL_DIR), n_prompts=12, k=3, heldout_prompts=6,
                          sample_temperature=1.0, labeler_temperature=0.5, device="cpu")
    events = Events(store)
    added = import_demo_rankings(store, config, events, batch_prompts=5)
    stored = store.list_rankings()
    assert added == len(stored) > 0 and {r["labeler"] for r in stored} == {LABELER}
    assert import_demo_rankings(store, config, events, batch_prompts=5) == 0
    assert len(store.list_rankings()) == len(stored)

    tokenizer, device = load_tokenizer(config.sft_model), pick_device("cpu")
    on_store = gather_rankings(config.replace(data="store", heldout="demo"), store, tokenizer, device, events)
    on_demo = gather_rankings(config, None, tokenizer, device, events)
    # Same held-out meaning (noise-free labeler on the demo's held-out prompts), never stored.
    assert [vars(r) for r in on_store[1]] == [vars(r) for r in on_demo[1]]
    heldout_prompts = {t.prompt for t in demo.heldout_tasks(6)}
    assert not heldout_prompts & {p["text"] for p in store.list_prompts()}
    assert sorted(r.prompt for r in on_store[0]) == sorted(r["prompt"] for r in stored)
    # With the default 64-prompt chunks the stored rankings are exactly the RM's own demo sample.
    store2 = type(store)(tmp_path / "other.db")
    import_demo_rankings(store2, config, Events(store2))
    assert [(r["prompt"], r["responses"]) for r in store2.list_rankings()] == \
        [(r.prompt, r.responses) for r in on_demo[0]]


def fake_rollout(batch: int, length: int, step: int, prompts: list[str], tokenizer):
    ids = torch.full((batch, length), tokenizer.eos_token_id)
    ids[:, : length - 1] = torch.randint(10, 200, (batch, length - 1))
    mask = torch.ones(batch, length)
    mask[0, 2:] = 0  # the first answer stopped after two tokens
    logprobs = -torch.rand(batch, length)
    ref = logprobs - 0.1 * step
    return SimpleNamespace(response_ids=ids, response_mask=mask, logprobs=logprobs * mask, ref_logprobs=ref * mask,
                           reward_scores=torch.linspace(-1, 1, batch), finished=torch.tensor([True] * batch),
                           texts=[f"The answer is {i}." for i in range(batch)])


def test_rollouts_are_bounded_per_step_and_per_run(store):
    store.create_run("ppo-long", "ppo", {})
    tokenizer = load_tokenizer("bundled")
    prompts = [t.prompt for t in demo.train_tasks(16)]
    recorder = rollouts.RolloutRecorder(store, "ppo-long", num_steps=1000, tokenizer=tokenizer, per_step=8,
                                        max_steps=50)
    for step in range(1, 1001):
        recorder.record(step, prompts, fake_rollout(16, 6, step, prompts, tokenizer))
    kept_steps = rollouts.steps(store, "ppo-long")
    assert kept_steps[0] == 1 and kept_steps[-1] == 1000 and len(kept_steps) <= 52
    assert rollouts.count(store, "ppo-long") == {"steps": len(kept_steps), "samples": 8 * len(kept_steps)}
    assert all(len(v) == 16 for v in rollouts.rewards(store, "ppo-long").values())  # the whole batch's histogram
    # A resumed run re-records a step in place.
    recorder.record(1000, prompts, fake_rollout(16, 6, 1000, prompts, tokenizer))
    assert rollouts.count(store, "ppo-long")["samples"] == 8 * len(kept_steps)

    samples = rollouts.samples(store, "ppo-long", 20)
    assert [s["reward"] for s in samples] == sorted((s["reward"] for s in samples), reverse=True)
    first = next(s for s in samples if s["idx"] == 0)
    assert first["length"] == 2 and len(first["tokens"]) == 2
    assert all(abs(k - 2.0) < 1e-4 for _, k in first["tokens"])  # log pi - log pi_ref = 0.1 * step
    assert abs(first["kl"] - 4.0) < 1e-3
    assert first["gold"] == demo.gold_score(prompts[0], first["response"])
    # No store, no run id: nothing recorded, nothing fails.
    rollouts.RolloutRecorder(None, None, 10, tokenizer).record(1, prompts, fake_rollout(16, 6, 1, prompts, tokenizer))


def sample_report() -> dict:
    model = lambda gold, loss: {"gold": gold, "gold_greedy": gold + 0.1, "correct": 0.6, "template": 0.9,  # noqa: E731
                                "concise": 0.5, "length": 9.0, "eos_rate": 1.0, "pretrain_loss": loss}
    return {"preset": "quick", "base": model(0.21, 0.80), "sft": model(0.71, 3.0),
            "rm": {"accuracy": 0.86, "accuracy_format": 1.0, "accuracy_correctness": 0.5, "pairs_all": 600,
                   "pairs_format": 500, "pairs_correctness": 100, "heldout_accuracy": 0.86},
            "ppo": {**model(0.85, 0.89), "kl": 1.3, "kl_to_sft": 1.25},
            "ppo_no_ptx": {**model(0.81, 3.73), "kl": 1.6, "kl_to_sft": 1.5},
            "timings_s": {"base_eval": 5.0, "sft": 40.0, "rm": 20.0, "ppo": 100.0, "ppo_no_ptx": 90.0}}


def write_pipeline_run(store, tmp_path, report: dict, run_id: str = "pipeline-a") -> None:
    out = tmp_path / run_id
    out.mkdir()
    (out / "report.json").write_text(json.dumps(report))
    store.create_run(run_id, "pipeline", {"preset": "quick", "stages": ["sft", "rm", "ppo"]}, str(out))
    store.set_run_status(run_id, "done")


def test_results_card_is_the_reports_numbers(store, tmp_path):
    assert results.latest_report(store) is None
    report = sample_report()
    write_pipeline_run(store, tmp_path, report)
    run, read = results.latest_report(store)
    assert run["id"] == "pipeline-a" and read == report
    shown = results.card(read)
    for row in shown["models"]:
        source = report[row["key"]]
        assert (row["gold"], row["correct"], row["format"], row["concise"]) == \
            (source["gold"], source["correct"], source["template"], source["concise"])
        assert row["held-out pretraining loss"] == source["pretrain_loss"]
        assert row["KL to SFT"] == (0.0 if row["key"] == "sft" else source.get("kl_to_sft"))
    assert [m["model"] for m in shown["models"]] == ["Base", "SFT", "PPO-ptx", "PPO without ptx"]
    assert shown["reward_model"] == [
        {"preference": "all pairs", "accuracy": 0.86, "pairs": 600},
        {"preference": "format differs", "accuracy": 1.0, "pairs": 500},
        {"preference": "correctness differs", "accuracy": 0.5, "pairs": 100}]
    assert shown["alignment_tax"] == {"Base": 0.80, "SFT": 3.0, "PPO-ptx": 0.89, "PPO without ptx": 3.73}


def test_final_models_and_training_checkpoints(store, tmp_path):
    store.create_run("run-a", "sft", {})
    for name, step in (("run-a-epoch-1", 10), ("run-a-epoch-2", 20), ("run-a", 20)):
        (tmp_path / name).mkdir()
        store.add_checkpoint(name, "sft", tmp_path / name, run_id="run-a", step=step)
    (tmp_path / "mine").mkdir()
    store.add_checkpoint("mine", "sft", tmp_path / "mine")  # added by hand: a model
    every = store.list_checkpoints("sft")
    assert [c["name"] for c in catalog.final_models(every)] == ["run-a", "mine"]
    finals, training = catalog.grouped(every)
    assert [catalog.training_label(c) for c in training] == ["run-a › epoch 1", "run-a › epoch 2"]


def test_model_text_is_never_markup():
    attack = '![x](http://evil.example/a.png) <img src="http://evil.example/b.png"> [l]: http://evil.example $x$'
    shown = escape_markdown(attack)
    # Every character Markdown (images, links, HTML, LaTeX) acts on is backslash-escaped.
    assert not re.search(r"(?<!\\)[!\[\]()<>$]", shown)
    assert shown.replace("\\", "") == attack
    stream = ShownStream(iter(["![x](http", "://evil.example/a.png)"]))
    assert "".join(stream) == escape_markdown("![x](http") + escape_markdown("://evil.example/a.png)")
    assert stream.text == "![x](http://evil.example/a.png)"


def test_monitor_expands_a_pipeline_into_its_stage_runs():
    runs = [{"id": "pipeline-x", "stage": "pipeline", "status": "running"},
            {"id": "pipeline-x-sft", "stage": "sft", "status": "done"},
            {"id": "pipeline-x-rm", "stage": "rm", "status": "running"},
            {"id": "other", "stage": "ppo", "status": "done"}]
    assert [s.id for s in monitor.expand(runs, ["pipeline-x"])] == ["pipeline-x-sft", "pipeline-x-rm"]
    assert monitor.default_selection(runs) == ["pipeline-x"]
    # A finished evaluation after the pipeline: the pipeline is still what Monitor opens on (an eval has no curves).
    done = [{**r, "status": "done"} for r in runs] + [{"id": "eval-1", "stage": "eval", "status": "done"}]
    assert monitor.default_selection(done) == ["other"]
    assert monitor.default_selection(done[:2] + done[-1:]) == ["pipeline-x"]
    assert monitor.default_selection(done[-1:]) == ["eval-1"]
    assert monitor.any_active(runs, ["pipeline-x"]) and not monitor.any_active(runs, ["other"])
    runs.append({"id": "pipeline-x-ppo-no-ptx", "stage": "ppo", "status": "queued"})
    assert [s.label for s in monitor.expand(runs, ["pipeline-x", "other"])] == ["sft", "rm", "ppo-no-ptx", ""]
    # The page's run picker is drawn from the runs at page load: a run created since is missing from it.
    before = [dict(r) for r in runs]
    runs[0]["status"] = "done"  # the labels hold no status: nothing to redraw for
    assert not monitor.runs_changed(before, runs)
    assert monitor.runs_changed(before[:-1], before)  # a stage run that started since
    assert monitor.ema([1.0, 1.0, 1.0], 0.9) == [1.0, 1.0, 1.0]  # debiased: no pull toward 0
    assert monitor.ema([0.0, 1.0], 0.0) == [0.0, 1.0]
    curves, singles = monitor.split_single_points(
        [{"run_id": "a", "step": 1, "name": "kl", "value": 0.1}, {"run_id": "a", "step": 2, "name": "kl", "value": 0.2},
         {"run_id": "a", "step": 2, "name": "heldout_gold", "value": 0.8}])
    assert {r["name"] for r in curves} == {"kl"} and [r["name"] for r in singles] == ["heldout_gold"]
