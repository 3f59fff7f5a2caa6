"""Stage 3's reward as a weighted sum of terms: the reward model, built-in verifiers, a user's function.

The `reward` field (core/config.py, `parse_reward`) is resolved once into a `Reward`, the one callable that
PPO, GRPO and RLOO call the same way: `reward(answers)` -> `RewardScores`, the weighted total per answer
and each term's own values, logged as `reward/<name>` beside the total.

Each term maps a batch of `Answers` to one float per answer:

    rm        the reward model's score at the answer's last token (`RewardModelTerm`; an ensemble's aggregate)
    gold      the demo's simulated labeler (cheating on the proxy: demo prompts only)
    exact     1 if the answer's final answer equals the row's `column` (default `answer`), else 0
    numeric   1 if the answer's last number is within `tolerance` of the number in `column`
    math      1 if math-verify finds the answer equal to `column` (LaTeX, fractions, sets ...)
    regex     1 if `pattern` matches somewhere in the answer
    choice    1 if the first of `options` (A|B|C|D) named in the answer is the row's `column`
    contains  1 if the answer contains `text` (or the row's `column`)
    length    answer tokens beyond `target` (weight -0.05 by default: a penalty per extra token)
    eos       1 if the answer ended with the EOS token, 0 if it was cut at the length limit
    reasoning_gym  a reasoning-gym set's own `score_answer` (1 right, partial credit where the set gives it)
              on the answer inside <answer>...</answer>, else its final answer; `dataset` (default: each
              row's metadata names its set; prompts from `reasoning-gym:NAME`, core/data/task_sets.py)
    python    your function, `python:PATH:FUNCTION`

A final answer is the text after the last `####` (GSM8K) or "answer is" when there is one, else the
whole answer; stripped of spaces and a final full stop. A reference column is read the same way.

Your own function is loaded from a file on this machine and called once per batch, TRL's way:

    def score(prompts: list[str], completions: list[str], answer: list[str], **columns) -> list[float]

`prompts` are the prompts as the user wrote them, `completions` the sampled answers, and every other
parameter a column of the prompt rows (one value per answer); a `**kwargs` parameter receives all of
them. A column a function names that the prompts lack is an error before the run starts. A term that
raises, returns the wrong count, a NaN or nothing, or runs past its `timeout` stops the run with a
`RewardTermError` naming the term and one offending answer.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.config import RewardTerm, parse_reward
from core.data import demo, task_sets
from core.models.ensemble import RewardEnsemble, disagreement
from core.models.generate import Samples
from core.stages import microbatch

NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
FINAL_MARKERS = re.compile(r"####|answer is:?", re.IGNORECASE)


class RewardTermError(RuntimeError):
    """A reward term failed while a run was scoring answers (raised, NaN, wrong count, too slow)."""


@dataclass
class Answers:
    """A batch of sampled answers with what any term may need. `columns`: each answer's prompt row's
    other columns (`answer`, `solution`, ...); `lengths`: answer tokens; `finished`: ended with EOS;
    `sequences`: prompt + answer token ids as the policy sampled them (the reward model scores these)."""

    prompts: list[str]
    completions: list[str]
    columns: list[dict] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    sequences: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.completions)

    @classmethod
    def of_samples(cls, samples: Samples, prompts: list[str] | None = None,
                   columns: list[dict] | None = None) -> Answers:
        """Sampled answers (`core.models.generate.sample`) as the terms read them: texts, lengths, EOS, and the
        token ids the policy sampled (prompt without its left padding, answer up to and including its EOS)."""
        B = samples.response_ids.shape[0]
        lengths = [int(n) for n in samples.response_mask.sum(1).tolist()]
        # One copy to the host, not two per row (a GPU sync each): this runs every PPO step.
        prompt_ids, prompt_mask = samples.prompt_ids.cpu(), samples.prompt_mask.bool().cpu()
        response_ids = samples.response_ids.cpu()
        sequences = [prompt_ids[i][prompt_mask[i]].tolist() + response_ids[i, : lengths[i]].tolist()
                     for i in range(B)]
        return cls(prompts if prompts is not None else [""] * B, list(samples.texts),
                   columns if columns is not None else [{} for _ in range(B)], samples.finished.tolist(), lengths,
                   sequences)


@dataclass
class RewardScores:
    """total[i] = sum over terms of weight * value[i]; `terms`: each term's unweighted values;
    `rm_members`: with an `rm` term, each reward-model ensemble member's score (members, B)."""

    total: torch.Tensor  # (B,) float32
    terms: dict[str, torch.Tensor]
    rm_members: torch.Tensor | None = None

    def metrics(self) -> dict[str, float]:
        """`reward_metrics` of this batch."""
        return reward_metrics(self.terms, self.rm_members)


def reward_metrics(terms: dict[str, torch.Tensor], rm_members: torch.Tensor | None) -> dict[str, float]:
    """The batch means under the stable metric names: `reward/<term>` for each term and, for an ensemble of
    several reward models, their disagreement `ensemble_std` (the members' std, averaged over answers)."""
    metrics = {f"reward/{name}": float(values.mean()) for name, values in terms.items()}
    if rm_members is not None and len(rm_members) > 1:
        metrics["ensemble_std"] = float(disagreement(rm_members).mean())
    return metrics


def final_answer(text: str) -> str:
    """The final answer of a text: after the last `####` or "answer is", else all of it; without
    surrounding spaces, a final full stop, or repeated spaces."""
    parts = FINAL_MARKERS.split(text)
    answer = " ".join(parts[-1].split())
    return answer[:-1].rstrip() if answer.endswith(".") else answer


def last_number(text: str) -> float | None:
    found = NUMBER_RE.findall(text)
    return float(found[-1].replace(",", "")) if found else None


# ---------------------------------------------------------------------------------------------
# Built-in terms: each (term, answers) -> one value per answer
# ---------------------------------------------------------------------------------------------


def _reference(term: RewardTerm, answers: Answers) -> list[str]:
    return [str(row[term.options["column"]]) for row in answers.columns]


def exact_term(term: RewardTerm, answers: Answers) -> list[float]:
    return [float(final_answer(c) == final_answer(r)) for c, r in zip(answers.completions, _reference(term, answers))]


def numeric_term(term: RewardTerm, answers: Answers) -> list[float]:
    scores = []
    for completion, reference in zip(answers.completions, _reference(term, answers)):
        given, expected = last_number(final_answer(completion)), last_number(final_answer(reference))
        scores.append(float(given is not None and expected is not None
                            and abs(given - expected) <= term.options["tolerance"]))
    return scores


def math_term(term: RewardTerm, answers: Answers) -> list[float]:
    from math_verify import parse, verify

    # math-verify's own timeouts use signals, which work only in the main thread; a term runs in one.
    return [float(verify(parse(reference, parsing_timeout=None), parse(completion, parsing_timeout=None),
                         timeout_seconds=None))
            for completion, reference in zip(answers.completions, _reference(term, answers))]


def regex_term(term: RewardTerm, answers: Answers) -> list[float]:
    pattern = re.compile(term.options["pattern"])
    return [float(pattern.search(c) is not None) for c in answers.completions]


def choice_term(term: RewardTerm, answers: Answers) -> list[float]:
    options = [o.strip() for o in term.options["options"].split("|") if o.strip()]
    named = re.compile(r"(?<!\w)(" + "|".join(map(re.escape, options)) + r")(?!\w)")
    scores = []
    for completion, reference in zip(answers.completions, _reference(term, answers)):
        first = named.search(completion)
        scores.append(float(first is not None and first[1] == reference.strip()))
    return scores


def contains_term(term: RewardTerm, answers: Answers) -> list[float]:
    texts = [term.options["text"]] * len(answers) if term.options["text"] else _reference(term, answers)
    return [float(t in c) for c, t in zip(answers.completions, texts)]


def length_term(term: RewardTerm, answers: Answers) -> list[float]:
    return [float(max(0, n - term.options["target"])) for n in answers.lengths]


def eos_term(term: RewardTerm, answers: Answers) -> list[float]:
    return [float(f) for f in answers.finished]


def gold_term(term: RewardTerm, answers: Answers) -> list[float]:
    return [demo.gold_score(p, c) for p, c in zip(answers.prompts, answers.completions)]


BUILT_IN: dict[str, Callable[[RewardTerm, Answers], list[float]]] = {
    "gold": gold_term, "exact": exact_term, "numeric": numeric_term, "math": math_term, "regex": regex_term,
    "choice": choice_term, "contains": contains_term, "length": length_term, "eos": eos_term,
}


# ---------------------------------------------------------------------------------------------
# The reward model and a user's function
# ---------------------------------------------------------------------------------------------


class RewardModelTerm:
    """The `rm` term: a reward model's score of each answer at its last token, on the very token ids the
    policy sampled (`Answers.sequences`). The reward model is a `RewardEnsemble` (core/models/ensemble.py; one
    RM is an ensemble of one): every member scores, and the term's value is their `reward_aggregate`."""

    def __init__(self, reward_model: RewardEnsemble, pad_token_id: int, device):
        self.reward_model, self.pad_token_id, self.device = reward_model, pad_token_id, device
        self.call_tokens = microbatch.scoring_call_tokens(device)  # answers cut by length (core/stages/microbatch.py)

    @torch.no_grad()
    def scores(self, answers: Answers) -> tuple[torch.Tensor, torch.Tensor]:
        """(the aggregate reward (B,), each member's score (members, B))."""
        from core.stages.reward import score_sequences

        if answers.sequences is None:
            raise ValueError("the rm term scores token ids: the caller must fill Answers.sequences")
        # Every member in one pass over the answers (an ensemble of heads runs its backbone once): scores read
        # at each answer's last token, (answers, members), turned to (members, answers).
        members = score_sequences(self.reward_model, answers.sequences, self.pad_token_id, self.device,
                                  scorer=lambda ids, mask: self.reward_model.member_scores(ids, mask).permute(1, 2, 0),
                                  call_tokens=self.call_tokens).T
        return self.reward_model.aggregate(members), members

    def __call__(self, term: RewardTerm, answers: Answers) -> list[float]:
        return self.scores(answers)[0].tolist()


class ReasoningGymTerm:
    """The `reasoning_gym` term: each answer scored by its prompt's reasoning-gym set (`dataset`, else the
    row's `metadata.source_dataset`) with that set's own `score_answer`, which reads the row's `answer` and
    `metadata` (kept by `core.data.task_sets` on import)."""

    columns = ("metadata",)

    def __init__(self, term: RewardTerm):
        self.dataset = term.options["dataset"]
        if self.dataset:
            task_sets.check_name(self.dataset)
        self.score_fns: dict[str, Callable] = {}

    def dataset_of(self, row: dict) -> str | None:
        metadata = row.get("metadata")
        return self.dataset or (metadata.get("source_dataset") if isinstance(metadata, dict) else None)

    def check_rows(self, term: RewardTerm, prompts: list, columns: list[dict]) -> None:
        """Every row names a known set (or the term does), before the run."""
        for prompt, row in zip(prompts, columns):
            if not self.dataset_of(row):
                raise ValueError(f"reward term {term.name}: the prompt {str(prompt)[:80]!r} names no reasoning-gym "
                                 "set (its metadata has no source_dataset): give dataset=NAME, or import the "
                                 "prompts from reasoning-gym:NAME")
        for name in sorted({self.dataset_of(row) for row in columns}):
            task_sets.check_name(name)

    def __call__(self, term: RewardTerm, answers: Answers) -> list[float]:
        scores = []
        for prompt, completion, row in zip(answers.prompts, answers.completions, answers.columns):
            name = self.dataset_of(row)
            if name not in self.score_fns:
                self.score_fns[name] = task_sets.scorer(name)
            tagged = task_sets.extract_answer(completion)
            question = prompt if isinstance(prompt, str) else prompt[-1]["content"]
            entry = {"question": question, "answer": row.get("answer"), "metadata": row.get("metadata") or {}}
            try:
                scores.append(float(self.score_fns[name](tagged if tagged is not None else final_answer(completion),
                                                         entry)))
            except Exception:  # some sets' parsers raise on a malformed answer: it is not a right one
                scores.append(0.0)
        return scores


def load_function(term: RewardTerm) -> Callable:
    """A user's reward function from a file on this machine (never a module name: nothing is looked up on
    a path the user did not give). Executes the file, as importing it would."""
    path = Path(term.options["path"]).expanduser().resolve()
    module_name = f"rlhf_reward_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"reward term python: {path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's file: any error it raises is theirs to see
        raise ValueError(f"reward term {term.name}: {path} failed to load: {type(exc).__name__}: {exc}") from None
    function = getattr(module, term.options["function"], None)
    if not callable(function):
        raise ValueError(f"reward term python: {path} has no function {term.options['function']!r}")
    sys.modules.pop(module_name, None)
    return function


def function_columns(term: RewardTerm, function: Callable) -> tuple[set[str], bool]:
    """(columns the function requires, whether it takes **kwargs); a ValueError when it cannot be called
    as `function(prompts=..., completions=..., **columns)`."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        raise ValueError(f"reward term {term.name}: cannot read the signature of {term.options['function']}") from None
    names = {p.name for p in parameters}
    takes_all = any(p.kind is p.VAR_KEYWORD for p in parameters)
    if not ({"prompts", "completions"} <= names or takes_all):
        raise ValueError(f"reward term {term.name}: {term.options['function']} must take prompts and completions "
                         "(def score(prompts, completions, **columns) -> list[float])")
    positional_only = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL)]
    if positional_only:
        raise ValueError(f"reward term {term.name}: {term.options['function']} is called with keyword arguments; "
                         f"{', '.join(positional_only)} cannot be passed by name")
    required = {p.name for p in parameters if p.default is p.empty and p.kind is not p.VAR_KEYWORD}
    return required - {"prompts", "completions"}, takes_all


class FunctionTerm:
    """A user's function as a term: called once per batch with the prompts, the answers and the rows'
    columns as keyword lists."""

    def __init__(self, term: RewardTerm):
        self.function = load_function(term)
        self.columns, self.takes_all = function_columns(term, self.function)

    def __call__(self, term: RewardTerm, answers: Answers) -> list[float]:
        keys = set().union(*answers.columns) if self.takes_all and answers.columns else self.columns
        columns = {key: [row.get(key) for row in answers.columns] for key in keys}
        return self.function(prompts=list(answers.prompts), completions=list(answers.completions), **columns)


# ---------------------------------------------------------------------------------------------
# The combined reward
# ---------------------------------------------------------------------------------------------


class Reward:
    """The reward of a stage-3 run: its terms, resolved once from the config, called once per batch."""

    def __init__(self, terms: list[RewardTerm], scorers: dict[str, Callable[[RewardTerm, Answers], list[float]]]):
        self.terms, self.scorers = terms, scorers

    @property
    def uses_reward_model(self) -> bool:
        return any(t.kind == "rm" for t in self.terms)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.terms]

    def term_scored_by(self, reward_model) -> str | None:
        """The name of the `rm` term that `reward_model` scores (a `RewardModelTerm` over that very model), if
        any: a caller that also wants the RM's score reads it from that term instead of a second forward."""
        return next((t.name for t in self.terms if t.kind == "rm"
                     and getattr(self.scorers.get(t.name), "reward_model", None) is reward_model), None)

    def with_reward_model(self, scorer: Callable[[RewardTerm, Answers], list[float]]) -> Reward:
        """The same reward with the `rm` term scored by `scorer` (a `RewardModelTerm`)."""
        return Reward(self.terms, {**self.scorers, **{t.name: scorer for t in self.terms if t.kind == "rm"}})

    def required_columns(self) -> dict[str, set[str]]:
        """term name -> the prompt-row columns it needs."""
        needs: dict[str, set[str]] = {}
        for term in self.terms:
            columns = set(getattr(self.scorers.get(term.name), "columns", ()))
            if term.column():
                columns.add(term.column())
            if columns:
                needs[term.name] = columns
        return needs

    def check_rows(self, prompts: list[str], columns: list[dict]) -> None:
        """Before a run: every prompt row has every column a term needs (else the term, the column and a
        prompt lacking it), and `gold` only on the demo's prompts."""
        for name, needed in self.required_columns().items():
            for column in sorted(needed):
                lacking = [p for p, row in zip(prompts, columns) if row.get(column) is None]
                if lacking:
                    raise ValueError(f"reward term {name} reads the column {column!r}, which {len(lacking)} of "
                                     f"{len(prompts)} prompts lack (e.g. {lacking[0][:80]!r}): add it to the "
                                     "prompts file or pick another term")
        for term in self.terms:
            check = getattr(self.scorers.get(term.name), "check_rows", None)
            if check is not None:
                check(term, prompts, columns)
        if any(t.kind == "gold" for t in self.terms) and not demo.is_demo_task(prompts):
            raise ValueError("reward term 'gold' is the demo's simulated labeler: it scores the demo's prompts only; "
                             "use rm or a verifier on your own prompts")

    def __call__(self, answers: Answers) -> RewardScores:
        values, rm_members = {}, None
        for term in self.terms:
            scorer = self.scorers[term.name]
            if isinstance(scorer, RewardModelTerm):  # the aggregate is the term's value; the members are kept
                aggregate, rm_members = scorer.scores(answers)
                raw = aggregate.tolist()
            elif isinstance(scorer, FunctionTerm):
                raw = _call_with_timeout(term, scorer, answers)
            else:
                raw = scorer(term, answers)
            values[term.name] = _checked(term, raw, answers)
        total = torch.zeros(len(answers))
        for term in self.terms:
            total += term.weight * values[term.name]
        return RewardScores(total, values, rm_members)


def _offending(answers: Answers, i: int) -> str:
    return f"the answer {answers.completions[i][:120]!r} to {answers.prompts[i][:80]!r}"


def _call_with_timeout(term: RewardTerm, scorer: FunctionTerm, answers: Answers):
    """The user's function in a daemon thread, waited on for its `timeout`: a hung function cannot be
    killed from Python, but the run stops with a message, and the daemon thread does not keep the process alive."""
    result: dict = {}

    def call() -> None:
        try:
            result["value"] = scorer(term, answers)
        except BaseException as exc:  # handed to the run's thread, which names the term
            result["error"] = exc

    thread = threading.Thread(target=call, name=f"reward-{term.name}", daemon=True)
    thread.start()
    thread.join(term.options["timeout"])
    if thread.is_alive():
        raise RewardTermError(f"reward term {term.name} did not return within {term.options['timeout']:g} s on a "
                              f"batch of {len(answers)} answers (the first: {_offending(answers, 0)}); raise its "
                              "timeout=... or make it faster")
    if "error" in result:
        exc = result["error"]
        raise RewardTermError(f"reward term {term.name} raised {type(exc).__name__}: {exc} on a batch of "
                              f"{len(answers)} answers (the first: {_offending(answers, 0)})") from exc
    return result["value"]


def _checked(term: RewardTerm, raw, answers: Answers) -> torch.Tensor:
    """One finite float per answer, or a RewardTermError naming the term and an offending answer."""
    try:
        values = [float("nan") if v is None else float(v) for v in raw]
    except (TypeError, ValueError) as exc:
        raise RewardTermError(f"reward term {term.name} must return a list of numbers, one per answer: {exc}") from None
    if len(values) != len(answers):
        raise RewardTermError(f"reward term {term.name} returned {len(values)} values for {len(answers)} answers "
                              f"(the first: {_offending(answers, 0)})")
    bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
    if bad is not None:
        raise RewardTermError(f"reward term {term.name} returned {values[bad]} for {_offending(answers, bad)}")
    return torch.tensor(values, dtype=torch.float32)


def resolve_reward(spec: str | list) -> Reward:
    """The `reward` field as a `Reward`, user files loaded and checked. The `rm` term has no model yet:
    the stage adds it (`with_reward_model`) once its models are loaded."""
    terms = parse_reward(spec)
    scorers: dict[str, Callable] = {}
    for term in terms:
        if term.kind == "python":
            scorers[term.name] = FunctionTerm(term)
        elif term.kind == "reasoning_gym":
            scorers[term.name] = ReasoningGymTerm(term)
        elif term.kind in BUILT_IN:
            scorers[term.name] = BUILT_IN[term.kind]
    return Reward(terms, scorers)


__all__ = ["Answers", "Reward", "RewardModelTerm", "RewardScores", "RewardTermError", "final_answer", "resolve_reward",
           "reward_metrics"]
