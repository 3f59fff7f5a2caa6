"""The round strip of an iterated-RLHF run (core/runs/rounds.py), shown on Monitor and on Home: each round's
state, then its gold, KL to SFT and the RM's accuracy on the previous policy's answers before and after its
refit, per round."""

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core.runs.rounds import round_rows

MARKS = {"done": ":material/check_circle:", "planned": ":material/schedule:",
         "waiting for labels": ":material/hourglass_top:"}


def round_strip(run_id: str, state: dict, key: str) -> None:
    rows = round_rows(state)
    config = state["config"]
    st.markdown(f"**Rounds {run_id}** · {config['method']} · labeler `{config['labeler']}` · `{state['state']}`")
    columns = st.columns(len(rows))
    for column, row in zip(columns, rows):
        mark = MARKS.get(row["state"], ":material/progress_activity:")
        gold = "" if row["gold"] is None else f"  \ngold {row['gold']:.2f}"
        label = "SFT" if row["round"] == "SFT" else f"round {row['round']}"
        column.markdown(f"{mark} **{label}**  \n`{row['state']}`{gold}")
    measured = [r for r in rows if r["gold"] is not None or r["rm_accuracy_after"] is not None]
    if len(measured) < 2:
        return
    table = pd.DataFrame(measured).drop(columns="state")
    table["round"] = table["round"].map(str)  # one index type: "SFT", "0", "1", ...
    table = table.set_index("round")
    counts = [c for c in ("rankings",) if c in table.columns]  # whole numbers, not 3 decimals
    st.table(table.astype(float).style.format(precision=3, na_rep="—").format("{:.0f}", subset=counts, na_rep="—"))
    figure = go.Figure()
    x = [str(r["round"]) for r in measured]
    for name, label in (("gold", "gold"), ("rm_accuracy_before", "RM accuracy before refit"),
                        ("rm_accuracy_after", "RM accuracy after refit")):
        figure.add_trace(go.Scatter(x=x, y=[r[name] for r in measured], mode="lines+markers", name=label))
    # A category axis: "SFT", "0", "1" as they are (a number axis would drop SFT's point and draw round 0.2).
    figure.update_layout(height=260, margin=dict(l=10, r=10, t=30, b=10), yaxis=dict(range=[0, 1.05]),
                         xaxis=dict(type="category"),
                         xaxis_title="round (RM accuracy on the previous policy's held-out answers)")
    st.plotly_chart(figure, key=f"rounds_{key}", width="stretch")
