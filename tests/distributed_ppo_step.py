"""One PPO-ptx step per rank on different prompts and ptx blocks, then a check that every rank holds the
same policy and value weights: run by tests/test_distributed.py under `accelerate launch` (2 CPU ranks).
DDP averages only the gradients of a backward that follows a forward of the module it wraps; a
network or term trained outside it would leave the ranks' weights apart (docs/ARCHITECTURE.md,
"Several processes"). Run as `python -m tests.distributed_ppo_step`; prints on rank 0 the largest gap
between the ranks' weights and the largest change of a weight."""

import torch

from core.data import demo
from core.distributed import Distributed
from core.models.generate import encode_prompts
from core.models.loading import load_tokenizer, pick_device
from core.models.pretrain import pack
from core.stages import make_config, ppo

dist = Distributed.from_environment(cpu=True)
config = make_config("ppo", "quick", dict(sft_model="bundled", reward_model="bundled", batch_size=8,
                                          response_length=8, ptx_batch_size=4, device="cpu"))
device = pick_device("cpu")
tokenizer = load_tokenizer("bundled")
torch.manual_seed(0)
models = ppo.load_models(config, tokenizer, device)
models.trained, models.optimizer = dist.prepare(models.trained, models.optimizer)
models.dist = dist
torch.manual_seed(dist.rank)  # each rank samples its own answers, as in a run
prompts = dist.shard([t.prompt for t in demo.train_tasks(config.batch_size)])
prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device=device.torch)
blocks = pack(tokenizer, demo.pretraining_corpus(40, seed=3), ppo.PTX_BLOCK_SIZE)
ptx_batches = map(dist.shard, ppo.ptx_batch_stream(blocks, config.ptx_batch_size, torch.Generator().manual_seed(1)))
before = torch.cat([p.detach().flatten() for p in models.trainable_parameters()])
ppo.ppo_step(models, prompt_ids, prompt_mask, config, config.kl_coef, ptx_batches)

weights = torch.cat([p.detach().flatten() for p in models.trainable_parameters()])
gap = (dist.all_reduce_sum(weights) / dist.world_size - weights).abs().max()  # 0 when every rank agrees
gap = dist.all_reduce_sum(gap[None])
if dist.is_main:
    print(f"max weight gap {float(gap):.3g} max change {float((weights - before).abs().max()):.3g}", flush=True)
dist.close()
