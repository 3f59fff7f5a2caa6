"""A small multi-turn dataset in two public shapes, for running every stage on a real chat model
(benchmarks/multiturn_smollm.sh): 40 pairs shaped like Anthropic HH-RLHF (raw transcripts, the better
answer decided by what the user said earlier), 40 ShareGPT conversations, their multi-turn prompts, and a
pretraining text file for ptx. Deterministic; written into the directory given.

    python -m benchmarks.multiturn_data OUT_DIR
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

PETS = ["cat", "dog", "parrot", "rabbit", "turtle", "hamster", "goldfish", "horse"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]
CITIES = ["Paris", "Lisbon", "Oslo", "Cairo", "Lima", "Tokyo", "Nairobi", "Quito"]


def facts(rng: random.Random) -> list[tuple[str, str, str]]:
    """(what the user says, the question asked later, the answer) triples."""
    pet, colour, city = rng.choice(PETS), rng.choice(COLOURS), rng.choice(CITIES)
    return [(f"I have a {pet} at home.", "Which animal do I have at home?", f"You have a {pet}."),
            (f"My favourite colour is {colour}.", "What is my favourite colour?", f"Your favourite colour is {colour}."),
            (f"I live in {city}.", "Which city do I live in?", f"You live in {city}.")]


def hh_row(rng: random.Random) -> dict:
    said, question, answer = rng.choice(facts(rng))
    wrong = answer.replace(said.split()[-1].rstrip("."), "something else")
    head = f"\n\nHuman: {said}\n\nAssistant: Thanks for telling me, I will remember that.\n\nHuman: {question}"
    return {"chosen": f"{head}\n\nAssistant: {answer}", "rejected": f"{head}\n\nAssistant: {wrong} I am not sure."}


def sharegpt_row(rng: random.Random) -> dict:
    turns = [{"from": "system", "value": "You are a helpful assistant with a good memory."}]
    for said, question, answer in rng.sample(facts(rng), 2):
        turns += [{"from": "human", "value": said}, {"from": "gpt", "value": "Noted, thank you."},
                  {"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"conversations": turns}


def write(out: Path, n: int = 40, seed: int = 0) -> None:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    hh = [hh_row(rng) for _ in range(n)]
    share = [sharegpt_row(rng) for _ in range(n)]
    (out / "hh.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hh))
    (out / "sharegpt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in share))
    prompts = [{"prompt": [{"role": "user", "content": said},
                           {"role": "assistant", "content": "Thanks for telling me, I will remember that."},
                           {"role": "user", "content": question}]}
               for said, question, _ in (rng.choice(facts(rng)) for _ in range(n))]
    (out / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    (out / "ptx.txt").write_text("\n".join(f"{said} {answer}" for said, _, answer in
                                           (rng.choice(facts(rng)) for _ in range(200))) + "\n")


if __name__ == "__main__":
    write(Path(sys.argv[1]))
