"""Labeling: team labeling through the Gradio labeling server (core/labeling/).

Labeler accounts, labeling batches (K answers per prompt sampled once, a share of items given to
several labelers), the server's start/stop and address, progress per labeler, and agreement
(pairwise agreement and Kendall's tau) on items ranked by more than one labeler.
"""

import pandas as pd
import streamlit as st

from core.data.sources import as_prompt
from core.data.store import MAX_K, MIN_K, prompt_display
from core.labeling.store import LabelingStore
from workbench import resources

store = resources.store()
labeling = LabelingStore(store)
st.title("Labeling as a team")
st.caption("Labelers sign in to the labeling server from their own browsers and rank the answers of their queue; "
           "each submission is a ranking with their name, in the same store as the Rank page.")

# -- accounts ------------------------------------------------------------------------------------
users = labeling.list_users()
with st.expander(f"Labeler accounts ({len(users)})", expanded=not users):
    if users:
        st.dataframe(pd.DataFrame(users, columns=["name", "active"]), hide_index=True, width="stretch")
    with st.form("label_add_user", clear_on_submit=True):
        name_col, password_col = st.columns(2)
        new_name = name_col.text_input("Name (letters, digits, . _ -)")
        new_password = password_col.text_input("Password (8+ characters; stored as a scrypt hash)", type="password")
        if st.form_submit_button("Add account or set its password"):
            try:
                st.toast(f"Labeler {labeling.add_user(new_name, new_password)} can sign in.")
                st.rerun()
            except ValueError as exc:
                st.error(f"Not saved: {exc}")
    if users:
        toggle_col, button_col = st.columns([3, 1])
        who = toggle_col.selectbox("Account", [u["name"] for u in users], key="label_toggle_user")
        is_active = next(u["active"] for u in users if u["name"] == who)
        if button_col.button("Deactivate" if is_active else "Reactivate", key="label_toggle"):
            labeling.set_active(who, not is_active)
            st.rerun()

# -- the server ----------------------------------------------------------------------------------
server = resources.labeling_server()
st.subheader("Labeling server")
if server.running:
    st.success(f"Serving at {server.url} (sign-in required)")
    st.code(server.url, language=None)
    if st.button("Stop the labeling server"):
        server.stop()
        st.rerun()
else:
    host_col, port_col, start_col = st.columns([2, 1, 1])
    host = host_col.text_input("Address", "127.0.0.1", key="label_host",
                               help="127.0.0.1 serves this machine only; 0.0.0.0 serves your network (sign-in "
                                    "is always required, no share link is ever made)")
    port = port_col.number_input("Port", 1024, 65535, 7860, key="label_port")
    if start_col.button("Start the labeling server", type="primary"):
        try:
            with st.spinner("Starting"):
                server.start(host.strip(), int(port))
            st.rerun()
        except ValueError as exc:
            st.error(f"Not started: {exc}")

# -- batches -------------------------------------------------------------------------------------
st.subheader("Labeling batches")
prompts = store.list_prompts()
active = labeling.active_users()
with st.expander("New batch: sample K answers per prompt once, so every labeler ranks the same answers",
                 expanded=not labeling.list_batches()):
    if not prompts or not active:
        st.info("A batch needs prompts (Prompts page) and at least one labeler account.")
    else:
        by_id = {p["id"]: as_prompt(p["turns"]) for p in prompts}  # a multi-turn prompt: its whole conversation
        choices = resources.policy_choices(store)
        left, right = st.columns([2, 1])
        batch_name = left.text_input("Batch name", key="label_batch_name")
        picked = left.multiselect("Prompts (none picked: all)", list(by_id), key="label_batch_prompts",
                                  format_func=lambda i: f"#{i} · {prompt_display(by_id[i])[-90:]}")
        model_label = left.selectbox("Checkpoint to sample from", list(choices), key="label_batch_model")
        who_labels = left.multiselect("Labelers", active, default=active, key="label_batch_labelers")
        k = right.number_input("Answers per prompt (K)", MIN_K, MAX_K, 4, key="label_batch_k")
        temperature = right.slider("Temperature", 0.1, 2.0, 1.0, 0.1, key="label_batch_temperature")
        overlap = right.slider("Share of items for several labelers", 0.0, 1.0, 0.2, 0.05, key="label_batch_overlap",
                               help="agreement is measured on these items")
        per_overlap = right.number_input("Labelers per shared item", 2, max(2, len(who_labels)), 2,
                                         key="label_batch_per_overlap")
        if st.button("Sample and assign", type="primary"):
            from core.labeling.batches import sample_batch

            texts = [by_id[i] for i in picked] if picked else list(by_id.values())
            try:
                with st.spinner(f"Sampling {int(k)} answers for {len(texts)} prompts"):
                    result = sample_batch(store, batch_name.strip(), texts, choices[model_label], int(k),
                                          float(temperature), who_labels, float(overlap), int(per_overlap))
                st.success(f"Batch {result.name}: {result.items} items, {result.overlap_items} shared; "
                           + ", ".join(f"{n}: {c}" for n, c in result.assignments.items()))
                for line in result.skipped:
                    st.caption(f"Left out {line}")
            except ValueError as exc:
                st.error(f"No batch made: {exc}")

batches = labeling.list_batches()
if batches:
    st.dataframe(pd.DataFrame(batches, columns=["id", "name", "model", "k", "temperature", "overlap", "items",
                                                "assigned", "done", "status"]), hide_index=True, width="stretch")
    pick_col, close_col = st.columns([3, 1])
    batch_ids = [None, *[b["id"] for b in batches]]
    names = {b["id"]: b for b in batches}
    batch_id = pick_col.selectbox("Progress and agreement of", batch_ids, key="label_view_batch",
                                  format_func=lambda i: "all batches" if i is None else names[i]["name"])
    if batch_id is not None:
        closed = names[batch_id]["status"] == "closed"
        if close_col.button("Reopen batch" if closed else "Close batch", key="label_close"):
            labeling.set_batch_status(batch_id, "open" if closed else "closed")
            st.rerun()

    # -- progress and agreement ------------------------------------------------------------------
    st.subheader("Progress per labeler")
    st.dataframe(pd.DataFrame(labeling.progress(batch_id=batch_id),
                              columns=["labeler", "assigned", "pending", "ranked", "skipped", "all_bad"]),
                 hide_index=True, width="stretch")
    st.subheader("Agreement")
    report = labeling.agreement(batch_id)
    if not report["items"]:
        st.info("No item has been ranked by two labelers yet.")
    else:
        overall = report["overall"]
        a, b, c = st.columns(3)
        a.metric("Pairwise agreement", f"{overall['agreement']:.0%}", help="share of answer pairs two labelers "
                 "ordered the same way (InstructGPT's labelers: about 73 %)")
        b.metric("Kendall's τ", f"{overall['kendall_tau']:.2f}", help="mean over items and labeler pairs, -1..1")
        c.metric("Items ranked by 2+ labelers", report["items"])
        pairs = pd.DataFrame([{"labelers": " – ".join(p["labelers"]), "items": p["items"],
                               "agreement": p["agreement"], "kendall_tau": p["kendall_tau"]} for p in report["pairs"]])
        st.dataframe(pairs, hide_index=True, width="stretch")
        st.caption("Each labeler against all others:")
        st.dataframe(pd.DataFrame(report["labelers"], columns=["labeler", "comparisons", "agreement", "kendall_tau"]),
                     hide_index=True, width="stretch")
