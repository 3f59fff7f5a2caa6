"""Training FLOPs and MFU by NeMo-RL's definitions, for the GPU check's PPO runs (benchmarks/gpu_shapes.py).

NeMo-RL reports "Training Model Floating Point Utilization" as the model FLOPs of a training pass over the
batch's (padded) sequences, divided by the policy-training time and by the GPUs' theoretical dense bf16
peak (989.5 TFLOP/s for an H100 SXM: its 1,979 sparse over 2). Its Qwen2 formula (nemo_rl/utils/flops_formulas.py,
after NeMo's), per sequence of s tokens, 3 passes (forward, input gradients, weight gradients) of 2 FLOPs
per multiply-add:

    6 L s h^2 (3 + s/h + 1)      attention: Q, K and V projections at full width, causal scores, output
  + 6 L s h (1 + 2) f            gated MLP (f = intermediate size)
  + 6 s h V                      LM head over every position

`exact=True` gives the FLOPs our update needs instead: K and V at the width of the key-value heads
(grouped-query attention), the LM head only over the positions whose logits the loss reads, and under
LoRA two passes instead of three (the frozen weights get no gradients; the adapters' FLOPs are left out).
"""

from __future__ import annotations

# Dense bf16 tensor-core peaks, FLOP/s, by a name torch.cuda.get_device_name() contains. H100 as NeMo-RL's
# table (1979 / 2 TFLOP/s for "NVIDIA H100 80GB HBM3"); the H200 has the same compute.
PEAK_BF16 = {"H100": 989.5e12, "H200": 989.5e12, "A100": 312e12}


def peak_bf16(device_name: str) -> float | None:
    return next((flops for key, flops in PEAK_BF16.items() if key in device_name), None)


def qwen2_flops(shape: dict, sequences: int, seq_len: int, lm_head_positions: int | None = None,
                exact: bool = False) -> float:
    """Training FLOPs (forward + backward) of `sequences` sequences of `seq_len` tokens through a Qwen2-shaped
    network (`shape`: hidden_size, num_hidden_layers, intermediate_size, vocab_size, num_attention_heads,
    num_key_value_heads). `lm_head_positions`: positions per sequence the LM head runs on (0 for a scalar
    head; default all)."""
    h, layers, f, vocab = (shape["hidden_size"], shape["num_hidden_layers"], shape["intermediate_size"],
                           shape["vocab_size"])
    qkv = 1 + 2 * shape["num_key_value_heads"] / shape["num_attention_heads"] if exact else 3
    attention = 6 * sequences * layers * seq_len * h * h * (qkv + seq_len / h + 1)
    mlp = 6 * sequences * layers * seq_len * h * 3 * f
    head_positions = seq_len if lm_head_positions is None else lm_head_positions
    return attention + mlp + 6 * sequences * head_positions * h * vocab


def ppo_update_flops(shape: dict, batch: int, prompt_length: int, response_length: int, ppo_epochs: int,
                     ptx_sequences: int = 0, ptx_length: int = 0, exact: bool = False, lora: bool = False) -> float:
    """One PPO update's training FLOPs: `ppo_epochs` passes of the policy and of the value model (a scalar
    head) over the batch's prompt + response, and the ptx term's LM passes (`ptx_sequences` over all epochs)."""
    seq = prompt_length + response_length
    policy_head = response_length if exact else None  # the update reads the logits that predict the answer
    policy = qwen2_flops(shape, batch, seq, policy_head, exact)
    value = qwen2_flops(shape, batch, seq, 0, exact)
    ptx = qwen2_flops(shape, ptx_sequences, ptx_length, exact=exact) if ptx_sequences else 0.0
    passes = 2 / 3 if exact and lora else 1.0
    return passes * (ppo_epochs * (policy + value) + ptx)


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    return None if peak is None or seconds <= 0 else flops / seconds / peak
