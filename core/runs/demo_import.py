"""The demo's data through the store: the demo pipeline puts the built-in task's prompts,
demonstrations and the simulated labeler's rankings into the workbench store and then trains
from the store (data='store'), the same path a user's own data takes. The Prompts and Rank pages
then show (and can extend) exactly what the demo trained on.

Both imports add only what is missing, so re-running the pipeline does not duplicate rows:

- prompts (source 'demo'): a prompt text is stored once (the store's `prompts.text` is unique);
- demonstrations: a demo prompt that already has a demonstration gets none from the demo;
- rankings (labeler 'simulated'): a demo prompt the simulated labeler has already ranked is not
  sampled again. Rankings are sampled from the SFT policy, so this import runs after SFT
  (`core/runs/pipeline.py`), with the reward config's K, temperatures and seed: on an empty store the
  rankings are exactly those the RM stage samples itself on data='demo'.

The held-out rankings are *not* imported: they come from the noise-free labeler on the demo's
held-out prompts, sampled by the RM stage itself (`RewardConfig.heldout = 'demo'`), so held-out
prompts never enter the store (PPO on prompts='store' would train on them).
"""

from __future__ import annotations

from core.data import demo
from core.data.sources import load_demonstrations
from core.data.store import Store
from core.stages.events import Events

SOURCE = "demo"
LABELER = "simulated"


def demo_rows(n_demonstrations: int, ramble_rate: float, seed: int) -> list[dict]:
    """The SFT demonstrations of `sources.load_demonstrations('demo', ...)`, as store rows."""
    rows = load_demonstrations("demo", None, n_demonstrations, ramble_rate, seed)
    return [{"instruction": r["prompt"], "input": "", "output": r["completion"]} for r in rows]


def import_demo_data(store: Store, n_demonstrations: int = 2000, ramble_rate: float = demo.RAMBLE_RATE,
                     seed: int = 0, n_prompts: int = 2000) -> dict[str, int]:
    """Prompts (PPO's demo prompt set, `demo.train_tasks(n_prompts)`) and SFT demonstrations into the
    store, in the demo's order (so training on 'store' sees them as on 'demo'). Returns rows added."""
    before = store.counts()
    have_demo = {d["prompt"] for d in store.list_demonstrations()}
    rows = [r for r in demo_rows(n_demonstrations, ramble_rate, seed) if r["instruction"] not in have_demo]
    if rows:
        store.add_demonstrations(rows, source=SOURCE)
    store.add_prompts([t.prompt for t in demo.train_tasks(n_prompts)], source=SOURCE)
    after = store.counts()
    return {k: after[k] - before[k] for k in ("prompts", "demonstrations")}


def import_demo_rankings(store: Store, config, events: Events, batch_prompts: int = 64) -> int:
    """Let the simulated labeler rank answers sampled from `config.sft_model` (a RewardConfig) for the
    demo prompts it has not ranked yet; store them with labeler 'simulated'. Returns rankings added.

    Prompts are sampled in the same chunks and with the same seeds as the RM stage's own demo sampling
    (`reward.sample_demo_rankings`), so the rankings are the ones data='demo' would train on, and a chunk
    sampled again (it holds a prompt whose answers all tied) gives the same answers: re-running adds
    nothing."""
    ranked = {r["prompt"] for r in store.list_rankings() if r["labeler"] == LABELER}
    tasks = demo.train_tasks(config.n_prompts)
    todo = [start for start in range(0, len(tasks), batch_prompts)
            if any(t.prompt not in ranked for t in tasks[start : start + batch_prompts])]
    if not todo:
        events.log(f"demo rankings: the {config.n_prompts} demo prompts are already ranked by the {LABELER} labeler")
        return 0
    from core.models.loading import load_policy, load_tokenizer, pick_device
    from core.stages.reward import sample_demo_rankings

    device = pick_device(config.device)
    policy = load_policy(config.sft_model, device, dropout=0.0)
    tokenizer = load_tokenizer(config.sft_model)
    added = []
    for n, start in enumerate(todo, 1):
        chunk = tasks[start : start + batch_prompts]
        rankings = sample_demo_rankings(policy, tokenizer, chunk, config.k, config.sample_temperature,
                                        config.labeler_temperature, config.seed + start, events, "training",
                                        batch_prompts=batch_prompts)
        added += [r for r in rankings if r.prompt not in ranked]
        events.progress(n, len(todo), "the simulated labeler ranks sampled answers")
    del policy
    if added:
        store.add_rankings([{"prompt": r.prompt, "responses": r.responses, "labeler": LABELER} for r in added],
                           source=SOURCE)
    events.log(f"demo rankings: the {LABELER} labeler ranked {len(added)} prompts (K <= {config.k}), "
               "stored for the reward model")
    return len(added)
