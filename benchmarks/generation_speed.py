"""Rollout sampling speed by path, at a random-init Qwen2 shape, as PPO samples (fp32 weights of the trained
policy under the precision's autocast, `core.models.generate.sample` on pre-tokenised prompts):

  hf_generate   transformers' `model.generate` with its default (dynamic) cache, sampling at T = 1, no top-k
  dynamic       our loop with the same cache (the default `kv_cache`)
  static        our loop with a preallocated StaticCache, eager
  compiled      the static cache with the decode step under torch.compile (CUDA graphs on a GPU)

    python -m benchmarks.generation_speed --shape qwen2-0.5b --batch 64 --new-tokens 128
    python -m benchmarks.generation_speed --shape tiny --device cpu --batch 4 --new-tokens 16   # the CPU dry run

Each path runs once to warm up (the compiled path compiles then: `first_call_s`), then `--repeats` timed
runs; tokens/s = generated tokens over the median run. The static and compiled paths are compared token
by token with the dynamic one for the same seed, sampled and greedy (`hf_generate` draws from its own
sampler, so only its speed compares). Prints a JSON line after each path, the last one complete.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM

from benchmarks.gpu_shapes import SHAPES, qwen2_config
from core.models.generate import sample
from core.models.loading import pick_device
from core.models.static_cache import KV_CACHES
from core.models.tiny import EOS_ID, PAD_ID, make_tokenizer


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device, fn) -> tuple[float, object]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def agreement(ids: torch.Tensor, reference: torch.Tensor) -> dict:
    """How far two (B, T) token tensors agree: the share of equal tokens, whole rows equal, and the first
    step where any row differs (None: none does)."""
    width = min(ids.shape[1], reference.shape[1])
    same = ids[:, :width] == reference[:, :width]
    differs = (~same).any(0).nonzero()
    return {"equal_tokens": float(same.float().mean()), "equal_rows": int(same.all(1).sum()), "rows": int(ids.shape[0]),
            "first_difference_at": int(differs[0]) if len(differs) else None,
            "same_length": ids.shape[1] == reference.shape[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-0.5b")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--paths", default="hf_generate," + ",".join(KV_CACHES))
    args = parser.parse_args()
    device = pick_device(args.device, args.precision)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    torch.manual_seed(0)
    with torch.device(device.torch):
        model = AutoModelForCausalLM.from_config(qwen2_config(args.shape), dtype=torch.float32).eval()
    vocab = SHAPES[args.shape]["vocab_size"]
    tokenizer = make_tokenizer(vocab)
    prompt_ids = torch.randint(2, vocab, (args.batch, args.prompt_length),
                               generator=torch.Generator().manual_seed(0)).to(device.torch)
    prompt_mask = torch.ones_like(prompt_ids)

    def run(path: str, seed: int, temperature: float = 1.0) -> torch.Tensor:
        with device.autocast():
            if path == "hf_generate":
                torch.manual_seed(seed)
                out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True,
                                     temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.new_tokens,
                                     eos_token_id=EOS_ID, pad_token_id=PAD_ID)
                return out[:, prompt_ids.shape[1]:]
            return sample(model, tokenizer, [], max_new_tokens=args.new_tokens, temperature=temperature, seed=seed,
                          prompt_ids=prompt_ids, prompt_mask=prompt_mask, kv_cache=path).response_ids

    results: dict[str, dict] = {}
    sampled: dict[str, torch.Tensor] = {}

    def emit() -> None:
        # A line after every path: a run cut off by the check's time limit still leaves the paths it finished.
        print(json.dumps({"part": "d", "shape": args.shape, "batch": args.batch, "prompt_length": args.prompt_length,
                          "new_tokens": args.new_tokens, "precision": device.precision, "torch": torch.__version__,
                          "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                          "paths": results}), flush=True)

    for path in paths:
        try:
            first_s, _ = timed(device, lambda: run(path, seed=100))
            times, ids = [], None
            for i in range(args.repeats):
                seconds, out = timed(device, lambda: run(path, seed=i))
                times.append(seconds)
                ids = out if ids is None else ids
            sampled[path] = ids
            results[path] = {"first_call_s": round(first_s, 3), "runs_s": [round(t, 4) for t in times],
                             "tokens_per_s": args.batch * ids.shape[1] / statistics.median(times),
                             "new_tokens": int(ids.shape[1])}
            if path == "compiled":
                # Whether the step replayed as CUDA graphs (a skip falls back to launching each kernel) and
                # how many graphs dynamo compiled (more than one: a recompile per call would eat the gain).
                results[path]["dynamo"] = {**{k: v for k, v in counters["inductor"].items() if "cudagraph" in k},
                                           "unique_graphs": counters["stats"]["unique_graphs"]}
        except Exception as exc:  # one path failing (a compile error, say) must not lose the others' figures
            results[path] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        emit()
    for reference in ("dynamic", "hf_generate"):
        for path in sampled:
            if reference in sampled:
                rate = results[path]["tokens_per_s"] / results[reference]["tokens_per_s"]
                results[path][f"speedup_vs_{reference}"] = rate
    if "dynamic" in sampled:
        greedy = run("dynamic", seed=0, temperature=0.0)
        for path in ("static", "compiled"):
            if path in sampled:
                results[path]["sampled_vs_dynamic"] = agreement(sampled[path], sampled["dynamic"])
                results[path]["greedy_vs_dynamic"] = agreement(run(path, seed=0, temperature=0.0), greedy)
    emit()

if __name__ == "__main__":
    main()
