"""A bounded sample of PPO's rollouts, kept in the store for the Monitor page's rollout browser.

Per recorded step: every answer's reward (for the reward histogram, a batch of floats) and
`SAMPLES_PER_STEP` answers in full: prompt, response, reward, gold (demo prompts only), length, each
reward term's value (`reward/<term>`'s per answer), each reward-model ensemble member's score (an ensemble's
aggregate is the `rm` term's value) and, per response token, log pi - log pi_ref (k1, the per-token KL the
reward is penalised by).

Bounded: a run records its first and last step and every `stride`-th step in between, with
stride = ceil(num_steps / MAX_STEPS), so a 2,000-step run keeps about MAX_STEPS steps, at most
SAMPLES_PER_STEP answers each. A resumed run re-records a step in place (same key).

The tables live beside the store's own (same SQLite file, same connection rules); they are
created here, by the one module that writes and reads them.
"""

from __future__ import annotations

import json
import math

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
    kl REAL NOT NULL,                  -- sum over the answer's tokens of log pi - log pi_ref
    length INTEGER NOT NULL,           -- response tokens, EOS included
    finished INTEGER NOT NULL,         -- emitted EOS
    tokens TEXT NOT NULL,              -- JSON [[token text, log pi - log pi_ref], ...]
    members TEXT,                      -- JSON list: each reward-model ensemble member's score; NULL for one RM
    terms TEXT,                        -- JSON {term name: its unweighted value}; NULL in stores from before terms
    PRIMARY KEY (run_id, step, idx)
);
"""


_READY: set[str] = set()  # store files whose tables exist (executescript once per file and process)


def ensure_schema(store: Store) -> None:
    key = str(store.path)
    if key not in _READY:
        db = store._conn()
        db.executescript(SCHEMA)
        # Stores written before ensembles (or reward terms) lack the `members` (or `terms`) column: added empty,
        # the old rows read as one RM's (with no terms recorded).
        have = {row[1] for row in db.execute("PRAGMA table_info(rollouts)")}
        for column in ("members", "terms"):
            if column not in have:
                db.execute(f"ALTER TABLE rollouts ADD COLUMN {column} TEXT")
        _READY.add(key)


def stride(num_steps: int, max_steps: int = MAX_STEPS) -> int:
    return max(1, math.ceil(num_steps / max_steps))


def recorded(step: int, num_steps: int, max_steps: int = MAX_STEPS) -> bool:
    """Is `step` (1-based) one a run keeps? First, last and every stride-th."""
    return step == 1 or step == num_steps or step % stride(num_steps, max_steps) == 0


class RolloutRecorder:
    """Called once per PPO step from `core/stages/ppo.run`; a no-op without a store or run id."""

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

    def record(self, step: int, prompts: list[str], rollout) -> None:
        """`rollout` is ppo.Rollout: response_ids, response_mask, logprobs, ref_logprobs, reward_scores, texts,
        and (when present) term_scores (each reward term's values) and rm_members."""
        if self.store is None or not recorded(step, self.num_steps, self.max_steps):
            return
        rewards = rollout.reward_scores.detach().float().cpu().tolist()
        n = min(self.per_step, len(prompts))
        ids = rollout.response_ids[:n].detach().cpu().tolist()
        mask = rollout.response_mask[:n].detach().float().cpu()
        kl = ((rollout.logprobs[:n] - rollout.ref_logprobs[:n]).detach().float().cpu() * mask).tolist()
        finished = rollout.finished[:n].detach().cpu().tolist()
        members = getattr(rollout, "rm_members", None)  # (members, B); kept only for an ensemble
        members = members[:, :n].T.float().cpu().tolist() if members is not None and len(members) > 1 else None
        term_values = {name: values[:n].detach().float().cpu().tolist()
                       for name, values in (getattr(rollout, "term_scores", None) or {}).items()}
        rows = []
        for i in range(n):
            length = int(mask[i].sum())
            tokens = [[token_text(self.tokenizer, t), round(k, 5)] for t, k in zip(ids[i][:length], kl[i][:length])]
            prompt, text = prompts[i], rollout.texts[i]
            gold = demo.gold_score(prompt, text) if demo.expected_answer(prompt) is not None else None
            rows.append((self.run_id, step, i, prompt_display(prompt), text, rewards[i], gold, sum(k for _, k in tokens),
                         length, int(bool(finished[i])), json.dumps(tokens),
                         None if members is None else json.dumps([round(m, 4) for m in members[i]]),
                         json.dumps({name: round(v[i], 5) for name, v in term_values.items()})))
        with self.store._tx() as db:
            db.execute("INSERT OR REPLACE INTO rollout_steps(run_id, step, rewards) VALUES (?,?,?)",
                       (self.run_id, step, json.dumps([round(r, 5) for r in rewards])))
            db.execute("DELETE FROM rollouts WHERE run_id = ? AND step = ?", (self.run_id, step))
            db.executemany("""INSERT INTO rollouts(run_id, step, idx, prompt, response, reward, gold, kl, length,
                              finished, tokens, members, terms) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)""", rows)


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
    recorded)."""
    ensure_schema(store)
    rows = store._rows("""SELECT idx, prompt, response, reward, gold, kl, length, finished, tokens, members, terms
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
