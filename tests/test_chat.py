"""The Chat page: multi-turn conversations for chat-template models, the exact prompt text, the
token-level KL view (its per-answer sum is PPO's KL for the same tokens) and each method's final
model preselected side by side."""

from __future__ import annotations

import re

import pytest
import torch

from core import catalog
from core.config import PPOConfig
from core.data import demo
from core.models.chat import encode_answer, holds_conversations
from core.models.generate import sample
from core.models.loading import load_policy, load_scalar_model, load_tokenizer, pick_device, save_checkpoint
from core.models.tiny import save_tiny_chat_model
from core.stages import ppo
from core.stages.reward import encode_answers, score_sequences
from core.stages.rl import kl_penalty
from core.analysis.token_kl import answer_token_kl, answer_view, token_html
from core.textsafe import EOS_TEXT
from tests.test_pages import button, db, open_page, perturbed_copy_of_bundled, texts

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TEMPERATURE = 0.7  # not 1, so a sum that forgot the temperature scaling would differ


@pytest.fixture(scope="module")
def policies(tmp_path_factory, tok):
    """(policy, reference_policy, rm): a perturbed copy of the bundled model against the bundled model
    (so log π − log π_ref is far from 0), and a reward model with a random head, all assembled as PPO
    assembles its networks."""
    policy = load_policy(perturbed_copy_of_bundled(tmp_path_factory.mktemp("chat") / "policy"))
    torch.manual_seed(1)
    models = ppo.assemble(policy, load_policy("bundled"), load_scalar_model("bundled", tok.pad_token_id),
                          load_scalar_model("bundled", tok.pad_token_id), tok,
                          PPOConfig.from_dict({"temperature": TEMPERATURE}), pick_device("cpu"))
    return models


def test_token_view_sum_equals_ppo_kl_for_the_same_tokens(policies, tok):
    prompts = [t.prompt for t in demo.train_tasks(8)]
    samples = sample(policies.policy, tok, prompts, max_new_tokens=16, temperature=TEMPERATURE, seed=3)
    batch = ppo.score_responses(policies, samples, PPOConfig.from_dict({"temperature": TEMPERATURE}))
    # The KL PPO's reward penalises (ppo_step: k1 per token on the answer's tokens, summed per answer).
    ppo_kl = (kl_penalty(batch.logprobs, batch.ref_logprobs) * batch.response_mask).sum(1)
    assert ppo_kl.abs().max() > 0.1  # far from 0, so agreement below is not 0 == 0
    for i in range(len(prompts)):
        prompt_ids = samples.prompt_ids[i][samples.prompt_mask[i].bool()].tolist()
        answer_ids = samples.response_ids[i][samples.response_mask[i].bool()].tolist()
        per_token = answer_token_kl(policies.policy, policies.reference_policy, prompt_ids, answer_ids, TEMPERATURE)
        assert len(per_token) == len(answer_ids)
        assert sum(per_token) == pytest.approx(ppo_kl[i].item(), abs=1e-4)
        # The page's path (a prompt and the sampled ids): the same KL, and the RM score PPO read.
        view = answer_view(policies.policy, policies.reference_policy, tok, prompts[i], answer_ids, TEMPERATURE,
                           policies.reward_model.members[0])
        assert view.kl == pytest.approx(ppo_kl[i].item(), abs=1e-4)
        assert view.rm_score == pytest.approx(batch.reward_scores[i].item(), abs=1e-4)
        assert [k for _, k in view.tokens] == pytest.approx(per_token, abs=1e-5)
    # A wrong temperature gives another number: the test would catch an unscaled sum.
    unscaled = answer_token_kl(policies.policy, policies.reference_policy, prompt_ids, answer_ids, 1.0)
    assert sum(unscaled) != pytest.approx(ppo_kl[-1].item(), abs=1e-3)


def test_token_view_rm_score_matches_the_reward_models_own_scoring(policies, tok):
    prompt, answer = "What is 3 plus 4?", "The answer is 7."
    view = answer_view(policies.policy, policies.reference_policy, tok, prompt, encode_answer(tok, prompt, answer)[1],
                       TEMPERATURE, policies.reward_model.members[0])
    expected = score_sequences(policies.reward_model.members[0], encode_answers(tok, prompt, [answer], 256), tok.pad_token_id,
                               pick_device("cpu"))[0]
    assert view.rm_score == pytest.approx(expected.item(), abs=1e-5)
    assert "".join(t for t, _ in view.tokens) == " The answer is 7." + EOS_TEXT


def test_token_view_rejects_greedy_and_empty_input(policies):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        answer_token_kl(policies.policy, policies.reference_policy, [5, 6], [7], 0.0)
    with pytest.raises(ValueError, match="at least one token"):
        answer_token_kl(policies.policy, policies.reference_policy, [5, 6], [], 1.0)


def test_token_html_escapes_model_text():
    html = token_html([('<img src="http://x/y.png">', 0.5), ("ok", -3.0)])
    assert "<img" not in html and "&lt;img src=&quot;http://x/y.png&quot;&gt;" in html
    assert "rgba(220,50,47,0.21)" in html and "rgba(38,139,210,0.85)" in html  # red up, blue down, capped


def test_method_finals_prefers_the_pipeline_run_then_the_newest(tmp_path):
    def ckpt(name, run_id):
        return {"name": name, "run_id": run_id, "step": 0, "path": str(tmp_path)}

    by_kind = {
        "sft": [ckpt("pipe-a-sft", "pipe-a-sft"), ckpt("pipe-b-sft", "pipe-b-sft"), ckpt("mine", "mine")],
        "ppo": [ckpt("pipe-b-ppo", "pipe-b-ppo"), ckpt("pipe-b-ppo-no-ptx", "pipe-b-ppo-no-ptx"),
                ckpt("pipe-b-ppo-step-4", "pipe-b-ppo")],
        "dpo": [ckpt("dpo-1", "dpo-1"), ckpt("dpo-2", "dpo-2"), ckpt("dpo-2-epoch-1", "dpo-2")],
        "grpo": [ckpt("grpo-run-step-3", "grpo-run")],  # training checkpoints only: no final model
        "rloo": [],
    }
    picked = catalog.method_finals(by_kind, "pipe-b")
    assert {kind: c["name"] for kind, c in picked.items()} == {"sft": "pipe-b-sft", "ppo": "pipe-b-ppo", "dpo": "dpo-2"}
    assert catalog.method_finals(by_kind, None)["sft"]["name"] == "mine"


def test_holds_conversations_only_with_a_template_of_its_own(tmp_path, tok):
    assert not holds_conversations(tok)  # the bundled model's template is the plain one
    assert holds_conversations(load_tokenizer(save_tiny_chat_model(tmp_path / "qwen", "qwen2")))


# -- the page ----------------------------------------------------------------------------------------


def assistant_turns(at) -> list[dict]:
    return [m for m in at.session_state["chat_history"] if m["role"] == "assistant"]


def test_chat_template_model_holds_a_conversation_and_shows_its_prompt(app, workbench_home, tmp_path):
    db(workbench_home).add_checkpoint("qwen-chat", "sft", save_tiny_chat_model(tmp_path / "qwen", "qwen2"))
    at = open_page(app, "chat")
    at.selectbox(key="chat_model").set_value("qwen-chat (sft)").run()
    assert "continues the conversation" in texts(at.caption)
    at.toggle(key="chat_show_prompt").set_value(True)
    at.number_input(key="chat_max_tokens").set_value(6)
    at.chat_input[0].set_value("Hello there").run()
    at.chat_input[0].set_value("And again").run()
    assert not at.exception, at.exception
    assert [m.name for m in at.chat_message] == ["user", "assistant", "user", "assistant"]
    first, second = assistant_turns(at)
    assert [t["content"] for t in second["conversation"]] == ["Hello there", first["content"], "And again"]
    # The exact text (st.code trims the template's final newline from the display only).
    assert at.code[-1].value == (f"<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n{first['content']}"
                                 "<|im_end|>\n<|im_start|>user\nAnd again<|im_end|>\n<|im_start|>assistant")
    button(at, "New conversation").click().run()
    assert at.session_state["chat_history"] == []


def test_plain_model_answers_each_message_on_its_own(app):
    at = open_page(app, "chat")
    at.toggle(key="chat_show_prompt").set_value(True)
    at.number_input(key="chat_max_tokens").set_value(6)
    at.chat_input[0].set_value("What is 3 plus 4?").run()
    at.chat_input[0].set_value("What is 2 plus 2?").run()
    assert "answered on its own" in texts(at.caption)
    assert [len(m["conversation"]) for m in assistant_turns(at)] == [1, 1]
    assert at.code[-1].value == "User: What is 2 plus 2?\nAssistant:"


def test_token_view_on_the_page_shows_the_answers_kl_and_rm_score(app, workbench_home, tmp_path, tok):
    store = db(workbench_home)
    store.add_checkpoint("noisy", "ppo", perturbed_copy_of_bundled(tmp_path / "noisy"))
    store.add_checkpoint("plain-sft", "sft", save_checkpoint(load_policy("bundled"), tok, tmp_path / "sft"))
    torch.manual_seed(2)
    store.add_checkpoint("rm-1", "rm", save_checkpoint(load_scalar_model("bundled", tok.pad_token_id), tok,
                                                       tmp_path / "rm"))
    at = open_page(app, "chat")
    at.selectbox(key="chat_model").set_value("noisy (ppo)")
    at.toggle(key="chat_token_view").set_value(True).run()
    assert at.selectbox(key="chat_reference").value == "plain-sft (sft)"  # the SFT model by default
    assert at.selectbox(key="chat_reward_model").value == "rm-1 (step 0)"
    at.chat_input[0].set_value("What is 3 plus 4?").run()
    assert not at.exception, at.exception
    html = at.get("html")[-1].proto.body
    kl, rm = (float(x) for x in re.search(r"KL ([-+][\d.]+) nats.*RM score ([-+][\d.]+)", html).groups())
    sampled = assistant_turns(at)[0]["tokens"]
    expected = answer_view(load_policy(tmp_path / "noisy"), load_policy(tmp_path / "sft"), tok, "What is 3 plus 4?",
                           sampled, 1.0, load_scalar_model(tmp_path / "rm", tok.pad_token_id))
    assert kl == pytest.approx(expected.kl, abs=1e-3) and abs(kl) > 0.01
    assert rm == pytest.approx(expected.rm_score, abs=1e-3)
    assert html.count("<span title=") == len(expected.tokens)

    # A reference of another tokenizer: a clear message instead of numbers.
    store.add_checkpoint("qwen-chat", "sft", save_tiny_chat_model(tmp_path / "qwen", "qwen2"))
    at.run()
    at.selectbox(key="chat_reference").set_value("qwen-chat (sft)").run()
    assert "No token view: reference policy: the tokenizers differ" in texts(at.error)


def test_token_view_scores_through_the_ensembles_aggregate_and_shows_the_members(app, workbench_home, tmp_path, tok):
    """An ensemble RM on Chat: the score is the members' aggregate (not member 0's), each member's score and
    their spread beside it; switching the aggregate to `min` gives the lowest member's score."""
    from core.models.ensemble import save_ensemble

    store = db(workbench_home)
    store.add_checkpoint("plain-sft", "sft", save_checkpoint(load_policy("bundled"), tok, tmp_path / "sft"))
    members = []
    for i in range(2):
        torch.manual_seed(10 + i)  # random heads: the members disagree
        members.append(save_checkpoint(load_scalar_model("bundled", tok.pad_token_id), tok, tmp_path / f"rm{i}"))
    store.add_checkpoint("rm-ens", "rm", save_ensemble(tmp_path / "ensemble", members))
    at = open_page(app, "chat")
    at.selectbox(key="chat_model").set_value("plain-sft (sft)")
    at.toggle(key="chat_token_view").set_value(True).run()
    assert at.selectbox(key="chat_rm_aggregate").value == "mean"
    at.chat_input[0].set_value("What is 3 plus 4?").run()
    assert not at.exception, at.exception
    sampled = assistant_turns(at)[0]["tokens"]
    policy = load_policy(tmp_path / "sft")
    each = [answer_view(policy, policy, tok, "What is 3 plus 4?", sampled, 1.0,
                        load_scalar_model(m, tok.pad_token_id)).rm_score for m in members]
    assert abs(each[0] - each[1]) > 0.01  # they disagree, so the mean is not member 0's score

    def shown() -> tuple[float, list[float], float]:
        html = at.get("html")[-1].proto.body
        found = re.search(r"RM score ([-+][\d.]+) \((\w+) of 2 members; spread ±([\d.]+): ([-+][\d.]+) ([-+][\d.]+)\)",
                          html)
        assert found, html
        return float(found.group(1)), [float(found.group(4)), float(found.group(5))], float(found.group(3))

    score, listed, spread = shown()
    assert score == pytest.approx(sum(each) / 2, abs=1e-3)
    assert listed == pytest.approx(each, abs=0.006)  # printed to two decimals
    assert spread == pytest.approx(abs(each[0] - each[1]) / 2, abs=1e-3)  # the population std of two
    at.selectbox(key="chat_rm_aggregate").set_value("min").run()
    assert shown()[0] == pytest.approx(min(each), abs=1e-3)


def test_side_by_side_preselects_each_methods_final_model(app, workbench_home, tmp_path):
    store = db(workbench_home)
    store.start_run("pipe-1", "pipeline", {}, None)

    def final_model(name: str, kind: str) -> None:
        (tmp_path / name).mkdir()
        store.start_run(name, kind, {}, None)
        store.add_checkpoint(name, kind, tmp_path / name, run_id=name)

    for kind in ("sft", "ppo", "dpo"):
        final_model(f"pipe-1-{kind}", kind)
    final_model("later-ppo", "ppo")  # newer, not the pipeline's
    final_model("rloo-x", "rloo")  # no RLOO in the pipeline: the newest
    at = open_page(app, "chat")
    assert at.multiselect(key="sbs_models").value == ["pipe-1-sft (sft)", "later-ppo (ppo)"]  # SFT vs newest PPO
    button(at, "Each method's final model").click().run()
    assert at.multiselect(key="sbs_models").value == ["pipe-1-sft (sft)", "pipe-1-ppo (ppo)", "pipe-1-dpo (dpo)",
                                                       "rloo-x (rloo)"]
