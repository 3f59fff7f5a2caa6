"""Chat: talk to any checkpoint with streamed tokens, or put 2-4 side by side on the same prompt and
seed and vote. A vote with a strict order is stored as a ranking, so chatting feeds the reward model."""

import streamlit as st

from core.models.generate import stream
from core.data.store import check_ranks
from core.textsafe import ShownStream, escape_markdown
from workbench import resources

store = resources.store()
choices = resources.policy_choices(store)
st.title("Chat")

with st.sidebar:
    st.markdown("**Sampling**")
    temperature = st.slider("Temperature", 0.0, 2.0, 1.0, 0.05, key="chat_temperature", help="0 = greedy")
    top_p = st.slider("Top-p", 0.05, 1.0, 1.0, 0.05, key="chat_top_p")
    max_tokens = st.number_input("Max new tokens", 1, 512, 64, key="chat_max_tokens")
    seed = st.number_input("Seed", 0, 2**31 - 1, 0, key="chat_seed", help="same seed, same prompt: comparable answers")


def answer(label: str, prompt: str) -> ShownStream:
    """The answer's pieces, escaped for display (model text is never markup); `.text` is what it wrote."""
    model, tokenizer = resources.models().get(choices[label])
    return ShownStream(stream(model, tokenizer, prompt, int(max_tokens), temperature, top_p, int(seed)))


single, side_by_side = st.tabs(["Chat", "Side by side"])

with single:
    label = st.selectbox("Checkpoint", list(choices), key="chat_model")
    st.caption("Each message is answered on its own (the demo models are single-turn).")
    history = st.session_state.setdefault("chat_history", [])
    for message in history:
        with st.chat_message(message["role"]):
            st.markdown(escape_markdown(message["content"]))
            if message.get("model"):
                st.caption(message["model"])
    prompt = st.chat_input("Ask something, e.g. What is 3 plus 4?", key="chat_prompt")
    if prompt:
        history.append({"role": "user", "content": prompt})
        with st.chat_message("user"):
            st.markdown(escape_markdown(prompt))
        with st.chat_message("assistant"):
            shown = answer(label, prompt)
            st.write_stream(shown)
            st.caption(label)
        history.append({"role": "assistant", "content": shown.text, "model": label})

with side_by_side:
    # Default: the newest SFT model against the newest PPO policy, the comparison the recipe is about.
    newest = {kind: next((label for label in reversed(choices) if label.endswith(f"({kind})")), None)
              for kind in ("base", "sft", "ppo")}
    default = [label for label in (newest["sft"] or newest["base"] or "bundled (base)", newest["ppo"]) if label]
    picked = st.multiselect("Checkpoints (2-4)", list(choices), max_selections=4, key="sbs_models",
                            default=default if len(default) == 2 else list(choices)[:2])
    sbs_prompt = st.text_area("Prompt", key="sbs_prompt", height=70, placeholder="What is 3 plus 4?")
    generate = st.button("Generate", type="primary", key="sbs_generate")
    if generate:
        if not 2 <= len(picked) <= 4:
            st.error("Pick between 2 and 4 checkpoints.")
        elif not sbs_prompt.strip():
            st.error("Write a prompt first.")
        else:
            columns = st.columns(len(picked))
            answers = {}
            for column, label in zip(columns, picked):
                with column:
                    st.markdown(f"**{chr(65 + len(answers))}** · {label}")
                    shown = answer(label, sbs_prompt)
                    st.write_stream(shown)
                    answers[label] = shown.text.strip()
            st.session_state["sbs"] = {"prompt": sbs_prompt.strip(), "answers": answers}
    sbs = st.session_state.get("sbs")
    if sbs and not generate:
        columns = st.columns(len(sbs["answers"]))
        for i, (column, (label, text)) in enumerate(zip(columns, sbs["answers"].items())):
            column.markdown(f"**{chr(65 + i)}** · {label}")
            column.markdown(escape_markdown(text) if text else "_(empty answer)_")
    if sbs and len(set(sbs["answers"].values())) < len(sbs["answers"]):
        st.info("Some answers are the same text, so there is no order to vote on (a ranking needs distinct "
                "answers). Try another seed or prompt.")
    elif sbs:
        texts = list(sbs["answers"].values())
        letters = [chr(65 + i) for i in range(len(texts))]
        labeler = st.text_input("Your name (labeler)", key="sbs_labeler")
        if len(texts) == 2:
            vote = st.radio("Which is better?", ["A better", "B better", "Tie", "Both bad"], horizontal=True,
                            index=None, key="sbs_vote")
            order = {"A better": [0, 1], "B better": [1, 0]}.get(vote)
        else:
            st.markdown("Order the answers: **1 = best**.")
            rank_cols = st.columns(len(texts))
            ranks = [c.selectbox(letter, range(1, len(texts) + 1), index=i, key=f"sbs_rank_{i}")
                     for i, (c, letter) in enumerate(zip(rank_cols, letters))]
            vote, order = "order", None
            try:
                check_ranks(ranks, len(texts))
                order = sorted(range(len(texts)), key=lambda i: ranks[i])
            except ValueError as exc:
                st.error(str(exc))
        if st.button("Save vote", key="sbs_save", disabled=vote is None):
            if order is None:
                st.info("Not stored: a tie or two bad answers carry no order, and a ranking needs one "
                        "(the reward model learns from 'this one is better than that one').")
            else:
                try:
                    prompt_id = store.add_prompt(sbs["prompt"], source="chat")
                    store.add_ranking(prompt_id, [texts[i] for i in order], labeler)
                    st.success(f"Stored as a ranking ({' > '.join(letters[i] for i in order)}).")
                    del st.session_state["sbs"]
                except ValueError as exc:
                    st.error(f"Not stored: {exc}")
