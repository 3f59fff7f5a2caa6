"""Study: reward-model over-optimisation (Gao, Schulman, Hilton 2022) on the demo task.

Launches the study as a background job (core/runs/study.py: a KL sweep of short PPO runs and best-of-n
from the SFT model), shows its progress and draws gold and RM score against sqrt(KL) with the
paper's fitted forms and the peak of each gold curve. The proxy is the reward model or reward terms beside it
(workbench/reward_picker.py); a study shows the proxy it used. The work and the fits live in core/runs/study.py.
"""

import json
import shlex

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core.runs import study
from core.config import PRESETS
from workbench import resources
from workbench.reward_picker import RewardPicker

store = resources.store()
jobs = resources.jobs()
REFRESH_S = 3
TITLES = {"rl": "RL (PPO KL sweep)", "bon": "best-of-n"}
# The single RM's arm and the ensemble's (`--ensemble N`), overlaid: (label prefix, colour per form).
ARMS = (("", {"rl": "#1f77b4", "bon": "#d62728"}), ("ensemble · ", {"rl": "#2ca02c", "bon": "#ff7f0e"}))


def arms(doc: dict) -> list[tuple[dict, str, dict]]:
    """(the arm's points, its label prefix, its colours): the single RM's, and the ensemble's once it has any."""
    shown = [(doc, *ARMS[0])]
    if (doc.get("ensemble") or {}).get("sft"):
        shown.append((doc["ensemble"], *ARMS[1]))
    return shown

st.title("Over-optimisation study")
st.caption("Push the SFT policy away from itself two ways, PPO at several KL coefficients β and best-of-n "
           "sampling, and score each point with the reward model (the proxy) and the demo's labeler (gold). "
           "As KL grows the RM score keeps rising while gold peaks and falls: the RM is being gamed. Curves: "
           "best-of-n R(d) = d(α − βd), RL R(d) = d(α − β log d), d = √KL, gains over the SFT model.")

with st.expander("New study", expanded=not any(j.stage == "study" for j in jobs.jobs())):
    source = st.radio("SFT and reward model", ["Train them first (demo pipeline: SFT, RM)", "Reuse checkpoints"],
                      key="study_source", horizontal=True)
    sft_model = reward_model = None
    if source.startswith("Reuse"):
        sfts, rms = resources.checkpoint_choices(store, "sft"), resources.checkpoint_choices(store, "rm")
        if not sfts or not rms:
            st.error("Reuse needs an SFT and a reward model checkpoint: none yet. Train them first instead.")
        else:
            left, right = st.columns(2)
            sft_model = sfts[left.selectbox("SFT checkpoint", list(sfts), key="study_sft")]
            reward_model = rms[right.selectbox("Reward model", list(rms), key="study_rm")]
    cols = st.columns(5)
    preset = cols[0].selectbox("Preset", list(PRESETS), key="study_preset")
    ensemble = cols[4].number_input("Ensemble arm (RMs)", 0, 16, 0, 1, key="study_ensemble",
                                    help="0: none; N >= 2: the same sweep and best-of-n scored by an ensemble of N "
                                         "reward models with the conservative reward mean − λ·std (λ = 1)")
    kl_coefs = cols[1].text_input("KL coefficients β", ", ".join(f"{c:g}" for c in study.DEFAULT_KL_COEFS),
                                  key="study_kl_coefs", help="one short PPO run each; the lowest should game the RM")
    n_max = cols[2].select_slider("Best-of-n up to", [2 ** k for k in range(8)], value=64, key="study_n_max")
    episodes = cols[3].number_input("Episodes per run", 64, 100_000, 2048, 64, key="study_episodes")
    st.markdown("**Proxy reward**: what the sweep optimises and best-of-n picks by; gold stays the demo's labeler")
    reward, reward_error = RewardPicker("study_reward", "rm").draw()
    if st.button("Launch study", type="primary", icon=":material/play_arrow:", disabled=reward_error is not None):
        try:
            config = study.study_config(preset, kl_coefs, [2 ** k for k in range(n_max.bit_length())], int(episodes),
                                        sft_model=sft_model, reward_model=reward_model, ensemble=int(ensemble),
                                        reward=reward)
            resources.queue_job("study", config, "study_notice")
            st.rerun()
        except ValueError as exc:
            st.error(str(exc))
    if notice := st.session_state.pop("study_notice", None):
        st.success(notice)
    st.caption("Same from a terminal: `rlhf study overopt --demo --preset quick --output runs/study"
               + (f" --reward {shlex.quote(reward)}" if reward and reward != "rm" else "") + "`")

studies = [j for j in reversed(jobs.jobs()) if j.stage == "study"]
if not studies:
    st.info("No study yet: launch one above (about 5 minutes on a 2-core laptop CPU with the quick preset).")
    st.stop()
labels = {j.run_id: f"{j.run_id} ({j.status})" for j in studies}
chosen = st.selectbox("Study", list(labels), format_func=labels.get, key="study_run")


def figure_for(doc: dict) -> go.Figure:
    figure = go.Figure()
    for arm, prefix, colours in arms(doc):
        draw_arm(figure, arm, prefix, colours)
    figure.update_layout(xaxis_title="d = √KL to the SFT model (√nats)", yaxis_title="gain over the SFT model",
                         height=480, margin=dict(t=30), legend=dict(font=dict(size=11)))
    return figure


def draw_arm(figure: go.Figure, doc: dict, prefix: str, colours: dict) -> None:
    drawn = study.curves(doc)
    fitted = doc.get("fits") or study.fits(doc)
    for form in study.FORMS:
        points, colour = drawn["points"][form], colours[form]
        if not points:
            continue
        text = [f"β={p['kl_coef']:g}, step {p['step']}" if form == "rl" else f"n={p['n']}" for p in points]
        for metric, symbol in (("gold", "circle"), ("rm", "x")):
            figure.add_trace(go.Scatter(x=[p["d"] for p in points], y=[p[f"{metric}_gain"] for p in points],
                                        mode="markers", marker=dict(color=colour, symbol=symbol, size=8),
                                        name=f"{prefix}{TITLES[form]}: {'gold' if metric == 'gold' else 'RM'}",
                                        text=text))
        curve = drawn["curves"].get(form, {})
        for metric, dash in (("gold", "solid"), ("rm", "dot")):
            if metric in curve:
                figure.add_trace(go.Scatter(x=curve["d"], y=curve[metric], mode="lines", line=dict(color=colour,
                                            dash=dash), name=f"{prefix}{TITLES[form]}: {metric} fit"))
        f = fitted.get(form) or {}
        if f.get("peak_sqrt_kl") is not None:
            figure.add_trace(go.Scatter(x=[f["peak_sqrt_kl"]], y=[f["peak_gold_gain"]], mode="markers",
                                        marker=dict(color=colour, symbol="star", size=16, line=dict(width=1)),
                                        name=f"{prefix}{TITLES[form]}: gold peak (d = {f['peak_sqrt_kl']:.2f})"))


REFRESHING = jobs.busy


@st.fragment(run_every=REFRESH_S if REFRESHING else None)
def show_study(run_id: str) -> None:
    job = jobs.get(run_id)
    status_col, action_col = st.columns([5, 1])
    if job.status in ("running", "stopping"):
        status_col.progress(job.fraction, text=f"{job.message}" if job.total else "starting")
    elif job.error:
        status_col.error(job.error)
    else:
        status_col.caption(f"`{job.status}` · {job.output_dir}")
    try:
        if job.owned and job.status in ("queued", "running") and action_col.button("Stop", key="study_stop"):
            jobs.stop(run_id)
            st.rerun()
        if job.status in ("interrupted", "stopped", "failed") and action_col.button("Resume", key="study_resume"):
            jobs.resume(run_id)
            st.rerun()
    except ValueError as exc:
        status_col.error(str(exc))
    doc = study.load_study(job.output_dir) if job.output_dir else None
    # A study.json written before the reward was a setting was scored by the RM alone.
    proxy = ((doc or {}).get("config") or job.config or {}).get("reward", "rm")
    st.caption(f"Proxy reward: `{proxy if isinstance(proxy, str) else json.dumps(proxy)}`"
               + (" (the reward model alone)" if proxy == "rm" else ""))
    if not doc or not (doc.get("rl") or doc.get("bon")):
        st.caption("No points yet: the chart appears with the first measurements (best-of-n comes first).")
        return
    st.plotly_chart(figure_for(doc), key=f"study_chart_{run_id}", width="stretch")
    rows = []
    for arm, prefix, _ in arms(doc):
        for form in study.FORMS:
            fit = (arm.get("fits") or {}).get(form) or {}
            rows.append({"method": prefix + TITLES[form], "α (gold)": fit.get("alpha"), "β (gold)": fit.get("beta"),
                         "gold peak at √KL": fit.get("peak_sqrt_kl"), "gold gain at the peak": fit.get("peak_gold_gain")})
    st.dataframe(pd.DataFrame(rows), hide_index=True)
    with st.expander("Points"):
        for arm, prefix, _ in arms(doc):
            if arm.get("sft"):
                st.caption(f"{prefix}SFT model: gold {arm['sft']['gold']:.3f}, RM {arm['sft']['rm']:.3f}")
            st.dataframe(pd.DataFrame(arm.get("rl", [])), hide_index=True)
            st.dataframe(pd.DataFrame(arm.get("bon", [])), hide_index=True)
    if REFRESHING and not jobs.busy:
        st.rerun()  # the job just finished: redraw once with the timer off


show_study(chosen)
