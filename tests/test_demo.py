"""The demo task and its simulated labeler."""

import torch

from core.config import SFTConfig
from core.data import demo
from core.models.loading import load_policy, load_tokenizer, pick_device
from core.models.pretrain import heldout_lm_loss, pack


def test_every_task_kind_recomputes_its_answer_from_the_prompt():
    tasks = demo.tasks(300, seed=5)
    assert {t.kind for t in tasks} == {"repeat", "reverse", "copy", "first", "last", "second", "commas", "dashes", "count",
                                        "add"}
    for t in tasks:
        assert demo.expected_answer(t.prompt) == t.answer
    assert demo.expected_answer("List the words cat dog sun with commas.") == "cat, dog, sun"
    assert demo.expected_answer("How many words are in: cat dog sun red?") == "4"
    assert demo.expected_answer("What is 7 plus 8?") == "15"
    assert demo.expected_answer("Join the words cat dog with dashes.") == "cat-dog"
    assert demo.expected_answer("How many words are in?") is None


def test_most_prompts_are_readable_and_some_need_arithmetic():
    """The RM can check most answers against the prompt; a share needs arithmetic it cannot do, the
    part of gold the over-optimisation study needs the proxy to miss."""
    kinds = {k.name: k for k in demo.KINDS}
    readable = [kinds[t.kind].readable for t in demo.heldout_tasks()]
    assert 0.85 < sum(readable) / len(readable) < 0.95  # one kind in ten needs arithmetic


def test_preference_kind_separates_format_readable_correctness_and_arithmetic():
    copy, add = "Copy the words: cat dog.", "What is 3 plus 4?"
    assert demo.preference_kind(copy, "The answer is cat dog.", "The answer is cat dog. I hope this helps.") == "format"
    assert demo.preference_kind(copy, "The answer is cat dog.", "The answer is dog cat.") == "correctness"
    assert demo.preference_kind(add, "The answer is 7.", "The answer is 8.") == "arithmetic"
    assert demo.preference_kind(add, "The answer is 8.", "The answer is 8. I hope this helps.") == "format"


def test_pretraining_corpus_is_the_one_the_bundled_model_learned():
    """The base's held-out pretraining loss stays low on it: were the corpus' draws changed without
    re-running `rlhf pretrain-demo`, the base would read it as new text (loss above 5 nats)."""
    tokenizer, model = load_tokenizer("bundled"), load_policy("bundled")
    blocks = pack(tokenizer, demo.heldout_corpus(60), 128)
    assert heldout_lm_loss(model, blocks, pick_device("cpu")) < 1.5


def test_the_bundled_base_has_seen_every_kind():
    """The corpus' dialogues cover every demo kind, so the base can already tell a right answer from a
    wrong one for each (docs/NOTES.md, "The base has seen every kind"): on held-out prompts,
    the right bare answer is likelier than another prompt's answer of the same kind. The former base,
    pretrained on six kinds, was at chance on copy, commas and dashes (0.56, 0.50, 0.48)."""
    tokenizer, model = load_tokenizer("bundled"), load_policy("bundled", dropout=0.0).eval()

    def answer_logprob(prompt: str, answer: str) -> float:
        head = len(tokenizer(demo.format_prompt(prompt), add_special_tokens=False)["input_ids"])
        ids = torch.tensor([tokenizer(demo.format_prompt(prompt) + " " + answer, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logprobs = model(input_ids=ids).logits.log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])
        return float(logprobs[head - 1 :].sum())

    tasks = demo.heldout_tasks(200)
    right_first = {}
    for kind in demo.KINDS:
        same = [t for t in tasks if t.kind == kind.name]
        pairs = [(t, other.answer) for t, other in zip(same, same[1:] + same[:1]) if other.answer != t.answer]
        right_first[kind.name] = sum(answer_logprob(t.prompt, t.answer) > answer_logprob(t.prompt, wrong)
                                     for t, wrong in pairs) / len(pairs)
    assert min(right_first.values()) >= 0.75, right_first


def test_heldout_prompts_are_disjoint_from_training_prompts():
    train = {t.prompt for t in demo.train_tasks()}
    heldout = demo.heldout_tasks()
    assert len(heldout) == 200 and not train & {t.prompt for t in heldout}


def test_gold_score_puts_correctness_first_then_format():
    prompt = "What is 3 plus 4?"
    clean = demo.gold_score(prompt, "The answer is 7.")
    rambling = demo.gold_score(prompt, "The answer is 7. I hope this helps. Let me know if you need more.")
    wrong = demo.gold_score(prompt, "The answer is 8.")
    no_template = demo.gold_score(prompt, "7")
    assert clean == 1.0
    assert wrong == 0.5  # template + concise, not correct
    assert rambling == 0.7  # correct + template, conciseness gone
    assert no_template == 0.8  # correct + concise, no template
    assert demo.gold_score(prompt, "") == 0.0
    assert demo.gold_score("an unrelated prompt", "The answer is 7.") == 0.5


def test_noise_free_labeler_sorts_by_gold_and_noise_makes_labelers_disagree():
    prompt = "What is the last word of: cat dog sun?"
    answers = ["The answer is dog.", "The answer is sun. I hope this helps.", "The answer is sun.", "sun"]
    order = demo.rank(prompt, answers)
    golds = [demo.gold_score(prompt, answers[i]) for i in order]
    assert golds == sorted(golds, reverse=True) and order[0] == 2
    noisy = {tuple(demo.rank(prompt, answers, temperature=0.5, seed=s)) for s in range(50)}
    assert len(noisy) > 1  # labelers disagree sometimes ...
    assert sum(o[0] == 2 for o in (demo.rank(prompt, answers, temperature=0.1, seed=s) for s in range(50))) > 35  # ... but mostly agree


def test_demonstrations_ramble_at_the_configured_rate():
    rows = demo.demonstrations(demo.train_tasks(1000), ramble_rate=0.4)
    rambling = sum(demo.gold_parts(r["prompt"], r["completion"]).concise < 1 for r in rows)
    assert 330 < rambling < 470
    assert all(demo.gold_parts(r["prompt"], r["completion"]).correct for r in rows)


def test_default_demonstrations_leave_rl_more_than_the_issue_target_to_win():
    """A policy that imitates the demonstrations perfectly is correct and in house style, so all PPO can
    add is conciseness. At half rambling that room was 0.149 of gold: under the +0.15 the demo is meant
    to show (docs/NOTES.md, "The quick preset's budget, measured"). The default must leave more."""
    rows = demo.demonstrations(demo.train_tasks(2000))
    parts = [demo.gold_parts(r["prompt"], r["completion"]) for r in rows]
    assert all(p.correct and p.template for p in parts)
    room = 1 - sum(p.score for p in parts) / len(parts)
    assert room > 0.2
    assert SFTConfig().ramble_rate == demo.RAMBLE_RATE  # the SFT stage trains on these very demonstrations
