"""Sampling through a static KV cache: the candidate fast path on a GPU (`generate.sample(kv_cache=...)`).

transformers' default cache grows by one column per token, so every decode step has new shapes and
each of its kernels is launched from Python, which at batch 64 on a 0.5B model costs more than the
matmuls themselves. A `StaticCache` is allocated once at its full width and read through one attention
mask for the whole answer (the causal mask hides the slots not written yet), so every step of an answer
has the same shapes: torch.compile captures the step once (as CUDA graphs on a GPU, `reduce-overhead`)
and replays it for every token. The prefill stays eager: it runs once per answer.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable

import torch
from transformers import StaticCache

# The sampling paths: "dynamic" (transformers' growing cache, the default), "static" (a preallocated cache,
# eager), "compiled" (the static cache with the decode step under torch.compile).
KV_CACHES = ("dynamic", "static", "compiled")
# Cache widths are rounded up to this, so batches whose prompts differ a little in width share one compiled
# step (and its CUDA graphs) instead of compiling a new one each.
WIDTH_MULTIPLE = 64


class _Decoders:
    """One model's compiled step and its caches, made on first use and reused by every later call."""

    def __init__(self) -> None:
        self.compiled_step: Callable | None = None
        self.caches: dict[tuple, StaticCache] = {}


# Keyed weakly by the model, and the step compiled from its class's `forward` (the model passed as an argument),
# so nothing here keeps a discarded model (or its GPU memory) alive.
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_kv_cache(kv_cache: str) -> None:
    if kv_cache not in KV_CACHES:
        raise ValueError(f"kv_cache must be one of {', '.join(KV_CACHES)}, not {kv_cache!r}")


def cache_width(prompt_width: int, max_new_tokens: int) -> int:
    return -(-(prompt_width + max_new_tokens) // WIDTH_MULTIPLE) * WIDTH_MULTIPLE


def static_cache(model, batch: int, width: int, dtype: torch.dtype) -> StaticCache:
    """A zeroed static cache of `width` slots for `batch` rows whose keys are `dtype`, the one this model
    used last time at that size (a compiled step's CUDA graphs hold its addresses)."""
    decoders = _DECODERS.setdefault(model, _Decoders())
    key = (batch, width, dtype)
    cache = decoders.caches.get(key)
    if cache is None:
        cache = decoders.caches[key] = StaticCache(config=model.config, max_cache_len=width)
    cache.reset()
    return cache


def decode_step(model, compiled: bool) -> Callable:
    """`step(**inputs)`: the model's forward for one token per row; with `compiled`, under torch.compile
    (compiled once per model, on its first call)."""
    if not compiled:
        return model
    decoders = _DECODERS.setdefault(model, _Decoders())
    if decoders.compiled_step is None:
        cuda = next(model.parameters()).device.type == "cuda"
        # fullgraph: a graph break would silently bring back the per-kernel launches this path exists to remove.
        decoders.compiled_step = torch.compile(type(model).forward, mode="reduce-overhead" if cuda else None,
                                               fullgraph=True)
    return functools.partial(decoders.compiled_step, model)


def key_dtype(model, device: torch.device) -> torch.dtype:
    """The dtype the attention keys will have: autocast's when it is on (the rollouts' bf16), else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(model.parameters()).dtype


__all__ = ["KV_CACHES", "check_kv_cache", "cache_width", "static_cache", "decode_step", "key_dtype"]
