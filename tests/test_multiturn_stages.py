"""The whole conversation reaches every stage through the chat template (issue 29): the RM learns a
preference decided only by an earlier turn (and cannot without it), scores a multi-turn ranking as the
conversation rendered by hand, PPO samples after the rendered earlier turns, TRL's rows carry them,
and a conversation too long keeps its most recent whole turns, saying so in the run log."""

from __future__ import annotations

import json
import random

import pytest
import torch

from core.config import PPOConfig, RewardConfig
from core.data import demo
from core.data.sources import Ranking, load_rankings
from core.models.chat import fit_prompt, fit_report
from core.models.loading import load_scalar_model, pick_device, reward_bias
from core.paths import BUNDLED_MODEL_DIR
from core.stages import ppo, reward, trl_bridge
from core.stages.events import Events

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = pick_device("cpu")

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731


def remembered_word_rows(n: int, seed: int, with_context: bool = True) -> list[dict]:
    """Pairs whose better answer is decided only by an earlier turn: the user named a word, then asks
    "Say it again."; the answer repeating that word is chosen. The last user turn is the same for all."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        said, other = rng.sample(demo.WORDS, 2)
        earlier = [U(f"Repeat the word {said}."), A(f"The answer is {said}.")]
        rows.append({"prompt": [*earlier, U("Say it again.")] if with_context else "Say it again.",
                     "responses": [f"The answer is {said}.", f"The answer is {other}."]})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_rm(tmp_path, name: str, rows: list[dict]) -> tuple[object, dict]:
    data = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    out = reward.run(RewardConfig(sft_model=str(BUNDLED_MODEL_DIR), data=str(data), epochs=3, batch_size=16,
                                  learning_rate=1e-3, max_length=64, device="cpu", seed=0),
                     None, Events(), tmp_path / name)
    return out, json.loads((out / reward.SUMMARY_FILE).read_text())


@pytest.fixture(scope="module")
def rms(tmp_path_factory):
    """One RM trained on the conversations, one on the same pairs with the earlier turns cut."""
    tmp = tmp_path_factory.mktemp("multiturn")
    with_turns = train_rm(tmp, "rm-turns", remembered_word_rows(200, seed=1))
    cut = train_rm(tmp, "rm-cut", remembered_word_rows(200, seed=1, with_context=False))
    return tmp, with_turns, cut


def test_rm_learns_a_preference_decided_by_an_earlier_turn(rms):
    _, (_, with_turns), (_, cut) = rms
    assert with_turns["heldout_rankings"] == 20
    # 20 held-out pairs: chance is 0.5 (16 or more right by chance: p = 0.6 %), and without the earlier
    # turn nothing tells the two answers apart.
    assert with_turns["heldout_accuracy"] >= 0.8, (with_turns, cut)
    assert cut["heldout_accuracy"] <= 0.65, (with_turns, cut)


def test_rm_scores_a_conversation_as_rendered_by_hand(rms, tok):
    _, (rm_dir, _), _ = rms
    model = load_scalar_model(str(rm_dir), tok.pad_token_id, CPU).eval()
    turns = [{"role": "system", "content": "Be brief."}, U("Repeat the word cat."), A("The answer is cat."),
             U("Say it again.")]
    answers = ["The answer is cat.", "The answer is dog."]
    ours = reward.score_sequences(model, reward.encode_answers(tok, turns, answers, 64), tok.pad_token_id, CPU)
    # The bundled model's template, written out: the system line, then "User: ...\nAssistant: ...<eos>"
    # turns, each after a newline.
    by_hand = []
    for answer in answers:
        text = (f"Be brief.\n\nUser: Repeat the word cat.\nAssistant: The answer is cat.{tok.eos_token}\n"
                f"User: Say it again.\nAssistant: {answer}{tok.eos_token}")
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():  # the scalar head over the last token's hidden state
            by_hand.append(model.score(model.transformer(input_ids=ids).last_hidden_state[0, -1]).item())
    # The stage's score is the head's output at the last token plus the RM's centring bias.
    assert torch.allclose(ours.float(), torch.tensor(by_hand) + reward_bias(model), atol=1e-4), (ours, by_hand)
    # ...and the stage's rankings from a file carry that conversation whole.
    ranking = Ranking(turns, answers)
    assert reward.encode_answers(tok, ranking.prompt, answers, 64)[0] == tok(
        f"Be brief.\n\nUser: Repeat the word cat.\nAssistant: The answer is cat.{tok.eos_token}\nUser: Say it again."
        f"\nAssistant: The answer is cat.{tok.eos_token}", add_special_tokens=False)["input_ids"]


def test_ppo_samples_after_the_rendered_earlier_turns(rms, tok, monkeypatch):
    tmp, (rm_dir, _), _ = rms
    conversations = [r["prompt"] for r in remembered_word_rows(8, seed=5)]
    prompts = write_jsonl(tmp / "prompts.jsonl", [{"prompt": c} for c in conversations])
    seen = []
    real_step = ppo.ppo_step

    def recording_step(models, prompt_ids, prompt_mask, *args, **kwargs):
        seen.append([row[mask.bool()].tolist() for row, mask in zip(prompt_ids, prompt_mask)])
        return real_step(models, prompt_ids, prompt_mask, *args, **kwargs)

    monkeypatch.setattr(ppo, "ppo_step", recording_step)
    ppo.run(PPOConfig(sft_model=str(BUNDLED_MODEL_DIR), reward_model=str(rm_dir), prompts=str(prompts),
                      total_episodes=8, batch_size=8, ppo_epochs=1, response_length=6, ptx_coef=0.0,
                      eval_prompts=0, device="cpu"), None, Events(), tmp / "ppo")
    rendered = {tuple(tok(f"User: {c[0]['content']}\nAssistant: {c[1]['content']}{tok.eos_token}\nUser: Say it "
                          "again.\nAssistant:", add_special_tokens=False)["input_ids"]) for c in conversations}
    assert seen and {tuple(ids) for ids in seen[0]} <= rendered and len(seen[0]) == 8
    # GRPO/RLOO's rows (TRL samples from the rendered text) and DPO's pairs carry the same conversation.
    rows = trl_bridge.prompt_rows(conversations[:1], tok, [{}], 96)
    assert tuple(tok(rows[0]["prompt"], add_special_tokens=False)["input_ids"]) in rendered
    pairs = trl_bridge.preference_pairs(load_rankings(str(write_jsonl(tmp / "r.jsonl", remembered_word_rows(2, 3))),
                                                      None), tok)
    assert pairs[0]["prompt"].startswith("User: Repeat the word") and pairs[0]["chosen"].startswith(" The answer is")


def test_a_long_conversation_keeps_its_most_recent_whole_turns(tok):
    system = {"role": "system", "content": "Be brief."}
    turns = [system, U("one two three four five six"), A("seven eight nine ten"), U("eleven twelve thirteen"),
             A("fourteen fifteen"), U("sixteen?")]
    full = len(tok(f"Be brief.\n\nUser: one two three four five six\nAssistant: seven eight nine ten{tok.eos_token}\n"
                   f"User: eleven twelve thirteen\nAssistant: fourteen fifteen{tok.eos_token}\nUser: sixteen?\n"
                   "Assistant:", add_special_tokens=False)["input_ids"])
    assert fit_prompt(tok, turns, full) == (turns, 0)
    kept, dropped = fit_prompt(tok, turns, full - 1)
    assert kept == [system, *turns[3:]] and dropped == 2  # a whole exchange went, the system turn stayed
    last_only = len(tok("User: sixteen?\nAssistant:", add_special_tokens=False)["input_ids"])
    assert fit_prompt(tok, turns, last_only) == ([turns[-1]], 5)
    with pytest.raises(ValueError, match="last user turn alone takes"):
        fit_prompt(tok, turns, last_only - 1)
    assert fit_report(tok, [turns, "Say hi."], full - 1) == (
        f"1 of 2 prompts are longer than {full - 1} tokens: their oldest 2-2 turns are left out, the most recent "
        "whole turns kept")
    assert fit_report(tok, [turns], full) is None


def test_the_run_log_says_when_turns_are_left_out(tmp_path, tok):
    rows = remembered_word_rows(24, seed=2)
    for r in rows:  # a long opening exchange that cannot fit in max_length 48 with the rest
        r["prompt"] = [U(" ".join(demo.WORDS)), A("Noted."), *r["prompt"]]
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    events = Events()
    logged = []
    events.log = logged.append
    reward.run(RewardConfig(sft_model=str(BUNDLED_MODEL_DIR), data=str(data), epochs=1, batch_size=16,
                            max_length=48, device="cpu"), None, events, tmp_path / "rm")
    assert any(line.startswith("24 of 24 rankings have conversations longer than max_length (48") and
               "oldest 2-2 turns are left out" in line for line in logged), logged


def test_the_prompt_budget_is_a_config_field_of_ppo_grpo_rloo_and_the_planner(tmp_path, tok, monkeypatch):
    """max_prompt_length (default 96): a 2-turn conversation longer than 96 tokens is cut to its most recent
    whole turns by default and kept whole with a larger budget: in PPO's rollouts, GRPO/RLOO's rows and the
    memory planner's known prompt length; a budget too small is refused."""
    from core.config import GRPOConfig, RLOOConfig
    from core.models.memory import known_prompt_length

    conversation = [U("Remember these words: " + " ".join((demo.WORDS * 3)[:80])), A("Noted, " + " ".join(demo.WORDS[:8])),
                    U("Say it again.")]
    whole = tok(f"User: {conversation[0]['content']}\nAssistant: {conversation[1]['content']}{tok.eos_token}\n"
                "User: Say it again.\nAssistant:", add_special_tokens=False)["input_ids"]
    last = tok("User: Say it again.\nAssistant:", add_special_tokens=False)["input_ids"]
    assert 96 < len(whole) <= 160
    prompts = write_jsonl(tmp_path / "long.jsonl", [{"prompt": conversation}] * 8)
    seen = []
    real_step = ppo.ppo_step

    def recording_step(models, prompt_ids, prompt_mask, *args, **kwargs):
        seen.append({tuple(row[mask.bool()].tolist()) for row, mask in zip(prompt_ids, prompt_mask)})
        return real_step(models, prompt_ids, prompt_mask, *args, **kwargs)

    monkeypatch.setattr(ppo, "ppo_step", recording_step)
    for budget, expected, note in ((None, last, True), (160, whole, False)):
        values = {} if budget is None else {"max_prompt_length": budget}
        config = PPOConfig(sft_model=str(BUNDLED_MODEL_DIR), reward="eos", prompts=str(prompts), total_episodes=8,
                           batch_size=8, ppo_epochs=1, response_length=4, ptx_coef=0.0, eval_prompts=0, device="cpu",
                           **values)
        events, logged = Events(), []
        events.log = logged.append
        seen.clear()
        ppo.run(config, None, events, tmp_path / f"ppo-{budget}")
        assert seen == [{tuple(expected)}]
        assert any(line.startswith("8 of 8 prompts are longer than 96 tokens: their oldest 2-2 turns are left out")
                   for line in logged) == note
        assert known_prompt_length(config) == (96 if budget is None else len(whole))  # a bound: at most the budget
        for group_config in (GRPOConfig, RLOOConfig):
            budget_of = group_config(**values).max_prompt_length
            rows = trl_bridge.prompt_rows([conversation], tok, [{}], budget_of)
            assert tok(rows[0]["prompt"], add_special_tokens=False)["input_ids"] == expected
    for config_class in (PPOConfig, GRPOConfig, RLOOConfig):
        with pytest.raises(ValueError, match="max_prompt_length must be >= 8"):
            config_class(max_prompt_length=4).validate()
