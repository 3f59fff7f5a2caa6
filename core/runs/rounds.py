"""Iterated RLHF: rounds of fresh rankings on the current policy (InstructGPT collected comparisons on
its PPO policies' outputs; Llama 2 ran five such rounds).

A rounds run is a run of runs, like the pipeline. Round 0 is today's recipe: SFT -> RM -> stage 3
(the RM on answers of the SFT model). Round r >= 1 samples K answers from round r-1's policy on a
fresh slice of prompts, has them ranked, refits the RM on *every* ranking of rounds <= r and trains
stage 3 again. The measure of what a round repairs: the accuracy, on the previous policy's own
answers to held-out prompts, of the RM before its refit (round r-1's) and after (round r's).

A small state machine, persisted in DIR/rounds.json (rewritten atomically after every step), so a
kill, a restart or a week's wait for labels resumes where it stood:

    sft -> [sampling -> waiting for labels -> rm -> stage 3] x rounds -> done

- sft: train SFT (or take `sft_model`), measure its gold.
- sampling: K answers per prompt from the previous policy (round 0: SFT, at the preset's RM
  temperature; later rounds at the rounds' own `sample_temperature`) on prompts [r*P, (r+1)*P) of
  the pool: the demo's training prompts, or the store's or a file's (`prompts`), as they stood when
  the rounds began (DIR/prompts.jsonl). 'simulated', 'rm:PATH' and 'reward:SPEC' rank them at once
  (DIR/round-r/rankings.jsonl, also stored with their labeler); 'team' makes a labeling batch on
  the Gradio server's store; 'page' puts the prompts on the Rank page. A prompt whose K answers
  are identical (or tied for the labeler) gives no ranking: the round counts them (`dropped_identical`).
- waiting for labels (team, page): until `labels_needed` rankings are in (or by hand: `--continue`).
- rm: the RM trains on DIR/round-r/rm-data.jsonl, the union of the rounds' files, and is
  measured with the previous one on DIR/round-r/heldout.json.
- stage 3: the method from the previous policy (or SFT) against its reference; its gold and KL
  to SFT are measured on held-out prompts.

Each stage is a run of its own ("NAME-round-r-rm", ...) that resumes in place from its
checkpoints, as every stage does; DIR/report.json holds `sft` and `rounds` (one entry a round).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from core.config import RoundsConfig
from core.data import demo
from core.data.sources import Prompt, Ranking, load_prompt_rows, load_rankings, prompt_key
from core.data.store import Store, as_prompt
from core.paths import atomic_write_text
from core.runs.demo_import import import_demo_data
from core.runs.pipeline import evaluate_checkpoint, run_stage
from core.stages import make_config
from core.stages.events import Events

STATE_FILE = "rounds.json"
POOL_FILE = "prompts.jsonl"  # the store's or a file's prompts as they stood when the rounds began
REPORT_FILE = "report.json"
STATES = ("sft", "sampling", "waiting for labels", "rm", "stage 3", "done")
DEMO_POOL = 20_000  # distinct demo training prompts the rounds draw their fresh slices from
ROUNDS_SOURCE = "rounds"  # the store's source of the prompts and rankings a rounds run adds
MAX_NEW_TOKENS = 32  # as the RM stage's own demo sampling (core/stages/reward.sample_demo_rankings)
SAMPLE_PROMPTS = 64  # prompts sampled (K answers each) in one call, as sample_demo_rankings


# ---------------------------------------------------------------------------------------------
# What a round needs, checked before any work
# ---------------------------------------------------------------------------------------------


def prompts_per_round(config: RoundsConfig, overrides: dict) -> int:
    return config.prompts_per_round or make_config("rm", config.preset, overrides.get("rm", {})).n_prompts


def episodes_per_round(config: RoundsConfig, overrides: dict) -> int:
    if config.episodes_per_round:
        return config.episodes_per_round
    if config.method == "dpo":
        return 0  # DPO samples nothing while it trains: its budget is the round's rankings
    return make_config(config.method, config.preset, overrides.get(config.method, {})).total_episodes


Pool = tuple[list[Prompt], list[dict]]  # prompts and each one's other columns (what reward terms read)


def load_pool(config: RoundsConfig, store: Store, output_dir: Path) -> Pool | None:
    """The prompts the rounds draw their fresh slices from: None for the demo's (generated, `round_prompts`);
    the store's or a file's as they stood when the rounds began (DIR/prompts.jsonl once written), so a resume
    draws the same slices however the store has grown since."""
    if config.prompts == "demo":
        return None
    snapshot = output_dir / POOL_FILE
    if snapshot.is_file():
        rows = [json.loads(line) for line in snapshot.read_text().splitlines()]
        return [r["prompt"] for r in rows], [r["columns"] for r in rows]
    return load_prompt_rows(config.prompts, store)


def write_pool(output_dir: Path, pool: Pool) -> None:
    atomic_write_text(output_dir / POOL_FILE, "".join(json.dumps({"prompt": p, "columns": c}) + "\n"
                                                      for p, c in zip(*pool)))


def round_tasks(config: RoundsConfig, overrides: dict, r: int) -> list[demo.Task]:
    """Round r's fresh demo prompts: a slice of the demo's training prompts no earlier round ranked."""
    p = prompts_per_round(config, overrides)
    return demo.train_tasks(p * config.rounds)[r * p:(r + 1) * p]  # train_tasks(n) is a prefix of train_tasks(m > n)


def round_prompts(config: RoundsConfig, overrides: dict, pool: Pool | None, r: int) -> Pool:
    """Round r's fresh prompts and their columns: slice r of the pool (the demo's prompts know their `answer`)."""
    if pool is None:
        tasks = round_tasks(config, overrides, r)
        return [t.prompt for t in tasks], [{"answer": t.answer} for t in tasks]
    p = prompts_per_round(config, overrides)
    return pool[0][r * p:(r + 1) * p], pool[1][r * p:(r + 1) * p]


def demo_tasks(prompts: list[Prompt]) -> list[demo.Task]:
    """Demo prompts (built in or stored) as the simulated labeler's tasks."""
    return [demo.Task(demo.task_kind(p)[0].name, p, demo.expected_answer(p)) for p in prompts]


def check_rounds(config: RoundsConfig, store: Store, overrides: dict, pool: Pool | None = None) -> None:
    """Every check a user can fail, before any sampling or training. `pool`: `load_pool`'s, read from the
    config's source when not given (a job checked before it is queued)."""
    from core.models.loading import resolve_model

    config.validate()
    if pool is None and config.prompts != "demo":
        pool = load_prompt_rows(config.prompts, store)
    unknown = set(overrides) - {"sft", "rm", config.method}
    if unknown:
        raise ValueError(f"--set for stage(s) {', '.join(sorted(unknown))}: a rounds run with method "
                         f"{config.method} runs sft, rm and {config.method}")
    p = prompts_per_round(config, overrides)
    size = DEMO_POOL if pool is None else len(pool[0])
    if p * config.rounds > size:
        where = {"demo": "the demo holds", "store": "the store holds"}.get(config.prompts, f"{config.prompts} holds")
        raise ValueError(f"the prompt pool is used up: {config.rounds} rounds of {p} fresh prompts need "
                         f"{p * config.rounds}, {where} {size}; run fewer rounds or fewer prompts a round")
    if pool is not None and config.labeler == "simulated" and not demo.is_demo_task(pool[0][:p * config.rounds]):
        raise ValueError(f"labeler 'simulated' is the demo's labeler: it ranks the demo's prompts only, and the "
                         f"prompts of {config.prompts!r} are others; choose labeler team, page, rm:PATH or reward:SPEC")
    if config.labeler.startswith("reward:"):
        from core.stages.reward_terms import resolve_reward

        used = [round_prompts(config, overrides, pool, r) for r in range(config.rounds)]
        resolve_reward(config.labeler[len("reward:"):]).check_rows([q for u in used for q in u[0]],
                                                                    [c for u in used for c in u[1]])
    for stage in ("sft", "rm", config.method):
        make_config(stage, config.preset, overrides.get(stage, {}))  # each stage's values validated now
    if config.labeler == "team":
        from core.labeling.store import LabelingStore

        if not LabelingStore(store).active_users():
            raise ValueError("labeler 'team' needs labeler accounts: add them first (rlhf label add-user NAME), "
                             "then start the rounds")
    labeler_rm = config.labeler[3:] if config.labeler.startswith("rm:") else ""
    for what, path in (("sft_model", config.sft_model), ("labeler rm:PATH", labeler_rm)):
        if path:
            try:
                resolve_model(path.strip())
            except ValueError as exc:
                raise ValueError(f"{what}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Labelers: who ranks a round's answers
# ---------------------------------------------------------------------------------------------


def write_rankings(path: Path, rankings: list[Ranking]) -> None:
    atomic_write_text(path, "".join(json.dumps({"prompt": r.prompt, "responses": r.responses}) + "\n"
                                    for r in rankings))


def read_rankings(path: Path) -> list[Ranking]:
    return load_rankings(str(path), None) if path.stat().st_size else []


def simulated_rankings(model: str, tasks: list[demo.Task], rm_config, labeler_temperature: float, seed: int,
                       events: Events, what: str) -> list[Ranking]:
    """The demo's labeler on K answers sampled from `model`: the RM stage's own sampling and ranking, so
    round 0 ranks exactly what the pipeline's RM trains on."""
    from core.models.loading import load_policy, load_tokenizer, pick_device
    from core.stages.reward import sample_demo_rankings

    policy = load_policy(model, pick_device(rm_config.device), dropout=0.0)
    return sample_demo_rankings(policy, load_tokenizer(model), tasks, rm_config.k, rm_config.sample_temperature,
                                labeler_temperature, seed, events, what)


def sample_groups(model: str, prompts: list[Prompt], rm_config, seed: int) -> list[tuple[Prompt, list[str]]]:
    from core.labeling.batches import sample_answers

    return sample_answers(prompts, model, rm_config.k, rm_config.sample_temperature, MAX_NEW_TOKENS, seed)


def reward_model_rankings(path: str, groups: list[tuple[str, list[str]]], max_length: int,
                          device: str = "auto") -> list[Ranking]:
    """A (larger) reward model ranks the answers by its score: the synthetic labeler of the
    over-optimisation literature (Gao et al. 2022), for users with no team."""
    import torch

    from core.labeling.store import distinct_answers
    from core.models.loading import load_scalar_model, load_tokenizer, pick_device
    from core.stages.reward import encode_answers, score_sequences

    dev = pick_device(device)
    tokenizer = load_tokenizer(path)
    model = load_scalar_model(path, tokenizer.pad_token_id, dev).eval()
    rankings = []
    with torch.no_grad():
        for prompt, answers in groups:
            answers = distinct_answers(answers)
            if len(answers) < 2:
                continue
            scores = score_sequences(model, encode_answers(tokenizer, prompt, answers, max_length),
                                     tokenizer.pad_token_id, dev).tolist()
            rankings.append(Ranking(prompt, [a for _, a in sorted(zip(scores, answers), key=lambda x: -x[0])]))
    return rankings


def reward_term_rankings(reward, policy, tokenizer, prompts: list[Prompt], columns: list[dict], rm_config,
                         seed: int) -> list[Ranking]:
    """Reward terms (core/stages/reward_terms.py: `exact`, `numeric`, `python:PATH:FUNCTION`, ...; `reward` as
    `resolve_reward` made it) rank K answers sampled from `policy` by their weighted total: a verifier as the
    labeler, for prompts whose answers can be checked. Answers it scores alike are merged, the first kept (a
    ranking holds no ties); a prompt left with fewer than 2 gives no ranking."""
    from core.models.generate import sample
    from core.stages.reward_terms import Answers

    k = rm_config.k
    rankings = []
    for i in range(0, len(prompts), SAMPLE_PROMPTS):
        chunk = [(prompt, row) for prompt, row in zip(prompts[i:i + SAMPLE_PROMPTS], columns[i:i + SAMPLE_PROMPTS])
                 for _ in range(k)]
        samples = sample(policy, tokenizer, [prompt for prompt, _ in chunk], max_new_tokens=MAX_NEW_TOKENS,
                         temperature=rm_config.sample_temperature, seed=seed + i)
        totals = reward(Answers.of_samples(samples, [prompt for prompt, _ in chunk], [row for _, row in chunk])).total
        for j in range(0, len(chunk), k):
            by_score: dict[float, str] = {}
            for text, score in zip(samples.texts[j:j + k], totals[j:j + k].tolist()):
                if text.strip() and text.strip() not in by_score.values():
                    by_score.setdefault(round(score, 6), text.strip())
            if len(by_score) >= 2:
                rankings.append(Ranking(chunk[j][0], [by_score[s] for s in sorted(by_score, reverse=True)]))
    return rankings


# ---------------------------------------------------------------------------------------------
# The state machine
# ---------------------------------------------------------------------------------------------


def load_state(output_dir: str | Path) -> dict | None:
    """DIR/rounds.json, or None before a rounds run wrote one (pages read it for the round strip)."""
    path = Path(output_dir) / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def round_rows(state: dict) -> list[dict]:
    """One row a round for the round strip (Monitor, Home): where it stands and what it measured so far.
    SFT is the row before round 0; a round not reached yet shows as planned."""
    sft = state.get("sft")
    rows = [{"round": "SFT", "state": "done" if sft else "sft", "gold": (sft or {}).get("gold"),
             "kl_to_sft": 0.0 if sft else None, "rankings": None, "rm_accuracy_before": None,
             "rm_accuracy_after": None}]
    for r in range(state["config"]["rounds"]):
        entry = state["rounds"][r] if r < len(state["rounds"]) else {}
        if state["state"] == "done" or r < state["round"]:
            where = "done"
        elif r == state["round"] and state["state"] != "sft":
            where = state["state"]
        else:
            where = "planned"
        rows.append({"round": r, "state": where, "gold": entry.get("gold"), "kl_to_sft": entry.get("kl_to_sft"),
                     "rankings": entry.get("rankings"), "rm_accuracy_before": entry.get("rm_accuracy_before"),
                     "rm_accuracy_after": entry.get("rm_accuracy_after")})
    return rows


def latest_rounds(store: Store) -> tuple[dict, dict] | None:
    """The newest rounds run that has written its state: (run, state), for Home's round strip."""
    for run in reversed(store.list_runs()):
        if run["stage"] == "rounds" and run.get("output_dir") and (state := load_state(run["output_dir"])):
            return run, state
    return None


class Rounds:
    """One rounds run: its config, its directory and its persisted state; `advance` runs steps until
    done, stopped or (not waiting) waiting for labels."""

    def __init__(self, config: RoundsConfig, output_dir: Path, store: Store, events: Events, overrides: dict,
                 state: dict, continue_now: bool = False, pool: Pool | None = None):
        self.config, self.output_dir, self.store, self.events = config, output_dir, store, events
        self.overrides, self.state, self.continue_now, self.pool = overrides, state, continue_now, pool
        self.name = state["name"]
        self.steps = {"sft": self.sft, "sampling": self.sampling, "waiting for labels": self.waiting,
                      "rm": self.rm, "stage 3": self.stage3}

    # -- bookkeeping ---------------------------------------------------------------------------

    @property
    def r(self) -> int:
        return self.state["round"]

    def dir(self, r: int | None = None) -> Path:
        return self.output_dir / f"round-{self.r if r is None else r}"

    def entry(self) -> dict:
        """This round's entry in the report (made when the round starts)."""
        while len(self.state["rounds"]) <= self.r:
            self.state["rounds"].append({"round": len(self.state["rounds"])})
        return self.state["rounds"][self.r]

    def prompts(self) -> Pool:
        """This round's fresh prompts and their columns."""
        return round_prompts(self.config, self.overrides, self.pool, self.r)

    def previous_policy(self) -> str:
        return self.state["sft"]["model"] if self.r == 0 else self.state["rounds"][self.r - 1]["policy"]

    def move(self, state: str, **changes) -> None:
        """The state transition, persisted before the next step starts."""
        self.state.update(changes, state=state)
        self.events.log(f"rounds: round {self.r} -> {state}" if state != "done" else "rounds: done")
        self.save()

    def save(self) -> None:
        atomic_write_text(self.output_dir / STATE_FILE, json.dumps(self.state, indent=2))
        report = {"preset": self.config.preset, "method": self.config.method, "labeler": self.config.labeler,
                  "state": self.state["state"], "round": self.state["round"], "sft": self.state.get("sft"),
                  "rounds": self.state["rounds"]}
        atomic_write_text(self.output_dir / REPORT_FILE, json.dumps(report, indent=2))

    def stage_config(self, stage: str, values: dict):
        """The preset's config of `stage`, the user's --set over it, this round's values over both."""
        return make_config(stage, self.config.preset, {**self.overrides.get(stage, {}), **values})

    def rm_config(self, data: str = "demo", sft_model: str = "bundled"):
        return self.stage_config("rm", {"sft_model": sft_model, "data": data, "heldout": "none",
                                        "seed": self.config.seed + self.r})

    def train(self, key: str, stage: str, config, out: Path) -> tuple[Path, bool]:
        """One stage as a run of its own ("NAME-key"); (its output, stopped). A stopped stage resumes in place."""
        run = run_stage(self.events, self.store, f"{self.name}-{key}", stage, config, out)
        return run.output, run.stopped

    def advance(self) -> None:
        while self.state["state"] != "done" and not self.events.should_stop():
            if not self.steps[self.state["state"]]():
                return

    # -- the steps: each returns False to pause (stopped, or waiting for labels) -------------------

    def sft(self) -> bool:
        if self.config.sft_model:
            model = self.config.sft_model
        else:
            config = self.stage_config("sft", {"data": "store"})
            imported = import_demo_data(self.store, config.n_demonstrations, config.ramble_rate, config.seed)
            self.events.log(f"demo data in the store: added {imported['prompts']} prompts and "
                            f"{imported['demonstrations']} demonstrations (source 'demo')")
            out, stopped = self.train("sft", "sft", config, self.output_dir / "sft")
            if stopped:
                return False
            model = str(out)
        self.move("sampling", sft={"model": model, **evaluate_checkpoint(model, n_prompts=self.config.eval_prompts)})
        return True

    def sampling(self) -> bool:
        entry, labeler, model = self.entry(), self.config.labeler, self.previous_policy()
        prompts, columns = self.prompts()
        rm_config = self.rm_config()
        if self.r > 0:  # the rounds' own temperature: a sharpened policy's answers coincide at the preset's
            rm_config = rm_config.replace(sample_temperature=self.config.sample_temperature)
        seed = rm_config.seed
        entry.update(prompts=len(prompts), sampled_from=model, sample_temperature=rm_config.sample_temperature)
        self.dir().mkdir(parents=True, exist_ok=True)
        if labeler == "simulated" or labeler.startswith(("rm:", "reward:")):
            # The measure: the labeler on the previous policy's answers to held-out prompts: the demo's when
            # the prompts are the demo's, else a tenth of the round's own rankings.
            own_heldout = not demo.is_demo_task(prompts)
            heldout = [] if own_heldout else demo.heldout_tasks(self.config.heldout_prompts)
            held_prompts, held_columns = [t.prompt for t in heldout], [{"answer": t.answer} for t in heldout]
            if labeler == "simulated":
                rankings = simulated_rankings(model, demo_tasks(prompts), rm_config, rm_config.labeler_temperature,
                                              seed, self.events, f"round {self.r}")
                # The noise-free labeler on the held-out answers.
                held = simulated_rankings(model, heldout, rm_config, 0.0, seed + 99, self.events,
                                          f"round {self.r} held-out")
            elif labeler.startswith("rm:"):
                path = labeler[3:].strip()
                rankings = reward_model_rankings(path, sample_groups(model, prompts, rm_config, seed),
                                                 rm_config.max_length)
                held = reward_model_rankings(path, sample_groups(model, held_prompts, rm_config, seed + 99),
                                             rm_config.max_length) if heldout else []
            else:
                from core.models.loading import load_policy, load_tokenizer, pick_device
                from core.stages.reward_terms import resolve_reward

                # The terms (a user's file) and the policy loaded once for the round and its held-out prompts.
                scored_by = (resolve_reward(labeler[len("reward:"):]),
                             load_policy(model, pick_device(rm_config.device), dropout=0.0), load_tokenizer(model))
                rankings = reward_term_rankings(*scored_by, prompts, columns, rm_config, seed)
                held = reward_term_rankings(*scored_by, held_prompts, held_columns, rm_config, seed + 99)
            self.count_dropped(len(prompts) - len(rankings))
            if own_heldout:
                from core.stages.reward import split_heldout

                rankings, held = split_heldout(rankings, seed)
            self.keep_rankings(rankings, held)
            return True
        if labeler == "team":
            from core.labeling.store import LabelingStore

            labeling = LabelingStore(self.store)
            batch_name = f"{self.name}-round-{self.r}"
            # A kill after the batch was made but before the state was saved: take up that batch.
            batch = next((b for b in labeling.list_batches() if b["name"] == batch_name), None)
            if batch is None:
                labeling.check_batch_options(batch_name, None, 0.0, 2, rm_config.k)  # before sampling
                groups = sample_groups(model, prompts, rm_config, seed)
                made = labeling.create_batch(batch_name, groups, None, overlap=0.0, model=model, k=rm_config.k,
                                             temperature=rm_config.sample_temperature, seed=seed)
                batch = {"id": made.batch_id, "items": made.items}
                self.count_dropped(len(made.skipped))
            self.events.log(f"round {self.r}: labeling batch {batch_name!r} holds {batch['items']} prompts "
                            "for the team (rlhf label serve)")
            self.move("waiting for labels", batch={"id": batch["id"], "name": batch_name, "items": batch["items"]})
            return True
        # 'page': the prompts go to the store for the Rank page; rankings on them from now on count.
        self.store.add_prompts(prompts, source=ROUNDS_SOURCE)
        self.events.log(f"round {self.r}: rank answers of {model} to {len(prompts)} prompts on the Rank page")
        self.move("waiting for labels", batch={"since": time.time(), "items": len(prompts)})
        return True

    def count_dropped(self, dropped: int) -> None:
        """How many of the round's prompts gave no ranking, their K answers identical (or tied for the labeler):
        in the report, and in the log when any."""
        prompts = self.entry()["prompts"]
        self.entry()["dropped_identical"] = dropped
        if dropped:
            self.events.log(f"round {self.r}: {dropped} of {prompts} prompts dropped: fewer than 2 of their K "
                            f"answers differ (identical, or tied for the labeler) at temperature "
                            f"{self.entry()['sample_temperature']:g}")

    def keep_rankings(self, rankings: list[Ranking], heldout: list[Ranking]) -> None:
        """The round's rankings on disk (what its RM trains on) and in the store (source 'rounds')."""
        if not rankings:
            raise ValueError(f"round {self.r}: no usable rankings (every prompt's answers were identical or tied); "
                             "raise prompts_per_round or sample_temperature")
        write_rankings(self.dir() / "rankings.jsonl", rankings)
        write_rankings(self.dir() / "heldout.jsonl", heldout)
        if self.config.labeler not in ("team", "page"):  # a team's and the Rank page's are in the store already
            have = {(prompt_key(as_prompt(r["turns"])), tuple(r["responses"])) for r in self.store.list_rankings()}
            # A resumed step: none twice.
            new = [r for r in rankings if (prompt_key(r.prompt), tuple(r.responses)) not in have]
            if new:
                self.store.add_rankings([{"prompt": r.prompt, "responses": r.responses, "labeler": self.config.labeler}
                                         for r in new], source=ROUNDS_SOURCE)
        self.entry().update(rankings=len(rankings), heldout_rankings=len(heldout))
        self.move("rm")

    def collected(self) -> tuple[list[Ranking], bool]:
        """(rankings in so far for this round, whether no more can come: its batch was closed)."""
        batch = self.state["batch"]
        keys = {prompt_key(p) for p in self.prompts()[0]}
        if self.config.labeler == "team":
            from core.labeling.store import LabelingStore

            labeling = LabelingStore(self.store)
            rankings = [Ranking(row["prompt"], row["responses"]) for row in labeling.ranked_items(batch["id"])]
            status = next((b["status"] for b in labeling.list_batches() if b["id"] == batch["id"]), "closed")
            return rankings, status != "open"
        rows = [r for r in self.store.list_rankings() if prompt_key(as_prompt(r["turns"])) in keys
                and r["created_at"] >= batch["since"] and r["labeler"] != "simulated"]
        return [Ranking(as_prompt(r["turns"]), r["responses"]) for r in rows], False

    def waiting(self) -> bool:
        needed = self.config.labels_needed or self.state["batch"]["items"]
        while True:
            rankings, closed = self.collected()
            if len(rankings) >= needed or (self.continue_now and len(rankings) >= 2):
                break
            if self.continue_now or closed:
                why = "its labeling batch was closed" if closed else "you asked to go on"
                raise ValueError(f"round {self.r}: {why} with {len(rankings)} rankings in, but it needs "
                                 f"{2 if self.continue_now else needed}; reopen the batch or rank more, then run "
                                 "the rounds again (they wait where they stood)")
            self.events.progress(len(rankings), needed, f"round {self.r}: waiting for labels")
            if not self.config.wait:
                self.events.log(f"round {self.r}: {len(rankings)} of {needed} rankings in; run the rounds again to "
                                "go on once they are")
                return False
            deadline = time.monotonic() + self.config.poll_s
            while time.monotonic() < deadline:
                if self.events.should_stop():
                    return False
                time.sleep(min(1.0, self.config.poll_s))
        # The previous policy's own answers held out from its refit: a tenth of the round's rankings.
        from core.stages.reward import split_heldout

        train, held = split_heldout(rankings, self.config.seed + self.r)
        self.keep_rankings(train, held)
        return True

    def rm(self) -> bool:
        from core.models.loading import check_same_tokenizer, load_tokenizer, pick_device
        from core.stages.reward import pairwise_accuracy

        entry, sft = self.entry(), self.state["sft"]["model"]
        union = [r for i in range(self.r + 1) for r in read_rankings(self.dir(i) / "rankings.jsonl")]
        write_rankings(self.dir() / "rm-data.jsonl", union)
        start = sft
        if self.config.rm_init == "previous" and self.r > 0:
            start = self.state["rounds"][self.r - 1]["rm"]
            check_same_tokenizer(load_tokenizer(start), load_tokenizer(sft),
                                 f"round {self.r - 1}'s reward model {start} does not match the SFT model {sft}")
        config = self.rm_config(str(self.dir() / "rm-data.jsonl"), start)
        out, stopped = self.train(f"round-{self.r}-rm", "rm", config, self.dir() / "rm")
        if stopped:
            return False
        heldout = read_rankings(self.dir() / "heldout.jsonl")
        measured = {"rm": str(out), "rankings_total": len(union)}
        if heldout:
            from core.models.loading import load_scalar_model

            device = pick_device(config.device)
            tokenizer = load_tokenizer(out)
            rms = {"after": str(out)} | ({"before": self.state["rounds"][self.r - 1]["rm"]} if self.r else {})
            for when, path in rms.items():
                model = load_scalar_model(path, tokenizer.pad_token_id, device)
                measured[f"rm_accuracy_{when}"] = pairwise_accuracy(model, tokenizer, heldout, config.max_length,
                                                                    device)["accuracy"]
        entry.update(measured)
        self.events.log(f"round {self.r}: RM on {len(union)} rankings; accuracy on the previous policy's answers "
                        f"{entry.get('rm_accuracy_before')} before the refit, {entry.get('rm_accuracy_after')} after")
        self.move("stage 3")
        return True

    def stage3(self) -> bool:
        method, entry, sft = self.config.method, self.entry(), self.state["sft"]["model"]
        previous = self.previous_policy()
        start = previous if self.config.policy_init == "previous" else sft
        reference = previous if self.config.reference_policy == "previous" else sft
        values: dict = {"seed": self.config.seed + self.r}
        if method == "dpo":
            values.update(sft_model=start, data=str(self.dir() / "rankings.jsonl"))
        else:
            values.update(reward_model=entry["rm"], total_episodes=episodes_per_round(self.config, self.overrides))
            if self.config.prompts != "demo" and "prompts" not in self.overrides.get(method, {}):
                values["prompts"] = self.config.prompts  # stage 3 trains on the prompts the rounds rank
            if method == "ppo":
                values.update(sft_model=reference, policy_init=start if start != reference else "")
            else:
                values.update(sft_model=start)
        config = self.stage_config(method, values)
        out, stopped = self.train(f"round-{self.r}-{method}", method, config, self.dir() / method)
        if stopped:
            return False
        measured = evaluate_checkpoint(out, n_prompts=self.config.eval_prompts, reference=sft)
        summary = out / f"{method}_summary.json"
        if summary.is_file():
            measured.update({k: v for k, v in json.loads(summary.read_text()).items()
                             if k in ("reward", "kl", "train_pair_accuracy")})
        entry.update(policy=str(out), episodes=values.get("total_episodes", 0), **measured)
        if self.r + 1 < self.config.rounds:
            self.move("sampling", round=self.r + 1)
        else:
            self.move("done")
        return True


def run_rounds(config: RoundsConfig, output_dir: str | Path, store: Store, events: Events,
               overrides: dict[str, dict] | None = None, name: str | None = None,
               continue_now: bool = False) -> dict:
    """Run (or resume) the rounds in `output_dir`; returns DIR/report.json's content.

    `continue_now`: a round waiting for labels goes on with the rankings in (at least 2). Running it
    again with the same directory resumes where it stood; another config there is refused."""
    overrides = {k: v for k, v in (overrides or {}).items() if v}
    config.validate()
    output_dir = Path(output_dir)
    pool = load_pool(config, store, output_dir)
    check_rounds(config, store, overrides, pool)
    state = load_state(output_dir)
    if state is not None:  # a field added since the state was written holds its default
        state["config"] = {**RoundsConfig().to_dict(), **state["config"]}
    if state is not None and (state["config"] != config.to_dict() or state["overrides"] != overrides):
        changed = sorted(k for k in {**state["config"], **config.to_dict()}
                         if state["config"].get(k) != config.to_dict().get(k)) or ["--set"]
        raise ValueError(f"{output_dir} holds rounds with another config (differs in: {', '.join(changed)}); "
                         "resume with the same options or choose another output directory")
    if state is None:
        name = events.run_id or name or f"rounds-{time.strftime('%Y%m%d-%H%M%S')}"
        state = {"name": name, "config": config.to_dict(), "overrides": overrides, "state": "sft", "round": 0,
                 "sft": None, "rounds": []}
        output_dir.mkdir(parents=True, exist_ok=True)
        if pool is not None:
            write_pool(output_dir, pool)
    own_run = events.run_id is None  # the CLI: the rounds become a run of their own, as in the app
    if own_run:
        store.start_run(state["name"], "rounds", {"rounds": config.to_dict(), "overrides": overrides},
                        str(output_dir))
        events = events.child(store, state["name"])
    rounds = Rounds(config, output_dir, store, events, overrides, state, continue_now, pool)
    rounds.save()
    try:
        rounds.advance()
    except BaseException as exc:
        if own_run:
            store.set_run_status(state["name"], "failed", str(exc))
        raise
    if own_run:
        store.set_run_status(state["name"], "done" if state["state"] == "done" else "stopped")
    return json.loads((output_dir / REPORT_FILE).read_text())
