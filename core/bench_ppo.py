"""`rlhf bench ppo`: PPO throughput on randomly initialised GPT-2 models of a given shape.

Policy, reference, value and reward model all have the same shape (as in TRL's PPOTrainer
examples), the prompts are random token ids, and the loop is `core.ppo.ppo_step` itself: the
same code `core.ppo.run` trains with, so a speed-up measured here is a speed-up there.
`benchmarks/compare_trl_ppo.sh` runs TRL's PPOTrainer on the same shape for comparison.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast

from core.config import PPOConfig
from core.models import pick_device
from core.ppo import assemble, ppo_step

EOS_ID, PAD_ID = 0, 1


def make_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose ids are 0..vocab-1 (id 0 = EOS, id 1 = pad); only decoding is used."""
    words = {"<eos>": EOS_ID, "<pad>": PAD_ID, **{f"t{i}": i for i in range(2, vocab)}}
    tok = Tokenizer(tok_models.WordLevel(words, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", padding_side="left")


def make_models(layers: int, embd: int, heads: int, vocab: int, seed: int = 0):
    """(policy, reference_policy, value_model, reward_model), randomly initialised, dropout off."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=256, n_embd=embd, n_layer=layers, n_head=heads,
                        bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, num_labels=1,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    policy = GPT2LMHeadModel(config)
    reference_policy = copy.deepcopy(policy)
    value_model = GPT2ForSequenceClassification(config)
    reward_model = GPT2ForSequenceClassification(config)
    return policy, reference_policy, value_model, reward_model


def synthetic_prompts(n: int, prompt_length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Random prompt ids, avoiding EOS/pad, all of one length (no padding)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (n, prompt_length), generator=g)


def bench_ppo(layers: int = 4, embd: int = 128, heads: int = 4, vocab: int = 512, batch: int = 16,
              response_length: int = 24, ppo_epochs: int = 4, episodes: int = 256, prompt_length: int = 16,
              num_minibatches: int = 1, ptx_coef: float = 0.0, device: str = "cpu", threads: int | None = None,
              seed: int = 0) -> dict:
    if threads:
        torch.set_num_threads(threads)
    dev = pick_device(device)
    config = PPOConfig(batch_size=batch, num_minibatches=num_minibatches, ppo_epochs=ppo_epochs,
                       response_length=response_length, total_episodes=episodes, learning_rate=3e-6,
                       kl_coef=0.05, ptx_coef=ptx_coef, missing_eos_penalty=None, temperature=1.0, device=device)
    tokenizer = make_tokenizer(vocab)
    parts = [m.to(dev.torch) for m in make_models(layers, embd, heads, vocab, seed)]
    models = assemble(*parts, tokenizer, config, dev)
    prompts = synthetic_prompts(episodes, prompt_length, vocab, seed).to(dev.torch)
    ptx_batches = None
    if ptx_coef > 0:
        blocks = torch.randint(2, vocab, (64, 128))

        def cycle():
            while True:
                for i in range(0, len(blocks), config.ptx_batch_size):
                    yield blocks[i : i + config.ptx_batch_size]
        ptx_batches = cycle()

    steps = max(1, episodes // batch)
    timings = {"generation": 0.0, "scoring": 0.0, "advantages": 0.0, "update": 0.0}
    start = time.perf_counter()
    for step in range(steps):
        prompt_ids = prompts[step * batch : (step + 1) * batch]
        result = ppo_step(models, prompt_ids, torch.ones_like(prompt_ids), config, config.kl_coef, ptx_batches)
        for k, v in result.timings.items():
            timings[k] += v
    elapsed = time.perf_counter() - start
    done = steps * batch
    return {
        "impl": "rlhf-workbench", "episodes": done, "seconds": elapsed, "episodes_per_s": done / elapsed,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "timings_share": {k: round(v / elapsed, 3) for k, v in timings.items()},
        "shape": dict(layers=layers, embd=embd, heads=heads, vocab=vocab, batch=batch, response_length=response_length,
                      ppo_epochs=ppo_epochs, prompt_length=prompt_length, num_minibatches=num_minibatches),
        "threads": torch.get_num_threads(), "device": dev.type,
        "last_response_length": result.metrics["response_length"],
    }


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--embd", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16, help="episodes per PPO step")
    parser.add_argument("--response-length", type=int, default=24)
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--episodes", type=int, default=256)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--num-minibatches", type=int, default=1)
    parser.add_argument("--ptx-coef", type=float, default=0.0)
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print only the JSON result")


def main(args: argparse.Namespace) -> dict:
    """Run the benchmark from parsed arguments; options a caller's parser lacks take the defaults."""
    defaults = vars(_parser().parse_args([]))
    opt = {**defaults, **{k: v for k, v in vars(args).items() if k in defaults}}
    result = bench_ppo(layers=opt["layers"], embd=opt["embd"], heads=opt["heads"], vocab=opt["vocab"],
                       batch=opt["batch"], response_length=opt["response_length"], ppo_epochs=opt["ppo_epochs"],
                       episodes=opt["episodes"], prompt_length=opt["prompt_length"],
                       num_minibatches=opt["num_minibatches"], ptx_coef=opt["ptx_coef"], device=opt["device"],
                       threads=opt["threads"], seed=opt["seed"])
    if not getattr(args, "json", False):
        shares = ", ".join(f"{k} {v:.0%}" for k, v in result["timings_share"].items())
        print(f"ours: {result['episodes_per_s']:.1f} episodes/s ({shares})")
    print(json.dumps(result))
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(parser)
    return parser


if __name__ == "__main__":
    main(_parser().parse_args())
