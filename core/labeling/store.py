"""Team labeling in the workbench's SQLite file: labeler accounts, labeling batches, each
labeler's queue, submissions and agreement.

A **batch** holds prompts with K answers each, fixed when the batch is made (sampled once, or
given), so every labeler ranks the same answers. Each item goes to one labeler, or, for a share
`overlap` of the items, to `per_overlap` labelers, which is what agreement is measured on. A
labeler's **queue** is their pending assignments, oldest batch first.

A submission is checked whole before anything is written (signed-in account, the item exists,
is in that labeler's queue and still pending, K ranks forming a strict order 1..K); then one
transaction marks the assignment done and writes the ranking (`Store.insert_ranking`, labeler
set) into the same `rankings` table as the Rank page, so the reward model trains on it
unchanged. The assignment is claimed with a compare-and-set on its status inside that
transaction, so a double submit from two tabs writes one ranking and refuses the other as stale.
"All bad" plus a better answer writes a demonstration instead (`Store.insert_demonstration`).

The tables live beside the store's own (created here with CREATE TABLE IF NOT EXISTS, so an
existing workbench.db gains them on first use).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field

from core.data.store import (
    MAX_K, MAX_RESPONSE_CHARS, MIN_K, Store, check_conversation, check_ranking, check_ranks,
    as_prompt, check_text, prompt_turns,
)
from core.labeling.agreement import agreement_report
from core.labeling.passwords import check_password, hash_password, verify_password
from core.paths import validate_name

SCHEMA = """
CREATE TABLE IF NOT EXISTS labelers (
    name TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,        -- scrypt$n$r$p$salt$key (core/labeling/passwords.py)
    active INTEGER NOT NULL DEFAULT 1,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS label_batches (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    model TEXT NOT NULL DEFAULT '',     -- the checkpoint the answers were sampled from ('' = given)
    k INTEGER NOT NULL,
    temperature REAL,
    overlap REAL NOT NULL,
    per_overlap INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'open', -- open | closed (a closed batch's pending items are stale)
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS label_items (
    id INTEGER PRIMARY KEY,
    batch_id INTEGER NOT NULL REFERENCES label_batches(id) ON DELETE CASCADE,
    prompt_id INTEGER NOT NULL REFERENCES prompts(id) ON DELETE CASCADE,
    answers TEXT NOT NULL,              -- JSON list of distinct answers, in display order
    position INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS label_assignments (
    id INTEGER PRIMARY KEY,
    item_id INTEGER NOT NULL REFERENCES label_items(id) ON DELETE CASCADE,
    labeler TEXT NOT NULL REFERENCES labelers(name),
    status TEXT NOT NULL DEFAULT 'pending', -- pending | ranked | skipped | all_bad
    ranking_id INTEGER REFERENCES rankings(id) ON DELETE SET NULL,
    demonstration_id INTEGER REFERENCES demonstrations(id) ON DELETE SET NULL,
    updated_at REAL NOT NULL,
    UNIQUE (item_id, labeler)
);
CREATE INDEX IF NOT EXISTS label_items_by_batch ON label_items(batch_id, position);
CREATE INDEX IF NOT EXISTS label_assignments_by_labeler ON label_assignments(labeler, status);
"""

DONE_STATUSES = ("ranked", "skipped", "all_bad")


@dataclass
class BatchResult:
    batch_id: int
    name: str
    items: int
    overlap_items: int
    assignments: dict[str, int]  # labeler -> items assigned
    skipped: list[str] = field(default_factory=list)  # why an item was left out, one line each


def distinct_answers(answers: list[str]) -> list[str]:
    """Identical answers cannot be ranked strictly: keep the first of each (stripped, non-empty)."""
    return [a for a in dict.fromkeys(str(a).strip() for a in answers) if a]


class LabelingStore:
    """The labeling tables of one workbench store (same file, same connection settings)."""

    def __init__(self, store: Store):
        self.store = store
        # executescript commits any open transaction itself, so it runs outside `_tx`.
        store._conn().executescript(SCHEMA)

    def _tx(self):
        return self.store._tx()

    def _rows(self, sql: str, args=()) -> list[dict]:
        return self.store._rows(sql, args)

    # -- accounts ------------------------------------------------------------------------------

    def add_user(self, name: str, password: str) -> str:
        """Create a labeler account, or set a new password (and re-activate) an existing one."""
        name = validate_name(name, "labeler name")
        stored = hash_password(check_password(password))
        with self._tx() as db:
            db.execute("""INSERT INTO labelers(name, password_hash, active, created_at) VALUES (?,?,1,?)
                          ON CONFLICT(name) DO UPDATE SET password_hash = excluded.password_hash, active = 1""",
                       (name, stored, time.time()))
        return name

    def set_active(self, name: str, active: bool) -> None:
        """Deactivating an account refuses its sign-in and every request it makes from then on."""
        with self._tx() as db:
            if db.execute("UPDATE labelers SET active = ? WHERE name = ?", (int(active), name)).rowcount == 0:
                raise ValueError(f"no labeler named {name!r}")

    def list_users(self) -> list[dict]:
        return self._rows("SELECT name, active, created_at FROM labelers ORDER BY name")

    def active_users(self) -> list[str]:
        return [u["name"] for u in self.list_users() if u["active"]]

    def verify(self, name, password) -> bool:
        """Sign-in check: an active account whose scrypt hash matches."""
        rows = self._rows("SELECT password_hash FROM labelers WHERE name = ? AND active = 1",
                          (str(name or "").strip(),)) if isinstance(name, str) else []
        return verify_password(password, rows[0]["password_hash"] if rows else None)

    def check_signed_in(self, name) -> str:
        """Every request of the labeling server passes through here: no name, or an account that is
        gone or deactivated, is refused."""
        if not name or not isinstance(name, str):
            raise ValueError("not signed in: sign in with your labeler account first")
        if not self._rows("SELECT 1 FROM labelers WHERE name = ? AND active = 1", (name,)):
            raise ValueError(f"labeler account {name!r} does not exist or is deactivated")
        return name

    # -- batches -------------------------------------------------------------------------------

    def check_batch_options(self, name: str, labelers: list[str] | None, overlap: float, per_overlap: int,
                            k: int | None = None) -> tuple[str, list[str]]:
        """The options of a batch, checked before any answer is sampled; returns (name, labelers)."""
        name = validate_name(name, "batch name")
        labelers = list(dict.fromkeys(labelers if labelers is not None else self.active_users()))
        if not labelers:
            raise ValueError("no labelers: add accounts first (rlhf label add-user NAME), then make the batch")
        active = set(self.active_users())
        unknown = [n for n in labelers if n not in active]
        if unknown:
            raise ValueError(f"unknown or deactivated labeler(s): {', '.join(unknown)}")
        if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 <= overlap <= 1:
            raise ValueError(f"overlap is the share of items ranked by several labelers, 0..1; got {overlap!r}")
        if overlap > 0:
            if len(labelers) < 2:
                raise ValueError("overlap needs at least 2 labelers (agreement compares two of them); "
                                 "set overlap to 0 or add labelers")
            if isinstance(per_overlap, bool) or not isinstance(per_overlap, int) or not 2 <= per_overlap <= len(labelers):
                raise ValueError(f"per_overlap (labelers per overlap item) must be 2..{len(labelers)}, got {per_overlap!r}")
        if k is not None and not MIN_K <= int(k) <= MAX_K:
            raise ValueError(f"K must be {MIN_K}..{MAX_K}, got {k}")
        if self._rows("SELECT 1 FROM label_batches WHERE name = ?", (name,)):
            raise ValueError(f"a labeling batch named {name!r} already exists; pick another name")
        return name, labelers

    def create_batch(self, name: str, items: list[tuple[str, list[str]]], labelers: list[str] | None = None,
                     overlap: float = 0.2, per_overlap: int = 2, model: str = "", k: int | None = None,
                     temperature: float | None = None, seed: int = 0) -> BatchResult:
        """A batch from prompts and their answers (given, or sampled by `core.labeling.batches`).

        Duplicate answers are merged; an item with fewer than 2 distinct answers is left out and
        said so in `skipped`. A share `overlap` of the items goes to `per_overlap` labelers each,
        the rest to one, the least loaded first. Everything is checked before one transaction
        writes the batch, its items (prompts created as needed) and the assignments."""
        name, labelers = self.check_batch_options(name, labelers, overlap, per_overlap, k)
        checked: list[tuple[tuple[list[dict] | None, str], list[str]]] = []
        skipped: list[str] = []
        for number, (prompt, answers) in enumerate(items, 1):
            # A prompt is its text or a whole conversation ending with the user turn to answer.
            try:
                context, prompt = check_conversation(prompt, f"item {number}: prompt")
            except ValueError as exc:
                raise ValueError(f"item {number}: {exc}") from None
            if not isinstance(answers, (list, tuple)):
                raise ValueError(f"item {number}: answers must be a list")
            distinct = distinct_answers(list(answers))
            if len(distinct) < MIN_K:
                skipped.append(f"item {number} ({prompt[:60]!r}): {len(distinct)} distinct answer(s) of "
                               f"{len(answers)}; a ranking needs at least {MIN_K}")
                continue
            try:
                checked.append(((context, prompt), check_ranking(distinct)))
            except ValueError as exc:
                raise ValueError(f"item {number}: {exc}") from None
        if not checked:
            raise ValueError("no item has 2 distinct answers to rank: nothing to label"
                             + (f" ({'; '.join(skipped[:3])})" if skipped else ""))
        rng = random.Random(seed)
        order = list(range(len(checked)))
        rng.shuffle(order)
        overlapping = set(order[:round(overlap * len(checked))])
        load = dict.fromkeys(labelers, 0)
        plan: list[list[str]] = []
        for i in range(len(checked)):
            count = per_overlap if i in overlapping else 1
            ties = {n: rng.random() for n in labelers}
            chosen = sorted(labelers, key=lambda n: (load[n], ties[n]))[:count]
            for n in chosen:
                load[n] += 1
            plan.append(chosen)
        now = time.time()
        with self._tx() as db:
            if db.execute("SELECT 1 FROM label_batches WHERE name = ?", (name,)).fetchone():
                raise ValueError(f"a labeling batch named {name!r} already exists; pick another name")
            batch_id = db.execute(
                """INSERT INTO label_batches(name, model, k, temperature, overlap, per_overlap, created_at)
                   VALUES (?,?,?,?,?,?,?)""",
                (name, str(model or ""), int(k or max(len(a) for _, a in checked)), temperature, float(overlap),
                 int(per_overlap), now)).lastrowid
            for position, ((prompt, answers), chosen) in enumerate(zip(checked, plan)):
                prompt_id = Store._prompt_id(db, prompt[1], "labeling", prompt[0])
                item_id = db.execute(
                    "INSERT INTO label_items(batch_id, prompt_id, answers, position) VALUES (?,?,?,?)",
                    (batch_id, prompt_id, json.dumps(answers), position)).lastrowid
                db.executemany("INSERT INTO label_assignments(item_id, labeler, updated_at) VALUES (?,?,?)",
                               [(item_id, n, now) for n in chosen])
        return BatchResult(batch_id, name, len(checked), len(overlapping), load, skipped)

    def list_batches(self) -> list[dict]:
        return self._rows(
            """SELECT b.id, b.name, b.model, b.k, b.temperature, b.overlap, b.per_overlap, b.status, b.created_at,
                      (SELECT COUNT(*) FROM label_items i WHERE i.batch_id = b.id) AS items,
                      (SELECT COUNT(*) FROM label_assignments a JOIN label_items i ON i.id = a.item_id
                       WHERE i.batch_id = b.id AND a.status != 'pending') AS done,
                      (SELECT COUNT(*) FROM label_assignments a JOIN label_items i ON i.id = a.item_id
                       WHERE i.batch_id = b.id) AS assigned
               FROM label_batches b ORDER BY b.id""")

    def set_batch_status(self, batch_id: int, status: str) -> None:
        """Close a batch (its pending items become stale) or reopen it."""
        if status not in ("open", "closed"):
            raise ValueError(f"a batch is 'open' or 'closed', not {status!r}")
        with self._tx() as db:
            if db.execute("UPDATE label_batches SET status = ? WHERE id = ?", (status, batch_id)).rowcount == 0:
                raise ValueError(f"no labeling batch with id {batch_id}")

    # -- the queue -----------------------------------------------------------------------------

    _ITEM = """SELECT i.id AS item_id, i.answers, p.text AS prompt, p.context, b.name AS batch, b.status AS batch_status,
                      a.id AS assignment_id, a.status
               FROM label_items i JOIN label_batches b ON b.id = i.batch_id JOIN prompts p ON p.id = i.prompt_id
               LEFT JOIN label_assignments a ON a.item_id = i.id AND a.labeler = ?"""

    def next_item(self, labeler: str) -> dict | None:
        """The labeler's next pending item (oldest open batch first), or None when the queue is empty."""
        labeler = self.check_signed_in(labeler)
        rows = self._rows(self._ITEM + """ WHERE a.status = 'pending' AND b.status = 'open'
                                           ORDER BY b.id, i.position LIMIT 1""", (labeler,))
        if not rows:
            return None
        row = rows[0]
        answers = json.loads(row["answers"])
        context = json.loads(row["context"]) if row["context"] else None
        return {"item_id": row["item_id"], "batch": row["batch"], "prompt": row["prompt"],
                "turns": prompt_turns(row["prompt"], context), "answers": answers, "k": len(answers)}

    def _pending_item(self, labeler, item_id) -> dict:
        """The item, checked to exist, to be in this labeler's queue and to still be pending."""
        labeler = self.check_signed_in(labeler)
        if isinstance(item_id, bool) or not isinstance(item_id, int):
            try:
                item_id = int(str(item_id).strip())
            except ValueError:
                raise ValueError(f"item id must be a whole number, got {item_id!r}") from None
        rows = self._rows(self._ITEM + " WHERE i.id = ?", (labeler, item_id))
        if not rows:
            raise ValueError(f"no labeling item {item_id}")
        row = rows[0]
        if row["assignment_id"] is None:
            raise ValueError(f"item {item_id} is not in your queue ({labeler}); it was assigned to other labelers")
        if row["status"] != "pending":
            raise ValueError(f"item {item_id} is stale: you already {row['status'].replace('_', ' ')} it "
                             "(one submission per item)")
        if row["batch_status"] != "open":
            raise ValueError(f"item {item_id} is stale: batch {row['batch']!r} is closed")
        row["answers"] = json.loads(row["answers"])
        row["item_id"] = item_id
        return row

    def _claim(self, db, item: dict, status: str, **links) -> None:
        """Compare-and-set pending -> status inside the caller's transaction."""
        sets = "".join(f", {column} = ?" for column in links)
        claimed = db.execute(
            f"UPDATE label_assignments SET status = ?, updated_at = ?{sets} WHERE id = ? AND status = 'pending'",
            (status, time.time(), *links.values(), item["assignment_id"])).rowcount
        if claimed != 1:
            raise ValueError(f"item {item['item_id']} is stale: it was submitted meanwhile (one submission per item)")

    def submit_ranking(self, labeler, item_id, ranks) -> int:
        """Ranks 1..K (1 = best), one per answer in the order shown. Returns the ranking's id."""
        item = self._pending_item(labeler, item_id)
        answers = item["answers"]
        if not isinstance(ranks, (list, tuple)):
            raise ValueError(f"ranks must be a list of {len(answers)} whole numbers (1 = best)")
        if len(ranks) != len(answers):
            raise ValueError(f"wrong K: item {item['item_id']} has K = {len(answers)} answers, got {len(ranks)} ranks")
        if any(isinstance(r, bool) or not isinstance(r, int) for r in ranks):
            if any(r is None or r == "" for r in ranks):
                raise ValueError("give every answer a rank (1 = best)")
            raise ValueError(f"ranks must be whole numbers 1..{len(answers)}, got {list(ranks)}")
        check_ranks(list(ranks), len(answers))
        ordered = check_ranking([a for _, a in sorted(zip(ranks, answers))])
        with self._tx() as db:
            self._claim(db, item, "ranked")
            ranking_id = Store.insert_ranking(db, self._prompt_id_of(db, item["item_id"]), ordered, labeler)
            db.execute("UPDATE label_assignments SET ranking_id = ? WHERE id = ?", (ranking_id, item["assignment_id"]))
        return ranking_id

    def skip(self, labeler, item_id) -> None:
        item = self._pending_item(labeler, item_id)
        with self._tx() as db:
            self._claim(db, item, "skipped")

    def all_bad(self, labeler, item_id, better_answer) -> int:
        """Every answer is bad: nothing to order, so the labeler's better answer becomes a
        demonstration for SFT. Returns the demonstration's id."""
        item = self._pending_item(labeler, item_id)
        if not isinstance(better_answer, str) or not better_answer.strip():
            raise ValueError("all bad: write a better answer (it becomes a demonstration); nothing was stored")
        row = {"instruction": item["prompt"], "input": "", "output": check_text(better_answer, "better answer",
                                                                             MAX_RESPONSE_CHARS),
               "context": json.loads(item["context"]) if item["context"] else None}  # the turns it answers after
        Store._check_demonstration(row)
        with self._tx() as db:
            self._claim(db, item, "all_bad")
            demo_id = Store.insert_demonstration(db, row, "labeling")
            db.execute("UPDATE label_assignments SET demonstration_id = ? WHERE id = ?",
                       (demo_id, item["assignment_id"]))
        return demo_id

    @staticmethod
    def _prompt_id_of(db, item_id: int) -> int:
        return db.execute("SELECT prompt_id FROM label_items WHERE id = ?", (item_id,)).fetchone()[0]

    # -- progress and agreement ----------------------------------------------------------------

    def progress(self, labeler: str | None = None, batch_id: int | None = None) -> list[dict]:
        """Per labeler: assigned, pending, ranked, skipped, all_bad (open and closed batches)."""
        where, args = [], []
        if labeler is not None:
            where.append("a.labeler = ?")
            args.append(labeler)
        if batch_id is not None:
            where.append("i.batch_id = ?")
            args.append(batch_id)
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        return self._rows(
            f"""SELECT a.labeler, COUNT(*) AS assigned,
                       SUM(a.status = 'pending') AS pending, SUM(a.status = 'ranked') AS ranked,
                       SUM(a.status = 'skipped') AS skipped, SUM(a.status = 'all_bad') AS all_bad
                FROM label_assignments a JOIN label_items i ON i.id = a.item_id {clause}
                GROUP BY a.labeler ORDER BY a.labeler""", args)

    def item_rankings(self, batch_id: int | None = None) -> dict[int, dict[str, list[str]]]:
        """item id -> {labeler: their ranking (best first)} for every ranked assignment still in the store."""
        clause, args = ("AND i.batch_id = ?", (batch_id,)) if batch_id is not None else ("", ())
        rows = self._rows(
            f"""SELECT a.item_id, a.labeler, r.responses FROM label_assignments a
                JOIN label_items i ON i.id = a.item_id JOIN rankings r ON r.id = a.ranking_id
                WHERE a.status = 'ranked' {clause} ORDER BY a.item_id, a.labeler""", args)
        items: dict[int, dict[str, list[str]]] = {}
        for row in rows:
            items.setdefault(row["item_id"], {})[row["labeler"]] = json.loads(row["responses"])
        return items

    def ranked_items(self, batch_id: int) -> list[dict]:
        """{prompt (its earlier turns included), responses} of a batch's ranked items, one ranking per item (its first, when several
        labelers ranked it), in the batch's order: what a round of iterated RLHF trains on."""
        rows = self._rows(
            """SELECT i.id, p.text AS prompt, p.context, r.responses FROM label_items i JOIN prompts p ON p.id = i.prompt_id
               JOIN label_assignments a ON a.item_id = i.id JOIN rankings r ON r.id = a.ranking_id
               WHERE i.batch_id = ? AND a.status = 'ranked' ORDER BY i.position, a.id""", (batch_id,))
        first = {row["id"]: row for row in reversed(rows)}  # the earliest assignment of each item wins
        # The whole conversation the answers follow, as a stage takes it (a single turn stays plain text).
        return [{"prompt": as_prompt(prompt_turns(first[i]["prompt"], json.loads(first[i]["context"] or "null"))),
                 "responses": json.loads(first[i]["responses"])}
                for i in dict.fromkeys(row["id"] for row in rows)]

    def agreement(self, batch_id: int | None = None) -> dict:
        """Pairwise agreement and Kendall's tau on items ranked by >= 2 labelers (core/labeling/agreement.py)."""
        return agreement_report(self.item_rankings(batch_id))
