"""A stage's reward is resolved once and each answer scored once: a user's reward file is executed once per
stage run (PPO, GRPO, `rlhf eval`), and Evaluate's RM score and the reward's `rm` term share one forward."""

from __future__ import annotations

import pytest
import torch

from core.config import GRPOConfig, PPOConfig
from core.data import demo
from core.models.ensemble import load_reward_model
from core.models.loading import load_policy, load_scalar_model, pick_device, save_checkpoint
from core.stages import get_stage
from core.stages.evaluate import answer_rm_scores, measure_answers
from core.stages.events import Events
from core.stages.reward_terms import RewardModelTerm, resolve_reward

CPU = pick_device("cpu")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def counted_reward_file(tmp_path):
    """A reward file whose module body appends one line to runs.txt each time it is executed."""
    runs = tmp_path / "runs.txt"
    path = tmp_path / "counted.py"
    path.write_text(f"with open({str(runs)!r}, 'a') as f:\n    f.write('ran\\n')\n"
                    "def score(prompts, completions, **columns):\n    return [1.0] * len(completions)\n")
    return path, runs


def executions(runs) -> int:
    return len(runs.read_text().splitlines()) if runs.exists() else 0


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_a_stage_executes_a_users_reward_file_once(stage, tmp_path, tok):
    sft = save_checkpoint(load_policy("bundled", CPU), tok, tmp_path / "sft")
    path, runs = counted_reward_file(tmp_path)
    common = dict(sft_model=str(sft), reward=f"python:{path}:score", total_episodes=8, batch_size=8,
                  eval_prompts=0, device="cpu", save_every=100)
    if stage == "ppo":
        config = PPOConfig.from_dict(dict(common, ppo_epochs=1, response_length=4, ptx_coef=0.0))
    else:
        config = GRPOConfig.from_dict(dict(common, num_generations=4, max_completion_length=4))
    get_stage(stage).runner(config, None, Events(), tmp_path / stage)
    assert executions(runs) == 1


def test_eval_executes_a_users_reward_file_once(tmp_path, tok):
    from core.analysis.eval_table import EvalConfig, check_inputs, run

    rm = save_checkpoint(load_scalar_model("bundled", tok.pad_token_id, CPU), tok, tmp_path / "rm")
    path, runs = counted_reward_file(tmp_path)
    config = EvalConfig.from_dict(dict(checkpoints="bundled", reward_model=str(rm), n_prompts=4, max_new_tokens=4,
                                       reward=f"python:{path}:score", device="cpu"))
    run(config, None, Events(), tmp_path / "eval")  # the job's way: checks, then runs
    assert executions(runs) == 1
    run(config, None, Events(), tmp_path / "eval-cli", check_inputs(config, None))  # the CLI's: checked first
    assert executions(runs) == 2


def test_the_rm_term_cuts_answers_of_unequal_length_on_a_cpu_and_scores_them_the_same(tmp_path, tok, bucket_counts):
    """Frozen scoring (best-of-n, the study, Evaluate, GRPO) cuts a batch by length as PPO's does: several
    forwards where a short answer would carry a long one's padding, and every answer's score as one whole
    padded forward gives it."""
    from core.stages.reward import score_sequences
    from core.stages.reward_terms import Answers

    rm_dir = save_checkpoint(load_scalar_model("bundled", tok.pad_token_id, CPU), tok, tmp_path / "rm")
    reward_model = load_reward_model(rm_dir, tok.pad_token_id, CPU)
    prompt = tok("Write a word:")["input_ids"]
    sequences = [prompt + [5 + i] * n for i, n in enumerate([2, 3, 90, 95, 4, 2, 88, 3])]
    answers = Answers([""] * 8, ["x"] * 8, [{} for _ in range(8)], [True] * 8, [len(s) - len(prompt) for s in sequences],
                      sequences)
    cut, _ = RewardModelTerm(reward_model, tok.pad_token_id, CPU).scores(answers)
    assert bucket_counts and bucket_counts[-1] >= 2  # the short answers scored apart from the long ones
    whole = score_sequences(reward_model.members[0], sequences, tok.pad_token_id, CPU, call_tokens=None)
    assert bucket_counts[-1] == 1 and torch.allclose(cut, whole, atol=1e-5)


def test_evaluate_scores_each_answer_with_the_rm_once_when_a_term_is_the_rm(tmp_path, tok):
    """With an `rm` term over the evaluation's own RM, `measure_answers` reads the RM column from the term: one
    forward of the RM per batch, not two, and the same scores `answer_rm_scores` gives."""
    rm_dir = save_checkpoint(load_scalar_model("bundled", tok.pad_token_id, CPU), tok, tmp_path / "rm")
    reward_model = load_reward_model(rm_dir, tok.pad_token_id, CPU)
    (member,) = reward_model.members
    forwards = []
    member.score.register_forward_hook(lambda *_: forwards.append(1))  # the head: one call per RM forward
    reward = resolve_reward("rm,eos").with_reward_model(RewardModelTerm(reward_model, tok.pad_token_id, CPU))
    policy = load_policy("bundled", CPU, dropout=0.0)
    prompts = [t.prompt for t in demo.heldout_tasks(6)]
    out = measure_answers(policy, tok, prompts, max_new_tokens=6, batch_size=3, reward_model=reward_model,
                          reward=reward)
    assert len(forwards) == 2  # two batches of 3, one RM forward each
    assert out["rm"] == out["terms"]["rm"]
    assert out["reward"] == pytest.approx([r + e for r, e in zip(out["rm"], out["terms"]["eos"])])
    # The same answers scored the other way (the RM's padded forward) agree.
    from core.models.generate import sample

    direct = []
    for i in (0, 3):
        answers = sample(policy, tok, prompts[i : i + 3], 6, 1.0, seed=1234 + i)
        direct += answer_rm_scores(reward_model, answers).tolist()
    assert torch.allclose(torch.tensor(out["rm"]), torch.tensor(direct), atol=1e-4)
    # Without an rm term the RM column still comes from the RM itself.
    forwards.clear()
    measure_answers(policy, tok, prompts, max_new_tokens=6, batch_size=3, reward_model=reward_model,
                    reward=resolve_reward("eos"))
    assert len(forwards) == 2
