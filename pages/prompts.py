"""Prompts: edit prompts and demonstrations in tables; import and export JSONL/CSV; generate a reasoning-gym set.

Edits are validated in full before any is written, so a bad cell changes nothing. A prompt row's other columns
(an `answer`, a set's `metadata`: what reward terms check against) are shown beside it, read-only.
"""

import json

import pandas as pd
import streamlit as st

from core.data import task_sets
from core.data.formats import (export_csv, export_jsonl, import_file, import_source, parse_columns, parse_rows,
                               preview, read_source)
from core.data.store import MAX_PROMPT_CHARS, Store, check_text, prompt_display
from workbench import resources

store = resources.store()
st.title("Prompts and demonstrations")


def apply_prompt_edits(original: pd.DataFrame, delta: dict) -> str:
    """Apply a data_editor delta to the prompts table: check every change, then write them in one transaction."""
    edits = {int(original.iloc[i]["id"]): check_text(row.get("text"), f"prompt in row {i + 1}", MAX_PROMPT_CHARS)
             for i, row in delta["edited_rows"].items() if "text" in row}
    added = [check_text(row.get("text"), "new prompt", MAX_PROMPT_CHARS) for row in delta["added_rows"] if row]
    deleted = [int(original.iloc[i]["id"]) for i in delta["deleted_rows"]]
    store.update_prompts(edits, added=added, deleted=deleted)
    return f"{len(edits)} edited, {len(added)} added, {len(deleted)} deleted"


def apply_demonstration_edits(original: pd.DataFrame, delta: dict) -> str:
    columns = ("instruction", "input", "output")
    edits = {}
    for i, change in delta["edited_rows"].items():
        row = {c: original.iloc[i][c] for c in columns} | change
        Store._check_demonstration(row)
        edits[int(original.iloc[i]["id"])] = row
    added = [{c: row.get(c) or "" for c in columns} for row in delta["added_rows"] if row]
    for row in added:
        Store._check_demonstration(row)
    deleted = [int(original.iloc[i]["id"]) for i in delta["deleted_rows"]]
    for demo_id, row in edits.items():
        store.update_demonstration(demo_id, row["instruction"], row["output"], row["input"])
    if added:
        store.add_demonstrations(added)
    for demo_id in deleted:
        store.delete_demonstration(demo_id)
    return f"{len(edits)} edited, {len(added)} added, {len(deleted)} deleted"


def editable_table(name: str, frame: pd.DataFrame, column_config: dict, apply) -> None:
    """A data_editor plus a Save button that applies its pending edits all at once."""
    st.data_editor(frame, key=f"{name}_editor", num_rows="dynamic", hide_index=True,
                   column_config=column_config, width="stretch")
    if st.button(f"Save {name} changes", key=f"save_{name}"):
        try:
            st.session_state["prompts_notice"] = ("success", apply(frame, st.session_state[f"{name}_editor"]))
            del st.session_state[f"{name}_editor"]
            st.rerun()
        except ValueError as exc:
            st.error(f"Nothing saved: {exc}")


def cell(value) -> str:
    """An extra column's value as table text: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def gym_spec(name: str, size: int, seed: int, options: str) -> str:
    """The `reasoning-gym:NAME:size=N:seed=S[:OPTION=VALUE ...]` source `rlhf import` takes; its parser judges it."""
    spec = f"{task_sets.PREFIX}{name.strip()}:size={size}:seed={seed}"
    return spec + (f":{options.strip().strip(':')}" if options.strip() else "")


notice = st.session_state.pop("prompts_notice", None)
if notice:
    getattr(st, notice[0])(notice[1])

prompts_tab, demos_tab, files_tab = st.tabs(["Prompts", "Demonstrations", "Import / export"])

with prompts_tab:
    with st.form("add_prompt", clear_on_submit=True, border=False):
        new_prompt = st.text_area("New prompt", height=80, placeholder="What is 3 plus 4?")
        if st.form_submit_button("Add prompt", type="primary"):
            try:
                store.add_prompt(new_prompt)
                st.session_state["prompts_notice"] = ("success", "Prompt added.")
                st.rerun()
            except ValueError as exc:
                st.error(f"Not added: {exc}")
    stored = store.list_prompts()
    # Every extra column any prompt has, in the order first seen; keyed apart from the table's own columns.
    extras = list(dict.fromkeys(k for p in stored for k in p["extra"]))
    prompts = pd.DataFrame([{**p, "earlier_turns": len(p["turns"]) - 1,
                             **{f"extra:{k}": cell(p["extra"][k]) if k in p["extra"] else None for k in extras}}
                            for p in stored],
                           columns=["id", "text", "earlier_turns", "source", *(f"extra:{k}" for k in extras),
                                    "demonstrations", "rankings"])
    st.caption(f"{len(prompts)} prompts. Edit a cell, add rows at the bottom, select rows to delete; then save."
               + (f" Other columns (read-only, what reward terms check against): {', '.join(extras)}."
                  if extras else ""))
    editable_table("prompts", prompts, {
        **{f"extra:{k}": st.column_config.TextColumn(k, disabled=True, help="imported with the prompt")
           for k in extras},
        "id": st.column_config.NumberColumn("id", disabled=True),
        "text": st.column_config.TextColumn("prompt", max_chars=MAX_PROMPT_CHARS, width="large"),
        "earlier_turns": st.column_config.NumberColumn(
            "earlier turns", disabled=True, help="Turns of the conversation before this prompt (its last user turn); "
                                                 "editing the prompt keeps them"),
        "source": st.column_config.TextColumn(disabled=True),
        "demonstrations": st.column_config.NumberColumn(disabled=True),
        "rankings": st.column_config.NumberColumn(disabled=True),
    }, apply_prompt_edits)

with demos_tab:
    demos = pd.DataFrame(store.list_demonstrations(), columns=["id", "instruction", "input", "output"])
    st.caption(f"{len(demos)} demonstrations: an instruction (plus optional input) and the answer a person wrote.")
    editable_table("demonstrations", demos, {
        "id": st.column_config.NumberColumn("id", disabled=True),
        "instruction": st.column_config.TextColumn(width="medium"),
        "input": st.column_config.TextColumn(width="small"),
        "output": st.column_config.TextColumn(width="large"),
    }, apply_demonstration_edits)

with files_tab:
    st.markdown("**Import** JSONL, CSV or Parquet in the shapes public datasets use (README: Data formats): "
                "`messages`, ShareGPT `conversations`, `prompt`+`completion` or `instruction`/`input`/`output` for "
                "demonstrations; `prompt`+`responses` (best first), `prompt`+`chosen`+`rejected`, or `chosen`+"
                "`rejected` alone (HH-RLHF transcripts, conversational implicit prompts) for rankings; `prompt` "
                "alone for prompts. Prompts may be whole conversations. A file with any bad row imports nothing.")
    upload = st.file_uploader("File", type=["jsonl", "json", "csv", "parquet"], key="import_file")
    mapping_text = st.text_input("Column mapping (optional)", key="import_columns", placeholder="prompt=question,chosen=good",
                                 help="Rename your file's columns to the ones above first: ours=yours, comma-separated")
    if upload is not None:
        # The preview reads and checks every row, and writes nothing: the Import button does.
        try:
            columns = parse_columns(mapping_text)
            seen = preview(parse_rows(upload.getvalue(), upload.name), upload.name, columns)
        except ValueError as exc:
            seen = None
            st.error(f"Cannot import {upload.name}: {exc}")
        if seen:
            st.caption(f"{seen['rows']} rows, detected shape **{seen['shape']}** → {seen['kind']}"
                       + (f"; columns mapped: {', '.join(f'{k}={v}' for k, v in columns.items())}" if columns else ""))
            st.dataframe(pd.DataFrame([{
                "prompt": prompt_display(r.get("prompt") or [*(r.get("context") or []),
                                                             {"role": "user", "content": r["instruction"]}]),
                "answers": " | ".join(r.get("responses") or [r.get("output") or ""]),
                "extra": json.dumps(r.get("extra") or {}) if r.get("extra") else ""} for r in seen["first"]]),
                hide_index=True, key="import_preview")
    if st.button("Import", disabled=upload is None, type="primary"):
        try:
            kind, n = import_file(store, upload.getvalue(), upload.name, parse_columns(mapping_text))
            st.session_state["prompts_notice"] = ("success", f"Imported {n} {kind} from {upload.name}.")
            st.rerun()
        except ValueError as exc:
            st.error(f"Nothing imported. {exc}")

    st.markdown("**Generate a reasoning-gym set** (an optional extra: `pip install 'rlhf-workbench[verifiers]'`): "
                "procedural tasks (arithmetic, counting, simple puzzles) made here from a seed, each prompt with its "
                "`answer` and the `metadata` its own scorer reads (the `reasoning_gym` reward term).")
    with st.form("gym_form", border=False):
        name_col, size_col, seed_col = st.columns([3, 1, 1])
        gym_name = name_col.selectbox("Dataset", task_sets.EXAMPLES, key="gym_name", accept_new_options=True,
                                      help="a suggestion, or type any of reasoning-gym's dataset names")
        gym_size = size_col.number_input("Size", 1, task_sets.MAX_SIZE, task_sets.DEFAULT_SIZE, key="gym_size")
        gym_seed = seed_col.number_input("Seed", 0, 2**31 - 1, 0, key="gym_seed")
        gym_options = st.text_input("Options (optional)", key="gym_options", placeholder="max_terms=2:max_digits=1",
                                    help="fields of the dataset's own config, key=value separated by ':'")
        if st.form_submit_button("Preview set"):
            spec = gym_spec(gym_name or "", int(gym_size), int(gym_seed), gym_options)
            try:  # generates and checks every row, writes nothing: the Import button below does
                st.session_state["gym_preview"] = (spec, preview(read_source(spec), spec))
            except ValueError as exc:
                st.session_state.pop("gym_preview", None)
                st.error(f"Cannot generate {spec}: {exc}")
    if gym := st.session_state.get("gym_preview"):
        spec, seen = gym
        st.caption(f"`{spec}`: {seen['rows']} rows → {seen['kind']}, first {len(seen['first'])}:")
        st.dataframe(pd.DataFrame([{"prompt": prompt_display(r["prompt"]),
                                    "answer": (r.get("extra") or {}).get("answer")} for r in seen["first"]]),
                     hide_index=True, key="gym_preview_table")
        if st.button(f"Import {seen['rows']} prompts", type="primary", key="gym_import"):
            try:
                kind, n = import_source(store, spec)
                st.session_state.pop("gym_preview")
                st.session_state["prompts_notice"] = ("success", f"Imported {n} {kind} from {spec}.")
                st.rerun()
            except ValueError as exc:
                st.error(f"Nothing imported. {exc}")
        st.caption(f"Same from a terminal: `rlhf import {spec}`")

    st.markdown("**Export**")
    kind_col, format_col = st.columns(2)
    kind = kind_col.selectbox("What", ["demonstrations", "rankings", "pairs", "prompts"],
                              help="pairs: every ranking expanded to its chosen/rejected pairs")
    fmt = format_col.radio("Format", ["JSONL", "CSV"], horizontal=True)
    data = export_jsonl(store, kind) if fmt == "JSONL" else export_csv(store, kind)
    st.download_button(f"Download {kind}.{fmt.lower()}", data, file_name=f"{kind}.{fmt.lower()}",
                       mime="application/jsonl" if fmt == "JSONL" else "text/csv", disabled=not data)
