"""The most PPO episodes/s a shape allows on this machine if only the update's matrix multiplies took time.

Both PPO implementations we compare (ours and TRL's) spend most of a step in the same fp32 GEMMs: the
policy's and the value model's forward and backward over prompt + response, `ppo_epochs` times. This
script times exactly those GEMMs as bare `torch.mm` calls of the same shapes, on the same threads, and
divides the batch by their sum: a ceiling no implementation of the same algorithm and precision can
pass here, since it leaves out generation, scoring, attention, activations, norms and the optimizer.
Divided by TRL's measured rate (`benchmarks/compare_trl_ppo.sh`, same shape and session) it is the
highest ratio to TRL that shape allows.

    python -m benchmarks.update_ceiling                      # the reference shape
    python -m benchmarks.update_ceiling --layers 6 --embd 256
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from benchmarks.options import parse


def gemm_seconds(m: int, k: int, n: int, repeats: int = 30) -> float:
    """Median time of one (m, k) x (k, n) fp32 matmul."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(5):
        torch.mm(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_and_backward(m: int, k: int, n: int) -> float:
    """A linear layer's forward (m,k)x(k,n), and its backward: dX = dY W^T and dW = X^T dY."""
    return gemm_seconds(m, k, n) + gemm_seconds(m, n, k) + gemm_seconds(k, m, n)


def update_ceiling(layers: int, embd: int, vocab: int, batch: int, prompt_length: int, response_length: int,
                   ppo_epochs: int, num_minibatches: int) -> dict:
    rows = batch // num_minibatches
    tokens = rows * (prompt_length + response_length)
    # One GPT-2 block: the fused QKV projection, the attention output, the MLP's two projections.
    block = sum(forward_and_backward(tokens, k, n) for k, n in
                ((embd, 3 * embd), (embd, embd), (embd, 4 * embd), (4 * embd, embd)))
    # The LM head over the response positions only (the value head is one column: left out).
    head = forward_and_backward(rows * response_length, embd, vocab)
    step = 2 * layers * block + head  # policy and value bodies, the policy's head
    seconds_per_batch = ppo_epochs * num_minibatches * step
    return {"gemm_s_per_optimisation_step": step, "gemm_s_per_batch": seconds_per_batch,
            "ceiling_episodes_per_s": batch / seconds_per_batch, "threads": torch.get_num_threads(),
            "shape": dict(layers=layers, embd=embd, vocab=vocab, batch=batch, prompt_length=prompt_length,
                          response_length=response_length, ppo_epochs=ppo_epochs, num_minibatches=num_minibatches)}


def main() -> None:
    args = parse(__doc__.splitlines()[0])
    result = update_ceiling(args.layers, args.embd, args.vocab, args.batch, args.prompt_length, args.response_length,
                            args.ppo_epochs, args.num_minibatches)
    if not args.json:
        print(f"the update's GEMMs alone: {result['gemm_s_per_batch'] * 1e3:.0f} ms per batch of {args.batch} "
              f"-> at most {result['ceiling_episodes_per_s']:.1f} episodes/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
