"""Stage 1: supervised fine-tuning on demonstrations.

Causal-LM loss on the response tokens only (prompt tokens are masked with -100), cosine decay
with warmup, residual/attention dropout, one checkpoint per epoch, and the best epoch chosen by
held-out gold score (InstructGPT picked its SFT checkpoint by validation RM score; our demo
has a labeler, so we use gold directly) or, on non-demo data, by held-out loss.

Why not TRL's SFTTrainer: on models this small the Trainer's per-step machinery (callbacks,
accelerate wrapping, dataset mapping) costs as much as the forward pass, and we need the
per-epoch gold evaluation, cooperative stop and store metrics inline. `rlhf bench sft
--against trl` measures both on the same data and batch size.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from core.config import SFTConfig
from core.data import demo
from core.data.sources import load_demonstrations
from core.data.store import Store
from core.stages.evaluate import gold_eval
from core.stages.events import Events
from core.models.chat import encode_answer, encode_conversation, recent_turns
from core.models.loading import Device, load_policy, load_tokenizer, pick_device, save_model
from core.models.lm_head import causal_lm_loss
from core.models.lora import prepare_for_training
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

IGNORE = -100
SUMMARY_FILE = "sft_summary.json"
MIN_ROWS_TO_SPLIT = 10  # fewer demonstrations than this: no validation split, the last epoch is kept
GROUP_BATCHES = 8  # length grouping sorts this many batches' worth of examples at a time (`length_grouped`)


def encode(tokenizer, prompt: str, completion: str, max_length: int,
           context: list[dict] | None = None) -> tuple[list[int], list[int]]:
    """Token ids and labels in the model's chat format; labels are -100 except on assistant turns, so
    only the answer (and, in a multi-turn demonstration, every earlier assistant turn) carries loss."""
    if context:
        # Too long: the oldest whole exchanges go first, as a prompt's do (`recent_turns`); with only the
        # last exchange left, it is cut as a single-turn demonstration is.
        conversation = [*context, {"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        for kept in recent_turns(conversation):
            ids, labels = encode_conversation(tokenizer, kept)
            if len(ids) <= max_length:
                return ids, labels
    prompt_ids, answer_ids = encode_answer(tokenizer, prompt, completion)
    prompt_ids = prompt_ids[-(max_length // 2):]  # keep the end of a long prompt, where the question is
    ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + answer_ids)[:max_length]
    return ids, labels


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int, device: Device) -> dict:
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), IGNORE)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {k: v.to(device.torch) for k, v in dict(input_ids=input_ids, attention_mask=mask, labels=labels).items()}


def length_grouped(order: list[int], lengths: list[int], batch_size: int, rng: random.Random,
                   group_batches: int = GROUP_BATCHES) -> list[int]:
    """`order` (already shuffled; `lengths` in the same order) regrouped so each batch holds examples of
    similar length: every `group_batches` batches' worth is sorted by length and cut into batches, and
    the full batches are shuffled (a partial last batch stays last, where the loop drops or takes it as
    before). Padding is what a batch pays for its longest example: on the demo's answers this takes the
    real tokens from ~64 % of the padded batch to ~94 % (transformers' `group_by_length` does the same)."""
    batches = []
    span = batch_size * group_batches
    for start in range(0, len(order), span):
        chunk = sorted(range(start, min(start + span, len(order))), key=lambda i: -lengths[i])
        batches += [[order[i] for i in chunk[b : b + batch_size]] for b in range(0, len(chunk), batch_size)]
    partial = [batches.pop()] if batches and len(batches[-1]) < batch_size else []
    rng.shuffle(batches)
    return [i for batch in batches + partial for i in batch]


@torch.no_grad()
def mean_loss(model, examples, pad_id: int, device: Device, batch_size: int) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], pad_id, device)
        answer_tokens = int((batch["labels"][:, 1:] != IGNORE).sum())
        with device.autocast():
            total += causal_lm_loss(model, **batch, num_items=max(1, answer_tokens)).item() * len(batch["input_ids"])
        count += len(batch["input_ids"])
    model.train(was_training)
    return total / max(1, count)


def answer_loss(trained, model, batch: dict, answer_tokens: float) -> torch.Tensor:
    """The batch's summed answer-token loss over `answer_tokens`: with the LM head over the answer tokens
    only, in chunks (`core/models/lm_head.py`), where `trained` is the plain model; through the wrapper's
    own forward (and HF's full-logits loss) under DDP or DeepSpeed, whose gradient sync hooks that forward."""
    if trained is model:
        return causal_lm_loss(model, **batch, num_items=answer_tokens)
    return trained(**batch, num_items_in_batch=answer_tokens).loss


def run(config: SFTConfig, store: Store | None, events: Events, output_dir: str | Path) -> Path:
    """Train SFT; returns `output_dir`, which holds the best epoch as an HF model directory."""
    config.validate()
    dist = events.dist  # one process, or this rank of several (core/distributed.py)
    dist.check_batches("sft", config)
    output_dir = Path(output_dir)
    device = pick_device(config.device, config.precision)
    torch.manual_seed(config.seed)
    rows = load_demonstrations(config.data, store, config.n_demonstrations, config.ramble_rate, config.seed)
    resume_from = latest_checkpoint(output_dir, "epoch")
    tokenizer = load_tokenizer(config.model)
    # With LoRA the base loads as it is and the checkpoint's adapter goes back on top of it.
    model = load_policy(config.model if config.lora else (resume_from or config.model), device, dropout=config.dropout)
    model = prepare_for_training(model, config, "causal", resume_from if config.lora else None)
    model.train()

    # Hold out a validation slice (5 %, at least 1) to pick the best epoch by held-out loss; data
    # too small to split keeps its last epoch.
    rng = random.Random(config.seed)
    rows = rows[:]
    rng.shuffle(rows)
    n_val = max(1, len(rows) // 20) if len(rows) >= MIN_ROWS_TO_SPLIT else 0
    val_rows, train_rows = rows[:n_val], rows[n_val:]
    train = [encode(tokenizer, r["prompt"], r["completion"], config.max_length, r.get("context")) for r in train_rows]
    val = [encode(tokenizer, r["prompt"], r["completion"], config.max_length, r.get("context")) for r in val_rows]
    # Gold on the demo's held-out prompts when the data is the demo task (built in, or imported into the store).
    use_gold = config.eval_prompts > 0 and (config.data == "demo" or demo.is_demo_task(r["prompt"] for r in rows))
    heldout = demo.heldout_tasks(config.eval_prompts) if use_gold else []
    selection = "gold" if heldout else "val_loss" if val else "last_epoch"
    if selection == "last_epoch":
        events.log(f"only {len(rows)} demonstrations: too few to hold out a validation split "
                   f"(fewer than {MIN_ROWS_TO_SPLIT}), so the last epoch is kept")

    batch_starts = dist.batch_starts(len(train), config.batch_size)
    total_steps = len(batch_starts) * config.epochs
    trainable = [p for p in model.parameters() if p.requires_grad]  # the adapter alone under LoRA
    optimizer = optim.adamw(trainable, config.learning_rate, weight_decay=config.weight_decay)
    scheduler = optim.make_schedule(optimizer, total_steps, config.warmup_ratio)
    state = {"epoch": 0, "step": 0, "best_score": None, "best_epoch": None}
    if resume_from is not None:
        state, training = load_training_checkpoint(resume_from, device)
        restore_optimizer(optimizer, training, events.log)
        scheduler.load_state_dict(training["scheduler"])
        events.log(f"resuming SFT after epoch {state['epoch']} (step {state['step']})")
    # `model` stays the plain module (evaluation, saving); training runs through `trained`.
    trained, optimizer = dist.prepare(model, optimizer)
    # Batches cut by length where that saves computing padding (core/stages/microbatch.py).
    call_tokens = microbatch.call_tokens_for(device, dist)

    stopped = False
    for epoch in range(state["epoch"] + 1, config.epochs + 1):
        order = list(range(len(train)))
        epoch_rng = random.Random(config.seed * 1000 + epoch)
        epoch_rng.shuffle(order)
        if config.group_by_length:
            order = length_grouped(order, [len(train[j][0]) for j in order], config.batch_size, epoch_rng)
        start, tokens = time.perf_counter(), 0
        for i in batch_starts:
            if events.should_stop():
                stopped = True
                break
            examples = [train[j] for j in dist.shard(order[i : i + config.batch_size])]
            parts = [collate([examples[k] for k in bucket], tokenizer.pad_token_id, device)
                     for bucket in microbatch.length_buckets([len(ids) for ids, _ in examples], call_tokens)]
            # The loss is the mean over the global batch's answer tokens, not a mean of the ranks' means
            # (which weights a rank's tokens by its share and moves Adam's first steps elsewhere): DDP
            # averages gradients over the ranks, so each rank divides its token sum by global count / N.
            # Every micro-batch divides by the whole count, so their losses sum to the batch's.
            answer_tokens = dist.loss_denominator(sum((part["labels"][:, 1:] != IGNORE).sum() for part in parts))
            with device.autocast():
                loss = sum(answer_loss(trained, model, part, answer_tokens.item()) for part in parts)
            optim.step(loss, model, optimizer, scheduler, dist=dist)
            state["step"] += 1
            tokens += sum(int(part["attention_mask"].sum()) for part in parts)
            events.metrics(state["step"], {
                "sft_loss": loss.item(), "learning_rate": scheduler.get_last_lr()[0],
                "tokens_per_s": tokens / (time.perf_counter() - start),
            })
            events.progress(state["step"], total_steps, "sft")
        if stopped:
            break
        state["epoch"] = epoch
        epoch_metrics = {"epoch": epoch}
        if val:
            epoch_metrics["val_loss"] = mean_loss(model, val, tokenizer.pad_token_id, device, config.batch_size)
        if heldout:
            with dist.full_weights(model):
                scores = gold_eval(model, tokenizer, heldout, temperature=config.eval_temperature, seed=config.seed)
            epoch_metrics.update({"gold": scores["gold"], "eos_rate": scores["eos_rate"]})
        events.metrics(state["step"], epoch_metrics)
        score = {"gold": epoch_metrics.get("gold"), "val_loss": -epoch_metrics.get("val_loss", 0.0),
                 "last_epoch": epoch}[selection]
        improved = state["best_score"] is None or score > state["best_score"]
        if improved:
            state["best_score"], state["best_epoch"] = score, epoch
        state["processes"] = dist.world_size  # who wrote it (a record: every checkpoint resumes on any number)
        training = {**optimizer_state(optimizer, dist.sharded), "scheduler": scheduler.state_dict()}
        with dist.full_weights(model):
            if dist.is_main:  # the one checkpoint writer
                if improved:
                    summary = {**epoch_metrics, "stage": "sft", "selected_by": selection, "train_rows": len(train),
                               "validation_rows": len(val)}
                    save_model(model, tokenizer, output_dir, extra_json={SUMMARY_FILE: summary})
                ckpt = save_training_checkpoint(model, tokenizer, checkpoint_path(output_dir, "epoch", epoch), state,
                                                training, device)
                events.checkpoint(f"{events.run_id or 'sft'}-epoch-{epoch}", "sft", ckpt, state["step"])
        events.log(f"epoch {epoch}: " + " ".join(f"{k}={v:.4g}" for k, v in epoch_metrics.items()))
    if dist.is_main and not (output_dir / "config.json").is_file():
        # Stopped before the first epoch ended: still leave a loadable model behind.
        save_model(model, tokenizer, output_dir, extra_json={SUMMARY_FILE: {"stage": "sft", "stopped": True}})
    dist.barrier()  # the other ranks return once the output is written
    events.checkpoint(events.run_id or "sft", "sft", output_dir, state["step"])
    events.close()
    return output_dir
