"""Stage 2: the K-wise reward model."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from core import reward
from core.bench import synthetic_rankings
from core.config import make_config
from core.events import Events
from core.models import load_scalar_model, load_tokenizer, pick_device


def test_kwise_loss_is_the_mean_over_each_prompts_pairs():
    scores = torch.tensor([2.0, 1.0, -1.0, 0.5, 0.7], requires_grad=True)
    loss, accuracy = reward.kwise_loss(scores, [3, 2])
    ls = lambda a, b: -torch.nn.functional.logsigmoid(scores[a] - scores[b])  # noqa: E731
    first = (ls(0, 1) + ls(0, 2) + ls(1, 2)) / 3  # C(3,2) pairs of prompt 1
    second = ls(3, 4)  # prompt 2's one pair
    assert torch.allclose(loss, (first + second) / 2)
    assert accuracy.item() == pytest.approx(3 / 4)
    loss.backward()
    assert scores.grad.abs().sum() > 0


def test_each_answer_is_forwarded_once_per_step():
    tok = load_tokenizer("bundled")
    model = load_scalar_model("bundled", tok.pad_token_id)
    rows = []
    model.transformer.register_forward_hook(lambda m, i, o: rows.append(o.last_hidden_state.shape[0]))
    rankings = [reward.Ranking(r["prompt"], r["responses"]) for r in synthetic_rankings(3, 4)]
    seqs = [s for r in rankings for s in reward.encode_answers(tok, r.prompt, r.responses, 128)]
    loss, _ = reward.kwise_loss(reward.score_sequences(model, seqs, tok.pad_token_id, pick_device("cpu")), [4, 4, 4])
    assert rows == [12]  # 3 prompts x K=4 answers in one forward; 18 pairs scored from them


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    path = root / "rankings.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rankings(400, 4)))
    config = make_config("rm", "quick", dict(sft_model="bundled", data=str(path), epochs=2))
    return config, reward.run(config, None, Events(), root / "rm")


def test_reward_model_beats_chance_on_heldout_rankings(trained_rm):
    _, out = trained_rm
    summary = json.loads((out / "rm_summary.json").read_text())
    assert summary["heldout_rankings"] == 40 and summary["pairs_all"] == 240
    assert summary["heldout_accuracy"] > 0.8
    assert summary["accuracy_format"] > 0.85


def test_bias_centres_the_demonstrations_at_zero(trained_rm):
    config, out = trained_rm
    tok = load_tokenizer(out)
    model = AutoModelForSequenceClassification.from_pretrained(out)  # plain transformers loads it
    assert model.config.reward_bias != 0
    train = reward.load_rankings(config.data)
    pairs = reward.demonstrations_for_bias(config, None, train)
    seqs = [reward.encode_answers(tok, p, [c], 128)[0] for p, c in pairs]
    scores = reward.score_sequences(model, seqs, tok.pad_token_id, pick_device("cpu"))
    assert abs(scores.mean().item()) < 0.05


def test_rankings_file_errors_name_the_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"prompt": "p", "responses": ["a", "b"]}) + "\n"
                    + json.dumps({"prompt": "p", "responses": ["a", "a"]}) + "\n")
    with pytest.raises(ValueError, match="line 2: responses 1 and 2 are the same"):
        reward.load_rankings(str(path))
