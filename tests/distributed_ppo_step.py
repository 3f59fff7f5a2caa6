"""One PPO-ptx step on 2 CPU ranks (run by tests/test_distributed.py under `accelerate launch`): a global
batch of 8 answers is sampled once (the same seed on every rank), each rank learns from its own 4 answers and
ptx blocks, and rank 0 also trains a one-process copy on the whole batch (LoRA adapters only, given a rank).
Prints on rank 0 the largest gap between the ranks' weights, between the ranks and the one-process copy,
and the largest change of a weight.

DDP averages only the gradients of a backward that follows a forward of the module it wraps (a network or
term trained outside it leaves the ranks apart), and a loss that is a mean of the ranks' means weights a
rank's tokens by how few it drew (the ranks' answers differ in length): either shows as a gap
(docs/NOTES.md, "Several processes"). Run as `python -m tests.distributed_ppo_step`."""

import dataclasses
import sys

import torch

from core.data import demo
from core.distributed import Distributed
from core.models.generate import encode_prompts
from core.models.loading import load_tokenizer, pick_device
from core.models.pretrain import pack
from core.stages import make_config, ppo

dist = Distributed.from_environment(cpu=True)
# `python -m tests.distributed_ppo_step [LORA_R]`: with a rank, the policy and value model train LoRA adapters.
lora_r = int(sys.argv[1]) if len(sys.argv) > 1 else 0
config = make_config("ppo", "quick", dict(sft_model="bundled", reward_model="bundled", batch_size=8,
                                          response_length=8, ptx_batch_size=4, device="cpu", lora_r=lora_r))
device = pick_device("cpu")
tokenizer = load_tokenizer("bundled")
blocks = pack(tokenizer, demo.pretraining_corpus(40, seed=3), ppo.PTX_BLOCK_SIZE)
prompt_ids, prompt_mask = encode_prompts(tokenizer, [t.prompt for t in demo.train_tasks(config.batch_size)],
                                         device=device.torch)


def fresh_models() -> ppo.PPOModels:
    torch.manual_seed(0)  # the same initial value head on every rank and in the one-process copy
    return ppo.load_models(config, tokenizer, device)


def learn(models: ppo.PPOModels, samples, share) -> torch.Tensor:
    """One PPO step on `share` of the global batch; the trained weights, flattened."""
    ptx_batches = map(share, ppo.ptx_batch_stream(blocks, config.ptx_batch_size, torch.Generator().manual_seed(1)))
    samples = type(samples)(*(share(getattr(samples, f.name)) for f in dataclasses.fields(samples)))
    ppo.ppo_step(models, share(prompt_ids), share(prompt_mask), config, config.kl_coef, ptx_batches, samples)
    return torch.cat([p.detach().flatten() for p in models.trainable_parameters()])


models = fresh_models()
before = torch.cat([p.detach().flatten() for p in models.trainable_parameters()])
torch.manual_seed(123)  # every rank samples the same global batch; the answers' lengths differ
samples = ppo.generate_responses(models, prompt_ids, prompt_mask, config)
# Answers of 1 to 8 tokens, ended by EOS, so that rank 0's share (rows 0, 2, ...) holds 16 answer tokens
# and rank 1's 20: a mean of the ranks' means would weight them apart.
for row, length in enumerate(range(1, config.batch_size + 1)):
    samples.response_ids[row, length - 1] = tokenizer.eos_token_id
    samples.response_ids[row, length:] = tokenizer.pad_token_id
    samples.response_mask[row] = torch.arange(samples.response_mask.shape[1]) < length
samples.finished[:] = True
models.trained, models.optimizer = dist.prepare(models.trained, models.optimizer)
models.dist = dist
weights = learn(models, samples, dist.shard)

gap = (dist.all_reduce_sum(weights) / dist.world_size - weights).abs().max()  # 0 when every rank agrees
gap = dist.all_reduce_sum(gap[None])
if dist.is_main:
    one_process = learn(fresh_models(), samples, lambda items: items)
    print(f"max weight gap {float(gap):.3g} gap to one process {float((weights - one_process).abs().max()):.3g} "
          f"max change {float((weights - before).abs().max()):.3g}", flush=True)
dist.close()
