"""End to end in a real browser: the real `streamlit run` server, headless Chromium via Playwright.

Open the app, add a prompt, launch a tiny SFT job, see its curve on the Monitor page, chat with the
result. Run the demo pipeline (a tiny one: RLHF_WORKBENCH_PIPELINE_OVERRIDES, read by the app's
pipeline job for tests only) and watch it on the Monitor page without reloading: SFT's curve, then
PPO's, the rollout browser, then Home's results card. Every request the browser makes is recorded:
none may go to another host than the app's own. A screenshot of every step lands in test-artifacts/
(gitignored).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import json
import re
from urllib.parse import urlparse

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                 "--disable-component-update", "--disable-sync", "--disable-quic"]

playwright_api = pytest.importorskip("playwright.sync_api")
if not Path(CHROMIUM).exists():
    pytest.skip("Debian's chromium is not installed (.ci/run installs it)", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    """The app as a user starts it, on loopback, with its own data directory, offline."""
    port = free_port()
    env = {**os.environ, "RLHF_WORKBENCH_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1",
           "RLHF_WORKBENCH_PIPELINE_OVERRIDES": json.dumps(TINY_PIPELINE)}
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "workbench/app.py", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("streamlit did not start:\n" + (tmp_path / "server.log").read_text())
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.copy(tmp_path / "server.log", ARTIFACTS / "server.log") if ARTIFACTS.is_dir() else None


@pytest.fixture
def page(server):
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1400, "height": 1500})
        requests: list[str] = []
        context.on("request", lambda request: requests.append(request.url))
        tab = context.new_page()
        tab.set_default_timeout(60_000)
        tab.requests = requests
        tab.goto(server)
        yield tab
        browser.close()


def assert_only_local_requests(page, server: str) -> None:
    """Nothing leaves the machine: every request went to the app's own host and port (or is inline data)."""
    own = urlparse(server).netloc
    foreign = [u for u in page.requests if urlparse(u).scheme in ("http", "https", "ws", "wss")
               and urlparse(u).netloc != own]
    assert page.requests and not foreign, foreign


def shot(page, name: str) -> None:
    page.wait_for_timeout(300)  # let the last rerun paint
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def idle(page) -> None:
    """Wait until streamlit's script run finished (the 'Running...' status widget disappears)."""
    page.wait_for_timeout(200)
    page.locator("[data-testid='stStatusWidget']").wait_for(state="hidden")


def go(page, title: str) -> float:
    """Switch page from the sidebar; returns the seconds until the page's title is drawn."""
    start = time.perf_counter()
    page.get_by_test_id("stSidebarNav").get_by_text(title, exact=True).click()
    page.get_by_role("heading", level=1).filter(has_text=HEADINGS[title]).wait_for()
    return time.perf_counter() - start


# The app's demo pipeline, shrunk so the browser test stays short (quick preset, then these overrides).
TINY_PIPELINE = {
    "sft": {"epochs": 1, "n_demonstrations": 320, "eval_prompts": 16},
    "rm": {"n_prompts": 48, "heldout_prompts": 16, "epochs": 1},
    "ppo": {"total_episodes": 96, "batch_size": 16, "response_length": 12, "eval_prompts": 16},
    "eval_prompts": 16,
}

HEADINGS = {"Home": "RLHF Workbench", "Prompts": "Prompts and demonstrations", "Train": "Train",
            "Monitor": "Monitor", "Chat": "Chat", "Rank": "Rank answers"}


def set_number(page, label: str, value) -> None:
    box = page.get_by_role("spinbutton", name=label, exact=True)
    box.fill(str(value))
    box.press("Enter")
    idle(page)


def test_first_session_in_a_browser(page, server):
    page.get_by_role("heading", name="RLHF Workbench").wait_for()
    page.get_by_text("Nothing trained yet").wait_for()
    shot(page, "01-home")

    switch_seconds = [go(page, "Prompts")]
    page.get_by_role("textbox", name="New prompt").fill("What is 3 plus 4?")
    page.get_by_role("button", name="Add prompt").click()
    page.get_by_text("Prompt added.").wait_for()
    shot(page, "02-prompt-added")

    switch_seconds.append(go(page, "Train"))
    set_number(page, "epochs", 1)
    set_number(page, "n_demonstrations", 64)
    set_number(page, "eval_prompts", 8)
    run_name = page.get_by_role("textbox", name="Run name (optional)")
    run_name.fill("e2e-sft")
    run_name.press("Enter")
    idle(page)
    page.get_by_role("button", name="Launch").click()
    page.get_by_text("Launched").wait_for()
    shot(page, "03-sft-launched")

    switch_seconds.append(go(page, "Monitor"))
    # The run is preselected; its first chart appears once the stage has logged a step.
    page.locator(".js-plotly-plot").first.wait_for(timeout=120_000)
    shot(page, "04-monitor-curve")

    # Wait for the job to finish (the Train page's job table says done), then chat with the result.
    switch_seconds.append(go(page, "Train"))
    page.get_by_text("`done`").or_(page.get_by_text("sft · done")).first.wait_for(timeout=120_000)
    switch_seconds.append(go(page, "Chat"))
    page.get_by_test_id("stSelectbox").first.click()
    page.get_by_role("option", name="e2e-sft (sft)").click()
    idle(page)
    chat = page.get_by_test_id("stChatInputTextArea")
    chat.fill("What is 3 plus 4?")
    start = time.perf_counter()
    chat.press("Enter")
    answer = page.get_by_test_id("stChatMessage").nth(1).get_by_test_id("stMarkdownContainer").first
    answer.wait_for()
    page.wait_for_function("el => el.innerText.trim().length > 0", arg=answer.element_handle())
    first_token = time.perf_counter() - start
    page.get_by_test_id("stChatMessage").nth(1).get_by_text("e2e-sft (sft)").wait_for()
    shot(page, "05-chat")
    print(f"page switches (s): {[round(s, 2) for s in switch_seconds]}; first answer text after {first_token:.2f} s")
    assert_only_local_requests(page, server)


def plot_titled(page, title: str):
    """A Plotly chart whose title is exactly `title`."""
    return page.locator(".js-plotly-plot").filter(has=page.locator("text.gtitle", has_text=re.compile(f"^{title}$")))


def test_watch_the_demo_pipeline_without_reloading(page, server):
    page.get_by_role("heading", name="RLHF Workbench").wait_for()
    go(page, "Train")
    page.get_by_role("button", name="Run demo pipeline").click()
    page.get_by_text("Queued").wait_for()

    go(page, "Monitor")  # from the sidebar: the page is never reloaded from here on
    page.get_by_text(re.compile(r"^Pipeline pipeline-")).wait_for()
    shot(page, "06-monitor-pipeline-started")
    plot_titled(page, "sft_loss").wait_for(timeout=600_000)  # generous: a loaded CI machine
    shot(page, "07-monitor-sft-curve")
    plot_titled(page, "reward").wait_for(timeout=900_000)
    shot(page, "08-monitor-ppo-curve")

    page.get_by_role("tab", name="Rollouts").click()
    page.get_by_text("highest reward first").wait_for(timeout=60_000)
    page.get_by_text(re.compile(r"^reward [+-]\d")).first.wait_for()
    shot(page, "09-monitor-rollouts")

    page.get_by_role("tab", name="Curves").click()
    page.get_by_text(re.compile(r"^Pipeline pipeline-.* · done$")).wait_for(timeout=900_000)
    idle(page)  # the last refresh may still hold the previous draw of the charts beside the new one
    plot_titled(page, "reward").first.wait_for()
    shot(page, "10-monitor-pipeline-done")

    go(page, "Home")
    page.get_by_text("Gold: SFT → PPO-ptx").wait_for()
    page.get_by_text("Alignment tax (pretraining loss)").wait_for()
    # Wait for the card's table and charts to be drawn: a shot taken earlier showed their loading frames.
    page.get_by_test_id("stTable").get_by_text("PPO without ptx", exact=True).wait_for()
    page.locator(".js-plotly-plot .bars path").first.wait_for(state="attached")
    idle(page)
    shot(page, "11-home-results")
    go(page, "Prompts")  # the demo's data is in the store, for the user to see and extend
    shot(page, "12-prompts-demo-data")
    assert_only_local_requests(page, server)
