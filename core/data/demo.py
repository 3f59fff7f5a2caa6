"""The built-in demo task: tiny instructions with answers a program can check.

Why this domain (see docs/NOTES.md, "The demo task"): a 2M-parameter reward model
cannot learn arithmetic it cannot compute, but it perceives format, clean stopping, rambling and
whether an answer copies the prompt's words. So the simulated labeler scores correctness first
(0.5) and format second (0.5: the "The answer is X." template and stopping right after it), the
demonstrations are partly noisy (some ramble after the answer) so SFT leaves format errors that
PPO can win back, and most task kinds are *readable*: their answer can be checked against the
prompt (copy, order, count, list with commas). One kind needs arithmetic (add): the part of
gold the reward model cannot see, which the over-optimisation study needs.

Everything is generated deterministically from a seed.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Callable

from core.config import RAMBLE_RATE  # the demo's default share of rambling demonstrations

PROMPT_TEMPLATE = "User: {prompt}\nAssistant:"
ANSWER_TEMPLATE = "The answer is {answer}."

WORDS = (
    "cat dog red blue sun moon tree bird fish cake book lamp road ship star rain "
    "milk rose gold king frog wolf bear lion door wind snow salt corn hat box"
).split()

RAMBLES = (
    "I hope this helps.",
    "Let me know if you need more.",
    "That is all for now and so on.",
    "Thank you for asking me this question.",
    "I think so but I am not sure.",
    "This was a fun one to answer.",
)

# Weights of the gold score: correctness first, then format.
CORRECT_WEIGHT = 0.5
TEMPLATE_WEIGHT = 0.2
CONCISE_WEIGHT = 0.3
# Extra words after the answer sentence at which conciseness reaches 0.
RAMBLE_WORDS_TO_ZERO = 6

_ANSWER_RE = re.compile(r"^The answer is (.+?)\.$")


@dataclass(frozen=True)
class Task:
    """One instruction with its expected answer."""

    kind: str
    prompt: str
    answer: str


def _words(rng: random.Random, low: int, high: int) -> tuple[str]:
    return (" ".join(rng.sample(WORDS, rng.randint(low, high))),)


@dataclass(frozen=True)
class Kind:
    """One kind of instruction: how its prompt is drawn, read back and answered. `readable`: a wrong
    answer can be seen by comparing it with the prompt (copy, order, count, format); otherwise seeing
    it needs arithmetic, which a tiny reward model cannot do (docs/NOTES.md, "The demo task")."""

    name: str
    template: str  # the prompt, with the arguments as {0}, {1}
    pattern: str  # reads the arguments back from a prompt
    draw: Callable[[random.Random], tuple]
    solve: Callable[..., str]  # the answer from the arguments (as strings)
    readable: bool


_LIST = r"(\w+(?: \w+)*)"
KINDS = (
    Kind("repeat", "Repeat the word {0} {1} times.", r"Repeat the word (\w+) (\d+) times\.",
         lambda rng: (rng.choice(WORDS), rng.randint(2, 4)), lambda w, n: " ".join([w] * int(n)), True),
    Kind("reverse", "Reverse the words: {0}.", rf"Reverse the words: {_LIST}\.", lambda rng: _words(rng, 3, 3),
         lambda ws: " ".join(reversed(ws.split())), True),
    Kind("copy", "Copy the words: {0}.", rf"Copy the words: {_LIST}\.", lambda rng: _words(rng, 2, 3),
         lambda ws: ws, True),
    Kind("first", "What is the first word of: {0}?", rf"What is the first word of: {_LIST}\?",
         lambda rng: _words(rng, 3, 4), lambda ws: ws.split()[0], True),
    Kind("last", "What is the last word of: {0}?", rf"What is the last word of: {_LIST}\?",
         lambda rng: _words(rng, 3, 4), lambda ws: ws.split()[-1], True),
    Kind("second", "What is the second word of: {0}?", rf"What is the second word of: {_LIST}\?",
         lambda rng: _words(rng, 3, 4), lambda ws: ws.split()[1], True),
    Kind("commas", "List the words {0} with commas.", rf"List the words {_LIST} with commas\.",
         lambda rng: _words(rng, 2, 4), lambda ws: ", ".join(ws.split()), True),
    Kind("dashes", "Join the words {0} with dashes.", rf"Join the words {_LIST} with dashes\.",
         lambda rng: _words(rng, 2, 3), lambda ws: "-".join(ws.split()), True),
    Kind("count", "How many words are in: {0}?", rf"How many words are in: {_LIST}\?",
         lambda rng: _words(rng, 2, 5), lambda ws: str(len(ws.split())), True),
    # The component the reward model cannot see: checking the answer needs arithmetic. One kind in
    # ten: wrong sums make many more ranked pairs per prompt than the readable kinds do.
    Kind("add", "What is {0} plus {1}?", r"What is (\d+) plus (\d+)\?",
         lambda rng: (rng.randrange(10), rng.randrange(10)), lambda a, b: str(int(a) + int(b)), False),
)


def task_kind(prompt: str) -> tuple[Kind, tuple[str, ...]] | None:
    """The kind of a demo prompt and its arguments; None for a prompt outside the demo task (a
    conversation of several turns is never one of the demo's single questions)."""
    if not isinstance(prompt, str):
        return None
    for kind in KINDS:
        m = re.fullmatch(kind.pattern, prompt.strip())
        if m:
            return kind, m.groups()
    return None


def _make_task(rng: random.Random) -> Task:
    kind = rng.choice(KINDS)
    args = kind.draw(rng)
    return Task(kind.name, kind.template.format(*args), kind.solve(*(str(a) for a in args)))


def tasks(n: int, seed: int) -> list[Task]:
    """`n` distinct tasks drawn with `seed`; different seeds give (mostly) different prompts."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[Task] = []
    while len(out) < n:
        task = _make_task(rng)
        if task.prompt not in seen:
            seen.add(task.prompt)
            out.append(task)
    return out


def heldout_tasks(n: int = 200) -> list[Task]:
    """Held-out prompts, drawn first so every task kind is represented."""
    return tasks(n, seed=2)


def train_tasks(n: int = 2000) -> list[Task]:
    """Training prompts: disjoint from the held-out prompts by construction."""
    heldout = {t.prompt for t in heldout_tasks()}
    return [t for t in tasks(n + len(heldout), seed=1) if t.prompt not in heldout][:n]


def format_prompt(prompt: str) -> str:
    """The chat shape of the pretraining corpus' dialogues. The stages format prompts through the
    tokenizer's chat template (`core.models.chat`); the bundled model's template renders this same text."""
    return PROMPT_TEMPLATE.format(prompt=prompt)


def demonstration(task: Task, rng: random.Random, ramble_rate: float) -> str:
    """A labeler's written answer; with probability `ramble_rate` it rambles after the answer.

    The noise is on purpose: a perfectly clean SFT set leaves PPO nothing to win (docs/NOTES.md).
    """
    text = ANSWER_TEMPLATE.format(answer=task.answer)
    if rng.random() < ramble_rate:
        text += " " + " ".join(rng.sample(RAMBLES, rng.randint(1, 2)))
    return text


def demonstrations(tasks_: list[Task], ramble_rate: float = RAMBLE_RATE, seed: int = 3) -> list[dict]:
    """SFT rows in TRL's prompt/completion shape (prompt is the raw instruction)."""
    rng = random.Random(seed)
    return [{"prompt": t.prompt, "completion": demonstration(t, rng, ramble_rate)} for t in tasks_]


# ---------------------------------------------------------------------------------------------
# The simulated labeler
# ---------------------------------------------------------------------------------------------


def expected_answer(prompt: str) -> str | None:
    """Recompute the answer from a demo prompt; None for a prompt outside the demo task."""
    found = task_kind(prompt)
    return found[0].solve(*found[1]) if found else None


def is_demo_task(prompts) -> bool:
    """Every prompt (and at least one) is a demo-task prompt the simulated labeler can score: data
    from the store that is the demo's own (core/runs/demo_import.py) gets the demo's gold evaluations."""
    seen = False
    for prompt in prompts:
        if expected_answer(prompt) is None:
            return False
        seen = True
    return seen


@dataclass(frozen=True)
class GoldParts:
    correct: bool
    template: bool
    concise: float

    @property
    def score(self) -> float:
        return (
            CORRECT_WEIGHT * self.correct
            + TEMPLATE_WEIGHT * self.template
            + CONCISE_WEIGHT * self.concise
        )


def gold_parts(prompt: str, response: str) -> GoldParts:
    text = " ".join(response.split())
    first, dot, rest = text.partition(".")
    sentence = (first + dot).strip()
    match = _ANSWER_RE.match(sentence)
    given = match[1].strip() if match else first.strip()
    expected = expected_answer(prompt)
    correct = expected is not None and given == expected
    extra_words = len(rest.split())
    concise = max(0.0, 1.0 - extra_words / RAMBLE_WORDS_TO_ZERO) if sentence else 0.0
    return GoldParts(correct=correct, template=match is not None, concise=concise)


def gold_score(prompt: str, response: str) -> float:
    """The labeler's quality score in [0, 1]: 0.5 correct + 0.2 template + 0.3 concise."""
    return gold_parts(prompt, response).score


def preference_kind(prompt: str, better: str, worse: str) -> str:
    """Why one answer beats another: 'format' when both are equally correct; otherwise 'correctness'
    when the wrong answer can be seen against the prompt (a readable kind), 'arithmetic' when seeing
    it needs arithmetic: the part of the labeler's preferences the reward model cannot learn."""
    if gold_parts(prompt, better).correct == gold_parts(prompt, worse).correct:
        return "format"
    found = task_kind(prompt)
    return "correctness" if found is not None and found[0].readable else "arithmetic"


def rank(
    prompt: str, responses: list[str], temperature: float = 0.0, seed: int | None = None
) -> list[int]:
    """Indices of `responses` ordered best to worst by the simulated labeler.

    temperature = 0 sorts by gold score (ties keep input order). temperature > 0 samples an
    order from the Plackett-Luce (Bradley-Terry for K=2) model with utilities gold/temperature,
    mimicking disagreement between human labelers.
    """
    if temperature < 0:
        raise ValueError("labeler temperature must be >= 0")
    scores = [gold_score(prompt, r) for r in responses]
    if temperature == 0:
        return sorted(range(len(responses)), key=lambda i: -scores[i])
    rng = random.Random(seed)
    # Gumbel-max trick: sorting utilities plus Gumbel noise samples a Plackett-Luce order.
    keys = [s / temperature - math.log(-math.log(rng.random() or 1e-12)) for s in scores]
    return sorted(range(len(responses)), key=lambda i: -keys[i])


# ---------------------------------------------------------------------------------------------
# Pretraining corpus
# ---------------------------------------------------------------------------------------------


def synthetic_rankings(n: int, k: int) -> list[dict]:
    """K answers per demo prompt with distinct gold scores, best first: correct/wrong x clean/rambling."""
    out = []
    for task in train_tasks(n):
        right, wrong = ANSWER_TEMPLATE.format(answer=task.answer), "The answer is 0 0."
        r1, r2, r3 = RAMBLES[:3]
        variants = [right, f"{right} {r1}", f"{right} {r1} {r2}", task.answer, wrong, f"{wrong} {r1}",
                    f"{wrong} {r1} {r2} {r3}", f"{r1} {r2}", f"{task.answer} {r1} {r2}"]
        scored = sorted({round(gold_score(task.prompt, v), 6): v for v in variants}.items(), reverse=True)
        if len(scored) >= k:
            out.append({"prompt": task.prompt, "responses": [v for _, v in scored[:k]]})
    return out


# The corpus is the one the bundled model (assets/) was pretrained on. Its loose dialogues cover every
# instruction kind of the demo (`KINDS`) and two numeric kinds of the first demo (next number, larger
# of two), as web text shows a base model every skill it is later asked for: a base that never saw a
# kind learns it only in SFT, from a few hundred demonstrations, and the ptx term then pulls towards a
# base that cannot do it (measured: SFT correctness 0.73-0.78 on a base pretrained on the first demo's six
# kinds, 0.92-0.96 on this one; joining words with dashes 0.00 and 0.90, because "-dog" is split into
# word pieces the base had never seen; docs/NOTES.md, "The base has seen every kind"). Changing a draw here
# changes every document after it, so the bundled base and its held-out pretraining loss (the alignment
# tax) would no longer match until `rlhf pretrain-demo` is run again.
def _corpus_task(rng: random.Random) -> tuple[str, str, str]:
    """(kind, prompt, answer) of one of the corpus' instruction kinds."""
    kind = rng.choice([k.name for k in KINDS] + ["next", "larger"])
    if kind == "next":
        n = rng.randrange(99)
        return kind, f"What number comes after {n}?", str(n + 1)
    if kind == "larger":
        a, b = rng.sample(range(100), 2)
        return kind, f"Which is larger, {a} or {b}?", str(max(a, b))
    instruction = next(k for k in KINDS if k.name == kind)
    args = instruction.draw(rng)
    return kind, instruction.template.format(*args), instruction.solve(*(str(a) for a in args))


def _fact(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randrange(10), rng.randrange(10)
        return f"{a} plus {b} is {a + b}."
    if kind == 1:
        n = rng.randrange(95)
        return "Counting on: " + " ".join(str(i) for i in range(n, n + rng.randint(3, 6))) + "."
    if kind == 2:
        a, b = rng.sample(range(100), 2)
        return f"{max(a, b)} is larger than {min(a, b)}."
    if kind == 3:
        w, n = rng.choice(WORDS), rng.randint(2, 4)
        return f"The word {w} {n} times is {' '.join([w] * n)}."
    words = rng.sample(WORDS, 3)
    if kind == 4:
        return f"The words {' '.join(words)} reversed are {' '.join(reversed(words))}."
    return f"In {' '.join(words)} the last word is {words[-1]}."


def _dialogue(rng: random.Random) -> str:
    """A loosely formatted exchange: the base model learns the chat shape, not the house style."""
    _, prompt, answer = _corpus_task(rng)
    style = rng.randrange(4)
    if style == 0:
        reply = answer
    elif style == 1:
        reply = f"It is {answer}, I think."
    elif style == 2:
        reply = ANSWER_TEMPLATE.format(answer=answer) + " " + " ".join(rng.sample(RAMBLES, 2))
    else:
        reply = " ".join(rng.sample(RAMBLES, 2))
    return format_prompt(prompt) + " " + reply


def pretraining_corpus(n_documents: int = 20000, seed: int = 0) -> list[str]:
    """Documents of facts, chatter and loose dialogues: the base model's 'internet'."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_documents):
        parts = []
        for _ in range(rng.randint(3, 7)):
            roll = rng.random()
            if roll < 0.6:
                parts.append(_fact(rng))
            elif roll < 0.8:
                parts.append(rng.choice(RAMBLES))
            else:
                parts.append(_dialogue(rng))
        docs.append(" ".join(parts))
    return docs


def heldout_corpus(n_documents: int = 300) -> list[str]:
    """Pretraining-style text the base never saw, to measure the alignment tax."""
    return pretraining_corpus(n_documents, seed=10_000)
