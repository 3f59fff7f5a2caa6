"""Home: where the pipeline stands (base -> SFT -> RM -> PPO) and what to do next."""

import streamlit as st

from core.stages import STAGES
from workbench import resources

store = resources.store()
counts = store.counts()
checkpoints = {spec.checkpoint_kind: store.list_checkpoints(spec.checkpoint_kind) for spec in STAGES.values()}

st.title("RLHF Workbench")
st.caption("The InstructGPT recipe on your machine: supervised fine-tuning, a reward model from rankings, "
           "then PPO with a KL penalty and pretraining mix (PPO-ptx).")

st.subheader("Pipeline")
base, sft, rm, ppo = st.columns(4)
base.metric("Base model", "bundled", help="assets/tiny-gpt2, a small GPT-2 pretrained on the demo corpus")
sft.metric("SFT checkpoints", len(checkpoints["sft"]))
rm.metric("Reward models", len(checkpoints["rm"]))
ppo.metric("PPO policies", len(checkpoints["ppo"]))

st.subheader("Data")
prompts, demos, rankings, runs = st.columns(4)
prompts.metric("Prompts", counts["prompts"])
demos.metric("Demonstrations", counts["demonstrations"])
rankings.metric("Rankings", counts["rankings"])
runs.metric("Runs", counts["runs"])

st.subheader("Next step")
if not any(checkpoints.values()):
    st.info("Nothing trained yet. The quickest start is the **demo pipeline** (SFT, RM and PPO on the built-in "
            "task, about 10 minutes on a laptop CPU). Or add your own prompts and demonstrations first.")
    st.page_link(resources.page("train"), label="Train: run the demo pipeline", icon=":material/play_arrow:")
    st.page_link(resources.page("prompts"), label="Prompts: add demonstrations", icon=":material/edit_note:")
elif not checkpoints["rm"]:
    st.info("You have an SFT model. Rank its answers (or let the demo labeler do it) and train a reward model.")
    st.page_link(resources.page("rank"), label="Rank answers", icon=":material/format_list_numbered:")
    st.page_link(resources.page("train"), label="Train a reward model", icon=":material/model_training:")
elif not checkpoints["ppo"]:
    st.info("You have an SFT model and a reward model: run PPO to optimise the policy against it.")
    st.page_link(resources.page("train"), label="Train with PPO", icon=":material/model_training:")
else:
    st.success("All three stages have checkpoints. Compare SFT and PPO side by side, and watch reward vs "
               "gold score vs KL for over-optimisation.")
    st.page_link(resources.page("chat"), label="Chat side by side", icon=":material/chat:")
    st.page_link(resources.page("monitor"), label="Monitor runs", icon=":material/monitoring:")
