"""Stage 3: PPO-ptx (InstructGPT, Ouyang et al. 2022, eq. 2), CleanRL-style: one file, top to bottom.

    objective(phi) = E_(x,y)~pi_phi [ r_theta(x, y) - beta * log(pi_phi(y|x) / pi_SFT(y|x)) ]
                     + gamma * E_x~D_pretrain [ log pi_phi(x) ]

Read in order: models and data -> `generate_responses` + `score_responses` (the rollout) -> `token_rewards` (KL penalty + RM
score on the last token) -> `gae` -> `ppo_update` (clipped surrogate + clipped value loss + ptx)
-> `ppo_step` (one rollout batch: all of the above) -> `run` (the stage: checkpoints, resume,
metrics). The benchmark (`benchmarks/bench_ppo.py`) drives the same `ppo_step`.

Why a hand-written loop and not a library trainer: TRL removed its PPOTrainer in 1.13 and none of
the trainers it kept has PPO's four networks, the ptx term and GAE over response tokens together.

The KL penalty is k1 = log pi - log pi_ref, per token, in the *reward* (`rl.kl_penalty`): with the
reward differentiated through the score function, only k1 gives the gradient of KL(pi || pi_SFT).
k3 (unbiased and non-negative as a *value*) would give grad KL(pi||ref) - grad KL(ref||pi), close
to 0 near the reference, so it is not offered here (docs/NOTES.md, "KL estimators").
Optionally (`kl_loss_coef` > 0, the quick preset) the loss also gets the exact KL over the whole
vocabulary at every answer token, which k1 on sampled tokens barely prices in the distribution's tail
(docs/NOTES.md, "The exact KL term" and "What PPO still loses").

Known details of PPO for language models followed here (Huang et al. 2022, "The N+ implementation
details of RLHF with PPO"; Ziegler et al. 2019; Stiennon et al. 2020), each cited where it is used:
no dropout (rollouts and updates), logits divided by the rollout temperature, a penalty for
answers that never emit EOS, KL as a per-token reward, GAE over response tokens only, advantage
whitening, value clipping, AdamW eps 1e-5, LR annealing, an adaptive KL controller.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from core.config import PPOConfig, uses_reward_model
from core.data import demo
from core.data.rollouts import RolloutRecorder
from core.data.sources import load_prompt_rows, load_ptx_texts
from core.data.store import Store
from core.distributed import Distributed
from core.stages.evaluate import gold_eval
from core.stages.reward_terms import Answers, Reward, RewardModelTerm, resolve_reward, reward_metrics
from core.stages.events import Events
from core.models.chat import fit_report
from core.models.generate import Samples, encode_prompts, sample
from core.models.loading import (
    Device,
    check_same_tokenizer,
    fuse_gelu,
    load_policy,
    load_scalar_model,
    load_tokenizer,
    pick_device,
    resolve_model,
    save_model,
    token_scores,
)
from core.models.ensemble import RewardEnsemble, load_reward_model
from core.models.lora import AdapterOff, prepare_for_training
from core.models.pretrain import HELDOUT_BLOCK_SIZE, demo_pretrain_loss, heldout_lm_loss, lm_loss, pack_cached
from core.models import optim
from core.stages import microbatch
from core.stages.resume import (
    checkpoint_path,
    latest_checkpoint,
    load_training_checkpoint,
    optimizer_state,
    restore_optimizer,
    save_training_checkpoint,
)
from core.stages.rl import (
    AllReduceSum,
    PromptSampler,
    ReferenceHead,
    chunked_logprobs,
    k3,
    kl_penalty,
    masked_mean,
    positions_from_mask,
    reference_head,
    response_logprobs,
    whiten,
)

EMA_DIR = "ema"  # the EMA policy, an HF directory inside each checkpoint
SUMMARY_FILE = "ppo_summary.json"
PTX_BLOCK_SIZE = HELDOUT_BLOCK_SIZE  # tokens per pretraining block, as for the held-out pretraining loss


# ---------------------------------------------------------------------------------------------
# Models: the four networks of RLHF-PPO and the one optimizer
# ---------------------------------------------------------------------------------------------


@dataclass
class PPOModels:
    """policy (trained), reference_policy (frozen SFT), value_model (trained), reward_model (frozen; None
    when no reward term is the RM), and `reward`, the terms that score an answer (core/stages/reward_terms.py).
    `trained`: policy and value model as one module (`PolicyAndValue`), which the update's forwards run
    through; under several processes (`dist`) its prepared (DDP) wrapper."""

    policy: torch.nn.Module
    reference_policy: torch.nn.Module
    value_model: torch.nn.Module
    reward_model: torch.nn.Module | None
    tokenizer: object
    optimizer: torch.optim.Optimizer
    device: Device
    trained: torch.nn.Module
    reward: Reward
    dist: Distributed = field(default_factory=Distributed)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Every weight of policy and value, or only their adapters (and the value head) under LoRA."""
        return [p for m in (self.policy, self.value_model) for p in m.parameters() if p.requires_grad]


class PolicyAndValue(torch.nn.Module):
    """The two trained networks in one forward: (response log-probs, entropies, V at every position, and with
    a `ReferenceHead` the exact per-token KL to the reference policy). accelerate
    prepares one module with the one optimizer, and DDP averages the gradients of each backward only
    after a forward of the module it wraps: one such forward per optimisation step covers both networks
    (the ptx term, computed on the plain policy in the same graph, is averaged with them;
    docs/NOTES.md, "Several processes")."""

    def __init__(self, policy: torch.nn.Module, value_model: torch.nn.Module):
        super().__init__()
        self.policy, self.value_model = policy, value_model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, prompt_len: int,
                temperature: float, reference: ReferenceHead | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        stats = response_logprobs(self.policy, ids, mask, positions, prompt_len, temperature, with_entropy=True,
                                  reference=reference)
        return stats.logprobs, stats.entropy, token_scores(self.value_model, ids, mask, positions), stats.kl


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def make_optimizer(policy, value_model, learning_rate: float) -> torch.optim.Optimizer:
    # One AdamW over policy and value (the loss is pg + vf_coef * vf); eps=1e-5 is the PPO
    # implementation detail from openai/baselines (CleanRL detail #3), not PyTorch's 1e-8.
    params = [p for m in (policy, value_model) for p in m.parameters() if p.requires_grad]
    return optim.adamw(params, learning_rate, eps=1e-5, weight_decay=0.0)


def assemble(policy, reference_policy, value_model, reward_model, tokenizer, config: PPOConfig,
             device: Device, reward: Reward | None = None) -> PPOModels:
    """Put the four networks in their modes: dropout off everywhere (docs/NOTES.md: with dropout on,
    the first-step KL reads -0.13 instead of 0), reference and reward model frozen; the reward terms
    (`reward`, as `check_inputs` resolved them, else the config's, resolved here), the `rm` term scored by
    `reward_model`."""
    for m in (policy, reference_policy, value_model, reward_model):
        if m is not None:  # loaded models run it already; the benchmark's are built from a config
            fuse_gelu(m)
    policy.train()
    value_model.train()
    for m in (policy, value_model):
        for module in m.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    freeze(reference_policy)
    if reward is None:
        reward = resolve_reward(config.reward)
    if reward_model is not None:
        if not isinstance(reward_model, RewardEnsemble):  # one reward model is an ensemble of one
            reward_model = RewardEnsemble([reward_model], config.reward_aggregate, config.uncertainty_coef)
        freeze(reward_model)
        reward = reward.with_reward_model(RewardModelTerm(reward_model, tokenizer.pad_token_id, device))
    return PPOModels(policy, reference_policy, value_model, reward_model, tokenizer,
                     make_optimizer(policy, value_model, config.learning_rate), device,
                     PolicyAndValue(policy, value_model), reward)


def load_models(config: PPOConfig, tokenizer, device: Device, policy_from: str | Path | None = None,
                reward: Reward | None = None) -> PPOModels:
    """Policy and reference start from SFT (the policy from `policy_from`: a resume's checkpoint, or a later
    round's start, `policy_init`); the value model starts from the reward model (InstructGPT 3.5), or from SFT
    with a new head when no reward term is the RM (then none is loaded); the RM itself stays frozen.

    With LoRA (`lora_r > 0`) two base networks serve all four: the reference policy is the policy
    with its adapter off, the reward model is the value model with its adapter off (and the RM's
    own head). Without LoRA the frozen networks load in `device.frozen_dtype`: bf16 on a GPU (their
    matmuls run in bf16 under autocast anyway), halving their memory; log-prob arithmetic stays fp32
    (`response_logprobs`). An ensemble RM (core/models/ensemble.py): the value model starts from its first
    member, and every member scores (under LoRA the first is the value model with its adapter off). `reward`:
    the run's terms, already resolved (`check_inputs`), so a user's reward file is executed once per run."""
    pad = tokenizer.pad_token_id
    uses_rm = uses_reward_model(config.reward)
    value_from = config.reward_model if uses_rm else config.sft_model
    if config.lora:
        policy = prepare_for_training(load_policy(config.sft_model, device, dropout=0.0), config, "causal",
                                      policy_from)
        value_model = prepare_for_training(load_scalar_model(value_from, pad, device), config, "score")
        reward_model = load_reward_model(config.reward_model, pad, device, how=config.reward_aggregate,
                                         uncertainty_coef=config.uncertainty_coef,
                                         first=AdapterOff(value_model)) if uses_rm else None
        return assemble(policy, AdapterOff(policy), value_model, reward_model, tokenizer, config, device, reward)
    policy = prepare_for_training(load_policy(policy_from or config.sft_model, device, dropout=0.0), config, "causal")
    reference_policy = load_policy(config.sft_model, device, dropout=0.0, dtype=device.frozen_dtype)
    reward_model = load_reward_model(config.reward_model, pad, device, device.frozen_dtype, config.reward_aggregate,
                                     config.uncertainty_coef) if uses_rm else None
    value_model = prepare_for_training(load_scalar_model(value_from, pad, device), config, "score")
    return assemble(policy, reference_policy, value_model, reward_model, tokenizer, config, device, reward)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a checkpoint must keep to resume a trained network: all of them, or its adapter."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"the checkpoint's value model does not fit this config (unexpected {unexpected[:3]}): "
                         "resume with the same lora settings it was trained with")


# ---------------------------------------------------------------------------------------------
# Rollout: sample answers, then score them with the frozen networks
# ---------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    ids: torch.Tensor  # (B, P+T) left-padded prompt + right-padded response
    mask: torch.Tensor  # (B, P+T)
    positions: torch.Tensor  # (B, P+T)
    prompt_len: int  # P
    response_ids: torch.Tensor  # (B, T)
    response_mask: torch.Tensor  # (B, T) float: 1 up to and including EOS
    finished: torch.Tensor  # (B,) bool: emitted EOS
    texts: list[str]
    logprobs: torch.Tensor | None  # (B, T) log pi_old(y_t), the behaviour policy (None until `ppo_step` fills it)
    ref_logprobs: torch.Tensor  # (B, T) log pi_SFT(y_t)
    values: torch.Tensor | None  # (B, T) V_old(s_t), the state *before* y_t (as `logprobs`)
    scores: torch.Tensor  # (B,) the reward, given at the last response token (minus missing-EOS penalty)
    reward_scores: torch.Tensor  # (B,) the reward: the terms' weighted sum (the RM score when reward is rm)
    reference: ReferenceHead | None = None  # kept for the exact KL term (`kl_loss_coef` > 0)
    term_scores: dict[str, torch.Tensor] = field(default_factory=dict)  # term name -> (B,) its unweighted values
    rm_members: torch.Tensor | None = None  # (members, B): each RM ensemble member's raw score; None without rm


def generate_responses(models: PPOModels, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                       config: PPOConfig) -> Samples:
    # KV-cached sampling; `sample` switches the policy to eval (no dropout in rollouts). Under bf16 precision
    # the rollout samples from the same bf16-autocast forward the update computes pi_old with (and a rollout of
    # a wide model runs ~1.7x faster on a CPU with bf16 instructions: docs/NOTES.md, "Precision").
    with models.device.autocast():
        return sample(models.policy, models.tokenizer, [], max_new_tokens=config.response_length,
                      temperature=config.temperature, prompt_ids=prompt_ids, prompt_mask=prompt_mask)


def policy_value_forward(models: PPOModels, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                         prompt_len: int, config: PPOConfig, reference: ReferenceHead | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The trained networks over prompt + response: (the policy's log-probs of the response tokens, V(s_t),
    the policy's entropy at each response position, detached, and with `reference` the exact KL to the
    reference policy at each, with gradients). V(s_t) is read at the position that predicts y_t, like the
    policy's log-probs.

    On one CPU process the rows are cut by length into several forwards where that saves computing padding
    (`core/stages/microbatch.py`): each forward drops the columns that are padding in all of its rows (the
    left padding of its prompts, the right padding of its answers), and the outputs go back in place,
    zero past each answer's end, as the masked whole batch reads them."""
    call_tokens = microbatch.call_tokens_for(models.device, models.dist)
    buckets = microbatch.length_buckets(mask.sum(1).tolist(), call_tokens)
    if len(buckets) == 1:
        return _policy_value_forward(models, ids, mask, positions, prompt_len, config, reference)
    answer_width = ids.shape[1] - prompt_len
    parts = []
    for rows in buckets:
        index = torch.tensor(rows, device=ids.device)
        part_mask = mask[index]
        first = int(part_mask[:, :prompt_len].any(0).nonzero()[0])  # every prompt has a token
        width = int(part_mask[:, prompt_len:].sum(1).max())  # the part's longest answer
        columns = slice(first, prompt_len + width)
        outputs = _policy_value_forward(
            models, ids[index, columns], part_mask[:, columns], positions[index, columns], prompt_len - first, config,
            None if reference is None else reference.rows(index, width))
        parts.append([None if t is None else F.pad(t, (0, answer_width - width)) for t in outputs])
    return tuple(None if column[0] is None else microbatch.in_given_order(buckets, column) for column in zip(*parts))


def _policy_value_forward(models: PPOModels, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                          prompt_len: int, config: PPOConfig, reference: ReferenceHead | None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    with models.device.autocast():
        logprobs, entropy, values, kl = models.trained(ids, mask, positions, prompt_len, config.temperature, reference)
        values = values[:, prompt_len - 1 : -1].float()
    return logprobs, values, entropy, kl


# no_grad rather than inference_mode: `ppo_step` runs the update's first forward, with gradients, on
# these tensors, and inference tensors cannot be saved for backward.
@torch.no_grad()
def score_responses(models: PPOModels, samples: Samples, config: PPOConfig, old_policy: bool = True,
                    prompts: list[str] | None = None, columns: list[dict] | None = None) -> Rollout:
    """One batched forward per frozen network over prompt+response (teacher forcing), and with
    `old_policy` one of the policy and the value model (pi_old, V_old); without it `logprobs` and
    `values` stay None for the caller to fill (`ppo_step` takes them from the update's first forward).
    `prompts` (as the user wrote them) and their rows' `columns` go to the reward terms that read them."""
    response_ids = samples.response_ids
    response_mask = samples.response_mask.float()
    ids, mask = samples.sequences()
    positions = positions_from_mask(mask)
    P = samples.prompt_ids.shape[1]
    logprobs = values = None
    if old_policy:
        # pi_old is recomputed here rather than kept from the sampling loop, so old and new
        # log-probs come from the same computation (ratio = 1 at the first minibatch).
        logprobs, values, _, _ = policy_value_forward(models, ids, mask, positions, P, config)
        logprobs, values = logprobs * response_mask, values * response_mask
    with models.device.autocast():
        # The reference's log-probs of the sampled tokens, from its hidden states, which the rollout keeps
        # for the update's exact KL term when there is one.
        reference = reference_head(models.reference_policy, ids, mask, positions, P)
        ref_logprobs = chunked_logprobs(reference.hidden, reference, response_ids, config.temperature).logprobs
    # Every term scores the whole answer; the RM reads it at its last token: the EOS when it stopped, else
    # the last sampled token (the answer was cut at response_length).
    rewarded = models.reward(Answers.of_samples(samples, prompts, columns))
    reward_scores = rewarded.total.to(response_mask.device)
    scores = reward_scores.clone()
    if config.missing_eos_penalty is not None:
        # Huang et al. detail: answers truncated without EOS are penalised, so the policy learns
        # to stop instead of rambling until the length limit.
        scores = torch.where(samples.finished, scores, scores - config.missing_eos_penalty)
    return Rollout(ids, mask, positions, P, response_ids, response_mask, samples.finished, samples.texts,
                   logprobs, ref_logprobs * response_mask, values, scores, reward_scores,
                   reference if config.kl_loss_coef > 0 else None, rewarded.terms, rewarded.rm_members)


# ---------------------------------------------------------------------------------------------
# Rewards and advantages
# ---------------------------------------------------------------------------------------------


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor, kl_coef: float,
                  whiten_rewards: bool = False, all_reduce_sum: AllReduceSum | None = None) -> torch.Tensor:
    """r_t = -beta * KL_t on every response token, plus the RM score on the last one (InstructGPT eq. 2;
    Ziegler et al. 2019 put the KL penalty in the reward rather than in the loss)."""
    rewards = -kl_coef * kl * response_mask
    last = (response_mask.sum(1).long() - 1).clamp(min=0)
    rewards = rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))
    if whiten_rewards:
        # Optional (Ziegler et al. normalise the reward); keep the mean so the KL/score balance holds.
        rewards = whiten(rewards, response_mask, shift_mean=False, all_reduce_sum=all_reduce_sum)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens only.

    Rewards and values are zero after the EOS, so the episode ends at the EOS: V(s_{T+1}) = 0
    and padding contributes nothing. Returns (advantages, returns = advantages + values).
    """
    rewards, values = rewards * response_mask, values * response_mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages[:, t] = last_gae
    advantages = advantages * response_mask
    return advantages, (advantages + values) * response_mask


def explained_variance(values: torch.Tensor, returns: torch.Tensor, response_mask: torch.Tensor,
                       all_reduce_sum: AllReduceSum | None = None) -> float:
    """1 - Var(returns - V) / Var(returns) over the response tokens (CleanRL logs it every update): 1 when
    the value model predicts the returns, 0 when it does no better than their mean, below 0 worse. NaN
    when the returns do not vary (nothing to explain; the metrics skip it)."""
    def variance(x: torch.Tensor) -> torch.Tensor:
        return masked_mean((x - masked_mean(x, response_mask, all_reduce_sum)) ** 2, response_mask, all_reduce_sum)

    spread = float(variance(returns))
    return 1.0 - float(variance(returns - values)) / spread if spread > 0 else float("nan")


class AdaptiveKLController:
    """Ziegler et al. 2019, eq. 2.1: steer beta so the measured KL approaches `target`."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, current_kl: float, n_episodes: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_episodes / self.horizon


# ---------------------------------------------------------------------------------------------
# The PPO update: clipped surrogate + clipped value loss + ptx
# ---------------------------------------------------------------------------------------------


def clipped_policy_loss(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        response_mask: torch.Tensor, cliprange: float,
                        count: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate objective (Schulman et al. 2017, eq. 7) per token, masked: returns
    (loss, ratio). The max of the two negated terms is the pessimistic bound of the objective.
    `count`: the token count to divide by (`Distributed.loss_denominator`; default: this batch's)."""
    ratio = ((new_logprobs - old_logprobs) * response_mask).exp()
    pg_losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange))
    return masked_mean(pg_losses, response_mask, count=count), ratio


def clipped_value_loss(new_values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       response_mask: torch.Tensor, cliprange_value: float,
                       count: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (openai/baselines; Huang et al. detail): the new value may move at most
    cliprange_value from the rollout's value. Returns (0.5 * masked mean of the max squared error,
    the fraction of tokens where the clipped error was the larger). `count`: as `clipped_policy_loss`."""
    v_clipped = old_values + (new_values - old_values).clamp(-cliprange_value, cliprange_value)
    unclipped, clipped = (new_values - returns) ** 2, (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped, clipped), response_mask, count=count)
    return loss, masked_mean((clipped > unclipped).float(), response_mask)


def ptx_loss_fn(policy, blocks: torch.Tensor, device: Device) -> torch.Tensor:
    """gamma * E[log pi(x)] on pretraining text becomes an LM loss term (InstructGPT "PPO-ptx")."""
    with device.autocast():
        return lm_loss(policy, blocks.to(device.torch))


def ppo_update(models: PPOModels, batch: Rollout, advantages: torch.Tensor, returns: torch.Tensor,
               config: PPOConfig, ptx_batches: Iterator[torch.Tensor] | None,
               first_forward: tuple[torch.Tensor, ...] | None = None) -> dict[str, float]:
    """`ppo_epochs` passes over the rollout in `num_minibatches` shuffled minibatches. `first_forward`:
    `policy_value_forward` over the whole batch with the rollout's weights, taken as the first
    minibatch's forward (only with one minibatch: later minibatches see updated weights)."""
    if first_forward is not None and config.num_minibatches != 1:
        raise ValueError("first_forward stands for the first minibatch's forward only when it is the whole batch")
    policy, device = models.policy, models.device
    B, P = batch.ids.shape[0], batch.prompt_len
    minibatch = B // config.num_minibatches
    params = models.trainable_parameters()
    stats: dict[str, list[torch.Tensor]] = {k: [] for k in (
        "policy_loss", "value_loss", "ptx_loss", "exact_kl", "clip_frac", "approx_kl", "entropy", "value_clip_frac")}
    for _ in range(config.ppo_epochs):
        order = torch.randperm(B, device=batch.ids.device)
        for start in range(0, B, minibatch):
            idx = order[start : start + minibatch]
            ids, mask, pos = batch.ids[idx], batch.mask[idx], batch.positions[idx]
            response_mask = batch.response_mask[idx]
            adv, ret = advantages[idx], returns[idx]
            old_logprobs, old_values = batch.logprobs[idx], batch.values[idx]
            if first_forward is not None:
                new_logprobs, new_values, entropy, exact_kl = (None if t is None else t[idx] for t in first_forward)
                first_forward = None
            else:
                reference = batch.reference.rows(idx) if batch.reference is not None else None
                new_logprobs, new_values, entropy, exact_kl = policy_value_forward(models, ids, mask, pos, P, config,
                                                                                   reference)

            # Token means over the global minibatch, not a mean of the ranks' means (which would weight a
            # rank's tokens by how few answer tokens it drew): one process divides by its own count.
            count = models.dist.loss_denominator(response_mask.sum())
            policy_loss, ratio = clipped_policy_loss(new_logprobs, old_logprobs, adv, response_mask, config.cliprange,
                                                     count)
            value_loss, value_clip_frac = clipped_value_loss(new_values, old_values, ret, response_mask,
                                                             config.cliprange_value, count)

            loss = policy_loss + config.vf_coef * value_loss
            if exact_kl is not None:
                # The exact KL over the vocabulary as a loss (`kl_loss_coef`): the reward's k1 penalty prices
                # only the sampled token, so a drift of the tail (a wrong word's probability creeping up)
                # costs almost nothing there; this term pulls every token's whole distribution back.
                loss = loss + config.kl_loss_coef * masked_mean(exact_kl, response_mask, count=count)
                stats["exact_kl"].append((exact_kl.detach() * response_mask).sum(1).mean())
            if config.ptx_coef > 0 and ptx_batches is not None:  # ptx_coef = 0: plain PPO, no ptx forward
                # PPO-ptx: the pretraining LM loss joins the policy loss on every optimisation step.
                ptx_loss = ptx_loss_fn(policy, next(ptx_batches), device)
                loss = loss + config.ptx_coef * ptx_loss
                stats["ptx_loss"].append(ptx_loss.detach())

            models.optimizer.zero_grad(set_to_none=True)
            models.dist.backward(loss)  # through accelerate: gradients averaged over the ranks
            models.dist.clip_grad_norm_(params, config.max_grad_norm)
            models.optimizer.step()

            with torch.no_grad():
                stats["policy_loss"].append(policy_loss.detach())
                stats["value_loss"].append(value_loss.detach())
                stats["clip_frac"].append(masked_mean(((ratio - 1).abs() > config.cliprange).float(), response_mask))
                stats["value_clip_frac"].append(value_clip_frac)
                # KL(pi_old || pi_new) by k3 on tokens sampled from pi_old (a value, not a reward): a
                # health check on the step size.
                stats["approx_kl"].append(masked_mean(k3(old_logprobs, new_logprobs.detach()), response_mask))
                stats["entropy"].append(masked_mean(entropy, response_mask))
    # One device sync for all statistics instead of one per minibatch.
    return {k: float(torch.stack(v).mean()) for k, v in stats.items() if v}


# ---------------------------------------------------------------------------------------------
# One PPO step = rollout -> rewards -> GAE -> update. Shared by `run` and the benchmark.
# ---------------------------------------------------------------------------------------------


@dataclass
class StepResult:
    metrics: dict[str, float]
    rollout: Rollout
    timings: dict[str, float]


def _sync(device: Device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reuses_first_forward(config: PPOConfig) -> bool:
    """With one minibatch the first PPO epoch's forward runs on the rollout's own weights, so its
    log-probs and values are pi_old and V_old: taken from it, with gradients kept for the update,
    they save the policy's and the value model's scoring forwards (docs/NOTES.md, "Stage 3: PPO-ptx")."""
    return config.num_minibatches == 1


def ppo_step(models: PPOModels, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, config: PPOConfig,
             kl_coef: float, ptx_batches: Iterator[torch.Tensor] | None = None,
             samples: Samples | None = None, prompts: list[str] | None = None,
             columns: list[dict] | None = None) -> StepResult:
    """`samples`: answers to these prompts sampled beforehand (from the current policy), instead of sampling
    them here. `prompts` and `columns`: the prompts' text and rows, for reward terms that read them."""
    t0 = time.perf_counter()
    if samples is None:
        with models.dist.full_weights(models.policy):
            samples = generate_responses(models, prompt_ids, prompt_mask, config)
    _sync(models.device)
    t_gen = time.perf_counter()
    reuse_first_forward = reuses_first_forward(config)
    batch = score_responses(models, samples, config, old_policy=not reuse_first_forward, prompts=prompts,
                            columns=columns)
    _sync(models.device)
    t1 = time.perf_counter()
    first_forward = None
    if reuse_first_forward:
        first_forward = policy_value_forward(models, batch.ids, batch.mask, batch.positions, batch.prompt_len, config,
                                             batch.reference)
        batch.logprobs = first_forward[0].detach() * batch.response_mask
        batch.values = first_forward[1].detach() * batch.response_mask
    _sync(models.device)
    t_first = time.perf_counter()

    with torch.no_grad():
        kl = kl_penalty(batch.logprobs, batch.ref_logprobs) * batch.response_mask
        rewards = token_rewards(batch.scores, kl, batch.response_mask, kl_coef, config.whiten_rewards,
                                models.dist.all_reduce_sum)
        advantages, returns = gae(rewards, batch.values, batch.response_mask, config.gamma, config.lam)
        # Advantage whitening over the whole batch (Huang et al. detail; CleanRL normalises per batch),
        # the global batch under several processes.
        advantages = whiten(advantages, batch.response_mask, all_reduce_sum=models.dist.all_reduce_sum)
    t2 = time.perf_counter()

    update_stats = ppo_update(models, batch, advantages, returns, config, ptx_batches, first_forward)
    _sync(models.device)
    t3 = time.perf_counter()

    lengths = batch.response_mask.sum(1)
    metrics = {
        "reward": float(batch.reward_scores.mean()),
        **reward_metrics(batch.term_scores, batch.rm_members),
        "score": float(batch.scores.mean()),
        "kl": float(kl.sum(1).mean()),
        "kl_coef": kl_coef,
        "response_length": float(lengths.mean()),
        "eos_rate": float(batch.finished.float().mean()),
        # The rollout's values V_old against the returns they bootstrap: how well the value model fits.
        "explained_variance": explained_variance(batch.values, returns, batch.response_mask,
                                                 models.dist.all_reduce_sum),
        **update_stats,
        "episodes_per_s": prompt_ids.shape[0] / (t3 - t0),
    }
    timings = {"generation": t_gen - t0, "scoring": t1 - t_gen, "advantages": t2 - t_first,
               "update": t3 - t2 + t_first - t1}
    return StepResult(metrics, batch, timings)


# ---------------------------------------------------------------------------------------------
# Pretraining (ptx) batches
# ---------------------------------------------------------------------------------------------


def ptx_batch_stream(blocks: torch.Tensor, batch_size: int, generator: torch.Generator,
                     skip: int = 0) -> Iterator[torch.Tensor]:
    """Endless shuffled batches of pretraining blocks; `skip` fast-forwards after a resume."""
    def stream():
        while True:
            order = torch.randperm(len(blocks), generator=generator)
            for i in range(0, len(order) - batch_size + 1, batch_size):
                yield blocks[order[i : i + batch_size]]
            if len(order) < batch_size:
                yield blocks[order]
    it = stream()
    for _ in range(skip):
        next(it)
    return it


# ---------------------------------------------------------------------------------------------
# Checkpoints: policy HF dir + optimizer + value weights + trainer state + RNG + EMA, one atomic write
# ---------------------------------------------------------------------------------------------


def save_step_checkpoint(models: PPOModels, path: Path, state: dict, sampler: PromptSampler,
                         ema: torch.nn.Module | None) -> Path:
    # The EMA policy is a plain HF directory inside the checkpoint (it can be chatted with), written
    # in the same atomic directory: a crash cannot leave a step without its EMA.
    return save_training_checkpoint(
        models.policy, models.tokenizer, path, state,
        {**optimizer_state(models.optimizer, models.dist.sharded), "value_model": trainable_state(models.value_model),
         "prompts": sampler.state()},
        models.device, extra_models={EMA_DIR: ema} if ema is not None else None)


def ema_update(ema: torch.nn.Module, policy: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * policy, parameter by parameter (InstructGPT kept an EMA)."""
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(policy.parameters()), 1.0 - decay)


# ---------------------------------------------------------------------------------------------
# Held-out evaluation on a user's data (the demo has its own held-out tasks and corpus)
# ---------------------------------------------------------------------------------------------


def split_off(prompts: list, n: int) -> tuple[list, list]:
    """(training prompts, up to `n` held-out prompts): at most a tenth, none from fewer than 20."""
    k = min(n, len(prompts) // 10) if len(prompts) >= 20 else 0
    return prompts[k:], prompts[:k]


def split_blocks(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(training ptx blocks, held-out blocks): a twentieth held out when there are 20 or more."""
    k = len(blocks) // 20
    return (blocks[k:], blocks[:k]) if k else (blocks, None)


@torch.no_grad()
def heldout_reward(models: PPOModels, tokenizer, prompts: list[str], columns: list[dict],
                   config: PPOConfig) -> dict[str, float]:
    """Mean reward of answers sampled at the rollout temperature to prompts the policy never trained on:
    `heldout_reward` and each term's `heldout_reward/<term>` (a verifier's held-out pass rate)."""
    totals: list[float] = []
    terms: dict[str, list[float]] = {}
    for i in range(0, len(prompts), config.batch_size):
        batch = slice(i, i + config.batch_size)
        prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts[batch], config.max_prompt_length,
                                                 device=models.device.torch)
        rollout = score_responses(models, generate_responses(models, prompt_ids, prompt_mask, config), config,
                                  old_policy=False, prompts=prompts[batch], columns=columns[batch])
        totals += rollout.reward_scores.tolist()
        for name, values in rollout.term_scores.items():
            terms.setdefault(name, []).extend(values.tolist())
    models.policy.train()
    return {"heldout_reward": sum(totals) / len(totals),
            **{f"heldout_reward/{name}": sum(v) / len(v) for name, v in terms.items()}}


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def check_inputs(config: PPOConfig, store: Store | None):
    """Every check a user can fail, before loading a model: returns (tokenizer, prompts, their rows' columns,
    ptx_texts, the reward). The reward's terms are resolved here, once for the run (user files loaded, the
    columns they read checked); the run hands this `Reward` on to `load_models`."""
    config.validate()
    uses_rm = uses_reward_model(config.reward)
    models = ([("sft_model", "SFT checkpoint")] + ([("reward_model", "reward model checkpoint")] if uses_rm else [])
              + ([("policy_init", "policy to start from")] if config.policy_init else []))
    for name, what in models:
        try:
            resolve_model(getattr(config, name))
        except ValueError as exc:
            raise ValueError(f"{name} ({what}): {exc}") from exc
    tokenizer = load_tokenizer(config.sft_model)
    if uses_rm:
        check_same_tokenizer(tokenizer, load_tokenizer(config.reward_model),
                             f"reward_model {config.reward_model} does not match sft_model {config.sft_model}")
    if config.policy_init:
        check_same_tokenizer(tokenizer, load_tokenizer(config.policy_init),
                             f"policy_init {config.policy_init} does not match sft_model {config.sft_model}")
    prompts, columns = load_prompt_rows(config.prompts, store)
    reward = resolve_reward(config.reward)
    reward.check_rows(prompts, columns)
    ptx_texts = load_ptx_texts(config.ptx_data) if config.ptx_coef > 0 else None
    return tokenizer, prompts, columns, ptx_texts, reward


def run(config: PPOConfig, store: Store | None, events: Events, output_dir: str | Path) -> Path:
    """Train the policy with PPO-ptx. Returns `output_dir` (the final policy, an HF directory), or
    the last step checkpoint when stopped early. Re-running with the same `output_dir` resumes."""
    output_dir = Path(output_dir)
    tokenizer, prompts, columns, ptx_texts, reward = check_inputs(config, store)
    note = fit_report(tokenizer, prompts, config.max_prompt_length)  # a prompt that cannot fit is refused here
    if note:
        events.log(note)
    dist = events.dist  # one process, or this rank of several (core/distributed.py)
    dist.check_batches("ppo", config)
    device = pick_device(config.device, config.precision)
    torch.manual_seed(config.seed)
    resume_from = latest_checkpoint(output_dir, "step")

    # A checkpoint of this run wins over policy_init: a resume goes on from where it stood.
    models = load_models(config, tokenizer, device, policy_from=resume_from or config.policy_init or None,
                         reward=reward)
    policy, value_model = models.policy, models.value_model

    # Gold scores and the demo's held-out pretraining loss mean something only on the demo's own
    # prompts. On a user's data the run holds out a slice of its prompts (held-out RM reward) and of
    # its ptx text (held-out LM loss: the alignment tax on the user's own pretraining data).
    gold_prompts = config.prompts == "demo" or demo.is_demo_task(prompts)  # the demo's prompts, built in or stored
    heldout = demo.heldout_tasks(config.eval_prompts) if gold_prompts else []
    prompts, heldout_prompts = (prompts, []) if gold_prompts else split_off(prompts, config.eval_prompts)
    columns, heldout_columns = (columns, []) if gold_prompts else split_off(columns, config.eval_prompts)

    num_steps = max(1, config.total_episodes // config.batch_size)
    opt_steps_per_ppo_step = config.ppo_epochs * config.num_minibatches
    sampler = PromptSampler(len(prompts), config.batch_size, config.seed)
    kl_ctl = AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)
    state = {"step": 0, "kl_coef": config.kl_coef, "episodes": 0, "history": []}
    if resume_from is not None:
        state, training = load_training_checkpoint(resume_from, device)
        load_trainable_state(value_model, training["value_model"])
        restore_optimizer(models.optimizer, training, events.log)
        sampler.load(training["prompts"])
        kl_ctl.value = state["kl_coef"]
        events.log(f"resuming PPO after step {state['step']} from {resume_from}")
    # `policy` and `value_model` stay the plain modules (sampling, scoring, saving); the update's
    # forwards run through the prepared `models.trained`.
    models.trained, models.optimizer = dist.prepare(models.trained, models.optimizer)
    models.dist = dist

    ema = None
    if config.ema_decay is not None:
        ema_dir = resume_from / EMA_DIR if resume_from is not None else None
        ema = load_policy(ema_dir, device) if ema_dir and ema_dir.is_dir() else copy.deepcopy(policy)
        freeze(ema)

    ptx_batches, heldout_blocks = None, None
    if ptx_texts is not None:
        ptx_generator = torch.Generator().manual_seed(config.seed + 1)
        blocks = pack_cached(tokenizer, ptx_texts, PTX_BLOCK_SIZE)
        blocks, heldout_blocks = (blocks, None) if gold_prompts else split_blocks(blocks)
        # Resume at the same place in the pretraining stream (cheap: it only draws indices). Every rank
        # draws the same global batches and trains on its share of each.
        ptx_batches = map(dist.shard, ptx_batch_stream(blocks, config.ptx_batch_size, ptx_generator,
                                                       skip=state["step"] * opt_steps_per_ppo_step))

    prefix = events.run_id or "ppo"
    rollout_log = RolloutRecorder(store if dist.is_main else None, events.run_id, num_steps, tokenizer)

    def checkpoint(step: int) -> Path:
        state["processes"] = dist.world_size  # who wrote it (a record: every checkpoint resumes on any number)
        path = checkpoint_path(output_dir, "step", step)
        with dist.full_weights(policy):
            if dist.is_main:  # the one checkpoint writer
                path = save_step_checkpoint(models, path, state, sampler, ema)
                events.checkpoint(f"{prefix}-step-{step}", "ppo", path, step)
        dist.barrier()  # every rank returns once the checkpoint is whole
        return path

    def evaluate_heldout(step: int) -> float | None:
        if not heldout:
            return None
        with dist.full_weights(policy):  # every rank evaluates the same prompts with the same seed
            gold = gold_eval(policy, tokenizer, heldout, temperature=config.temperature,
                             max_new_tokens=config.response_length, seed=config.seed)["gold"]
        policy.train()
        events.metrics(step, {"heldout_gold": gold})
        return gold

    while state["step"] < num_steps:
        if events.should_stop():
            path = checkpoint(state["step"])
            events.log(f"stopped after step {state['step']}; resume with the same output directory")
            events.close()
            return path
        step = state["step"] + 1
        # CleanRL detail #4: anneal the learning rate linearly to 0 (a function of the step, so
        # a resumed run continues the same schedule).
        for group in models.optimizer.param_groups:
            group["lr"] = config.learning_rate * (1.0 - (step - 1) / num_steps)
        idx = sampler.next()  # the global batch, the same on every rank; each samples its share
        batch_prompts = [prompts[i] for i in dist.shard(idx)]
        prompt_ids, prompt_mask = encode_prompts(tokenizer, batch_prompts, config.max_prompt_length,
                                                 device=device.torch)
        result = ppo_step(models, prompt_ids, prompt_mask, config, kl_ctl.value, ptx_batches, prompts=batch_prompts,
                          columns=[columns[i] for i in dist.shard(idx)])
        rollout_log.record(step, batch_prompts, result.rollout)  # a bounded sample for the rollout browser
        metrics = result.metrics
        if gold_prompts:
            metrics["gold"] = (sum(demo.gold_score(p, t) for p, t in zip(batch_prompts, result.rollout.texts))
                               / len(batch_prompts))
        # The global batch's means, for the KL controller (every rank keeps the same kl_coef) and the summary.
        global_means = dist.reduce_metrics({k: metrics.get(k) for k in ("reward", "kl", "ptx_loss")})
        if config.adaptive_kl:
            kl_ctl.update(global_means["kl"], config.batch_size)
        if ema is not None:
            ema_update(ema, policy, config.ema_decay)
        state.update(step=step, kl_coef=kl_ctl.value, episodes=state["episodes"] + len(idx))
        state["history"] = (state["history"] + [global_means])[-5:]
        events.metrics(step, metrics)
        events.progress(step, num_steps, "ppo")
        if config.eval_every and step % config.eval_every == 0 and step < num_steps:
            evaluate_heldout(step)
        if step % config.save_every == 0 and step < num_steps:
            checkpoint(step)

    # Final evaluation (demo prompts only): sampled gold at the rollout temperature (PPO's gains show
    # there, docs/NOTES.md), greedy beside it, and the alignment tax as held-out pretraining loss.
    gold = evaluate_heldout(state["step"])
    final: dict[str, float] = {}
    if heldout:
        final["heldout_gold_greedy"] = gold_eval(policy, tokenizer, heldout, temperature=0.0,
                                                 max_new_tokens=config.response_length)["gold"]
    if gold_prompts:
        final["pretrain_loss"] = demo_pretrain_loss(policy, tokenizer, device)
    if heldout_prompts:
        final.update(heldout_reward(models, tokenizer, heldout_prompts, heldout_columns, config))
    if heldout_blocks is not None:
        final["ptx_heldout_loss"] = heldout_lm_loss(policy, heldout_blocks, device)
    recent = state["history"]

    def recent_mean(key: str) -> float | None:
        values = [h[key] for h in recent if h.get(key) is not None]
        return sum(values) / len(values) if values else None

    summary = {
        "stage": "ppo", "step": state["step"], "episodes": state["episodes"],
        "kl": recent_mean("kl"), "reward": recent_mean("reward"), "ptx_loss": recent_mean("ptx_loss"),
        "kl_coef": state["kl_coef"],
    }
    if gold is not None:
        summary.update(gold=gold, gold_greedy=final["heldout_gold_greedy"])
    for key in ("pretrain_loss", "heldout_reward", "ptx_heldout_loss"):
        if key in final:
            summary[key] = final[key]
    summary["evaluation"] = "demo" if gold_prompts else "user data"
    if final:
        events.metrics(state["step"], final)
    checkpoint(state["step"])  # the resumable end state (a re-run only re-evaluates)
    with dist.full_weights(policy):
        if dist.is_main:
            save_model(policy, tokenizer, output_dir, extra_json={SUMMARY_FILE: summary},
                       extra_models={EMA_DIR: ema} if ema is not None else None)
    dist.barrier()  # the other ranks return once the output is written
    events.checkpoint(prefix, "ppo", output_dir, state["step"])
    events.close()
    return output_dir
