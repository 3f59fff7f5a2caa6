"""Long runs stay healthy: a 2,000-step PPO-ptx run on the bundled tiny model keeps memory flat.

    HF_HUB_OFFLINE=1 python benchmarks/long_run_memory.py            # 2,000 steps (tens of minutes on 2 CPUs)
    HF_HUB_OFFLINE=1 python benchmarks/long_run_memory.py --steps 300

The run goes through the real stage (`core.stages.ppo.run`) with a real store, so metrics rows,
checkpoints, the prompt sampler, the ptx stream and the trainer-state history all take part.
Resident memory (RSS, psutil) is sampled after every step; the report gives RSS and the peak so
far at step 100 and at the last step, and the growth between them. Growth from cached tensors,
metrics lists kept in memory or model caches would show as a steady climb after warm-up; the
check fails (exit 1) if RSS grows more than `--tolerance-mb` between step 100 and the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402
import torch  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--response-length", type=int, default=8)
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--warmup-step", type=int, default=100, help="the step memory is compared from")
    parser.add_argument("--tolerance-mb", type=float, default=64.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON line at the end")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="also list the Python allocations that grew most between the warm-up step and the end")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    home = Path(tempfile.mkdtemp(prefix="rlhf-longrun-"))
    os.environ["RLHF_WORKBENCH_HOME"] = str(home)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from core.stages import ppo
    from core.config import PPOConfig
    from core.stages.events import Events
    from core.data.store import Store

    if args.tracemalloc:
        import tracemalloc

        tracemalloc.start(10)
    traced = {}
    process = psutil.Process()
    mb = 2**20
    samples: dict[int, dict[str, float]] = {}
    peak = 0.0
    started = time.perf_counter()

    class MemoryEvents(Events):
        def metrics(self, step, values):
            nonlocal peak
            super().metrics(step, values)
            if "reward" not in values:
                return  # evaluation rows share a step number with the training row
            rss = process.memory_info().rss / mb
            peak = max(peak, rss)
            if step in (1, 10, args.warmup_step) or step % 250 == 0 or step == args.steps:
                gc.collect()
                rss = process.memory_info().rss / mb
                if args.tracemalloc and step in (args.warmup_step, args.steps):
                    traced[step] = tracemalloc.take_snapshot()
                samples[step] = {"rss_mb": round(rss, 1), "peak_mb": round(peak, 1),
                                 "elapsed_s": round(time.perf_counter() - started, 1)}
                print(f"step {step:5d}: rss {rss:7.1f} MB  peak {peak:7.1f} MB  "
                      f"({samples[step]['elapsed_s']} s)", flush=True)

    store = Store(home / "workbench.db")
    run_id = "longrun"
    config = PPOConfig.from_dict(dict(
        sft_model="bundled", reward_model="bundled", total_episodes=args.steps * args.batch_size,
        batch_size=args.batch_size, ppo_epochs=1, response_length=args.response_length, learning_rate=1e-5,
        kl_coef=0.1, ptx_coef=1.0, ptx_batch_size=2, save_every=args.save_every, device="cpu",
    ))
    store.create_run(run_id, "ppo", config.to_dict(), str(home / "ppo"))
    store.set_run_status(run_id, "running")
    ppo.run(config, store, MemoryEvents(store, run_id), home / "ppo")
    store.set_run_status(run_id, "done")

    first, last = samples[args.warmup_step], samples[args.steps]
    growth = last["rss_mb"] - first["rss_mb"]
    steps_logged = len({m["step"] for m in store.metrics([run_id], ["reward"])})
    report = {
        "steps": args.steps, "batch_size": args.batch_size, "response_length": args.response_length,
        f"rss_mb_step_{args.warmup_step}": first["rss_mb"], f"peak_mb_step_{args.warmup_step}": first["peak_mb"],
        f"rss_mb_step_{args.steps}": last["rss_mb"], f"peak_mb_step_{args.steps}": last["peak_mb"],
        "growth_mb": round(growth, 1), "metric_steps_stored": steps_logged,
        "wall_s": round(time.perf_counter() - started, 1), "samples": samples,
    }
    if len(traced) == 2:
        growth_py = traced[args.steps].compare_to(traced[args.warmup_step], "traceback")
        report["python_heap_growth_kb"] = round(sum(d.size_diff for d in growth_py) / 1024, 1)
        for stat in growth_py[:5]:
            print(f"{stat.size_diff / 1024:+9.1f} KB {stat.count_diff:+6d} blocks  "
                  + " <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno}" for f in stat.traceback[:4]))
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))
    ok = growth <= args.tolerance_mb and steps_logged == args.steps
    print("memory flat" if ok else f"memory grew by {growth:.1f} MB (tolerance {args.tolerance_mb} MB)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
