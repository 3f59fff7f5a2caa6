"""PPO-ptx on the bundled tiny model: the recipe's pieces and the stage's contract.

Inputs are built in a temp dir: the bundled model saved as an "SFT" policy, and reward models
made from its backbone (a random head, or a linear probe fitted in closed form to prefer
answers that stop cleanly). Nothing here asserts wall-clock times.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from core.data import demo
from core.stages import ppo, resume, rl
from core.config import PPOConfig
from core.stages.events import Events
from core.models.generate import Samples, encode_prompts
from core.models.chat import render_prompt
from core.models.loading import (
    load_policy, load_scalar_model, pick_device, save_checkpoint, token_scores,
)
from core.models.pretrain import lm_loss, pack
from core.paths import checkpoints_dir

CPU = pick_device("cpu")
RIDGE = 30.0
# The SFT policy here is the bundled base itself: prompts of the kinds its pretraining corpus holds
# (docs/NOTES.md, "The demo task"), which it answers in a familiar shape.
PROMPTS = [t.prompt for t in demo.train_tasks(400) if t.kind in ("add", "repeat", "reverse", "last")][:64]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tok):
    """(sft_dir, random-head rm_dir, probe rm_dir, ptx text file)."""
    root = tmp_path_factory.mktemp("ppo-inputs")
    torch.manual_seed(0)
    sft = save_checkpoint(load_policy("bundled", CPU), tok, root / "sft")
    rm = load_scalar_model("bundled", tok.pad_token_id, CPU)
    rm_dir = save_checkpoint(rm, tok, root / "rm")
    probe = save_checkpoint(_stop_cleanly_probe(rm, tok), tok, root / "rm-probe")
    ptx = root / "ptx.txt"
    ptx.write_text("\n".join(demo.pretraining_corpus(300, seed=5)))
    return sft, rm_dir, probe, ptx


def _stop_cleanly_probe(rm, tok):
    """A toy reward model: the scalar head fitted by ridge regression on last-token features to
    score clean "The answer is X." answers +1 and rambling ones -1 (what InstructGPT's labelers
    partly reward here). One forward over 160 texts, no training loop."""
    rng = __import__("random").Random(0)
    tasks = demo.train_tasks(80)
    texts, targets = [], []
    for t in tasks:
        clean = demo.ANSWER_TEMPLATE.format(answer=t.answer)
        ramble = clean + " " + " ".join(rng.sample(demo.RAMBLES, 2))
        for answer, y in ((clean, 1.0), (ramble, -1.0)):
            texts.append(render_prompt(tok, t.prompt) + " " + answer + tok.eos_token)
            targets.append(y)
    enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = rm.transformer(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    last = enc["attention_mask"].sum(1) - 1
    feats = hidden[torch.arange(len(texts)), last]
    y = torch.tensor(targets)
    w = torch.linalg.solve(feats.T @ feats + RIDGE * torch.eye(feats.shape[1]), feats.T @ y)
    rm.score.weight.data.copy_(w[None])
    return rm


def _config(inputs, **kw) -> PPOConfig:
    sft, rm, _, ptx = inputs
    base = dict(sft_model=str(sft), reward_model=str(rm), total_episodes=16, batch_size=16, ppo_epochs=2,
                learning_rate=1e-3, response_length=16, kl_coef=0.1, ptx_coef=0.0, ptx_data=str(ptx),
                ptx_batch_size=4, device="cpu")
    base.update(kw)
    return PPOConfig.from_dict(base)


def _models(config, tok):
    return ppo.load_models(config, tok, CPU)


def _prompt_batch(tok, n=16, offset=0):
    return encode_prompts(tok, PROMPTS[offset : offset + n])


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ------------------------------------------------------------------------------------------
# The pieces of the recipe
# ------------------------------------------------------------------------------------------


def test_gae_matches_hand_computation():
    rewards = torch.tensor([[1.0, 0.0, 2.0, 5.0]])  # the 5.0 sits on padding and must be ignored
    values = torch.tensor([[0.5, 0.2, 0.1, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = ppo.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # By hand: d2 = 2 - 0.1 = 1.9; d1 = 0.9*0.1 - 0.2 = -0.11; d0 = 1 + 0.9*0.2 - 0.5 = 0.68
    # A2 = 1.9; A1 = -0.11 + 0.72*1.9 = 1.258; A0 = 0.68 + 0.72*1.258 = 1.58576
    assert torch.allclose(adv, torch.tensor([[1.58576, 1.258, 1.9, 0.0]]), atol=1e-5)
    assert torch.allclose(ret, torch.tensor([[2.08576, 1.458, 2.0, 0.0]]), atol=1e-5)


def test_explained_variance_over_the_response_tokens():
    """1 - Var(returns - V) / Var(returns) on the real tokens only (padding holds values that would move it)."""
    returns = torch.tensor([[1.0, 2.0, 3.0, 50.0], [4.0, 0.0, 0.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])  # real: 1, 2, 3, 4 (variance 1.25)
    assert ppo.explained_variance(returns, returns, mask) == pytest.approx(1.0)
    mean = torch.full_like(returns, 2.5)
    assert ppo.explained_variance(mean, returns, mask) == pytest.approx(0.0, abs=1e-6)
    # Errors 0.5, -0.5, 0.5, -0.5: variance 0.25, so 1 - 0.25 / 1.25 = 0.8.
    close = returns + torch.tensor([[-0.5, 0.5, -0.5, 7.0], [0.5, 3.0, 3.0, 3.0]])
    assert ppo.explained_variance(close, returns, mask) == pytest.approx(0.8)
    # Values that move against the returns explain less than nothing.
    assert ppo.explained_variance(5.0 - returns, returns, mask) == pytest.approx(1 - 5.0 / 1.25)
    assert math.isnan(ppo.explained_variance(mean, torch.ones_like(returns), mask))


def test_token_rewards_put_score_on_last_token_and_kl_everywhere():
    kl = torch.tensor([[0.5, 0.1, -0.2, 0.3], [0.2, 0.2, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    rewards = ppo.token_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.1)
    expected = torch.tensor([[-0.05, -0.01, 0.02, -0.03 + 2.0], [-0.02, -0.02 - 1.0, 0.0, 0.0]])
    assert torch.allclose(rewards, expected, atol=1e-6)
    # The reward's KL is k1, the plain log-ratio (tests/test_rl_math.py: why not k3).
    lp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    assert torch.allclose(rl.kl_penalty(lp, ref), torch.tensor([[0.5, -1.0]]))


def test_missing_eos_is_penalised_and_rm_reads_the_last_response_token(inputs, tok):
    config = _config(inputs, missing_eos_penalty=1.5)
    models = _models(config, tok)
    prompt_ids, prompt_mask = _prompt_batch(tok, n=2)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    body = tok(" The answer is 3", add_special_tokens=False)["input_ids"]
    stopped = body + [eos, pad]  # emitted EOS, then padding
    cut = body + body[:2]  # never stopped: cut at the length limit
    response = torch.tensor([stopped, cut])
    response_mask = torch.tensor([[1] * (len(body) + 1) + [0], [1] * len(cut)])
    samples = Samples(prompt_ids, prompt_mask, response, response_mask, torch.tensor([True, False]), ["", ""])
    batch = ppo.score_responses(models, samples, config)
    assert batch.scores[0] == pytest.approx(batch.reward_scores[0].item())
    assert (batch.reward_scores[1] - batch.scores[1]).item() == pytest.approx(1.5)
    # Independent check of the position read: score each answer unpadded, at its last token.
    for row, ids in enumerate([stopped[: len(body) + 1], cut]):
        prompt = prompt_ids[row][prompt_mask[row].bool()].tolist()
        seq = torch.tensor([prompt + ids])
        expected = token_scores(models.reward_model.members[0], seq, torch.ones_like(seq))[0, -1]  # one RM: one member
        assert batch.reward_scores[row].item() == pytest.approx(expected.item(), abs=1e-4)
    # Padding after the EOS carries neither log-prob nor value.
    assert batch.logprobs[0, -1] == 0 and batch.values[0, -1] == 0


def test_one_step_changes_policy_and_value_not_reference_or_reward(inputs, tok):
    config = _config(inputs)
    models = _models(config, tok)
    before = {name: _snapshot(getattr(models, name))
              for name in ("policy", "reference_policy", "value_model", "reward_model")}
    prompt_ids, prompt_mask = _prompt_batch(tok)
    result = ppo.ppo_step(models, prompt_ids, prompt_mask, config, config.kl_coef)
    assert _max_diff(before["policy"], _snapshot(models.policy)) > 1e-4
    assert _max_diff(before["value_model"], _snapshot(models.value_model)) > 1e-4
    assert _max_diff(before["reference_policy"], _snapshot(models.reference_policy)) == 0
    assert _max_diff(before["reward_model"], _snapshot(models.reward_model)) == 0
    assert not any(p.requires_grad for p in models.reference_policy.parameters())
    # Policy == reference at the first rollout, so the sampled KL is 0 up to float noise
    # (it would not be with dropout on during rollouts).
    assert abs(result.metrics["kl"]) < 1e-3
    for key in ("reward", "kl", "entropy", "clip_frac", "approx_kl", "policy_loss", "value_loss",
                "response_length", "eos_rate", "episodes_per_s", "explained_variance"):
        assert key in result.metrics
    assert result.metrics["explained_variance"] <= 1.0


def test_bf16_precision_on_a_cpu_computes_in_bf16_and_starts_at_zero_kl(inputs, tok, monkeypatch):
    # The same sampled answers scored in fp32 and in bf16: the RM's scores differ by bf16 rounding only, and the
    # policy, which computes exactly as the reference under autocast (both keep fp32 weights on a CPU), reads
    # the same log-probs. A whole step in bf16 samples under autocast too and starts at a KL of 0.
    config = _config(inputs)
    prompt_ids, prompt_mask = _prompt_batch(tok)
    fp32_models = ppo.load_models(config, tok, pick_device("cpu", "fp32"))
    samples = ppo.generate_responses(fp32_models, prompt_ids, prompt_mask, config)
    bf16_models = ppo.load_models(config, tok, pick_device("cpu", "bf16"))
    assert bf16_models.reference_policy.dtype == torch.float32
    scored = {name: ppo.score_responses(m, samples, config) for name, m in (("fp32", fp32_models), ("bf16", bf16_models))}
    score_gap = (scored["fp32"].reward_scores - scored["bf16"].reward_scores).abs()
    assert 0 < score_gap.max() < 0.05  # computed in bf16 (not equal), yet the same scores to bf16's precision
    assert torch.equal(scored["bf16"].logprobs, scored["bf16"].ref_logprobs)

    autocast_while_sampling = []
    real_sample = ppo.sample
    monkeypatch.setattr(ppo, "sample", lambda *a, **kw: (autocast_while_sampling.append(
        torch.is_autocast_enabled("cpu")), real_sample(*a, **kw))[1])
    result = ppo.ppo_step(bf16_models, prompt_ids, prompt_mask, config, config.kl_coef)
    assert autocast_while_sampling == [True]
    assert result.metrics["kl"] == 0
    assert all(torch.isfinite(torch.tensor(v)) for v in result.metrics.values())


def _mean_late_kl(inputs, tok, kl_coef, steps=8, metric="kl", **kw):
    """Mean summed KL to the reference (`metric`) over the last half of a short run on the probe RM."""
    torch.manual_seed(0)
    config = _config(inputs, kl_coef=kl_coef, learning_rate=2e-4, reward_model=str(inputs[2]), **kw)
    models = _models(config, tok)
    kls = []
    for i in range(steps):
        result = ppo.ppo_step(models, *_prompt_batch(tok, offset=16 * (i % 4)), config, config.kl_coef)
        kls.append(result.metrics[metric])
    late = kls[steps // 2 :]
    return sum(late) / len(late)


def test_large_kl_coef_keeps_policy_near_reference(inputs, tok):
    free = _mean_late_kl(inputs, tok, kl_coef=0.0)
    tied = _mean_late_kl(inputs, tok, kl_coef=20.0)
    assert free > 1.0, "without a KL penalty the policy should drift from the reference"
    # Summed over ~16 tokens: under 0.05 nats a token.
    assert tied < 0.8 and tied < 0.6 * free, (tied, free)


def test_the_exact_kl_loss_keeps_the_policy_near_the_reference(inputs, tok):
    """`kl_loss_coef`: with no KL in the reward at all, the exact KL term alone holds the policy, and the
    `exact_kl` it logs agrees with the reward's sampled estimate of the same divergence."""
    free = _mean_late_kl(inputs, tok, kl_coef=0.0)
    held = _mean_late_kl(inputs, tok, kl_coef=0.0, kl_loss_coef=20.0)
    assert free > 1.0
    assert held < 0.5 * free, (held, free)
    exact = _mean_late_kl(inputs, tok, kl_coef=0.0, kl_loss_coef=20.0, metric="exact_kl")
    assert 0.3 * held < exact < 3 * held + 0.05, (exact, held)  # one divergence, two estimators


def test_the_exact_kl_term_is_zero_and_pulls_nothing_while_the_policy_is_the_reference(inputs, tok):
    """At the first optimisation step pi = pi_ref: the exact KL is 0 and so is its gradient, so the step
    equals one without the term (within float noise: Adam scales the gradients' last bits up to 0.2 % of the step;
    a term that pulled, such as k1 of the sampled tokens as a loss, would move the weights by the step itself)."""
    weights, stats = [], []
    for kl_loss_coef in (0.0, 5.0):
        torch.manual_seed(0)
        config = _config(inputs, ppo_epochs=1, kl_loss_coef=kl_loss_coef)
        models = _models(config, tok)
        start = _snapshot(models.policy)
        stats.append(ppo.ppo_step(models, *_prompt_batch(tok), config, config.kl_coef).metrics)
        weights.append(_snapshot(models.policy))
    assert "exact_kl" not in stats[0] and abs(stats[1]["exact_kl"]) < 1e-4
    step = _max_diff(start, weights[0])
    assert step > 1e-4 and _max_diff(weights[0], weights[1]) < 1e-2 * step


def test_ptx_term_enters_the_loss_and_its_gradient(inputs, tok):
    blocks = pack(tok, demo.pretraining_corpus(40, seed=9), 64)[:4]

    def counting_stream(counter):
        while True:
            counter.append(1)
            yield blocks

    results = {}
    for ptx_coef in (0.0, 1.0):
        torch.manual_seed(0)
        # vf_coef = 0 and zero advantages: the policy gradient is exactly 0, so any change to
        # the policy can only come from the ptx term.
        config = _config(inputs, ptx_coef=ptx_coef, vf_coef=0.0, ppo_epochs=1, learning_rate=1e-5)
        models = _models(config, tok)
        batch = ppo.score_responses(models, ppo.generate_responses(models, *_prompt_batch(tok, n=4), config), config)
        before = _snapshot(models.policy)
        loss_before = lm_loss(models.policy, blocks).item()
        counter: list[int] = []
        stats = ppo.ppo_update(models, batch, torch.zeros_like(batch.values), batch.values, config,
                               counting_stream(counter))
        results[ptx_coef] = (stats, _max_diff(before, _snapshot(models.policy)), len(counter),
                             loss_before, lm_loss(models.policy, blocks).item())
    stats0, change0, forwards0, _, _ = results[0.0]
    stats1, change1, forwards1, loss_before, loss_after = results[1.0]
    assert forwards0 == 0 and "ptx_loss" not in stats0 and change0 == 0
    assert forwards1 == 1 and stats1["ptx_loss"] == pytest.approx(loss_before, rel=1e-4)
    assert change1 > 1e-5 and loss_after < loss_before


# ------------------------------------------------------------------------------------------
# The stage: run(), checkpoints, resume, validation
# ------------------------------------------------------------------------------------------


class StopAfter(Events):
    """Events whose stop flag rises after `n` PPO steps have been polled."""

    def __init__(self, n: int | None):
        super().__init__()
        self.n, self.polls, self.logged, self.checkpoints = n, 0, {}, []

    def should_stop(self) -> bool:
        self.polls += 1
        return self.n is not None and self.polls > self.n

    def metrics(self, step, values):
        self.logged.setdefault(step, {}).update(values)

    def checkpoint(self, name, kind, path, step=0):
        self.checkpoints.append((name, kind, Path(path), step))


def test_stop_then_resume_continues_step_counter_and_optimizer(inputs, tok, tmp_path):
    config = _config(inputs, total_episodes=24, batch_size=8, ppo_epochs=1, ptx_coef=0.5, save_every=100,
                     ema_decay=0.5)
    # Uninterrupted reference run.
    straight = StopAfter(None)
    ppo.run(config, None, straight, tmp_path / "straight")
    # Stop after 2 steps, then resume with the same output dir.
    first = StopAfter(2)
    out = tmp_path / "resumed"
    stopped_at = ppo.run(config, None, first, out)
    assert stopped_at == checkpoints_dir(out) / "step-2"
    state = json.loads((stopped_at / resume.STATE_FILE).read_text())
    assert state["step"] == 2 and not (out / "config.json").exists()
    saved_opt = torch.load(stopped_at / resume.TRAINING_FILE, weights_only=True)["optimizer"]
    assert next(iter(saved_opt["state"].values()))["step"].item() == 2  # 2 steps x 1 epoch x 1 minibatch
    assert ("ppo-step-2", "ppo", stopped_at, 2) in first.checkpoints

    second = StopAfter(None)
    assert ppo.run(config, None, second, out) == out
    assert sorted(k for k in second.logged if "reward" in second.logged[k]) == [3]  # continues at step 3
    final_opt = torch.load(checkpoints_dir(out) / "step-3" / resume.TRAINING_FILE, weights_only=True)["optimizer"]
    assert next(iter(final_opt["state"].values()))["step"].item() == 3
    # Same RNG, optimizer moments, prompt order and ptx stream: the same weights as the straight run.
    a = load_policy(tmp_path / "straight", CPU).state_dict()
    b = load_policy(out, CPU).state_dict()
    assert _max_diff(a, b) < 1e-5
    # The EMA policy travelled inside the step checkpoint and continued, not restarted from the policy.
    assert (stopped_at / ppo.EMA_DIR / "config.json").is_file()
    ema_straight = load_policy(tmp_path / "straight" / ppo.EMA_DIR, CPU).state_dict()
    assert _max_diff(ema_straight, load_policy(out / ppo.EMA_DIR, CPU).state_dict()) < 1e-5
    assert _max_diff(ema_straight, a) > 1e-4
    summary = json.loads((out / ppo.SUMMARY_FILE).read_text())
    assert {"gold", "gold_greedy", "kl", "reward", "ptx_loss", "pretrain_loss"} <= set(summary)
    assert "heldout_gold" in second.logged[3]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_short_run_raises_reward(inputs, tok, precision):
    # bf16: every network's matmuls under CPU bf16 autocast (`precision: bf16`), weights fp32.
    torch.manual_seed(0)
    config = _config(inputs, reward_model=str(inputs[2]), kl_coef=0.02, learning_rate=1e-4, ppo_epochs=4,
                     batch_size=32, total_episodes=32 * 10, response_length=20, precision=precision)
    models = ppo.load_models(config, tok, pick_device("cpu", precision))
    sampler = rl.PromptSampler(len(PROMPTS), config.batch_size, seed=0)
    rewards = []
    for _ in range(10):
        prompt_ids, prompt_mask = encode_prompts(tok, [PROMPTS[i] for i in sampler.next()])
        rewards.append(ppo.ppo_step(models, prompt_ids, prompt_mask, config, config.kl_coef).metrics["reward"])
    start, end = sum(rewards[:2]) / 2, sum(rewards[-3:]) / 3
    assert end > start + 0.5, rewards


@pytest.mark.parametrize("field,value,message", [
    ("kl_coef", -0.1, "kl_coef"), ("cliprange", 0.0, "cliprange"), ("response_length", 0, "response_length"),
])
def test_bad_config_values_are_rejected(inputs, field, value, message):
    with pytest.raises(ValueError, match=message):
        _config(inputs, **{field: value})


def _fail_if_loaded(*args, **kwargs):
    raise AssertionError("a model was loaded before the inputs were checked")


def test_missing_or_mismatched_checkpoints_fail_before_any_work(inputs, tmp_path, monkeypatch):
    sft, rm, _, _ = inputs
    monkeypatch.setattr(ppo, "load_policy", _fail_if_loaded)
    monkeypatch.setattr(ppo, "load_scalar_model", _fail_if_loaded)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="sft_model"):
        ppo.run(_config(inputs, sft_model=str(tmp_path / "no-sft")), None, Events(), out)
    with pytest.raises(ValueError, match="reward_model"):
        ppo.run(_config(inputs, reward_model=str(tmp_path / "no-rm")), None, Events(), out)
    # A reward model from another base: same architecture, different vocabulary.
    from core.models.tiny import make_models, make_tokenizer
    other = save_checkpoint(make_models(1, 32, 2, 64)[3], make_tokenizer(64), tmp_path / "other-rm")
    with pytest.raises(ValueError, match="tokenizers differ"):
        ppo.run(_config(inputs, reward_model=str(other)), None, Events(), out)
    with pytest.raises(ValueError, match="prompts file"):
        ppo.run(_config(inputs, prompts=str(tmp_path / "none.jsonl")), None, Events(), out)
    assert not out.exists() and not checkpoints_dir(out).exists()


def test_a_step_checkpoint_is_written_whole_with_its_ema(inputs, tok, tmp_path, monkeypatch):
    """The EMA policy is part of the step checkpoint's one atomic write: if writing it fails, no
    step directory is left behind that a resume would take (with its EMA silently reset)."""
    import copy

    config = _config(inputs, ema_decay=0.9)
    models = _models(config, tok)
    ema = copy.deepcopy(models.policy)
    sampler = rl.PromptSampler(len(PROMPTS), config.batch_size, seed=0)
    state = {"step": 1, "kl_coef": 0.1, "episodes": 16, "history": []}
    path = checkpoints_dir(tmp_path / "ppo") / "step-1"

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(ema, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        ppo.save_step_checkpoint(models, path, state, sampler, ema)
    assert not path.exists() and resume.latest_checkpoint(tmp_path / "ppo", "step") is None
    monkeypatch.undo()
    ppo.save_step_checkpoint(models, path, state, sampler, ema)
    assert resume.latest_checkpoint(tmp_path / "ppo", "step") == path
    assert (path / ppo.EMA_DIR / "model.safetensors").is_file()


def test_response_logprobs_in_chunks_equal_the_models_own_logits(tok):
    """`rl.response_logprobs` (backbone once, LM head + log-softmax in chunks of 3 tokens under
    checkpointing) against log-softmax of the model's own logits over left-padded prompt + response:
    the same log-probs and entropies, and the same gradient in every parameter."""
    torch.manual_seed(0)
    policy = load_policy("bundled", CPU, dropout=0.0)
    vocab = policy.get_output_embeddings().weight.shape[0]
    prompt_ids, prompt_mask = _prompt_batch(tok, n=3)
    response_ids = torch.randint(vocab, (3, 6))
    ids = torch.cat([prompt_ids, response_ids], 1)
    mask = torch.cat([prompt_mask, torch.ones_like(response_ids)], 1)
    positions, P, temperature = rl.positions_from_mask(mask), prompt_ids.shape[1], 0.7
    assert (prompt_mask == 0).any()  # left padding, read through the position ids
    weights = torch.randn(3, 6)
    results = []
    for chunked in (False, True):
        policy.zero_grad()
        if chunked:
            logprobs, entropy, _ = rl.response_logprobs(policy, ids, mask, positions, P, temperature, with_entropy=True,
                                                        max_chunk_logits=3 * vocab)
        else:
            logits = policy(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, P - 1 : -1]
            logits = logits.float() / temperature
            logprobs = torch.gather(logits.log_softmax(-1), -1, response_ids[..., None]).squeeze(-1)
            entropy = rl.entropy_from_logits(logits.detach())
        (weights * logprobs).sum().backward()
        results.append((logprobs.detach(), entropy, {n: p.grad.clone() for n, p in policy.named_parameters()}))
    (full_lp, full_ent, full_grads), (lp, ent, grads) = results
    torch.testing.assert_close(lp, full_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, full_ent, atol=1e-5, rtol=1e-5)
    assert full_grads.keys() == grads.keys()
    for name, grad in full_grads.items():
        # fp32 sums in another order: the tolerance scales with the gradient (the tied embedding's
        # reaches ~20, where 1e-5 absolute is a few ulps of its largest entries).
        scale = max(1.0, float(grad.abs().max()))
        torch.testing.assert_close(grads[name], grad, atol=1e-5 * scale, rtol=1e-4, msg=name)
    assert max(g.abs().max() for g in full_grads.values()) > 1e-3  # real gradients on both sides


def test_logit_transforms_are_refused(tok):
    policy = load_policy("bundled", CPU, dropout=0.0)
    policy.config.final_logit_softcapping = 30.0  # as Gemma 2 computes its logits
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(ValueError, match="transform their logits"):
        rl.response_logprobs(policy, ids, torch.ones_like(ids), rl.positions_from_mask(torch.ones_like(ids)), 2, 1.0)


def test_reusing_the_first_epochs_forward_gives_the_same_step(inputs, tok, monkeypatch):
    """pi_old and V_old taken from the update's first forward (one minibatch) equal a separate
    scoring forward: the same rollout, log-probs, losses, statistics and updated weights."""
    config = _config(inputs, ptx_coef=1.0)
    assert ppo.reuses_first_forward(config)
    prompt_ids, prompt_mask = _prompt_batch(tok)
    blocks = pack(tok, demo.pretraining_corpus(40, seed=9), 64)[:4]
    runs = {}
    for reuse in (True, False):
        monkeypatch.setattr(ppo, "reuses_first_forward", lambda _config, reuse=reuse: reuse)
        torch.manual_seed(3)
        models = _models(config, tok)
        steps = [ppo.ppo_step(models, prompt_ids, prompt_mask, config, config.kl_coef, iter([blocks] * 8))
                 for _ in range(2)]
        runs[reuse] = steps, _snapshot(models.policy), _snapshot(models.value_model)
    (reused, policy_a, value_a), (separate, policy_b, value_b) = runs[True], runs[False]
    for a, b in zip(reused, separate):
        assert torch.equal(a.rollout.response_ids, b.rollout.response_ids)
        # The second step samples from weights the first updated through two summation orders: fp32
        # rounding of ~2e-5 on log-probs of magnitude ~6 (measured), the same bound as the weights' below.
        assert torch.allclose(a.rollout.logprobs, b.rollout.logprobs, atol=1e-4)
        assert torch.allclose(a.rollout.values, b.rollout.values, atol=1e-4)
        assert a.rollout.logprobs.abs().sum() > 1  # real log-probs, not zeros on both sides
        for key in ("kl", "policy_loss", "value_loss", "ptx_loss", "approx_kl", "entropy", "clip_frac"):
            assert a.metrics[key] == pytest.approx(b.metrics[key], rel=1e-3, abs=1e-5), key
    assert _max_diff(policy_a, policy_b) < 1e-4 and _max_diff(value_a, value_b) < 1e-4
    # The first step's policy equals the reference: the KL read from the reused forward is 0.
    assert abs(reused[0].metrics["kl"]) < 1e-4


def test_rows_cut_by_length_give_the_whole_batchs_step(inputs, tok, monkeypatch, bucket_counts):
    """The update's forwards cut by length (one CPU process: each part without its all-padding columns) give
    the step the whole padded batch gives: the same log-probs, values, exact KL, losses and weights.
    Leaving a part's outputs in the order the parts ran, or shifting its columns, fails this."""
    from core.stages import microbatch

    config = _config(inputs, kl_loss_coef=1.0, ptx_coef=1.0)
    prompt_ids, prompt_mask = _prompt_batch(tok)
    blocks = pack(tok, demo.pretraining_corpus(40, seed=9), 64)[:4]
    runs = {}
    for cut in (True, False):
        # Cut at every distinct length (calls free), else never.
        monkeypatch.setattr(microbatch, "call_tokens_for", lambda *a, cut=cut: 0 if cut else None)
        torch.manual_seed(3)
        models = _models(config, tok)
        steps = [ppo.ppo_step(models, prompt_ids, prompt_mask, config, config.kl_coef, iter([blocks] * 8))
                 for _ in range(2)]
        runs[cut] = steps, _snapshot(models.policy), _snapshot(models.value_model), list(bucket_counts)
        bucket_counts.clear()
    (cut_steps, policy_a, value_a, cut_counts), (whole_steps, policy_b, value_b, whole_counts) = runs[True], runs[False]
    assert max(cut_counts) > 1 and set(whole_counts) == {1}
    for a, b in zip(cut_steps, whole_steps):
        assert torch.equal(a.rollout.response_ids, b.rollout.response_ids)
        assert (a.rollout.response_mask.sum(1) < a.rollout.response_mask.shape[1]).any()  # answers of mixed length
        assert torch.allclose(a.rollout.logprobs, b.rollout.logprobs, atol=1e-5)
        assert torch.allclose(a.rollout.values, b.rollout.values, atol=1e-5)
        for key in ("kl", "exact_kl", "policy_loss", "value_loss", "ptx_loss", "approx_kl", "entropy", "clip_frac"):
            assert a.metrics[key] == pytest.approx(b.metrics[key], rel=1e-3, abs=1e-5), key
    assert cut_steps[1].metrics["exact_kl"] > 1e-3  # the second step's policy has moved: a KL to compare
    assert _max_diff(policy_a, policy_b) < 1e-4 and _max_diff(value_a, value_b) < 1e-4


def test_first_forward_is_refused_with_several_minibatches(inputs, tok):
    config = _config(inputs, num_minibatches=2)
    models = _models(config, tok)
    batch = ppo.score_responses(models, ppo.generate_responses(models, *_prompt_batch(tok, n=4), config), config)
    with pytest.raises(ValueError, match="whole batch"):
        ppo.ppo_update(models, batch, torch.zeros_like(batch.values), batch.values, config, None,
                       first_forward=(batch.values,))
