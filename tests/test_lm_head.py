"""The chunked LM head + cross entropy gives the unchunked computation's loss and gradients."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from core.models.lm_head import causal_lm_loss, check_plain_logits, linear_cross_entropy


def _head_and_inputs(bias: bool, rows: int = 50, width: int = 16, vocab: int = 37):
    torch.manual_seed(0)
    head = torch.nn.Linear(width, vocab, bias=bias)
    hidden = torch.randn(rows, width, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,))
    return head, hidden, targets


@pytest.mark.parametrize("bias", [False, True])
def test_chunks_give_the_unchunked_loss_and_gradients(bias):
    head, hidden, targets = _head_and_inputs(bias)
    reference_head, reference_hidden = copy.deepcopy(head), hidden.detach().clone().requires_grad_()
    # 7 rows a chunk: 8 chunks, the last one short; the outer factor checks the backward scales by it.
    loss = linear_cross_entropy(hidden, head, targets, max_chunk_logits=7 * 37)
    (3.0 * loss).backward()
    expected = F.cross_entropy(reference_head(reference_hidden), targets, reduction="sum")
    (3.0 * expected).backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(hidden.grad, reference_hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.weight.grad, reference_head.weight.grad, rtol=1e-5, atol=1e-6)
    if bias:
        torch.testing.assert_close(head.bias.grad, reference_head.bias.grad, rtol=1e-5, atol=1e-6)


def test_a_frozen_head_gets_no_gradient_and_the_hidden_states_theirs():
    head, hidden, targets = _head_and_inputs(False)
    head.weight.requires_grad_(False)
    linear_cross_entropy(hidden, head, targets, max_chunk_logits=100).backward()
    expected_hidden = hidden.detach().clone().requires_grad_()
    F.cross_entropy(head(expected_hidden), targets, reduction="sum").backward()
    assert head.weight.grad is None
    torch.testing.assert_close(hidden.grad, expected_hidden.grad, rtol=1e-5, atol=1e-6)


def test_under_bf16_autocast_it_matches_the_models_own_head_in_bf16():
    head, hidden, targets = _head_and_inputs(False, rows=64, width=64, vocab=300)
    reference_head, reference_hidden = copy.deepcopy(head), hidden.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, head, targets, max_chunk_logits=20 * 300)
        expected = F.cross_entropy(reference_head(reference_hidden).float(), targets, reduction="sum")
    loss.backward()
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-3)
    assert hidden.grad.dtype == torch.float32 and head.weight.grad.dtype == torch.float32
    torch.testing.assert_close(hidden.grad, reference_hidden.grad, rtol=0.05, atol=2e-3)
    torch.testing.assert_close(head.weight.grad, reference_head.weight.grad, rtol=0.05, atol=2e-3)


def _tiny(arch: str, tied: bool):
    torch.manual_seed(1)
    if arch == "gpt2":  # dropout off: both computations must see the same network
        sizes = dict(n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=64)
    config = AutoConfig.for_model(arch, vocab_size=97, tie_word_embeddings=tied, **sizes)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("arch,tied", [("llama", True), ("qwen2", False), ("gpt2", True)])
def test_the_sft_loss_and_every_gradient_equal_the_models_own(arch, tied):
    model = _tiny(arch, tied)
    twin = copy.deepcopy(model)
    torch.manual_seed(2)
    ids = torch.randint(2, 97, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding, as SFT's collate
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt
    labels[mask == 0] = -100
    n = int((labels[:, 1:] != -100).sum())
    loss = causal_lm_loss(model, ids, mask, labels, num_items=n)
    loss.backward()
    expected = twin(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n).loss
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    grads = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_model_whose_logits_are_transformed_is_refused():
    config = AutoConfig.for_model("llama", vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="transform their logits"):
        check_plain_logits(config)


def test_dpos_answer_log_probs_equal_the_full_logits_ones():
    from core.stages.dpo import answer_logps

    model = _tiny("llama", True).eval()
    torch.manual_seed(3)
    ids = torch.randint(2, 97, (4, 9))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    labels = ids.clone()
    labels[:, :3] = -100
    labels[mask == 0] = -100
    with torch.no_grad():
        got = answer_logps(model, ids, mask, labels, -100)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    per_token = torch.gather(logits.log_softmax(-1), 2, targets.clamp(min=0)[..., None]).squeeze(-1)
    expected = (per_token * (targets != -100)).sum(1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert got[2] != got[0]  # rows are summed apart
