"""`rlhf bench ppo --against trl`: ours (`benchmarks/bench_ppo.py`) and TRL 1.12's PPOTrainer
(`benchmarks/trl_ppo_reference.py`, run by the side venv `.bench-venv`, since TRL dropped its PPO trainer
in 1.13) on the same shape, alternating for `--pairs` rounds, each run a fresh process.

Create the side venv once (`benchmarks/compare_trl_ppo.sh` does it): `python -m venv --system-site-packages
.bench-venv && .bench-venv/bin/pip install trl==1.12.0 --no-deps`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.options import add_args
from benchmarks.paired import summarize
from benchmarks.shapes import model_config
from benchmarks.update_ceiling import ceiling_share

ROOT = Path(__file__).resolve().parents[1]
SIDE_PYTHON = ROOT / ".bench-venv" / "bin" / "python"


def shape_argv(args: argparse.Namespace) -> list[str]:
    """The benchmark options of `args` as command-line arguments, for the two sides' processes."""
    parser = argparse.ArgumentParser()
    add_args(parser)
    argv = []
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if not action.option_strings or value is None or action.dest in ("json", "pairs", "ceiling"):
            continue
        if isinstance(action, argparse._StoreTrueAction):
            argv += [action.option_strings[0]] if value else []
        else:
            argv += [action.option_strings[0], str(value)]
    return argv


def _run(command: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(args: argparse.Namespace) -> dict:
    model_config(args)  # a bad --config fails here, before any run
    argv = shape_argv(args)
    with_trl = args.against == "trl"
    if with_trl and not SIDE_PYTHON.is_file():
        print(f"rlhf: no side venv at {SIDE_PYTHON} (see benchmarks/compare_ppo.py): measuring ours only",
              file=sys.stderr)
        with_trl = False
    rows = []
    for _ in range(max(1, args.pairs)):
        rows.append(_run([sys.executable, "-m", "benchmarks.bench_ppo", "--json", *argv]))
        if with_trl:
            rows.append(_run([str(SIDE_PYTHON), "benchmarks/trl_ppo_reference.py", *argv]))
    ours = [r for r in rows if not r["impl"].startswith("trl")]
    result = {"bench": "ppo", "unit": "episodes/s", "ours": statistics.median(r["episodes_per_s"] for r in ours),
              "ours_runs": [r["episodes_per_s"] for r in ours], "shape": ours[-1]["shape"],
              "precision": ours[-1]["precision"], "threads": ours[-1]["threads"], "ours_last": ours[-1]}
    if with_trl:  # the medians as benchmarks/paired.py takes them for compare_trl_ppo.sh and the GPU check
        summary = summarize(rows)
        result |= {"trl": summary["trl_episodes_per_s"], "trl_runs": summary["trl_runs"],
                   "trl_version": summary["trl"], "ratio": summary["ratio"]}
    result |= ceiling_share(args, "ppo", result["ours"])
    if "ceiling_gemm_s" in result:
        # The update alone against its matmuls alone: the episodes/s share above also pays for generation
        # and scoring, which the ceiling leaves out.
        update_s = statistics.median(r["update_s_per_step_median"] for r in ours)
        result["update_over_ceiling"] = result["ceiling_gemm_s"]["gemm_s_per_batch"] / update_s
    return result
