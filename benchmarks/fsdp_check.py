"""SFT and PPO under `accelerate launch` with an accelerate config on one process, against the same run on
the plain single-process path: the per-step curves side by side (part c of benchmarks/gpu_check.sh).

    python -m benchmarks.fsdp_check --device cuda --accelerate-config configs/accelerate/fsdp2.yaml --steps 20
    python -m benchmarks.fsdp_check --device cpu --accelerate-config configs/accelerate/ddp.yaml --steps 4

Every run is `python -m core.cli <stage>` in a fresh process on the bundled model, recorded in a store of
its own, whose metrics table gives the curves. `rlhf ppo` refuses a config that shards the weights (FSDP2,
ZeRO-3: core/runs/launch.py); the refusal is recorded and PPO runs under `--ppo-fallback-config` instead.
Prints a JSON line after each stage, the last one complete.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CURVES = {"sft": ("sft_loss",), "ppo": ("value_loss", "reward", "kl", "policy_loss")}
SFT_BATCH, PPO_BATCH = 8, 16


def stage_args(stage: str, steps: int, device: str) -> list[str]:
    """`steps` optimisation steps of the stage on the bundled model (SFT holds out a twentieth of its rows)."""
    if stage == "sft":
        rows = steps * SFT_BATCH * 20 // 19
        sets = [f"n_demonstrations={rows}", "epochs=1", f"batch_size={SFT_BATCH}", "eval_prompts=0"]
    else:
        sets = ["sft_model=bundled", "reward_model=bundled", f"batch_size={PPO_BATCH}",
                f"total_episodes={PPO_BATCH * steps}", "response_length=16", "eval_prompts=0", "save_every=1000"]
    return ["--preset", "quick", *[x for s in [*sets, f"device={device}"] for x in ("--set", s)]]


def run_stage(stage: str, args: list[str], name: str, home: Path, launch: list[str]) -> dict:
    env = {**os.environ, "RLHF_WORKBENCH_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "core.cli", stage, *args, "--output", str(home / name), "--name", name, *launch]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    result = {"rc": proc.returncode, "seconds": round(time.perf_counter() - start, 1)}
    if proc.returncode:
        result["stderr_tail"] = proc.stderr[-1500:]
    return result


def curves(db: Path, run: str, names: tuple[str, ...]) -> dict[str, list[float]]:
    with sqlite3.connect(db) as conn:
        return {name: [v for _, v in conn.execute("SELECT step, value FROM metrics WHERE run_id = ? AND name = ? "
                                                  "ORDER BY step", (run, name))] for name in names}


def compare(single: dict[str, list[float]], launched: dict[str, list[float]]) -> dict[str, dict]:
    out = {}
    for name, ref in single.items():
        other = launched.get(name, [])
        n = min(len(ref), len(other))
        if not n:
            out[name] = {"steps": 0}
            continue
        diffs = [abs(a - b) for a, b in zip(ref[:n], other[:n])]
        rel = [d / abs(a) if a else None for d, a in zip(diffs, ref[:n])]
        out[name] = {"steps": n, "same_step_count": len(ref) == len(other), "max_abs_diff": max(diffs),
                     "last_abs_diff": diffs[-1], "last_rel_diff": rel[-1],
                     "max_rel_diff": max((r for r in rel if r is not None), default=None)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--accelerate-config", default="configs/accelerate/fsdp2.yaml")
    parser.add_argument("--ppo-fallback-config", default="configs/accelerate/ddp.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--stages", default="sft,ppo")
    args = parser.parse_args()
    report: dict = {"part": "c", "device": args.device, "steps": args.steps,
                    "accelerate_config": args.accelerate_config}
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        for stage in [s.strip() for s in args.stages.split(",") if s.strip()]:
            cli_args = stage_args(stage, args.steps, args.device)
            entry = {"single": run_stage(stage, cli_args, f"{stage}-single", home, [])}
            launch = ["--processes", "1", "--accelerate-config", args.accelerate_config]
            entry["launched"] = run_stage(stage, cli_args, f"{stage}-launched", home, launch)
            entry["launched"]["accelerate_config"] = args.accelerate_config
            refusal = entry["launched"].get("stderr_tail", "")
            if stage == "ppo" and entry["launched"]["rc"] == 2 and "ppo runs on" in refusal:
                entry["refused"] = refusal.strip().splitlines()[-1]
                launch = ["--processes", "1", "--accelerate-config", args.ppo_fallback_config]
                entry["launched"] = run_stage(stage, cli_args, f"{stage}-launched", home, launch)
                entry["launched"]["accelerate_config"] = args.ppo_fallback_config
            db = home / "workbench.db"
            if entry["single"]["rc"] == 0 and entry["launched"]["rc"] == 0:
                single = curves(db, f"{stage}-single", CURVES[stage])
                launched = curves(db, f"{stage}-launched", CURVES[stage])
                entry["curves"] = {"single": single, "launched": launched}
                entry["difference"] = compare(single, launched)
            report[stage] = entry
            print(json.dumps(report), flush=True)  # after each stage: a run cut off by the time limit keeps the first


if __name__ == "__main__":
    main()
