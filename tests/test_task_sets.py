"""reasoning-gym prompt sets (core/data/task_sets.py) and the `reasoning_gym` reward term: a set generated
offline from a seed, imported into the store with its answers and metadata, named as a stage's prompts, and
scored by the dataset's own scorer; bad names, options and a missing extra refused with a clear message."""

from __future__ import annotations

import sys

import pytest

from core.config import GRPOConfig, parse_reward
from core.data.sources import load_prompt_rows
from core.data.task_sets import generate, parse_task_set
from core.stages.reward_terms import Answers, resolve_reward

SMALL = "reasoning-gym:chain_sum:size=12:seed=0:min_terms=2:max_terms=2:min_digits=1:max_digits=1"


def test_a_set_is_generated_from_its_seed_with_answers_and_metadata():
    rows = generate(parse_task_set(SMALL))
    assert len(rows) == 12 and all(set(r) == {"prompt", "answer", "metadata"} for r in rows)
    for row in rows:  # the options reach the dataset's config: two one-digit terms, and the answer is their sum
        terms = [int(t) for t in row["metadata"]["expression"].replace(" ", "").replace("-", "+-").split("+") if t.strip()]
        assert len(terms) == 2 and all(abs(t) <= 9 for t in terms)
        assert row["answer"] == str(sum(terms)) and row["metadata"]["source_dataset"] == "chain_sum"
    assert generate(parse_task_set(SMALL)) == rows  # the same seed, the same set
    other = generate(parse_task_set(SMALL.replace("seed=0", "seed=1")))
    assert [r["prompt"] for r in other] != [r["prompt"] for r in rows]
    assert len(generate(parse_task_set("reasoning-gym:chain_sum"))) == 100  # the default size


def test_the_import_keeps_answers_and_metadata_and_a_stage_reads_the_same_rows(workbench_home, store, capsys):
    from core.cli import main

    assert main(["import", SMALL]) == 0
    assert "imported 12 prompts" in capsys.readouterr().out
    stored_prompts, stored = load_prompt_rows("store", store)
    direct_prompts, direct = load_prompt_rows(SMALL, None)  # named as a stage's prompts, no import
    assert stored_prompts == direct_prompts and stored == direct
    rows = generate(parse_task_set(SMALL))
    assert stored == [{"answer": r["answer"], "metadata": r["metadata"]} for r in rows]


def test_the_reasoning_gym_term_scores_with_the_sets_own_scorer():
    rows = [{k: v for k, v in r.items() if k != "prompt"} for r in generate(parse_task_set(SMALL))[:4]]
    right = [rows[0]["answer"], rows[1]["answer"]]
    batch = Answers(["q"] * 4,
                    [f"The answer is {right[0]}.", f"<answer>{right[1]}</answer>", "The answer is 1234.", "no idea"],
                    rows, [True] * 4, [5] * 4)
    values = resolve_reward("reasoning_gym")(batch).terms["reasoning_gym"].tolist()
    assert values[:2] == [1.0, 1.0]
    # chain_sum's scorer (reasoning-gym's default) gives len(answer)/len(given) when the answer is inside: 0 here.
    assert values[2] == (len(rows[2]["answer"]) / 4 if rows[2]["answer"] in "1234" else 0.0)
    assert values[3] == 0.0
    named = resolve_reward("reasoning_gym:dataset=chain_sum")(batch).terms["reasoning_gym"].tolist()
    assert named == values


def test_a_stage_takes_a_set_as_its_prompts_and_checks_the_term_before_any_model(tmp_path):
    from core.stages.trl_bridge import check_group_inputs

    config = GRPOConfig.from_dict(dict(sft_model="bundled", reward="reasoning_gym", prompts=SMALL, batch_size=8,
                                       device="cpu"))
    _, prompts, columns, reward = check_group_inputs(config, None)
    assert len(prompts) == 12 and columns[0]["metadata"]["source_dataset"] == "chain_sum"
    assert reward.names == ["reasoning_gym"]
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"prompt": "What is 2 + 2?", "answer": "4"}\n' * 8)
    bare = GRPOConfig.from_dict(dict(sft_model="bundled", reward="reasoning_gym", prompts=str(plain), batch_size=8,
                                     device="cpu"))
    with pytest.raises(ValueError, match="reads the column 'metadata', which 8 of 8 prompts lack"):
        check_group_inputs(bare, None)


@pytest.mark.parametrize("source, message", [
    ("reasoning-gym:basic_arithmatic", r"no dataset 'basic_arithmatic': e.g. basic_arithmetic"),
    ("reasoning-gym:", "name the dataset"),
    ("reasoning-gym:chain_sum:size=0", "size must be from 1"),
    ("reasoning-gym:chain_sum:seed=x", "seed must be a whole number"),
    ("reasoning-gym:chain_sum:colour=red", r"unknown option\(s\) colour \(it takes size, seed, min_terms"),
    ("reasoning-gym:chain_sum:min_terms=many", "min_terms must be like its default"),
    ("reasoning-gym:chain_sum:min_terms=3:max_terms=2", "chain_sum: "),
    ("reasoning-gym:chain_sum:size", "options are key=value"),
])
def test_bad_sets_are_refused_with_a_clear_message(source, message):
    with pytest.raises(ValueError, match=message):
        load_prompt_rows(source, None)


def test_a_bad_term_and_a_missing_extra_are_named(monkeypatch):
    with pytest.raises(ValueError, match="no dataset 'chain_sums'"):
        resolve_reward("reasoning_gym:dataset=chain_sums")
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "reasoning_gym" else real_find_spec(name, *a))
    with pytest.raises(ValueError, match=r"reasoning-gym package, which is not installed: pip install "
                                         r"'rlhf-workbench\[verifiers\]'"):
        parse_reward("reasoning_gym")
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # `import reasoning_gym` now raises ImportError
    with pytest.raises(ValueError, match=r"need the reasoning-gym package, which is not installed: pip install"):
        load_prompt_rows(SMALL, None)
