"""Stage 1 on the bundled model: loss falls, only answers carry loss, checkpoints per epoch."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from core.data import demo
from core.data.sources import load_demonstrations
from core.stages import sft
from core.stages.events import Events
from core.stages import make_config
from core.stages.evaluate import gold_eval
from core.models.chat import render_prompt
from core.models.loading import load_policy, load_tokenizer, pick_device


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from core.data.store import Store

    root = tmp_path_factory.mktemp("sft")
    store = Store(root / "wb.db")
    store.create_run("sft-test", "sft", {})
    config = make_config("sft", "quick", dict(epochs=2, n_demonstrations=480, batch_size=16, eval_prompts=48))
    out = sft.run(config, store, Events(store, "sft-test"), root / "sft")
    return store, out


def test_only_response_tokens_carry_loss():
    tok = load_tokenizer("bundled")
    ids, labels = sft.encode(tok, "What is 2 plus 2?", "The answer is 4.", 128)
    prompt_len = len(tok(render_prompt(tok, "What is 2 plus 2?"), add_special_tokens=False)["input_ids"])
    assert labels[:prompt_len] == [-100] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:] and ids[-1] == tok.eos_token_id
    # The model's loss is the mean cross-entropy over answer tokens alone.
    model = load_policy("bundled")
    batch = sft.collate([(ids, labels)], tok.pad_token_id, pick_device("cpu"))
    logits = model(input_ids=batch["input_ids"]).logits[0, :-1]
    targets = torch.tensor(ids[1:])
    manual = torch.nn.functional.cross_entropy(logits[prompt_len - 1 :], targets[prompt_len - 1 :])
    assert torch.allclose(model(**batch).loss, manual, atol=1e-5)


def test_loss_falls_and_gold_beats_the_base(trained):
    store, out = trained
    losses = [r["value"] for r in store.metrics(["sft-test"], names=["sft_loss"])]
    assert len(losses) == 2 * 29  # 480 rows, 24 held out for validation, batches of 16
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    summary = json.loads((out / "sft_summary.json").read_text())
    tasks = demo.heldout_tasks(48)
    base = gold_eval(load_policy("bundled"), load_tokenizer("bundled"), tasks, seed=0)["gold"]
    assert summary["gold"] > base + 0.15


def test_one_checkpoint_per_epoch_loadable_with_plain_transformers(trained):
    store, out = trained
    names = {c["name"] for c in store.list_checkpoints("sft")}
    assert {"sft-test-epoch-1", "sft-test-epoch-2", "sft-test"} <= names
    for c in store.list_checkpoints("sft"):
        AutoModelForCausalLM.from_pretrained(c["path"])


def test_stop_request_leaves_a_loadable_model(tmp_path):
    events = Events()
    events.stop_flag.set()
    out = sft.run(make_config("sft", "quick", dict(n_demonstrations=64)), None, events, tmp_path / "sft")
    assert json.loads((out / "sft_summary.json").read_text())["stopped"] is True
    AutoModelForCausalLM.from_pretrained(out)


def test_demonstrations_from_a_file(tmp_path):
    path = tmp_path / "demos.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in demo.demonstrations(demo.train_tasks(40))))
    config = make_config("sft", "quick", dict(data=str(path), epochs=1))
    assert len(load_demonstrations(config.data, None)) == 40
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(ValueError, match="does not hold demonstrations"):
        load_demonstrations(config.data, None)


def test_length_grouping_cuts_padding_and_keeps_every_example_once(tok):
    import random

    rows = demo.demonstrations(demo.train_tasks(640), ramble_rate=0.5)
    lengths = [len(sft.encode(tok, r["prompt"], r["completion"], 128)[0]) for r in rows]
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    grouped = sft.length_grouped(order, [lengths[i] for i in order], 32, random.Random(1))
    assert sorted(grouped) == list(range(len(rows)))  # a permutation: nothing dropped or repeated

    def real_share(o):  # real tokens over the padded batches' tokens
        batches = [o[b : b + 32] for b in range(0, len(o), 32)]
        return sum(lengths[i] for i in o) / sum(max(lengths[i] for i in b) * len(b) for b in batches)

    assert real_share(order) < 0.75 < 0.9 < real_share(grouped)
    # The batches' order stays random: not sorted by length from long to short across the epoch.
    longest = [max(lengths[i] for i in grouped[b : b + 32]) for b in range(0, len(grouped), 32)]
    assert longest != sorted(longest, reverse=True)
    # A partial last batch stays last, where the training loop drops it.
    odd = sft.length_grouped(order[:70], [lengths[i] for i in order[:70]], 32, random.Random(1))
    assert sorted(odd[64:]) == sorted(sft.length_grouped(order[:70], [lengths[i] for i in order[:70]], 32,
                                                          random.Random(2))[64:])


def test_group_by_length_regroups_every_epoch(tmp_path, monkeypatch):
    calls = []

    def spy(order, lengths, batch_size, rng):
        calls.append((len(order), batch_size))
        return order[::-1]

    monkeypatch.setattr(sft, "length_grouped", spy)
    config = make_config("sft", "quick", dict(epochs=2, n_demonstrations=40, batch_size=8, eval_prompts=0,
                                              device="cpu", group_by_length=True))
    sft.run(config, None, Events(), tmp_path / "out")
    assert calls == [(38, 8), (38, 8)]  # each epoch's 38 training rows (2 held out), in batches of 8
    calls.clear()
    sft.run(config.replace(group_by_length=False, epochs=3), None, Events(), tmp_path / "out")  # resumes epoch 3
    assert calls == []


def test_length_buckets_cover_the_batch_once_and_cut_only_where_padding_outweighs_a_call():
    from core.stages.microbatch import length_buckets

    lengths = [19, 45, 22, 44, 20, 21, 43, 19]
    groups = length_buckets(lengths, call_tokens=64)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert [[lengths[i] for i in g] for g in groups] == [[45, 44, 43], [22, 21, 20, 19, 19]]  # longest first
    assert len(length_buckets(lengths, call_tokens=10_000)) == 1  # a call dearer than any padding: one batch
    assert len(length_buckets(lengths, call_tokens=0)) == 7  # calls free: one per distinct length
    assert length_buckets(lengths, call_tokens=None) == [list(range(len(lengths)))]  # kept whole, as given
    assert length_buckets([], call_tokens=64) == []


def test_micro_batches_train_as_the_whole_batch(tmp_path, monkeypatch, bucket_counts):
    """One epoch on demonstrations of mixed lengths with batches cut by length (the CPU default) and kept
    whole: the same losses step by step and the same weights, up to float rounding, so the cut changes the
    padding computed and nothing else. Dividing each micro-batch by its own token count instead of the
    batch's fails this (each step's loss would be the sum of the parts' means)."""
    from core.stages import microbatch

    class Losses(Events):
        def __init__(self):
            super().__init__()
            self.losses = []

        def metrics(self, step, values):
            if "sft_loss" in values:
                self.losses.append(values["sft_loss"])

    config = make_config("sft", "quick", dict(epochs=1, n_demonstrations=100, batch_size=32, eval_prompts=0,
                                              device="cpu", ramble_rate=0.5))
    cut_events, whole_events = Losses(), Losses()
    cut = sft.run(config, None, cut_events, tmp_path / "cut")
    assert min(bucket_counts) > 1  # every batch of the demo's mixed lengths was cut
    monkeypatch.setattr(microbatch, "call_tokens_for", lambda *a: None)
    bucket_counts.clear()
    whole = sft.run(config, None, whole_events, tmp_path / "whole")
    assert set(bucket_counts) == {1}
    assert len(cut_events.losses) == 3
    assert cut_events.losses == pytest.approx(whole_events.losses, rel=1e-5)
    a = AutoModelForCausalLM.from_pretrained(cut).state_dict()
    b = AutoModelForCausalLM.from_pretrained(whole).state_dict()
    base = load_policy("bundled").state_dict()
    moved = sum((a[k] - base[k]).abs().sum().item() for k in a)
    assert moved > 0  # it trained
    # Adam divides by each gradient's own scale, so a weight whose gradient is rounding noise can move a
    # step either way: compare the total movement, not the largest single difference.
    assert sum((a[k] - b[k]).abs().sum().item() for k in a) < 0.01 * moved
