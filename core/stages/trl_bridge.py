"""The bridge between the workbench and TRL's trainers, shared by the alternative third stages
(`dpo.py`, `grpo.py`, `rloo.py`).

TRL (1.16) does the methods themselves: DPOTrainer, GRPOTrainer and RLOOTrainer compute the losses,
sample the groups, build the advantages and the KL terms, optimise, and write and resume their own
checkpoints. What TRL cannot know is the workbench around it, so this module adds only that:

- `WorkbenchCallback`, a `TrainerCallback` that forwards TRL's logs to `events.metrics` under our
  metric names (so the Monitor overlays them with PPO's curves: `reward`, `kl`, `entropy`,
  `response_length`, `gold`, ...), reports progress, registers each checkpoint in the store, and
  polls `events.should_stop()` to set `control.should_training_stop` (with a checkpoint at that
  step, so a stopped run resumes where it stopped).
- `training_args`: TRL's config for our devices (CPU fp32, or CUDA with bf16 where supported, as
  `core/models/loading.pick_device`), no reporting or progress bars, checkpoints every
  `save_every` steps into `checkpoints_dir(output_dir)`.
- The datasets, from our sources in the model's chat format (`core.models.chat`, the whole
  conversation of a multi-turn prompt): preference pairs expanded from K-wise rankings
  (`ranking_pairs`, all C(K,2) per ranking), each answer as the template writes it up to its EOS (TRL
  appends the EOS to DPO's answers, and sampling stops at it); a conversation too long keeps its most
  recent whole turns.
- `make_reward`: our reward model as a GRPO/RLOO reward function (TRL's own reward-model path reads
  the score through the head's pad-token search and without our `reward_bias`, so the RM would
  score differently than in PPO), or the demo's gold labeler, which is cheating on the proxy.
- `GroupRollouts`: GRPO's and RLOO's sample of answers for the Monitor's rollout browser, in PPO's rollouts table
  (`core.data.rollouts`): kept by the reward function, written at the end of the step they train.
- LoRA (`lora_r > 0`) as in the other stages: `peft_config` hands TRL our `lora_config`; TRL wraps the
  policy and takes the reference as the policy with its adapter switched off (one copy of the base
  weights); its checkpoints are adapter directories, which every loader of ours merges.
- `finish`: the final model written atomically and merged (`save_model`), then the final evaluation on the
  demo (held-out gold sampled and greedy, KL to the SFT model measured as for every method, held-out
  pretraining loss), under the metric names PPO uses.

Resume uses TRL's own checkpointing (`resume_from_checkpoint`), which works on the CPU: a checkpoint
is `checkpoint-<n>` (an HF model directory with TRL's optimizer, scheduler, RNG and trainer state)
under `checkpoints_dir(output_dir)`. The Trainer does not write it atomically, but it writes
`trainer_state.json` last, so `latest_checkpoint` takes only directories that have it.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch

from core.config import uses_reward_model
from core.data import demo
from core.data.formats import ranking_pairs
from core.data.rollouts import RolloutRecorder, Sample, kept_scores
from core.data.sources import Ranking
from core.data.store import prompt_display
from core.stages.evaluate import all_demo
from core.stages.events import Events
from core.models.chat import answer_text, encode_answer, fit_prompt, render_prompt
from core.models.loading import Device, load_policy, pick_device, save_model
from core.paths import atomic_write_text, checkpoints_dir

TRAINER_STATE = "trainer_state.json"  # written last into a TRL checkpoint: its presence marks a complete one
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
DATA_FILE = "data.json"  # the run's training rows, kept beside its checkpoints so a resume trains on the same ones

# TRL's log keys -> the workbench's metric names (PPO's names where the quantity is the same).
DPO_METRICS = {
    "loss": "dpo_loss", "rewards/margins": "reward_margin", "rewards/accuracies": "reward_accuracy",
    "rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected", "logps/chosen": "logp_chosen",
    "logps/rejected": "logp_rejected", "entropy": "entropy", "learning_rate": "learning_rate",
    "grad_norm": "grad_norm",
}
GROUP_METRICS = {
    "loss": "policy_loss", "reward": "score", "reward_std": "reward_std", "raw_reward": "reward", "gold": "gold",
    "kl": "kl_token", "entropy": "entropy", "completions/mean_length": "response_length",
    "clip_ratio/region_mean": "clip_frac", "frac_reward_zero_std": "frac_reward_zero_std",
    "learning_rate": "learning_rate", "grad_norm": "grad_norm", "ensemble_std": "ensemble_std",
}


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete TRL checkpoint `checkpoint-<n>` of a stage."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return None
    found = [(int(m[1]), p) for p in root.iterdir()
             if (m := _CHECKPOINT_RE.match(p.name)) and (p / TRAINER_STATE).is_file()]
    return max(found)[1] if found else None


def checkpoint_step(path: Path) -> int:
    return int(_CHECKPOINT_RE.match(path.name)[1])


def quiet() -> None:
    """No progress bars from datasets' map/filter (the Trainer's own are off by `disable_tqdm`)."""
    import datasets

    datasets.disable_progress_bars()


def training_args(args_class, config, output_dir: Path, device: Device, **kwargs):
    """TRL's config for a workbench run: our device and precision, logs every step into the callback
    only, checkpoints every `save_every` steps into `checkpoints_dir(output_dir)`, gradient checkpointing
    only when the config asks (TRL turns it on by default)."""
    return args_class(
        output_dir=str(checkpoints_dir(output_dir)),
        use_cpu=device.type != "cuda", bf16=device.precision == "bf16", fp16=False,
        report_to="none", disable_tqdm=True, logging_steps=1,
        save_strategy="steps", save_steps=config.save_every, save_total_limit=None,
        dataloader_num_workers=0, activation_checkpointing=config.gradient_checkpointing, disable_dropout=True,
        seed=config.seed, data_seed=config.seed, learning_rate=config.learning_rate, lr_scheduler_type="linear",
        **kwargs,
    )


def peft_config(config):
    """TRL's `peft_config` for the config's LoRA fields, or None to train every weight."""
    from core.models.lora import lora_config

    return lora_config(config, "causal") if config.lora else None


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def data_once(output_dir: Path, gather: Callable[[], list[dict]]) -> list[dict]:
    """The run's rows, gathered once (demo rankings are sampled: minutes of work, and a store can change)
    and kept beside its checkpoints, so a resumed run trains on the same rows in the same order."""
    path = checkpoints_dir(output_dir) / DATA_FILE
    if path.is_file():
        return json.loads(path.read_text())
    rows = gather()
    atomic_write_text(path, json.dumps(rows))
    return rows


def preference_pairs(rankings: list[Ranking], tokenizer, max_length: int | None = None,
                     events: Events | None = None) -> list[dict]:
    """TRL's preference rows from K-wise rankings: all C(K,2) (chosen, rejected) pairs of each, the
    prompt rendered by the model's chat template (the whole conversation; one too long for `max_length`
    with its answers keeps its most recent whole turns) and each answer as the template writes it,
    less the EOS TRL appends. `raw_prompt`: the prompt itself, for the demo's labeler and DPO's measures."""
    rows = []
    cut = 0
    for r in rankings:
        if len(r.responses) < 2:
            raise ValueError(f"a ranking needs at least 2 responses to give a preference pair: "
                             f"{prompt_display(r.prompt)[:60]!r}")
        prompt = r.prompt
        if max_length:
            # TRL cuts a pair's prompt from the left by tokens; whole turns go first instead.
            longest = max(len(encode_answer(tokenizer, prompt, a)[1]) for a in r.responses)
            prompt, dropped = fit_prompt(tokenizer, prompt, max(1, max_length - longest))
            cut += bool(dropped)
        for chosen, rejected in ranking_pairs(r.responses):
            rows.append({"raw_prompt": prompt, "prompt": render_prompt(tokenizer, prompt),
                         "chosen": answer_text(tokenizer, prompt, chosen),
                         "rejected": answer_text(tokenizer, prompt, rejected)})
    if cut and events is not None:
        events.log(f"{cut} of {len(rankings)} rankings have conversations longer than max_length ({max_length} "
                   "tokens with their longest answer): their oldest turns are left out, the most recent whole "
                   "turns kept")
    return rows


def prompt_rows(prompts: list, tokenizer, columns: list[dict], max_prompt_length: int) -> list[dict]:
    """TRL's prompt rows: the prompt rendered by the model's chat template (its most recent whole turns
    within `max_prompt_length` tokens) that TRL samples from, the raw prompt for the labeler and the reward terms (a
    conversation as its JSON text, so the column holds one type), and the row's other columns for the terms
    (as JSON: rows may differ in their columns, a dataset's may not)."""
    rows = []
    for p, c in zip(prompts, columns):
        fitted = fit_prompt(tokenizer, p, max_prompt_length)[0]
        rows.append({"prompt": render_prompt(tokenizer, fitted),
                     "raw_prompt": fitted if isinstance(fitted, str) else json.dumps(fitted),
                     "columns": json.dumps(c)})
    return rows


def dataset(rows: list[dict], drop: tuple[str, ...] = ()):
    from datasets import Dataset

    return Dataset.from_list([{k: v for k, v in row.items() if k not in drop} for row in rows])


# ---------------------------------------------------------------------------------------------
# Reward for GRPO / RLOO
# ---------------------------------------------------------------------------------------------


class GroupRollouts:
    """GRPO's and RLOO's rollout sample, in the table and bounds of PPO's (`core.data.rollouts`): the reward function
    `keep`s a batch's first answers with their reward (before the missing-EOS penalty, as PPO's) and each term, at
    the step the batch trains first; the end of that step `write`s them with the advantage TRL's update gave each
    (TRL's own record of the batch: the advantages are built after the rewards return). No KL: TRL computes the
    policy's log-probs inside its loss, out of sight of a reward function or callback, so `kl` stays NULL."""

    def __init__(self, store, run_id: str | None, num_steps: int, tokenizer, span: int = 1):
        self.recorder = RolloutRecorder(store, run_id, num_steps, tokenizer)
        self.span = span  # steps one sampled batch trains (num_iterations)
        self.trainer = None  # `attach`ed once built: its advantages, and whether this is the main process
        self.pending: tuple[int, list[float], list[Sample]] | None = None

    def attach(self, trainer) -> None:
        self.trainer = trainer
        if not trainer.accelerator.is_main_process:  # one writer: the main process's share of the batch
            self.recorder.store = None

    def keep(self, state, prompts: list[str], completions: list[str], completion_ids: list[list[int]],
             rewards: list[float], scored, finished: list[bool]) -> None:
        step = state.global_step + 1  # the batch is scored before the step it trains
        if not self.recorder.due(step, self.span):
            return
        n = min(self.recorder.per_step, len(completions))
        members, terms = kept_scores(scored.rm_members, scored.terms, n)
        self.pending = (step, rewards, [
            Sample(_conversation(prompts[i]), completions[i], rewards[i], len(completion_ids[i]), finished[i],
                   members=members[i], terms=terms[i])
            for i in range(n)])

    def write(self, step: int) -> None:
        if self.pending is None or self.pending[0] != step:
            return
        _, rewards, samples = self.pending
        self.pending = None
        # TRL keeps the batch's advantages (every process's, the main one's first) for its completions log; a
        # TRL without that record leaves them NULL rather than a guess.
        advantages = list(getattr(self.trainer, "_logs", {}).get("advantages", []))
        if len(advantages) >= len(rewards):
            for sample, advantage in zip(samples, advantages):
                sample.advantage = advantage
        self.recorder.write(step, rewards, samples)


def _conversation(raw_prompt: str) -> str | list[dict]:
    """`prompt_rows`'s raw prompt back as the prompt: a conversation is there as its JSON text."""
    if raw_prompt.startswith("[{"):
        try:
            return json.loads(raw_prompt)
        except ValueError:
            pass
    return raw_prompt


def make_reward(config, tokenizer, device: Device, terms=None,
                rollouts: GroupRollouts | None = None) -> Callable[..., list[float]]:
    """A TRL reward function: the config's reward terms (`core.stages.reward_terms`), the `rm` term our RM's
    score at each answer's last token (with the centring `reward_bias`) on the very token ids the policy
    sampled after the chat-formatted prompt, as PPO scores them. Answers that never emitted EOS lose
    `missing_eos_penalty`, as in PPO. Logs the reward before that penalty (`reward`), each term
    (`reward/<term>`) and, on demo prompts, the gold score (`gold`) beside TRL's own metrics. `terms`: the
    `Reward` `check_group_inputs` resolved (a user's file runs once per stage run), else resolved here;
    `rollouts`: where the batch's sample for the rollout browser is kept."""
    from core.stages.reward_terms import Answers, RewardModelTerm, resolve_reward

    eos = tokenizer.eos_token_id
    if terms is None:
        terms = resolve_reward(config.reward)
    if terms.uses_reward_model:
        from core.models.ensemble import load_reward_model

        # Every member of an ensemble RM, the term's value their `reward_aggregate` (core/models/ensemble.py).
        rm = load_reward_model(config.reward_model, tokenizer.pad_token_id, device, how=config.reward_aggregate,
                               uncertainty_coef=config.uncertainty_coef)
        terms = terms.with_reward_model(RewardModelTerm(rm, tokenizer.pad_token_id, device))
    prompt_cache: dict[str, list[int]] = {}

    def prompt_ids(text: str) -> list[int]:
        if text not in prompt_cache:
            prompt_cache[text] = tokenizer(text, add_special_tokens=False)["input_ids"]
        return prompt_cache[text]

    @torch.no_grad()
    def reward(prompts, completions, completion_ids, raw_prompt, columns, log_metric=None, trainer_state=None,
               **_) -> list[float]:
        # TRL's completion ids stop at (and include) the EOS; a cut-off answer ends on its last sampled token.
        finished = [bool(ids) and ids[-1] == eos for ids in completion_ids]
        answers = Answers(list(raw_prompt), list(completions), [json.loads(c) for c in columns], finished,
                          [len(ids) for ids in completion_ids],
                          [prompt_ids(p) + list(ids) for p, ids in zip(prompts, completion_ids)])
        scored = terms(answers)
        raw = scored.total.tolist()
        penalty = config.missing_eos_penalty or 0.0
        scores = [s if done else s - penalty for s, done in zip(raw, finished)]
        if log_metric is not None:
            log_metric("raw_reward", sum(raw) / len(raw))
            for name, value in scored.metrics().items():
                log_metric(name, value)
            if all_demo(raw_prompt):
                log_metric("gold", sum(map(demo.gold_score, raw_prompt, completions)) / len(raw_prompt))
        if rollouts is not None and trainer_state is not None:
            rollouts.keep(trainer_state, list(raw_prompt), list(completions), completion_ids, raw, scored, finished)
        return scores

    reward.__name__ = "reward"  # TRL names its per-function metrics after it (rewards/reward/mean)
    return reward


# ---------------------------------------------------------------------------------------------
# The callback: TRL -> events (metrics, progress, checkpoints, stop)
# ---------------------------------------------------------------------------------------------


def make_callback(stage: str, kind: str, events: Events, metric_names: dict[str, str], episodes_per_step: int = 0,
                  rollouts: GroupRollouts | None = None):
    """Built here so `transformers` is imported only when a stage runs. `rollouts`: a group method's rollout
    sample, written at the end of each step."""
    from transformers import TrainerCallback

    class WorkbenchCallback(TrainerCallback):
        def __init__(self):
            self.stopped = False
            self.prefix = events.run_id or stage
            self._t = time.perf_counter()

        def poll_stop(self, control) -> None:
            # Polled at the end of each step and again after its log (the Trainer saves after logging):
            # stop at this step, with a checkpoint, so a resume continues from here.
            if events.should_stop():
                self.stopped = True
                control.should_training_stop = True
                control.should_save = True

        def on_step_end(self, args, state, control, **kwargs):
            if rollouts is not None:
                rollouts.write(state.global_step)
            events.progress(state.global_step, state.max_steps, stage)
            if state.global_step >= state.max_steps:
                control.should_save = True  # the resumable end state (a re-run only re-evaluates)
            self.poll_stop(control)
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "train_runtime" in logs:  # the Trainer's end-of-training summary, not a step
                return
            values = {ours: logs[theirs] for theirs, ours in metric_names.items() if theirs in logs}
            values.update({k: v for k, v in logs.items() if k.startswith("reward/")})  # each reward term's
            if "completions/clipped_ratio" in logs:
                values["eos_rate"] = 1.0 - logs["completions/clipped_ratio"]
            if "kl" in logs and "completions/mean_length" in logs:
                # TRL logs the KL per token over the answers' tokens; times the mean answer length it is the
                # mean per-answer sum, PPO's `kl` (RLOO: k1 as PPO; GRPO: k3, its loss's estimator).
                values["kl"] = logs["kl"] * logs["completions/mean_length"]
            now = time.perf_counter()
            if episodes_per_step:
                values["episodes_per_s"] = episodes_per_step / max(now - self._t, 1e-9)
            self._t = now
            events.metrics(state.global_step, values)
            self.poll_stop(control)
            return control

        def on_save(self, args, state, control, **kwargs):
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if path.is_dir():
                events.checkpoint(f"{self.prefix}-step-{state.global_step}", kind, path, state.global_step)

    return WorkbenchCallback()


def train(trainer, callback, output_dir: Path, events: Events, what: str) -> None:
    """trainer.train(), resumed from the newest complete checkpoint when there is one."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # with tqdm off it prints every log dict; ours go to events
    resume = latest_checkpoint(output_dir)
    if resume is not None:
        events.log(f"resuming {what} after step {checkpoint_step(resume)} from {resume}")
    trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)


# ---------------------------------------------------------------------------------------------
# The end of a stage: the final model, the final evaluation, the summary
# ---------------------------------------------------------------------------------------------


def final_evaluation(model_dir: Path, reference: str, tokenizer, device: Device, n_prompts: int, temperature: float,
                     max_new_tokens: int, seed: int) -> dict[str, float]:
    """On the demo's held-out prompts: gold sampled at `temperature` and greedy, KL to the SFT model
    of the same sampled answers (`core.stages.evaluate.measure_answers`, the one KL measurement of every method), held-out pretraining loss."""
    from core.stages.evaluate import gold_eval
    from core.models.pretrain import demo_pretrain_loss

    policy = load_policy(model_dir, device, dropout=0.0)
    ref = load_policy(reference, device, dropout=0.0)
    tasks = demo.heldout_tasks(n_prompts)
    sampled = gold_eval(policy, tokenizer, tasks, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
                        reference=ref)
    greedy = gold_eval(policy, tokenizer, tasks, temperature=0.0, max_new_tokens=max_new_tokens)
    return {
        "heldout_gold": sampled["gold"], "heldout_gold_greedy": greedy["gold"],
        "heldout_kl": sampled["kl"],
        "pretrain_loss": demo_pretrain_loss(policy, tokenizer, device),
    }


def finish(trainer, callback, stage: str, kind: str, config, tokenizer, events: Events, output_dir: Path,
           summary: dict, evaluate: dict | None = None) -> Path:
    """Stopped: the checkpoint of the stop step is the result (as PPO). Done: the final model at
    `output_dir` (atomic, with `<stage>_summary.json`), then, on the demo, the final evaluation
    (`evaluate`: n_prompts, temperature, max_new_tokens) logged at the last step and added to the summary."""
    step = trainer.state.global_step
    if callback.stopped:
        events.log(f"stopped after step {step}; resume with the same output directory")
        events.close()
        return latest_checkpoint(output_dir) or output_dir
    model = trainer.accelerator.unwrap_model(trainer.model)
    logs = [h for h in trainer.state.log_history if "train_runtime" not in h]
    summary = {"stage": stage, "step": step, **summary}
    if logs:
        # Means of the last few logged steps, under our names (as PPO's summary).
        names = DPO_METRICS if stage == "dpo" else GROUP_METRICS
        for theirs, ours in names.items():
            values = [h[theirs] for h in logs[-5:] if theirs in h]
            if values and ours not in ("learning_rate", "grad_norm"):
                summary[ours] = sum(values) / len(values)
        per_answer = [h["kl"] * h["completions/mean_length"] for h in logs[-5:]
                      if "kl" in h and "completions/mean_length" in h]
        if per_answer:  # the `kl` metric's value: per answer, as PPO's
            summary["kl"] = sum(per_answer) / len(per_answer)
    summary_file = f"{stage}_summary.json"
    save_model(model, tokenizer, output_dir, extra_json={summary_file: summary})
    if evaluate and evaluate.get("n_prompts"):
        device = pick_device(next(model.parameters()).device.type, config.precision)
        final = final_evaluation(output_dir, config.sft_model, tokenizer, device, seed=config.seed, **evaluate)
        events.metrics(step, final)
        summary.update(gold=final["heldout_gold"], gold_greedy=final["heldout_gold_greedy"],
                       heldout_kl=final["heldout_kl"], pretrain_loss=final["pretrain_loss"])
        atomic_write_text(output_dir / summary_file, json.dumps(summary, indent=2))
    events.checkpoint(events.run_id or stage, kind, output_dir, step)
    events.close()
    return output_dir


# ---------------------------------------------------------------------------------------------
# GRPO and RLOO: one runner, the trainer class and its own options passed in
# ---------------------------------------------------------------------------------------------


def check_group_inputs(config, store) -> tuple[object, list[str], list[dict], object]:
    """Every check a user can fail, before any model loads: returns (tokenizer, prompts, their rows' columns,
    the reward). The reward's terms are resolved here, once for the run (user files loaded, the columns they
    read checked), and handed on to `make_reward`."""
    from core.data.sources import load_prompt_rows
    from core.models.loading import check_same_tokenizer, load_tokenizer, resolve_model
    from core.stages.reward_terms import resolve_reward

    config.validate()
    uses_rm = uses_reward_model(config.reward)
    fields = [("sft_model", "SFT checkpoint")] + ([("reward_model", "reward model checkpoint")] if uses_rm else [])
    for field, what in fields:
        if not getattr(config, field):
            raise ValueError(f"{field} is empty: name the {what} this stage needs"
                             + (" (or a reward without the rm term)" if field == "reward_model" else ""))
        try:
            resolve_model(getattr(config, field))
        except ValueError as exc:
            raise ValueError(f"{field} ({what}): {exc}") from None
    tokenizer = load_tokenizer(config.sft_model)
    if uses_rm:
        check_same_tokenizer(tokenizer, load_tokenizer(config.reward_model),
                             f"reward_model {config.reward_model} does not match sft_model {config.sft_model}")
    prompts, columns = load_prompt_rows(config.prompts, store)
    reward = resolve_reward(config.reward)
    reward.check_rows(prompts, columns)
    if len(prompts) * config.num_generations < config.batch_size:
        raise ValueError(f"{len(prompts)} prompts give fewer than batch_size ({config.batch_size}) answers at "
                         f"num_generations={config.num_generations}: add prompts or lower batch_size")
    return tokenizer, prompts, columns, reward


GROUP_TRAINERS = {"grpo": ("GRPOTrainer", "GRPOConfig"), "rloo": ("RLOOTrainer", "RLOOConfig")}


def group_trainer(stage: str, config, tokenizer, prompts: list[str], columns: list[dict], device: Device,
                  events: Events, output_dir: Path, reward=None, **trainer_options):
    """(TRL's GRPO or RLOO trainer for a workbench run, our callback): the policy starts at the SFT model,
    which is also the reference; the reward is `make_reward`'s, of the terms `reward` (resolved by
    `check_group_inputs`; None: resolved from the config)."""
    import trl

    trainer_class, args_class = (getattr(trl, name) for name in GROUP_TRAINERS[stage])
    rows = data_once(output_dir, lambda: prompt_rows(prompts, tokenizer, columns, config.max_prompt_length))
    policy = load_policy(config.sft_model, device, dropout=0.0)
    tokenizer.padding_side = "left"  # generation continues every prompt from its last token
    args = training_args(
        args_class, config, output_dir, device, max_steps=max(1, config.total_episodes // config.batch_size),
        per_device_train_batch_size=config.batch_size, num_generations=config.num_generations,
        max_completion_length=config.max_completion_length, temperature=config.temperature, beta=config.beta,
        epsilon=config.epsilon, num_iterations=config.num_iterations, max_grad_norm=config.max_grad_norm,
        # The reference: TRL loads it from the policy's own directory (the SFT model; resolve_model checked it
        # holds safetensors weights, which from_pretrained prefers), or under LoRA switches the adapter off.
        **trainer_options,
    )
    rollouts = GroupRollouts(events.store, events.run_id, args.max_steps, tokenizer, span=config.num_iterations)
    callback = make_callback(stage, stage, events, GROUP_METRICS, episodes_per_step=config.batch_size,
                             rollouts=rollouts)
    trainer = trainer_class(model=policy, reward_funcs=make_reward(config, tokenizer, device, reward, rollouts),
                            args=args, train_dataset=dataset(rows), processing_class=tokenizer, callbacks=[callback],
                            peft_config=peft_config(config))
    rollouts.attach(trainer)
    return trainer, callback


def run_group(stage: str, config, store, events: Events, output_dir: str | Path, **trainer_options) -> Path:
    """GRPO or RLOO (`stage`), the whole stage but the method's own options (`trainer_options`, fields of
    TRL's config): sample `num_generations` answers per prompt from the policy (starting at SFT), score
    them with `make_reward` (our RM, or the demo's labeler: cheating on the proxy), and let TRL's trainer
    do the update, with the SFT model as the reference; then connect it to the workbench (metrics, stop,
    checkpoints and resume, the final model and evaluation). No loop of our own. Returns `output_dir`
    (the final policy, an HF directory), or the stop step's checkpoint when stopped; re-running with the
    same `output_dir` resumes."""
    output_dir = Path(output_dir)
    tokenizer, prompts, columns, reward = check_group_inputs(config, store)
    quiet()
    device = pick_device(config.device, config.precision)
    torch.manual_seed(config.seed)
    trainer, callback = group_trainer(stage, config, tokenizer, prompts, columns, device, events, output_dir,
                                      reward, **trainer_options)
    train(trainer, callback, output_dir, events, stage.upper())
    tokenizer.padding_side = "right"  # as load_tokenizer leaves it, in the saved model too
    evaluate = None
    if all_demo(prompts):  # the demo's prompts, built in or through the store: gold applies
        evaluate = dict(n_prompts=config.eval_prompts, temperature=config.temperature,
                        max_new_tokens=config.max_completion_length)
    summary = {"reward_source": config.reward if isinstance(config.reward, str) else json.dumps(config.reward),
               "episodes": trainer.state.global_step * config.batch_size}
    return finish(trainer, callback, stage, stage, config, tokenizer, events, output_dir, summary, evaluate)
