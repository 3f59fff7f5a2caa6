"""Iterated RLHF rounds (core/runs/rounds.py) on the bundled tiny model, a few steps a stage: resume after a
kill in each state, the RM of round r trains on exactly the union of rounds <= r, a team round waits for a
labeling batch across a server restart and goes on when a gradio_client labeler submits its queue, and bad
input is refused before any work."""

from __future__ import annotations

import json
import os
import socket

import pytest

from core.config import RoundsConfig
from core.data import demo
from core.runs import rounds as rounds_module
from core.runs.rounds import load_state, run_rounds
from core.stages.events import Events

pytestmark = pytest.mark.usefixtures("one_torch_thread")
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

OVERRIDES = {"rm": {"batch_size": 4, "k": 3},
             "ppo": {"batch_size": 8, "response_length": 8, "ptx_coef": 0.0, "eval_prompts": 0}}


def tiny(**changes) -> RoundsConfig:
    values = dict(rounds=2, sft_model="bundled", prompts_per_round=8, episodes_per_round=16, heldout_prompts=6,
                  eval_prompts=4, poll_s=0.1)
    return RoundsConfig(**{**values, **changes})


class Killed(BaseException):
    """A kill: not an Exception, so nothing on the way catches it (as SIGKILL would not be caught)."""


def rankings_of(path) -> list[tuple[str, tuple[str, ...]]]:
    return [(r.prompt, tuple(r.responses)) for r in rounds_module.read_rankings(path)]


def test_rounds_resume_after_a_kill_in_each_state_and_the_rm_trains_on_the_union(store, tmp_path, monkeypatch):
    """The process dies right after each state's work (sampling, RM, stage 3), before its transition is saved
    (the worst moment: waiting for labels is the team test's):
    the next run redoes that step and goes on. The finished run has both rounds, each stage run done, every
    ranking stored once, and round r's RM trained on exactly the rankings of rounds <= r."""
    out = tmp_path / "rounds"
    real_save = rounds_module.Rounds.save
    # (state entered, round): the kill lands in the step before it, its work done and not yet recorded.
    kills = [("rm", 0), ("stage 3", 0), ("sampling", 1)]
    pending = list(kills)

    def dying_save(self):
        # The state being left is the one before `self.state["state"]`; kill before it is on disk.
        if pending and (self.state["state"], self.state["round"]) == pending[0]:
            pending.pop(0)
            raise Killed
        real_save(self)

    monkeypatch.setattr(rounds_module.Rounds, "save", dying_save)
    attempts = 0
    while True:
        attempts += 1
        try:
            report = run_rounds(tiny(), out, store, Events(), OVERRIDES, name="killed")
            break
        except Killed:
            assert load_state(out)["state"] != "done"
    assert attempts == len(kills) + 1 and not pending
    assert report["state"] == "done" and [r["round"] for r in report["rounds"]] == [0, 1]
    assert report["sft"]["model"] == "bundled" and 0 <= report["sft"]["gold"] <= 1

    round0, round1 = (rankings_of(out / f"round-{r}" / "rankings.jsonl") for r in (0, 1))
    assert round0 and round1
    # Fresh prompts each round: round 1's slice follows round 0's.
    tasks = [t.prompt for t in demo.train_tasks(16)]
    assert {p for p, _ in round0} <= set(tasks[:8]) and {p for p, _ in round1} <= set(tasks[8:])
    # What each RM actually trained on (the RM stage writes its training rankings beside its model).
    assert rankings_of(out / "round-0" / "rm-rankings.jsonl") == round0
    assert rankings_of(out / "round-1" / "rm-rankings.jsonl") == round0 + round1
    assert report["rounds"][1]["rankings_total"] == len(round0) + len(round1)
    # Round 1 sampled the round-0 policy; its stage 3 started there, against the SFT reference.
    assert report["rounds"][1]["sampled_from"] == report["rounds"][0]["policy"]
    assert store.get_run("killed-round-1-ppo")["config"]["policy_init"] == report["rounds"][0]["policy"]
    assert store.get_run("killed-round-1-ppo")["config"]["sft_model"] == "bundled"
    # Every ranking in the store once, though two sampling steps ran twice.
    stored = [(r["prompt"], tuple(r["responses"])) for r in store.list_rankings() if r["labeler"] == "simulated"]
    assert sorted(stored) == sorted(round0 + round1)
    for key in ("round-0-rm", "round-0-ppo", "round-1-rm", "round-1-ppo"):
        assert store.get_run(f"killed-{key}")["status"] == "done"
    assert store.get_run("killed")["status"] == "done"
    # The measure: both RMs scored on round 1's held-out answers of the round-0 policy.
    for key in ("rm_accuracy_before", "rm_accuracy_after"):
        assert 0 <= report["rounds"][1][key] <= 1
    assert report["rounds"][0].get("rm_accuracy_before") is None and 0 <= report["rounds"][0]["rm_accuracy_after"] <= 1
    assert json.loads((out / "report.json").read_text()) == report


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_queue(url: str, name: str, password: str) -> int:
    """A labeler ranks every item in their queue by the demo's gold score (best first); returns how many."""
    from gradio_client import Client

    client = Client(url, auth=(name, password), verbose=False, analytics_enabled=False, download_files=False)
    done = 0
    while (item := client.predict(api_name="/next_item")) is not None and item.get("item_id") is not None:
        answers = item["answers"]
        order = sorted(range(len(answers)), key=lambda i: -demo.gold_score(item["prompt"], answers[i]))
        ranks = [order.index(i) + 1 for i in range(len(answers))]
        client.predict(item["item_id"], ranks, api_name="/submit")
        done += 1
    return done


def test_a_team_round_waits_across_a_server_restart_and_goes_on_when_the_queue_is_ranked(store, tmp_path):
    from core.data.store import Store
    from core.labeling.server import LabelingServer
    from core.labeling.store import LabelingStore

    LabelingStore(store).add_user("ann", "correct horse ann")
    config = tiny(labeler="team", wait=False, rounds=1)
    out = tmp_path / "team"
    server = LabelingServer(store)
    server.start("127.0.0.1", free_port())
    report = run_rounds(config, out, store, Events(), OVERRIDES, name="team")
    assert report["state"] == "waiting for labels" and store.get_run("team")["status"] == "stopped"
    batch = load_state(out)["batch"]
    assert batch["name"] == "team-round-0" and batch["items"] > 0
    # The server goes down (a restart, or a week's pause); nothing is lost.
    server.stop()
    store = Store(store.path)
    report = run_rounds(config, out, store, Events(), OVERRIDES, name="team")
    assert report["state"] == "waiting for labels" and load_state(out)["batch"] == batch
    assert [b["name"] for b in LabelingStore(store).list_batches()] == ["team-round-0"]  # no second batch

    server = LabelingServer(store)
    try:
        url = server.start("127.0.0.1", free_port())
        assert rank_queue(url, "ann", "correct horse ann") == batch["items"]
    finally:
        server.stop()
    report = run_rounds(config, out, store, Events(), OVERRIDES, name="team")
    assert report["state"] == "done"
    train = rankings_of(out / "round-0" / "rankings.jsonl")
    held = rankings_of(out / "round-0" / "heldout.jsonl")
    labelled = [(r["prompt"], tuple(r["responses"])) for r in store.list_rankings() if r["labeler"] == "ann"]
    assert sorted(train + held) == sorted(labelled) and len(labelled) == batch["items"]
    assert rankings_of(out / "round-0" / "rm-rankings.jsonl") == train
    # The labeler ranked by gold: the top answer of each ranking is never worse than the last.
    assert all(demo.gold_score(p, rs[0]) >= demo.gold_score(p, rs[-1]) for p, rs in train)


def test_a_closed_batch_with_too_few_rankings_is_refused_and_the_round_keeps_waiting(store, tmp_path):
    from core.labeling.store import LabelingStore

    labeling = LabelingStore(store)
    labeling.add_user("ann", "correct horse ann")
    out = tmp_path / "closed"
    config = tiny(labeler="team", wait=False, rounds=1)
    run_rounds(config, out, store, Events(), OVERRIDES, name="closed")
    batch = load_state(out)["batch"]
    labeling.set_batch_status(batch["id"], "closed")
    with pytest.raises(ValueError, match=r"batch was closed with 0 rankings in, but it needs"):
        run_rounds(config, out, store, Events(), OVERRIDES, name="closed")
    assert load_state(out)["state"] == "waiting for labels"
    labeling.set_batch_status(batch["id"], "open")
    with pytest.raises(ValueError, match="you asked to go on with 0 rankings in, but it needs 2"):
        run_rounds(config, out, store, Events(), OVERRIDES, name="closed", continue_now=True)
    assert load_state(out)["state"] == "waiting for labels"


@pytest.mark.parametrize("changes, overrides, message", [
    (dict(rounds=0), {}, "rounds must be >= 1"),
    (dict(prompts_per_round=0), {}, "prompts_per_round must be >= 1"),
    (dict(rounds=30, prompts_per_round=1000), {}, "the prompt pool is used up: 30 rounds of 1000"),
    (dict(labeler="team"), {}, "labeler 'team' needs labeler accounts"),
    (dict(labeler="crowd"), {}, "labeler must be simulated, team, page, rm:PATH"),
    (dict(labeler="rm:/nowhere/rm"), {}, "labeler rm:PATH: "),
    (dict(method="dpo", reference="sft"), {}, "reference must match policy_init"),
    (dict(), {"grpo": {"beta": 0.1}}, "a rounds run with method ppo runs sft, rm and ppo"),
    (dict(), {"ppo": {"kl_coef": float("nan")}}, "kl_coef must be a finite number"),
])
def test_bad_input_is_refused_before_any_work(store, tmp_path, changes, overrides, message):
    out = tmp_path / "bad"
    with pytest.raises(ValueError, match=message):
        run_rounds(RoundsConfig(**{**tiny().to_dict(), **changes}), out, store, Events(), overrides)
    assert not out.exists() and store.list_runs() == []


def test_a_resume_with_another_model_or_config_is_refused(store, tmp_path):
    """Rounds in one directory share one SFT model (and so one tokenizer): another is refused, state intact."""
    from core.models.loading import save_model
    from core.models.tiny import make_models, make_tokenizer

    out = tmp_path / "one"
    out.mkdir()
    state = {"name": "one", "config": tiny().to_dict(), "overrides": OVERRIDES, "state": "rm", "round": 1,
             "sft": {"model": "bundled"}, "rounds": [{"round": 0}]}
    (out / "rounds.json").write_text(json.dumps(state))
    other = tmp_path / "other-sft"
    policy, *_ = make_models(1, 16, 2, 40)
    save_model(policy, make_tokenizer(40), other)
    with pytest.raises(ValueError, match=r"holds rounds with another config \(differs in: sft_model\)"):
        run_rounds(tiny(sft_model=str(other)), out, store, Events(), OVERRIDES)
    assert json.loads((out / "rounds.json").read_text()) == state
    # A stage 3 that would go on from a policy of another tokenizer is refused by the stage's own check.
    from core.stages import make_config
    from core.stages.ppo import check_inputs

    config = make_config("ppo", "quick", {"sft_model": "bundled", "reward_model": "bundled", "policy_init": str(other)})
    with pytest.raises(ValueError, match="policy_init .* does not match sft_model"):
        check_inputs(config, store)


def test_a_reward_model_labeler_ranks_by_its_own_scores(tok, tmp_path):
    """labeler rm:PATH: each ranking is the answers in the order of that RM's scores, ties and duplicates merged."""
    import torch

    from core.models.loading import load_scalar_model, pick_device, save_model
    from core.stages.reward import encode_answers, score_sequences

    device = pick_device("cpu")
    torch.manual_seed(0)
    save_model(load_scalar_model("bundled", tok.pad_token_id, device), tok, tmp_path / "rm")  # its head, kept

    groups = [("What is 3 plus 4?", ["7", "It is 7.", "7", "seven, I think, or 8"]),
              ("Copy the words: a b.", ["a b", "a b c d e", ""])]
    rankings = rounds_module.reward_model_rankings(str(tmp_path / "rm"), groups, 64, "cpu")
    assert [len(r.responses) for r in rankings] == [3, 2]  # the duplicate "7" and the empty answer merged away
    model = load_scalar_model(tmp_path / "rm", tok.pad_token_id, device)
    for r in rankings:
        scores = score_sequences(model, encode_answers(tok, r.prompt, r.responses, 64), tok.pad_token_id, device)
        assert scores.tolist() == sorted(scores.tolist(), reverse=True)


LENGTH_TERM = "def score(prompts, completions, **columns):\n    return [float(len(c)) for c in completions]\n"


def test_a_reward_terms_labeler_ranks_by_the_terms(tmp_path):
    """labeler reward:SPEC: K answers of the policy in the order of the terms' total, answers scored alike
    merged (contains is 0 or 1: a ranking holds one answer holding the expected one over one without it)."""
    from core.models.loading import load_policy, load_tokenizer, pick_device
    from core.stages import make_config
    from core.stages.reward_terms import resolve_reward

    rm_config = make_config("rm", "quick", {"k": 4, "sample_temperature": 1.0, "device": "cpu"})
    policy = load_policy("bundled", pick_device("cpu"), dropout=0.0), load_tokenizer("bundled")
    tasks = demo.train_tasks(24)
    prompts, columns = [t.prompt for t in tasks], [{"answer": t.answer} for t in tasks]
    exact = rounds_module.reward_term_rankings(resolve_reward("contains:column=answer"), *policy, prompts, columns,
                                               rm_config, 0)
    answer = {t.prompt: t.answer for t in tasks}
    assert len(exact) >= 4 and all(len(r.responses) == 2 for r in exact)
    assert all(answer[r.prompt] in r.responses[0] and answer[r.prompt] not in r.responses[1] for r in exact)
    (tmp_path / "length.py").write_text(LENGTH_TERM)
    longest = rounds_module.reward_term_rankings(resolve_reward(f"python:{tmp_path / 'length.py'}:score"), *policy,
                                                 prompts, columns, rm_config, seed=0)
    assert len(longest) > len(exact)  # lengths tie less often than right/wrong
    for r in longest:
        assert [len(a) for a in r.responses] == sorted({len(a) for a in r.responses}, reverse=True)


def test_rounds_draw_their_slices_from_a_prompts_file_ranked_by_reward_terms(store, tmp_path):
    """--prompts FILE: round r ranks rows [r*P, (r+1)*P) of the file as it stood when the rounds began (a
    copy in DIR/prompts.jsonl), later rounds sample at the rounds' own temperature, stage 3 trains on the
    same prompts, and the prompts dropped for identical answers are counted."""
    (tmp_path / "length.py").write_text(LENGTH_TERM)
    rows = [{"prompt": f"Say the word {w}.", "answer": w} for w in demo.WORDS[:18]]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "file-rounds"
    config = tiny(prompts=str(path), labeler=f"reward:python:{tmp_path / 'length.py'}:score")
    report = run_rounds(config, out, store, Events(), OVERRIDES, name="from-file")
    assert report["state"] == "done"
    assert [json.loads(line)["prompt"] for line in (out / "prompts.jsonl").read_text().splitlines()] == \
        [r["prompt"] for r in rows]
    for r, entry in enumerate(report["rounds"]):
        slice_ = {row["prompt"] for row in rows[r * 8:(r + 1) * 8]}
        ranked = rankings_of(out / f"round-{r}" / "rankings.jsonl")
        assert ranked and {p for p, _ in ranked} <= slice_
        assert entry["prompts"] == 8 and entry["dropped_identical"] == 8 - len(ranked) - entry["heldout_rankings"]
    assert [e["sample_temperature"] for e in report["rounds"]] == [0.5, 1.0]  # the preset's RM's, then the rounds'
    assert store.get_run("from-file-round-1-ppo")["config"]["prompts"] == str(path)
    # The pool is what the rounds began with: a file changed since does not move a resumed run's slices.
    assert rounds_module.load_pool(config, store, out) == ([r["prompt"] for r in rows],
                                                           [{"answer": r["answer"]} for r in rows])


def test_a_prompt_pool_of_the_store_or_a_file_is_checked_before_any_work(store, tmp_path):
    path = tmp_path / "few.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Say the word {w}."}) + "\n" for w in demo.WORDS[:5]))
    for changes, message in [
        (dict(prompts=str(path), labeler="reward:exact"), f"the prompt pool is used up: 2 rounds of 8 fresh prompts "
                                                          f"need 16, {path} holds 5"),
        (dict(prompts=str(path), prompts_per_round=2), "labeler 'simulated' is the demo's labeler"),
        (dict(prompts=str(path), prompts_per_round=2, labeler="reward:exact"), "reads the column 'answer'"),
        (dict(prompts="store"), "the store has no prompts"),
        (dict(labeler="reward:rm"), "a reward model ranks as labeler rm:PATH"),
        (dict(labeler="reward:nonsense"), "unknown reward term 'nonsense'"),
    ]:
        out = tmp_path / "bad"
        with pytest.raises(ValueError, match=message):
            run_rounds(tiny(**changes), out, store, Events(), OVERRIDES)
        assert not out.exists() and store.list_runs() == []
    # The app's rounds job is checked the same way before it is queued.
    from core.runs.jobs import rounds_job_config

    with pytest.raises(ValueError, match=f"need 16, {path} holds 5"):
        rounds_job_config(store, tiny(prompts=str(path), labeler="reward:exact").to_dict(), OVERRIDES)
