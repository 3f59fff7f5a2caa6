"""Chat: talk to any checkpoint with streamed tokens, or put 2-5 side by side on the same prompt and
seed and vote. A vote with a strict order is stored as a ranking, so chatting feeds the reward model.

A model with a chat template of its own holds a conversation; the demo's plain-template models answer
each message on its own. Toggles show the exact prompt text the model reads, and colour each answer's
tokens by log π − log π_ref against a reference policy, with the answer's sum (the KL PPO penalises)
and a reward model's score beside it (core/analysis/token_kl.py): an ensemble's aggregate, as the stages
score, with each member's score and their spread."""

import json

import streamlit as st

from core import catalog
from core.config import REWARD_AGGREGATES
from core.data.store import check_ranks
from core.models.ensemble import RewardEnsemble, ensemble_size
from core.models.chat import fit_prompt, holds_conversations, render_prompt
from core.models.generate import MAX_PROMPT_TOKENS, stream
from core.textsafe import ShownStream, escape_html, escape_markdown
from core.analysis.token_kl import answer_view, token_html
from workbench import resources

MAX_SIDE_BY_SIDE = 5  # one column per method: SFT, PPO, DPO, GRPO, RLOO
METHOD_KINDS = [kind for kind in resources.POLICY_KINDS if kind != "base"]

store = resources.store()
choices = resources.policy_choices(store)
reward_models = resources.checkpoint_choices(store, "rm")  # newest first
st.title("Chat")


def newest_final(kind: str) -> str | None:
    # Final models are labelled '<name> (<kind>)'; training checkpoints '(<kind>, step n)' do not match.
    return next((label for label in reversed(choices) if label.endswith(f"({kind})")), None)


with st.sidebar:
    st.markdown("**Sampling**")
    temperature = st.slider("Temperature", 0.0, 2.0, 1.0, 0.05, key="chat_temperature", help="0 = greedy")
    top_p = st.slider("Top-p", 0.05, 1.0, 1.0, 0.05, key="chat_top_p")
    max_tokens = st.number_input("Max new tokens", 1, 512, 64, key="chat_max_tokens")
    seed = st.number_input("Seed", 0, 2**31 - 1, 0, key="chat_seed", help="same seed, same prompt: comparable answers")
    st.markdown("**Show**")
    show_prompt = st.toggle("Prompt as the model reads it", key="chat_show_prompt",
                            help="the exact text fed to the model: its chat template applied to the conversation")
    token_view = st.toggle("Token view (log π − log π_ref)", key="chat_token_view",
                           help="colour each answer token by how much more (red) or less (blue) likely the "
                                "checkpoint makes it than the reference policy; the sum is the KL PPO penalises")
    if token_view:
        labels = list(choices)
        default_reference = newest_final("sft") or "bundled (base)"
        reference_label = st.selectbox("Reference policy", labels, index=labels.index(default_reference),
                                       key="chat_reference", help="PPO's reference is the SFT model it started from")
        rm_label = st.selectbox("Reward model", ["none", *reward_models], index=1 if reward_models else 0,
                                key="chat_reward_model", help="scores each answer at its EOS, as in PPO")
        rm_aggregate, rm_lambda = "mean", 1.0
        try:
            members = ensemble_size(reward_models[rm_label]) if rm_label != "none" else 1
        except ValueError as exc:  # an ensemble missing a member: the token view names it too
            st.error(str(exc))
            members = 1
        if members > 1:
            rm_aggregate = st.selectbox("Ensemble reward", list(REWARD_AGGREGATES), key="chat_rm_aggregate",
                                        help="how the members' scores become one reward, as reward_aggregate in "
                                             "PPO, GRPO and RLOO: mean, min, or mean − λ·std (conservative)")
            if rm_aggregate == "mean_minus_std":
                rm_lambda = st.number_input("λ (uncertainty_coef)", 0.0, 100.0, 1.0, 0.1, key="chat_rm_lambda")
        # Log-probs are those of the distribution sampled from; greedy has none, so read it at 1.
        kl_temperature = float(temperature) if temperature > 0 else 1.0


@st.cache_resource(show_spinner=False, max_entries=2)
def reward_model(path: str):
    """Every member of the RM directory (one for a single RM), as the stages load it."""
    from core.models.ensemble import load_reward_model
    from core.models.loading import load_tokenizer

    tokenizer = load_tokenizer(path)
    return load_reward_model(path, tokenizer.pad_token_id), tokenizer


@st.cache_data(show_spinner="Scoring the answer's tokens…", max_entries=256)
def scored(policy_ref: str, reference_ref: str, rm_ref: str | None, rm_how: tuple[str, float], conversation_json: str,
           answer_ids: tuple[int, ...], temperature: float):
    from core.models.loading import check_same_tokenizer

    policy, tokenizer = resources.models().get(policy_ref)
    reference, reference_tokenizer = resources.models().get(reference_ref)
    check_same_tokenizer(tokenizer, reference_tokenizer, "reference policy")
    rm = None
    if rm_ref:
        loaded, rm_tokenizer = reward_model(rm_ref)
        rm = RewardEnsemble(list(loaded.members), *rm_how, loaded.heads)  # the same members, aggregated as picked
        check_same_tokenizer(tokenizer, rm_tokenizer, "reward model")
    return answer_view(policy, reference, tokenizer, json.loads(conversation_json), list(answer_ids), temperature, rm)


def show_tokens(label: str, conversation: list[dict], answer_ids: list[int]) -> None:
    """The answer's tokens coloured by log π − log π_ref, its KL and RM score (token view on)."""
    try:
        view = scored(choices[label], choices[reference_label], reward_models.get(rm_label), (rm_aggregate, rm_lambda),
                      json.dumps(conversation), tuple(answer_ids), kl_temperature)
    except ValueError as exc:
        st.error(f"No token view: {exc}")
        return
    rm = f" · RM score {view.rm_score:+.3f}" if view.rm_score is not None else ""
    if view.rm_members and len(view.rm_members) > 1:
        # The ensemble's disagreement on this answer: where the members part, its reward is least trusted.
        rm += (f" ({escape_html(rm_aggregate)} of {len(view.rm_members)} members; spread ±{view.rm_spread:.3f}: "
               + " ".join(f"{m:+.2f}" for m in view.rm_members) + ")")
    st.html(f'<div style="font-size: 0.85rem; color: #555">KL {view.kl:+.3f} nats (Σ log π − log π_ref over '
            f'{len(view.tokens)} tokens at temperature {kl_temperature:g}, against {escape_html(reference_label)}){rm}</div>'
            f'<div style="font-family: monospace; white-space: pre-wrap; line-height: 1.7">{token_html(view.tokens)}</div>')


def extras(label: str, conversation: list[dict], answer_ids: list[int]) -> None:
    """What the toggles add under an answer: the prompt text, the token view."""
    if show_prompt:
        tokenizer = resources.models().get(choices[label])[1]
        with st.expander("Prompt as the model reads it"):
            st.code(render_prompt(tokenizer, conversation), language=None)
            kept, dropped = fit_prompt(tokenizer, conversation, MAX_PROMPT_TOKENS)
            if dropped:
                st.caption(f"Longer than generation keeps ({MAX_PROMPT_TOKENS} tokens): the model reads the most "
                           f"recent {len(kept)} turns, the oldest {dropped} left out.")
    if token_view:
        show_tokens(label, conversation, answer_ids)


def answer(label: str, conversation: list[dict], sampled: list[int]) -> ShownStream:
    """The answer's pieces, escaped for display (model text is never markup); `.text` is what it wrote,
    `sampled` receives its token ids."""
    model, tokenizer = resources.models().get(choices[label])
    return ShownStream(stream(model, tokenizer, conversation, int(max_tokens), temperature, top_p, int(seed),
                              sampled=sampled))


single, side_by_side = st.tabs(["Chat", "Side by side"])

with single:
    label = st.selectbox("Checkpoint", list(choices), key="chat_model")
    conversational = holds_conversations(resources.models().get(choices[label])[1])
    history = st.session_state.setdefault("chat_history", [])
    info, clear = st.columns([4, 1])
    info.caption("This model has a chat template: each message continues the conversation." if conversational
                 else "Each message is answered on its own (the demo models are single-turn).")
    if clear.button("New conversation", key="chat_clear"):
        history.clear()
    # Inside a tab the chat input is not pinned to the bottom: the conversation goes in a box drawn
    # above it, so a new exchange appears under the earlier ones, not under the input.
    conversation_box = st.container()
    with conversation_box:
        for message in history:
            with st.chat_message(message["role"]):
                st.markdown(escape_markdown(message["content"]))
                if message["role"] == "assistant":
                    st.caption(message["model"])
                    if message["model"] in choices:  # a checkpoint deleted since is only text now
                        extras(message["model"], message["conversation"], message["tokens"])
    prompt = st.chat_input("Ask something, e.g. What is 3 plus 4?", key="chat_prompt")
    if prompt:
        turn = {"role": "user", "content": prompt}
        earlier = [{"role": m["role"], "content": m["content"]} for m in history] if conversational else []
        conversation = [*earlier, turn]
        history.append(turn)
        with conversation_box, st.chat_message("user"):
            st.markdown(escape_markdown(prompt))
        with conversation_box, st.chat_message("assistant"):
            sampled: list[int] = []
            shown = answer(label, conversation, sampled)
            try:
                st.write_stream(shown)
            except ValueError as exc:  # a message too long for any answer to follow it
                history.pop()
                st.error(f"Not sent: {exc}")
                st.stop()
            st.caption(label)
            extras(label, conversation, sampled)
        history.append({"role": "assistant", "content": shown.text, "model": label, "conversation": conversation,
                        "tokens": sampled})

with side_by_side:
    # Default: the newest SFT model against the newest PPO policy, the comparison the recipe is about.
    default = [x for x in (newest_final("sft") or newest_final("base") or "bundled (base)", newest_final("ppo")) if x]
    picked_now = st.session_state.setdefault("sbs_models", default if len(default) == 2 else list(choices)[:2])
    st.session_state["sbs_models"] = [x for x in picked_now if x in choices]  # a deleted checkpoint drops out
    pipelines = [r["id"] for r in store.list_runs() if r["stage"] == "pipeline"]
    finals = catalog.method_finals({kind: store.list_checkpoints(kind) for kind in METHOD_KINDS},
                                   pipelines[-1] if pipelines else None)
    method_labels = [f"{c['name']} ({kind})" for kind, c in finals.items()]
    st.button("Each method's final model", key="sbs_methods", disabled=len(method_labels) < 2,
              on_click=lambda: st.session_state.update(sbs_models=method_labels[:MAX_SIDE_BY_SIDE]),
              help="SFT, PPO, DPO, GRPO and RLOO: each one's final model from the latest pipeline run, "
                   "else the newest of its kind" + (f" (now: {', '.join(method_labels)})" if method_labels else ""))
    picked = st.multiselect(f"Checkpoints (2-{MAX_SIDE_BY_SIDE})", list(choices), max_selections=MAX_SIDE_BY_SIDE,
                            key="sbs_models")
    sbs_prompt = st.text_area("Prompt", key="sbs_prompt", height=70, placeholder="What is 3 plus 4?")
    generate = st.button("Generate", type="primary", key="sbs_generate")
    if generate:
        if not 2 <= len(picked) <= MAX_SIDE_BY_SIDE:
            st.error(f"Pick between 2 and {MAX_SIDE_BY_SIDE} checkpoints.")
        elif not sbs_prompt.strip():
            st.error("Write a prompt first.")
        else:
            question = [{"role": "user", "content": sbs_prompt.strip()}]
            columns = st.columns(len(picked))
            answers, tokens = {}, {}
            for column, label in zip(columns, picked):
                with column:
                    st.markdown(f"**{chr(65 + len(answers))}** · {label}")
                    tokens[label] = []
                    shown = answer(label, question, tokens[label])
                    try:
                        st.write_stream(shown)
                    except ValueError as exc:  # a prompt too long for any answer to follow it
                        st.error(f"Not answered: {exc}")
                        st.stop()
                    answers[label] = shown.text.strip()
                    extras(label, question, tokens[label])
            st.session_state["sbs"] = {"prompt": sbs_prompt.strip(), "answers": answers, "tokens": tokens}
    sbs = st.session_state.get("sbs")
    if sbs and not generate:
        columns = st.columns(len(sbs["answers"]))
        for i, (column, (label, text)) in enumerate(zip(columns, sbs["answers"].items())):
            with column:
                st.markdown(f"**{chr(65 + i)}** · {label}")
                st.markdown(escape_markdown(text) if text else "_(empty answer)_")
                if label in choices:
                    extras(label, [{"role": "user", "content": sbs["prompt"]}], sbs["tokens"][label])
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
