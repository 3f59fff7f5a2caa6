"""`rlhf pretrain-demo`: build the bundled tiny base model from scratch.

A byte-level BPE tokenizer (digits split one by one, so numbers stay learnable) and a small
GPT-2 trained with plain next-token loss on the demo corpus. The result is a *base* model: it
continues text and knows the chat shape loosely, but does not answer in the house style.
"""

from __future__ import annotations

import hashlib
import io
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from core.data import demo
from core.models import optim
from core.models.chat import PLAIN_CHAT_TEMPLATE
from core.models.loading import Device, pick_device, save_checkpoint
from core.paths import BUNDLED_MODEL_DIR, atomic_write_bytes, data_home

EOS = "<|endoftext|>"
PAD = "<pad>"


def build_tokenizer(corpus: list[str], vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    # A distinct pad token keeps padding and the EOS the policy must learn to emit apart.
    # Its chat template renders the corpus' dialogue shape, so the stages' one formatting path
    # (core.models.chat) feeds the model what it saw in pretraining.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=PAD,
        model_max_length=256, chat_template=PLAIN_CHAT_TEMPLATE,
    )


def pack(tokenizer, docs: list[str], block_size: int) -> torch.Tensor:
    """Concatenate documents separated by EOS and cut into (n_blocks, block_size) token ids."""
    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // block_size
    if n == 0:
        raise ValueError(f"pretraining text is too short: {len(ids)} tokens < one block of {block_size}")
    return torch.tensor(ids[: n * block_size]).view(n, block_size)


# Tokens per block of the held-out pretraining loss (the alignment tax every stage reports).
HELDOUT_BLOCK_SIZE = 128


def _packing_key(tokenizer, docs: list[str], block_size: int) -> str | None:
    """A digest of everything the packed blocks depend on: the tokenizer's full definition (vocabulary,
    merges, normalisation), its EOS id, the block size and every document; None for a tokenizer that
    cannot describe itself (a slow, Python-only one), which is then packed every time."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    digest = hashlib.sha256()
    digest.update(backend.to_str().encode())
    digest.update(f"\0{tokenizer.eos_token_id}\0{block_size}\0{len(docs)}".encode())
    for doc in docs:  # length-prefixed, so no two document lists give the same byte stream
        data = doc.encode("utf-8", errors="surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def pack_cached(tokenizer, docs: list[str], block_size: int, cache_dir: str | Path | None = None) -> torch.Tensor:
    """`pack`, kept on disk under the data directory's `cache/packed/` and keyed by a digest of the
    tokenizer, the documents and the block size (`_packing_key`), so a changed corpus or tokenizer is
    packed again and an unchanged one is read back. Why: PPO-ptx tokenised its whole pretraining corpus
    on every run (3 s of a 30 s quick-preset run on the demo's 20,000 documents; minutes on a user's
    corpus), and the pipeline, the study and every job on the app pack the same text again and again.
    An unreadable cache file (a crash mid-write on another file system, a disk error) is packed again
    and replaced, never trusted; the files can be deleted at any time."""
    key = _packing_key(tokenizer, docs, block_size)
    if key is None:
        return pack(tokenizer, docs, block_size)
    path = Path(cache_dir or data_home() / "cache" / "packed") / f"{key}.pt"
    if path.is_file():
        try:
            blocks = torch.load(path, weights_only=True)
            if isinstance(blocks, torch.Tensor) and blocks.dim() == 2 and blocks.shape[1] == block_size:
                return blocks.long()
        except Exception:  # noqa: BLE001 - any unreadable file is a cache miss
            pass
    blocks = pack(tokenizer, docs, block_size)
    data = io.BytesIO()
    torch.save(blocks.to(torch.int32), data)  # int32 halves the file (token ids are far below 2^31)
    atomic_write_bytes(path, data.getvalue())  # another rank or job never reads half a file
    return blocks


def lm_loss(model, blocks: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss on packed blocks (every token counts: this is pretraining text)."""
    return model(input_ids=blocks, labels=blocks).loss


@torch.no_grad()
def heldout_lm_loss(model, blocks: torch.Tensor, device: Device, batch_size: int = 32) -> float:
    """Pretraining loss on held-out corpus text: how much of the base's knowledge survives."""
    was_training = model.training
    model.eval()
    losses = []
    for i in range(0, len(blocks), batch_size):
        with device.autocast():
            losses.append(lm_loss(model, blocks[i : i + batch_size].to(device.torch)).item())
    model.train(was_training)
    return sum(losses) / len(losses)


def demo_pretrain_loss(model, tokenizer, device: Device) -> float:
    """The held-out pretraining loss on the demo corpus: what every stage reports as the alignment tax."""
    return heldout_lm_loss(model, pack_cached(tokenizer, demo.heldout_corpus(), HELDOUT_BLOCK_SIZE), device)


def pretrain_demo(
    output: str | Path = BUNDLED_MODEL_DIR,
    n_documents: int = 24000,
    n_layer: int = 4,
    n_embd: int = 192,
    n_head: int = 4,
    block_size: int = 128,
    batch_size: int = 32,
    epochs: int = 4,
    lr: float = 2e-3,
    seed: int = 0,
    device: str = "auto",
    log=print,
    init_seed: int | None = None,
) -> Path:
    """A GPT-2 base pretrained on the demo corpus drawn with `seed`, and a BPE tokenizer built from it.
    `init_seed`: the weights' initialisation and the blocks' order only (default `seed`): another base of the
    same corpus and tokenizer, such as the members of a reward-model ensemble from different bases."""
    torch.manual_seed(seed if init_seed is None else init_seed)
    random.seed(seed)
    dev = pick_device(device)
    corpus = demo.pretraining_corpus(n_documents, seed=seed)
    tokenizer = build_tokenizer(corpus)
    blocks = pack(tokenizer, corpus, block_size)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=256, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config).to(dev.torch)
    n_params = sum(p.numel() for p in model.parameters())
    total_steps = epochs * math.ceil(len(blocks) / batch_size)
    log(f"pretraining {n_params / 1e6:.2f}M params on {blocks.numel() / 1e6:.2f}M tokens, {total_steps} steps")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, total_steps // 20)
    # The schedule the bundled model was built with (kept so `rlhf pretrain-demo` reproduces it).
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total_steps)))
    )
    step, start = 0, time.time()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(blocks))
        for i in range(0, len(blocks), batch_size):
            batch = blocks[order[i : i + batch_size]].to(dev.torch)
            with dev.autocast():
                loss = lm_loss(model, batch)
            optim.step(loss, model, opt, sched)
            step += 1
            if step % 50 == 0 or step == total_steps:
                tps = step * batch_size * block_size / (time.time() - start)
                log(f"step {step}/{total_steps} loss {loss.item():.3f} ({tps:.0f} tokens/s)")
    held = pack(tokenizer, demo.heldout_corpus(), block_size)
    log(f"held-out pretraining loss {heldout_lm_loss(model, held, dev):.3f}")
    return save_checkpoint(model.cpu(), tokenizer, output)
