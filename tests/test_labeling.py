"""Team labeling: accounts, batches and assignment, the real Gradio server on loopback with
concurrent labelers through gradio_client, server-side refusals, agreement, the CLI.

Everything talks to 127.0.0.1 only; analytics are off in server and clients.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from core.data.store import Store
from core.labeling.agreement import agreement_report, kendall_tau, pairwise_agreement
from core.labeling.passwords import hash_password, verify_password
from core.labeling.store import LabelingStore

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

K = 4
PASSWORD = "correct horse {}"
LABELERS = ("ann", "bob", "cat", "dan")
PER_LABELER = 50


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(i: int, k: int = K) -> list[str]:
    return [f"answer {j} to prompt {i}" for j in range(k)]


# Each labeler's (deterministic) taste, as ranks of the K answers in the order shown: ann and bob
# agree (identity), cat reverses it, dan swaps the first two.
TASTE = {"ann": [1, 2, 3, 4], "bob": [1, 2, 3, 4], "cat": [4, 3, 2, 1], "dan": [2, 1, 3, 4]}
# Hand-computed on K = 4 (6 answer pairs): concordant pairs between two tastes.
CONCORDANT = {("ann", "bob"): 6, ("ann", "cat"): 0, ("ann", "dan"): 5, ("bob", "cat"): 0, ("bob", "dan"): 5,
              ("cat", "dan"): 1}


def client(url: str, name: str | None):
    from gradio_client import Client

    return Client(url, auth=(name, PASSWORD.format(name)) if name else None, verbose=False, analytics_enabled=False,
                  download_files=False)


class Labeler:
    """A labeler on Gradio's plain HTTP API (sign in at /login, then POST /gradio_api/call/<name>
    and read the event stream): the same endpoints gradio_client calls, about 10x less overhead
    per call on this 2-core machine, so four labelers can rank 50 items each in a few seconds."""

    def __init__(self, url: str, name: str):
        import httpx

        self.http = httpx.Client(base_url=url, timeout=60)
        reply = self.http.post("login", data={"username": name, "password": PASSWORD.format(name)})
        assert reply.status_code == 200, reply.text

    def call(self, endpoint: str, *data):
        reply = self.http.post(f"gradio_api/call/{endpoint}", json={"data": list(data)})
        reply.raise_for_status()
        event_id = reply.json()["event_id"]
        with self.http.stream("GET", f"gradio_api/call/{endpoint}/{event_id}") as stream:
            event = None
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    event = line.removeprefix("event:").strip()
                elif line.startswith("data:") and event in ("complete", "error"):
                    payload = json.loads(line.removeprefix("data:"))
                    if event == "error":
                        raise ValueError(payload["error"] if isinstance(payload, dict) else payload)
                    return payload[0]
        raise AssertionError(f"no result from {endpoint}")


@pytest.fixture
def labeling(store):
    lab = LabelingStore(store)
    for name in LABELERS:
        lab.add_user(name, PASSWORD.format(name))
    return lab


@pytest.fixture
def server(store, labeling):
    from core.labeling.server import LabelingServer

    srv = LabelingServer(store)
    url = srv.start("127.0.0.1", free_port())
    assert url.startswith("http://127.0.0.1:")
    yield srv
    srv.stop()


def counts(store: Store) -> tuple[int, int]:
    c = store.counts()
    return c["rankings"], c["demonstrations"]


def statuses(store: Store) -> list[tuple]:
    with sqlite3.connect(store.path) as db:
        return db.execute("SELECT item_id, labeler, status, ranking_id FROM label_assignments ORDER BY id").fetchall()


# -- agreement and passwords (no server) ----------------------------------------------------------


def test_agreement_figures_equal_a_hand_computed_example():
    # Item 1 (K = 3): x orders a > b > c, y orders b > a > c: pairs (a,b) differ, (a,c) and (b,c) agree.
    # Item 2 (K = 4): x and y identical; z reverses x: every pair differs.
    items = {
        1: {"x": ["a", "b", "c"], "y": ["b", "a", "c"]},
        2: {"x": ["p", "q", "r", "s"], "y": ["p", "q", "r", "s"], "z": ["s", "r", "q", "p"]},
        3: {"x": ["u", "v"]},  # one labeler only: not compared
    }
    assert pairwise_agreement(items[1]["x"], items[1]["y"]) == pytest.approx(2 / 3)
    assert kendall_tau(items[1]["x"], items[1]["y"]) == pytest.approx(1 / 3)  # (2 - 1) / 3
    assert kendall_tau(items[2]["x"], items[2]["z"]) == -1.0
    report = agreement_report(items)
    assert report["items"] == 2
    pairs = {p["labelers"]: p for p in report["pairs"]}
    # x-y: item 1 gives 2 of 3 pairs, item 2 gives 6 of 6 -> 8 / 9 pooled; tau mean of 1/3 and 1 = 2/3.
    assert pairs[("x", "y")]["agreement"] == pytest.approx(8 / 9)
    assert pairs[("x", "y")]["kendall_tau"] == pytest.approx(2 / 3)
    assert pairs[("x", "y")]["items"] == 2 and pairs[("x", "y")]["answer_pairs"] == 9
    assert (pairs[("x", "z")]["agreement"], pairs[("x", "z")]["kendall_tau"]) == (0.0, -1.0)
    # Overall: comparisons x-y(1): 2/3, x-y(2): 6/6, x-z(2): 0/6, y-z(2): 0/6 -> 8 / 21; tau (1/3 + 1 - 1 - 1) / 4.
    assert report["overall"]["agreement"] == pytest.approx(8 / 21)
    assert report["overall"]["kendall_tau"] == pytest.approx(-1 / 6)
    assert report["overall"]["comparisons"] == 4
    z = next(row for row in report["labelers"] if row["labeler"] == "z")
    assert (z["agreement"], z["comparisons"]) == (0.0, 2)
    with pytest.raises(ValueError, match="same distinct answers"):
        pairwise_agreement(["a", "b"], ["a", "c"])
    assert agreement_report({})["overall"]["agreement"] is None


def test_passwords_are_salted_scrypt_hashes_never_plain_text(store):
    one, two = hash_password("same password"), hash_password("same password")
    assert one != two and one.startswith("scrypt$") and "same password" not in one  # per-user salt
    assert verify_password("same password", one) and not verify_password("other password", one)
    assert not verify_password("anything", None) and not verify_password("x", "garbage")
    lab = LabelingStore(store)
    lab.add_user("ann", "a long password")
    raw = store.path.read_bytes() + (store.path.parent / "workbench.db-wal").read_bytes()
    assert b"a long password" not in raw
    assert lab.verify("ann", "a long password") and not lab.verify("ann", "wrong password")
    assert not lab.verify("nobody", "a long password")
    with pytest.raises(ValueError, match="8 to 200 characters"):
        lab.add_user("bob", "short")
    with pytest.raises(ValueError, match="labeler name"):
        lab.add_user("../evil", "a long password")
    lab.set_active("ann", False)
    assert not lab.verify("ann", "a long password")
    with pytest.raises(ValueError, match="deactivated"):
        lab.check_signed_in("ann")


def test_batch_from_given_answers_dedupes_skips_and_assigns_overlap(store, labeling):
    items = [(f"prompt {i}", answers(i)) for i in range(10)]
    items[3] = ("prompt 3", ["same", " same ", "other", "same"])  # duplicates merged -> K = 2
    items[7] = ("prompt 7", ["only one", "only one", ""])  # < 2 distinct: left out, said so
    result = labeling.create_batch("b1", items, overlap=0.5, per_overlap=3, seed=1)
    assert result.items == 9 and result.overlap_items == 4  # round(0.5 * 9)
    assert len(result.skipped) == 1 and "prompt 7" in result.skipped[0] and "1 distinct" in result.skipped[0]
    assert sum(result.assignments.values()) == 9 + 4 * 2  # an overlap item goes to 3 labelers
    assert max(result.assignments.values()) - min(result.assignments.values()) <= 1  # least loaded first
    per_item: dict[int, int] = {}
    for item_id, _, status, _ in statuses(store):
        per_item[item_id] = per_item.get(item_id, 0) + 1
        assert status == "pending"
    assert sorted(per_item.values()) == [1] * 5 + [3] * 4
    rows = store._rows("SELECT answers FROM label_items i JOIN prompts p ON p.id = i.prompt_id WHERE p.text = ?",
                       ("prompt 3",))
    assert json.loads(rows[0]["answers"]) == ["same", "other"]
    # Bad options: refused before anything is written.
    before = store._rows("SELECT COUNT(*) AS n FROM label_items")[0]["n"]
    for kwargs, message in [
        ({"name": "b1"}, "already exists"),
        ({"name": "b2", "labelers": ["ann", "zed"]}, "unknown or deactivated labeler"),
        ({"name": "b2", "overlap": 1.5}, "overlap"),
        ({"name": "b2", "labelers": ["ann"], "overlap": 0.2}, "at least 2 labelers"),
        ({"name": "b2", "per_overlap": 5}, "per_overlap"),
        ({"name": "bad/name"}, "batch name"),
    ]:
        with pytest.raises(ValueError, match=message):
            labeling.create_batch(items=items, **kwargs)
    with pytest.raises(ValueError, match="no item has 2 distinct answers"):
        labeling.create_batch("b3", [("p", ["x", "x"])])
    assert store._rows("SELECT COUNT(*) AS n FROM label_items")[0]["n"] == before


# -- the server ---------------------------------------------------------------------------------------


def test_four_concurrent_labelers_each_ranking_stored_once(store, labeling, server):
    """Four labelers rank their whole queues at once through the Gradio API; every ranking is stored
    once under its labeler, overlap items are collected from each assigned labeler, and agreement
    equals the figures computed by hand from the labelers' tastes."""
    n_items = 167  # 167 items + 33 overlap copies = 200 assignments = 50 per labeler
    result = labeling.create_batch("team", [(f"prompt {i}", answers(i)) for i in range(n_items)],
                                   overlap=0.2, per_overlap=2, seed=3)
    assert result.assignments == dict.fromkeys(LABELERS, PER_LABELER)
    clients = {name: Labeler(server.url, name) for name in LABELERS}
    submitted: dict[str, list[int]] = {name: [] for name in LABELERS}
    errors: list[BaseException] = []

    def work(name: str) -> None:
        try:
            c = clients[name]
            while True:
                item = c.call("next_item")
                if item["item_id"] is None:
                    return
                assert item["k"] == K and item["answers"] == answers(int(item["prompt"].split()[-1]))
                reply = c.call("submit", item["item_id"], TASTE[name])
                assert reply["ok"]
                submitted[name].append(item["item_id"])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in LABELERS]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    elapsed = time.perf_counter() - start
    assert not errors, errors
    print(f"\n4 labelers, {sum(map(len, submitted.values()))} rankings in {elapsed:.1f} s "
          f"({sum(map(len, submitted.values())) / elapsed:.1f} rankings/s)")

    rankings = store.list_rankings()
    assert len(rankings) == 4 * PER_LABELER
    by_labeler: dict[str, list[dict]] = {}
    for r in rankings:
        by_labeler.setdefault(r["labeler"], []).append(r)
    assert {n: len(rows) for n, rows in by_labeler.items()} == dict.fromkeys(LABELERS, PER_LABELER)
    assert {n: len(set(ids)) for n, ids in submitted.items()} == dict.fromkeys(LABELERS, PER_LABELER)
    # Each ranking is that labeler's taste applied to the item's answers, linked from its assignment.
    rows = statuses(store)
    assert all(status == "ranked" and ranking_id for _, _, status, ranking_id in rows)
    assert len({ranking_id for *_, ranking_id in rows}) == len(rows) == 4 * PER_LABELER
    ranking_by_id = {r["id"]: r for r in rankings}
    for item_id, name, _, ranking_id in rows:
        r = ranking_by_id[ranking_id]
        assert r["labeler"] == name
        i = int(r["prompt"].split()[-1])
        assert r["responses"] == [a for _, a in sorted(zip(TASTE[name], answers(i)))]
    # Overlap items: collected from each of their assigned labelers.
    per_item: dict[int, set[str]] = {}
    for item_id, name, _, _ in rows:
        per_item.setdefault(item_id, set()).add(name)
    shared = {i: names for i, names in per_item.items() if len(names) > 1}
    assert len(shared) == result.overlap_items == 33 and all(len(n) == 2 for n in shared.values())
    # Agreement against the hand-computed concordances of the tastes.
    report = labeling.agreement()
    assert report["items"] == 33
    pair_items: dict[tuple, int] = {}
    for names in shared.values():
        pair = tuple(sorted(names))
        pair_items[pair] = pair_items.get(pair, 0) + 1
    pairs = {p["labelers"]: p for p in report["pairs"]}
    assert set(pairs) == set(pair_items)
    for pair, n in pair_items.items():
        assert pairs[pair]["items"] == n
        assert pairs[pair]["agreement"] == pytest.approx(CONCORDANT[pair] / 6)
        assert pairs[pair]["kendall_tau"] == pytest.approx((2 * CONCORDANT[pair] - 6) / 6)
    total = sum(pair_items.values())
    assert report["overall"]["agreement"] == pytest.approx(
        sum(CONCORDANT[p] * n for p, n in pair_items.items()) / (6 * total))
    assert report["overall"]["kendall_tau"] == pytest.approx(
        sum((2 * CONCORDANT[p] - 6) / 6 * n for p, n in pair_items.items()) / total)
    progress = {row["labeler"]: row for row in labeling.progress()}
    assert all(progress[n]["ranked"] == PER_LABELER and progress[n]["pending"] == 0 for n in LABELERS)
    assert clients["ann"].call("next_item")["item_id"] is None
    with pytest.raises(ValueError, match="stale"):
        clients["ann"].call("submit", submitted["ann"][0], TASTE["ann"])


def test_refusals_write_nothing(store, labeling, server):
    """Not signed in, a tie, a wrong K, another labeler's item, a stale item, a missing item, a
    non-permutation, an empty 'all bad' answer and a deactivated account: each is refused with its
    reason and nothing is written."""
    import httpx
    from gradio_client.exceptions import AppError, AuthenticationError

    labeling.create_batch("b", [(f"prompt {i}", answers(i)) for i in range(6)], labelers=["ann", "bob"], overlap=0)
    ann, bob = client(server.url, "ann"), client(server.url, "bob")
    mine, theirs = ann.predict(api_name="/next_item"), bob.predict(api_name="/next_item")
    item = mine["item_id"]
    ann.predict(item, [1, 2, 3, 4], api_name="/submit")
    stale_item = item
    item = ann.predict(api_name="/next_item")["item_id"]
    before_counts, before_status = counts(store), statuses(store)

    # Without sign-in: no client, no API call, no page config.
    with pytest.raises(AuthenticationError):
        client(server.url, None)
    with pytest.raises(ValueError, match="Could not login"):  # a wrong password: Gradio answers 400
        from gradio_client import Client

        Client(server.url, auth=("ann", "wrong password!"), verbose=False, analytics_enabled=False)
    for path, body in (("gradio_api/call/submit", {"data": [item, [1, 2, 3, 4]]}),
                       ("gradio_api/queue/join", {"data": [item, [1, 2, 3, 4]], "fn_index": 1, "session_hash": "x"})):
        reply = httpx.post(server.url + path, json=body)
        assert reply.status_code == 401, (path, reply.status_code)
    assert httpx.get(server.url + "config").status_code == 401

    for call, message in [
        ((item, [1, 1, 2, 3]), "tie at rank 1"),
        ((item, [1, 2, 3]), "wrong K: item .* has K = 4 answers, got 3 ranks"),
        ((item, [1, 2, 3, 5]), r"ranks must be 1..4"),
        ((theirs["item_id"], [1, 2, 3, 4]), "not in your queue"),
        ((stale_item, [4, 3, 2, 1]), "stale: you already ranked it"),
        ((9999, [1, 2, 3, 4]), "no labeling item 9999"),
    ]:
        with pytest.raises(AppError, match=message):
            ann.predict(*call, api_name="/submit")
    with pytest.raises(AppError, match="write a better answer"):
        ann.predict(item, "   ", api_name="/all_bad")
    with pytest.raises(AppError, match="not in your queue"):
        ann.predict(theirs["item_id"], api_name="/skip")
    assert counts(store) == before_counts and statuses(store) == before_status

    # A deactivated account's open session is refused at its next request.
    labeling.set_active("bob", False)
    with pytest.raises(AppError, match="deactivated"):
        bob.predict(theirs["item_id"], [1, 2, 3, 4], api_name="/submit")
    assert counts(store) == before_counts and statuses(store) == before_status

    # The good paths still work afterwards: skip, and all bad -> a demonstration.
    ann.predict(item, api_name="/skip")
    nxt = ann.predict(api_name="/next_item")
    reply = ann.predict(nxt["item_id"], "The answer is 42.", api_name="/all_bad")
    demo = store.list_demonstrations()[-1]
    assert reply["demonstration_id"] == demo["id"]
    assert (demo["prompt"], demo["output"]) == (nxt["prompt"], "The answer is 42.")
    assert counts(store) == (before_counts[0], before_counts[1] + 1)
    progress = ann.predict(api_name="/progress")
    assert (progress["ranked"], progress["skipped"], progress["all_bad"]) == (1, 1, 1)


def test_a_double_submit_stores_one_ranking(store, labeling):
    """Two tabs submitting the same item at once: the compare-and-set lets exactly one through."""
    labeling.create_batch("b", [("prompt 0", answers(0))], labelers=["ann"], overlap=0)
    item = labeling.next_item("ann")["item_id"]
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def submit():
        barrier.wait()
        try:
            labeling.submit_ranking("ann", item, [1, 2, 3, 4])
            outcomes.append("ok")
        except ValueError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("ok") == 1 and all("stale" in o for o in outcomes if o != "ok")
    assert len(store.list_rankings()) == 1


def test_serving_needs_an_account_and_closed_batches_go_stale(store, labeling):
    from core.labeling.server import LabelingServer, check_serve, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    empty = LabelingStore(Store(store.path.parent / "other.db"))
    for host in ("127.0.0.1", "0.0.0.0"):
        with pytest.raises(ValueError, match="requires sign-in"):
            check_serve(empty, host)
    with pytest.raises(ValueError, match="requires sign-in and will not start on 0.0.0.0"):
        LabelingServer(Store(store.path.parent / "other.db")).start("0.0.0.0", free_port())
    check_serve(labeling, "127.0.0.1")
    result = labeling.create_batch("b", [("prompt 0", answers(0))], labelers=["ann"], overlap=0)
    item = labeling.next_item("ann")["item_id"]
    labeling.set_batch_status(result.batch_id, "closed")
    assert labeling.next_item("ann") is None
    with pytest.raises(ValueError, match="stale: batch 'b' is closed"):
        labeling.submit_ranking("ann", item, [1, 2, 3, 4])


# -- the CLI and sampling ---------------------------------------------------------------------------


def test_cli_add_user_batch_and_status(workbench_home, tmp_path, monkeypatch, capsys):
    from core.cli import main

    # No account yet: the server refuses to start (sign-in is always required), before binding anything.
    assert main(["label", "serve", "--host", "0.0.0.0"]) == 2
    assert "requires sign-in and will not start on 0.0.0.0" in capsys.readouterr().err
    typed = iter(["a long password", "a long password", "first try!", "second try"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(typed))
    assert main(["label", "add-user", "ann"]) == 0
    assert main(["label", "add-user", "bob"]) == 2  # the two typed passwords differ
    assert "differ" in capsys.readouterr().err
    assert main(["label", "add-user", "bob", "--password", "another long one"]) == 0
    lab = LabelingStore(Store())
    assert lab.verify("ann", "a long password") and lab.verify("bob", "another long one")
    rows = [{"prompt": f"prompt {i}", "responses": answers(i, 3)} for i in range(5)]
    rows.append({"prompt": "dupes", "responses": ["x", "x"]})
    path = tmp_path / "answers.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    capsys.readouterr()
    assert main(["label", "batch", "--name", "cli", "--answers", str(path), "--overlap", "0.4"]) == 0
    out = capsys.readouterr()
    summary = json.loads(out.out)
    assert (summary["items"], summary["overlap_items"], summary["skipped"]) == (5, 2, 1)
    assert "dupes" in out.err
    assert main(["label", "status"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["batches"][0]["name"] == "cli" and len(status["progress"]) == 2


def test_label_help_imports_neither_torch_nor_gradio():
    code = ("import sys\nfrom core.cli import main\n"
            "for argv in (['label', '--help'], ['label', 'serve', '--help'], ['label', 'batch', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules, 'gradio' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "--host" in out and out.strip().splitlines()[-1] == "False False"


def test_a_batch_sampled_from_the_bundled_model(store, labeling):
    from core.labeling.batches import sample_batch

    prompts = ["What is 2 plus 3?", "Repeat the word cat.", "Which is larger, 4 or 9?"]
    result = sample_batch(store, "sampled", prompts, model="bundled", k=4, temperature=1.0, overlap=0.34,
                          max_new_tokens=12, seed=0)
    assert result.items + len(result.skipped) == 3 and result.items >= 1
    batch = labeling.list_batches()[0]
    assert (batch["model"], batch["k"], batch["temperature"]) == ("bundled", 4, 1.0)
    for row in store._rows("SELECT answers FROM label_items"):
        shown = json.loads(row["answers"])
        assert 2 <= len(shown) <= 4 and len(set(shown)) == len(shown)  # deduplicated, as on the Rank page
    with pytest.raises(ValueError, match="already exists"):  # checked before sampling
        sample_batch(store, "sampled", prompts)


# -- the browser ----------------------------------------------------------------------------------


def test_a_labeler_in_a_real_browser_and_nothing_leaves_the_machine(store, labeling, server):
    """Headless Chromium signs in, sees model text as plain text (a markdown image stays text), ranks,
    is refused a tie, marks an item all bad with a better answer; every request goes to the server."""
    from pathlib import Path

    playwright_api = pytest.importorskip("playwright.sync_api")
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    trap = "![x](http://example.com/x.png) <img src=http://example.com/y.png>"
    labeling.create_batch("ui", [(f"What is {i} plus 1?", [f"The answer is {i + 1}.", f"It is {i}.", trap])
                                 for i in range(3)], labelers=["ann"], overlap=0)
    elsewhere: list[str] = []
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            page.on("request", lambda r: None if r.url.startswith((server.url, "data:", "blob:"))
                    else elsewhere.append(r.url))
            page.goto(server.url)
            page.locator("input").nth(0).fill("ann")
            page.locator("input").nth(1).fill(PASSWORD.format("ann"))
            page.get_by_role("button", name="Login").click()
            page.wait_for_selector("text=Signed in as", timeout=30_000)

            def rank(ranks):
                for i, r in enumerate(ranks):
                    page.get_by_label(f"rank of {chr(65 + i)}").click()
                    page.locator(f'li[role=option][aria-label="{r}"]:visible').first.click()
                    page.keyboard.press("Escape")
                page.get_by_role("button", name="Save ranking").click()

            assert page.get_by_label("Answer C").input_value() == trap  # shown as text, not rendered
            rank([1, 1, 2])
            page.wait_for_selector("text=Not saved", timeout=15_000)
            assert "tie at rank 1" in page.content()
            rank([2, 1, 3])
            page.wait_for_selector("text=Ranking of item 1 saved", timeout=15_000)
            page.get_by_text("All answers bad?").click()
            page.get_by_label("A good answer").fill("The answer is 2.")
            page.get_by_role("button", name="All bad: save my answer").click()
            page.wait_for_selector("text=saved as a demonstration", timeout=15_000)
        finally:
            browser.close()
    assert elsewhere == []
    assert [(r["labeler"], r["responses"]) for r in store.list_rankings()] == [
        ("ann", ["It is 0.", "The answer is 1.", trap])]
    assert store.list_demonstrations()[-1]["output"] == "The answer is 2."


# -- the workbench page ---------------------------------------------------------------------------


def test_labeling_page_accounts_batch_server_and_agreement(app, workbench_home):
    """The Labeling page: add an account (a bad password refused), sample a batch from the bundled
    model, start the server on loopback and stop it, then see progress and agreement."""
    from core.labeling.server import LabelingServer

    def button(at, label):
        return next(b for b in at.button if b.label == label)

    app.switch_page("../pages/labeling.py")
    app.run()
    assert not app.exception, app.exception
    store = Store(workbench_home / "workbench.db")
    labeling = LabelingStore(store)
    for name, password in (("ann", "short"), ("ann", PASSWORD.format("ann")), ("bob", PASSWORD.format("bob"))):
        app.text_input[0].input(name)
        app.text_input[1].input(password)
        button(app, "Add account or set its password").click().run()
        if password == "short":
            assert "8 to 200 characters" in " ".join(e.value for e in app.error)
            assert labeling.active_users() == []
    assert labeling.active_users() == ["ann", "bob"]

    store.add_prompts(["What is 2 plus 3?", "Repeat the word dog."], source="demo")
    app.run()
    app.text_input(key="label_batch_name").input("page-batch")
    app.slider(key="label_batch_overlap").set_value(1.0)
    button(app, "Sample and assign").click().run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    batch = labeling.list_batches()[0]
    assert batch["name"] == "page-batch" and batch["model"] == "bundled" and batch["items"] >= 1

    app.text_input(key="label_host").input("127.0.0.1")
    app.number_input(key="label_port").set_value(free_port())
    try:
        button(app, "Start the labeling server").click().run()
        assert any("Serving at http://127.0.0.1:" in s.value for s in app.success), [e.value for e in app.error]
        # Both labelers rank every shared item the same way: agreement 100 %, tau 1.
        for name in ("ann", "bob"):
            while (item := labeling.next_item(name)) is not None:
                labeling.submit_ranking(name, item["item_id"], list(range(1, item["k"] + 1)))
        button(app, "Stop the labeling server").click().run()
        assert any(b.label == "Start the labeling server" for b in app.button)
    finally:
        from workbench import resources

        server: LabelingServer = resources.labeling_server()
        server.stop()
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Pairwise agreement"] == "100%" and metrics["Kendall's τ"] == "1.00"


def test_reward_model_can_take_one_ranking_per_item(store, labeling):
    """Shared items give the RM several rankings of the same answers: all by default, or the first
    of each with RewardConfig.one_ranking_per_item."""
    from core.config import RewardConfig
    from core.data.sources import load_rankings, one_per_item

    labeling.create_batch("b", [(f"prompt {i}", answers(i)) for i in range(6)], labelers=["ann", "bob", "cat"],
                          overlap=0.5, per_overlap=3, seed=0)
    for name in ("ann", "bob", "cat"):
        while (item := labeling.next_item(name)) is not None:
            labeling.submit_ranking(name, item["item_id"], TASTE[name])
    rankings = load_rankings("store", store)
    assert len(rankings) == 3 + 3 * 3  # 3 items once, 3 shared items by all three labelers
    first = one_per_item(rankings)
    assert len(first) == 6 and [r.prompt for r in first] == list(dict.fromkeys(r.prompt for r in rankings))
    assert RewardConfig.from_dict({"one_ranking_per_item": True}).one_ranking_per_item
    assert RewardConfig().one_ranking_per_item is False
