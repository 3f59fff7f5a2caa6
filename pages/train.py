"""Train: configure and launch SFT / RM / PPO, one job at a time with the rest queued; stop, resume.

The form shows only the chosen stage's fields; each is checked as it is edited and an error
appears under the field. Stage 3's reward is picked as a list of terms with their options and weights
(workbench/reward_picker.py). Launching shows the equivalent `rlhf` command and YAML.
"""

import dataclasses
import shlex
import typing
from pathlib import Path

import streamlit as st
import yaml

from core.config import PRESETS, STAGE3_METHODS, RoundsConfig, field_help
from core.runs.jobs import pipeline_config
from core.runs.launch import CONFIGS_DIR
from core.models.memory import PLANNED_STAGES, plan
from core.stages import STAGES, make_config
from workbench import resources
from workbench.reward_picker import RewardPicker

store = resources.store()
jobs = resources.jobs()
RECENT_JOBS = 8
LOG_LINES = 20
# The rounds' labelers (RoundsConfig.labeler): rm and reward take a model or terms below.
ROUND_LABELERS = {"simulated": "simulated (the demo's labeler)", "team": "team (a labeling batch)",
                  "page": "page (the Rank page)", "rm": "a reward model (rm:PATH)",
                  "reward": "reward terms (reward:SPEC)"}
PROMPT_POOLS = {"demo": "the demo's prompts", "store": "the store's prompts", "file": "a prompts file"}
POLICY_INITS = {"previous": "the previous round's policy", "sft": "the SFT model"}

st.title("Train")

with st.container(border=True):
    st.markdown("**First time here?** Run the whole recipe on the built-in demo task: SFT, then a reward "
                "model from simulated rankings, then PPO-ptx and PPO without ptx (quick preset, 3 to 5 minutes on "
                "a 2-core laptop CPU). The demo's prompts, demonstrations and rankings go into your store first, and "
                "training reads them from there; watch it on the Monitor page, the results land on Home.")
    if st.button("Run demo pipeline", type="primary", icon=":material/play_arrow:"):
        st.session_state["pipeline_notice"] = f"Queued **{jobs.submit('pipeline', pipeline_config('quick'))}**"
        st.rerun()
    if notice := st.session_state.pop("pipeline_notice", None):
        st.success(notice)
    st.caption("Same from a terminal: `rlhf pipeline --demo --preset quick --output runs/demo`")

def rounds_form() -> None:
    """The rounds run's inputs, as `rlhf rounds` takes them; RoundsConfig and check_rounds judge them on Run."""
    docs = field_help(RoundsConfig)
    st.caption("Round 0 is the recipe (SFT → RM → stage 3). Each later round samples the last policy on fresh "
               "prompts, has the answers ranked, refits the reward model on every ranking so far and trains "
               "stage 3 again. Each round shows the RM's accuracy on the previous policy's answers before and "
               "after its refit (Monitor, Home).")
    left, mid, right = st.columns(3)
    n_rounds = left.number_input("Rounds", 1, 20, 3, key="rounds_n", help=docs["rounds"])
    method = mid.selectbox("Stage 3", list(STAGE3_METHODS), key="rounds_method")
    labeler = right.selectbox("Labeler", list(ROUND_LABELERS), format_func=ROUND_LABELERS.get, key="rounds_labeler",
                              help=docs["labeler"])
    error = None
    if labeler == "rm":
        judges = resources.checkpoint_choices(store, "rm")
        judge = st.selectbox("Labeler reward model", list(judges), key="rounds_labeler_rm", accept_new_options=True,
                             help="a reward model (larger than the one the rounds refit) ranks each round's answers: "
                                  "a checkpoint, or type a model directory")
        labeler = f"rm:{judges.get(judge, judge or '')}"
        if not judge:
            error = "Pick the reward model that ranks the answers (or type its directory)."
            st.error(error, icon=":material/error:")
    elif labeler == "reward":
        st.caption("Reward terms rank each round's answers by their weighted total (a verifier as the labeler, "
                   "for prompts whose rows hold the answer): the reward model cannot be one of them.")
        spec, error = RewardPicker("rounds_reward", "exact").draw()
        if spec is not None:
            labeler = f"reward:{spec}"
            try:
                RoundsConfig.from_dict({"labeler": labeler})
            except ValueError as exc:
                error = str(exc)
                st.error(error, icon=":material/error:")
    left, mid, right = st.columns(3)
    pool = left.selectbox("Prompt pool", list(PROMPT_POOLS), format_func=PROMPT_POOLS.get, key="rounds_pool",
                          help=docs["prompts"])
    prompts = pool
    if pool == "file":
        prompts = mid.text_input("Prompts file", key="rounds_prompts_file", placeholder="prompts.jsonl",
                                 help="JSONL, CSV or Parquet with a prompt column (and the columns reward terms read)")
    per_round = right.number_input("Prompts per round", 1, 5000, 267, key="rounds_prompts",
                                   help=docs["prompts_per_round"])
    left, mid, right = st.columns(3)
    episodes = left.number_input("Episodes per round", 1, 100_000, 512, key="rounds_episodes",
                                 help=docs["episodes_per_round"])
    temperature = mid.number_input("Sample temperature (rounds ≥ 1)", 0.05, 2.0, 1.0, 0.05,
                                   key="rounds_sample_temperature", help=docs["sample_temperature"])
    sft_from = right.text_input("SFT checkpoint (empty: train one)", key="rounds_sft")
    policy_init = left.selectbox("Stage 3 starts from", list(POLICY_INITS), format_func=POLICY_INITS.get,
                                 key="rounds_policy_init", help=docs["policy_init"] + ". From SFT, each round's policy "
                                 "is trained afresh against the refit reward model, so an earlier round's "
                                 "over-optimised answers are not carried on (README, \"Iterated RLHF: rounds\")")
    rounds = {"rounds": int(n_rounds), "method": method, "labeler": labeler, "prompts": prompts.strip(),
              "prompts_per_round": int(per_round), "episodes_per_round": int(episodes),
              "sample_temperature": float(temperature), "sft_model": sft_from.strip(), "policy_init": policy_init}
    if st.button("Run rounds", icon=":material/repeat:", disabled=error is not None):
        try:
            st.session_state["rounds_notice"] = f"Queued **{jobs.submit('rounds', {'rounds': rounds})}**"
            st.rerun()
        except ValueError as exc:
            st.error(str(exc))
    if notice := st.session_state.pop("rounds_notice", None):
        st.success(notice)
    st.caption(f"Same from a terminal: `{rounds_command(rounds)}`")


def rounds_command(rounds: dict) -> str:
    """The `rlhf rounds` line of the form's values (the fields without a flag of their own go through --set)."""
    words = ["rlhf", "rounds", "--demo", "--preset", "quick", "--rounds", str(rounds["rounds"]), "--method",
             rounds["method"], "--labeler", rounds["labeler"], "--prompts", rounds["prompts"],
             "--prompts-per-round", str(rounds["prompts_per_round"]),
             "--episodes-per-round", str(rounds["episodes_per_round"])]
    if rounds["sft_model"]:
        words += ["--sft", rounds["sft_model"]]
    if rounds["policy_init"] != RoundsConfig().policy_init:
        words += ["--policy-init", rounds["policy_init"]]
    if rounds["sample_temperature"] != RoundsConfig().sample_temperature:
        words += ["--set", f"sample_temperature={rounds['sample_temperature']:g}"]
    return shlex.join([*words, "--output", "runs/rounds"])


with st.expander("Iterated RLHF: rounds of fresh rankings on the current policy"):
    rounds_form()

@st.fragment(run_every=2 if jobs.busy else None)
def jobs_table() -> None:
    all_jobs = list(reversed(jobs.jobs()))
    st.subheader("Jobs")
    if not all_jobs:
        st.caption("No runs yet.")
    older = st.expander(f"{len(all_jobs) - RECENT_JOBS} older runs") if len(all_jobs) > RECENT_JOBS else None
    for i, job in enumerate(all_jobs):
        with (st.container(border=True) if i < RECENT_JOBS else older):
            name_col, bar_col, action_col = st.columns([2, 4, 1])
            several = job.processes != 1 or job.accelerate_config  # a subprocess job under `accelerate launch`
            launch = f" · {job.processes} processes" + (f" ({Path(job.accelerate_config).name})"
                                                        if job.accelerate_config else "") if several else ""
            name_col.markdown(f"**{job.run_id}**  \n{job.stage} · `{job.status}`{launch}")
            if job.status in ("running", "stopping"):
                bar_col.progress(job.fraction, text=f"{job.done}/{job.total} {job.message}" if job.total else "starting")
            elif job.error:
                bar_col.error(job.error)
                if job.traceback:
                    with bar_col.expander("Traceback"):
                        st.code(job.traceback)
            else:
                bar_col.caption(job.message or job.output_dir)
            if log := store.run_log(job.run_id, LOG_LINES):
                # The stage's own messages (resume notices, epoch summaries), newest last.
                with bar_col.expander(f"Log ({len(log)} latest)"):
                    st.code("\n".join(line["message"] for line in log), language=None)
            try:
                # A subprocess job launched before a server restart is stopped through its stop file.
                stoppable = job.owned or (several and job.status == "running")
                if stoppable and job.status in ("queued", "running") and action_col.button("Stop", key=f"stop_{job.run_id}"):
                    jobs.stop(job.run_id)
                    st.rerun()
                if job.output_dir and job.status in ("interrupted", "stopped", "failed") and action_col.button(
                        "Resume", key=f"resume_{job.run_id}"):
                    jobs.resume(job.run_id)
                    st.rerun()
            except ValueError as exc:
                bar_col.error(str(exc))
    if not jobs.busy and any(j.owned for j in all_jobs):
        st.rerun()  # a job just finished: redraw once with the timer off


jobs_table()

st.subheader("New run")
stage = st.segmented_control("Stage", list(STAGES), format_func=lambda name: STAGES[name].title, default="sft",
                             key="train_stage") or "sft"
preset = st.selectbox("Preset", [*PRESETS, "defaults (InstructGPT scale)"], key="train_preset",
                      help="quick/full are scaled for the bundled model; defaults are the paper's values")
preset = preset if preset in PRESETS else None
spec = STAGES[stage]
cls = spec.config_class
docs = field_help(cls)
base = make_config(stage, preset).to_dict()
prefix = f"cfg_{stage}_{preset}_"

loaded = st.file_uploader("Load a config (YAML)", type=["yaml", "yml"], key=f"load_{stage}")
if loaded is not None and st.session_state.get("loaded_config") != (stage, loaded.file_id):
    try:
        values = yaml.safe_load(loaded.getvalue()) or {}
        cls.from_dict(values)  # reject a bad file whole
        for name, value in values.items():
            st.session_state[prefix + name] = "" if value is None else (
                str(value) if typing.get_type_hints(cls)[name] in (float, float | None) else value)
        st.session_state["loaded_config"] = (stage, loaded.file_id)
        st.rerun()
    except (ValueError, yaml.YAMLError, AttributeError) as exc:
        st.error(f"Config not loaded: {exc}")

values: dict = {}
errors: dict[str, str] = {}

reward = None
if "reward" in base:  # stage 3 scored by reward terms (PPO, GRPO, RLOO): picked first, it decides which models
    st.subheader("Reward")
    st.caption("The reward is a weighted sum of terms: the reward model, built-in verifiers, your own function. "
               "Each is logged as reward/<term> beside the total.")
    reward, reward_error = RewardPicker(prefix + "reward", base["reward"]).draw()
    if reward_error:
        errors["reward"] = reward_error
    else:
        values["reward"] = reward

st.subheader("Input checkpoints")
pickers = {
    "model": ("Base model", {"bundled": "bundled", **resources.checkpoint_choices(store, "base")}),
    "sft_model": ("SFT checkpoint", resources.checkpoint_choices(store, "sft")),
    "reward_model": ("Reward model", resources.checkpoint_choices(store, "rm")),
}
# Stage 3 whose reward terms do not include the reward model ('gold', verifiers, your own function) needs no
# reward model.
optional = make_config(stage, preset, {"reward": reward}).optional_models() if reward else ()
for name in spec.model_fields:
    label, options = pickers[name]
    if name in optional:
        st.caption(f"{label}: not needed, no reward term is the reward model"
                   + (" ('gold' is the demo's labeler itself: cheating on the proxy)" if "gold" in str(reward) else ""))
    elif options:
        values[name] = options[st.selectbox(label, list(options), key=f"pick_{stage}_{name}")]
    else:
        st.error(f"{label}: none yet. Train the earlier stage first (or run the demo pipeline).")
        errors[name] = "missing"


def field_widget(field: dataclasses.Field, hint) -> object:
    """One config field as a widget of its type; floats are text so 9.65e-6 and 'empty' both fit."""
    key, help_text = prefix + field.name, docs.get(field.name)
    default = base[field.name]
    choices = cls._choices.get(field.name)
    if choices:
        return st.selectbox(field.name, choices, index=choices.index(default), key=key, help=help_text)
    if hint is bool:
        return st.checkbox(field.name, value=default, key=key, help=help_text)
    if hint is int:
        return st.number_input(field.name, value=default, step=1, key=key, help=help_text)
    if hint in (float, float | None):
        text = st.text_input(field.name, value="" if default is None else f"{default:g}", key=key, help=help_text)
        if not text.strip():
            return None
        try:
            return float(text)
        except ValueError:
            return text  # from_dict names the field and the type it wants
    return st.text_input(field.name, value=default, key=key, help=help_text)


st.subheader(f"{spec.title} settings")
hints = typing.get_type_hints(cls)
fields = [f for f in dataclasses.fields(cls) if f.name not in spec.model_fields and f.name != "reward"]
columns = st.columns(3)
checked_base = {**base, **values}
for i, field in enumerate(fields):
    with columns[i % 3]:
        values[field.name] = field_widget(field, hints[field.name])
        try:  # the field alone against otherwise valid values: the error belongs to it
            cls.from_dict({**checked_base, field.name: values[field.name]})
        except ValueError as exc:
            errors[field.name] = str(exc)
            st.error(str(exc), icon=":material/error:")

config = None
if not errors:
    try:
        config = cls.from_dict(values)
    except ValueError as exc:  # a rule across fields (PPO: batch_size divisible by num_minibatches)
        st.error(str(exc))


@st.cache_data(ttl=30, show_spinner=False)
def memory_plan(stage_name: str, config_yaml: str):
    return plan(stage_name, cls.from_dict(yaml.safe_load(config_yaml)))


if config is not None and stage in PLANNED_STAGES:
    # The estimated peak memory by part for these values, against this machine (core/models/memory.py).
    try:
        memory = memory_plan(stage, config.to_yaml())
    except ValueError as exc:
        memory = None
        st.warning(f"No memory plan: {exc}")
    if memory is not None:
        with st.expander(f"Memory plan: {memory.verdict}", expanded=memory.fits is False):
            st.dataframe(memory.rows(), hide_index=True)
            (st.success if memory.fits else st.error if memory.fits is False else st.info)(memory.verdict)
            for text in memory.suggestions:
                st.markdown(f"- {text}")
            st.caption(f"`rlhf plan {stage} --config {stage}.yaml` prints the same table.")

run_name = st.text_input("Run name (optional)", key="train_run_name",
                         help="letters, digits, '.', '_' or '-'; empty picks a name with the date")
# Several processes (GPUs, or CPU processes) run the stage under `accelerate launch` in a subprocess.
launch_cols = st.columns(2)
processes = launch_cols[0].number_input("Processes", min_value=1, value=1, step=1, key="train_processes",
                                        help="1: a background thread, as always. More: one process per GPU "
                                             "(or CPU processes); batch sizes stay global (SFT, RM, PPO)")
accelerate_configs = {"default (DDP)": None, **{p.name: str(p) for p in sorted(CONFIGS_DIR.glob("*.yaml"))}}
accelerate_config = accelerate_configs[launch_cols[1].selectbox(
    "Accelerate config", list(accelerate_configs), key="train_accelerate_config", disabled=processes == 1,
    help="configs/accelerate/: ddp (GPUs or CPU processes); zero2, zero3 (DeepSpeed, an optional extra) and fsdp2 on GPUs only")]
if processes == 1:
    accelerate_config = None
if st.button("Launch", type="primary", disabled=config is None, icon=":material/rocket_launch:"):
    try:
        run_id = jobs.submit(stage, config, run_id=run_name.strip() or None, processes=int(processes),
                             accelerate_config=accelerate_config)
        st.session_state["last_launch"] = run_id
        st.session_state["launch_notice"] = f"Launched **{run_id}**" + (
            " (queued behind the running job)" if jobs.get(run_id).status == "queued" else "")
        st.rerun()  # redraw the jobs table above with its timer on
    except ValueError as exc:
        st.error(f"Not launched: {exc}")
if notice := st.session_state.pop("launch_notice", None):
    st.success(notice)

if config is not None:
    config_yaml = config.to_yaml()
    with st.expander("Equivalent command and YAML", expanded=bool(st.session_state.get("last_launch"))):
        name = run_name.strip() or "<run-name>"
        launch = f" --processes {processes}" if processes > 1 else ""
        launch += f" --accelerate-config {accelerate_config}" if accelerate_config else ""
        st.code(f"rlhf {stage} --config {stage}.yaml --name {name} --output {jobs.runs_dir / name / 'model'}{launch}",
                language="bash")
        st.code(config_yaml, language="yaml")
        st.download_button("Save config", config_yaml, file_name=f"{stage}.yaml", mime="application/yaml")
