"""The demo task and its simulated labeler."""

from core.data import demo


def test_every_task_kind_recomputes_its_answer_from_the_prompt():
    tasks = demo.tasks(300, seed=5)
    assert {t.kind for t in tasks} == {"add", "next", "larger", "repeat", "reverse", "last"}
    for t in tasks:
        assert demo.expected_answer(t.prompt) == t.answer


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
