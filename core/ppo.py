"""Stage 3: PPO-ptx (InstructGPT, Ouyang et al. 2022, eq. 2), CleanRL-style: one file, top to bottom.

    objective(phi) = E_(x,y)~pi_phi [ r_theta(x, y) - beta * log(pi_phi(y|x) / pi_SFT(y|x)) ]
                     + gamma * E_x~D_pretrain [ log pi_phi(x) ]

Read in order: models and data -> `generate_responses` + `score_responses` (the rollout) -> `token_rewards` (KL penalty + RM
score on the last token) -> `gae` -> `ppo_update` (clipped surrogate + clipped value loss + ptx)
-> `ppo_step` (one rollout batch: all of the above) -> `run` (the stage: checkpoints, resume,
metrics). The benchmark (`core/bench_ppo.py`) drives the same `ppo_step`.

Known details of PPO for language models followed here (Huang et al. 2022, "The N+ implementation
details of RLHF with PPO"; Ziegler et al. 2019; Stiennon et al. 2020), each cited where it is used:
no dropout (rollouts and updates), logits divided by the rollout temperature, a penalty for
answers that never emit EOS, KL as a per-token reward, GAE over response tokens only, advantage
whitening, value clipping, AdamW eps 1e-5, LR annealing, an adaptive KL controller.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.activations import ACT2FN, NewGELUActivation

from core import demo
from core.config import PPOConfig
from core.evaluate import gold_eval
from core.events import Events
from core.formats import parse_rows, read_bytes
from core.generate import Samples, encode_prompts, sample
from core.models import (
    Device,
    check_same_tokenizer,
    load_policy,
    load_scalar_model,
    load_tokenizer,
    pick_device,
    resolve_model,
    save_checkpoint,
    token_scores,
)
from core.pretrain import heldout_lm_loss, lm_loss, pack
from core.stages import checkpoints_dir
from core.store import Store

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
VALUE_FILE = "value_model.pt"
RNG_FILE = "rng.pt"
SUMMARY_FILE = "ppo_summary.json"
PTX_BLOCK_SIZE = 128  # tokens per pretraining block, as for the held-out pretraining loss


# ---------------------------------------------------------------------------------------------
# Models: the four networks of RLHF-PPO and the one optimizer
# ---------------------------------------------------------------------------------------------


@dataclass
class PPOModels:
    """policy (trained), reference_policy (frozen SFT), value_model (trained), reward_model (frozen)."""

    policy: torch.nn.Module
    reference_policy: torch.nn.Module
    value_model: torch.nn.Module
    reward_model: torch.nn.Module
    tokenizer: object
    optimizer: torch.optim.Optimizer
    device: Device

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [*self.policy.parameters(), *self.value_model.parameters()]


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def make_optimizer(policy, value_model, learning_rate: float) -> torch.optim.Optimizer:
    # One AdamW over policy and value (the loss is pg + vf_coef * vf); eps=1e-5 is the PPO
    # implementation detail from openai/baselines (CleanRL detail #3), not PyTorch's 1e-8.
    params = [*policy.parameters(), *value_model.parameters()]
    return torch.optim.AdamW(params, lr=learning_rate, eps=1e-5, weight_decay=0.0, foreach=True)


def fuse_gelu(model: torch.nn.Module) -> torch.nn.Module:
    """Swap GPT-2's "gelu_new" (written out as ~6 elementwise ops, each with its own backward) for
    torch's tanh-approximate GELU: the same function (max difference ~1e-7) in one fused kernel.
    Profiling the PPO update on CPU put those elementwise ops at ~30% of the time."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, NewGELUActivation):
                setattr(module, name, ACT2FN["gelu_pytorch_tanh"])
    return model


def assemble(policy, reference_policy, value_model, reward_model, tokenizer, config: PPOConfig,
             device: Device) -> PPOModels:
    """Put the four networks in their modes: dropout off everywhere (DESIGN.md: with dropout on,
    the first-step KL reads -0.13 instead of 0), reference and reward model frozen."""
    for m in (policy, reference_policy, value_model, reward_model):
        fuse_gelu(m)
    policy.train()
    value_model.train()
    for m in (policy, value_model):
        for module in m.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    freeze(reference_policy)
    freeze(reward_model)
    return PPOModels(policy, reference_policy, value_model, reward_model, tokenizer,
                     make_optimizer(policy, value_model, config.learning_rate), device)


def load_models(config: PPOConfig, tokenizer, device: Device, policy_from: str | Path | None = None) -> PPOModels:
    """Policy and reference start from SFT (the policy from `policy_from` on resume); the value
    model starts from the reward model (InstructGPT 3.5); the RM itself stays frozen."""
    policy = load_policy(policy_from or config.sft_model, device, dropout=0.0)
    reference_policy = load_policy(config.sft_model, device, dropout=0.0)
    reward_model = load_scalar_model(config.reward_model, tokenizer.pad_token_id, device)
    value_model = load_scalar_model(config.reward_model, tokenizer.pad_token_id, device)
    return assemble(policy, reference_policy, value_model, reward_model, tokenizer, config, device)


# ---------------------------------------------------------------------------------------------
# Small tensor helpers
# ---------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise over the real (unmasked) tokens only, so padding does not skew the statistics."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    # Left-padded prompts: each row's first real token is position 0, as in training and sampling.
    return (mask.cumsum(-1) - 1).clamp(min=0)


def response_logits(model, ids, mask, positions, prompt_len: int, temperature: float) -> torch.Tensor:
    """Logits that predict each response token: positions P-1 .. P+T-2 of the full sequence.

    `logits_to_keep` skips the LM head on prompt positions. Dividing by the rollout temperature
    makes these the log-probs of the distribution we actually sampled from (Huang et al. detail).
    """
    response_len = ids.shape[1] - prompt_len
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                   logits_to_keep=response_len + 1).logits[:, :-1]
    return logits.float() / temperature


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.gather(logits.log_softmax(-1), 2, tokens[..., None]).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(-1)
    return torch.logsumexp(logits, -1) - (probs * logits).sum(-1)


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
    logprobs: torch.Tensor  # (B, T) log pi_old(y_t), the behaviour policy
    ref_logprobs: torch.Tensor  # (B, T) log pi_SFT(y_t)
    values: torch.Tensor  # (B, T) V_old(s_t), the state *before* y_t
    scores: torch.Tensor  # (B,) RM score at the last response token (minus missing-EOS penalty)
    rm_scores: torch.Tensor  # (B,) raw RM score, for the `reward` metric


def generate_responses(models: PPOModels, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                       config: PPOConfig) -> Samples:
    # KV-cached sampling; `sample` switches the policy to eval (no dropout in rollouts).
    return sample(models.policy, models.tokenizer, [], max_new_tokens=config.response_length,
                  temperature=config.temperature, prompt_ids=prompt_ids, prompt_mask=prompt_mask)


@torch.inference_mode()
def score_responses(models: PPOModels, samples: Samples, config: PPOConfig) -> Rollout:
    """One batched forward per frozen/old network over prompt+response (teacher forcing)."""
    prompt_ids, prompt_mask = samples.prompt_ids, samples.prompt_mask
    response_ids = samples.response_ids
    response_mask = samples.response_mask.float()
    ids = torch.cat([prompt_ids, response_ids], 1)
    mask = torch.cat([prompt_mask, samples.response_mask], 1)
    positions = positions_from_mask(mask)
    P = prompt_ids.shape[1]
    with models.device.autocast():
        # pi_old is recomputed here rather than kept from the sampling loop, so old and new
        # log-probs come from the same computation (ratio = 1 at the first minibatch).
        logprobs = gather_logprobs(response_logits(models.policy, ids, mask, positions, P, config.temperature),
                                   response_ids)
        ref_logprobs = gather_logprobs(
            response_logits(models.reference_policy, ids, mask, positions, P, config.temperature), response_ids)
        # V(s_t) is read at the position that predicts y_t, like the policy's logits.
        values = token_scores(models.value_model, ids, mask, positions)[:, P - 1 : -1].float()
        # The RM scores the whole answer at its last response token: the EOS when it stopped,
        # else the last sampled token (the answer was cut at response_length).
        last = (response_mask.sum(1).long() - 1).clamp(min=0)
        rm_all = token_scores(models.reward_model, ids, mask, positions)[:, P:].float()
        rm_scores = rm_all.gather(1, last[:, None]).squeeze(1)
    scores = rm_scores.clone()
    if config.missing_eos_penalty is not None:
        # Huang et al. detail: answers truncated without EOS are penalised, so the policy learns
        # to stop instead of rambling until the length limit.
        scores = torch.where(samples.finished, scores, scores - config.missing_eos_penalty)
    values = values * response_mask
    logprobs, ref_logprobs = logprobs * response_mask, ref_logprobs * response_mask
    return Rollout(ids, mask, positions, P, response_ids, response_mask, samples.finished, samples.texts,
                   logprobs, ref_logprobs, values, scores, rm_scores)


# ---------------------------------------------------------------------------------------------
# Rewards and advantages
# ---------------------------------------------------------------------------------------------


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_SFT) on the sampled token (Schulman, "Approximating KL").

    k1 = log pi - log pi_ref is unbiased but can be negative per token; k3 = (r - 1) - log r with
    r = pi_ref / pi is unbiased and never negative.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    return log_ratio


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor, kl_coef: float,
                  whiten_rewards: bool = False) -> torch.Tensor:
    """r_t = -beta * KL_t on every response token, plus the RM score on the last one (InstructGPT eq. 2;
    Ziegler et al. 2019 put the KL penalty in the reward rather than in the loss)."""
    rewards = -kl_coef * kl * response_mask
    last = (response_mask.sum(1).long() - 1).clamp(min=0)
    rewards = rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))
    if whiten_rewards:
        # Optional (Ziegler et al. normalise the reward); keep the mean so the KL/score balance holds.
        rewards = whiten(rewards, response_mask, shift_mean=False)
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


def ptx_loss_fn(policy, blocks: torch.Tensor, device: Device) -> torch.Tensor:
    """gamma * E[log pi(x)] on pretraining text becomes an LM loss term (InstructGPT "PPO-ptx")."""
    with device.autocast():
        return lm_loss(policy, blocks.to(device.torch))


def ppo_update(models: PPOModels, batch: Rollout, advantages: torch.Tensor, returns: torch.Tensor,
               config: PPOConfig, ptx_batches: Iterator[torch.Tensor] | None) -> dict[str, float]:
    """`ppo_epochs` passes over the rollout in `num_minibatches` shuffled minibatches."""
    policy, value_model, device = models.policy, models.value_model, models.device
    B, P = batch.ids.shape[0], batch.prompt_len
    minibatch = B // config.num_minibatches
    params = models.trainable_parameters()
    stats: dict[str, list[torch.Tensor]] = {k: [] for k in (
        "policy_loss", "value_loss", "ptx_loss", "clip_frac", "approx_kl", "entropy", "value_clip_frac")}
    for _ in range(config.ppo_epochs):
        order = torch.randperm(B, device=batch.ids.device)
        for start in range(0, B, minibatch):
            idx = order[start : start + minibatch]
            ids, mask, pos = batch.ids[idx], batch.mask[idx], batch.positions[idx]
            response_mask = batch.response_mask[idx]
            adv, ret = advantages[idx], returns[idx]
            old_logprobs, old_values = batch.logprobs[idx], batch.values[idx]
            with device.autocast():
                logits = response_logits(policy, ids, mask, pos, P, config.temperature)
                new_values = token_scores(value_model, ids, mask, pos)[:, P - 1 : -1].float()
            new_logprobs = gather_logprobs(logits, batch.response_ids[idx])

            # Clipped surrogate objective (Schulman et al. 2017, eq. 7), per token, masked.
            log_ratio = (new_logprobs - old_logprobs) * response_mask
            ratio = log_ratio.exp()
            pg_losses = torch.max(-adv * ratio, -adv * ratio.clamp(1 - config.cliprange, 1 + config.cliprange))
            policy_loss = masked_mean(pg_losses, response_mask)

            # Clipped value loss (openai/baselines; Huang et al. detail): the new value may move
            # at most cliprange_value from the rollout's value.
            v_clipped = old_values + (new_values - old_values).clamp(-config.cliprange_value, config.cliprange_value)
            vf_losses = torch.max((new_values - ret) ** 2, (v_clipped - ret) ** 2)
            value_loss = 0.5 * masked_mean(vf_losses, response_mask)

            loss = policy_loss + config.vf_coef * value_loss
            if config.ptx_coef > 0 and ptx_batches is not None:  # ptx_coef = 0: plain PPO, no ptx forward
                # PPO-ptx: the pretraining LM loss joins the policy loss on every optimisation step.
                ptx_loss = ptx_loss_fn(policy, next(ptx_batches), device)
                loss = loss + config.ptx_coef * ptx_loss
                stats["ptx_loss"].append(ptx_loss.detach())

            models.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm, foreach=True)
            models.optimizer.step()

            with torch.no_grad():
                stats["policy_loss"].append(policy_loss.detach())
                stats["value_loss"].append(value_loss.detach())
                stats["clip_frac"].append(masked_mean(((ratio - 1).abs() > config.cliprange).float(), response_mask))
                stats["value_clip_frac"].append(masked_mean((vf_losses > (new_values - ret) ** 2).float(), response_mask))
                # Old-vs-new policy KL (k3 estimator), a health check on the step size.
                stats["approx_kl"].append(masked_mean(torch.expm1(-log_ratio) + log_ratio, response_mask))
                stats["entropy"].append(masked_mean(entropy_from_logits(logits.detach()), response_mask))
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


def ppo_step(models: PPOModels, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, config: PPOConfig,
             kl_coef: float, ptx_batches: Iterator[torch.Tensor] | None = None) -> StepResult:
    t0 = time.perf_counter()
    samples = generate_responses(models, prompt_ids, prompt_mask, config)
    _sync(models.device)
    t_gen = time.perf_counter()
    batch = score_responses(models, samples, config)
    _sync(models.device)
    t1 = time.perf_counter()

    with torch.no_grad():
        kl = kl_per_token(batch.logprobs, batch.ref_logprobs, config.kl_estimator) * batch.response_mask
        rewards = token_rewards(batch.scores, kl, batch.response_mask, kl_coef, config.whiten_rewards)
        advantages, returns = gae(rewards, batch.values, batch.response_mask, config.gamma, config.lam)
        # Advantage whitening over the whole batch (Huang et al. detail; CleanRL normalises per batch).
        advantages = whiten(advantages, batch.response_mask)
    t2 = time.perf_counter()

    update_stats = ppo_update(models, batch, advantages, returns, config, ptx_batches)
    _sync(models.device)
    t3 = time.perf_counter()

    lengths = batch.response_mask.sum(1)
    metrics = {
        "reward": float(batch.rm_scores.mean()),
        "score": float(batch.scores.mean()),
        "kl": float(kl.sum(1).mean()),
        "kl_coef": kl_coef,
        "response_length": float(lengths.mean()),
        "eos_rate": float(batch.finished.float().mean()),
        **update_stats,
        "episodes_per_s": prompt_ids.shape[0] / (t3 - t0),
    }
    timings = {"generation": t_gen - t0, "scoring": t1 - t_gen, "advantages": t2 - t1, "update": t3 - t2}
    return StepResult(metrics, batch, timings)


# ---------------------------------------------------------------------------------------------
# Data: prompts and pretraining text
# ---------------------------------------------------------------------------------------------


def _column(path: Path, column: str, what: str) -> list[str]:
    """One text column of a JSONL/CSV file, read by the same parser as the app's imports."""
    try:
        rows = parse_rows(read_bytes(path), path.name)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    texts = []
    for number, row in rows:
        value = row.get(column)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f'{what}: {path.name} line {number} has no "{column}" text')
        texts.append(value.strip())
    return texts


def load_prompts(source: str, store: Store | None) -> list[str]:
    """'demo' -> the demo's training prompts; 'store' -> the workbench's prompts; else a JSONL/CSV file."""
    if source == "demo":
        return [t.prompt for t in demo.train_tasks()]
    if source == "store":
        if store is None:
            raise ValueError("prompts='store' needs the workbench store, but none was given")
        prompts = [row["text"] for row in store.list_prompts()]
        if not prompts:
            raise ValueError("the store has no prompts; add some on the Prompts page or import a JSONL file")
        return prompts
    return _column(Path(source).expanduser(), "prompt", "prompts file")


def load_ptx_texts(source: str) -> list[str]:
    """'demo' -> the demo pretraining corpus; else a text file (one document a line) or JSONL with "text"."""
    if source == "demo":
        return demo.pretraining_corpus()
    path = Path(source).expanduser()
    if path.suffix in (".jsonl", ".csv"):
        return _column(path, "text", "ptx_data file")
    try:
        lines = [ln for ln in read_bytes(path).decode("utf-8", errors="replace").splitlines() if ln.strip()]
    except ValueError as exc:
        raise ValueError(f"ptx_data file: {exc}") from None
    if not lines:
        raise ValueError(f"ptx_data file {path} is empty")
    return lines


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


class PromptSampler:
    """Shuffled passes over the prompts, `batch_size` at a time (a DataLoader with a saved position)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def next(self) -> list[int]:
        out: list[int] = []
        while len(out) < self.batch_size:
            if not self.order:
                self.order = torch.randperm(self.n, generator=self.generator).tolist()
            take = self.batch_size - len(out)
            out += self.order[:take]
            self.order = self.order[take:]
        return out

    def state(self) -> dict:
        return {"order": self.order, "generator": self.generator.get_state()}

    def load(self, state: dict) -> None:
        self.order = list(state["order"])
        self.generator.set_state(state["generator"])


# ---------------------------------------------------------------------------------------------
# Checkpoints: policy HF dir + optimizer + value weights + trainer state + RNG (+ EMA beside it)
# ---------------------------------------------------------------------------------------------


def latest_checkpoint(output_dir: Path) -> Path | None:
    ckpts = [p for p in checkpoints_dir(output_dir).glob("step-*")
             if p.name[5:].isdigit() and (p / STATE_FILE).is_file()]
    return max(ckpts, key=lambda p: int(p.name[5:])) if ckpts else None


def save_training_checkpoint(models: PPOModels, path: Path, state: dict, sampler: PromptSampler,
                             ema: torch.nn.Module | None) -> Path:
    rng = {"torch": torch.get_rng_state(), "prompts": sampler.state()}
    if models.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state_all()
    save_checkpoint(
        models.policy, models.tokenizer, path,
        extra={OPTIMIZER_FILE: models.optimizer.state_dict(), VALUE_FILE: models.value_model.state_dict(),
               RNG_FILE: rng},
        extra_json={STATE_FILE: state},
    )
    if ema is not None:
        # The EMA policy is a plain HF directory too, so it can be chatted with or evaluated.
        save_checkpoint(ema, models.tokenizer, path / "ema")
    return path


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def check_inputs(config: PPOConfig, store: Store | None):
    """Every check a user can fail, before loading a model: returns (tokenizer, prompts, ptx_texts)."""
    config.validate()
    for field, what in (("sft_model", "SFT checkpoint"), ("reward_model", "reward model checkpoint")):
        try:
            resolve_model(getattr(config, field))
        except ValueError as exc:
            raise ValueError(f"{field} ({what}): {exc}") from exc
    tokenizer = load_tokenizer(config.sft_model)
    check_same_tokenizer(tokenizer, load_tokenizer(config.reward_model),
                         f"reward_model {config.reward_model} does not match sft_model {config.sft_model}")
    prompts = load_prompts(config.prompts, store)
    ptx_texts = load_ptx_texts(config.ptx_data) if config.ptx_coef > 0 else None
    return tokenizer, prompts, ptx_texts


def run(config: PPOConfig, store: Store | None, events: Events, output_dir: str | Path) -> Path:
    """Train the policy with PPO-ptx. Returns `output_dir` (the final policy, an HF directory), or
    the last step checkpoint when stopped early. Re-running with the same `output_dir` resumes."""
    output_dir = Path(output_dir)
    tokenizer, prompts, ptx_texts = check_inputs(config, store)
    device = pick_device(config.device)
    torch.manual_seed(config.seed)
    resume_from = latest_checkpoint(output_dir)

    models = load_models(config, tokenizer, device, policy_from=resume_from)
    policy, value_model = models.policy, models.value_model

    num_steps = max(1, config.total_episodes // config.batch_size)
    opt_steps_per_ppo_step = config.ppo_epochs * config.num_minibatches
    sampler = PromptSampler(len(prompts), config.batch_size, config.seed)
    kl_ctl = AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)
    state = {"step": 0, "kl_coef": config.kl_coef, "episodes": 0, "history": []}
    if resume_from is not None:
        state = json.loads((resume_from / STATE_FILE).read_text())
        value_model.load_state_dict(torch.load(resume_from / VALUE_FILE, weights_only=True, map_location=device.torch))
        models.optimizer.load_state_dict(torch.load(resume_from / OPTIMIZER_FILE, weights_only=True,
                                                    map_location=device.torch))
        rng = torch.load(resume_from / RNG_FILE, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state_all(rng["cuda"])
        sampler.load(rng["prompts"])
        kl_ctl.value = state["kl_coef"]
        events.log(f"resuming PPO after step {state['step']} from {resume_from}")

    ema = None
    if config.ema_decay is not None:
        ema_dir = resume_from / "ema" if resume_from is not None else None
        ema = load_policy(ema_dir, device) if ema_dir and ema_dir.is_dir() else copy.deepcopy(policy)
        freeze(ema)

    ptx_batches = None
    if ptx_texts is not None:
        ptx_generator = torch.Generator().manual_seed(config.seed + 1)
        blocks = pack(tokenizer, ptx_texts, PTX_BLOCK_SIZE)
        # Resume at the same place in the pretraining stream (cheap: it only draws indices).
        ptx_batches = ptx_batch_stream(blocks, config.ptx_batch_size, ptx_generator,
                                       skip=state["step"] * opt_steps_per_ppo_step)

    gold_prompts = config.prompts == "demo"
    heldout = demo.heldout_tasks(100)
    prefix = events.run_id or "ppo"

    def checkpoint(step: int) -> Path:
        path = save_training_checkpoint(models, checkpoints_dir(output_dir) / f"step-{step}", state, sampler, ema)
        events.checkpoint(f"{prefix}-step-{step}", "ppo", path, step)
        return path

    def evaluate_heldout(step: int) -> float:
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
        idx = sampler.next()
        batch_prompts = [prompts[i] for i in idx]
        prompt_ids, prompt_mask = encode_prompts(tokenizer, batch_prompts, device=device.torch)
        result = ppo_step(models, prompt_ids, prompt_mask, config, kl_ctl.value, ptx_batches)
        metrics = result.metrics
        if gold_prompts:
            metrics["gold"] = sum(demo.gold_score(p, t) for p, t in zip(batch_prompts, result.rollout.texts)) / len(idx)
        if config.adaptive_kl:
            kl_ctl.update(metrics["kl"], config.batch_size)
        if ema is not None:
            # InstructGPT kept an exponential moving average of the policy weights.
            with torch.no_grad():
                ema_params, params = list(ema.parameters()), list(policy.parameters())
                torch._foreach_lerp_(ema_params, params, 1.0 - config.ema_decay)
        state.update(step=step, kl_coef=kl_ctl.value, episodes=state["episodes"] + len(idx))
        state["history"] = (state["history"] + [{k: metrics.get(k) for k in ("reward", "kl", "ptx_loss")}])[-5:]
        events.metrics(step, metrics)
        events.progress(step, num_steps, "ppo")
        if config.eval_every and step % config.eval_every == 0 and step < num_steps:
            evaluate_heldout(step)
        if step % config.save_every == 0 and step < num_steps:
            checkpoint(step)

    # Final evaluation: sampled gold at the rollout temperature (DESIGN.md: PPO's gains show
    # there), greedy beside it, and the alignment tax as held-out pretraining loss.
    gold = evaluate_heldout(state["step"])
    gold_greedy = gold_eval(policy, tokenizer, heldout, temperature=0.0, max_new_tokens=config.response_length)["gold"]
    pretrain_loss = heldout_lm_loss(policy, pack(tokenizer, demo.heldout_corpus(), PTX_BLOCK_SIZE), device)
    recent = state["history"]

    def recent_mean(key: str) -> float | None:
        values = [h[key] for h in recent if h.get(key) is not None]
        return sum(values) / len(values) if values else None

    summary = {
        "stage": "ppo", "step": state["step"], "episodes": state["episodes"],
        "gold": gold, "gold_greedy": gold_greedy,
        "kl": recent_mean("kl"), "reward": recent_mean("reward"), "ptx_loss": recent_mean("ptx_loss"),
        "pretrain_loss": pretrain_loss, "kl_coef": state["kl_coef"],
    }
    events.metrics(state["step"], {"heldout_gold_greedy": gold_greedy, "pretrain_loss": pretrain_loss})
    checkpoint(state["step"])  # the resumable end state (a re-run only re-evaluates)
    save_checkpoint(policy, tokenizer, output_dir, extra_json={SUMMARY_FILE: summary})
    if ema is not None:
        save_checkpoint(ema, tokenizer, output_dir / "ema")
    events.checkpoint(prefix, "ppo", output_dir, state["step"])
    events.close()
    return output_dir
