"""The over-optimisation study and best-of-n with a reward of terms (`rlhf study --reward rm,length:...`): the
proxy the sweep optimises and best-of-n picks by is the terms' weighted total, gold stays the demo's labeler,
study.json records the reward and a resume with another one is refused."""

from __future__ import annotations

import json

import pytest
import torch

from core.data import demo
from core.models.loading import load_policy, load_scalar_model, load_tokenizer, pick_device, save_checkpoint
from core.runs import study
from core.stages.events import Events
from core.stages.reward_terms import resolve_reward

CPU = pick_device("cpu")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY_PPO = {"batch_size": 8, "ppo_epochs": 1, "response_length": 8, "device": "cpu"}
PROXY = "rm,length:target=3:weight=-0.5"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("study-reward-models")
    tok = load_tokenizer("bundled")
    torch.manual_seed(0)
    sft = save_checkpoint(load_policy("bundled", CPU), tok, root / "sft")
    rm = save_checkpoint(load_scalar_model("bundled", tok.pad_token_id, CPU), tok, root / "rm")
    return str(sft), str(rm)


def test_best_of_n_picks_by_the_rewards_total():
    """A proxy of only a length penalty (-1 per token beyond 0): the favourite of a group is its shortest
    answer, so the chosen answers' length can only fall as n doubles (a group of 2n is two groups of n), and
    the proxy is minus that length. Picking by anything else would not give this order."""
    tok = load_tokenizer("bundled")
    policy = load_policy("bundled", CPU, dropout=0.0)
    points = study.best_of_n(policy, resolve_reward("length:target=0:weight=-1"), tok, demo.heldout_tasks(6),
                             [1, 2, 4, 8], max_new_tokens=12, seed=3)
    lengths = [p["terms"]["length"] for p in points]
    assert lengths == sorted(lengths, reverse=True) and lengths[-1] < lengths[0]
    for p in points:
        assert p["rm"] == pytest.approx(-p["terms"]["length"])
        assert 0.0 <= p["gold"] <= 1.0


def test_a_study_with_terms_optimises_and_records_them(models, store, tmp_path):
    sft, rm = models
    config = study.study_config(kl_coefs=[0.1], ns=[2], episodes=8, eval_every=1, eval_prompts=4, bon_prompts=2,
                                sft_model=sft, reward_model=rm, ppo=TINY_PPO, reward=PROXY)
    out = tmp_path / "study"
    doc = study.run_study(config, out, store, Events(store, None), name="terms-study")
    saved = json.loads((out / study.STUDY_FILE).read_text())
    assert saved["config"]["reward"] == PROXY
    for point in [saved["sft"], *saved["bon"], *saved["rl"]]:
        # The proxy is the weighted total of the terms, on the same answers.
        assert point["rm"] == pytest.approx(point["terms"]["rm"] - 0.5 * point["terms"]["length"], abs=1e-5)
        assert 0.0 <= point["gold"] <= 1.0
    assert [p["n"] for p in saved["bon"]] == [1, 2] and saved["bon"][1]["rm"] >= saved["bon"][0]["rm"]
    assert len(doc["rl"]) == 1
    # The sweep's PPO run optimised the same terms: each logged beside the total.
    logged = {r["name"] for r in store.metrics(["terms-study-kl0.1"])}
    assert {"reward", "reward/rm", "reward/length"} <= logged
    # Another reward in the same directory is refused, naming what changed.
    with pytest.raises(ValueError, match=r"differs in: reward"):
        study.run_study({**config, "reward": "rm"}, out, store, Events(store, None))


def test_a_study_json_from_before_the_reward_setting_resumes_as_rm(models, store, tmp_path):
    """An older study.json has no reward in its config: it was scored by the RM, and resumes with reward rm."""
    sft, rm = models
    config = study.study_config(kl_coefs=[0.1], ns=[2], episodes=8, eval_every=1, eval_prompts=2, bon_prompts=2,
                                sft_model=sft, reward_model=rm, ppo=TINY_PPO)
    out = tmp_path / "old"
    out.mkdir()
    old = {k: v for k, v in config.items() if k != "reward"}
    (out / study.STUDY_FILE).write_text(json.dumps({"config": old, "name": "old", "models": None, "sft": None,
                                                    "rl": [], "bon": [], "runs": {}}))
    with pytest.raises(ValueError, match=r"differs in: reward"):
        study.run_study({**config, "reward": PROXY}, out, store, Events(store, None))
    assert config["reward"] == "rm"


@pytest.mark.parametrize("changes, message", [
    ({"reward": "vibes"}, "unknown reward term 'vibes'"),
    ({"reward": "rm:weight=nan"}, "finite number"),
    ({"ppo": {"reward": "rm"}}, "give the study's reward as its own setting"),
])
def test_a_bad_study_reward_is_refused_before_any_work(changes, message):
    with pytest.raises(ValueError, match=message):
        study.study_config(**{"kl_coefs": [0.1], **changes})


def test_a_reward_column_the_demo_lacks_is_refused_before_models_train(store, tmp_path):
    """A user's function reading a column the demo's prompts lack stops the study before SFT trains."""
    path = tmp_path / "mine.py"
    path.write_text("def score(prompts, completions, solution):\n    return [0.0] * len(prompts)\n")
    config = study.study_config(kl_coefs=[0.1], ns=[2], episodes=8, reward=f"rm,python:{path}:score")
    with pytest.raises(ValueError, match="reads the column 'solution'"):
        study.run_study(config, tmp_path / "s", store, Events(store, None), name="bad-study")
    assert not (tmp_path / "s" / "sft").exists()


def test_the_cli_takes_the_study_reward_and_refuses_a_bad_one(workbench_home, store, tmp_path, capsys):
    from core.cli import main

    out = tmp_path / "study"
    assert main(["study", "overopt", "--demo", "--output", str(out), "--reward", "rm,length:target=x"]) == 2
    assert "length: target must be a number" in capsys.readouterr().err
    assert not out.exists() and store.list_runs() == []
