"""Evaluate: checkpoints of any stage and method side by side on one prompt set.

Pick policies, a reward model (the judge), a KL reference and a prompt set; the evaluation runs as a
background job (core/analysis/eval_table.py, the same code as `rlhf eval`) and ends in one table: mean RM score,
gold (demo prompts only), KL to the reference, answer length and win rate against a baseline, as CSV;
and below it, one prompt at a time, the conversation's earlier turns and each checkpoint's answer with its
own numbers (RM score against the baseline's answer, gold, KL, each reward term).
"""

import shlex

import pandas as pd
import streamlit as st

from core import catalog
from core.analysis import eval_table
from core.textsafe import escape_markdown
from workbench import resources
from workbench.reward_picker import RewardPicker

store = resources.store()
jobs = resources.jobs()
REFRESH_S = 2
PROMPT_SETS = {"demo": "Demo held-out prompts (gold applies)", "store": "The store's prompts", "file": "A file"}


def policy_names() -> dict[str, str]:
    """Label -> checkpoint name for every policy one can sample from: the base, final models, then each
    run's epoch/step checkpoints (core/catalog.py's order)."""
    names = {"bundled (base)": "bundled"}
    training = {}
    for kind in resources.POLICY_KINDS:
        finals, steps = catalog.grouped(store.list_checkpoints(kind))
        names.update({f"{c['name']} ({kind})": c["name"] for c in finals})
        training.update({f"{catalog.training_label(c)} ({kind})": c["name"] for c in steps})
    return {**names, **training}


def eval_command(values: dict) -> str:
    """The `rlhf eval` line of the form's values: each setting that differs from its default (the reward terms
    as `--reward SPEC`), placeholders for the two it needs until they are picked."""
    defaults = eval_table.EvalConfig().to_dict()
    values = {**values, "checkpoints": values["checkpoints"] or "my-sft,my-ppo",
              "reward_model": values["reward_model"] or "my-rm"}
    words = ["rlhf", "eval"]
    for name, value in values.items():
        if name in ("checkpoints", "reward_model") or value != defaults[name]:
            words += [f"--{name.replace('_', '-')}", f"{value:g}" if isinstance(value, float) else str(value)]
    return shlex.join([*words, "--output", "out/eval"])


st.title("Evaluate")
st.caption("Every checkpoint answers every prompt once, with one sampling seed for all. The reward model scores "
           "the answers and judges each against the baseline's answer to the same prompt (a tie counts half); "
           "KL is measured to the reference on the checkpoint's own answers; gold is the demo labeler's score.")

evaluations = [j for j in reversed(jobs.jobs()) if j.stage == "eval"]
with st.expander("New evaluation", expanded=not evaluations):
    policies = policy_names()
    judges = resources.checkpoint_choices(store, "rm")  # label -> directory
    chosen = st.multiselect("Checkpoints", list(policies), key="eval_checkpoints",
                            help="any stage, any method: SFT, PPO, DPO, GRPO, RLOO, their training checkpoints")
    left, middle, right = st.columns(3)
    # Keyed by the picked checkpoints: a selectbox first drawn with no options keeps showing none in the browser.
    baseline = left.selectbox("Baseline (win rates against it)", chosen, key=f"eval_baseline_{'|'.join(chosen)}")
    reference = middle.selectbox("KL reference", ["the baseline", *policies], key="eval_reference",
                                 help="usually the SFT model every method started from")
    if judges:
        judge = right.selectbox("Reward model (the judge)", list(judges), key="eval_rm")
    else:
        judge = None
        right.error("Reward model: none yet. Train one on the Train page (stage 2).")
    prompt_set = st.radio("Prompts", list(PROMPT_SETS), format_func=PROMPT_SETS.get, horizontal=True,
                          key="eval_prompt_set")
    prompts_file = ""
    if prompt_set == "file":
        prompts_file = st.text_input("Prompts file", key="eval_prompts_file",
                                     help='a JSONL or CSV file with a "prompt" column')
    reward, reward_error = "", None
    if st.toggle("Also score reward terms", key="eval_terms",
                 help="verifiers or your own function on the same answers: each term's mean becomes a column "
                      "(a verifier's pass rate beside RM score, gold and KL)"):
        reward, reward_error = RewardPicker("eval_reward", "exact,eos").draw()
    cols = st.columns(3)
    n_prompts = cols[0].number_input("Prompts (the first n)", 1, 10_000, 100, key="eval_n_prompts")
    temperature = cols[1].number_input("Temperature", 0.05, 2.0, 1.0, 0.05, key="eval_temperature")
    max_new_tokens = cols[2].number_input("Max new tokens", 1, 1024, 24, key="eval_max_new_tokens")
    values = dict(checkpoints=",".join(policies[c] for c in chosen), baseline=policies[baseline] if baseline else "",
                  reward_model=judges[judge] if judge else "",
                  reference="" if reference == "the baseline" else policies[reference], reward=reward or "",
                  prompts=prompts_file.strip() if prompt_set == "file" else prompt_set, n_prompts=int(n_prompts),
                  temperature=float(temperature), max_new_tokens=int(max_new_tokens))
    if st.button("Evaluate", type="primary", icon=":material/play_arrow:", disabled=judge is None or bool(reward_error)):
        try:
            config = eval_table.EvalConfig.from_dict(values)
            st.session_state["eval_run"] = resources.queue_job("eval", config, "eval_notice")
            st.rerun()
        except ValueError as exc:
            st.error(str(exc))
    if notice := st.session_state.pop("eval_notice", None):
        st.success(notice)
    st.caption(f"Same from a terminal: `{eval_command(values)}`")

if not evaluations:
    st.info("No evaluation yet: pick checkpoints and a reward model above.")
    st.stop()
# No status in the labels (the browser keeps a picked option's text as it was: "(running)" stayed after the
# job ended); the progress bar below shows it while it runs.
labels = {j.run_id: f"{j.run_id} · {j.config.get('checkpoints', '')}"[:120] for j in evaluations}
if st.session_state.get("eval_run") not in labels:
    st.session_state.pop("eval_run", None)
run_id = st.selectbox("Evaluation", list(labels), format_func=labels.get, key="eval_run")
REFRESHING = jobs.busy


def answer_numbers(answer: dict, baseline: dict | None, gold_applies: bool) -> str:
    """One answer's own numbers: RM score (and the verdict against the baseline's answer), gold, KL, length,
    each reward term."""
    parts = [f"RM score {answer['rm_score']:+.3f}"]
    if baseline is not None:
        margin = answer["rm_score"] - baseline["rm_score"]  # the win rate's judgement on this prompt
        parts[0] += (" (ties the baseline)" if margin == 0 else
                     f" ({'beats' if margin > 0 else 'loses to'} the baseline by {abs(margin):.2g})")
    if gold_applies and answer.get("gold") is not None:
        parts.append(f"gold {answer['gold']:.2f}")
    if answer.get("kl") is not None:
        parts.append(f"KL {answer['kl']:+.2f}")
    parts.append(f"{answer['length']} tokens")
    parts += [f"{name.removeprefix('reward/')} {value:+.3g}" for name, value in answer.items() if name.startswith("reward/")]
    return " · ".join(parts)


def prompt_view(run_id: str, results: dict) -> None:
    """One prompt at a time: the conversation so far, then every checkpoint's answer to it with its numbers."""
    st.subheader("Per prompt")
    prompts = results["prompts"]

    def label(i: int) -> str:
        turns = prompts[i]["turns"]
        earlier = f" ({len(turns) - 1} earlier turns)" if len(turns) > 1 else ""
        return f"#{i + 1} · {turns[-1]['content'][:90]}{earlier}"

    i = st.selectbox("Prompt", range(len(prompts)), format_func=label, key=f"eval_prompt_{run_id}")
    turns, columns = prompts[i]["turns"], prompts[i]["columns"]
    resources.show_earlier_turns(turns)
    if len(turns) == 1:
        st.markdown(f"**User:** {escape_markdown(turns[-1]['content'])}")
    if columns:
        st.caption("This prompt's row (what reward terms check against): " +
                   " · ".join(f"{k} = {escape_markdown(str(v))}" for k, v in columns.items()))
    baseline = results["answers"].get(results["baseline"])
    for name, answers in results["answers"].items():
        answer = answers[i]
        with st.chat_message("assistant", avatar=":material/smart_toy:"):
            st.markdown(f"**{escape_markdown(name)}**" + (" · baseline" if name == results["baseline"] else ""))
            st.text(answer["text"] or "(empty answer)")  # model text, never markup
            st.caption(answer_numbers(answer, None if name == results["baseline"] else baseline and baseline[i],
                                      results["gold_applies"]))


@st.fragment(run_every=REFRESH_S if REFRESHING else None)
def show_evaluation(run_id: str) -> None:
    job = jobs.get(run_id)
    if job.status in ("queued", "running", "stopping"):
        st.progress(job.fraction, text=job.message or job.status)
        if job.owned and job.status != "stopping" and st.button("Stop", key="eval_stop"):
            jobs.stop(run_id)
            st.rerun()
    elif job.error:
        st.error(job.error)
    results = eval_table.load_results(job.output_dir) if job.output_dir else None
    if results:
        config = results["config"]
        st.caption(f"{results['rows'][0]['prompts'] if results['rows'] else 0} prompts from `{config['prompts']}` · "
                   f"judge `{config['reward_model']}` · baseline `{results['baseline']}` · "
                   f"KL to `{results['reference']}`" + ("" if results["gold_applies"] else
                                                        " · no gold: not the demo's prompts"))
        table = pd.DataFrame(results["rows"]).drop(columns=["path"])
        if not results["gold_applies"]:
            table = table.drop(columns=["gold"])
        st.dataframe(table, hide_index=True, column_config={
            "rm_score": st.column_config.NumberColumn("RM score", format="%.3f"),
            "gold": st.column_config.NumberColumn("gold", format="%.3f"),
            "kl": st.column_config.NumberColumn("KL (nats)", format="%.4f"),
            "length": st.column_config.NumberColumn("length (tokens)", format="%.1f"),
            "win_rate": st.column_config.NumberColumn("win rate", format="%.3f")})
        st.download_button("Download CSV", eval_table.table_csv(results["rows"]), file_name=f"{run_id}.csv",
                           mime="text/csv", icon=":material/download:", key="eval_csv")
        if results.get("answers"):
            prompt_view(run_id, results)
    elif job.status == "done":
        st.warning(f"no {eval_table.RESULTS_JSON} in {job.output_dir}")
    if REFRESHING and not jobs.busy:
        st.rerun()  # the job just finished: redraw once with the timer off


show_evaluation(run_id)
