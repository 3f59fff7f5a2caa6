"""Monitor: live curves of the selected runs, grouped by stage, and a browser of PPO's, GRPO's and RLOO's rollouts.

A pipeline run stands for its stage runs (SFT -> RM -> PPO), found again on every refresh, so a
stage that starts after the page opened joins by itself. Curves refresh every few seconds while a
shown run is active and stop when all are done. Watch RM reward against gold score and KL
together: reward climbing while gold falls is the reward model being gamed (over-optimisation). With an
ensemble reward model, `ensemble_std` (the members' disagreement) beside them rises where the policy
leaves what the members learned; the rollout browser shows each answer's per-member scores and, with reward
terms, each term's value (`reward/<term>` per answer); a GRPO or RLOO answer its group advantage, with no
per-token KL (TRL does not expose it: shown as "—", never as 0). The run
doctor reads the same curves per run, says what looks wrong and why, and relaunches a run with what to try.
"""

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core.analysis import doctor, monitor
from core.config import parse_reward
from core.runs.rounds import load_state
from core.data import rollouts
from core.textsafe import escape_html
from core.analysis.token_kl import token_html
from workbench import resources
from workbench.rounds_view import round_strip

store = resources.store()
jobs = resources.jobs()
MAX_POINTS = 400  # per run and metric: a 2,000-step PPO run stays quick to draw
# Live refresh intervals. The page redraws in the server process, which also runs the training job:
# redrawing every 2 s made the quick demo pipeline take 229 s instead of 115 s while this page was open
# (measured on 2 cores), 181 s once Streamlit's source watcher and post-run collection were off
# (.streamlit/config.toml). Every 5 s (curves) and 10 s (rollouts, which change once per PPO step
# anyway): ~140 s, still live.
REFRESH_S = 5
ROLLOUT_REFRESH_S = 10
# The recipe's curves, in this order, are drawn by default; "All metrics" adds the rest (learning
# rate, throughput...). Fewer charts also keep the page quick while a job trains.
PREFERRED = ["reward", "ensemble_std", "gold", "heldout_gold", "kl", "exact_kl", "kl_coef", "entropy", "policy_loss", "value_loss",
             "ptx_loss", "sft_loss", "val_loss", "rm_loss", "rm_accuracy", "heldout_accuracy", "clip_frac",
             "pretrain_loss", "heldout_gold_greedy", "response_length",
             "dpo_loss", "reward_margin", "reward_accuracy"]  # DPO's (GRPO/RLOO log under PPO's names)
HIDDEN_SINGLES = {"epoch"}  # bookkeeping, not a result: shown with "All metrics" only
SEVERITY_ICONS = {"info": ":material/info:", "warning": ":material/warning:", "error": ":material/error:"}
STAGE_COLOURS = ["rgba(31,119,180,0.08)", "rgba(255,127,14,0.08)", "rgba(44,160,44,0.08)", "rgba(148,103,189,0.08)"]


def run_rows() -> list[dict]:
    return [{"id": j.run_id, "stage": j.stage, "status": j.status} for j in jobs.jobs()]


st.title("Monitor")
runs = run_rows()
if not runs:
    st.info("No runs yet: launch one on the Train page.")
    st.stop()

# No status in the labels: the browser keeps a picked option's text as it was when picked, so "(pipeline, running)"
# stayed after the run finished. Each run's status shows, live, beside its curves.
labels = {r["id"]: f"{r['id']} ({r['stage']})" for r in runs}
selected = st.multiselect("Runs", [r["id"] for r in reversed(runs)], default=monitor.default_selection(runs),
                          format_func=labels.get, key="monitor_runs",
                          help="A pipeline run shows all its stages; pick several runs to overlay them")
if not selected:
    st.info("Pick one or more runs to overlay their curves.")
    st.stop()
options = st.columns([2, 1, 3])
smoothing = options[0].slider("Smoothing (EMA)", 0.0, 0.99, 0.0, 0.01, key="monitor_smoothing",
                              help="TensorBoard-style exponential moving average; the raw curve stays faint behind")
all_metrics = options[1].toggle("All metrics", key="monitor_all_metrics",
                                help="besides the recipe's curves: learning rate, throughput, ...")
live = monitor.any_active(runs, selected)
refresh = REFRESH_S if live else None
rollout_refresh = ROLLOUT_REFRESH_S if live else None


def line_traces(figure: go.Figure, name: str, steps: list, values: list, colour_index: int) -> None:
    colour = f"hsl({(colour_index * 137) % 360}, 60%, 45%)"
    if smoothing > 0 and len(values) > 1:
        figure.add_trace(go.Scatter(x=steps, y=values, mode="lines", line=dict(color=colour, width=1), opacity=0.25,
                                    showlegend=False, hoverinfo="skip"))
        values = monitor.ema(values, smoothing)
    figure.add_trace(go.Scatter(x=steps, y=values, mode="lines+markers" if len(values) < 60 else "lines", name=name,
                                line=dict(color=colour), marker_size=5 if len(values) > 1 else 10))


def pipeline_overview(runs_now: list[dict], pipeline_id: str, rows: pd.DataFrame) -> None:
    """The pipeline's stages as a strip (done / running / waiting) and its headline curves on one axis
    with the stage boundaries marked."""
    stage_runs = monitor.pipeline_stage_runs(runs_now, pipeline_id)
    status = next((r["status"] for r in runs_now if r["id"] == pipeline_id), "")
    planned = list(jobs.get(pipeline_id).config.get("stages") or [])
    started = {s.label.split("-")[0] for s in stage_runs}
    steps = [(s.label, s.status) for s in stage_runs] + [(p, "waiting") for p in planned if p not in started]
    st.markdown(f"**Pipeline {pipeline_id}** · `{status}`")
    marks = {"done": ":material/check_circle:", "running": ":material/progress_activity:",
             "stopping": ":material/progress_activity:", "queued": ":material/schedule:", "waiting": ":material/schedule:"}
    columns = st.columns(max(1, len(steps)))
    for i, (column, (label, state)) in enumerate(zip(columns, steps)):
        column.markdown(f"{marks.get(state, ':material/error:')} **{i + 1} · {label}**  \n`{state}`")
    last = rows.groupby("run_id")["step"].max().to_dict() if not rows.empty else {}
    offsets = monitor.timeline_offsets(stage_runs, last)
    figure = go.Figure()
    colour = 0
    for i, s in enumerate(stage_runs):
        start, end = offsets[s.id], offsets[s.id] + max(1, last.get(s.id, 0))
        figure.add_vrect(x0=start, x1=end, fillcolor=STAGE_COLOURS[i % len(STAGE_COLOURS)], line_width=0,
                         annotation_text=s.label, annotation_position="top left")
        if i:
            figure.add_vline(x=start, line_dash="dash", line_color="grey")
        for name in monitor.TIMELINE_METRICS.get(s.stage, []):
            curve = rows[(rows["run_id"] == s.id) & (rows["name"] == name)]
            if len(curve) > 1:
                line_traces(figure, f"{s.label}: {name}", (curve["step"] + start).tolist(), curve["value"].tolist(),
                            colour)
                colour += 1
    figure.update_layout(height=300, margin=dict(l=10, r=10, t=30, b=10), xaxis_title="pipeline step (stage after stage)",
                         legend=dict(orientation="h", y=-0.3))
    st.plotly_chart(figure, key=f"timeline_{pipeline_id}", width="stretch")


def relaunch(run_id: str, finding: doctor.Finding) -> None:
    """A new run with the finding's suggested value; the diagnosed run stays as it is."""
    run = store.get_run(run_id)
    try:
        new_id = jobs.submit(run["stage"], doctor.with_suggestion(run["config"], finding))
    except ValueError as exc:
        st.error(str(exc))
        return
    st.success(f"Launched **{new_id}** with {finding.field}={finding.value}; {run_id} is unchanged.")


@st.cache_data(show_spinner=False, max_entries=256)
def settled_findings(db: str, run_id: str, status: str, updated_at: float) -> list[doctor.Finding]:
    """A finished run's findings: its curves no longer change, so they are read once per (run, status, last
    update), not on every refresh (a resumed run finishes with a new `updated_at` and is read again)."""
    return doctor.diagnose(doctor.load_run(store, run_id))


def doctor_panel(shown: list[monitor.ShownRun]) -> None:
    """Per run, what the run doctor reads in its curves (core/analysis/doctor.py), refreshed with them."""
    for s in shown:
        run = store.get_run(s.id)
        findings = (doctor.diagnose(doctor.load_run(store, s.id)) if s.active else
                    settled_findings(resources.db_path(), s.id, run["status"], run["updated_at"]))
        loud = [f for f in findings if f.severity != "info"]
        title = f"Doctor · {s.id}: " + (doctor.summary_line(findings, s.id).removeprefix("doctor: ").split(";")[0]
                                         if findings else "nothing looks wrong")
        with st.expander(title, expanded=bool(loud), icon=SEVERITY_ICONS[findings[0].severity] if findings else
                         ":material/check_circle:"):
            recorded = run["config"]  # the fields a relaunch can set
            for i, f in enumerate(findings):
                st.markdown(f"{SEVERITY_ICONS[f.severity]} **{f.check}** · {f.severity}  \n**Seen:** {f.seen}  \n"
                            f"**Likely cause:** {f.cause}  \n**Try:** {f.try_}")
                if f.field is not None and f.stage == s.stage and f.field in recorded:
                    if st.button(f"Relaunch as a new run with {f.field}={f.value}", key=f"doctor_{s.id}_{i}_{f.check}"):
                        relaunch(s.id, f)


@st.fragment(run_every=refresh)
def curves() -> None:
    runs_now = run_rows()  # re-read: stage runs that started since the page opened join here
    shown = monitor.expand(runs_now, selected)
    ids = [s.id for s in shown]
    rows = pd.DataFrame(store.metrics(ids, max_points=MAX_POINTS), columns=["run_id", "step", "name", "value"])
    for pipeline_id in [r for r in selected if any(x["id"] == r and x["stage"] == monitor.PIPELINE for x in runs_now)]:
        with st.container(border=True):
            pipeline_overview(runs_now, pipeline_id, rows)
    for run in [x for x in runs_now if x["id"] in selected and x["stage"] == "rounds"]:
        output_dir = store.get_run(run["id"]).get("output_dir")
        if output_dir and (state := load_state(output_dir)):
            with st.container(border=True):
                round_strip(run["id"], state, key=run["id"])
    doctor_panel(shown)
    if rows.empty:
        st.info("No metrics logged yet; curves appear after the first training steps.")
    else:
        by_stage: dict[str, list] = {}
        for s in shown:
            by_stage.setdefault(s.stage, []).append(s)
        for stage in sorted(by_stage, key=monitor.stage_order):
            members = by_stage[stage]
            member_ids = [s.id for s in members]
            # Per stage: SFT's one-epoch gold is a single value even though PPO logs gold every step.
            curve_rows, singles = monitor.split_single_points(rows[rows["run_id"].isin(member_ids)].to_dict("records"))
            curve_df = pd.DataFrame(curve_rows, columns=rows.columns)
            present = set(curve_df["name"])
            singles = [r for r in singles if all_metrics or r["name"] not in HIDDEN_SINGLES]
            if not present and not singles:
                continue
            st.subheader(monitor.stage_title(stage))
            st.caption(" · ".join(f"{s.id} `{s.status}`" for s in members))
            names = [n for n in PREFERRED if n in present]
            terms = sorted(n for n in present if n.startswith("reward/"))  # each reward term, beside the total
            at = names.index("reward") + 1 if "reward" in names else len(names)
            names[at:at] = terms
            names += sorted(n for n in present if n not in names) if all_metrics or not names else []
            columns = st.columns(2)
            for i, name in enumerate(names):
                figure = go.Figure()
                for j, s in enumerate(members):
                    curve = curve_df[(curve_df["run_id"] == s.id) & (curve_df["name"] == name)]
                    if not curve.empty:
                        line_traces(figure, s.id, curve["step"].tolist(), curve["value"].tolist(), j)
                figure.update_layout(title=name, height=280, margin=dict(l=10, r=10, t=40, b=10), xaxis_title="step",
                                     legend=dict(orientation="h", y=-0.25), showlegend=len(members) > 1)
                columns[i % 2].plotly_chart(figure, key=f"chart_{stage}_{name}", width="stretch")
            if singles:
                # One value per run (final evaluations): a number, not a lone dot on an empty chart.
                tiles = st.columns(min(4, len(singles)))
                for i, r in enumerate(sorted(singles, key=lambda r: (r["name"], r["run_id"]))):
                    tiles[i % len(tiles)].metric(r["name"], f"{r['value']:.3f}",
                                                 help=f"{r['run_id']}, step {r['step']}")
    if refresh and (monitor.runs_changed(runs, runs_now) or not monitor.any_active(runs_now, selected)):
        # A run started since the page was drawn (a pipeline's next stage, a run launched elsewhere): redraw the
        # whole page so the run picker offers it; when everything shown finished, redraw with the timer off.
        st.rerun()


def term_weights(run_id: str) -> dict[str, float]:
    """Each reward term's weight in the run's recorded reward (what its value counts for in the total); none when
    the reward no longer parses here (a user's reward file moved since)."""
    try:
        return {t.name: t.weight for t in parse_reward(store.get_run(run_id)["config"].get("reward") or "rm")}
    except ValueError:
        return {}


def sample_html(sample: dict, weights: dict[str, float]) -> str:
    gold = f" · gold {sample['gold']:.2f}" if sample["gold"] is not None else ""
    ending = "stopped (EOS)" if sample["finished"] else "cut at the length limit"
    members = (" · members " + " ".join(f"{m:+.2f}" for m in sample["members"])) if sample.get("members") else ""
    # Each reward term's own value; a reward that is the RM alone is already the line's `reward`.
    terms = ("<br>terms: " + " · ".join(f"{escape_html(name)} {value:+.3g}" + (f" ×{weights[name]:g}" if weights.get(
        name, 1.0) != 1.0 else "") for name, value in sample["terms"].items()) if set(sample.get("terms") or {}) - {"rm"}
             else "")
    advantage = f" · advantage {sample['advantage']:+.2f}" if sample.get("advantage") is not None else ""
    measured = sample["kl"] is not None  # GRPO and RLOO record no KL: "—", and the answer's text uncoloured
    kl = f"{sample['kl']:+.2f}" if measured else "—"
    text = token_html(sample["tokens"]) if measured else escape_html(sample["response"])
    return (f'<div style="font-size: 0.85rem; color: #555">reward {sample["reward"]:+.3f}{members}{gold}{advantage} · '
            f'KL {kl} · {sample["length"]} tokens · {ending}{terms}</div>'
            f'<div style="color: #666; margin: 4px 0">User: {escape_html(sample["prompt"])}</div>'
            f'<div style="font-family: monospace; white-space: pre-wrap; line-height: 1.7">{text}</div>')


@st.fragment(run_every=rollout_refresh)
def rollout_browser() -> None:
    runs_now = run_rows()
    shown = monitor.expand(runs_now, selected)
    with_rollouts = rollouts.runs_with_rollouts(store, [s.id for s in shown])
    if not with_rollouts:
        st.info("No rollouts yet: a PPO, GRPO or RLOO run keeps a sample of its answers at each step; they appear "
                "here after its first step.")
        return
    left, right = st.columns([2, 1])
    run_id = left.selectbox("Rollouts of run", with_rollouts, key="rollout_run")
    steps = rollouts.steps(store, run_id)
    follow = right.toggle("Latest step", value=True, key="rollout_follow",
                          help="follow the newest recorded step while the run trains")
    step = steps[-1] if follow or len(steps) == 1 else left.select_slider("Step", steps, value=steps[-1],
                                                                          key=f"rollout_step_{run_id}")
    batch_rewards = rollouts.rewards(store, run_id)
    hist, spread = st.columns(2)
    figure = go.Figure(go.Histogram(x=batch_rewards.get(step, []), nbinsx=20, marker_color="#1f77b4"))
    figure.update_layout(title=f"Reward, step {step} (the whole batch)", height=260, margin=dict(l=10, r=10, t=40, b=10),
                         xaxis_title="reward", yaxis_title="answers")
    hist.plotly_chart(figure, key="rollout_histogram", width="stretch")
    every = max(1, len(steps) // 25)
    figure = go.Figure([go.Box(y=batch_rewards[s], name=str(s), marker_color="#1f77b4", boxpoints=False,
                               showlegend=False) for s in steps[::every] if s in batch_rewards])
    figure.update_layout(title="Reward over training", height=260, margin=dict(l=10, r=10, t=40, b=10),
                         xaxis_title="step", yaxis_title="reward")
    spread.plotly_chart(figure, key="rollout_spread", width="stretch")
    kept = rollouts.samples(store, run_id, step)
    coloured = any(s["kl"] is not None for s in kept)
    st.caption(f"Step {step}: {len(kept)} of the batch's answers, highest reward first. " + (
        "Each token is coloured by log π − log π_ref: red where the policy puts more probability on it than the SFT "
        "model, blue where less (hover a token for the value)." if coloured else
        "Advantage: what the update weighs the answer by, its reward (less the missing-EOS penalty) against its "
        "group's. No per-token KL: TRL keeps the policy's log-probs inside its loss, so the answers are not coloured "
        "by it."))
    weights = term_weights(run_id)
    for sample in kept:
        with st.container(border=True):
            st.html(sample_html(sample, weights))


curves_tab, rollouts_tab = st.tabs(["Curves", "Rollouts"])
with curves_tab:
    curves()
with rollouts_tab:
    rollout_browser()

st.subheader("Export")
export_ids = [s.id for s in monitor.expand(runs, selected)] or selected
export_run = st.selectbox("Run", export_ids, key="monitor_export_run")
full = pd.DataFrame(store.metrics([export_run]), columns=["run_id", "step", "name", "value"])
wide = full.pivot_table(index="step", columns="name", values="value").reset_index() if not full.empty else full
st.download_button(f"Download {export_run} metrics (CSV)", wide.to_csv(index=False), file_name=f"{export_run}-metrics.csv",
                   mime="text/csv", disabled=full.empty)
