"""The GPU check's training FLOPs and MFU (benchmarks/flops.py): NeMo-RL's Qwen2 formula on numbers worked by
hand, and what the exact count changes (grouped-query attention, LM head positions, LoRA's two passes)."""

import pytest

from benchmarks.flops import mfu, peak_bf16, ppo_update_flops, qwen2_flops

TOY = dict(hidden_size=2, num_hidden_layers=1, intermediate_size=1, vocab_size=1, num_attention_heads=1,
           num_key_value_heads=1)
QWEN2_05B = dict(hidden_size=896, num_hidden_layers=24, intermediate_size=4864, vocab_size=151936,
                 num_attention_heads=14, num_key_value_heads=2)


def test_nemo_rl_qwen2_formula_by_hand():
    # s = 2, h = 2: attention 6*2*4*(3 + 1 + 1) = 240, MLP 6*2*2*3*1 = 72, LM head 6*2*2*1 = 24.
    assert qwen2_flops(TOY, 1, 2) == 336
    assert qwen2_flops(TOY, 3, 2) == 3 * 336
    assert qwen2_flops(TOY, 1, 2, lm_head_positions=0) == 312  # a scalar head: no LM head term


def test_exact_count_at_the_qwen2_05b_shape():
    seq = 192
    nemo, exact = qwen2_flops(QWEN2_05B, 1, seq), qwen2_flops(QWEN2_05B, 1, seq, exact=True)
    # K and V at 2 of 14 heads' width: the QKV term is 1 + 4/14 instead of 3 (NeMo-RL's Qwen2 formula).
    assert nemo - exact == pytest.approx(6 * 24 * seq * 896**2 * (3 - (1 + 4 / 14)))
    assert nemo == pytest.approx(6.1185e11, rel=1e-4)  # worked by hand: 0.935e11 + 3.615e11 + 1.568e11
    full = ppo_update_flops(QWEN2_05B, 64, 64, 128, 4, ptx_sequences=64, ptx_length=128)
    assert full == pytest.approx(4 * (qwen2_flops(QWEN2_05B, 64, 192) + qwen2_flops(QWEN2_05B, 64, 192, 0))
                                 + qwen2_flops(QWEN2_05B, 64, 128))
    exact_full = ppo_update_flops(QWEN2_05B, 64, 64, 128, 4, 64, 128, exact=True)
    exact_lora = ppo_update_flops(QWEN2_05B, 64, 64, 128, 4, 64, 128, exact=True, lora=True)
    assert exact_lora == pytest.approx(exact_full * 2 / 3)
    # The exact count reads the LM head over the 128 answer positions only.
    assert exact_full < full


def test_peak_and_mfu():
    assert peak_bf16("NVIDIA H100 80GB HBM3") == 989.5e12
    assert peak_bf16("NVIDIA H200") == 989.5e12
    assert peak_bf16("cpu") is None
    assert mfu(989.5e12, 2.0, 989.5e12) == 0.5
    assert mfu(1e12, 1.0, None) is None
