"""Process-wide resources shared by every page and every browser session (st.cache_resource):
the store, the one job manager, and an LRU cache of loaded policies for Rank and Chat.

Each getter is keyed by the database path, so a test (or a user) pointing RLHF_WORKBENCH_HOME
elsewhere gets its own store and manager.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import streamlit as st

from core import catalog
from core.runs.jobs import JobManager, new_run_id
from core.stages import STAGES
from core.paths import data_home
from core.data.store import Store
from core.textsafe import escape_markdown

# Checkpoints that can talk (a reward model only scores): the base and every policy stage's.
POLICY_KINDS = ("base", *(spec.checkpoint_kind for spec in STAGES.values() if spec.policy))
MAX_LOADED_MODELS = 3


@st.cache_resource(show_spinner=False)
def _store(db_path: str) -> Store:
    return Store(db_path)


@st.cache_resource(show_spinner=False)
def _jobs(db_path: str) -> JobManager:
    # Built once per process: this is where runs a previous server left running become `interrupted`.
    return JobManager(_store(db_path), runs_dir=Path(db_path).parent / "runs")


def db_path() -> str:
    return str(data_home() / "workbench.db")


def store() -> Store:
    return _store(db_path())


def jobs() -> JobManager:
    return _jobs(db_path())


class ModelCache:
    """Loaded (policy, tokenizer) pairs, least recently used evicted first.

    Keyed by directory and weight-file mtime, so a checkpoint rewritten in place (a resumed run's
    final model) is reloaded rather than served stale.
    """

    def __init__(self, capacity: int = MAX_LOADED_MODELS):
        self.capacity = capacity
        self._models: OrderedDict[tuple, tuple] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(ref: str) -> tuple:
        weights = sorted(Path(ref).glob("*.safetensors")) if Path(ref).is_dir() else []
        return (ref, max((w.stat().st_mtime_ns for w in weights), default=0))

    def get(self, ref: str):
        from core.models.loading import load_policy, load_tokenizer

        key = self._key(ref)
        with self._lock:  # one load at a time: two sessions asking for one model load it once
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            pair = (load_policy(ref).eval(), load_tokenizer(ref))
            self._models[key] = pair
            while len(self._models) > self.capacity:
                self._models.popitem(last=False)
            return pair

    def loaded(self) -> list[str]:
        with self._lock:
            return [k[0] for k in self._models]


@st.cache_resource(show_spinner=False)
def models() -> ModelCache:
    return ModelCache()


@st.cache_resource(show_spinner=False)
def _labeling_server(db_path: str):
    from core.labeling.server import LabelingServer  # imports gradio: only once the Labeling page opens

    return LabelingServer(_store(db_path))


def labeling_server():
    """The one Gradio labeling server of this app process (started and stopped on the Labeling page)."""
    return _labeling_server(db_path())


def policy_choices(db: Store) -> dict[str, str]:
    """Checkpoint label -> model reference for every policy one can sample from: the base, then final
    models, then every epoch/step checkpoint under its run ('<run> › epoch 2 (sft, step 250)')."""
    choices = {"bundled (base)": "bundled"}
    training = {}
    for kind in POLICY_KINDS:
        finals, steps = catalog.grouped(db.list_checkpoints(kind))
        for ckpt in finals:
            choices[f"{ckpt['name']} ({kind})"] = ckpt["path"]
        for ckpt in steps:
            training[f"{catalog.training_label(ckpt)} ({kind}, step {ckpt['step']})"] = ckpt["path"]
    return {**choices, **training}


def checkpoint_choices(db: Store, kind: str) -> dict[str, str]:
    """Checkpoint label -> directory for one kind, e.g. the SFT models an RM can start from: final models
    newest first, then each run's epoch/step checkpoints under the run's name."""
    finals, steps = catalog.grouped(db.list_checkpoints(kind))
    choices = {f"{c['name']} (step {c['step']})": c["path"] for c in reversed(finals)}
    choices.update({f"{catalog.training_label(c)} (step {c['step']})": c["path"] for c in reversed(steps)})
    return choices


def queue_job(kind: str, config, notice_key: str) -> str:
    """Submit a background job under a fresh run id, leaving its "Queued" notice in `notice_key` for
    the page to show after its rerun."""
    manager = jobs()
    run_id = new_run_id(kind)
    manager.submit(kind, config, run_id=run_id, output_dir=manager.runs_dir / run_id)
    st.session_state[notice_key] = f"Queued **{run_id}**"
    return run_id


def active_job_banner() -> None:
    """A one-line sidebar note about the job that is training, on every page."""
    owned = [j for j in jobs().jobs() if j.owned]
    with st.sidebar:
        for job in owned:
            # Drawn once per page run (no timer here, to keep every page light): progress lives on Train.
            st.caption(f"{job.stage} job **{job.run_id}** is {job.status}")


PAGES_DIR = Path(__file__).resolve().parent.parent / "pages"


def page(name: str) -> str:
    """The script path st.page_link / st.switch_page want for a page in pages/ (e.g. 'train')."""
    return str(PAGES_DIR / f"{name}.py")


def show_earlier_turns(turns: list[dict]) -> None:
    """The turns before a prompt's last user turn (a multi-turn prompt's context), as chat messages above
    it: the answers to rank or compare follow the whole conversation. Nothing for a single turn."""
    earlier = turns[:-1]
    if not earlier:
        return
    with st.container(border=True):
        st.caption(f"Earlier in this conversation ({len(earlier)} turns); the answers follow all of it")
        for turn in earlier:
            with st.chat_message(turn["role"] if turn["role"] != "system" else "assistant",
                                 avatar=":material/settings:" if turn["role"] == "system" else None):
                st.text(turn["content"])  # user and model text, never markup
        st.markdown(f"**User:** {escape_markdown(turns[-1]['content'])}")

