"""Stage 2: the K-wise reward model."""

import json
from pathlib import Path

import pytest

from core.data import demo
import torch
from transformers import AutoModelForSequenceClassification

from core.data.sources import Ranking, load_rankings
from core.stages import reward
from core.stages.events import Events
from core.stages import make_config
from core.models.loading import load_scalar_model, load_tokenizer, pick_device


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
    rankings = [Ranking(r["prompt"], r["responses"]) for r in demo.synthetic_rankings(3, 4)]
    seqs = [s for r in rankings for s in reward.encode_answers(tok, r.prompt, r.responses, 128)]
    loss, _ = reward.kwise_loss(reward.score_sequences(model, seqs, tok.pad_token_id, pick_device("cpu")), [4, 4, 4])
    assert rows == [12]  # 3 prompts x K=4 answers in one forward; 18 pairs scored from them


def test_answers_cut_by_length_score_and_train_as_one_forward():
    """`score_sequences` cut into forwards by length (the CPU default in training) gives each answer the score
    and the gradient one padded forward gives, in the order the answers came."""
    tok = load_tokenizer("bundled")
    model = load_scalar_model("bundled", tok.pad_token_id)
    rows = []
    model.transformer.register_forward_hook(lambda m, i, o: rows.append(o.last_hidden_state.shape))
    rankings = [Ranking(r["prompt"], r["responses"]) for r in demo.synthetic_rankings(8, 4)]
    seqs = [s for r in rankings for s in reward.encode_answers(tok, r.prompt, r.responses, 128)]
    seqs[5] = seqs[5] + seqs[5][-12:]  # one long answer among short ones: worth a forward of its own
    grads = []
    for call_tokens in (None, 0, 10_000):  # kept whole as given; cut by length; one forward, but sorted
        model.zero_grad()
        scores = reward.score_sequences(model, seqs, tok.pad_token_id, pick_device("cpu"), call_tokens=call_tokens)
        reward.kwise_loss(scores, [4] * 8)[0].backward()
        grads.append((scores.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    assert rows[0][0] == rows[-1][0] == 32 and len(rows) > 3  # one forward of all 32, several of fewer, one
    assert sum(shape[0] * shape[1] for shape in rows[1:-1]) < rows[0][0] * rows[0][1]  # less padding computed
    (whole, whole_grad), *others = grads
    assert whole.std() > 0
    for scores, grad in others:
        assert torch.allclose(scores, whole, atol=1e-5)
        assert torch.allclose(grad, whole_grad, atol=1e-6, rtol=1e-4)


class Recorder(Events):
    """Events that keep what a stage reports, and ask it to stop after `stop_after` optimisation steps."""

    def __init__(self, stop_after: int | None = None):
        super().__init__()
        self.stop_after, self.checkpoints, self.logs, self.steps = stop_after, [], [], []

    def metrics(self, step, values):
        if "rm_loss" in values:
            self.steps.append(step)
            if self.stop_after is not None and len(self.steps) >= self.stop_after:
                self.stop_flag.set()

    def checkpoint(self, name, kind, path, step=0):
        self.checkpoints.append((name, kind, Path(path)))

    def log(self, message):
        self.logs.append(message)


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    path = root / "rankings.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in demo.synthetic_rankings(400, 4)))
    config = make_config("rm", "quick", dict(sft_model="bundled", data=str(path), epochs=2))
    events = Recorder()
    return config, reward.run(config, None, events, root / "rm"), events


def demonstration_scores(config, model_dir) -> torch.Tensor:
    tok = load_tokenizer(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)  # plain transformers loads it
    pairs = reward.demonstrations_for_bias(config, None, load_rankings(config.data, None))
    seqs = [reward.encode_answers(tok, p, [c], 128)[0] for p, c in pairs]
    return reward.score_sequences(model, seqs, tok.pad_token_id, pick_device("cpu"))


def test_reward_model_beats_chance_on_heldout_rankings(trained_rm):
    _, out, _ = trained_rm
    summary = json.loads((out / "rm_summary.json").read_text())
    assert summary["heldout_rankings"] == 40 and summary["pairs_all"] == 240
    assert summary["heldout_accuracy"] > 0.8
    assert summary["accuracy_format"] > 0.85


def test_every_reward_model_checkpoint_is_centred(trained_rm):
    """The final model and each epoch's checkpoint (all offered as reward models) score the
    demonstrations at mean 0: none is registered before its bias is set."""
    config, out, events = trained_rm
    registered = [path for _, kind, path in events.checkpoints if kind == "rm"]
    assert len(registered) == 3 and registered[-1] == out  # epoch-1, epoch-2, final
    for path in registered:
        model_config = AutoModelForSequenceClassification.from_pretrained(path).config
        assert model_config.reward_bias != 0, path
        assert abs(demonstration_scores(config, path).mean().item()) < 0.05, path


def test_a_stopped_reward_model_resumes_in_place(trained_rm, tmp_path):
    """Stopped in its second epoch, the RM keeps the centred epoch-1 model; run again with the same
    output directory it resumes after epoch 1 on the same rankings and ends where an uninterrupted
    run ends."""
    config, straight, straight_events = trained_rm
    per_epoch = len(straight_events.steps) // 2
    first = Recorder(stop_after=per_epoch + 2)
    out = reward.run(config, None, first, tmp_path / "rm")
    summary = json.loads((out / "rm_summary.json").read_text())
    assert summary["stopped"] and summary["epochs_done"] == 1
    assert abs(demonstration_scores(config, out).mean().item()) < 0.05
    second = Recorder()
    reward.run(config, None, second, tmp_path / "rm")
    assert any("resuming the reward model after epoch 1" in line for line in second.logs)
    assert second.steps == straight_events.steps[per_epoch:]  # the curve continues at the next step
    a = AutoModelForSequenceClassification.from_pretrained(straight).state_dict()
    b = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_rankings_file_errors_name_the_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"prompt": "p", "responses": ["a", "b"]}) + "\n"
                    + json.dumps({"prompt": "p", "responses": ["a", "a"]}) + "\n")
    with pytest.raises(ValueError, match="line 2: responses 1 and 2 are the same"):
        load_rankings(str(path), None)
