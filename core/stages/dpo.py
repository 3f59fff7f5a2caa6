"""Stage 3, alternative: DPO (Rafailov et al. 2023), through TRL's DPOTrainer.

    loss = -log sigmoid( beta * [ (log pi(y_w|x) - log pi_SFT(y_w|x)) - (log pi(y_l|x) - log pi_SFT(y_l|x)) ] )

No reward model and no sampling while training: the policy learns from the preference pairs
directly, with the SFT model as the frozen reference. The pairs are the same K-wise rankings the
reward model learns from, every ranking expanded to its C(K,2) (chosen, rejected) pairs: the RM
stage's rankings (`<rm output>-rankings.jsonl`, what the pipeline passes), the store's, a rankings
or pairs file, or on `data: demo` rankings sampled and labelled exactly as the RM stage does.

TRL does the method (loss types, reference log-probs, its checkpoints and resume); this module
builds the data and the trainer, and `trl_bridge` connects it to the workbench (metrics, stop,
checkpoints, the final model and evaluation). Our own code here: `implicit_rewards`, DPO's
implicit reward margin on pairs computed from our tokenisation, which the summary reports
(accuracy of the implicit reward on the training pairs, the number to compare with the RM's).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from core.config import DPOConfig
from core.data import demo
from core.data.sources import Ranking, load_rankings
from core.data.store import Store
from core.stages.evaluate import all_demo
from core.stages.events import Events
from core.models.lm_head import check_plain_logits
from core.models.loading import (
    Device,
    hf_model,
    last_hidden_state,
    load_policy,
    load_tokenizer,
    pick_device,
    resolve_model,
)
from core.stages import trl_bridge
from core.stages.rl import chunked_logprobs

SUMMARY_PAIRS = 256  # training pairs scored for the summary's implicit-reward accuracy


def check_inputs(config: DPOConfig, store: Store | None):
    """Every check a user can fail, before any model loads: returns (tokenizer, rankings or None for demo)."""
    config.validate()
    try:
        resolve_model(config.sft_model)
    except ValueError as exc:
        raise ValueError(f"sft_model (SFT checkpoint): {exc}") from None
    tokenizer = load_tokenizer(config.sft_model)
    if config.data == "demo":
        return tokenizer, None
    rankings = load_rankings(config.data, store)
    short = [r for r in rankings if len(r.responses) < 2]
    if short:
        raise ValueError(f"DPO needs rankings of at least 2 responses; {len(short)} in {config.data!r} have fewer")
    if not rankings:
        raise ValueError(f"no rankings in {config.data!r}: DPO needs preference pairs (rank answers on the Rank page)")
    return tokenizer, rankings


def gather_pairs(config: DPOConfig, rankings: list[Ranking] | None, tokenizer, device: Device,
                 events: Events) -> list[dict]:
    if rankings is None:  # demo: sample K answers per prompt from SFT, the simulated labeler ranks them
        from core.stages.reward import sample_demo_rankings

        policy = load_policy(config.sft_model, device, dropout=0.0)
        rankings = sample_demo_rankings(policy, tokenizer, demo.train_tasks(config.n_prompts), config.k,
                                        config.sample_temperature, config.labeler_temperature, config.seed, events,
                                        "training")
        del policy
    pairs = trl_bridge.preference_pairs(rankings, tokenizer, config.max_length, events)
    if not pairs:
        raise ValueError("no preference pairs: every sampled group collapsed to one distinct answer")
    return pairs


def answer_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                 ignore_index: int) -> torch.Tensor:
    """log pi(answer | prompt) per row: the summed log-probs of the tokens whose label is not `ignore_index`,
    with the LM head over those positions only, in chunks (`rl.chunked_logprobs`): never the batch's
    (rows, length, vocabulary) logits."""
    with hf_model(model) as lm:
        check_plain_logits(lm.config)
        hidden = last_hidden_state(lm, input_ids, attention_mask)[:, :-1]
        targets = labels[:, 1:]
        keep = targets != ignore_index
        logps = chunked_logprobs(hidden[keep], lm.get_output_embeddings(), targets[keep], 1.0).logprobs
        return torch.zeros(len(targets), dtype=logps.dtype, device=logps.device).index_add_(
            0, keep.nonzero()[:, 0], logps)


@torch.no_grad()
def implicit_rewards(policy, reference, tokenizer, pairs: list[dict], beta: float, max_length: int,
                     device: Device, batch_size: int = 32) -> dict[str, float]:
    """DPO's implicit reward r = beta * (log pi(y|x) - log pi_ref(y|x)) of chosen and rejected answers:
    the mean margin r_w - r_l and the share of pairs with a positive margin (0 and 0.0 before training,
    where pi = pi_ref). Answers are tokenised as SFT encodes them: prompt, " " + answer, EOS."""
    from core.stages.sft import IGNORE, collate, encode

    def seq_logps(model, texts: list[tuple[str, str]]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), batch_size):
            batch = collate([encode(tokenizer, p, a, max_length) for p, a in texts[i : i + batch_size]],
                            tokenizer.pad_token_id, device)
            out.append(answer_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"], IGNORE))
        return torch.cat(out)

    policy.eval()
    reference.eval()
    chosen = [(p["raw_prompt"], p["chosen"]) for p in pairs]
    rejected = [(p["raw_prompt"], p["rejected"]) for p in pairs]
    r_w = beta * (seq_logps(policy, chosen) - seq_logps(reference, chosen))
    r_l = beta * (seq_logps(policy, rejected) - seq_logps(reference, rejected))
    margin = r_w - r_l
    return {"margin": float(margin.mean()), "accuracy": float((margin > 0).float().mean())}


def make_trainer(config: DPOConfig, pairs: list[dict], tokenizer, device: Device, events: Events, output_dir: Path):
    """(TRL's DPOTrainer for a workbench run, our callback): policy and reference start at the SFT model."""
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    policy = load_policy(config.sft_model, device, dropout=0.0)
    # Under LoRA the reference is the policy with its adapter off (TRL's PEFT path): no second copy.
    reference = None if config.lora else load_policy(config.sft_model, device, dropout=0.0)
    args = trl_bridge.training_args(
        TRLDPOConfig, config, output_dir, device, num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1, per_device_train_batch_size=config.batch_size,
        warmup_steps=config.warmup_ratio, beta=config.beta, loss_type=[config.loss_type],
        label_smoothing=config.label_smoothing, max_length=config.max_length,
    )
    callback = trl_bridge.make_callback("dpo", "dpo", events, trl_bridge.DPO_METRICS)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args,
                         train_dataset=trl_bridge.dataset(pairs, drop=("raw_prompt",)), processing_class=tokenizer,
                         callbacks=[callback], peft_config=trl_bridge.peft_config(config))
    return trainer, callback


def run(config: DPOConfig, store: Store | None, events: Events, output_dir: str | Path) -> Path:
    """Train the policy with DPO from `config.sft_model`. Returns `output_dir` (the final policy, an HF
    directory), or the stop step's checkpoint when stopped. Re-running with the same `output_dir` resumes."""
    output_dir = Path(output_dir)
    tokenizer, rankings = check_inputs(config, store)
    trl_bridge.quiet()
    device = pick_device(config.device, config.precision)
    torch.manual_seed(config.seed)
    pairs = trl_bridge.data_once(output_dir, lambda: gather_pairs(config, rankings, tokenizer, device, events))
    events.log(f"DPO: {len(pairs)} preference pairs")
    trainer, callback = make_trainer(config, pairs, tokenizer, device, events, output_dir)
    trl_bridge.train(trainer, callback, output_dir, events, "DPO")

    summary: dict = {"pairs": len(pairs)}
    if not callback.stopped:
        sample = random.Random(config.seed).sample(pairs, min(SUMMARY_PAIRS, len(pairs)))
        trained = trainer.accelerator.unwrap_model(trainer.model)
        fresh = load_policy(config.sft_model, device, dropout=0.0)
        implicit = implicit_rewards(trained, fresh, tokenizer, sample, config.beta, config.max_length, device)
        summary.update(train_pair_accuracy=implicit["accuracy"], train_pair_margin=implicit["margin"])
    evaluate = None
    # Gold applies on the demo's prompts, also through the store or a file (the RM stage's rankings).
    if config.data == "demo" or all_demo([p["raw_prompt"] for p in pairs]):
        evaluate = dict(n_prompts=config.eval_prompts, temperature=config.eval_temperature, max_new_tokens=24)
    return trl_bridge.finish(trainer, callback, "dpo", "dpo", config, tokenizer, events, output_dir, summary, evaluate)

