"""`rlhf bench sft|rm --against trl`: our stage loops and TRL's trainers on the same model (the bundled
one, or random weights of the shape `--config`/`--arch` give: `benchmarks/shapes.py`), the same rows,
batch size, maximum length and precision, alternating in one process (`--pairs`: ours, TRL, ours, TRL...,
so a shared machine's load hits both sides alike; the medians are reported).

Timings exclude data preparation on both sides (TRL tokenises in its constructor; our loops
report the rate of their own training steps). Units: SFT in trained tokens per second (prompt +
answer, as both sides count them), RM in preference pairs per second. Absolute numbers on a shared
machine are noise: read the ratio.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.options import batch_size
from benchmarks.shapes import describe, model_config, save_random_model
from benchmarks.update_ceiling import ceiling_share
from core.data import demo
from core.config import RewardConfig, SFTConfig
from core.stages.events import Events
from core.models.chat import render_prompt
from core.models.loading import Device, pick_device


class _LastMetrics(Events):
    """Events that remember the latest value of each metric (no store, no console)."""

    def __init__(self):
        super().__init__()
        self.last: dict[str, float] = {}

    def metrics(self, step, values):
        self.last.update(values)


def _device(args) -> Device:
    """The device and precision of both sides (`--device`, `--precision`)."""
    return pick_device(args.device, getattr(args, "precision", "auto"))


def _trl_common(tmp: str, batch_size: int, device: Device, max_length: int) -> dict:
    return dict(
        output_dir=tmp, per_device_train_batch_size=batch_size, num_train_epochs=1, learning_rate=1e-4,
        save_strategy="no", report_to="none", logging_steps=10_000, disable_tqdm=True,
        use_cpu=device.type == "cpu", bf16=device.precision == "bf16", dataloader_num_workers=0,
        max_length=max_length,
    )


def _alternating(args, stage: str, ours: Callable[[], float], trl: Callable[[], float], unit: str) -> dict:
    """`--pairs` runs of ours then TRL's (TRL's only with `--against trl`); the medians and their ratio."""
    ours_runs, trl_runs = [], []
    for _ in range(max(1, args.pairs)):
        ours_runs.append(ours())
        if args.against == "trl":
            trl_runs.append(trl())
    result = {"unit": unit, "ours": statistics.median(ours_runs), "ours_runs": ours_runs}
    if trl_runs:
        result |= {"trl": statistics.median(trl_runs), "trl_runs": trl_runs}
        result["ratio"] = result["ours"] / result["trl"]
    return result | ceiling_share(args, stage, result["ours"])


def _model(args, tmp: str) -> tuple[str, dict]:
    """The model both sides train, and its shape as printed: the bundled model, or a random-init one of the
    asked shape saved in `tmp`."""
    from transformers import AutoConfig

    from core.paths import BUNDLED_MODEL_DIR

    config = model_config(args)
    if config is None:
        return "bundled", describe(AutoConfig.from_pretrained(BUNDLED_MODEL_DIR)) | {"weights": "bundled"}
    path = save_random_model(config, args.config, Path(tmp) / "model", args.seed)
    return str(path), describe(config) | {"weights": "random"}


def bench_sft(args) -> dict:
    from core.stages import sft

    rows = demo.demonstrations(demo.train_tasks(args.examples), ramble_rate=0.5)
    device = _device(args)
    batch = batch_size(args, "sft")
    with tempfile.TemporaryDirectory() as tmp:
        model, shape = _model(args, tmp)
        config = SFTConfig(model=model, data="demo", n_demonstrations=args.examples, ramble_rate=0.5, epochs=1,
                           batch_size=batch, learning_rate=1e-4, dropout=0.0, eval_prompts=0, device=device.type,
                           precision=device.precision, max_length=args.max_length)

        def ours() -> float:
            with tempfile.TemporaryDirectory() as out:
                events = _LastMetrics()
                sft.run(config, None, events, Path(out) / "sft")
                return events.last["tokens_per_s"]

        measured = _alternating(args, "sft", ours, lambda: _trl_sft(rows, model, device, config), "tokens/s")
    return {"bench": "sft", "examples": args.examples, "batch_size": batch, "max_length": args.max_length,
            "precision": config.precision, "shape": shape, **measured}


def _trl_sft(rows: list[dict], model_ref: str, device: Device, config: SFTConfig) -> float:
    from datasets import Dataset
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    from core.models.loading import load_policy, load_tokenizer

    tokenizer = load_tokenizer(model_ref)
    model = load_policy(model_ref, device, dropout=0.0)
    # Same text as our encode(): chat-formatted prompt, " " + answer, EOS (TRL appends it).
    data = Dataset.from_list([{"prompt": render_prompt(tokenizer, r["prompt"]), "completion": " " + r["completion"]} for r in rows])
    with tempfile.TemporaryDirectory() as tmp:
        # Batches of similar length on both sides when ours groups them (transformers' LengthGroupedSampler).
        trainer = SFTTrainer(model=model, args=TRLSFTConfig(
            **_trl_common(tmp, config.batch_size, device, config.max_length), completion_only_loss=True,
            train_sampling_strategy="group_by_length" if config.group_by_length else "random"),
                             train_dataset=data, processing_class=tokenizer)
        tokens = sum(len(x) for x in trainer.train_dataset["input_ids"])
        start = time.perf_counter()
        trainer.train()
        return tokens / (time.perf_counter() - start)


def bench_rm(args) -> dict:
    from core.stages import reward

    rankings = demo.synthetic_rankings(args.examples, args.k)
    pairs_per_ranking = args.k * (args.k - 1) // 2
    device = _device(args)
    batch = batch_size(args, "rm")
    with tempfile.TemporaryDirectory() as tmp:
        model, shape = _model(args, tmp)
        path = Path(tmp) / "rankings.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rankings))
        config = RewardConfig(sft_model=model, data=str(path), epochs=1, batch_size=batch, learning_rate=1e-4,
                              device=device.type, precision=device.precision, max_length=args.max_length)

        def ours() -> float:
            with tempfile.TemporaryDirectory() as out:
                events = _LastMetrics()
                reward.run(config, None, events, Path(out) / "rm")
                return events.last["pairs_per_s"]

        measured = _alternating(args, "rm", ours, lambda: _trl_rm(rankings, model, batch * pairs_per_ranking, device,
                                                            args.max_length), "pairs/s")
    return {"bench": "rm", "k": args.k, "rankings": len(rankings), "prompts_per_batch": batch,
            "pairs_per_batch": batch * pairs_per_ranking, "max_length": args.max_length,
            "precision": config.precision, "shape": shape, **measured}


def _trl_rm(rankings: list[dict], model_ref: str, pairs_per_batch: int, device: Device, max_length: int) -> float:
    from datasets import Dataset
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    from core.data.formats import ranking_pairs
    from core.models.loading import load_scalar_model, load_tokenizer

    tokenizer = load_tokenizer(model_ref)
    model = load_scalar_model(model_ref, tokenizer.pad_token_id, device)
    # TRL's RewardTrainer is pairwise: each ranking becomes its C(K,2) chosen/rejected pairs.
    pairs = [{"prompt": render_prompt(tokenizer, r["prompt"]), "chosen": " " + chosen, "rejected": " " + rejected}
             for r in rankings for chosen, rejected in ranking_pairs(r["responses"])]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = RewardTrainer(model=model,
                                args=TRLRewardConfig(**_trl_common(tmp, pairs_per_batch, device, max_length)),
                                train_dataset=Dataset.from_list(pairs), processing_class=tokenizer)
        start = time.perf_counter()
        trainer.train()
        return len(pairs) / (time.perf_counter() - start)
