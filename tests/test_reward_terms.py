"""Reward terms (core/stages/reward_terms.py): the built-ins on fixed answers against hand-computed
scores, a user's function and the prompt rows' columns it receives, the weighted sum, the bad input
a user can give, and the stages using them: GRPO learning from a function alone on the bundled tiny model,
PPO without a reward model, and a failing term stopping a run with nothing written."""

from __future__ import annotations

import json
import math

import pytest
import torch

from core.config import GRPOConfig, PPOConfig, parse_reward
from core.data import demo
from core.data.sources import load_prompt_rows
from core.models.generate import sample
from core.models.loading import load_policy, load_tokenizer, pick_device, save_checkpoint
from core.stages import check_models, get_stage
from core.stages.events import Events
from core.stages.reward_terms import Answers, RewardTermError, final_answer, resolve_reward

CPU = pick_device("cpu")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def answers(completions, columns=None, finished=None, lengths=None, prompts=None) -> Answers:
    n = len(completions)
    return Answers(prompts or [f"prompt {i}" for i in range(n)], completions, columns or [{} for _ in range(n)],
                   finished if finished is not None else [True] * n, lengths or [len(c.split()) for c in completions])


def values(spec, batch: Answers) -> list[float]:
    scores = resolve_reward(spec)(batch)
    (name,) = scores.terms
    return scores.terms[name].tolist()


def write(tmp_path, source: str, name: str = "my_rewards.py"):
    path = tmp_path / name
    path.write_text(source)
    return path


# ---------------------------------------------------------------------------------------------
# Built-ins on fixed answers
# ---------------------------------------------------------------------------------------------


def test_final_answer_reads_the_text_after_the_last_marker():
    assert final_answer("Let me think. 3 + 4 = 7. #### 7") == "7"
    assert final_answer("The answer is dog cat.") == "dog cat"
    assert final_answer("so the Answer is:  12 .") == "12"
    assert final_answer("  blue  sky ") == "blue sky"


def test_exact_numeric_and_math_against_hand_computed_scores():
    rows = [{"answer": "Natalia sold 48 + 24 = 72 clips. #### 72"}, {"answer": "dog cat"}, {"answer": "72"},
            {"answer": "1,000"}]
    batch = answers(["... so #### 72", "The answer is dog cat.", "The answer is 72.5.", "It is 1000"], rows)
    assert values("exact", batch) == [1.0, 1.0, 0.0, 0.0]  # '1000' is not the text '1,000'
    assert values("numeric", batch) == [1.0, 0.0, 0.0, 1.0]  # 'dog cat' has no number; 72.5 is not 72
    assert values("numeric:tolerance=0.5", batch) == [1.0, 0.0, 1.0, 1.0]
    math_rows = [{"answer": "$\\frac{1}{2}$"}, {"answer": "$\\frac{1}{2}$"}, {"answer": "$x^2+2x$"}]
    math_batch = answers(["The result is $0.5$", "The result is $\\frac{2}{3}$", "$2x + x^2$"], math_rows)
    assert values("math", math_batch) == [1.0, 0.0, 1.0]


def test_regex_choice_contains_length_and_eos_against_hand_computed_scores():
    batch = answers(["The answer is B, not A.", "I pick (C).", "D", "maybe A or B"],
                    [{"answer": "B", "word": "not"}, {"answer": "A", "word": "pick"}, {"answer": "D", "word": "x"},
                     {"answer": "A", "word": "maybe"}],
                    finished=[True, False, True, False], lengths=[30, 24, 1, 25])
    assert values(r"regex:pattern=^The answer is [A-D]\b", batch) == [1.0, 0.0, 0.0, 0.0]
    assert values("choice", batch) == [1.0, 0.0, 1.0, 1.0]  # the first option named counts
    assert values("choice:options=A|B", batch) == [1.0, 0.0, 0.0, 1.0]  # 'D' is not an option: none chosen
    assert values("contains:text=A", batch) == [1.0, 0.0, 0.0, 1.0]
    assert values("contains:column=word", batch) == [1.0, 1.0, 0.0, 1.0]
    assert values("length:target=24", batch) == [6.0, 0.0, 0.0, 1.0]  # tokens beyond the target
    assert values("eos", batch) == [1.0, 0.0, 1.0, 0.0]


def test_the_total_is_the_weighted_sum_of_the_terms():
    batch = answers(["The answer is 7.", "7 and more words here", "no"], [{"answer": "7"}] * 3,
                    finished=[True, False, True], lengths=[5, 30, 1])
    scores = resolve_reward("exact:weight=2,length:target=10:weight=-0.1,eos:weight=0.5")(batch)
    assert scores.terms["exact"].tolist() == [1.0, 0.0, 0.0]
    assert scores.terms["length"].tolist() == [0.0, 20.0, 0.0]
    assert torch.allclose(scores.total, torch.tensor([2.0 + 0.5, -2.0, 0.5]))
    assert scores.metrics() == pytest.approx({"reward/exact": 1 / 3, "reward/length": 20 / 3, "reward/eos": 2 / 3})


def test_a_yaml_list_of_mappings_equals_the_command_line_form():
    line = parse_reward("rm,length:target=24:weight=-0.05,regex:pattern=a{1,3}:name=as")
    listed = parse_reward(["rm", {"term": "length", "target": 24, "weight": -0.05},
                           {"term": "regex", "pattern": "a{1,3}", "name": "as"}])
    assert line == listed and [t.name for t in line] == ["rm", "length", "as"]
    assert line[2].options["pattern"] == "a{1,3}"  # the comma inside the pattern stays in it
    assert parse_reward("length:target=5")[0].weight == -0.05  # a penalty by default


def test_option_values_keep_their_spaces_while_names_and_keys_are_trimmed(tmp_path):
    (term,) = parse_reward("regex:pattern= x ")
    assert term.options["pattern"] == " x "  # a pattern may start and end with a space
    batch = answers(["a x b", "ax b", "a xb"])
    assert values("regex:pattern= x ", batch) == [1.0, 0.0, 0.0]
    assert values("regex:pattern=x", batch) == [1.0, 1.0, 1.0]
    # Around the terms and keys the spaces go: the kind, the key, the name, a python term's file and function.
    path = write(tmp_path, "def strict(prompts, completions, **columns):\n    return [1.0] * len(completions)\n")
    spaced = parse_reward(f" rm , contains : text = ok :name= hit , python: {path} : strict ")
    assert [(t.kind, t.name) for t in spaced] == [("rm", "rm"), ("contains", "hit"), ("python", "strict")]
    assert spaced[1].options["text"] == " ok "
    assert spaced[2].options["path"] == str(path) and spaced[2].options["function"] == "strict"


# ---------------------------------------------------------------------------------------------
# A user's function
# ---------------------------------------------------------------------------------------------


def test_a_users_function_receives_the_prompt_rows_columns_in_one_batch(tmp_path):
    path = write(tmp_path, "calls = []\n"
                           "def strict(prompts, completions, answer, **columns):\n"
                           "    calls.append((list(prompts), list(answer), columns))\n"
                           "    return [float(c == f'The answer is {a}.') for c, a in zip(completions, answer)]\n")
    reward = resolve_reward(f"python:{path}:strict")
    batch = answers(["The answer is 4.", "The answer is 5. Bye."], [{"answer": "4", "source": "gsm"},
                                                                   {"answer": "5", "source": "demo"}],
                    prompts=["What is 2 plus 2?", "What is 2 plus 3?"])
    assert reward(batch).terms["strict"].tolist() == [1.0, 0.0]
    function = reward.scorers["strict"].function
    (call,) = function.__globals__["calls"]  # one call for the whole batch
    assert call == (["What is 2 plus 2?", "What is 2 plus 3?"], ["4", "5"], {"source": ["gsm", "demo"]})


def test_prompt_files_and_the_demo_keep_their_extra_columns(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text(json.dumps({"question": "x", "prompt": "What is 6 times 7?", "answer": "6*7=42 #### 42"}) + "\n")
    prompts, columns = load_prompt_rows(str(path), None)
    assert prompts == ["What is 6 times 7?"] and columns == [{"question": "x", "answer": "6*7=42 #### 42"}]
    demo_prompts, demo_columns = load_prompt_rows("demo", None)
    assert demo_columns[0]["answer"] == demo.expected_answer(demo_prompts[0])


# ---------------------------------------------------------------------------------------------
# Bad input: a ValueError before any work
# ---------------------------------------------------------------------------------------------


def test_bad_reward_specs_are_named_before_any_work(tmp_path, monkeypatch):
    cases = {
        "rm:weight=nan": "weight must be a finite number",
        "regex:pattern=(unclosed": "does not compile",
        "python:/no/such/file.py:score": "no file",
        "length": "length needs target=...",
        "exact:colum=a": "unknown option",
        "vibes": "unknown reward term 'vibes'",
        "": "reward is empty",
    }
    for spec, message in cases.items():
        with pytest.raises(ValueError, match=message):
            parse_reward(spec)
    no_function = write(tmp_path, "def other(prompts, completions):\n    return [0.0] * len(prompts)\n")
    with pytest.raises(ValueError, match="has no function 'score'"):
        resolve_reward(f"python:{no_function}:score")
    wrong_signature = write(tmp_path, "def score(text):\n    return [0.0]\n", "wrong.py")
    with pytest.raises(ValueError, match="must take prompts and completions"):
        resolve_reward(f"python:{wrong_signature}:score")
    broken = write(tmp_path, "import no_such_module_anywhere\n", "broken.py")
    with pytest.raises(ValueError, match="failed to load: ModuleNotFoundError"):
        resolve_reward(f"python:{broken}:score")
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "math_verify" else real_find_spec(name, *a))
    with pytest.raises(ValueError, match=r"math-verify package, which is not installed: pip install 'rlhf-workbench\[verifiers\]'"):
        parse_reward("math")


def test_a_column_a_term_needs_is_named_before_the_run(tmp_path, tok):
    sft = save_checkpoint(load_policy("bundled", CPU), tok, tmp_path / "sft")
    prompts = tmp_path / "mine.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {w}."}) + "\n" for w in demo.WORDS[:20]))
    function = write(tmp_path, "def score(prompts, completions, solution):\n    return [0.0] * len(prompts)\n")
    for spec, missing in (("exact", "'answer'"), (f"python:{function}:score", "'solution'")):
        config = PPOConfig.from_dict(dict(sft_model=str(sft), reward=spec, prompts=str(prompts), total_episodes=8,
                                          batch_size=8, device="cpu", ptx_coef=0.0))
        check_models("ppo", config)  # no reward model needed
        with pytest.raises(ValueError, match=f"reads the column {missing}, which 20 of 20 prompts lack"):
            get_stage("ppo").runner(config, None, Events(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# The stages
# ---------------------------------------------------------------------------------------------


STARTS = "def starts(prompts, completions, answer):\n" \
         "    return [float(c.strip().startswith('The answer is')) for c in completions]\n"


def pass_rate(model_dir, tok, tasks) -> float:
    torch.manual_seed(123)
    texts = sample(load_policy(model_dir, CPU, dropout=0.0), tok, [t.prompt for t in tasks], max_new_tokens=8,
                   temperature=1.0).texts
    return sum(t.strip().startswith("The answer is") for t in texts) / len(texts)


def test_grpo_with_only_a_function_reward_learns_it(tmp_path, tok, store):
    """The bundled model starts 'The answer is' on ~30% of held-out demo prompts; GRPO rewarded by a user's
    function for exactly that (no reward model) raises the held-out rate well above it. Ignoring the reward
    (every advantage 0) would leave the policy, and the rate, where it was."""
    sft = save_checkpoint(load_policy("bundled", CPU), tok, tmp_path / "sft")
    path = write(tmp_path, STARTS)
    config = GRPOConfig.from_dict(dict(sft_model=str(sft), reward=f"python:{path}:starts", total_episodes=160,
                                       batch_size=16, num_generations=4, max_completion_length=8, learning_rate=1e-3,
                                       beta=0.0, save_every=100, eval_prompts=0, device="cpu", seed=0))
    check_models("grpo", config)
    store.start_run("grpo-fn", "grpo", config.to_dict(), str(tmp_path / "grpo"))
    out = get_stage("grpo").runner(config, store, Events(store, "grpo-fn"), tmp_path / "grpo")
    heldout = demo.heldout_tasks(64)
    before, after = pass_rate(sft, tok, heldout), pass_rate(out, tok, heldout)
    assert after >= before + 0.25, (before, after)
    logged = {r["name"] for r in store.metrics(["grpo-fn"])}
    assert {"reward", "reward/starts"} <= logged


def test_ppo_without_a_reward_model_logs_each_term(tmp_path, tok, store):
    """PPO whose terms are all functions loads no reward model (the value model starts at SFT with a new
    head) and logs the total and each term; with one term of weight 1 they agree step by step. Its rollout
    sample records each answer's terms."""
    sft = save_checkpoint(load_policy("bundled", CPU), tok, tmp_path / "sft")
    config = PPOConfig.from_dict(dict(sft_model=str(sft), reward="exact,eos:weight=0.5", total_episodes=16,
                                      batch_size=8, ppo_epochs=1, response_length=8, ptx_coef=0.0, eval_prompts=0,
                                      device="cpu"))
    store.start_run("ppo-terms", "ppo", config.to_dict(), str(tmp_path / "ppo"))
    get_stage("ppo").runner(config, store, Events(store, "ppo-terms"), tmp_path / "ppo")
    rows = {(r["step"], r["name"]): r["value"] for r in store.metrics(["ppo-terms"])}
    for step in (1, 2):
        total = rows[(step, "reward/exact")] + 0.5 * rows[(step, "reward/eos")]
        assert rows[(step, "reward")] == pytest.approx(total, abs=1e-6)
        assert rows[(step, "eos_rate")] == pytest.approx(rows[(step, "reward/eos")])
    # The rollout browser's sample holds every answer's terms, and they add up to the answer's reward.
    from core.data import rollouts

    for step in rollouts.steps(store, "ppo-terms"):
        kept = rollouts.samples(store, "ppo-terms", step)
        assert kept and all(set(s["terms"]) == {"exact", "eos"} for s in kept)
        for s in kept:
            assert s["terms"]["eos"] == float(s["finished"])
            assert s["reward"] == pytest.approx(s["terms"]["exact"] + 0.5 * s["terms"]["eos"], abs=1e-4)


GROUP_REWARD = "contains:text=The answer is,eos:weight=0.5,length:target=6:weight=-0.1"


def run_group_method(method: str, tmp_path, tok, store, total_episodes: int):
    """A tiny GRPO or RLOO run on the demo's prompts, rewarded by three terms (batches of two prompts, two answers
    each, 8 tokens at most): (run id, config)."""
    from core.config import RLOOConfig

    sft = save_checkpoint(load_policy("bundled", CPU), tok, tmp_path / "sft")
    config = (GRPOConfig if method == "grpo" else RLOOConfig).from_dict(dict(
        sft_model=str(sft), reward=GROUP_REWARD, total_episodes=total_episodes, batch_size=4, num_generations=2,
        max_completion_length=8, beta=0.0, save_every=100, eval_prompts=0, device="cpu", seed=0))
    run_id = f"{method}-rollouts"
    store.start_run(run_id, method, config.to_dict(), str(tmp_path / method))
    get_stage(method).runner(config, store, Events(store, run_id), tmp_path / method)
    return run_id, config


def group_advantages(method: str, rewards: list[float]) -> list[float]:
    """A group's advantages as GRPO (reward - group mean, over the group's unbiased std) and RLOO (reward - the
    mean of the others) build them at beta=0, by hand."""
    n = len(rewards)
    mean = sum(rewards) / n
    if method == "rloo":
        return [r - (sum(rewards) - r) / (n - 1) for r in rewards]
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (n - 1))
    return [(r - mean) / (std + 1e-4) for r in rewards]


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_group_methods_record_each_answers_terms_and_advantage(method, tmp_path, tok, store):
    """GRPO and RLOO keep a rollout sample per step in PPO's table, at the steps the trainer logged: each kept
    answer's terms add up to its reward, and its advantage is the one its group gives it (by hand, from the kept
    rewards less the missing-EOS penalty), so a sample out of line with the advantages fails. No KL is measured:
    NULL, not 0."""
    from core.data import rollouts

    run_id, config = run_group_method(method, tmp_path, tok, store, total_episodes=12)
    logged = sorted({r["step"] for r in store.metrics([run_id]) if r["name"] == "reward"})
    assert rollouts.steps(store, run_id) == logged == [1, 2, 3]
    batches, advantages = rollouts.rewards(store, run_id), []
    for step in logged:
        kept = sorted(rollouts.samples(store, run_id, step), key=lambda s: s["idx"])
        assert len(kept) == len(batches[step]) == 4  # the whole batch: two prompts, two answers each
        assert [s["reward"] for s in kept] == pytest.approx(batches[step], abs=1e-5)
        for s in kept:
            assert set(s["terms"]) == {"contains", "eos", "length"}
            assert s["reward"] == pytest.approx(s["terms"]["contains"] + 0.5 * s["terms"]["eos"]
                                                - 0.1 * s["terms"]["length"], abs=1e-4)
            assert s["terms"]["eos"] == float(s["finished"])
            assert s["kl"] is None and s["tokens"] == [] and s["gold"] is not None  # demo prompts: gold applies
        for group in (kept[:2], kept[2:]):
            assert group[0]["prompt"] == group[1]["prompt"]
            penalised = [s["reward"] - (0.0 if s["finished"] else config.missing_eos_penalty) for s in group]
            assert [s["advantage"] for s in group] == pytest.approx(group_advantages(method, penalised), abs=1e-3)
            advantages += [s["advantage"] for s in group]
    assert sum(abs(a) > 0.1 for a in advantages) >= 4  # groups whose answers differ: the check above has teeth


FAILING = {
    "raises": ("def score(prompts, completions):\n    raise KeyError('oops')\n", "raised KeyError"),
    "nan": ("def score(prompts, completions):\n    return [float('nan')] * len(completions)\n", "returned nan for the answer"),
    "count": ("def score(prompts, completions):\n    return [1.0]\n", "returned 1 values for 8 answers"),
    "hangs": ("import time\ndef score(prompts, completions):\n    time.sleep(30)\n", "did not return within 0.5 s"),
}


@pytest.mark.parametrize("failure", sorted(FAILING))
def test_a_failing_term_stops_the_run_naming_it_and_an_answer(failure, tmp_path, tok):
    source, message = FAILING[failure]
    sft = save_checkpoint(load_policy("bundled", CPU), tok, tmp_path / "sft")
    path = write(tmp_path, source)
    config = PPOConfig.from_dict(dict(sft_model=str(sft), reward=f"python:{path}:score:timeout=0.5:name=mine",
                                      total_episodes=16, batch_size=8, ppo_epochs=1, response_length=8, ptx_coef=0.0,
                                      save_every=1, eval_prompts=0, device="cpu"))
    with pytest.raises(RewardTermError, match=f"reward term mine {message}") as caught:
        get_stage("ppo").runner(config, None, Events(), tmp_path / "ppo")
    assert "the answer '" in str(caught.value) or "answers" in str(caught.value)
    assert not (tmp_path / "ppo").exists()  # the first step failed: no checkpoint, no output


def test_eval_tabulates_each_terms_mean_beside_the_rm_score(tmp_path, tok):
    """`rlhf eval --reward`: each term's mean is a column, on the very answers the RM scored: a function
    returning 1 for every answer reads 1.0, and `eos` reads the share of those answers that stopped."""
    from core.analysis.eval_table import EvalConfig, run
    from core.models.loading import load_scalar_model
    from core.stages.evaluate import measure_answers

    rm = save_checkpoint(load_scalar_model("bundled", tok.pad_token_id, CPU), tok, tmp_path / "rm")
    ones = write(tmp_path, "def ones(prompts, completions, **columns):\n    return [1] * len(completions)\n")
    config = EvalConfig.from_dict(dict(checkpoints="bundled", reward_model=str(rm), n_prompts=12, max_new_tokens=12,
                                       reward=f"exact,eos,python:{ones}:ones", device="cpu"))
    out = run(config, None, Events(), tmp_path / "eval")
    (row,) = json.loads((out / "eval.json").read_text())["rows"]
    finished = measure_answers(load_policy("bundled", CPU, dropout=0.0), tok, [t.prompt for t in demo.heldout_tasks(12)],
                               1.0, 12, seed=1234)["finished"]
    assert row["reward/ones"] == 1.0
    assert row["reward/eos"] == pytest.approx(sum(finished) / 12)
    assert 0.0 <= row["reward/exact"] <= 1.0
    assert "reward/exact" in (out / "eval.csv").read_text().splitlines()[0]
