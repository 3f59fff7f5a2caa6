"""The labeling server: a Gradio app where signed-in labelers rank the items of their queue.

    rlhf label serve [--host 127.0.0.1] [--port 7860]

Safe defaults (docs/NOTES.md, "Team labeling"):

- **Sign-in always.** Gradio's login page checks the labeler accounts (scrypt hashes, in a worker
  thread so the event loop never waits on one); every request is also re-checked on the server
  (`LabelingStore.check_signed_in`), so a deactivated account stops at its next click. With no
  account there is nobody to sign in, so the server refuses to start.
- **Loopback by default.** `host` defaults to 127.0.0.1; another address is served only because
  it was asked for, and always behind the sign-in.
- **Nothing leaves the machine.** `share=False` (no gradio.live tunnel), analytics and the version
  check off (`analytics_enabled=False`, GRADIO_ANALYTICS_ENABLED=False), no MCP server, no PWA, no
  run history (which could otherwise offer to save runs to a Hugging Face bucket), server-side
  rendering off (no Node process), the default theme's fonts served from the package.
- **Server-side validation.** Every submission goes through `LabelingStore` (item exists, is in
  the labeler's queue and pending, K ranks forming a strict order); a refusal is a `gr.Error`
  with the reason and nothing is written.

API (`gradio_client` or plain HTTP at /gradio_api/call/<name>, after signing in): `/next_item`,
`/submit` (item_id, ranks), `/skip` (item_id), `/all_bad` (item_id, better_answer), `/progress`.
"""

from __future__ import annotations

import ipaddress
import os
import threading

# Before gradio is imported: its module-level code reads these.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Gradio's queue rebuilds a pandas summary of all its recent events after every event (for its
# monitoring page, which is off here): a cost that grows with every request. Rebuilt rarely instead.
os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "100000")

import anyio  # noqa: E402
import gradio as gr  # noqa: E402

from core.data.store import MAX_K, Store, prompt_display  # noqa: E402
from core.labeling.store import LabelingStore  # noqa: E402

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860
CONCURRENCY = 8  # requests of one endpoint handled at once (Gradio's default is 1)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_serve(labeling: LabelingStore, host: str) -> None:
    """Refuse to serve when nobody could sign in (the server always requires sign-in)."""
    if not isinstance(host, str) or not host.strip():
        raise ValueError("give the address to serve on (--host), e.g. 127.0.0.1")
    if not labeling.active_users():
        where = "on loopback" if is_loopback(host) else f"on {host} (beyond loopback)"
        raise ValueError(f"no labeler accounts: the labeling server requires sign-in and will not start {where} "
                         "without one; add one with `rlhf label add-user NAME` or on the Labeling page")


def _refuse(exc: ValueError):
    return gr.Error(str(exc), print_exception=False)


def build_app(labeling: LabelingStore) -> gr.Blocks:
    """The Gradio Blocks: the labeling UI plus the API endpoints, every one checking its caller."""

    def user(request: gr.Request | None) -> str:
        return labeling.check_signed_in(getattr(request, "username", None))

    # -- API endpoints (gradio_client or plain HTTP, after signing in) --------------------------

    def next_item(request: gr.Request) -> dict:
        """The caller's next pending item: {item_id, batch, prompt, answers, k, progress}; item_id None when done."""
        try:
            name = user(request)
            item = labeling.next_item(name) or {"item_id": None, "message": "Your queue is empty. Thank you!"}
            return {**item, "progress": (labeling.progress(name) or [{}])[0]}
        except ValueError as exc:
            raise _refuse(exc) from None

    def submit(item_id: int, ranks: list[int], request: gr.Request) -> dict:
        """Ranks 1..K (1 = best) for the item's answers in the order shown; one ranking is stored."""
        try:
            ranking_id = labeling.submit_ranking(user(request), item_id, ranks)
            return {"ok": True, "ranking_id": ranking_id}
        except ValueError as exc:
            raise _refuse(exc) from None

    def skip(item_id: int, request: gr.Request) -> dict:
        try:
            labeling.skip(user(request), item_id)
            return {"ok": True}
        except ValueError as exc:
            raise _refuse(exc) from None

    def all_bad(item_id: int, better_answer: str, request: gr.Request) -> dict:
        """Every answer is bad: the better answer is stored as a demonstration."""
        try:
            return {"ok": True, "demonstration_id": labeling.all_bad(user(request), item_id, better_answer)}
        except ValueError as exc:
            raise _refuse(exc) from None

    def progress(request: gr.Request) -> dict:
        try:
            return (labeling.progress(user(request)) or [{}])[0]
        except ValueError as exc:
            raise _refuse(exc) from None

    # -- UI -------------------------------------------------------------------------------------

    def show(request: gr.Request, note: str = ""):
        """Everything the page draws for the caller's next item."""
        try:
            name = user(request)
        except ValueError as exc:
            return [None, f"**{exc}**", "", gr.update(value="", visible=False), *[gr.update(visible=False)] * MAX_K,
                    *[gr.update(value=None)] * MAX_K, *[gr.update(value="")] * MAX_K, note]
        item = labeling.next_item(name)
        done = (labeling.progress(name) or [{}])[0]
        head = (f"Signed in as **{name}** · done {done.get('assigned', 0) - done.get('pending', 0)} of "
                f"{done.get('assigned', 0)} (ranked {done.get('ranked', 0)}, skipped {done.get('skipped', 0)}, "
                f"all bad {done.get('all_bad', 0)})")
        if item is None:
            return [None, head, "### Your queue is empty. Thank you!", gr.update(value="", visible=False),
                    *[gr.update(visible=False)] * MAX_K, *[gr.update(value=None)] * MAX_K,
                    *[gr.update(value="")] * MAX_K, note]
        k = item["k"]
        rows = [gr.update(visible=i < k) for i in range(MAX_K)]
        ranks = [gr.update(value=None, choices=list(range(1, k + 1))) for _ in range(MAX_K)]
        # Model text and prompts go into plain text boxes, never Markdown: nothing a model writes can
        # render as an image or link that makes the labeler's browser fetch something.
        texts = [gr.update(value=item["answers"][i] if i < k else "") for i in range(MAX_K)]
        intro = (f"Batch **{item['batch']}**, item {item['item_id']}. Give each answer a rank: **1 = best**, "
                 f"{k} = worst, no ties.")
        # A multi-turn prompt shows its whole conversation: the answers follow all of it.
        return [{"item_id": item["item_id"], "k": k}, head, intro,
                gr.update(value=prompt_display(item["turns"]) if len(item["turns"]) > 1 else item["prompt"],
                          visible=True),
                *rows, *ranks, *texts, note]

    def ui_submit(values: dict, request: gr.Request):
        """`values`: the shown item and the rank dropdowns (a set of inputs arrives as one dict)."""
        shown = values[item_state]
        if shown is None:
            return show(request, "Nothing to submit.")
        item_id, k = shown["item_id"], shown["k"]
        chosen = [values[r] for r in ranks[:k]]
        try:
            labeling.submit_ranking(user(request), item_id, [None if r in (None, "") else int(r) for r in chosen])
        except ValueError as exc:
            return [gr.update()] * (4 + 3 * MAX_K) + [f"**Not saved:** {exc}"]
        return show(request, f"Ranking of item {item_id} saved.")

    def ui_skip(shown, request: gr.Request):
        if shown is None:
            return show(request)
        item_id = shown["item_id"]
        try:
            labeling.skip(user(request), item_id)
        except ValueError as exc:
            return [gr.update()] * (4 + 3 * MAX_K) + [f"**Not skipped:** {exc}"]
        return show(request, f"Item {item_id} skipped.")

    def ui_all_bad(shown, better, request: gr.Request):
        if shown is None:
            return [*show(request), gr.update()]
        item_id = shown["item_id"]
        try:
            labeling.all_bad(user(request), item_id, better)
        except ValueError as exc:
            return [gr.update()] * (4 + 3 * MAX_K) + [f"**Not saved:** {exc}", gr.update()]
        return [*show(request, f"Item {item_id}: your answer was saved as a demonstration."), ""]

    with gr.Blocks(analytics_enabled=False, title="RLHF Workbench · labeling") as app:
        gr.Markdown("## Rank answers")
        item_state = gr.State(None)
        head = gr.Markdown()
        intro = gr.Markdown()
        prompt = gr.Textbox(label="Prompt", interactive=False, visible=False, max_lines=12)
        rows, ranks, texts = [], [], []
        for i in range(MAX_K):
            with gr.Row(visible=False) as row:
                texts.append(gr.Textbox(label=f"Answer {chr(65 + i)}", interactive=False, max_lines=12))
                ranks.append(gr.Dropdown(choices=list(range(1, MAX_K + 1)), value=None, label=f"rank of {chr(65 + i)}",
                                         scale=0, min_width=140))
            rows.append(row)
        with gr.Row():
            submit_button = gr.Button("Save ranking", variant="primary")
            skip_button = gr.Button("Skip")
        with gr.Accordion("All answers bad? Write a better one (it becomes a demonstration)", open=False):
            better = gr.Textbox(label="A good answer", lines=3)
            bad_button = gr.Button("All bad: save my answer")
        note = gr.Markdown()
        outputs = [item_state, head, intro, prompt, *rows, *ranks, *texts, note]
        # The UI's events are not API endpoints; the API is the gr.api functions below.
        app.load(show, inputs=None, outputs=outputs, api_visibility="private")
        submit_button.click(ui_submit, inputs={item_state, *ranks}, outputs=outputs, api_visibility="private")
        skip_button.click(ui_skip, inputs=[item_state], outputs=outputs, api_visibility="private")
        bad_button.click(ui_all_bad, inputs=[item_state, better], outputs=[*outputs, better], api_visibility="private")
        gr.api(next_item, api_name="next_item")
        gr.api(submit, api_name="submit")
        gr.api(skip, api_name="skip")
        gr.api(all_bad, api_name="all_bad")
        gr.api(progress, api_name="progress")
    # Labelers do not wait on each other: SQLite (WAL, one connection per thread, short IMMEDIATE
    # transactions) takes concurrent submissions, and each is a compare-and-set on its queue item.
    app.queue(default_concurrency_limit=CONCURRENCY)
    return app


class LabelingServer:
    """One labeling server per process (the CLI's, or the workbench's): start, address, stop."""

    def __init__(self, store: Store):
        self.labeling = LabelingStore(store)
        self._app: gr.Blocks | None = None
        self._lock = threading.Lock()
        self.url: str | None = None
        self.host: str | None = None

    @property
    def running(self) -> bool:
        return self._app is not None

    def _auth(self):
        labeling = self.labeling

        async def auth(username: str, password: str) -> bool:
            # scrypt takes tens of milliseconds: off the event loop, in a worker thread.
            return await anyio.to_thread.run_sync(labeling.verify, username, password)

        return auth

    def start(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> str:
        """Serve in background threads; returns the address. Refused without any account."""
        with self._lock:
            if self._app is not None:
                raise ValueError(f"the labeling server is already running at {self.url}")
            check_serve(self.labeling, host)
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise ValueError(f"port must be 1..65535, got {port!r}")
            app = build_app(self.labeling)
            try:
                _, local_url, _ = app.launch(
                    server_name=host, server_port=port, auth=self._auth(),
                    auth_message="Sign in with your labeler account.", share=False, prevent_thread_lock=True,
                    quiet=True, show_error=False, inbrowser=False, ssr_mode=False, mcp_server=False, pwa=False,
                    run_history=False, enable_monitoring=False, footer_links=[], max_threads=16)
            except OSError as exc:
                app.close(verbose=False)
                raise ValueError(f"could not serve on {host}:{port}: {exc}") from None
            self._app, self.host = app, host
            self.url = local_url if is_loopback(host) else f"http://{host}:{port}/"
            return self.url

    def stop(self) -> None:
        with self._lock:
            if self._app is not None:
                self._app.close(verbose=False)
            self._app, self.url, self.host = None, None, None

    def wait(self) -> None:
        """Block until interrupted (the CLI's `rlhf label serve`)."""
        if self._app is not None:
            self._app.block_thread()
