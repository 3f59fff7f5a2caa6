"""Reward-model ensembles (core/models/ensemble.py, `rlhf rm --set ensemble=N`): the conservative reward against
a hand computation, members that differ, an ensemble directory that round-trips and refuses a missing member or
a member with another tokenizer, PPO scoring with the aggregate, the memory planner counting every member, and
bad settings refused. The study's ensemble arm is tested in tests/test_study.py."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from core.config import GRPOConfig, PPOConfig, RewardConfig
from core.data import demo
from core.data.sources import Ranking
from core.models.ensemble import (
    RewardEnsemble,
    aggregate,
    answer_scores,
    disagreement,
    ensemble_size,
    load_reward_model,
    save_ensemble,
)
from core.models.generate import encode_prompts
from core.models.loading import (
    load_policy,
    load_scalar_model,
    load_tokenizer,
    pick_device,
    resolve_model,
    save_checkpoint,
    token_scores,
)
from core.stages import make_config, ppo, reward

CPU = pick_device("cpu")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------
# The aggregate, by hand
# ---------------------------------------------------------------------------------------------

SCORES = torch.tensor([[1.0, -2.0, 0.5],  # member 0's scores of three answers
                       [3.0, 0.0, 0.5],
                       [2.0, -1.0, 0.5]])


def test_the_conservative_reward_equals_the_hand_computation():
    std = math.sqrt(2 / 3)  # answers 0 and 1: deviations -1, +1, 0 from the mean (population std); answer 2: 0
    assert aggregate(SCORES, "mean").tolist() == pytest.approx([2.0, -1.0, 0.5])
    assert aggregate(SCORES, "min").tolist() == pytest.approx([1.0, -2.0, 0.5])
    assert disagreement(SCORES).tolist() == pytest.approx([std, std, 0.0])
    assert aggregate(SCORES, "mean_minus_std", 0.5).tolist() == pytest.approx([2 - 0.5 * std, -1 - 0.5 * std, 0.5])
    assert aggregate(SCORES, "mean_minus_std", 0.0).tolist() == pytest.approx([2.0, -1.0, 0.5])
    # One reward model: every aggregate is its own score, exactly.
    for how in ("mean", "min", "mean_minus_std"):
        assert torch.equal(aggregate(SCORES[:1], how, 3.0), SCORES[0])
    with pytest.raises(ValueError, match="reward_aggregate"):
        aggregate(SCORES, "max")


def test_a_bootstrap_resample_draws_with_replacement_and_repeats_with_its_seed():
    rankings = [demo_ranking(i) for i in range(200)]
    drawn = reward.bootstrap(rankings, seed=1000)
    assert len(drawn) == len(rankings) and drawn == reward.bootstrap(rankings, seed=1000)
    distinct = len({id(r) for r in drawn})
    assert 0.55 * len(rankings) < distinct < 0.72 * len(rankings)  # 1 - 1/e = 63 % expected
    assert {id(r) for r in drawn} != {id(r) for r in reward.bootstrap(rankings, seed=2000)}


def demo_ranking(i: int) -> Ranking:
    return Ranking(f"prompt {i}", ["a", "b"])


@pytest.mark.parametrize("cls, values, message", [
    (RewardConfig, {"ensemble": 0}, "ensemble must be >= 1"),
    (RewardConfig, {"ensemble": 17}, "ensemble must be <= 16"),
    (PPOConfig, {"uncertainty_coef": -0.5}, "uncertainty_coef must be >= 0"),
    (PPOConfig, {"uncertainty_coef": float("nan")}, "uncertainty_coef must be a finite number"),
    (GRPOConfig, {"reward_aggregate": "max"}, "reward_aggregate must be one of mean, min, mean_minus_std"),
])
def test_bad_ensemble_settings_are_refused(cls, values, message):
    with pytest.raises(ValueError, match=message):
        cls.from_dict(values)


# ---------------------------------------------------------------------------------------------
# A trained ensemble: `rlhf rm --set ensemble=2`
# ---------------------------------------------------------------------------------------------


class Recorder:
    def __init__(self, stop_after: int | None = None):
        self.dist = __import__("core.distributed", fromlist=["Distributed"]).Distributed()
        self.run_id, self.steps, self.checkpoints, self.logs = None, [], [], []
        self.stop_after = stop_after

    def should_stop(self):
        return self.stop_after is not None and len(set(self.steps)) >= self.stop_after

    def metrics(self, step, values):
        self.steps.append(step)

    def progress(self, *args):
        pass

    def checkpoint(self, name, kind, path, step=0):
        self.checkpoints.append((name, kind, path))

    def log(self, message):
        self.logs.append(message)

    def close(self):
        pass


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    path = root / "rankings.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in demo.synthetic_rankings(200, 4)))
    config = make_config("rm", "quick", dict(sft_model="bundled", data=str(path), ensemble=2))
    events = Recorder()
    return config, reward.run(config, None, events, root / "rm"), events


def _answers(tok, n=24):
    rows = demo.synthetic_rankings(n, 4)
    seqs = [s for r in rows for s in reward.encode_answers(tok, r["prompt"], r["responses"], 128)]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    return ids, mask, mask.sum(1) - 1


def test_an_ensemble_trains_members_that_differ_and_round_trips(trained, tok):
    config, out, events = trained
    listing = json.loads((out / "ensemble.json").read_text())
    assert listing["members"] == [".", "member-1"] and ensemble_size(out) == 2
    summary = json.loads((out / "rm_summary.json").read_text())
    assert summary["ensemble"] == 2 and [m["seed"] for m in summary["members"]] == [0, 1000]
    for member in summary["members"]:
        assert member["heldout_accuracy"] > 0.75  # both learned the rankings
    # One step axis, member after member: the second member's steps follow the first's.
    per_member = summary["members"][0]["steps"]
    assert events.steps == sorted(events.steps) and summary["members"][1]["steps"] == summary["steps"] == 2 * per_member
    assert len(set(events.steps)) == 2 * per_member

    # Members differ: other heads, other scores of the same answers (not N copies).
    first = AutoModelForSequenceClassification.from_pretrained(out)  # plain transformers reads member 0
    second = AutoModelForSequenceClassification.from_pretrained(out / "member-1")
    assert (first.score.weight - second.score.weight).abs().max() > 1e-3
    ids, mask, last = _answers(tok)
    with torch.no_grad():
        alone = torch.stack([token_scores(m.eval(), ids, mask)[torch.arange(len(ids)), last] for m in (first, second)])
    assert (alone[0] - alone[1]).abs().mean() > 0.05

    # The directory loads back as the ensemble: each member scores as it does alone, the reward aggregates them.
    ensemble = load_reward_model(out, tok.pad_token_id, CPU, how="min")
    assert isinstance(ensemble, RewardEnsemble) and len(ensemble.members) == 2
    with torch.no_grad():
        reward_, members = answer_scores(ensemble, ids, mask, None, 0, last)
    assert torch.allclose(members, alone, atol=1e-5)
    assert torch.allclose(reward_, alone.min(0).values, atol=1e-5)
    # Every member is centred on the demonstrations (its own reward_bias), as a single RM.
    assert first.config.reward_bias != second.config.reward_bias


def test_a_stopped_ensemble_resumes_with_the_member_it_stopped_in(tmp_path):
    """Stopped in its second member, an ensemble leaves no ensemble directory; run again it skips the finished
    member and ends with the same members as an uninterrupted run."""
    path = tmp_path / "rankings.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in demo.synthetic_rankings(48, 4)))
    config = make_config("rm", "quick", dict(sft_model="bundled", data=str(path), ensemble=2))
    straight = reward.run(config, None, Recorder(), tmp_path / "straight")
    per_member = json.loads((straight / "rm_summary.json").read_text())["members"][0]["steps"]
    first = Recorder(stop_after=per_member + 2)
    reward.run(config, None, first, tmp_path / "resumed")
    assert not (tmp_path / "resumed").exists()
    assert any("stopped while training member 2 of 2" in line for line in first.logs)
    second = Recorder()
    resumed = reward.run(config, None, second, tmp_path / "resumed")
    assert not any("member 1 of 2" in line for line in second.logs)  # the finished member is not trained again
    assert min(second.steps) == per_member + 1  # the second member's curve, on the ensemble's one step axis
    for member in ("", "member-1"):
        a = AutoModelForSequenceClassification.from_pretrained(straight / member).state_dict()
        b = AutoModelForSequenceClassification.from_pretrained(resumed / member).state_dict()
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5, member


def test_an_ensemble_missing_a_member_or_with_another_tokenizer_is_refused(trained, tmp_path, tok):
    _, out, _ = trained
    broken = shutil.copytree(out, tmp_path / "broken")
    shutil.rmtree(broken / "member-1")
    with pytest.raises(ValueError, match="missing its member 'member-1'"):
        resolve_model(broken)
    with pytest.raises(ValueError, match="missing its member"):
        load_reward_model(broken, tok.pad_token_id, CPU)
    from core.stages import check_models

    with pytest.raises(ValueError, match="missing its member"):
        check_models("ppo", PPOConfig.from_dict({"sft_model": "bundled", "reward_model": str(broken), "device": "cpu"}))

    other = load_tokenizer("bundled")
    other.add_tokens(["zzqx-not-in-the-vocabulary"])
    torch.manual_seed(0)
    a = save_checkpoint(load_scalar_model("bundled", tok.pad_token_id, CPU), tok, tmp_path / "a")
    b = save_checkpoint(load_scalar_model("bundled", tok.pad_token_id, CPU), other, tmp_path / "b")
    mixed = save_ensemble(tmp_path / "mixed", [a, b])
    with pytest.raises(ValueError, match="tokenizers differ"):
        load_reward_model(mixed, tok.pad_token_id, CPU)



def test_reward_models_trained_apart_join_into_one_ensemble_and_bad_members_are_refused(tmp_path, tok, capsys):
    """`rlhf ensemble`: members from different bases, say, saved as one directory that scores as each member
    does alone; refused before anything is written: one member, a causal LM, an ensemble, another tokenizer,
    a target that exists."""
    from core.cli import main
    from core.models.ensemble import join_ensemble

    torch.manual_seed(0)
    members = [save_checkpoint(load_scalar_model("bundled", tok.pad_token_id, CPU), tok, tmp_path / f"rm{i}")
               for i in range(3)]
    assert main(["ensemble", "--output", str(tmp_path / "joined"), *map(str, members)]) == 0
    assert "3 members" in capsys.readouterr().out and ensemble_size(tmp_path / "joined") == 3
    ensemble = load_reward_model(tmp_path / "joined", tok.pad_token_id, CPU)
    ids, mask, last = _answers(tok, 4)
    with torch.no_grad():
        _, scores = answer_scores(ensemble, ids, mask, None, 0, last)
        alone = torch.stack([token_scores(load_scalar_model(m, tok.pad_token_id, CPU).eval(), ids, mask)
                             [torch.arange(len(ids)), last] for m in members])
    assert torch.allclose(scores, alone, atol=1e-5) and (alone[0] - alone[1]).abs().mean() > 1e-3

    other = load_tokenizer("bundled")
    other.add_tokens(["zzqx-not-in-the-vocabulary"])
    foreign = save_checkpoint(load_scalar_model("bundled", tok.pad_token_id, CPU), other, tmp_path / "foreign")
    policy = save_checkpoint(load_policy("bundled", CPU), tok, tmp_path / "policy")
    for args, message in (([members[0]], "2 to 16"), ([members[0], policy], "not a reward model"),
                          ([members[0], tmp_path / "joined"], "already an ensemble"),
                          ([members[0], foreign], "tokenizers differ"),
                          ([members[0], tmp_path / "nowhere"], "nowhere"),
                          ([members[0], members[1], members[0]], "given twice")):
        with pytest.raises(ValueError, match=message):
            join_ensemble(tmp_path / "refused", args)
        assert not (tmp_path / "refused").exists()
    with pytest.raises(ValueError, match="exists"):
        join_ensemble(tmp_path / "joined", members[:2])
    assert main(["ensemble", "--output", str(tmp_path / "joined"), *map(str, members[:2])]) == 2
    assert "exists" in capsys.readouterr().err


def test_members_aligned_on_a_policys_answers_share_its_mean_there(tmp_path, tok):
    """`rlhf ensemble --align-on POLICY`: members centred apart (here member 1 at +3 on every answer) come out
    with member 0's mean on that policy's answers, member 0 untouched, the means and shifts recorded."""
    from core.cli import main
    from core.stages.evaluate import member_means

    torch.manual_seed(0)
    members = [save_checkpoint(load_scalar_model("bundled", tok.pad_token_id, CPU), tok, tmp_path / f"rm{i}")
               for i in range(2)]
    config = json.loads((members[1] / "config.json").read_text())
    config["reward_bias"] = config.get("reward_bias", 0.0) + 3.0
    (members[1] / "config.json").write_text(json.dumps(config))
    policy = save_checkpoint(load_policy("bundled", CPU), tok, tmp_path / "policy")
    prompts = [t.prompt for t in demo.train_tasks(200)]

    def means(path):
        return member_means(load_reward_model(path, tok.pad_token_id, CPU), load_policy(policy, CPU), tok, prompts)

    before = [means(m)[0] for m in members]
    assert before[1] - before[0] > 2.5  # member 1 sits ~3 above member 0 on these answers
    assert main(["ensemble", "--output", str(tmp_path / "aligned"), *map(str, members), "--align-on", str(policy)]) == 0
    after = means(tmp_path / "aligned")
    assert after[0] == pytest.approx(before[0], abs=1e-5) and after[1] == pytest.approx(after[0], abs=1e-4)
    record = json.loads((tmp_path / "aligned" / "alignment.json").read_text())
    assert record["bias_shifts"][0] == 0 and record["bias_shifts"][1] == pytest.approx(before[0] - before[1], abs=1e-4)

# ---------------------------------------------------------------------------------------------
# PPO scores with the aggregate; the planner counts every member
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_ensemble(tmp_path_factory, tok):
    """(sft dir, an ensemble of three random-head RMs): no training needed to check how they are scored."""
    root = tmp_path_factory.mktemp("random-ensemble")
    torch.manual_seed(0)
    sft = save_checkpoint(load_policy("bundled", CPU), tok, root / "sft")
    members = [save_checkpoint(load_scalar_model("bundled", tok.pad_token_id, CPU), tok, root / f"rm{i}")
               for i in range(3)]
    return sft, save_ensemble(root / "ensemble", members)


@pytest.mark.parametrize("how", ["min", "mean_minus_std"])
def test_ppo_rewards_the_aggregate_and_logs_the_disagreement(random_ensemble, tok, how):
    sft, ensemble = random_ensemble
    config = PPOConfig.from_dict(dict(sft_model=str(sft), reward_model=str(ensemble), total_episodes=8, batch_size=8,
                                      ppo_epochs=1, response_length=8, ptx_coef=0.0, device="cpu",
                                      reward_aggregate=how, uncertainty_coef=2.0))
    models = ppo.load_models(config, tok, CPU)
    assert len(models.reward_model.members) == 3
    prompts = [t.prompt for t in demo.train_tasks(8)]
    ids, mask = encode_prompts(tok, prompts)
    result = ppo.ppo_step(models, ids, mask, config, config.kl_coef)
    members = result.rollout.rm_members
    assert members.shape == (3, 8)
    expected = members.min(0).values if how == "min" else members.mean(0) - 2.0 * members.std(0, correction=0)
    assert torch.allclose(result.rollout.reward_scores, expected)  # the rm term's value: the aggregate
    assert torch.allclose(result.rollout.term_scores["rm"], expected)
    assert result.metrics["reward"] == pytest.approx(float(expected.mean()), abs=1e-5)
    assert result.metrics["reward/rm"] == pytest.approx(float(expected.mean()), abs=1e-5)
    assert result.metrics["ensemble_std"] == pytest.approx(float(members.std(0, correction=0).mean()), abs=1e-5)
    assert result.metrics["ensemble_std"] > 0  # random heads disagree

    single = PPOConfig.from_dict({**config.to_dict(), "reward_model": str(ensemble / "member-1")})
    one = ppo.ppo_step(ppo.load_models(single, tok, CPU), ids, mask, single, single.kl_coef)
    assert one.rollout.rm_members.shape == (1, 8) and "ensemble_std" not in one.metrics


def test_the_rm_term_beside_a_verifier_is_the_ensembles_aggregate_and_keeps_each_member(random_ensemble, tok):
    from core.stages.reward_terms import Answers, RewardModelTerm, resolve_reward

    _, ensemble = random_ensemble
    rm = load_reward_model(ensemble, tok.pad_token_id, CPU, how="mean_minus_std", uncertainty_coef=0.5)
    terms = resolve_reward("rm,eos:weight=2").with_reward_model(RewardModelTerm(rm, tok.pad_token_id, CPU))
    texts = [" The answer is 3.", " 12", " maybe five"]
    sequences = [tok(" What is 1 + 2?" + t, add_special_tokens=False)["input_ids"] for t in texts]
    scored = terms(Answers(["p"] * 3, texts, [{}] * 3, [True, False, True], [len(s) for s in sequences], sequences))
    members = torch.stack([reward.score_sequences(m, sequences, tok.pad_token_id, CPU) for m in rm.members])
    expected = members.mean(0) - 0.5 * members.std(0, correction=0)
    assert scored.rm_members.shape == (3, 3) and torch.allclose(scored.rm_members, members, atol=1e-5)
    assert torch.allclose(scored.terms["rm"], expected, atol=1e-5)
    assert torch.allclose(scored.total, expected + 2 * torch.tensor([1.0, 0.0, 1.0]), atol=1e-5)
    metrics = scored.metrics()
    assert metrics["ensemble_std"] == pytest.approx(float(members.std(0, correction=0).mean()), abs=1e-5)
    assert metrics["ensemble_std"] > 0  # random heads disagree
    assert metrics["reward/eos"] == pytest.approx(2 / 3) and "ensemble_std" not in resolve_reward("eos")(
        Answers(["p"], ["x"], [{}], [True], [1])).metrics()


def test_the_memory_planner_counts_every_member(random_ensemble):
    from core.models.memory import plan

    sft, ensemble = random_ensemble
    base = dict(sft_model=str(sft), batch_size=8, response_length=8, device="cpu")
    one = plan("ppo", PPOConfig.from_dict({**base, "reward_model": str(ensemble / "member-1")}), "cpu")
    three = plan("ppo", PPOConfig.from_dict({**base, "reward_model": str(ensemble)}), "cpu")
    assert three.total("weights", "reward_model") == 3 * one.total("weights", "reward_model")
    assert three.total() - one.total() == 2 * one.total("weights", "reward_model")


def test_grpo_and_rloo_reward_the_aggregate_and_log_the_disagreement(random_ensemble, tok):
    from core.stages import trl_bridge

    sft, ensemble = random_ensemble
    config = GRPOConfig.from_dict(dict(sft_model=str(sft), reward_model=str(ensemble), reward_aggregate="min",
                                       device="cpu"))
    reward_fn = trl_bridge.make_reward(config, tok, CPU)
    tasks = demo.train_tasks(4)
    prompts = [demo.format_prompt(t.prompt) for t in tasks]
    completions = [" The answer is 3.", " I think it is 5 or so, maybe.", " 12", " The answer is 7."]
    completion_ids = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in completions]
    logged = {}
    scores = reward_fn(prompts, completions, completion_ids, [t.prompt for t in tasks], ["{}"] * 4,
                       log_metric=lambda name, value: logged.setdefault(name, value))
    seqs = [tok(p, add_special_tokens=False)["input_ids"] + ids for p, ids in zip(prompts, completion_ids)]
    members = torch.stack([reward.score_sequences(m, seqs, tok.pad_token_id, CPU)
                           for m in load_reward_model(ensemble, tok.pad_token_id, CPU).members])
    assert scores == pytest.approx(members.min(0).values.tolist(), abs=1e-5)
    assert logged["raw_reward"] == pytest.approx(float(members.min(0).values.mean()), abs=1e-5)
    assert logged["reward/rm"] == pytest.approx(float(members.min(0).values.mean()), abs=1e-5)
    assert logged["ensemble_std"] == pytest.approx(float(members.std(0, correction=0).mean()), abs=1e-5)
    assert logged["ensemble_std"] > 0


def test_the_rollout_sample_keeps_each_members_score_and_older_stores_gain_the_column(tmp_path, tok):
    from types import SimpleNamespace

    from core.data import rollouts
    from core.data.store import Store

    store = Store(tmp_path / "before-ensembles.db")
    # A store written before ensembles: its rollouts table has no `members` column (nor `terms`, nor `advantage`),
    # holds `kl` NOT NULL, and holds a row.
    before = rollouts.SCHEMA.replace("kl REAL,", "kl REAL NOT NULL,")
    store._conn().executescript("\n".join(line for line in before.splitlines()
                                          if not any(c in line for c in ("members TEXT", "terms TEXT", "advantage REAL"))))
    store.create_run("ppo-e", "ppo", {})
    store._conn().execute("INSERT INTO rollout_steps VALUES ('ppo-e', 1, '[0.5]')")
    store._conn().execute("INSERT INTO rollouts VALUES ('ppo-e', 1, 0, 'p', 'r', 0.5, NULL, 0.0, 1, 1, '[]')")
    store._conn().commit()
    assert rollouts.samples(store, "ppo-e", 1)[0]["members"] is None  # the old row reads as one RM's
    assert rollouts.samples(store, "ppo-e", 1)[0]["terms"] == {}  # and without terms (written before them)
    # Rebuilt, not only extended: a GRPO/RLOO sample (no KL measured) now fits, and the old row stayed.
    recorder = rollouts.RolloutRecorder(store, "ppo-e", num_steps=3, tokenizer=tok)
    recorder.write(3, [0.25], [rollouts.Sample("p", "r", 0.25, 1, True, advantage=0.5)])
    assert [(s["kl"], s["advantage"]) for s in rollouts.samples(store, "ppo-e", 3)] == [(None, 0.5)]
    assert rollouts.samples(store, "ppo-e", 1)[0]["kl"] == 0.0 and rollouts.steps(store, "ppo-e") == [1, 3]

    prompts = [t.prompt for t in demo.train_tasks(4)]
    mask = torch.ones(4, 3)
    members = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, -0.6, 0.7, 0.8]])
    rollout = SimpleNamespace(response_ids=torch.full((4, 3), 20), response_mask=mask, logprobs=-mask, ref_logprobs=-mask,
                              reward_scores=members.min(0).values, finished=torch.ones(4, dtype=torch.bool),
                              texts=["a", "b", "c", "d"], rm_members=members)
    rollouts.RolloutRecorder(store, "ppo-e", num_steps=2, tokenizer=tok).record(2, prompts, rollout)
    kept = {s["idx"]: s for s in rollouts.samples(store, "ppo-e", 2)}
    assert kept[1]["members"] == [0.2, -0.6] and kept[1]["reward"] == pytest.approx(-0.6)
    assert [kept[i]["members"] for i in range(4)] == [[0.1, 0.5], [0.2, -0.6], [0.3, 0.7], [0.4, 0.8]]


# ---------------------------------------------------------------------------------------------
# An ensemble of heads: `rlhf rm --set ensemble=3 --set ensemble_heads=true`
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def heads_trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    path = root / "rankings.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in demo.synthetic_rankings(200, 4)))
    config = make_config("rm", "quick", dict(sft_model="bundled", data=str(path), ensemble=3, ensemble_heads=True))
    return reward.run(config, None, Recorder(), root / "rm")


def test_an_ensemble_of_heads_keeps_one_backbone_its_heads_differ_and_it_round_trips(heads_trained, tok, tmp_path):
    from safetensors.torch import load_file

    from core.models.ensemble import HEADS_FILE, join_ensemble
    from core.models.loading import last_hidden_state

    out = heads_trained
    assert json.loads((out / "ensemble.json").read_text()) == {"members": ["."], "heads": 2}
    assert ensemble_size(out) == 3 and not list(out.glob("member-*"))  # one network on disk
    summary = json.loads((out / "rm_summary.json").read_text())
    assert [m.get("head") for m in summary["members"]] == [None, 1, 2] and summary["heads"] == 2
    for member in summary["members"]:
        assert member["heldout_accuracy"] > 0.75  # every head reads the rankings' preferences

    rm = load_reward_model(out, tok.pad_token_id, CPU, how="mean")
    assert len(rm) == 3 and len(rm.members) == 1
    ids, mask, last = _answers(tok)
    rows = torch.arange(len(ids))
    first = AutoModelForSequenceClassification.from_pretrained(out).eval()  # plain transformers reads member 0
    weights = load_file(out / HEADS_FILE)
    with torch.no_grad():
        reward_, members = answer_scores(rm, ids, mask, None, 0, last)
        hidden = last_hidden_state(first, ids, mask)[rows, last]
        by_hand = hidden @ weights["linear.weight"].T + weights["linear.bias"]
        alone = token_scores(first, ids, mask)[rows, last]
    assert members.shape == (3, len(ids))
    assert torch.allclose(members[0], alone, atol=1e-5)
    assert torch.allclose(members[1:], by_hand.T, atol=1e-4)  # the heads read member 0's final hidden states
    assert torch.allclose(reward_, members.mean(0), atol=1e-6)
    # The heads differ from each other and from member 0 (bootstrap resamples), on one scale with it.
    assert (members[1] - members[2]).abs().mean() > 0.01 and (members[0] - members[1]).abs().mean() > 0.01
    assert members[1:].std() < 5 * members[0].std()

    # The rm term scores every member in one pass, the same numbers.
    from core.stages.reward_terms import Answers, RewardModelTerm

    sequences = [row[: n + 1].tolist() for row, n in zip(ids, last)]
    _, term_members = RewardModelTerm(rm, tok.pad_token_id, CPU).scores(
        Answers(["p"] * len(ids), ["x"] * len(ids), [{}] * len(ids), [True] * len(ids), [1] * len(ids), sequences))
    assert torch.allclose(term_members, members, atol=1e-4)

    # The planner counts one backbone and the heads, not three networks.
    from core.models.memory import plan

    base = dict(sft_model="bundled", batch_size=8, response_length=8, device="cpu")
    heads_plan = plan("ppo", PPOConfig.from_dict({**base, "reward_model": str(out)}), "cpu")
    single = save_checkpoint(first, tok, tmp_path / "single")
    single_plan = plan("ppo", PPOConfig.from_dict({**base, "reward_model": str(single)}), "cpu")
    hidden_size = first.config.n_embd
    assert heads_plan.total("weights", "reward_model") - single_plan.total("weights", "reward_model") == \
        2 * (hidden_size + 1) * 4

    # Refused: a listing whose heads file is gone, and an ensemble of heads joined as one member.
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / HEADS_FILE).unlink()
    with pytest.raises(ValueError, match="no heads.safetensors"):
        load_reward_model(broken, tok.pad_token_id, CPU)
    with pytest.raises(ValueError, match="already an ensemble"):
        join_ensemble(tmp_path / "joined", [single, out])


def test_ppo_scores_with_every_head_and_logs_their_disagreement(heads_trained, tok):
    config = PPOConfig.from_dict(dict(sft_model="bundled", reward_model=str(heads_trained), total_episodes=8,
                                      batch_size=8, ppo_epochs=1, response_length=8, ptx_coef=0.0, device="cpu",
                                      reward_aggregate="mean_minus_std", uncertainty_coef=1.0))
    models = ppo.load_models(config, tok, CPU)
    ids, mask = encode_prompts(tok, [t.prompt for t in demo.train_tasks(8)])
    result = ppo.ppo_step(models, ids, mask, config, config.kl_coef)
    members = result.rollout.rm_members
    assert members.shape == (3, 8)
    assert torch.allclose(result.rollout.reward_scores, members.mean(0) - members.std(0, correction=0), atol=1e-5)
    assert result.metrics["ensemble_std"] > 0


def test_ensemble_heads_need_an_ensemble():
    with pytest.raises(ValueError, match="ensemble_heads makes the members after the first score heads"):
        RewardConfig.from_dict({"ensemble_heads": True})
