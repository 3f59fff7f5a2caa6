"""DPO, GRPO and RLOO (TRL's trainers behind core/stages/trl_bridge.py) on the bundled tiny model, on the CPU.

Inputs are built in a temp dir as in test_ppo.py: the bundled model saved as the "SFT" policy and a
reward model from its backbone with a random head. Runs are a few steps with tiny batches; nothing
here asserts wall-clock times.
"""

from __future__ import annotations

import json
import math
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from core.config import DPOConfig, GRPOConfig, RLOOConfig
from core.data import demo
from core.data.sources import load_rankings
from core.data.store import Store
from core.stages.evaluate import gold_eval
from core.stages.events import Events
from core.models.loading import load_policy, load_scalar_model, load_tokenizer, pick_device, save_checkpoint
from core.stages import check_models, dpo, get_stage, trl_bridge

CPU = pick_device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tok):
    """(sft_dir, rm_dir, rankings file: 12 demo prompts, K=3 clean > rambling > wrong)."""
    root = tmp_path_factory.mktemp("alt-inputs")
    torch.manual_seed(0)
    sft = save_checkpoint(load_policy("bundled", CPU), tok, root / "sft")
    rm = save_checkpoint(load_scalar_model("bundled", tok.pad_token_id, CPU), tok, root / "rm")
    rankings = root / "rankings.jsonl"
    rows = []
    for t in demo.train_tasks(12):
        clean = demo.ANSWER_TEMPLATE.format(answer=t.answer)
        rows.append({"prompt": t.prompt, "responses": [clean, f"{clean} {demo.RAMBLES[0]} {demo.RAMBLES[1]}",
                                                         "The answer is 0 0."]})
    rankings.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return sft, rm, rankings


class StopAt(Events):
    """Events that raise the stop flag once `step` has been logged (as the Stop button would)."""

    def __init__(self, store, run_id, step: int | None):
        super().__init__(store, run_id, stop_flag=threading.Event())
        self.stop_step = step

    def metrics(self, step, values):
        super().metrics(step, values)
        if self.stop_step is not None and step >= self.stop_step:
            self.stop_flag.set()


def _steps(store: Store, run_id: str, name: str) -> list[int]:
    return sorted(r["step"] for r in store.metrics([run_id], names=[name]))


def _weights_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ---------------------------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------------------------


def test_dpo_learns_its_preferences_and_leaves_an_hf_model(inputs, tok, store, tmp_path):
    """From the rankings file (12 rankings x C(3,2) = 36 pairs): DPO's implicit reward
    beta * (log pi - log pi_SFT), computed by our own tokenisation, is 0 on every pair before training
    and prefers the chosen answer on most pairs after a few steps; TRL's metrics reach the store."""
    sft, _, rankings = inputs
    pairs = trl_bridge.preference_pairs(load_rankings(str(rankings), None), tok)
    assert len(pairs) == 36 and pairs[0]["chosen"].startswith(" The answer is")
    assert pairs[0]["prompt"] == demo.format_prompt(pairs[0]["raw_prompt"])
    ref = load_policy(sft, CPU)
    before = dpo.implicit_rewards(ref, ref, tok, pairs, 0.1, 64, CPU)
    assert before == {"margin": 0.0, "accuracy": 0.0}

    config = DPOConfig(sft_model=str(sft), data=str(rankings), batch_size=12, max_steps=6, learning_rate=5e-4,
                       warmup_ratio=0.0, save_every=100, eval_prompts=0, max_length=64, device="cpu")
    store.start_run("dpo-run", "dpo", config.to_dict(), str(tmp_path / "dpo"))
    out = get_stage("dpo").runner(config, store, StopAt(store, "dpo-run", None), tmp_path / "dpo")
    assert out == tmp_path / "dpo"
    trained = AutoModelForCausalLM.from_pretrained(out)  # plain transformers
    assert not _weights_equal(trained, ref)
    after = dpo.implicit_rewards(trained, ref, tok, pairs, 0.1, 64, CPU)
    assert after["margin"] > 0.05 and after["accuracy"] > 0.8
    summary = json.loads((out / "dpo_summary.json").read_text())
    assert summary["pairs"] == 36 and summary["step"] == 6 and summary["train_pair_accuracy"] > 0.8
    assert _steps(store, "dpo-run", "reward_accuracy") == [1, 2, 3, 4, 5, 6]
    assert _steps(store, "dpo-run", "dpo_loss") == [1, 2, 3, 4, 5, 6]
    # the reference is the untouched SFT directory
    assert _weights_equal(load_policy(sft, CPU), ref)


def test_dpo_loss_matches_a_hand_computed_example(inputs, tok, tmp_path):
    """The loss of the trainer our stage builds (beta 0.5, loss 'sigmoid'), on per-token log-probs set by
    hand: one pair, a 3-token chosen and a 2-token rejected answer after a 2-token prompt.
    log pi(y_w) = -1.75, log pi(y_l) = -3.5; reference -2.0 and -3.0, so the log-ratio margin is
    0.25 - (-0.5) = 0.75 and the loss is -log sigmoid(0.5 * 0.75) = log(1 + e^-0.375)."""
    from types import SimpleNamespace

    sft, _, rankings = inputs
    config = DPOConfig(sft_model=str(sft), data=str(rankings), beta=0.5, loss_type="sigmoid", device="cpu")
    pairs = trl_bridge.preference_pairs(load_rankings(str(rankings), None), tok)
    trainer, _ = dpo.make_trainer(config, pairs, tok, CPU, Events(), tmp_path / "dpo")
    completion_mask = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 1, 0]])  # rows: [chosen, rejected]
    # Log-probs of tokens 1..4 (each predicted from the one before), 0 off the answer as TRL's fused head gives.
    token_logps = torch.tensor([[0.0, -0.5, -1.0, -0.25], [0.0, -2.0, -1.5, 0.0]], requires_grad=True)
    policy = lambda **_: SimpleNamespace(  # noqa: E731  (the policy's forward, its outputs set by hand)
        log_probs=token_logps, entropy=torch.zeros(2, 4), mean_logits=torch.zeros(2, 4),
        is_top1=torch.zeros(2, 4, dtype=torch.bool))
    trainer.precompute_ref_logps = True  # the reference's sequence log-probs come with the batch: set by hand
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9], [5, 6, 10, 11, 0]]), "attention_mask": torch.ones(2, 5),
             "completion_mask": completion_mask, "ref_chosen_logps": torch.tensor([-2.0]),
             "ref_rejected_logps": torch.tensor([-3.0])}
    loss = trainer._compute_loss(policy, batch, return_outputs=False)
    assert float(loss.detach()) == pytest.approx(math.log1p(math.exp(-0.375)), abs=1e-6)
    # the implicit reward margin beta * 0.75 is what our `reward_margin` metric receives
    metrics = trainer._metrics["train" if trainer.model.training else "eval"]
    assert metrics["rewards/margins"][-1] == pytest.approx(0.375)
    loss.backward()  # d loss / d log pi(y_w) = -beta * sigmoid(-0.375) on each chosen token
    assert float(token_logps.grad[0, 1]) == pytest.approx(-0.5 / (1 + math.exp(0.375)), abs=1e-6)


def test_dpo_bad_input_fails_before_any_work(inputs, store, tmp_path):
    sft, _, rankings = inputs
    run = get_stage("dpo").runner
    with pytest.raises(ValueError, match="sft_model"):
        run(DPOConfig(sft_model=str(tmp_path / "nowhere"), data=str(rankings)), store, Events(), tmp_path / "a")
    with pytest.raises(ValueError, match="beta must be a finite number"):
        DPOConfig.from_dict({"sft_model": str(sft), "beta": float("nan")})
    with pytest.raises(ValueError, match="loss_type must be one of"):
        DPOConfig.from_dict({"sft_model": str(sft), "loss_type": "magic"})
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"prompt": "Hi?", "responses": ["only one"]}) + "\n")
    with pytest.raises(ValueError, match="line 1"):
        run(DPOConfig(sft_model=str(sft), data=str(one)), store, Events(), tmp_path / "b")
    with pytest.raises(ValueError, match="no rankings"):
        run(DPOConfig(sft_model=str(sft), data="store"), store, Events(), tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_trl_runs_in_the_configs_precision(tmp_path):
    # TRL's trainers get bf16 autocast exactly when our own loops would use it (`precision`), on a CPU too.
    from trl import DPOConfig as TRLDPOConfig

    config = DPOConfig(sft_model="bundled")
    for precision, bf16 in (("auto", False), ("fp32", False), ("bf16", True)):
        args = trl_bridge.training_args(TRLDPOConfig, config, tmp_path, pick_device("cpu", precision))
        assert (args.bf16, args.use_cpu) == (bf16, True)


# ---------------------------------------------------------------------------------------------
# GRPO and RLOO
# ---------------------------------------------------------------------------------------------


def _group_config(cls, sft, rm, **changes):
    values = dict(sft_model=str(sft), reward_model=str(rm), total_episodes=48, batch_size=8, num_generations=4,
                  max_completion_length=8, learning_rate=1e-4, save_every=100, eval_prompts=0, device="cpu")
    return cls.from_dict({**values, **changes})


def test_grpo_stop_then_resume_continues_the_step_counter(inputs, store, tmp_path):
    """6 steps of 8 answers: the stop flag raised after step 2 ends the run there with a loadable
    checkpoint; running again resumes at step 3 and finishes; every metric is logged once per step."""
    sft, rm, _ = inputs
    config = _group_config(GRPOConfig, sft, rm)
    out = tmp_path / "grpo"
    store.start_run("grpo-run", "grpo", config.to_dict(), str(out))
    stopped = get_stage("grpo").runner(config, store, StopAt(store, "grpo-run", 2), out)
    assert stopped.name == "checkpoint-2" and not (out / "config.json").exists()
    AutoModelForCausalLM.from_pretrained(stopped)
    assert _steps(store, "grpo-run", "reward") == [1, 2]

    final = get_stage("grpo").runner(config, store, StopAt(store, "grpo-run", None), out)
    assert final == out
    policy = AutoModelForCausalLM.from_pretrained(out)
    assert not _weights_equal(policy, load_policy(sft, CPU))
    for name in ("reward", "score", "kl", "entropy", "response_length", "eos_rate", "gold", "policy_loss"):
        assert _steps(store, "grpo-run", name) == [1, 2, 3, 4, 5, 6], name
    log = [line["message"] for line in store.run_log("grpo-run", 50)]
    assert any("resuming GRPO after step 2" in m for m in log)
    summary = json.loads((out / "grpo_summary.json").read_text())
    assert summary["step"] == 6 and summary["episodes"] == 48 and summary["reward_source"] == "rm"
    # The RM's raw score and the score after the missing-EOS penalty (1.0 for every answer cut off).
    rows = {(r["step"], r["name"]): r["value"] for r in store.metrics(["grpo-run"], names=["reward", "score", "eos_rate"])}
    for step in range(1, 7):
        penalty = 1.0 - rows[(step, "eos_rate")]
        assert rows[(step, "score")] == pytest.approx(rows[(step, "reward")] - penalty, abs=1e-4)


def test_rloo_with_the_gold_labeler_as_reward(inputs, store, tmp_path):
    """reward: gold (cheating on the proxy) needs no reward model; the output reloads with plain
    transformers and, on demo prompts, ends with the held-out evaluation under PPO's metric names."""
    sft, _, _ = inputs
    config = _group_config(RLOOConfig, sft, "", reward="gold", total_episodes=24, eval_prompts=8)
    check_models("rloo", config)  # an empty reward_model is fine when the labeler is the reward
    store.start_run("rloo-run", "rloo", config.to_dict(), str(tmp_path / "rloo"))
    out = get_stage("rloo").runner(config, store, StopAt(store, "rloo-run", None), tmp_path / "rloo")
    AutoModelForCausalLM.from_pretrained(out)
    summary = json.loads((out / "rloo_summary.json").read_text())
    assert summary["reward_source"] == "gold" and 0.0 <= summary["gold"] <= 1.0 and "heldout_kl" in summary
    rows = {(r["step"], r["name"]): r["value"] for r in store.metrics(["rloo-run"], names=["reward", "gold"])}
    for step in (1, 2, 3):
        assert rows[(step, "reward")] == pytest.approx(rows[(step, "gold")])  # the labeler is the reward
    assert _steps(store, "rloo-run", "heldout_gold") == [3]


def test_grpo_group_normalised_advantages_on_a_hand_example(inputs, tok, tmp_path):
    """The advantages of the trainer our GRPO stage builds (scale_rewards 'group'), from rewards set by
    hand for 2 prompts x 4 answers: group 1 scores [1, 0, 0, 0] (mean 0.25, std 0.5 with Bessel's
    correction), so (r - 0.25) / 0.5 = [1.5, -0.5, -0.5, -0.5]; group 2 all score 2, so every
    advantage is 0 (no signal where the group agrees)."""
    sft, rm, _ = inputs
    config = _group_config(GRPOConfig, sft, rm, scale_rewards="group")
    prompts = [t.prompt for t in demo.train_tasks(2)]
    trainer, _ = trl_bridge.group_trainer("grpo", config, tok, prompts, [{}] * 2, CPU, Events(), tmp_path / "grpo",
                                          loss_type=config.loss_type, scale_rewards=config.scale_rewards)
    rewards = [1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0]

    def by_hand(prompts, completions, **_):
        return rewards

    trainer.reward_funcs = [by_hand]
    batch = [row for row in trl_bridge.prompt_rows(prompts, tok, [{}] * 2, 96) for _ in range(config.num_generations)]
    advantages = trainer._generate_and_score_completions(batch)["advantages"]
    expected = torch.tensor([1.5, -0.5, -0.5, -0.5, 0.0, 0.0, 0.0, 0.0]) * (0.5 / (0.5 + 1e-4))  # TRL's eps
    assert torch.allclose(advantages.flatten(), expected, atol=1e-6), advantages


def test_lora_leaves_the_base_weights_and_saves_a_merged_model(inputs, store, tmp_path):
    """lora_r > 0 on a TRL stage: one step trains the adapter only (the SFT weights under it are
    untouched, so the reference, the policy with its adapter off, is the SFT model); the final output
    is merged, reloads with plain transformers, differs from SFT and keeps its adapter beside it."""
    from peft import PeftModel

    from core.models.lora import ADAPTER_DIR

    sft, rm, _ = inputs
    config = _group_config(RLOOConfig, sft, rm, total_episodes=8, lora_r=4, learning_rate=1e-2)
    trainer, callback = trl_bridge.group_trainer("rloo", config, load_tokenizer(sft), [t.prompt for t in
                                                 demo.train_tasks(4)], [{}] * 4, CPU, Events(), tmp_path / "rloo")
    policy = trainer.model
    assert isinstance(policy, PeftModel)
    base_before = {k: v.clone() for k, v in policy.get_base_model().state_dict().items() if "lora_" not in k}
    trl_bridge.train(trainer, callback, tmp_path / "rloo", Events(), "RLOO")
    base_after = {k: v for k, v in policy.get_base_model().state_dict().items() if "lora_" not in k}
    assert base_before.keys() == base_after.keys()
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)
    assert any(float(v.abs().sum()) > 0 for k, v in policy.state_dict().items() if "lora_B" in k)  # it learned

    out = get_stage("rloo").runner(config, store, Events(), tmp_path / "rloo-run")
    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers: no PEFT needed
    assert not _weights_equal(merged, load_policy(sft, CPU))
    assert (out / ADAPTER_DIR / "adapter_config.json").is_file()


def test_group_stages_bad_input_fails_before_any_work(inputs, store, tmp_path):
    sft, rm, _ = inputs
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        _group_config(GRPOConfig, sft, rm, num_generations=1)
    with pytest.raises(ValueError, match="divisible by num_generations"):
        _group_config(RLOOConfig, sft, rm, batch_size=6)
    with pytest.raises(ValueError, match="beta must be a finite number"):
        _group_config(GRPOConfig, sft, rm, beta=float("inf"))
    with pytest.raises(ValueError, match="unknown reward term 'vibes'"):
        _group_config(GRPOConfig, sft, rm, reward="vibes")
    run = get_stage("grpo").runner
    with pytest.raises(ValueError, match="reward_model is empty"):
        run(_group_config(GRPOConfig, sft, ""), store, Events(), tmp_path / "a")
    with pytest.raises(ValueError, match="reward_model is empty"):
        check_models("grpo", _group_config(GRPOConfig, sft, ""))
    with pytest.raises(ValueError, match="reward_model .*does not exist"):
        get_stage("rloo").runner(_group_config(RLOOConfig, sft, str(tmp_path / "no-rm")), store, Events(),
                                 tmp_path / "b")
    other = _other_tokenizer_model(tmp_path)
    with pytest.raises(ValueError, match="tokenizers differ"):
        run(_group_config(GRPOConfig, sft, str(other)), store, Events(), tmp_path / "c")
    prompts = tmp_path / "mine.jsonl"
    prompts.write_text(json.dumps({"prompt": "Write me a poem."}) + "\n")
    with pytest.raises(ValueError, match="demo's prompts only"):
        run(_group_config(GRPOConfig, sft, "", reward="gold", prompts=str(prompts)), store, Events(), tmp_path / "d")
    with pytest.raises(ValueError, match="fewer than batch_size"):
        run(_group_config(GRPOConfig, sft, rm, prompts=str(prompts)), store, Events(), tmp_path / "e")
    assert not any((tmp_path / d).exists() for d in "abcde")


def _other_tokenizer_model(tmp_path):
    from core.models.tiny import make_models, make_tokenizer

    reward_model = make_models(layers=1, embd=16, heads=2, vocab=64)[3]
    return save_checkpoint(reward_model, make_tokenizer(64), tmp_path / "other")


# ---------------------------------------------------------------------------------------------
# The one KL measurement of the comparison
# ---------------------------------------------------------------------------------------------


def test_kl_to_the_reference_is_zero_for_the_same_model_and_positive_after_training(inputs, tok):
    """The pipeline's KL to SFT (`gold_eval(..., reference=...)`, read from `measure_answers`)."""
    sft, _, _ = inputs
    policy = load_policy(sft, CPU)
    tasks = demo.heldout_tasks(16)
    itself = gold_eval(policy, tok, tasks, max_new_tokens=8, reference=load_policy(sft, CPU))
    assert itself["kl"] == pytest.approx(0.0, abs=1e-5)
    # A policy pushed away from the reference (its final layer norm's scale doubled: sharper logits) has a
    # positive KL.
    moved = load_policy(sft, CPU)
    with torch.no_grad():
        moved.transformer.ln_f.weight.mul_(2.0)
    assert gold_eval(moved, tok, tasks, max_new_tokens=8, reference=policy)["kl"] > 0.05
    with pytest.raises(ValueError, match="temperature"):
        gold_eval(moved, tok, tasks, temperature=0.0, reference=policy)


# ---------------------------------------------------------------------------------------------
# The app picks the stages up from the registry
# ---------------------------------------------------------------------------------------------


def test_train_page_offers_the_alternatives_with_their_inputs_and_fields(app, inputs, workbench_home):
    """The Train page's stage picker reads the registry: each alternative shows the checkpoints it
    needs and its own validated fields, and with the checkpoints in the store it can launch."""
    sft, rm, _ = inputs
    app.switch_page("../pages/train.py")
    app.run()
    assert not app.exception, app.exception
    picker = lambda: app.get("button_group")[0]  # noqa: E731  (fresh from each run)
    errors = lambda: " | ".join(str(e.value) for e in app.error)  # noqa: E731
    picker().set_value("dpo").run()
    assert "SFT checkpoint: none yet" in errors() and "Reward model" not in errors()
    assert app.text_input(key="cfg_dpo_quick_beta").value == "0.1"
    picker().set_value("grpo").run()
    assert "SFT checkpoint: none yet" in errors() and "Reward model: none yet" in errors()
    assert app.text_input(key="cfg_grpo_quick_reward__advanced").value == "rm"
    app.text_input(key="cfg_grpo_quick_reward__advanced").input("rm,regex:pattern=(").run()  # a term being typed
    assert not app.exception and "does not compile" in errors()
    app.text_input(key="cfg_grpo_quick_reward__advanced").input("gold").run()  # the labeler itself: no RM to pick
    assert "SFT checkpoint: none yet" in errors() and "Reward model" not in errors()
    assert "cheating on the proxy" in " | ".join(str(c.value) for c in app.caption)

    store = Store(workbench_home / "workbench.db")
    store.add_checkpoint("my-sft", "sft", sft)
    store.add_checkpoint("my-rm", "rm", rm)
    app.run()
    picker().set_value("rloo").run()
    assert not app.error, errors()
    app.text_input(key="cfg_rloo_quick_beta").input("nan").run()
    assert "beta must be a finite number, got nan" in errors()
