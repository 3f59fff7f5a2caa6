"""Rank: sample K answers from a checkpoint for one prompt and order them best to worst.

A ranking is a strict order (InstructGPT: K = 4..9 per prompt, every pair used for the reward
model), so identical answers are merged and ties cannot be saved.
"""

import pandas as pd
import streamlit as st

from core.models.generate import sample
from core.data.store import MIN_K, MAX_K, check_ranks
from core.data.sources import as_prompt
from core.textsafe import escape_markdown
from workbench import resources

store = resources.store()
st.title("Rank answers")
st.page_link(resources.page("labeling"), label="Labeling as a team: batches, a labeling server, agreement",
             icon=":material/groups:")

prompts = store.list_prompts()
if not prompts:
    st.info("No prompts yet. Add some on the Prompts page, or start from the demo task's prompts.")
    if st.button("Add 20 demo prompts"):
        from core.data.demo import heldout_tasks

        store.add_prompts([t.prompt for t in heldout_tasks(20)], source="demo")
        st.rerun()
    st.stop()

choices = resources.policy_choices(store)
left, right = st.columns([2, 1])
model_label = left.selectbox("Checkpoint to sample from", list(choices), key="rank_model")
by_id = {p["id"]: p for p in prompts}
prompt_ids = list(by_id)
if st.session_state.get("rank_prompt") not in prompt_ids:
    st.session_state.pop("rank_prompt", None)
elif st.session_state.pop("rank_advance", False):
    # Skip / save moves to the next prompt by changing the widget's value before it is drawn.
    index = prompt_ids.index(st.session_state["rank_prompt"])
    st.session_state["rank_prompt"] = prompt_ids[(index + 1) % len(prompt_ids)]
prompt_id = left.selectbox("Prompt", prompt_ids, key="rank_prompt",
                           format_func=lambda i: f"#{i} · {by_id[i]['rankings']} rankings · {by_id[i]['text'][:90]}")
k = right.number_input("Answers to sample (K)", MIN_K, MAX_K, 4, key="rank_k")
temperature = right.slider("Temperature", 0.1, 2.0, 1.0, 0.1, key="rank_temperature",
                           help="Above 0 so the K answers differ")
labeler = right.text_input("Your name (labeler)", key="rank_labeler")


def next_prompt() -> None:
    st.session_state["rank_advance"] = True
    st.session_state.pop("rank_answers", None)


resources.show_earlier_turns(by_id[prompt_id]["turns"])

if st.button("Sample answers", type="primary"):
    model, tokenizer = resources.models().get(choices[model_label])
    with st.spinner(f"Sampling {k} answers"):
        # After the whole conversation, as the RM will score them.
        texts = sample(model, tokenizer, [as_prompt(by_id[prompt_id]["turns"])] * int(k), max_new_tokens=48,
                       temperature=temperature).texts
    distinct = [t for t in dict.fromkeys(t.strip() for t in texts) if t]
    # A new sample id gives the new answers new rank widgets: old ranks must not carry over.
    st.session_state["rank_sample"] = st.session_state.get("rank_sample", 0) + 1
    st.session_state["rank_answers"] = {"prompt_id": prompt_id, "answers": distinct, "sampled": len(texts),
                                        "sample": st.session_state["rank_sample"]}

batch = st.session_state.get("rank_answers")
if batch and batch["prompt_id"] == prompt_id:
    answers = batch["answers"]
    if len(answers) < batch["sampled"]:
        st.caption(f"{batch['sampled'] - len(answers)} identical or empty answer(s) merged: a ranking needs "
                   "distinct answers.")
    if len(answers) < MIN_K:
        st.warning("Fewer than two distinct answers: sample again (a higher temperature helps).")
    else:
        st.markdown(f"Give each answer a rank: **1 = best**, {len(answers)} = worst. No ties.")
        ranks = []
        for i, answer in enumerate(answers):
            text_col, rank_col = st.columns([5, 1])
            text_col.markdown(f"**{chr(65 + i)}.** {escape_markdown(answer)}")  # model text, never markup
            ranks.append(rank_col.selectbox("rank", range(1, len(answers) + 1), index=i,
                                            key=f"rank_{prompt_id}_{batch['sample']}_{i}",
                                            label_visibility="collapsed"))
        save_col, skip_col, bad_col = st.columns(3)
        if save_col.button("Save ranking", type="primary"):
            try:
                check_ranks(ranks, len(answers))
                ordered = [a for _, a in sorted(zip(ranks, answers))]
                store.add_ranking(prompt_id, ordered, labeler)
                st.toast(f"Ranking saved ({len(ordered)} answers).")
                next_prompt()
                st.rerun()
            except ValueError as exc:
                st.error(f"Not saved: {exc}")
        if skip_col.button("Skip prompt"):
            next_prompt()
            st.rerun()
        if bad_col.button("All bad"):
            st.session_state["rank_all_bad"] = prompt_id
    if st.session_state.get("rank_all_bad") == prompt_id:
        st.info("Nothing stored: when every answer is bad there is no order to learn from. Write a good answer "
                "instead; it becomes a demonstration for SFT.")
        with st.form("all_bad_demo", clear_on_submit=True):
            good = st.text_area("A good answer")
            if st.form_submit_button("Save as demonstration"):
                try:
                    store.add_demonstration(by_id[prompt_id]["text"], good)
                    st.session_state.pop("rank_all_bad")
                    next_prompt()
                    st.rerun()
                except ValueError as exc:
                    st.error(f"Not saved: {exc}")
elif st.button("Skip prompt"):
    next_prompt()
    st.rerun()

with st.expander(f"Rankings per prompt ({sum(p['rankings'] for p in prompts)} in all)"):
    st.dataframe(pd.DataFrame(prompts, columns=["id", "text", "rankings", "demonstrations"]),
                 hide_index=True, width="stretch")
