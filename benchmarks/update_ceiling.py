"""The most a stage's training step allows on this machine if only its matrix multiplies took time.

Both implementations we compare (ours and TRL's) spend most of a step in the same GEMMs: every linear
layer's forward (X W) and backward (dX = dY W^T, dW = X^T dY) over the batch's tokens. This script
times exactly those GEMMs as bare `torch.mm` calls of the model's own layer shapes (read from the
model class built on the meta device, so any architecture and size), on the same threads, and divides
the batch by their sum: a ceiling no implementation of the same algorithm and precision passes here,
since it leaves out attention's score matmuls, activations, norms, the loss and the optimizer (and, for
PPO, generation and scoring).

    SFT  the causal LM over batch x length tokens, its LM head over the same tokens    tokens/s
    RM   the backbone over batch x K answers of `length` tokens (scalar head: left out)  pairs/s
    PPO  policy and value bodies over batch x (prompt + response), the LM head over the
         response, `ppo_epochs` times                                                    episodes/s

    python -m benchmarks.update_ceiling                                   # PPO, the reference shape
    python -m benchmarks.update_ceiling --stage sft --config /path/to/model --batch 8 --max-length 96
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.pytorch_utils import Conv1D

from benchmarks.options import add_args, batch_size
from benchmarks.shapes import describe, model_config
from core.models.tiny import make_models

UNITS = {"sft": "tokens/s", "rm": "pairs/s", "ppo": "episodes/s"}


def gemm_seconds(m: int, k: int, n: int, dtype: torch.dtype = torch.float32, repeats: int = 20) -> float:
    """Median time of one (m, k) x (k, n) matmul."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_and_backward(m: int, k: int, n: int, dtype: torch.dtype = torch.float32) -> float:
    """A linear layer's forward (m,k)x(k,n), and its backward: dX = dY W^T and dW = X^T dY."""
    return gemm_seconds(m, k, n, dtype) + gemm_seconds(m, n, k, dtype) + gemm_seconds(k, m, n, dtype)


def layer_shapes(config: PretrainedConfig) -> tuple[Counter, tuple[int, int]]:
    """The backbone's linear layers as a count of (in, out) shapes, and the LM head's (in, out)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    shapes = Counter()
    for module in model.modules():
        if module is head:
            continue
        if isinstance(module, torch.nn.Linear):
            shapes[(module.in_features, module.out_features)] += 1
        elif isinstance(module, Conv1D):  # GPT-2's linear layers, weight stored (in, out)
            shapes[tuple(module.weight.shape)] += 1
    return shapes, (head.in_features, head.out_features)


def body_seconds(shapes: Counter, tokens: int, dtype: torch.dtype) -> float:
    return sum(count * forward_and_backward(tokens, k, n, dtype) for (k, n), count in shapes.items())


def ceiling(stage: str, config: PretrainedConfig, batch: int, *, length: int = 128, k: int = 4,
            prompt_length: int = 16, response_length: int = 24, ppo_epochs: int = 4, num_minibatches: int = 1,
            dtype: torch.dtype = torch.float32) -> dict:
    """The stage's GEMM seconds per batch and the rate they allow, in the stage's unit."""
    shapes, (width, vocab) = layer_shapes(config)
    if stage == "sft":
        tokens = batch * length
        body, head = body_seconds(shapes, tokens, dtype), forward_and_backward(tokens, width, vocab, dtype)
        seconds, work = body + head, tokens
    elif stage == "rm":
        body, head = body_seconds(shapes, batch * k * length, dtype), 0.0
        seconds, work = body, batch * k * (k - 1) // 2
    else:
        rows = batch // num_minibatches
        body = 2 * body_seconds(shapes, rows * (prompt_length + response_length), dtype)  # policy and value
        head = forward_and_backward(rows * response_length, width, vocab, dtype)
        seconds, work = ppo_epochs * num_minibatches * (body + head), batch
        body, head = ppo_epochs * num_minibatches * body, ppo_epochs * num_minibatches * head
    return {"stage": stage, "unit": UNITS[stage], "ceiling": work / seconds, "gemm_s_per_batch": seconds,
            "body_gemm_s": body, "lm_head_gemm_s": head, "threads": torch.get_num_threads(),
            "dtype": str(dtype).removeprefix("torch.")}


def ceiling_for(args: argparse.Namespace, stage: str) -> dict:
    """The ceiling of `stage` at the shape, batch, lengths, precision and threads of the benchmark options."""
    config = model_config(args)
    if config is None:  # rlhf bench's defaults: the bundled model for sft/rm, the reference GPT-2 for ppo
        if stage == "ppo":
            config = make_models(args.layers, args.embd, args.heads, args.vocab)[0].config
        else:
            from transformers import AutoConfig

            from core.paths import BUNDLED_MODEL_DIR

            config = AutoConfig.from_pretrained(BUNDLED_MODEL_DIR)
    batch = batch_size(args, stage)
    result = ceiling(stage, config, batch, length=args.max_length, k=getattr(args, "k", 4),
                     prompt_length=args.prompt_length, response_length=args.response_length,
                     ppo_epochs=args.ppo_epochs, num_minibatches=args.num_minibatches,
                     dtype=torch.bfloat16 if args.precision == "bf16" else torch.float32)
    return result | {"shape": describe(config), "batch": batch}


def ceiling_share(args: argparse.Namespace, stage: str, ours: float) -> dict:
    """With `--ceiling`: the stage's ceiling, timed now (right after the runs, under the same load), and the
    share of it `ours` reached; else nothing."""
    if not getattr(args, "ceiling", False):
        return {}
    result = ceiling_for(args, stage)
    return {"ceiling": result["ceiling"], "ours_over_ceiling": ours / result["ceiling"],
            "ceiling_gemm_s": {k: result[k] for k in ("gemm_s_per_batch", "body_gemm_s", "lm_head_gemm_s")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=sorted(UNITS), default="ppo")
    parser.add_argument("--k", type=int, default=4, help="rm: answers per ranking")
    add_args(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = ceiling_for(args, args.stage)
    if not args.json:
        print(f"{args.stage}: the step's GEMMs alone take {result['gemm_s_per_batch'] * 1e3:.0f} ms per batch of "
              f"{result['batch']} -> at most {result['ceiling']:.1f} {result['unit']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
