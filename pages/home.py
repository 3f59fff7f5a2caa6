"""Home: where the pipeline stands (base -> SFT -> RM -> PPO) and what to do next."""

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core import catalog
from core.analysis import results
from core.config import STAGE3_METHODS
from core.stages import STAGES
from core.runs.rounds import latest_rounds
from workbench import resources
from workbench.rounds_view import round_strip

store = resources.store()
counts = store.counts()
# Final models only (a run's output); epoch and step checkpoints stay in the pickers, under their run.
checkpoints = {spec.checkpoint_kind: catalog.final_models(store.list_checkpoints(spec.checkpoint_kind))
               for spec in STAGES.values()}
# Stage 3 is any of the methods: a finished GRPO policy is a policy as much as a PPO one.
policies = {stage: len(checkpoints[STAGES[stage].checkpoint_kind]) for stage in STAGE3_METHODS}

st.title("RLHF Workbench")
st.caption("The InstructGPT recipe on your machine: supervised fine-tuning, a reward model from rankings, "
           "then PPO with a KL penalty and pretraining mix (PPO-ptx).")

st.subheader("Pipeline")
base, sft, rm, ppo = st.columns(4)
base.metric("Base model", "bundled", help="assets/tiny-gpt2, a small GPT-2 pretrained on the demo corpus")
sft.metric("SFT models", len(checkpoints["sft"]), help="final models; epoch checkpoints are listed under their run")
rm.metric("Reward models", len(checkpoints["rm"]), help="final models; epoch checkpoints are listed under their run")
ppo.metric("Policies", sum(policies.values()),
           help="final stage-3 models: " + ", ".join(f"{STAGES[k].title.split('·')[-1].strip()} {n}"
                                                    for k, n in policies.items()))

latest = results.latest_report(store)
if latest is not None:
    run, report = latest
    shown = results.card(report)
    st.subheader("Results")
    with st.container(border=True, key="results_card"):
        st.caption(f"Pipeline **{run['id']}** ({shown['preset']} preset, `{run['status']}`): every model scored on "
                   "the same held-out prompts by the demo's labeler (gold = 0.5 correct + 0.2 format + 0.3 concise, "
                   f"answers sampled at T = 1). From `{results.report_path(run)}`.")
        models = {m["key"]: m for m in shown["models"]}
        tiles = st.columns(4)
        if "ppo" in models and "sft" in models:
            tiles[0].metric("Gold: SFT → PPO-ptx", f"{models['ppo']['gold']:.2f}",
                            f"{models['ppo']['gold'] - models['sft']['gold']:+.2f} vs SFT")
        elif "sft" in models:
            tiles[0].metric("Gold: base → SFT", f"{models['sft']['gold']:.2f}",
                            f"{models['sft']['gold'] - models['base']['gold']:+.2f} vs base")
        if models.get("ppo", {}).get("KL to SFT") is not None:
            tiles[1].metric("KL to SFT (nats/answer)", f"{models['ppo']['KL to SFT']:.2f}")
        if shown["reward_model"]:
            tiles[2].metric("RM held-out accuracy", f"{shown['reward_model'][0]['accuracy']:.2f}")
        if "ppo" in models and "sft" in models:
            tiles[3].metric("Alignment tax (pretraining loss)", f"{models['ppo']['held-out pretraining loss']:.2f}",
                            f"{models['ppo']['held-out pretraining loss'] - models['sft']['held-out pretraining loss']:+.2f}"
                            " vs SFT", delta_color="inverse")
        loud = [f for f in shown["doctor"] if f["severity"] != "info"]
        if not shown["doctor"]:
            st.markdown(":material/check_circle: **Doctor:** nothing looks wrong in any stage's curves.")
        else:
            st.markdown(f"**Doctor:** {len(loud)} warning(s) or error(s), {len(shown['doctor']) - len(loud)} note(s) "
                        "on the stage runs (the Monitor page relaunches a run with what to try)")
            for f in shown["doctor"]:
                st.markdown(f"- `{f['severity']}` **{f['check']}** ({f['run']}): {f['seen']}. *Try:* {f['try']}")
        st.markdown("**Methods compared** on the same SFT model, rankings and reward model: KL to SFT measured the "
                    "same way for every method, wall time of the stage's training run")
        # st.table: every row on screen at once, and "—" where a method has no number (the base model's KL).
        table = pd.DataFrame(shown["models"]).drop(columns="key").set_index("model").astype(float)  # None -> NaN
        st.table(table.style.format(precision=2, na_rep="—").format("{:.0f}", subset=["wall time (s)"], na_rep="—"))
        gold, rm_kinds, tax = st.columns(3)
        layout = dict(height=300, margin=dict(l=10, r=10, t=30, b=10), yaxis=dict(autorange="reversed"))
        split = go.Figure([go.Bar(name=part, y=list(shares), x=list(shares.values()), orientation="h",
                                  text=[f"{v:.2f}" for v in shares.values()], textposition="inside")
                           for part, shares in shown["gold_split"].items()])
        split.update_layout(**layout, barmode="stack", xaxis=dict(range=[0, 1]),
                            legend=dict(orientation="h", y=-0.12, traceorder="normal"),
                            title=dict(text="Gold and its parts (weight × share)", font=dict(size=14)))
        gold.plotly_chart(split, key="results_gold", width="stretch")
        if shown["reward_model"]:
            kinds = go.Figure(go.Bar(y=[r["preference"] for r in shown["reward_model"]],
                                     x=[r["accuracy"] for r in shown["reward_model"]], orientation="h",
                                     text=[f"{r['accuracy']:.2f} (n={r['pairs']})" for r in shown["reward_model"]],
                                     textposition="outside", cliponaxis=False, marker_color="#2ca02c"))
            # Room right of 1.0 for the label: an accuracy of 0 (no bar) still shows its number.
            kinds.update_layout(**layout, xaxis=dict(range=[0, 1.5], tickvals=[0, 0.5, 1]),
                                title=dict(text="RM held-out accuracy (n pairs)", font=dict(size=14)))
            kinds.add_vline(x=0.5, line_dash="dot", annotation_text="chance", annotation_position="bottom right")
            rm_kinds.plotly_chart(kinds, key="results_rm", width="stretch")
        if shown["alignment_tax"]:
            bars = go.Figure(go.Bar(x=list(shown["alignment_tax"].values()), y=list(shown["alignment_tax"]),
                                    orientation="h", marker_color="#1f77b4",
                                    text=[f"{v:.2f}" for v in shown["alignment_tax"].values()], textposition="auto"))
            bars.update_layout(**layout,
                               title=dict(text="Alignment tax: held-out pretraining loss", font=dict(size=14)))
            tax.plotly_chart(bars, key="results_tax", width="stretch")
        if "ppo_no_ptx" not in models and "ppo" in models:
            st.caption("This pipeline ran without the PPO-without-ptx comparison; the CLI's "
                       "`rlhf pipeline --demo` and the app's demo run it.")

if (rounds := latest_rounds(store)) is not None:
    st.subheader("Rounds")
    with st.container(border=True, key="rounds_card"):
        round_strip(rounds[0]["id"], rounds[1], key="home")

st.subheader("Data")
prompts, demos, rankings, runs = st.columns(4)
prompts.metric("Prompts", counts["prompts"])
demos.metric("Demonstrations", counts["demonstrations"])
rankings.metric("Rankings", counts["rankings"])
runs.metric("Runs", counts["runs"])

st.subheader("Next step")
if not any(checkpoints.values()):
    st.info("Nothing trained yet. The quickest start is the **demo pipeline** (SFT, RM and PPO on the built-in "
            "task, about 3 to 5 minutes on a 2-core laptop CPU). Or add your own prompts and demonstrations first.")
    st.page_link(resources.page("train"), label="Train: run the demo pipeline", icon=":material/play_arrow:")
    st.page_link(resources.page("prompts"), label="Prompts: add demonstrations", icon=":material/edit_note:")
elif not checkpoints["rm"]:
    st.info("You have an SFT model. Rank its answers (or let the demo labeler do it) and train a reward model.")
    st.page_link(resources.page("rank"), label="Rank answers", icon=":material/format_list_numbered:")
    st.page_link(resources.page("train"), label="Train a reward model", icon=":material/model_training:")
elif not sum(policies.values()):
    st.info("You have an SFT model and a reward model: run PPO to optimise the policy against it.")
    st.page_link(resources.page("train"), label="Train with PPO", icon=":material/model_training:")
else:
    st.success("All three stages have checkpoints. Compare SFT and PPO side by side, and watch reward vs "
               "gold score vs KL for over-optimisation.")
    st.page_link(resources.page("chat"), label="Chat side by side", icon=":material/chat:")
    st.page_link(resources.page("monitor"), label="Monitor runs", icon=":material/monitoring:")
