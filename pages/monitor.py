"""Monitor: live curves of the selected runs, overlaid, one chart per metric.

Watch RM reward against gold score and KL together: reward climbing while gold falls is the
reward model being gamed (over-optimisation; a larger kl_coef holds it back).
"""

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from workbench import resources

store = resources.store()
jobs = resources.jobs()
MAX_POINTS = 400  # per run and metric: a 2,000-step PPO run stays quick to draw
# The recipe's curves, in this order, are drawn by default; any other metric a stage logs (learning
# rate, throughput...) can be picked. Fewer charts also keep the page quick while a job trains.
PREFERRED = ["reward", "gold", "heldout_gold", "kl", "kl_coef", "entropy", "policy_loss", "value_loss",
             "ptx_loss", "sft_loss", "rm_loss", "rm_accuracy", "heldout_accuracy", "clip_frac", "pretrain_loss",
             "response_length"]

st.title("Monitor")
runs = list(reversed(jobs.jobs()))
if not runs:
    st.info("No runs yet: launch one on the Train page.")
    st.stop()

labels = {j.run_id: f"{j.run_id} ({j.stage}, {j.status})" for j in runs}
active = [j.run_id for j in runs if j.status in ("running", "stopping")]
selected = st.multiselect("Runs", list(labels), default=active or [runs[0].run_id], format_func=labels.get,
                          key="monitor_runs")
if not selected:
    st.info("Pick one or more runs to overlay their curves.")
    st.stop()

known = {r["name"] for r in store.metrics(selected, max_points=50)}
ordered = [n for n in PREFERRED if n in known] + sorted(n for n in known if n not in PREFERRED)
chosen = st.multiselect("Metrics", ordered, key="monitor_metrics", placeholder="the recipe's curves")


@st.fragment(run_every=2 if any(jobs.get(r).status in ("running", "stopping", "queued") for r in selected) else None)
def curves() -> None:
    rows = pd.DataFrame(store.metrics(selected, max_points=MAX_POINTS), columns=["run_id", "step", "name", "value"])
    if rows.empty:
        st.info("No metrics logged yet; curves appear after the first training steps.")
        return
    present = list(rows["name"].unique())
    shown = [n for n in chosen if n in present] or [n for n in PREFERRED if n in present] or sorted(present)
    columns = st.columns(2)
    for i, name in enumerate(shown):
        figure = go.Figure()
        for run_id, curve in rows[rows["name"] == name].groupby("run_id"):
            figure.add_trace(go.Scatter(x=curve["step"], y=curve["value"], mode="lines+markers", name=run_id,
                                        marker_size=4))
        figure.update_layout(title=name, height=280, margin=dict(l=10, r=10, t=40, b=10),
                             xaxis_title="step", legend=dict(orientation="h", y=-0.25), showlegend=len(selected) > 1)
        columns[i % 2].plotly_chart(figure, key=f"chart_{name}", width="stretch")


curves()

st.subheader("Export")
export_run = st.selectbox("Run", selected, key="monitor_export_run")
full = pd.DataFrame(store.metrics([export_run]), columns=["run_id", "step", "name", "value"])
wide = full.pivot_table(index="step", columns="name", values="value").reset_index() if not full.empty else full
st.download_button(f"Download {export_run} metrics (CSV)", wide.to_csv(index=False), file_name=f"{export_run}-metrics.csv",
                   mime="text/csv", disabled=full.empty)
