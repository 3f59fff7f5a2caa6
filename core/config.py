"""One dataclass config per stage, with InstructGPT defaults and scaled-down demo presets.

Names follow TRL (`learning_rate`, `per_device_train_batch_size` → `batch_size`, `kl_coef`,
`cliprange`, `vf_coef`, `missing_eos_penalty`) so a TRL user feels at home. Every value is
checked before any work starts; a bad one raises ValueError naming the field.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# Metric sinks besides the store (core/stages/sinks.py); checked here, with the config that names them.
REPORT_TO = ("none", "tensorboard", "trackio")
INSTALL = "pip install 'rlhf-workbench[sinks]'"
# Set, these make trackio send metrics to a Space, a server or a bucket; the workbench logs locally only.
TRACKIO_REMOTE_ENV = ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "TRACKIO_DATASET_ID", "TRACKIO_BUCKET_ID")


def check_report_to(report_to: str) -> None:
    """A known sink whose package is installed and which stays on this machine; else a ValueError that
    says what to do. Called by config validation, before any work."""
    if report_to not in REPORT_TO:
        raise ValueError(f"report_to must be one of {', '.join(REPORT_TO)}, got {report_to!r}")
    if report_to == "none":
        return
    if importlib.util.find_spec(report_to) is None:
        raise ValueError(f"report_to={report_to} needs the {report_to} package, which is not installed: {INSTALL}")
    remote = [name for name in TRACKIO_REMOTE_ENV if os.environ.get(name)]
    if report_to == "trackio" and remote:
        raise ValueError(f"report_to=trackio writes a local database only, but {', '.join(remote)} would make "
                         "trackio send the metrics off this machine: unset it, or use report_to=tensorboard")


# The demo's share of SFT demonstrations (core/data/demo.py) that ramble after the answer: the room SFT leaves for RL. At 0.5 the SFT
# model is concise about half the time, so winning all of conciseness back is worth only ~0.15 of gold;
# at 0.75 it is worth ~0.2 and the RM gets more format pairs to learn from (docs/NOTES.md,
# "The demo task").
RAMBLE_RATE = 0.75


def option(default, help: str):
    """A config field with its help text as metadata (TRL's `field(metadata={"help": ...})`): the CLI's
    --help and the Train page read it from here."""
    return field(default=default, metadata={"help": help})


def field_help(cls: type) -> dict[str, str]:
    """Field name -> help text of a config class."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


class ConfigMixin:
    """Dict/YAML round-trip and validation shared by the stage configs."""

    # field name -> (low, high, low_inclusive): numeric bounds checked by `validate`.
    _bounds: typing.ClassVar[dict[str, tuple[float | None, float | None, bool]]] = {}
    _choices: typing.ClassVar[dict[str, tuple]] = {}
    # Keys older configs may still carry -> why they went (a clearer message than "unknown key").
    _removed: typing.ClassVar[dict[str, str]] = {}

    @classmethod
    def from_dict(cls, values: dict | None) -> "ConfigMixin":
        values = dict(values or {})
        names = {f.name for f in dataclasses.fields(cls)}
        for key in sorted(set(values) & set(cls._removed)):
            raise ValueError(f"{key}: {cls._removed[key]}")
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown config key(s) for {cls.__name__}: {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        coerced = {k: _coerce(k, v, hints[k]) for k, v in values.items()}
        config = cls(**coerced)
        config.validate()
        return config

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ConfigMixin":
        return cls.from_dict(read_yaml(path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes) -> "ConfigMixin":
        return type(self).from_dict({**self.to_dict(), **changes})

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            # NaN compares False with every bound, so it would pass the range checks below.
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value}")
        for name, (low, high, low_inclusive) in self._bounds.items():
            value = getattr(self, name)
            if value is None:
                continue
            if low is not None and (value < low if low_inclusive else value <= low):
                op = ">=" if low_inclusive else ">"
                raise ValueError(f"{name} must be {op} {low}, got {value}")
            if high is not None and value > high:
                raise ValueError(f"{name} must be <= {high}, got {value}")
        for name, allowed in self._choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}, got {getattr(self, name)!r}")


def read_yaml(path: str | Path) -> dict:
    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"could not read config {path}: {exc}") from exc
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"config {path} must be a mapping of field: value")
    return values


def _coerce(name: str, value, hint):
    """Accept YAML/form values of the right kind (an int for a float field); reject the rest."""
    args = typing.get_args(hint)  # (float, NoneType) for `float | None`
    if value is None:
        if type(None) in args:
            return None
        raise ValueError(f"{name} must not be empty")
    if isinstance(value, list) and list in args:  # `str | list`: a YAML list (the reward's terms)
        return value
    base = next(a for a in args if a is not type(None)) if args else hint
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads '1e-4' (no dot) as text; people write it as a number.
            try:
                return float(value)
            except ValueError:
                pass
    elif base is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ValueError(f"{name} must be of type {base.__name__}, got {type(value).__name__} {value!r}")


# ---------------------------------------------------------------------------------------------
# Stage 3's reward: a list of weighted terms (core/stages/reward_terms.py builds and calls them)
# ---------------------------------------------------------------------------------------------

# term -> its options and their defaults (None: required). A term's value per answer is documented in
# core/stages/reward_terms.py; `weight` (default 1, `length` -0.05) and `name` (default: the term, or the
# function's name) are every term's.
REWARD_TERMS: dict[str, dict[str, object]] = {
    "rm": {},  # the trained reward model (`reward_model`)
    "gold": {},  # the demo's simulated labeler: cheating on the proxy, demo prompts only
    "exact": {"column": "answer"},
    "numeric": {"column": "answer", "tolerance": 1e-6},
    "math": {"column": "answer"},
    "regex": {"pattern": None},
    "choice": {"column": "answer", "options": "A|B|C|D"},
    "contains": {"column": "", "text": ""},
    "length": {"target": None},
    "eos": {},
    "reasoning_gym": {"dataset": ""},  # a reasoning-gym set's own scorer ("": each row's metadata names its set)
    "python": {"path": None, "function": None, "timeout": 60.0},
}
DEFAULT_WEIGHTS = {"length": -0.05}  # a length term counts tokens beyond its target: a penalty by default
EXTRAS = {"math": "math_verify", "reasoning_gym": "reasoning_gym"}  # term -> the module it needs (`verifiers`)
VERIFIERS_INSTALL = "pip install 'rlhf-workbench[verifiers]'"
REWARD_HELP = ("a comma-separated list of terms, each with optional :key=value options and :weight=W: 'rm' (the "
               "reward model), exact, numeric (tolerance=), math, regex:pattern=, choice (options=A|B|C), contains "
               "(text= or column=), length:target=N (tokens beyond N, weight -0.05), eos, reasoning_gym (a "
               "reasoning-gym set's own scorer; dataset=NAME), python:PATH:FUNCTION; "
               "e.g. rm,length:target=24:weight=-0.05. 'gold': the demo's simulated labeler itself - CHEATING "
               "on the proxy, demo prompts only")


@dataclass(frozen=True)
class RewardTerm:
    """One parsed term of a reward: its kind (a key of REWARD_TERMS), weight, metric name (`reward/<name>`)
    and options (the kind's defaults filled in)."""

    kind: str
    weight: float
    name: str
    options: dict = field(hash=False)

    def column(self) -> str | None:
        """The prompt-row column this term reads, if any (checked against the prompts before a run)."""
        if self.kind == "contains" and self.options["text"]:
            return None
        return self.options.get("column") or None


def _split_terms(spec: str) -> list[str]:
    """Terms of a comma-separated spec; a piece that does not start with a term (a regex's `{1,3}`) belongs
    to the term before it. Only the space before a term's kind goes: the last option's value keeps its own
    (a pattern may end with a space)."""
    terms: list[str] = []
    for piece in spec.split(","):
        if terms and piece.split(":")[0].strip() not in REWARD_TERMS:
            terms[-1] += "," + piece
        else:
            terms.append(piece.lstrip())
    return [t for t in terms if t.strip()]


def _term_mapping(text: str) -> dict:
    """'kind:key=value:...' (python: 'python:PATH:FUNCTION:...') as a mapping; a segment without '=' belongs
    to the value before it (a regex's `(?:`). Names are trimmed (the kind, keys, the file and function); a
    value is kept as written, so `regex:pattern= x` matches " x"."""
    kind, *rest = text.split(":")
    values: dict[str, str] = {"term": kind.strip()}
    if values["term"] == "python":
        if len(rest) < 2 or "=" in rest[0] or "=" in rest[1]:
            raise ValueError(f"reward term {text!r}: write your own function as python:PATH:FUNCTION")
        values["path"], values["function"], rest = rest[0].strip(), rest[1].strip(), rest[2:]
    last = None
    for segment in rest:
        if "=" in segment and segment.split("=", 1)[0].strip().isidentifier():
            key, value = segment.split("=", 1)
            last = key.strip()
            values[last] = value
        elif last is not None:
            values[last] += ":" + segment
        else:
            raise ValueError(f"reward term {text!r}: options are key=value, got {segment!r}")
    return values


def _option_value(term: str, key: str, value, default):
    """A term's option coerced to its default's type (a number where the default is one)."""
    if isinstance(default, (int, float)) or (default is None and key == "target"):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"reward term {term}: {key} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"reward term {term}: {key} must be a finite number, got {value!r}")
        return number
    return str(value)


def parse_reward(spec: str | list) -> list[RewardTerm]:
    """The terms of a `reward` field: a comma-separated string (the CLI's `--set reward=...`) or a YAML list
    of terms, each a string or a mapping {term: length, target: 24, weight: -0.05}. Every error a user can
    make in it is a ValueError here: an unknown term or option, a NaN weight, a regex that does not compile,
    a missing file, a missing extra."""
    if isinstance(spec, str):
        items: list = _split_terms(spec)
    elif isinstance(spec, list):
        items = spec
    else:
        raise ValueError(f"reward must be a list of terms, got {type(spec).__name__}")
    if not items:
        raise ValueError("reward is empty: name at least one term (rm, a verifier, python:PATH:FUNCTION)")
    terms, names = [], set()
    for item in items:
        values = _term_mapping(item) if isinstance(item, str) else dict(item) if isinstance(item, dict) else None
        if values is None or "term" not in values:
            raise ValueError(f"reward term {item!r} must be a string or a mapping with a 'term' key")
        kind = str(values.pop("term")).strip()
        if kind not in REWARD_TERMS:
            raise ValueError(f"unknown reward term {kind!r}: choose among {', '.join(REWARD_TERMS)}")
        weight = _option_value(kind, "weight", values.pop("weight", DEFAULT_WEIGHTS.get(kind, 1.0)), 1.0)
        name = str(values.pop("name", "")).strip()
        defaults = REWARD_TERMS[kind]
        unknown = sorted(set(values) - set(defaults))
        if unknown:
            known = ", ".join([*defaults, "weight", "name"])
            raise ValueError(f"reward term {kind}: unknown option(s) {', '.join(unknown)} (it takes {known})")
        options = {key: _option_value(kind, key, values[key], default) if key in values else default
                   for key, default in defaults.items()}
        missing = [key for key, value in options.items() if value is None]
        if missing:
            raise ValueError(f"reward term {kind} needs {', '.join(f'{k}=...' for k in missing)}")
        _check_term(kind, options)
        name = name or (options["function"] if kind == "python" else kind)
        if name in names:
            raise ValueError(f"two reward terms are named {name!r}: give one of them name=...")
        names.add(name)
        terms.append(RewardTerm(kind, weight, name, options))
    return terms


def _check_term(kind: str, options: dict) -> None:
    if kind == "regex":
        try:
            re.compile(options["pattern"])
        except re.error as exc:
            raise ValueError(f"reward term regex: pattern {options['pattern']!r} does not compile: {exc}") from None
    if kind == "python" and not Path(options["path"]).expanduser().is_file():
        raise ValueError(f"reward term python: no file {options['path']!r} on this machine")
    if kind == "python" and options["timeout"] <= 0:
        raise ValueError("reward term python: timeout must be > 0 seconds")
    if kind == "length" and options["target"] < 0:
        raise ValueError("reward term length: target must be >= 0 tokens")
    if kind == "choice" and len([o for o in options["options"].split("|") if o.strip()]) < 2:
        raise ValueError("reward term choice: options needs at least two labels, e.g. options=A|B|C|D")
    if kind == "contains" and not (options["text"] or options["column"]):
        raise ValueError("reward term contains: give text=... or column=...")
    if kind in EXTRAS and importlib.util.find_spec(EXTRAS[kind]) is None:
        raise ValueError(f"reward term {kind} needs the {EXTRAS[kind].replace('_', '-')} package, which is not "
                         f"installed: {VERIFIERS_INSTALL}")


def uses_reward_model(spec: str | list) -> bool:
    return any(term.kind == "rm" for term in parse_reward(spec))


_POS = (0, None, False)  # > 0
_NONNEG = (0, None, True)  # >= 0
_UNIT = (0, 1, True)  # in [0, 1]
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")  # what each means: core.models.loading.pick_device
# How an ensemble of reward models becomes one reward (core/models/ensemble.py; Coste et al. 2023): the members'
# mean, their minimum, or the mean minus uncertainty_coef x their standard deviation (the conservative reward).
REWARD_AGGREGATES = ("mean", "min", "mean_minus_std")
MAX_ENSEMBLE = 16


def resolved_precision(precision: str, kind: str, gpu_bf16: bool) -> str:
    """'fp32' or 'bf16' for a `precision` field on a device kind ('cpu', 'cuda'): 'auto' is bf16 on a GPU that
    has it (`gpu_bf16`), else fp32. One rule for the stages (`pick_device`) and the memory planner."""
    if precision != "auto":
        return precision
    return "bf16" if kind == "cuda" and gpu_bf16 else "fp32"


@dataclass
class NetworkConfig(ConfigMixin):
    """Fields of every stage that trains our own loop's networks: LoRA through PEFT, and gradient
    checkpointing. (Dataclass inheritance puts them first; the Train page shows them in their own group.)"""

    lora_r: int = option(0, "LoRA rank (PEFT); 0 trains every weight")
    lora_alpha: int = option(16, "LoRA scale numerator: updates are scaled by lora_alpha / lora_r")
    lora_dropout: float = option(0.05, "dropout on the LoRA path")
    lora_target_modules: str = option("all-linear", "comma-separated module names to adapt, or 'all-linear'")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass: less memory, more time")
    report_to: str = option("none", "metrics also to 'tensorboard' (DATA/tensorboard/<run>) or 'trackio' (its local "
                                    "database), besides the store; needs pip install 'rlhf-workbench[sinks]'")
    precision: str = option("auto", "'auto' (bf16 autocast on a GPU with bf16, else fp32), 'fp32', or 'bf16': "
                                    "matmuls in bf16, weights fp32; on a CPU with bf16 instructions it pays "
                                    "for wide layers only (docs)")

    _bounds = {"lora_r": (0, 4096, True), "lora_alpha": (1, None, True), "lora_dropout": (0, 0.9, True)}
    _choices = {"precision": PRECISIONS}

    def validate(self) -> None:
        super().validate()
        check_report_to(self.report_to)  # a known sink, installed, and local

    @property
    def lora(self) -> bool:
        return self.lora_r > 0


@dataclass
class SFTConfig(NetworkConfig):
    """Stage 1: supervised fine-tuning on demonstrations (loss on response tokens only)."""

    model: str = option("bundled", "base: 'bundled', a local HF directory, or a hub id")
    data: str = option("demo", "'demo', 'store' (the workbench database) or a JSONL/CSV path (prompt/completion)")
    epochs: int = option(16, "InstructGPT: 16 epochs, best checkpoint by validation score")
    learning_rate: float = option(9.65e-6, "peak learning rate (AdamW)")
    warmup_ratio: float = option(0.05, "share of steps with linear warmup, then cosine decay to 0")
    batch_size: int = option(32, "demonstrations per optimisation step")
    dropout: float = option(0.2, "residual/attention dropout (InstructGPT: 0.2)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_length: int = option(128, "prompt + response tokens")
    group_by_length: bool = option(False, "batch demonstrations of similar length together: less padding, "
                                          "~1.45x the tokens/s on the demo, but a worse fit there (docs)")
    eval_prompts: int = option(200, "demo data only: held-out prompts scored by the demo labeler each epoch (0: skip)")
    eval_temperature: float = option(1.0, "sampling temperature of the per-epoch gold evaluation")
    n_demonstrations: int = option(2000, "demo data only: demonstrations to generate")
    ramble_rate: float = option(RAMBLE_RATE, "demo data only: share of demonstrations that ramble")
    seed: int = option(0, "random seed (data order, sampling)")
    device: str = option("auto", "'auto' (CUDA when present), 'cpu' or 'cuda'")

    _bounds = {
        **NetworkConfig._bounds,
        "epochs": (1, 1000, True), "learning_rate": _POS, "warmup_ratio": _UNIT, "batch_size": (1, None, True),
        "dropout": (0, 0.9, True), "weight_decay": _NONNEG, "max_length": (8, None, True),
        "eval_prompts": _NONNEG, "eval_temperature": _NONNEG, "n_demonstrations": (1, None, True),
        "ramble_rate": _UNIT,
    }
    _choices = {**NetworkConfig._choices, "device": DEVICES}


@dataclass
class RewardConfig(NetworkConfig):
    """Stage 2: a reward model trained on K-wise rankings, all C(K,2) pairs of a prompt together."""

    sft_model: str = option("", "the SFT checkpoint the RM starts from")
    data: str = option("demo", "'demo' (sample K answers, the labeler ranks them), 'store' or a rankings JSONL/CSV")
    epochs: int = option(1, "InstructGPT: one epoch; more overfits")
    learning_rate: float = option(9e-6, "peak learning rate (AdamW)")
    warmup_ratio: float = option(0.05, "share of steps with linear warmup, then cosine decay to 0")
    batch_size: int = option(8, "prompts per step (each with its K answers)")
    k: int = option(4, "demo only: answers sampled per prompt (InstructGPT: 4..9)")
    n_prompts: int = option(1000, "demo only: prompts to rank")
    labeler_temperature: float = option(0.0, "demo only: Bradley-Terry noise of the simulated labeler")
    sample_temperature: float = option(1.0, "demo only: temperature of the answers to rank")
    max_length: int = option(128, "prompt + response tokens")
    heldout_prompts: int = option(200, "demo only: held-out rankings for pairwise accuracy")
    ensemble: int = option(1, "train this many reward models (1-16), each with its own seed (head and data order), "
                           "saved as one ensemble directory that every stage loads; PPO, GRPO, RLOO and "
                           "best-of-n then score with reward_aggregate")
    ensemble_bootstrap: bool = option(False, "ensemble: members after the first train on a bootstrap resample of "
                                      "the rankings (drawn with replacement, as many as there are), so they "
                                      "disagree where the data is thin; the first trains on all, as a single RM")
    ensemble_heads: bool = option(False, "ensemble: members after the first are score heads on the first "
                                  "member's backbone (frozen), each fitted on a bootstrap resample of the "
                                  "rankings: one network's memory and one forward to score, at the cost of "
                                  "members that share every feature")
    one_ranking_per_item: bool = option(False, "store/file data: train on the first ranking of each prompt and "
                                        "answer set only (several labelers ranked the same answers), not on all")
    heldout: str = option("auto", "held-out rankings: 'auto' (demo data: the noise-free labeler on the demo's "
                          "held-out prompts; other data: 10% of it) or 'demo' (always the demo's, e.g. demo "
                          "rankings imported into the store) or 'none' (train on every ranking; the caller "
                          "measures, as the rounds run does on the previous policy's answers)")
    seed: int = option(0, "random seed (data order, sampling, held-out split)")
    device: str = option("auto", "'auto' (CUDA when present), 'cpu' or 'cuda'")

    _bounds = {
        **NetworkConfig._bounds,
        "epochs": (1, 1000, True), "learning_rate": _POS, "warmup_ratio": _UNIT, "batch_size": (1, None, True),
        "k": (2, 9, True), "n_prompts": (1, None, True), "labeler_temperature": _NONNEG,
        "sample_temperature": _POS, "max_length": (8, None, True), "heldout_prompts": _NONNEG,
        "ensemble": (1, MAX_ENSEMBLE, True),
    }
    _choices = {**NetworkConfig._choices, "device": DEVICES, "heldout": ("auto", "demo", "none")}

    def validate(self) -> None:
        super().validate()
        if self.ensemble_heads and self.ensemble < 2:
            raise ValueError("ensemble_heads makes the members after the first score heads: set ensemble to 2 or more")


@dataclass
class ScoredConfig(NetworkConfig):
    """Fields of every stage that scores sampled answers with a reward model, which may be an ensemble."""

    reward_aggregate: str = option("mean", "an ensemble reward model's reward: the members' 'mean', their 'min', "
                                           "or 'mean_minus_std' (mean - uncertainty_coef x std: conservative "
                                           "where the members disagree); one RM scores as itself")
    uncertainty_coef: float = option(1.0, "lambda of reward_aggregate 'mean_minus_std' (>= 0)")
    max_prompt_length: int = option(96, "prompt tokens a rollout keeps, in the chat format: a longer conversation "
                                        "keeps its most recent whole turns (the run log counts them); one whose "
                                        "last user turn alone is longer is refused")

    _bounds = {**NetworkConfig._bounds, "uncertainty_coef": _NONNEG, "max_prompt_length": (8, None, True)}
    _choices = {**NetworkConfig._choices, "reward_aggregate": REWARD_AGGREGATES}

    def optional_models(self) -> tuple[str, ...]:
        """Model fields this config does not use: the RM, when no term of the subclass's `reward` is the RM."""
        return () if uses_reward_model(self.reward) else ("reward_model",)


@dataclass
class PPOConfig(ScoredConfig):
    """Stage 3: PPO with a per-token KL penalty (k1, in the reward) to the SFT policy and a pretraining (ptx) term."""

    sft_model: str = option("", "policy and frozen reference_policy start here")
    policy_init: str = option("", "start the policy here instead of sft_model, which stays the reference_policy "
                              "(a later round of iterated RLHF goes on from the last round's policy); empty: sft_model")
    reward_model: str = option("", "reward model (reward: rm); the value model starts here too, or at sft_model "
                                   "when no term is the reward model")
    reward: str | list = option("rm", REWARD_HELP)
    prompts: str = option("demo", "'demo', 'store', a JSONL/CSV path with a \"prompt\" column, or a reasoning-gym set "
                                  "reasoning-gym:NAME[:size=N][:seed=S] (prompts with answers)")
    total_episodes: int = option(256_000, "InstructGPT: 256k episodes")
    batch_size: int = option(64, "episodes per PPO step (rollout batch)")
    num_minibatches: int = option(1, "minibatches per PPO epoch over the rollout batch")
    ppo_epochs: int = option(4, "passes over each rollout batch")
    learning_rate: float = option(9.65e-6, "AdamW learning rate, annealed linearly to 0")
    response_length: int = option(24, "max new tokens per answer")
    temperature: float = option(1.0, "rollout temperature")
    kl_coef: float = option(0.02, "beta: weight of the per-token KL penalty in the reward (InstructGPT: 0.02)")
    adaptive_kl: bool = option(False, "Ziegler et al. 2019: steer kl_coef toward target_kl")
    target_kl: float = option(6.0, "adaptive_kl only: the KL (nats per answer) to steer toward")
    kl_horizon: int = option(10_000, "adaptive_kl only: episodes over which kl_coef adapts")
    kl_loss_coef: float = option(0.0, "weight of the exact KL(pi || pi_ref), summed over the vocabulary at each "
                                 "answer token, added to the loss; it holds the distribution's tail, which the "
                                 "reward's sampled-token penalty barely prices. 0: the KL is in the reward only "
                                 "(InstructGPT)")
    ptx_coef: float = option(27.8, "gamma: weight of the pretraining LM loss (InstructGPT PPO-ptx); 0 gives plain PPO")
    ptx_data: str = option("demo", "'demo' corpus, or your own pretraining text: a .txt file (a document a line), the "
                           "'text' column of a JSONL/CSV/Parquet file or saved dataset, or a hub dataset id "
                           "(owner/name[:config][@split])")
    ptx_batch_size: int = option(16, "blocks of pretraining text per optimisation step")
    gamma: float = option(1.0, "GAE discount")
    lam: float = option(0.95, "GAE lambda")
    cliprange: float = option(0.2, "PPO ratio clip epsilon")
    cliprange_value: float = option(0.2, "value clip: how far a new value may move from the old one")
    vf_coef: float = option(0.1, "weight of the value loss")
    whiten_rewards: bool = option(False, "normalise per-token rewards over the batch (mean kept)")
    missing_eos_penalty: float | None = option(1.0, "subtracted from the RM score of answers that never stop")
    ema_decay: float | None = option(None, "InstructGPT kept an EMA of the policy (0.992); empty for none")
    save_every: int = option(50, "PPO steps between checkpoints")
    eval_every: int = option(0, "demo prompts only: PPO steps between held-out gold evaluations (0: only at the end)")
    eval_prompts: int = option(100, "demo prompts only: held-out prompts for the gold evaluations (0: skip them)")
    max_grad_norm: float = option(1.0, "global gradient-norm clip")
    seed: int = option(0, "random seed (prompt order, sampling)")
    device: str = option("auto", "'auto' (CUDA when present), 'cpu' or 'cuda'")

    _bounds = {
        **ScoredConfig._bounds,
        "total_episodes": (1, None, True), "batch_size": (1, None, True), "num_minibatches": (1, None, True),
        "ppo_epochs": (1, None, True), "learning_rate": _POS, "response_length": (1, 1024, True),
        "temperature": _POS, "kl_coef": _NONNEG, "kl_loss_coef": _NONNEG, "target_kl": _POS, "kl_horizon": (1, None, True),
        "ptx_coef": _NONNEG, "ptx_batch_size": (1, None, True), "gamma": _UNIT, "lam": _UNIT,
        "cliprange": _POS, "cliprange_value": _POS, "vf_coef": _NONNEG, "missing_eos_penalty": _NONNEG,
        "ema_decay": (0, 1, False), "save_every": (1, None, True), "eval_every": _NONNEG,
        "eval_prompts": _NONNEG, "max_grad_norm": _POS,
    }
    _choices = {**ScoredConfig._choices, "device": DEVICES}
    # k3 = (r - 1) - log r is an unbiased estimate of KL's *value*, but as a per-token reward its
    # score-function gradient is grad KL(pi||ref) - grad KL(ref||pi), close to 0 near the reference:
    # the penalty would barely pull the policy back (docs/NOTES.md, "KL estimators").
    _removed = {"kl_estimator": "PPO's KL penalty is k1 (log pi - log pi_ref) in the reward; k3 as a reward "
                                "has a biased gradient, so the option was removed: delete this key"}

    def validate(self) -> None:
        super().validate()
        parse_reward(self.reward)
        if self.lora and self.ema_decay is not None:
            raise ValueError("ema_decay is not supported with LoRA (lora_r > 0): an EMA would copy the whole "
                             "policy; leave ema_decay empty or train every weight")
        if self.batch_size % self.num_minibatches:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by num_minibatches ({self.num_minibatches})"
            )
        if self.lora and self.policy_init:
            raise ValueError("policy_init is not supported with LoRA (lora_r > 0): the adapter trains on the base "
                             "of sft_model; leave policy_init empty or train every weight")


DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
                  "apo_zero", "apo_down", "discopop", "sigmoid_norm")


@dataclass
class DPOConfig(NetworkConfig):
    """Stage 3, alternative: DPO (Rafailov et al. 2023) on preference pairs, no reward model and no sampling
    while training; run by TRL's DPOTrainer."""

    sft_model: str = option("", "the policy and the frozen reference start here")
    data: str = option("demo", "'demo' (K answers sampled from the SFT model, ranked by the simulated labeler, as "
                               "the RM stage does), 'store', or a rankings/pairs JSONL/CSV; every ranking gives "
                               "its C(K,2) (chosen, rejected) pairs")
    epochs: int = option(1, "passes over the pairs")
    max_steps: int = option(0, "stop after this many optimisation steps (0: run all epochs)")
    learning_rate: float = option(1e-6, "AdamW learning rate, linear decay to 0 (DPO paper: 1e-6)")
    warmup_ratio: float = option(0.1, "share of steps with linear warmup")
    batch_size: int = option(64, "pairs per optimisation step (DPO paper: 64)")
    beta: float = option(0.1, "KL strength: how far the policy may move from the SFT reference (DPO paper: 0.1)")
    loss_type: str = option("sigmoid", "TRL's loss: 'sigmoid' is DPO, 'ipo' IPO (beta is tau), 'hinge' SLiC, ...")
    label_smoothing: float = option(0.0, "'robust'/'exo_pair' only: assumed share of flipped labels")
    max_length: int = option(128, "prompt + answer tokens")
    k: int = option(4, "demo only: answers sampled per prompt")
    n_prompts: int = option(1000, "demo only: prompts to rank")
    sample_temperature: float = option(1.0, "demo only: temperature of the answers to rank")
    labeler_temperature: float = option(0.0, "demo only: Bradley-Terry noise of the simulated labeler")
    save_every: int = option(50, "optimisation steps between checkpoints")
    eval_prompts: int = option(100, "demo data only: held-out prompts for the final gold evaluation (0: skip)")
    eval_temperature: float = option(1.0, "sampling temperature of the final gold evaluation")
    seed: int = option(0, "random seed (pair order, sampling)")
    device: str = option("auto", "'auto' (CUDA when present), 'cpu' or 'cuda'")

    _bounds = {
        **NetworkConfig._bounds,
        "epochs": (1, 1000, True), "max_steps": _NONNEG, "learning_rate": _POS, "warmup_ratio": _UNIT,
        "batch_size": (1, None, True), "beta": _POS, "label_smoothing": (0, 0.5, True), "max_length": (8, None, True),
        "k": (2, 9, True), "n_prompts": (1, None, True), "sample_temperature": _POS, "labeler_temperature": _NONNEG,
        "save_every": (1, None, True), "eval_prompts": _NONNEG, "eval_temperature": _POS,
    }
    _choices = {**NetworkConfig._choices, "device": DEVICES, "loss_type": DPO_LOSS_TYPES}


@dataclass
class GroupRLConfig(ScoredConfig):
    """Fields GRPO and RLOO share: answers sampled in groups per prompt, rewarded by the RM, no value model."""

    sft_model: str = option("", "the policy and the frozen reference start here")
    reward_model: str = option("", "the trained reward model that scores answers (reward: rm)")
    reward: str | list = option("rm", REWARD_HELP)
    prompts: str = option("demo", "'demo', 'store', a JSONL/CSV path with a \"prompt\" column, or a reasoning-gym set "
                                  "reasoning-gym:NAME[:size=N][:seed=S] (prompts with answers)")
    total_episodes: int = option(256_000, "sampled answers in all (as PPO's episodes)")
    batch_size: int = option(64, "answers per optimisation step: batch_size / num_generations prompts")
    num_generations: int = option(4, "answers sampled per prompt, the group whose mean is the baseline (>= 2)")
    learning_rate: float = option(1e-6, "AdamW learning rate, linear decay to 0")
    max_completion_length: int = option(24, "max new tokens per answer")
    temperature: float = option(1.0, "sampling temperature (log-probs are of the tempered distribution)")
    epsilon: float = option(0.2, "ratio clip epsilon")
    num_iterations: int = option(1, "optimisation passes over each generated batch (mu)")
    missing_eos_penalty: float | None = option(1.0, "subtracted from the reward of answers that never stop (as PPO)")
    max_grad_norm: float = option(1.0, "global gradient-norm clip")
    save_every: int = option(50, "optimisation steps between checkpoints")
    eval_prompts: int = option(100, "demo prompts only: held-out prompts for the final gold evaluation (0: skip)")
    seed: int = option(0, "random seed (prompt order, sampling)")
    device: str = option("auto", "'auto' (CUDA when present), 'cpu' or 'cuda'")

    _bounds = {
        **ScoredConfig._bounds,
        "total_episodes": (1, None, True), "batch_size": (2, None, True), "num_generations": (2, None, True),
        "learning_rate": _POS, "max_completion_length": (1, 1024, True), "temperature": _POS, "beta": _NONNEG,
        "epsilon": _POS, "num_iterations": (1, None, True), "missing_eos_penalty": _NONNEG, "max_grad_norm": _POS,
        "save_every": (1, None, True), "eval_prompts": _NONNEG,
    }
    _choices = {**ScoredConfig._choices, "device": DEVICES}

    def validate(self) -> None:
        super().validate()
        parse_reward(self.reward)
        if self.batch_size % self.num_generations:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by num_generations "
                             f"({self.num_generations}): each prompt's group is sampled whole")


@dataclass
class GRPOConfig(GroupRLConfig):
    """Stage 3, alternative: GRPO (Shao et al. 2024): group-normalised advantages, KL as a k3 loss term;
    run by TRL's GRPOTrainer."""

    beta: float = option(0.04, "weight of the KL(pi || SFT) loss term, k3 per token (DeepSeekMath: 0.04)")
    loss_type: str = option("dapo", "TRL's token aggregation: 'grpo' (per answer, length-biased), 'dapo' (TRL's "
                                    "default), 'dr_grpo', 'bnpo'")
    scale_rewards: str = option("group", "divide advantages by the reward std of the 'group', the 'batch', or "
                                         "'none' (Dr. GRPO)")

    _choices = {**GroupRLConfig._choices, "loss_type": ("grpo", "dapo", "dr_grpo", "bnpo"),
                "scale_rewards": ("group", "batch", "none")}


@dataclass
class RLOOConfig(GroupRLConfig):
    """Stage 3, alternative: RLOO (Ahmadian et al. 2024): each answer's baseline is the mean reward of the
    other answers to its prompt; KL (k1, summed per answer) in the reward as PPO; run by TRL's RLOOTrainer."""

    beta: float = option(0.05, "weight of the KL(pi || SFT) penalty in the reward, k1 summed per answer")
    normalize_advantages: bool = option(False, "whiten the advantages over the batch")


ROUND_LABELERS = ("simulated", "team", "page")  # or "rm:PATH", "reward:SPEC"
STAGE3_METHODS = ("ppo", "dpo", "grpo", "rloo")


@dataclass
class RoundsConfig(ConfigMixin):
    """Iterated RLHF on the demo (core/runs/rounds.py): round 0 is SFT -> RM -> stage 3; each later round
    samples K answers from the last policy on fresh prompts, has them ranked, refits the RM on every
    ranking so far and trains stage 3 again (InstructGPT's and Llama 2's rounds)."""

    preset: str = option("quick", "the stages' demo preset")
    rounds: int = option(3, "rounds in all, round 0 included")
    method: str = option("ppo", "stage 3 of every round: ppo, dpo, grpo or rloo")
    labeler: str = option("simulated", "who ranks a round's answers: 'simulated' (the demo's labeler), 'team' (a "
                          "labeling batch on the Gradio server), 'page' (the Rank page), 'rm:PATH' (a larger "
                          "reward model ranks them) or 'reward:SPEC' (reward terms rank them, e.g. reward:exact)")
    prompts_per_round: int | None = option(None, "fresh prompts ranked each round (empty: the preset's RM "
                                           "n_prompts)")
    prompts: str = option("demo", "where each round's fresh prompts come from: 'demo' (the demo's training "
                          "prompts), 'store' (the workbench's prompts) or a prompts file (JSONL/CSV/Parquet); "
                          "the store's and a file's are read once, when the rounds begin")
    sample_temperature: float = option(1.0, "rounds >= 1: temperature of the K answers sampled from the previous "
                                       "policy (round 0 samples SFT at the preset RM's sample_temperature, as the "
                                       "pipeline); a sharpened policy's answers coincide at lower ones")
    episodes_per_round: int | None = option(None, "ppo/grpo/rloo: episodes of stage 3 each round (empty: the "
                                            "preset's total_episodes)")
    sft_model: str = option("", "start from this SFT checkpoint instead of training SFT first")
    rm_init: str = option("sft", "each round's RM starts from 'sft' or warm-starts from the 'previous' round's RM")
    policy_init: str = option("previous", "each round's stage 3 starts from the 'previous' round's policy or 'sft'")
    reference: str = option("auto", "stage 3's reference policy: 'sft', 'previous' (the policy it starts from) "
                            "or 'auto' (ppo: sft; dpo/grpo/rloo, whose trainers start from their reference: "
                            "previous)")
    labels_needed: int = option(0, "team/page: rankings in before a round goes on (0: every item of its batch)")
    wait: bool = option(True, "team/page: wait for the labels; off: stop in 'waiting for labels' and go on when "
                        "run again")
    poll_s: float = option(30.0, "team/page: seconds between looks at the labels while waiting")
    heldout_prompts: int = option(200, "held-out prompts whose previous-policy answers measure the RM before and "
                                  "after its refit")
    eval_prompts: int = option(200, "held-out prompts scored (gold, KL to SFT) for every round's policy")
    seed: int = option(0, "random seed; round r's RM and stage 3 use seed + r")

    _bounds = {"rounds": (1, 100, True), "prompts_per_round": (1, None, True), "episodes_per_round": (1, None, True),
               "labels_needed": (0, None, True), "poll_s": (0, None, False), "heldout_prompts": (0, None, True),
               "eval_prompts": (1, None, True), "sample_temperature": (0, None, False)}
    _choices = {"method": STAGE3_METHODS,
                "rm_init": ("sft", "previous"), "policy_init": ("previous", "sft"),
                "reference": ("auto", "sft", "previous")}

    def validate(self) -> None:
        super().validate()
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}: choose one of {', '.join(PRESETS)}")
        if self.labeler.startswith("reward:"):
            if any(t.kind == "rm" for t in parse_reward(self.labeler[len("reward:"):])):
                raise ValueError("labeler reward:SPEC ranks by terms read from the answers; a reward model ranks "
                                 "as labeler rm:PATH")
        elif self.labeler not in ROUND_LABELERS and not (self.labeler.startswith("rm:") and self.labeler[3:].strip()):
            raise ValueError(f"labeler must be simulated, team, page, rm:PATH (a reward model) or reward:SPEC (reward "
                             f"terms), got {self.labeler!r}")
        if self.method != "ppo" and self.reference not in ("auto", self.policy_init):
            raise ValueError(f"{self.method}'s trainer starts the policy from its reference, so reference must match "
                             f"policy_init ({self.policy_init!r}) or be 'auto'; got {self.reference!r}")

    @property
    def reference_policy(self) -> str:
        """'sft' or 'previous', with 'auto' resolved."""
        if self.reference != "auto":
            return self.reference
        return "sft" if self.method == "ppo" else self.policy_init


# Demo presets: the recipe's shape, scaled so the bundled model runs it on a laptop CPU.
PRESETS: dict[str, dict[str, dict]] = {
    "quick": {
        "sft": dict(epochs=4, learning_rate=1e-3, batch_size=32, dropout=0.0, n_demonstrations=2000),
        # Answers to rank are sampled at T=0.5: format choices (stop or ramble) stay diverse while
        # wrong digits, which a 2M-parameter RM cannot check (docs/NOTES.md, "The demo task"), become rarer.
        # Measured on 2 cores, seed 0: held-out accuracy 0.989 at T=0.5, 0.939 at 1.0 (its extra wrong
        # copies taught the RM little: 0.67 on those pairs, and PPO lost as much correctness). One epoch,
        # as InstructGPT (more overfits): seeds 0-2 reach 0.986, 0.956, 0.988.
        "rm": dict(epochs=1, learning_rate=5e-4, batch_size=8, k=4, n_prompts=800, heldout_prompts=200,
                   sample_temperature=0.5),
        # 2 PPO epochs and 8 ptx blocks per update: half the FLOPs of the defaults. 24 PPO steps: the
        # RM's real signal (conciseness) is won within a few, and held-out gold peaks early; longer runs
        # trade correctness the RM cannot see for RM score (2048 episodes gave the same gold on two
        # seeds). ptx_coef 0.1 still brings most of SFT's alignment tax back (held-out pretraining loss
        # 2.0 -> 1.2); on a base that had never seen the copy kinds, 1.0 pulled the policy so far towards
        # it that it forgot SFT's copying (on today's base 1.0 and 0.1 end alike: gold 0.938 / 0.945).
        # The exact KL term (kl_loss_coef 1.0) with kl_coef 0.3: the update's noise moves the tail of each
        # word's distribution (wrong words a few percent likelier), which the reward's sampled-token KL
        # barely prices; the exact KL over the vocabulary pulls it back. On 1,000 held-out answers the
        # correctness PPO loses against SFT fell from 0.038 / 0.027 (kl_coef 1.0 alone) to 0.009 / 0.008
        # on seeds 0 / 1, gold 0.945 -> 0.960 on seed 0; at kl_loss_coef 2 conciseness is no longer won.
        # Measured on 2 cores (docs/NOTES.md, "What PPO still loses" and "The quick preset's budget,
        # measured").
        "ppo": dict(total_episodes=1536, batch_size=64, learning_rate=2e-4, kl_coef=0.3, kl_loss_coef=1.0,
                    ptx_coef=0.1, ppo_epochs=2, ptx_batch_size=8, response_length=24, save_every=8),
        # The alternatives on the same budget as PPO: the RM's rankings (DPO), 1536 sampled answers (GRPO, RLOO).
        "dpo": dict(epochs=1, learning_rate=1e-4, batch_size=32, beta=0.1, k=4, n_prompts=800, sample_temperature=0.5,
                    save_every=25),
        "grpo": dict(total_episodes=1536, batch_size=64, num_generations=4, learning_rate=2e-4, beta=0.04,
                     max_completion_length=24, save_every=8),
        "rloo": dict(total_episodes=1536, batch_size=64, num_generations=4, learning_rate=2e-4, beta=0.05,
                     max_completion_length=24, save_every=8),
    },
    "full": {
        "sft": dict(epochs=16, learning_rate=5e-4, batch_size=32, dropout=0.2, n_demonstrations=2000),
        "rm": dict(epochs=1, learning_rate=3e-4, batch_size=8, k=6, n_prompts=2000),
        "ppo": dict(total_episodes=32000, batch_size=64, learning_rate=1e-4, kl_coef=0.1, ptx_coef=1.0,
                    save_every=50),
        "dpo": dict(epochs=2, learning_rate=5e-5, batch_size=32, beta=0.1, k=6, n_prompts=2000),
        "grpo": dict(total_episodes=32000, batch_size=64, num_generations=8, learning_rate=1e-4, beta=0.04),
        "rloo": dict(total_episodes=32000, batch_size=64, num_generations=8, learning_rate=1e-4, beta=0.05),
    },
}


__all__ = ["ConfigMixin", "SFTConfig", "RewardConfig", "PPOConfig", "DPOConfig", "GRPOConfig", "RLOOConfig",
           "RoundsConfig", "PRESETS", "field_help", "option", "read_yaml"]
