"""`python benchmarks/ensemble_bon.py DIR [ENSEMBLE]` (DIR holding sft/, rm/ and the ensemble ENSEMBLE/, default
rm-ensemble; the table goes to DIR/bon-ENSEMBLE.json): best-of-n of the study (25 held-out prompts (the study: 50) x 64 answers from the SFT model, T=1, 24 tokens, seed 1234, as
core/runs/study.sample_best_of_n samples them), the same answers chosen by the single RM and by the ensemble of 4
under each reward_aggregate."""
import json
import sys
import time

import torch
from core.data import demo
from core.models.ensemble import aggregate, answer_scores, load_reward_model
from core.models.generate import sample
from core.models.loading import load_policy, load_scalar_model, load_tokenizer, pick_device
from core.runs.study import kl_bon
from core.stages.evaluate import answer_rm_scores
from core.stages.rl import positions_from_mask

M = sys.argv[1]
E = sys.argv[2] if len(sys.argv) > 2 else "rm-ensemble"
t0 = time.time()
dev = pick_device("cpu")
tok = load_tokenizer(f"{M}/sft")
sft = load_policy(f"{M}/sft", dev, dropout=0.0).eval()
single = load_scalar_model(f"{M}/rm", tok.pad_token_id, dev).eval()
ens = load_reward_model(f"{M}/{E}", tok.pad_token_id, dev)
tasks = demo.heldout_tasks(25)
n_max = 64
prompts = [t.prompt for t in tasks for _ in range(n_max)]
gold, rm, members = [], [], []
with torch.no_grad():
    for i in range(0, len(prompts), 64):
        chunk = prompts[i : i + 64]
        out = sample(sft, tok, chunk, 24, 1.0, seed=1234 + i)
        gold += [demo.gold_score(p, t) for p, t in zip(chunk, out.texts)]
        rm += answer_rm_scores(single, out).tolist()
        ids, mask = out.sequences()
        last = (out.response_mask.sum(1).long() - 1).clamp(min=0)
        members.append(answer_scores(ens, ids, mask, positions_from_mask(mask), out.prompt_ids.shape[1], last)[1])
        print(f"{i + 64}/{len(prompts)} {time.time() - t0:.0f}s", flush=True)
G = torch.tensor(gold).view(25, n_max)
members = torch.cat(members, 1)  # (4, 3200)
rewards = {"single": torch.tensor(rm), "mean": aggregate(members, "mean"), "min": aggregate(members, "min"),
           **{f"mean_minus_std_{lam}": aggregate(members, "mean_minus_std", lam) for lam in (0.5, 1.0, 2.0)}}
table = {}
for name, r in rewards.items():
    R = r.view(25, n_max)
    rows = []
    for n in (1, 2, 4, 8, 16, 32, 64):
        g, rr = G.view(25, n_max // n, n), R.view(25, n_max // n, n)
        best = rr.argmax(-1, keepdim=True)
        rows.append({"n": n, "kl": kl_bon(n), "rm": float(rr.gather(-1, best).mean()), "gold": float(g.gather(-1, best).mean())})
    table[name] = rows
    print(name, " ".join(f"n={p['n']}:{p['gold']:.3f}" for p in rows), flush=True)
std = members.std(0, correction=0)
print("member-0 vs single RM max |diff|", float((members[0] - torch.tensor(rm)).abs().max()),
      "mean diff", float((members[0] - torch.tensor(rm)).mean()))
print("ensemble std: mean", float(std.mean()), "corr(std, -gold)", float(torch.corrcoef(torch.stack([std, -torch.tensor(gold)]))[0, 1]))
json.dump({"table": table, "seconds": time.time() - t0, "ensemble_std_mean": float(std.mean())}, open(f"{M}/bon-{E}.json", "w"), indent=1)
print(f"done {time.time() - t0:.0f}s")
