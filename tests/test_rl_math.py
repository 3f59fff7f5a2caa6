"""Numeric checks of the RL maths in `core.stages.rl` and `core.stages.ppo` on hand-computed cases.

Each test pins exact numbers worked out by hand (the arithmetic is in the comments), so a sign, a
clip bound, a mask or a discount that goes wrong fails here rather than as a slightly worse PPO run:

- `clipped_policy_loss`: the clipped surrogate, its pessimistic max, masking, zero grads when clipped;
- `clipped_value_loss`: the clipped value error and the fraction of tokens where it was the larger;
- `AdaptiveKLController`: Ziegler et al.'s proportional controller, error clipped to +-0.2;
- `masked_mean` / `whiten`: statistics over real tokens only (biased variance), zeros at padding;
- `ema_update`: ema <- decay * ema + (1 - decay) * policy;
- `gae`: GAE over response tokens, an episode ending at its last real token;
- `kl_penalty` (k1) vs `k3` as a *reward*: exact score-function gradients on a small categorical
  distribution show why PPO puts k1 in the reward (and why `kl_estimator` is no longer an option).
- `optim.adamw`: the fused AdamW every stage trains with takes AdamW's own steps.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from core.config import PPOConfig
from core.stages.ppo import AdaptiveKLController, clipped_policy_loss, clipped_value_loss, ema_update, gae
from core.stages.rl import k3, kl_penalty, masked_mean, whiten

# ---------------------------------------------------------------------------------------------
# Clipped surrogate (policy) loss
# ---------------------------------------------------------------------------------------------


def test_clipped_policy_loss_hand_case():
    # cliprange eps = 0.2, so the ratio is clipped to [0.8, 1.2]; per-token loss = max(-A*r, -A*clip(r)).
    #   row 0, t0: log r = 0.1  -> r = e^0.1 = 1.105171 (inside), A = 2  -> -2 e^0.1    = -2.210342
    #   row 0, t1: log r = 0.5  -> r = e^0.5 = 1.648721 (> 1.2),  A = +1 -> max(-1.6487, -1.2) = -1.2 (clipped)
    #   row 0, t2: log r = -0.5 -> r = e^-0.5 = 0.606531 (< 0.8), A = -1 -> max(0.6065, 0.8)   = 0.8  (clipped)
    #   row 1, t0: log r = 0.5,  A = -1 -> max(1.6487, 1.2)   = e^0.5  =  1.648721 (pessimistic: not clipped)
    #   row 1, t1: log r = -0.5, A = +1 -> max(-0.6065, -0.8) = -e^-0.5 = -0.606531 (pessimistic: not clipped)
    #   row 1, t2: masked out (log r = 3, A = 100 would add ~ -1200): must not count, its ratio reads 1.
    # loss = (-2.210342 - 1.2 + 0.8 + 1.648721 - 0.606531) / 5 = -1.568152 / 5 = -0.3136304
    new = torch.tensor([[0.1, 0.5, -0.5], [0.5, -0.5, 3.0]], requires_grad=True)
    old = torch.zeros(2, 3)
    adv = torch.tensor([[2.0, 1.0, -1.0], [-1.0, 1.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])

    loss, ratio = clipped_policy_loss(new, old, adv, mask, cliprange=0.2)

    e = math.exp
    assert loss.item() == pytest.approx((-2 * e(0.1) - 1.2 + 0.8 + e(0.5) - e(-0.5)) / 5, abs=1e-6)
    assert loss.item() == pytest.approx(-0.3136304, abs=1e-6)
    assert_close(ratio, torch.tensor([[e(0.1), e(0.5), e(-0.5)], [e(0.5), e(-0.5), 1.0]]))

    # d loss / d log pi_new = -A * r / 5 where the unclipped term is the max, 0 where clipped or masked:
    #   [-2 e^0.1 / 5, 0, 0] = [-0.4420684, 0, 0];  [e^0.5 / 5, -e^-0.5 / 5, 0] = [0.3297443, -0.1213061, 0]
    loss.backward()
    assert_close(new.grad, torch.tensor([[-2 * e(0.1) / 5, 0.0, 0.0], [e(0.5) / 5, -e(-0.5) / 5, 0.0]]))


def test_clipped_policy_loss_uses_old_logprobs():
    # Same log-ratio reached from non-zero log-probs: new - old = [0.1, 0.5] with A = [1, 1], eps = 0.2
    #   -> losses [-e^0.1, -1.2] -> mean (-1.105171 - 1.2) / 2 = -1.1525855
    new = torch.tensor([[-1.9, -0.5]])
    old = torch.tensor([[-2.0, -1.0]])
    loss, _ = clipped_policy_loss(new, old, torch.ones(1, 2), torch.ones(1, 2), cliprange=0.2)
    assert loss.item() == pytest.approx((-math.exp(0.1) - 1.2) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(-1.1525855, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Clipped value loss
# ---------------------------------------------------------------------------------------------


def test_clipped_value_loss_hand_case():
    # cliprange_value = 0.2: v_clip = old + clamp(new - old, -0.2, 0.2); per token max((new-R)^2, (v_clip-R)^2).
    #   row 0, t0: old 0,   new 1.0,  R 1.0 -> unclipped 0,    v_clip 0.2, clipped (0.2-1)^2 = 0.64 -> 0.64 (clipped)
    #   row 0, t1: old 0,   new 0.1,  R 1.0 -> unclipped 0.81, v_clip 0.1, clipped 0.81            -> 0.81 (equal)
    #   row 0, t2: old 0,   new -0.5, R 0.0 -> unclipped 0.25, v_clip -0.2, clipped 0.04           -> 0.25
    #   row 1, t0: old 1,   new 2,    R 3   -> unclipped 1,    v_clip 1.2, clipped (1.2-3)^2 = 3.24 -> 3.24 (clipped)
    #   row 1, t1: old 0.5, new 0.6,  R 0.5 -> unclipped 0.01, v_clip 0.6, clipped 0.01            -> 0.01 (equal)
    #   row 1, t2: masked (new 5, R -5 would add 100).
    # loss = 0.5 * (0.64 + 0.81 + 0.25 + 3.24 + 0.01) / 5 = 0.5 * 4.95 / 5 = 0.495
    # clip_frac = 2 tokens (strictly larger clipped error) / 5 real tokens = 0.4
    new = torch.tensor([[1.0, 0.1, -0.5], [2.0, 0.6, 5.0]])
    old = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.5, 0.0]])
    returns = torch.tensor([[1.0, 1.0, 0.0], [3.0, 0.5, -5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])

    loss, clip_frac = clipped_value_loss(new, old, returns, mask, cliprange_value=0.2)

    assert loss.item() == pytest.approx(0.495, abs=1e-6)
    assert clip_frac.item() == pytest.approx(0.4, abs=1e-7)


# ---------------------------------------------------------------------------------------------
# Adaptive KL controller (Ziegler et al. 2019)
# ---------------------------------------------------------------------------------------------


def test_adaptive_kl_controller_hand_cases():
    # value *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon, with target 6, horizon 10000, n 64.
    def fresh():
        return AdaptiveKLController(kl_coef=0.1, target=6.0, horizon=10_000)

    c = fresh()
    c.update(9.0, 64)  # error 9/6 - 1 = 0.5 -> clipped to 0.2 -> 0.1 * (1 + 0.2 * 0.0064) = 0.1 * 1.00128
    assert c.value == pytest.approx(0.100128, rel=1e-12)

    c = fresh()
    c.update(3.0, 64)  # error 3/6 - 1 = -0.5 -> clipped to -0.2 -> 0.1 * (1 - 0.00128) = 0.099872
    assert c.value == pytest.approx(0.099872, rel=1e-12)

    c = fresh()
    c.update(6.0, 64)  # on target: error 0 -> unchanged
    assert c.value == pytest.approx(0.1, rel=1e-12)

    c = fresh()
    c.update(6.6, 64)  # error 6.6/6 - 1 = 0.1 (inside the clip) -> 0.1 * (1 + 0.1 * 0.0064) = 0.100064
    assert c.value == pytest.approx(0.100064, rel=1e-12)


def test_adaptive_kl_controller_compounds():
    # Updates multiply: 0.1 * 1.00128^2 = 0.1 * 1.0025616384 = 0.10025616384,
    # then KL 3: * (1 - 0.00128) = 0.10025616384 * 0.99872 = 0.1001278359...
    c = AdaptiveKLController(kl_coef=0.1, target=6.0, horizon=10_000)
    c.update(9.0, 64)
    c.update(9.0, 64)
    assert c.value == pytest.approx(0.10025616384, rel=1e-12)
    c.update(3.0, 64)
    assert c.value == pytest.approx(0.10025616384 * 0.99872, rel=1e-12)
    assert c.value == pytest.approx(0.100127836, rel=1e-8)
    assert c.target == 6.0 and c.horizon == 10_000  # only the coefficient adapts


# ---------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------

# Real tokens 1, 2, 3 | 4; the padding holds 100 and -50, which must not leak into any statistic.
X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -50.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


def test_masked_mean():
    # (1 + 2 + 3 + 4) / 4 = 2.5  (the unmasked mean would be 60 / 6 = 10)
    assert masked_mean(X, MASK).item() == pytest.approx(2.5)
    # An all-padding batch gives 0, not NaN (the denominator is clamped to 1).
    assert masked_mean(X, torch.zeros_like(MASK)).item() == 0.0


def test_whiten_hand_case():
    # mean 2.5; deviations -1.5, -0.5, 0.5, 1.5; biased variance (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25
    # (the unbiased one would be 5/3); std = sqrt(1.25 + 1e-8) = 1.1180340
    #   -> -1.5/1.118034 = -1.3416408, -0.4472136, 0.4472136, 1.3416408; padding -> 0
    out = whiten(X, MASK)
    assert_close(out, torch.tensor([[-1.3416408, -0.4472136, 0.4472136], [1.3416408, 0.0, 0.0]]))
    s = 1 / math.sqrt(1.25 + 1e-8)
    assert_close(out, torch.tensor([[-1.5 * s, -0.5 * s, 0.5 * s], [1.5 * s, 0.0, 0.0]]))
    # The whitened real tokens have masked mean 0 and masked (biased) variance 1.
    assert masked_mean(out, MASK).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_mean(out**2, MASK).item() == pytest.approx(1.0, abs=1e-6)


def test_whiten_keep_mean():
    # shift_mean=False scales but adds the mean back: 2.5 + [-1.3416408, -0.4472136, 0.4472136, 1.3416408]
    #   = [1.1583592, 2.0527864, 2.9472136, 3.8416408]; padding still 0
    out = whiten(X, MASK, shift_mean=False)
    assert_close(out, torch.tensor([[1.1583592, 2.0527864, 2.9472136], [3.8416408, 0.0, 0.0]]))


def test_whiten_constant_input():
    # Variance 0: the 1e-8 inside rsqrt keeps it finite; (x - mean) = 0 -> all zeros, or the mean 3 if kept.
    x = torch.full((1, 3), 3.0)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert_close(whiten(x, mask), torch.zeros(1, 3))
    assert_close(whiten(x, mask, shift_mean=False), torch.tensor([[3.0, 3.0, 0.0]]))


# ---------------------------------------------------------------------------------------------
# EMA of the policy
# ---------------------------------------------------------------------------------------------


def test_ema_update():
    ema, policy = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    with torch.no_grad():
        ema.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        ema.bias.copy_(torch.tensor([0.0, 0.0]))
        policy.weight.copy_(torch.tensor([[11.0, 12.0], [13.0, 14.0]]))
        policy.bias.copy_(torch.tensor([10.0, -10.0]))

    ema_update(ema, policy, decay=0.9)
    # 0.9 * ema + 0.1 * policy: 0.9*1 + 0.1*11 = 2, 0.9*2 + 1.2 = 3, 0.9*3 + 1.3 = 4, 0.9*4 + 1.4 = 5;
    # bias 0 + 0.1*10 = 1, 0 - 0.1*10 = -1
    assert_close(ema.weight, torch.tensor([[2.0, 3.0], [4.0, 5.0]]))
    assert_close(ema.bias, torch.tensor([1.0, -1.0]))
    # The policy is untouched.
    assert_close(policy.weight, torch.tensor([[11.0, 12.0], [13.0, 14.0]]))
    assert_close(policy.bias, torch.tensor([10.0, -10.0]))

    ema_update(ema, policy, decay=0.9)
    # Again: 0.9*2 + 1.1 = 2.9, 0.9*3 + 1.2 = 3.9, 0.9*4 + 1.3 = 4.9, 0.9*5 + 1.4 = 5.9; bias 1.9, -1.9
    assert_close(ema.weight, torch.tensor([[2.9, 3.9], [4.9, 5.9]]))
    assert_close(ema.bias, torch.tensor([1.9, -1.9]))


# ---------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------


def test_gae_hand_case():
    # gamma = 1, lam = 0.95; delta_t = r_t + gamma V_{t+1} - V_t (V after the last real token = 0),
    # A_t = delta_t + gamma lam A_{t+1}, returns = A + V.
    # Row 0 (full): r = [0.1, -0.2, 1.0], V = [0.5, 0.4, 0.3]
    #   t2: delta = 1.0 + 0 - 0.3 = 0.7                     A2 = 0.7
    #   t1: delta = -0.2 + 0.3 - 0.4 = -0.3                 A1 = -0.3 + 0.95 * 0.7 = 0.365
    #   t0: delta = 0.1 + 0.4 - 0.5 = 0.0                   A0 = 0.95 * 0.365 = 0.34675
    #   returns = [0.84675, 0.765, 1.0]
    # Row 1 (ends at t1, mask 1,1,0): r = [0.1, 1.0, 7.0], V = [0.5, 0.4, 9.0]; the 7.0 and 9.0 are ignored
    #   t2: padding -> 0
    #   t1: delta = 1.0 + 0 - 0.4 = 0.6 (V_2 counts as 0)   A1 = 0.6
    #   t0: delta = 0.1 + 0.4 - 0.5 = 0.0                   A0 = 0.95 * 0.6 = 0.57
    #   returns = [1.07, 1.0, 0]
    rewards = torch.tensor([[0.1, -0.2, 1.0], [0.1, 1.0, 7.0]])
    values = torch.tensor([[0.5, 0.4, 0.3], [0.5, 0.4, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])

    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)

    assert_close(advantages, torch.tensor([[0.34675, 0.365, 0.7], [0.57, 0.6, 0.0]]))
    assert_close(returns, torch.tensor([[0.84675, 0.765, 1.0], [1.07, 1.0, 0.0]]))


def test_gae_lambda_one_is_monte_carlo():
    # gamma = lam = 1: A_t = (sum of rewards from t to the end) - V_t, so returns = reward-to-go.
    #   row 0: reward-to-go [0.9, 0.8, 1.0];  row 1: [1.1, 1.0, 0] (padding ignored)
    rewards = torch.tensor([[0.1, -0.2, 1.0], [0.1, 1.0, 7.0]])
    values = torch.tensor([[0.5, 0.4, 0.3], [0.5, 0.4, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert_close(returns, torch.tensor([[0.9, 0.8, 1.0], [1.1, 1.0, 0.0]]))
    assert_close(advantages, torch.tensor([[0.4, 0.4, 0.7], [0.6, 0.6, 0.0]]))


# ---------------------------------------------------------------------------------------------
# KL estimators as a reward: exact score-function gradients on a categorical distribution
# ---------------------------------------------------------------------------------------------


def _score_function_gradient(theta: torch.Tensor, ref_logprobs: torch.Tensor, estimator) -> torch.Tensor:
    """g_k = sum_y pi(y) k(y) grad_theta log pi(y), summed exactly over every category y.

    This is what a reward k(y) contributes to a policy gradient in expectation: k is a number
    attached to the sample, not differentiated through."""
    logprobs = theta.log_softmax(-1)
    pi = logprobs.exp()
    k = estimator(logprobs, ref_logprobs)
    # Row y of the Jacobian is grad_theta log pi(y) (= e_y - pi for a softmax).
    jacobian = torch.autograd.functional.jacobian(lambda t: t.log_softmax(-1), theta)
    return (pi * k)[:, None].mul(jacobian).sum(0)


def _kl_gradient(theta: torch.Tensor, ref_logprobs: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """Exact grad_theta of KL(pi || ref) (or KL(ref || pi) with reverse=True), by autograd."""
    t = theta.detach().clone().requires_grad_()
    logprobs = t.log_softmax(-1)
    if reverse:
        kl = (ref_logprobs.exp() * (ref_logprobs - logprobs)).sum()
    else:
        kl = (logprobs.exp() * (logprobs - ref_logprobs)).sum()
    (grad,) = torch.autograd.grad(kl, t)
    return grad


def _categorical():
    # 5 categories; pi = softmax(theta) with theta a small perturbation (scale 0.1) of the reference logits.
    g = torch.Generator().manual_seed(1)
    ref_logits = torch.randn(5, generator=g, dtype=torch.float64)
    theta = ref_logits + 0.1 * torch.randn(5, generator=g, dtype=torch.float64)
    return theta, ref_logits.log_softmax(-1)


def test_k1_reward_gives_the_exact_kl_gradient():
    theta, ref_logprobs = _categorical()
    exact = _kl_gradient(theta, ref_logprobs)
    g_k1 = _score_function_gradient(theta, ref_logprobs, kl_penalty)

    # sum_y pi k1 grad log pi = grad KL(pi||ref) - sum_y pi grad log pi, and the last sum is grad sum pi = 0.
    assert_close(g_k1, exact, rtol=1e-10, atol=1e-12)
    assert torch.nn.functional.cosine_similarity(g_k1, exact, dim=0).item() > 0.999
    assert exact.norm().item() > 1e-3  # pi != ref: the test is not comparing two zeros


def test_k3_reward_gradient_is_biased_and_vanishes_near_the_reference():
    theta, ref_logprobs = _categorical()
    logprobs = theta.log_softmax(-1)
    exact = _kl_gradient(theta, ref_logprobs)
    reverse = _kl_gradient(theta, ref_logprobs, reverse=True)
    g_k3 = _score_function_gradient(theta, ref_logprobs, k3)

    # As a *value* k3 is fine: non-negative, and E_pi[k3] = sum (ref - pi) + KL = KL(pi||ref) exactly.
    assert bool((k3(logprobs, ref_logprobs) >= 0).all())
    kl = (logprobs.exp() * kl_penalty(logprobs, ref_logprobs)).sum()
    assert (logprobs.exp() * k3(logprobs, ref_logprobs)).sum().item() == pytest.approx(kl.item(), rel=1e-10)

    # As a *reward*: k3 = ref/pi - 1 + k1, so g_k3 = g_k1 + sum_y ref(y) grad log pi(y) - 0
    #              = grad KL(pi||ref) - grad KL(ref||pi), exactly.
    assert_close(g_k3, exact - reverse, rtol=1e-10, atol=1e-12)
    # Near the reference both KLs have the same first-order gradient (Fisher * delta), so the
    # difference is second order: a small vector that does not even point along the true gradient.
    # (For this seed: norm ratio ~0.027, cosine ~ -0.02.)
    assert g_k3.norm().item() / exact.norm().item() < 0.2
    assert torch.nn.functional.cosine_similarity(g_k3, exact, dim=0).item() < 0.5


def test_kl_estimator_option_was_removed():
    with pytest.raises(ValueError, match="kl_estimator"):
        PPOConfig.from_dict({"kl_estimator": "k3"})


def test_fused_adamw_takes_the_same_steps_as_the_reference_loop():
    """`optim.adamw` (fused kernel, what PPO, SFT and the RM train with) against AdamW's plain
    per-tensor loop: the same weights after a few steps on the same gradients."""
    from core.models import optim

    torch.manual_seed(0)
    start = [torch.randn(64, 32), torch.randn(32)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(5)]
    results = []
    for make in (lambda ps: optim.adamw(ps, 1e-2, eps=1e-5, weight_decay=0.1),
                 lambda ps: torch.optim.AdamW(ps, lr=1e-2, eps=1e-5, weight_decay=0.1, foreach=False)):
        params = [p.clone().requires_grad_() for p in start]
        opt = make(params)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        results.append(params)
    (fused, reference) = results
    assert fused[0].detach().sub(start[0]).abs().max() > 1e-2  # the steps moved the weights
    for a, b in zip(fused, reference):
        assert torch.allclose(a, b, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Chunked log-probs: the response logits are never held whole
# ---------------------------------------------------------------------------------------------


def logprobs_at(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log-softmax of whole logits at the tokens: the plain computation the chunked ones must equal."""
    return torch.gather(logits.log_softmax(-1), -1, tokens[..., None]).squeeze(-1)


def _saved_logit_elements(fn, vocab: int) -> int:
    """Elements of the tensors with a vocabulary-sized last dimension that autograd saves while `fn` runs
    (the ones held until the backward pass)."""
    saved = []

    def pack(t):
        if t.dim() and t.shape[-1] == vocab:
            saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(saved)


def test_chunked_logprobs_equal_the_full_logits_values_and_gradients():
    """`chunked_logprobs` in chunks of 4 tokens (15 tokens: chunks cut across rows, the last one short)
    against log-softmax of the whole logits: the same log-probs and entropies, the same gradients w.r.t.
    the hidden states and the LM head, and no vocabulary-sized tensor kept for the backward pass."""
    from core.stages.rl import chunked_logprobs, entropy_from_logits

    torch.manual_seed(0)
    vocab, width, temperature = 50, 16, 0.7
    lm_head = torch.nn.Linear(width, vocab)
    hidden = torch.randn(3, 5, width, requires_grad=True)
    tokens = torch.randint(vocab, (3, 5))
    weights = torch.randn(3, 5)  # a loss that weighs every token differently, as advantages do

    def full():
        logits = lm_head(hidden).float() / temperature
        return logprobs_at(logits, tokens), entropy_from_logits(logits.detach())

    results = {}
    for name, fn in (("full", full),
                     ("chunked", lambda: chunked_logprobs(hidden, lm_head, tokens, temperature, with_entropy=True,
                                                          max_chunk_logits=4 * vocab + 7)[:2])):
        (logprobs, entropy), saved = _saved_logit_elements(fn, vocab)
        hidden.grad = None
        lm_head.zero_grad()
        (weights * logprobs).sum().backward()
        results[name] = (logprobs.detach(), entropy, hidden.grad.clone(), lm_head.weight.grad.clone(),
                         lm_head.bias.grad.clone(), saved)
    full_out, chunked_out = results["full"], results["chunked"]
    for a, b in zip(full_out[:5], chunked_out[:5]):
        assert a.shape == b.shape
        assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert full_out[0].max() < 0 and full_out[1].min() > 0  # real log-probs and entropies
    assert full_out[5] >= 15 * vocab  # the full path keeps its log-softmax for the backward...
    assert chunked_out[5] == 0  # ...the chunked one recomputes each chunk's logits instead
    assert not chunked_out[1].requires_grad  # the entropy is a statistic


def test_the_chunked_exact_kl_equals_the_full_distributions_kl_and_its_gradient():
    """`chunked_logprobs` with a `ReferenceHead`: per token, KL(pi || pi_ref) summed over the vocabulary
    (against the full logits of both, in chunks that cut across rows), its gradient w.r.t. the policy's
    hidden states and head, none into the reference; 0 with a zero gradient where pi = pi_ref."""
    from core.stages.rl import ReferenceHead, chunked_logprobs

    torch.manual_seed(2)
    vocab, width, temperature = 40, 12, 0.8
    lm_head = torch.nn.Linear(width, vocab, bias=False)
    ref_weight = lm_head.weight.detach() + 0.3 * torch.randn(vocab, width)
    hidden = torch.randn(3, 5, width, requires_grad=True)
    ref_hidden = hidden.detach() + 0.2 * torch.randn(3, 5, width)
    tokens = torch.randint(vocab, (3, 5))
    weights = torch.rand(3, 5)

    logp = (lm_head(hidden) / temperature).log_softmax(-1)
    logq = (ref_hidden @ ref_weight.T / temperature).log_softmax(-1)
    expected = (logp.exp() * (logp - logq)).sum(-1)
    (weights * expected).sum().backward()
    expected_grads = hidden.grad.clone(), lm_head.weight.grad.clone()

    hidden.grad, lm_head.weight.grad = None, None
    reference = ReferenceHead(ref_hidden, ref_weight, None)
    kl = chunked_logprobs(hidden, lm_head, tokens, temperature, max_chunk_logits=4 * vocab, reference=reference).kl
    (weights * kl).sum().backward()
    assert_close(kl.detach(), expected.detach(), atol=1e-5, rtol=1e-5)
    assert kl.min() > 0.01  # a real divergence, not a zero that would pass any comparison
    assert_close(hidden.grad, expected_grads[0], atol=1e-5, rtol=1e-5)
    assert_close(lm_head.weight.grad, expected_grads[1], atol=1e-5, rtol=1e-5)

    hidden.grad, lm_head.weight.grad = None, None
    same = ReferenceHead(hidden.detach(), lm_head.weight.detach(), None)
    kl = chunked_logprobs(hidden, lm_head, tokens, temperature, reference=same).kl
    kl.sum().backward()
    assert kl.abs().max() < 1e-5 and hidden.grad.abs().max() < 1e-5  # the minimum: no pull at pi = pi_ref


def test_chunked_logprobs_without_gradients_or_entropy():
    from core.stages.rl import chunked_logprobs

    torch.manual_seed(1)
    lm_head = torch.nn.Linear(8, 30, bias=False)
    hidden, tokens = torch.randn(2, 7, 8), torch.randint(30, (2, 7))
    with torch.no_grad():
        logprobs, entropy, kl = chunked_logprobs(hidden, lm_head, tokens, 1.3, max_chunk_logits=1)  # a token a chunk
        expected = logprobs_at(lm_head(hidden) / 1.3, tokens)
    assert entropy is None and kl is None
    assert_close(logprobs, expected, atol=1e-6, rtol=1e-6)
