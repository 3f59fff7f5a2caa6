"""The PPO benchmark's shape options, shared by `rlhf bench` and the scripts in benchmarks/.

Kept apart from `bench_ppo.py` so building the CLI's parser (`rlhf --help`) does not import torch.
"""

from __future__ import annotations

import argparse

from core.config import DEVICES, PRECISIONS  # plain constants: no torch

ARCHES = ("llama", "qwen2", "gpt2")
BATCH = {"ppo": 16, "sft": 32, "rm": 8}  # each stage's default batch (episodes, examples, prompts)


def batch_size(args: argparse.Namespace, stage: str) -> int:
    """`--batch`, or the stage's default."""
    return getattr(args, "batch", None) or BATCH[stage]


def add_args(parser: argparse.ArgumentParser) -> None:
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--config", metavar="DIR", help="the shape of the model whose config.json is in DIR "
                       "(random weights; its tokenizer too when DIR has one)")
    shape.add_argument("--arch", choices=ARCHES, help="this architecture at --layers/--embd/--heads/--kv-heads/"
                       "--intermediate/--vocab (random weights); ppo defaults to gpt2, sft/rm to the bundled model")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--embd", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=None,
                        help="--arch llama/qwen2: key-value heads (default: --heads)")
    parser.add_argument("--intermediate", type=int, default=None, help="MLP width (default: 4 x --embd)")
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--batch", type=int, default=None,
                        help=f"ppo: episodes per step; sft: examples per batch; rm: prompts per batch "
                             f"(default {BATCH['ppo']}, {BATCH['sft']}, {BATCH['rm']})")
    parser.add_argument("--max-length", type=int, default=128, help="sft/rm: prompt + answer tokens")
    parser.add_argument("--ceiling", action="store_true",
                        help="also time the step's matmuls alone (benchmarks/update_ceiling.py) after the runs")
    parser.add_argument("--pairs", type=int, default=1,
                        help="runs of each side, alternating (ours, TRL, ours, ...): medians are reported")
    parser.add_argument("--response-length", type=int, default=24)
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--episodes", type=int, default=256)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--num-minibatches", type=int, default=1)
    parser.add_argument("--ptx-coef", type=float, default=0.0)
    parser.add_argument("--device", default="cpu", choices=DEVICES)
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="both sides alike: 'auto' is bf16 autocast on a GPU with bf16, else fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print only the JSON result")


def parse(description: str) -> argparse.Namespace:
    """The shape options from the command line, with torch's CPU threads set from `--threads`."""
    parser = argparse.ArgumentParser(description=description)
    add_args(parser)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return args
