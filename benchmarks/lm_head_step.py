"""One SFT forward + backward at a model's shape: HF's own causal-LM loss (the LM head over every position,
full logits) against `core.models.lm_head.causal_lm_loss` (the head over the answer tokens, in chunks),
alternating on the same weights and batch, so a shared machine's load hits both alike.

    python -m benchmarks.lm_head_step --config /path/to/model --batch 8 --max-length 96 --pairs 3 --threads 1

The batch: `--max-length` tokens a row, the first `--prompt-share` of them prompt (no loss), random ids.
Prints the medians, their ratio and the largest gradient difference between the two.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from benchmarks.options import add_args, batch_size
from benchmarks.shapes import describe, model_config
from core.models.lm_head import causal_lm_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-share", type=float, default=0.5)
    add_args(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = model_config(args)
    if config is None:
        raise ValueError("give the shape: --config DIR or --arch ...")
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config)
    batch = batch_size(args, "sft")
    ids = torch.randint(3, config.vocab_size, (batch, args.max_length))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, : int(args.max_length * args.prompt_share)] = -100
    answer_tokens = int((labels[:, 1:] != -100).sum())

    def hf() -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=answer_tokens).loss

    def chunked() -> torch.Tensor:
        return causal_lm_loss(model, ids, mask, labels, num_items=answer_tokens)

    def step(loss_fn) -> tuple[float, float, dict]:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        return time.perf_counter() - start, loss.item(), {n: p.grad for n, p in model.named_parameters()}

    times = {"hf": [], "chunked": []}
    for _ in range(max(1, args.pairs)):
        seconds, hf_loss, hf_grads = step(hf)
        times["hf"].append(seconds)
        seconds, chunked_loss, chunked_grads = step(chunked)
        times["chunked"].append(seconds)
    difference = max(float((hf_grads[n] - chunked_grads[n]).abs().max()) for n in hf_grads)
    medians = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"shape": describe(config), "batch": batch, "length": args.max_length,
                      "answer_tokens": answer_tokens, "threads": torch.get_num_threads(), "seconds": times,
                      "median_s": medians, "speedup": medians["hf"] / medians["chunked"],
                      "loss": [hf_loss, chunked_loss], "max_grad_difference": difference}))


if __name__ == "__main__":
    main()
