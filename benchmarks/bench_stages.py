"""`rlhf bench sft|rm --against trl`: our stage loops and TRL's trainers on the same model
(the bundled one), the same rows and the same batch size, one after the other in one process.

Timings exclude data preparation on both sides (TRL tokenises in its constructor; our loops
report the rate of their own training steps). Absolute numbers on a shared machine are noise:
read the ratio.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

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


def _trl_common(tmp: str, batch_size: int, device: Device) -> dict:
    return dict(
        output_dir=tmp, per_device_train_batch_size=batch_size, num_train_epochs=1, learning_rate=1e-4,
        save_strategy="no", report_to="none", logging_steps=10_000, disable_tqdm=True,
        use_cpu=device.type == "cpu", bf16=device.precision == "bf16", dataloader_num_workers=0, max_length=128,
    )


def bench_sft(args) -> dict:
    from core.stages import sft

    rows = demo.demonstrations(demo.train_tasks(args.examples), ramble_rate=0.5)
    device = _device(args)
    config = SFTConfig(model="bundled", data="demo", n_demonstrations=args.examples, ramble_rate=0.5, epochs=1,
                       batch_size=32, learning_rate=1e-4, dropout=0.0, eval_prompts=0, device=device.type,
                       precision=device.precision)
    with tempfile.TemporaryDirectory() as tmp:
        events = _LastMetrics()
        sft.run(config, None, events, Path(tmp) / "sft")
        ours = events.last["tokens_per_s"]
    result = {"bench": "sft", "examples": args.examples, "batch_size": 32, "precision": config.precision,
              "ours_tokens_per_s": ours}
    if args.against == "trl":
        result["trl_tokens_per_s"] = _trl_sft(rows, device, config.group_by_length)
        result["ratio"] = ours / result["trl_tokens_per_s"]
    return result


def _trl_sft(rows: list[dict], device: Device, group_by_length: bool) -> float:
    from datasets import Dataset
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    from core.models.loading import load_policy, load_tokenizer

    tokenizer = load_tokenizer("bundled")
    model = load_policy("bundled", device, dropout=0.0)
    # Same text as our encode(): chat-formatted prompt, " " + answer, EOS (TRL appends it).
    data = Dataset.from_list([{"prompt": render_prompt(tokenizer, r["prompt"]), "completion": " " + r["completion"]} for r in rows])
    with tempfile.TemporaryDirectory() as tmp:
        # Batches of similar length on both sides when ours groups them (transformers' LengthGroupedSampler).
        trainer = SFTTrainer(model=model, args=TRLSFTConfig(
            **_trl_common(tmp, 32, device), completion_only_loss=True,
            train_sampling_strategy="group_by_length" if group_by_length else "random"),
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
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rankings.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rankings))
        config = RewardConfig(sft_model="bundled", data=str(path), epochs=1, batch_size=8, learning_rate=1e-4,
                              device=device.type, precision=device.precision)
        events = _LastMetrics()
        reward.run(config, None, events, Path(tmp) / "rm")
        ours = events.last["pairs_per_s"]
    result = {"bench": "rm", "k": args.k, "rankings": len(rankings), "prompts_per_batch": 8,
              "pairs_per_batch": 8 * pairs_per_ranking, "precision": config.precision, "ours_pairs_per_s": ours}
    if args.against == "trl":
        result["trl_pairs_per_s"] = _trl_rm(rankings, 8 * pairs_per_ranking, device)
        result["ratio"] = ours / result["trl_pairs_per_s"]
    return result


def _trl_rm(rankings: list[dict], pairs_per_batch: int, device: Device) -> float:
    from datasets import Dataset
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    from core.data.formats import ranking_pairs
    from core.models.loading import load_scalar_model, load_tokenizer

    tokenizer = load_tokenizer("bundled")
    model = load_scalar_model("bundled", tokenizer.pad_token_id, device)
    # TRL's RewardTrainer is pairwise: each ranking becomes its C(K,2) chosen/rejected pairs.
    pairs = [{"prompt": render_prompt(tokenizer, r["prompt"]), "chosen": " " + chosen, "rejected": " " + rejected}
             for r in rankings for chosen, rejected in ranking_pairs(r["responses"])]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = RewardTrainer(model=model, args=TRLRewardConfig(**_trl_common(tmp, pairs_per_batch, device)),
                                train_dataset=Dataset.from_list(pairs), processing_class=tokenizer)
        start = time.perf_counter()
        trainer.train()
        return len(pairs) / (time.perf_counter() - start)
