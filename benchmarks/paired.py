"""Medians of alternating runs, ours against TRL's PPOTrainer: one JSON result per line in, a summary out.

    python -m benchmarks.paired RESULTS.jsonl [--json]

Used by benchmarks/compare_trl_ppo.sh and part (a) of benchmarks/gpu_check.sh. With --json only the summary's
JSON line is printed.
"""

from __future__ import annotations

import json
import statistics
import sys


def summarize(rows: list[dict]) -> dict:
    trl = [r for r in rows if r["impl"].startswith("trl")]
    ours = [r for r in rows if not r["impl"].startswith("trl")]
    if not trl or not ours:
        raise SystemExit("a side produced no result; run it by hand to see the error")
    t = statistics.median(r["episodes_per_s"] for r in trl)
    o = statistics.median(r["episodes_per_s"] for r in ours)
    return {"trl": trl[0]["impl"], "trl_episodes_per_s": t, "ours_episodes_per_s": o, "ratio": o / t,
            "trl_runs": [r["episodes_per_s"] for r in trl], "ours_runs": [r["episodes_per_s"] for r in ours],
            "ours_last_timings_s": ours[-1]["timings_s"], "precision": ours[-1].get("precision"), "rows": rows}


def main(argv: list[str]) -> None:
    with open(argv[0]) as f:
        summary = summarize([json.loads(line) for line in f if line.strip().startswith("{")])
    if "--json" not in argv:
        def runs(values):
            return ", ".join("%.1f" % v for v in values)

        print(f"TRL {summary['trl'][4:]} PPOTrainer: {summary['trl_episodes_per_s']:.1f} episodes/s  "
              f"(runs: {runs(summary['trl_runs'])})")
        print(f"ours (core.stages.ppo.ppo_step): {summary['ours_episodes_per_s']:.1f} episodes/s  "
              f"(runs: {runs(summary['ours_runs'])})")
        print(f"ours breakdown (last run, s): {summary['ours_last_timings_s']}")
        print(f"ratio ours/TRL: {summary['ratio']:.2f}x")
    print(json.dumps(summary))


if __name__ == "__main__":
    main(sys.argv[1:])
