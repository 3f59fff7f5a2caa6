"""Issue 31's target: iterated rounds against one round with the same total rankings and stage-3 episodes.

For each seed and method, two `rlhf rounds --demo` runs from one shared SFT checkpoint:
- rounds: R rounds of P fresh prompts and E episodes each;
- one-shot: 1 round of R*P prompts and R*E episodes.
Both sample the rankings at the same temperature (`--temperature`, the RM stage's `sample_temperature`).
Prints one row per run (final gold, KL to SFT, rankings used) and each round's RM accuracy on the previous
policy's answers before and after its refit; `--json` writes every report beside the table.

    python -m benchmarks.rounds_compare OUT --seeds 0 1 --methods ppo dpo
    # the over-optimised regime: a weak KL penalty, no exact-KL or ptx term
    python -m benchmarks.rounds_compare OUT --methods ppo --set ppo:kl_coef=0.005 --set ppo:kl_loss_coef=0 \
        --set ppo:ptx_coef=0 --set heldout_prompts=600

A benchmark, never a test: minutes per run on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def rlhf(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "core.cli", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--methods", nargs="+", default=["ppo", "dpo"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts-per-round", type=int, default=800)
    parser.add_argument("--episodes-per-round", type=int, default=1536)
    parser.add_argument("--temperature", type=float, default=1.0, help="the rankings' sampling temperature")
    parser.add_argument("--set", action="append", default=[], metavar="[STAGE:]KEY=VALUE",
                        help="passed to every `rlhf rounds` run (both arms alike)")
    args = parser.parse_args()
    out = Path(args.output)
    sft = out / "sft"
    if not (sft / "config.json").is_file():
        rlhf("sft", "--preset", "quick", "--output", str(sft), "--name", f"{out.name}-sft")
    rows = []
    for method in args.methods:
        for seed in args.seeds:
            for rounds in (args.rounds, 1):
                scale = args.rounds // rounds
                run = out / f"{method}-seed{seed}-r{rounds}"
                cmd = ["rounds", "--demo", "--preset", "quick", "--output", str(run), "--rounds", str(rounds),
                       "--method", method, "--sft", str(sft), "--seed", str(seed),
                       "--prompts-per-round", str(args.prompts_per_round * scale),
                       "--set", f"rm:sample_temperature={args.temperature}",  # round 0's
                       "--set", f"sample_temperature={args.temperature}"]  # later rounds
                for value in args.set:
                    cmd += ["--set", value]
                if method != "dpo":
                    cmd += ["--episodes-per-round", str(args.episodes_per_round * scale)]
                if not (run / "report.json").is_file() or json.loads((run / "report.json").read_text()).get(
                        "state") != "done":
                    rlhf(*cmd)
                report = json.loads((run / "report.json").read_text())
                rows.append({"method": method, "seed": seed, "rounds": rounds, "report": report})
    print(f"\nSFT gold {rows[0]['report']['sft'].get('gold')}")
    print("| method | seed | rounds | final gold | KL to SFT | rankings | RM accuracy before -> after, per round |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        last = row["report"]["rounds"][-1]
        refits = ", ".join(f"{r.get('rm_accuracy_before')} -> {r.get('rm_accuracy_after')}"
                           for r in row["report"]["rounds"][1:]) or "-"
        total = sum(r.get("rankings", 0) or 0 for r in row["report"]["rounds"])
        print(f"| {row['method']} | {row['seed']} | {row['rounds']} | {last.get('gold')} | {last.get('kl_to_sft')} "
              f"| {total} | {refits} |")
    (out / "rounds_compare.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
