"""A bounded sample of the third stage's rollouts (PPO's, GRPO's and RLOO's), kept in the store for the Monitor
page's rollout browser.

Per recorded step: every answer's reward (for the reward histogram, a batch of floats) and
`SAMPLES_PER_STEP` answers in full: prompt, response, reward, gold (demo prompts only), length, each
reward term's value (`reward/<term>`'s per answer), each reward-model ensemble member's score (an ensemble's
aggregate is the `rm` term's value) and, per response token, log pi - log pi_ref (k1, the per-token KL the
reward is penalised by). PPO records all of it (`RolloutRecorder.record`); GRPO and RLOO
(`core/stages/trl_bridge.GroupRollouts`) record the group advantage their update used and no KL (TRL computes
the policy's log-probs inside its loss, out of a reward function's sight): what a method does not give stays NULL.

Bounded: a run records its first and last step and every `stride`-th step in between, with
stride = ceil(num_steps / MAX_STEPS), so a 2,000-step run keeps about MAX_STEPS steps, at most
SAMPLES_PER_STEP answers each. A resumed run re-records a step in place (same key).

The tables live beside the store's own (same SQLite file, same connection rules); they are
created here, by the one module that writes and reads them.
"""

from __future__ import annotations

import functools
import json
import math
import sqlite3
from dataclasses import dataclass, field

from core.data import demo
from core.data.store import Store, prompt_display
from core.textsafe import token_text

SAMPLES_PER_STEP = 8
MAX_STEPS = 200

SCHEMA = """
CREATE TABLE IF NOT EXISTS rollout_steps (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step INTEGER NOT NULL,
    rewards TEXT NOT NULL,             -- JSON list: the reward (all terms) of every answer of the batch
    PRIMARY KEY (run_id, step)
);
CREATE TABLE IF NOT EXISTS rollouts (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    prompt TEXT NOT NULL,
    response TEXT NOT NULL,
    reward REAL NOT NULL,              -- the reward before the missing-EOS penalty (the `reward` metric)
    gold REAL,                         -- the demo labeler's score; NULL outside the demo task
    kl REAL,                           -- sum over the answer's tokens of log pi - log pi_ref; NULL: not measured
    length INTEGER NOT NULL,           -- response tokens, EOS included
    finished INTEGER NOT NULL,         -- emitted EOS
    tokens TEXT NOT NULL,              -- JSON [[token text, log pi - log pi_ref], ...]; [] where kl is NULL
    members TEXT,                      -- JSON list: each reward-model ensemble member's score; NULL for one RM
    terms TEXT,                        -- JSON {term name: its unweighted value}; NULL in stores from before terms
    advantage REAL,                    -- GRPO/RLOO: the answer's advantage in the update; NULL for PPO (per token)
    PRIMARY KEY (run_id, step, idx)
);
"""


_READY: set[str] = set()  # store files whose tables exist (executescript once per file and process)


def ensure_schema(store: Store) -> None:
    key = str(store.path)
    if key not in _READY:
        store._conn().executescript(SCHEMA)
        if _columns(store._conn(), "rollouts") != _current_columns():
            _upgrade(store)
        _READY.add(key)


def _columns(db: sqlite3.Connection, table: str) -> list[tuple]:
    return [(r[1], r[2], r[3]) for r in db.execute(f"PRAGMA table_info({table})")]  # name, type, NOT NULL


@functools.cache
def _current_columns() -> list[tuple]:
    """The rollouts table's columns as SCHEMA writes them today."""
    with sqlite3.connect(":memory:") as db:
        db.executescript(SCHEMA)
        return _columns(db, "rollouts")


def _upgrade(store: Store) -> None:
    """An older store's rollouts table rebuilt as SCHEMA writes it, its rows kept (a column it lacked reads NULL):
    stores from before ensembles lack `members`, before reward terms `terms`, before GRPO/RLOO's samples
    `advantage`, and held `kl` NOT NULL. SQLite cannot drop a NOT NULL in place, so the table is rebuilt
    (sqlite.org/lang_altertable.html, "making other kinds of changes"), in one transaction; nothing refers to it."""
    table = SCHEMA[SCHEMA.index("CREATE TABLE IF NOT EXISTS rollouts "):]
    with store._tx() as db:
        if _columns(db, "rollouts") == _current_columns():  # another process upgraded it meanwhile
            return
        old = {name for name, _, _ in _columns(db, "rollouts")}
        db.execute(table.replace("IF NOT EXISTS rollouts ", "rollouts_new ", 1))
        kept = ", ".join(name for name, _, _ in _columns(db, "rollouts_new") if name in old)
        db.execute(f"INSERT INTO rollouts_new({kept}) SELECT {kept} FROM rollouts")
        db.execute("DROP TABLE rollouts")
        db.execute("ALTER TABLE rollouts_new RENAME TO rollouts")


def stride(num_steps: int, max_steps: int = MAX_STEPS) -> int:
    return max(1, math.ceil(num_steps / max_steps))


def recorded(step: int, num_steps: int, max_steps: int = MAX_STEPS) -> bool:
    """Is `step` (1-based) one a run keeps? First, last and every stride-th."""
    return step == 1 or step == num_steps or step % stride(num_steps, max_steps) == 0


@dataclass
class Sample:
    """One kept answer as the rollouts table holds it. `prompt`: the prompt as the stage has it (a conversation as
    its turns); `tokens`: [[token text, log pi - log pi_ref]] ([] where not measured: `kl` None);
    `terms`: each reward term's unweighted value; `members`: each ensemble member's score (None for one RM);
    `advantage`: the answer's advantage in a group method's update (None for PPO's per-token advantages)."""

    prompt: str | list[dict]
    response: str
    reward: float
    length: int
    finished: bool
    tokens: list[list] = field(default_factory=list)
    kl: float | None = None
    members: list[float] | None = None
    terms: dict[str, float] = field(default_factory=dict)
    advantage: float | None = None


def kept_scores(rm_members, term_scores, n: int) -> tuple[list[list[float] | None], list[dict[str, float]]]:
    """The first `n` answers' scores as `Sample`s keep them: each ensemble member's (`rm_members`, (members, B);
    None each for one RM) and each reward term's value (`term_scores`, {term: (B,)}), one entry per answer."""
    if rm_members is not None and len(rm_members) > 1:
        members = rm_members[:, :n].T.detach().float().cpu().tolist()
    else:
        members = [None] * n
    values = {name: v[:n].detach().float().cpu().tolist() for name, v in (term_scores or {}).items()}
    return members, [{name: v[i] for name, v in values.items()} for i in range(n)]


class RolloutRecorder:
    """Writes a step's sample of a run's rollouts (`record` from `core/stages/ppo.run`, `write` from GRPO's and
    RLOO's `core/stages/trl_bridge.GroupRollouts`); a no-op without a store or run id."""

    def __init__(self, store: Store | None, run_id: str | None, num_steps: int, tokenizer,
                 per_step: int = SAMPLES_PER_STEP, max_steps: int = MAX_STEPS):
        self.store = store if store is not None and run_id else None
        self.run_id = run_id
        self.num_steps = num_steps
        self.tokenizer = tokenizer
        self.per_step = per_step
        self.max_steps = max_steps
        if self.store is not None:
            ensure_schema(self.store)

    def due(self, step: int, span: int = 1) -> bool:
        """Does the run keep a sample of the answers that train steps `step` .. `step + span - 1`? (A group
        method samples once for `span` steps: kept when any of them is a kept step.)"""
        last = min(self.num_steps, step + span - 1)
        return self.store is not None and any(recorded(s, self.num_steps, self.max_steps) for s in range(step, last + 1))

    def record(self, step: int, prompts: list[str], rollout) -> None:
        """`rollout` is ppo.Rollout: response_ids, response_mask, logprobs, ref_logprobs, reward_scores, texts,
        and (when present) term_scores (each reward term's values) and rm_members."""
        if not self.due(step):
            return
        rewards = rollout.reward_scores.detach().float().cpu().tolist()
        n = min(self.per_step, len(prompts))
        ids = rollout.response_ids[:n].detach().cpu().tolist()
        mask = rollout.response_mask[:n].detach().float().cpu()
        kl = ((rollout.logprobs[:n] - rollout.ref_logprobs[:n]).detach().float().cpu() * mask).tolist()
        finished = rollout.finished[:n].detach().cpu().tolist()
        members, terms = kept_scores(getattr(rollout, "rm_members", None), getattr(rollout, "term_scores", None), n)
        samples = []
        for i in range(n):
            length = int(mask[i].sum())
            tokens = [[token_text(self.tokenizer, t), round(k, 5)] for t, k in zip(ids[i][:length], kl[i][:length])]
            samples.append(Sample(prompts[i], rollout.texts[i], rewards[i], length, bool(finished[i]), tokens,
                                  kl=sum(k for _, k in tokens), members=members[i], terms=terms[i]))
        self.write(step, rewards, samples)

    def write(self, step: int, rewards: list[float], samples: list[Sample]) -> None:
        """The step's row: `rewards`, every answer's (the histogram), and the kept `samples` (the first
        `per_step`), each with the demo labeler's gold on a demo prompt."""
        if self.store is None:
            return
        rows = []
        for i, s in enumerate(samples[: self.per_step]):
            gold = demo.gold_score(s.prompt, s.response) if demo.expected_answer(s.prompt) is not None else None
            rows.append((self.run_id, step, i, prompt_display(s.prompt), s.response, s.reward, gold, s.kl, s.length,
                         int(s.finished), json.dumps(s.tokens),
                         None if s.members is None else json.dumps([round(m, 4) for m in s.members]),
                         json.dumps({name: round(v, 5) for name, v in s.terms.items()}), s.advantage))
        with self.store._tx() as db:
            db.execute("INSERT OR REPLACE INTO rollout_steps(run_id, step, rewards) VALUES (?,?,?)",
                       (self.run_id, step, json.dumps([round(r, 5) for r in rewards])))
            db.execute("DELETE FROM rollouts WHERE run_id = ? AND step = ?", (self.run_id, step))
            db.executemany("""INSERT INTO rollouts(run_id, step, idx, prompt, response, reward, gold, kl, length,
                              finished, tokens, members, terms, advantage) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)""",
                           rows)


# -- reading (the Monitor page) -------------------------------------------------------------------


def runs_with_rollouts(store: Store, run_ids: list[str]) -> list[str]:
    ensure_schema(store)
    if not run_ids:
        return []
    marks = ",".join("?" * len(run_ids))
    have = {r["run_id"] for r in store._rows(f"SELECT DISTINCT run_id FROM rollout_steps WHERE run_id IN ({marks})",
                                             run_ids)}
    return [r for r in run_ids if r in have]


def steps(store: Store, run_id: str) -> list[int]:
    ensure_schema(store)
    return [r["step"] for r in store._rows("SELECT step FROM rollout_steps WHERE run_id = ? ORDER BY step", (run_id,))]


def rewards(store: Store, run_id: str) -> dict[int, list[float]]:
    """Step -> every answer's reward (the total of its terms: the RM score when the reward is `rm`) in that
    step's batch (the histograms)."""
    ensure_schema(store)
    rows = store._rows("SELECT step, rewards FROM rollout_steps WHERE run_id = ? ORDER BY step", (run_id,))
    return {r["step"]: json.loads(r["rewards"]) for r in rows}


def samples(store: Store, run_id: str, step: int) -> list[dict]:
    """The step's kept answers, highest reward first; `tokens` as [(text, log pi - log pi_ref)]; `members`: each
    ensemble member's score (None for one RM); `terms`: {reward term: its unweighted value} ({} when not
    recorded); `kl` (and each token's value) and `advantage` None where the method did not give them."""
    ensure_schema(store)
    rows = store._rows("""SELECT idx, prompt, response, reward, gold, kl, length, finished, tokens, members, terms,
                                 advantage
                          FROM rollouts
                          WHERE run_id = ? AND step = ? ORDER BY reward DESC, idx""", (run_id, step))
    for r in rows:
        r["tokens"] = [tuple(t) for t in json.loads(r["tokens"])]
        r["finished"] = bool(r["finished"])
        r["members"] = json.loads(r["members"]) if r["members"] else None
        r["terms"] = json.loads(r["terms"]) if r["terms"] else {}
    return rows


def count(store: Store, run_id: str) -> dict[str, int]:
    ensure_schema(store)
    rows = store._rows("SELECT COUNT(DISTINCT step) AS steps, COUNT(*) AS samples FROM rollouts WHERE run_id = ?",
                       (run_id,))
    return rows[0]
