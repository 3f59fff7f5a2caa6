"""`rlhf`: the same stage functions as the app, headless.

    rlhf sft --preset quick --output out/sft
    rlhf rm --preset quick --set sft_model=out/sft --output out/rm
    rlhf ppo --preset quick --set sft_model=out/sft --set reward_model=out/rm --output out/ppo
    rlhf pipeline --demo --preset quick --output out
    rlhf rounds --demo --preset quick --rounds 3 --output out/rounds [--labeler simulated|team|page|rm:PATH|reward:SPEC]
    rlhf chat --model out/ppo --prompt "What is 3 plus 4?"
    rlhf doctor RUN [--json]
    rlhf eval --checkpoints bundled,out/sft,out/ppo --baseline out/sft --reward-model out/rm --output out/eval
    rlhf study overopt --demo --preset quick --output out/study
    rlhf bench sft|rm|ppo --against trl --json
    rlhf pretrain-demo
    rlhf plan ppo --preset quick --set sft_model=out/sft --set reward_model=out/rm [--json]
    rlhf ensemble --output out/rm-ensemble out/rm-a out/rm-b [...]   # reward models trained apart, as one
    rlhf label add-user NAME | batch --name B ... | serve [--host 127.0.0.1] [--port 7860] | status

Runs are recorded in the workbench store (RLHF_WORKBENCH_HOME) so the app's Monitor page shows
CLI runs too. Every config value is validated before any work starts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import typing
from pathlib import Path

import yaml

from core.config import PRESETS, REWARD_AGGREGATES, field_help, read_yaml
from core.stages import RECIPE, STAGES, get_stage, make_config


def parse_sets(pairs: list[str]) -> dict:
    """--set key=value, the value read as YAML (so 0.1 is a float, true a bool)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        # Read as YAML, so 0.1 is a float and true a bool; the config reads '2e-4' (text in YAML 1.1)
        # as a number where the field is one.
        out[key.strip()] = yaml.safe_load(value)
    return out


def stage_config(stage: str, args):
    """Preset, then the YAML file, then --set: later sources win; validated as a whole."""
    values = read_yaml(args.config) if args.config else {}
    values.update(parse_sets(args.set))
    return make_config(stage, args.preset, values)


def _events(store, run_id):
    from core.stages.events import Events

    return Events(store, run_id, console=True)


def _stage_events(store, run_id, dist):
    """Rank 0 records and prints; the other ranks' Events only take part in reductions and stops. Run
    by the job manager (a stop file in the environment), progress goes to stdout for it to read."""
    import os

    from core.stages.events import Events
    from core.runs.launch import STOP_FILE_ENV, progress_line

    stop_file = os.environ.get(STOP_FILE_ENV)
    if not dist.is_main:
        return Events(None, run_id, dist=dist, stop_file=stop_file)
    if stop_file is None:
        return Events(store, run_id, console=True, dist=dist)

    def report(done: int, total: int, message: str) -> None:
        print(progress_line(done, total, message), flush=True)

    return Events(store, run_id, on_progress=report, dist=dist, stop_file=stop_file)


def _relaunch(stage: str, config, args) -> int | None:
    """Under --processes/--accelerate-config: validate, then run this same command under `accelerate
    launch` and return its exit status. None: run here (one process, or already a launched rank)."""
    import os
    import subprocess

    from core.runs import launch
    from core.distributed import LAUNCHED_ENV

    if os.environ.get(LAUNCHED_ENV) == "1":
        return None
    processes = 1 if args.processes is None else args.processes
    if not launch.check(stage, config, processes, args.accelerate_config):
        return None
    from core.models.loading import pick_device

    cpu = pick_device(config.device).type == "cpu"
    argv = launch.command(processes, args.accelerate_config, cpu, launch.strip_launch_flags(args.argv))
    config_file = str(Path(args.accelerate_config).resolve()) if args.accelerate_config else None
    return subprocess.call(argv, env=launch.environment({launch.CONFIG_ENV: config_file} if config_file else None))


def cmd_stage(stage: str, args) -> int:
    config = stage_config(stage, args)  # validated before any heavy import or work
    if args.print_config:
        print(config.to_yaml())
        return 0
    from core.data.store import Store
    from core.paths import validate_name
    from core.stages import check_models

    run_id = validate_name(args.name or f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}", "run name")
    check_models(stage, config)
    if args.name is None and (args.processes is not None or args.accelerate_config):
        args.argv = [*args.argv, "--name", run_id]  # every rank must name the same run
    relaunched = _relaunch(stage, config, args)
    if relaunched is not None:
        return relaunched
    import os

    from core.distributed import Distributed
    from core.runs.launch import CONFIG_ENV, JOB_PARENT_ENV
    from core.models.loading import pick_device

    dist = Distributed.from_environment(cpu=pick_device(config.device).type == "cpu")
    # Absolute in the store: the app's server (another working directory) resumes this run from it.
    output = Path(args.output).resolve()
    if dist.is_main:
        store = Store()
        try:
            previous = store.get_run(run_id)
        except ValueError:
            previous = None
        if previous is not None and previous["status"] == "done":
            raise ValueError(f"run {run_id!r} is already done (output {previous['output_dir']}); pick another name")
        # A new run, or this name's interrupted/stopped/failed run resumed in place (same config, same output);
        # run by the job manager, the manager hands its queued run over to this process.
        parent = os.environ.get(JOB_PARENT_ENV)
        store.start_run(run_id, stage, config.to_dict(), str(output), handover_from=int(parent) if parent else None)
        accelerate_config = os.environ.get(CONFIG_ENV)
        if parent is None and (dist.world_size > 1 or accelerate_config):
            # Launched from a terminal: recorded like a job's launch request, so the app resumes it the same way
            # (no stop file: this command stops with Ctrl-C, not through the app).
            store.set_run_launch(run_id, {"processes": dist.world_size, "accelerate_config": accelerate_config})
        if previous is not None:
            print(f"resuming run {run_id} in {output}", file=sys.stderr)
    dist.barrier()  # the other ranks open the store once rank 0 has set it up
    if not dist.is_main:
        store = Store()  # read-only there: data comes from it, nothing is written to it
    events = _stage_events(store, run_id, dist)

    def record(status: str, error: str | None = None) -> None:
        if dist.is_main:
            store.set_run_status(run_id, status, error)

    try:
        get_stage(stage).runner(config, store, events, output)
    except KeyboardInterrupt:
        record("interrupted", "interrupted from the keyboard; run the same command to resume")
        raise
    except Exception as exc:
        record("failed", str(exc))
        raise
    record("stopped" if events.stopped else "done")
    dist.close()
    if dist.is_main:
        print(f"{stage} {'stopped' if events.stopped else 'finished'}: {output}")
        print(_doctor_line(store, run_id))
    return 0


def _doctor_line(store, run_id: str) -> str:
    """The run doctor's verdict in one line, printed and kept in the run's log (the Train page shows it)."""
    from core.analysis import doctor

    line = doctor.summary_line(doctor.diagnose_run(store, run_id), run_id)
    store.add_log(run_id, line)
    return line


def cmd_doctor(args) -> int:
    """rlhf doctor RUN: what the run's curves, rollouts and config show wrong, why, and what to try."""
    from core.analysis import doctor
    from core.data.store import Store

    findings = doctor.diagnose_run(Store(), args.run)  # an unknown run is a ValueError: exit 2 with its message
    if args.json:
        print(json.dumps([f.to_dict() for f in findings], indent=2))
    else:
        print(doctor.format_text(findings) if findings else doctor.summary_line(findings, args.run))
    return 0


def cmd_pipeline(args) -> int:
    if not args.demo:
        raise ValueError("the pipeline runs on the built-in demo task: pass --demo")
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    from core.runs.pipeline import run_pipeline
    from core.data.store import Store

    overrides = {s: parse_sets([kv.split(":", 1)[1] for kv in args.set if kv.startswith(s + ":")]) for s in STAGES}
    for kv in args.set:
        if kv.split(":", 1)[0] not in STAGES:
            raise ValueError(f"pipeline --set takes stage:key=value (stage {', '.join(STAGES)}), got {kv!r}")
    store = Store()
    report = run_pipeline(args.preset, args.output, store, _events(store, None), stages, overrides,
                          no_ptx_baseline=not args.no_ptx_baseline, eval_prompts=args.eval_prompts)
    print(json.dumps(report, indent=2))
    return 0


def cmd_rounds(args) -> int:
    """rlhf rounds: iterated RLHF on the demo task (core/runs/rounds.py), written to OUTPUT/report.json."""
    if not args.demo:
        raise ValueError("rounds run on the built-in demo task (its prompts, its simulated labeler): pass --demo")
    from core.config import RoundsConfig

    values = {"preset": args.preset, "rounds": args.rounds, "method": args.method, "labeler": args.labeler,
              "seed": args.seed, **parse_sets([kv for kv in args.set if ":" not in kv.split("=", 1)[0]])}
    for flag in ("prompts_per_round", "prompts", "episodes_per_round", "sft_model", "rm_init", "policy_init",
                 "reference", "labels_needed"):
        if getattr(args, flag) is not None:
            values[flag] = getattr(args, flag)
    if args.no_wait:
        values["wait"] = False
    config = RoundsConfig.from_dict(values)
    overrides: dict[str, dict] = {}
    for kv in args.set:
        stage, sep, rest = kv.partition(":")
        if sep and "=" not in stage:
            if stage not in STAGES:
                raise ValueError(f"rounds --set takes KEY=VALUE (a rounds field) or STAGE:KEY=VALUE (stage "
                                 f"{', '.join(STAGES)}), got {kv!r}")
            overrides.setdefault(stage, {}).update(parse_sets([rest]))
    from core.data.store import Store
    from core.runs.rounds import run_rounds

    store = Store()
    report = run_rounds(config, args.output, store, _events(store, None), overrides, name=args.name,
                        continue_now=args.go_on)
    print(json.dumps({k: report[k] for k in ("state", "round", "sft", "rounds")}, indent=2))
    return 0


def cmd_study(args) -> int:
    """rlhf study overopt: the over-optimisation study (core/runs/study.py), written to OUTPUT/study.json."""
    if not args.demo:
        raise ValueError("the over-optimisation study runs on the built-in demo task (it needs its gold labeler): "
                         "pass --demo")
    from core.runs.study import DEFAULT_KL_COEFS, DEFAULT_NS, study_config

    config = study_config(
        preset=args.preset, kl_coefs=args.kl_coefs or list(DEFAULT_KL_COEFS), ns=args.ns or list(DEFAULT_NS),
        episodes=args.episodes, eval_every=args.eval_every, eval_prompts=args.eval_prompts,
        bon_prompts=args.bon_prompts, sft_model=args.sft, reward_model=args.rm, ptx_coef=args.ptx_coef,
        ppo=parse_sets(args.set), ensemble=args.ensemble, reward_aggregate=args.reward_aggregate,
        uncertainty_coef=args.uncertainty_coef, ensemble_model=args.ensemble_rm,
        reward=args.reward)  # validated before any work
    from core.data.store import Store
    from core.runs.study import check_models, run_study

    check_models(config)  # --sft/--rm exist, hold safetensors weights and share a tokenizer
    store = Store()
    study = run_study(config, args.output, store, _events(store, None), name=args.name)
    print(json.dumps({k: study.get(k) for k in ("name", "sft", "bon", "rl", "fits", "ensemble") if k in study},
                     indent=2))
    return 0


def cmd_eval(args) -> int:
    """rlhf eval: checkpoints side by side (core/analysis/eval_table.py), written to OUTPUT/eval.csv and eval.json."""
    import dataclasses

    from core.analysis.eval_table import RESULTS_CSV, EvalConfig, check_inputs, run

    config = EvalConfig.from_dict({f.name: getattr(args, f.name) for f in dataclasses.fields(EvalConfig)
                                   if getattr(args, f.name) is not None})
    from core.data.store import Store
    from core.paths import validate_name

    store = Store()
    plan = check_inputs(config, store)  # before the run is recorded: a refused evaluation leaves nothing behind
    run_id = validate_name(args.name or f"eval-{time.strftime('%Y%m%d-%H%M%S')}", "run name")
    output = Path(args.output).resolve()
    store.start_run(run_id, "eval", config.to_dict(), str(output))
    try:
        run(config, store, _events(store, run_id), output, plan)
    except BaseException as exc:
        store.set_run_status(run_id, "failed", str(exc))
        raise
    store.set_run_status(run_id, "done")
    print((output / RESULTS_CSV).read_text(), end="")
    return 0


def cmd_chat(args) -> int:
    from core.models.chat import render_prompt
    from core.models.generate import stream
    from core.models.loading import load_policy, load_tokenizer

    model, tokenizer = load_policy(args.model), load_tokenizer(args.model)
    prompts = [args.prompt] if args.prompt else iter(lambda: input("you> "), "")
    conversation: list[dict] = []  # the turns so far, rendered by the model's chat template
    for prompt in prompts:
        conversation.append({"role": "user", "content": prompt})
        if args.show_prompt:
            print(f"--- prompt as the model reads it ---\n{render_prompt(tokenizer, conversation)}\n---")
        answer = ""
        for piece in stream(model, tokenizer, conversation, args.max_new_tokens, args.temperature, args.top_p,
                            args.seed):
            answer += piece
            print(piece, end="", flush=True)
        print()
        conversation.append({"role": "assistant", "content": answer})
    return 0


def cmd_import(args) -> int:
    """Import a file, saved dataset or hub dataset into the store (all or nothing); --dry-run shows
    the detected shape, the mapping and the first rows as they would be stored, and writes nothing."""
    from core.data.formats import parse_columns, read_rows, read_source, write_rows
    from core.data.store import Store, prompt_display

    columns = parse_columns(args.columns)
    shape, kind, rows = read_rows(read_source(args.source), args.source, columns)  # every row checked
    print(f"{args.source}: {len(rows)} rows, shape {shape} -> {kind}"
          + (f", columns {', '.join(f'{k}={v}' for k, v in columns.items())}" if columns else ""))
    for row in rows[: args.show]:
        prompt = row.get("prompt") or [*(row.get("context") or []), {"role": "user", "content": row["instruction"]}]
        shown = (row.get("extra") or {}) if kind == "prompts" else row.get("responses") or [row.get("output")]
        print(f"  {prompt_display(prompt)!r} -> {shown!r}"[:300])
    if args.dry_run:
        return 0
    store = Store(args.db) if args.db else Store()
    print(f"imported {write_rows(store, kind, rows)} {kind} into {store.path}")
    return 0


def cmd_pretrain(args) -> int:
    from core.models.pretrain import pretrain_demo

    from core.paths import BUNDLED_MODEL_DIR

    if args.init_seed is not None and not args.output:
        raise ValueError("--init-seed makes another base: give it its own --output, not the bundled model's place")
    saved = pretrain_demo(args.output or BUNDLED_MODEL_DIR, epochs=args.epochs, device=args.device,
                          init_seed=args.init_seed)
    print(f"saved {saved}")
    return 0


ALIGN_PROMPTS = 200  # prompts whose policy answers `rlhf ensemble --align-on` aligns the members on


def cmd_ensemble(args) -> int:
    """rlhf ensemble: one reward-model ensemble directory from reward models trained apart."""
    from core.models.ensemble import join_ensemble

    align = None
    if args.align_on:
        import functools

        from core.data.sources import load_prompts
        from core.data.store import Store
        from core.stages.evaluate import policy_member_means

        prompts = load_prompts(args.align_prompts, Store() if args.align_prompts == "store" else None)
        align = functools.partial(policy_member_means, policy=args.align_on, prompts=prompts[:ALIGN_PROMPTS])

    print(f"saved {join_ensemble(args.output, args.members, align)} ({len(args.members)} members)")
    return 0


def cmd_plan(args) -> int:
    """The memory planner: estimated peak memory by part, and whether it fits the device."""
    config = stage_config(args.stage, args)  # validated first; torch is imported only below
    from core.models.memory import plan

    prompt_length = args.prompt_length
    if prompt_length is None and args.stage == "ppo":
        from core.data.store import Store
        from core.models.memory import known_prompt_length

        # The prompts' real lengths, read from the demo, a file or the store (its prompts only when asked).
        prompt_length = known_prompt_length(config, Store() if config.prompts == "store" else None)
    kwargs = {} if prompt_length is None else {"prompt_length": prompt_length}
    result = plan(args.stage, config, device=args.device, **kwargs)
    print(json.dumps(result.to_dict()) if args.json else result.format())
    return 0


def cmd_bench(args) -> int:
    if args.threads:  # both sides' torch CPU threads (PPO's processes get --threads themselves)
        import torch

        torch.set_num_threads(args.threads)
    if args.what == "ppo":
        from benchmarks.compare_ppo import compare

        result = compare(args)
    else:
        from benchmarks.bench_stages import bench_rm, bench_sft

        result = (bench_sft if args.what == "sft" else bench_rm)(args)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description="The InstructGPT recipe: SFT -> RM -> PPO-ptx.")
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES.values():
        fields = "\n".join(f"  {name}: {text}" for name, text in field_help(stage.config_class).items())
        p = sub.add_parser(stage.name, help=stage.summary, formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog=f"config fields (--set KEY=VALUE or --config FILE):\n{fields}")
        p.add_argument("--config", help="YAML file of config values")
        p.add_argument("--preset", choices=sorted(PRESETS), help="scaled demo defaults")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one field")
        p.add_argument("--output", required=True, help="directory for the final HF model")
        p.add_argument("--name", help="run name in the store (default: stage + timestamp); the name of an "
                                      "interrupted, stopped or failed run resumes it in place")
        p.add_argument("--print-config", action="store_true", help="print the validated config as YAML and exit")
        p.add_argument("--processes", type=int, default=None, metavar="N",
                       help="run on N processes (one per GPU, or CPU processes) under `accelerate launch`; "
                            "batch sizes stay global (sft, rm, ppo)")
        p.add_argument("--accelerate-config", metavar="FILE",
                       help="accelerate config for the launch, e.g. configs/accelerate/zero2.yaml")
        p.set_defaults(func=lambda a, s=stage.name: cmd_stage(s, a))

    p = sub.add_parser("pipeline", help="run sft -> rm -> ppo on the demo task and write report.json")
    p.add_argument("--demo", action="store_true", help="use the built-in demo task (required)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--output", required=True)
    p.add_argument("--stages", default=",".join(RECIPE),
                   help=f"comma-separated, in order, from {','.join(STAGES)} (default: the recipe, {','.join(RECIPE)}); "
                        "dpo, grpo and rloo add a row each to the comparison")
    p.add_argument("--no-ptx-baseline", action="store_true", help="skip the ptx_coef=0 comparison run")
    p.add_argument("--set", action="append", default=[], metavar="STAGE:KEY=VALUE")
    p.add_argument("--eval-prompts", type=int, default=200, help="held-out prompts scored for every model")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("rounds", help="iterated RLHF on the demo: rounds of fresh rankings on the current policy, "
                                      "RM refit, stage 3 again; resumes where it stood")
    p.add_argument("--demo", action="store_true", help="use the built-in demo task (required)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--output", required=True, help="directory of the rounds (rounds.json, report.json, round-N/)")
    p.add_argument("--rounds", type=int, default=3, help="rounds in all, round 0 (SFT -> RM -> stage 3) included")
    p.add_argument("--method", default="ppo", help="stage 3: ppo, dpo, grpo or rloo")
    p.add_argument("--labeler", default="simulated", help="simulated, team (a labeling batch), page (the Rank page), "
                                                          "rm:PATH (a reward model ranks) or reward:SPEC (reward "
                                                          "terms rank, e.g. reward:exact)")
    p.add_argument("--prompts", help="where each round's fresh prompts come from: demo (default), store or a "
                                     "prompts file")
    p.add_argument("--prompts-per-round", dest="prompts_per_round", type=int, help="fresh prompts ranked a round")
    p.add_argument("--episodes-per-round", dest="episodes_per_round", type=int, help="stage 3 episodes a round")
    p.add_argument("--sft", dest="sft_model", help="start from this SFT checkpoint instead of training SFT")
    p.add_argument("--rm-init", dest="rm_init", choices=("sft", "previous"), help="each round's RM starts from")
    p.add_argument("--policy-init", dest="policy_init", choices=("previous", "sft"), help="stage 3 starts from")
    p.add_argument("--reference", choices=("auto", "sft", "previous"), help="stage 3's reference policy")
    p.add_argument("--labels-needed", dest="labels_needed", type=int, help="team/page: rankings before going on")
    p.add_argument("--no-wait", action="store_true", help="team/page: stop while waiting for labels; run again later")
    p.add_argument("--continue", dest="go_on", action="store_true",
                   help="a round waiting for labels goes on with the rankings in (at least 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", help="run name in the store (default: rounds + timestamp)")
    p.add_argument("--set", action="append", default=[], metavar="[STAGE:]KEY=VALUE",
                   help="a rounds field (KEY=VALUE) or a stage's (rm:epochs=2)")
    p.set_defaults(func=cmd_rounds)

    p = sub.add_parser("study", help="studies on the demo task: overopt (reward-model over-optimisation)")
    study_sub = p.add_subparsers(dest="study", required=True)
    p = study_sub.add_parser(
        "overopt", help="KL sweep of PPO runs + best-of-n, gold and RM score against sqrt(KL), fitted (Gao et al. 2022)",
        description="Over-optimisation study: PPO runs at several kl_coef and best-of-n from the SFT model, each "
                    "scored by the RM (proxy) and the demo labeler (gold) against d = sqrt(KL to SFT); writes "
                    "OUTPUT/study.json. Run it again with the same options to resume (done points are skipped).")
    p.add_argument("--demo", action="store_true", help="use the built-in demo task (required)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--output", required=True, help="directory for study.json, the models and the sweep runs")
    p.add_argument("--sft", help="reuse this SFT model (with --rm); otherwise the study trains SFT and RM first")
    p.add_argument("--rm", help="reuse this reward model (with --sft)")
    p.add_argument("--kl-coefs", help="comma-separated betas of the sweep (default 0.2,0.1,0.05,0.02,0.005)")
    p.add_argument("--ns", help="comma-separated best-of-n sizes, powers of two (default 1,2,4,...,64)")
    p.add_argument("--episodes", type=int, default=2048, help="PPO episodes per sweep run")
    p.add_argument("--eval-every", type=int, default=4, help="PPO steps between evaluations of a sweep run")
    p.add_argument("--eval-prompts", type=int, default=100, help="held-out prompts per evaluation")
    p.add_argument("--bon-prompts", type=int, default=50, help="held-out prompts for best-of-n")
    p.add_argument("--ptx-coef", type=float, default=0.0, help="the sweep's ptx term (0: plain PPO, as in the paper)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a PPO config field")
    p.add_argument("--ensemble", type=int, default=0, metavar="N",
                   help="add an ensemble arm: the same best-of-n and sweep scored by an ensemble of N (2-16) reward "
                        "models (trained as the study's RM, or --ensemble-rm)")
    p.add_argument("--reward-aggregate", choices=REWARD_AGGREGATES, default="mean_minus_std",
                   help="the ensemble arm's reward (default mean_minus_std: mean - uncertainty_coef x std)")
    p.add_argument("--uncertainty-coef", type=float, default=1.0, help="lambda of mean_minus_std (default 1)")
    p.add_argument("--ensemble-rm", help="reuse this ensemble RM directory (with --sft, --rm and --ensemble)")
    p.add_argument("--reward", default="rm", metavar="SPEC",
                   help="the proxy the sweep optimises and best-of-n picks by: reward terms as PPO's reward field "
                        "(default rm; e.g. rm,length:target=12:weight=-0.05); gold stays the demo's labeler")
    p.add_argument("--name", help="run name in the store (default: the study's earlier name in OUTPUT, else "
                                  "study + timestamp)")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("eval", help="checkpoints side by side: RM score, gold, KL, length, win rate; as CSV",
                       description="Sample one answer per prompt from every checkpoint (one seed for all) and tabulate "
                                   "the mean RM score, gold (demo prompts only), KL to a reference, answer length and "
                                   "the win rate against a baseline judged by the RM (ties count half); writes "
                                   "OUTPUT/eval.csv and OUTPUT/eval.json and prints the CSV.")
    from core.analysis.eval_table import EvalConfig  # a dataclass of plain values: no torch

    for name, text in field_help(EvalConfig).items():
        kind = typing.get_type_hints(EvalConfig)[name]
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, help=text,
                       required=name in ("checkpoints", "reward_model"))
    p.add_argument("--output", required=True, help="directory for eval.csv and eval.json")
    p.add_argument("--name", help="run name in the store (default: eval + timestamp)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("doctor", help="what a run's curves show wrong, the likely cause, and what to try",
                       description="Read a run's metrics, rollouts and config (a pipeline run: every stage run and "
                                   "its report) and print each finding: severity (info, warning, error), what was "
                                   "seen with its numbers and steps, the likely cause, and the config field to try.")
    p.add_argument("run", help="run name in the store (as the Monitor page lists it)")
    p.add_argument("--json", action="store_true", help="a JSON list of findings: severity, check, seen, cause, "
                                                      "try, field, value, stage, run")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("chat", help="chat with a checkpoint (streamed)")
    p.add_argument("--model", default="bundled")
    p.add_argument("--prompt")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show-prompt", action="store_true", help="print the exact text fed to the model (its chat template)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("pretrain-demo", help="rebuild the bundled tiny base model in assets/")
    p.add_argument("--output", default=None)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--init-seed", dest="init_seed", type=int, default=None,
                   help="another base of the same corpus and tokenizer: this seed initialises the weights and orders "
                        "the blocks (members of a reward-model ensemble from different bases)")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("ensemble", help="one reward-model ensemble from reward models trained apart (from "
                                        "different base models, say); every stage loads it as `rlhf rm --set "
                                        "ensemble=N` saves it")
    p.add_argument("members", nargs="+", help="reward-model directories; the first is member 0 (PPO's value model "
                                              "starts from it)")
    p.add_argument("--output", required=True, help="the ensemble's directory (must not exist)")
    p.add_argument("--align-on", dest="align_on", metavar="POLICY",
                   help="move each member's centre to member 0's mean on this policy's answers (the SFT model the "
                        "ensemble will judge), so the members' spread is their disagreement, not their offsets")
    p.add_argument("--align-prompts", dest="align_prompts", default="demo",
                   help=f"the prompts of those answers (the first {ALIGN_PROMPTS}): demo, store or a prompts file")
    p.set_defaults(func=cmd_ensemble)

    p = sub.add_parser("plan", help="estimated peak memory of a stage by part, and whether it fits the device")
    p.add_argument("stage", choices=("sft", "rm", "ppo"))
    p.add_argument("--config", help="YAML file of config values")
    p.add_argument("--preset", choices=sorted(PRESETS), help="scaled demo defaults")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one field")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                   help="check against this device (default: the config's device)")
    p.add_argument("--prompt-length", type=int, default=None,
                   help="ppo: prompt tokens (default: the longest of the config's prompts, at most "
                        "max_prompt_length)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("import", help="import demonstrations, rankings/pairs or prompts into the store, in any "
                                      "public dataset shape (README: Data formats)")
    p.add_argument("source", help="a JSONL/CSV/Parquet file, a save_to_disk directory, a hub dataset id "
                                  "owner/name[:config][@split], or a reasoning-gym set generated offline, "
                                  "reasoning-gym:NAME[:size=N][:seed=S][:OPTION=VALUE] (prompts with answers)")
    p.add_argument("--columns", default="", help="rename the file's columns first: prompt=question,chosen=good")
    p.add_argument("--dry-run", action="store_true", help="show the shape, mapping and first rows; write nothing")
    p.add_argument("--show", type=int, default=3, help="rows to show")
    p.add_argument("--db", default="", help="the store's file (default: the workbench's)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("bench", help="throughput against TRL on the same shapes")
    p.add_argument("what", choices=("sft", "rm", "ppo"))
    p.add_argument("--against", choices=("trl", "none"), default="trl")
    p.add_argument("--k", type=int, default=4, help="rm: answers per ranking")
    p.add_argument("--examples", type=int, default=512, help="sft/rm: training rows")
    from benchmarks.options import add_args  # the PPO shape options, without importing torch

    add_args(p)
    p.set_defaults(func=cmd_bench)

    from core.labeling.cli import add_parser as add_label_parser  # rlhf label ... (no torch, no gradio)

    add_label_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # re-run as is under `accelerate launch`
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"rlhf: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
