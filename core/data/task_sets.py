"""Procedural prompt sets from reasoning-gym (an optional extra, `pip install 'rlhf-workbench[verifiers]'`):
arithmetic, counting, simple puzzles, generated offline from a seed, each with its own scorer.

A set is named wherever a prompts file is (`rlhf import`, PPO/GRPO/RLOO's `prompts`, `rlhf eval --prompts`):

    reasoning-gym:NAME[:size=N][:seed=S][:OPTION=VALUE ...]

e.g. `reasoning-gym:basic_arithmetic:size=200:seed=0:max_terms=2:max_digits=1`. size (default 100) and seed
(default 0) pick the rows; any other option is a field of the dataset's own config (reasoning-gym's
`<Name>Config`), its value read as that field's type (a tuple field as `a|b|c`). Each row is a prompt
(the task's question) with its `answer` and the dataset's own `metadata` (which its scorer reads), kept
as the prompt row's extra columns; the `reasoning_gym` reward term scores answers with the dataset's
`score_answer` (core/stages/reward_terms.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Callable

PREFIX = "reasoning-gym:"
INSTALL = "pip install 'rlhf-workbench[verifiers]'"
DEFAULT_SIZE, MAX_SIZE = 100, 100_000
# Sets to suggest to a newcomer (short answers a small model can learn): the Prompts page's list, the examples of
# an unknown name's message.
EXAMPLES = ("basic_arithmetic", "chain_sum", "letter_counting", "word_sorting", "spell_backward", "number_sorting")


@dataclasses.dataclass(frozen=True)
class TaskSet:
    """A parsed `reasoning-gym:` source: the dataset's name, how many rows, the seed, its config options."""

    name: str
    size: int
    seed: int
    options: dict


def is_task_set(source: str) -> bool:
    return isinstance(source, str) and source.strip().startswith(PREFIX)


def _gym():
    try:
        import reasoning_gym
    except ImportError:
        raise ValueError(f"reasoning-gym task sets need the reasoning-gym package, which is not installed: "
                         f"{INSTALL}") from None
    return reasoning_gym


def dataset_names() -> list[str]:
    """Every dataset reasoning-gym can generate."""
    return sorted(_gym().factory.DATASETS)


def check_name(name: str) -> None:
    """A ValueError naming a few valid datasets (the closest first) when `name` is not one of them."""
    names = dataset_names()
    if name not in names:
        near = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        examples = [*near, *(n for n in EXAMPLES if n in names and n not in near)]
        raise ValueError(f"reasoning-gym has no dataset {name!r}: e.g. {', '.join(examples[:6])} "
                         f"({len(names)} in all: reasoning_gym.factory.DATASETS)")


def _whole(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"reasoning-gym set: {key} must be a whole number, got {value!r}") from None


def parse_task_set(source: str) -> TaskSet:
    """`reasoning-gym:NAME[:size=N][:seed=S][:OPTION=VALUE ...]` checked: the extra installed, the dataset
    known, size and seed whole numbers (options are checked when the set is generated)."""
    name, *segments = source.strip()[len(PREFIX):].split(":")
    name = name.strip()
    if not name:
        raise ValueError(f"{source!r}: name the dataset, e.g. reasoning-gym:basic_arithmetic:size=200:seed=0")
    values = {}
    for segment in segments:
        key, eq, value = (part.strip() for part in segment.partition("="))
        if not eq or not key:
            raise ValueError(f"{source!r}: options are key=value, got {segment!r}")
        values[key] = value
    check_name(name)
    size = _whole("size", values.pop("size", str(DEFAULT_SIZE)))
    seed = _whole("seed", values.pop("seed", "0"))
    if not 1 <= size <= MAX_SIZE:
        raise ValueError(f"reasoning-gym set: size must be from 1 to {MAX_SIZE}, got {size}")
    return TaskSet(name, size, seed, values)


def _typed(field: dataclasses.Field, value: str, name: str):
    """An option's text as its config field's type (the field's default tells it)."""
    default = field.default if field.default is not dataclasses.MISSING else (
        field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
    try:
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return value.lower() in ("true", "1")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, (tuple, list)):
            items = [v.strip() for v in value.split("|") if v.strip()]
            kind = type(default[0]) if default else str
            return type(default)(kind(v) for v in items)
    except ValueError:
        raise ValueError(f"reasoning-gym {name}: option {field.name} must be like its default {default!r}, "
                         f"got {value!r}") from None
    return value


def generate(task_set: TaskSet) -> list[dict]:
    """The set's rows: {"prompt": the question, "answer": the dataset's answer, "metadata": its metadata}.
    The metadata goes through JSON (what the store keeps), so a scorer reads the same values either way."""
    gym = _gym()
    _, config_class = gym.factory.DATASETS[task_set.name]
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = sorted(set(task_set.options) - set(fields))
    if unknown:
        known = ", ".join(f for f in fields if f not in ("seed", "size"))
        raise ValueError(f"reasoning-gym {task_set.name}: unknown option(s) {', '.join(unknown)} (it takes size, "
                         f"seed, {known})")
    options = {k: _typed(fields[k], v, task_set.name) for k, v in task_set.options.items()}
    try:
        dataset = gym.create_dataset(task_set.name, size=task_set.size, seed=task_set.seed, **options)
    except (AssertionError, ValueError, TypeError) as exc:  # the config's own checks (its validate asserts)
        raise ValueError(f"reasoning-gym {task_set.name}: {exc}") from None
    return [{"prompt": entry["question"], "answer": None if entry["answer"] is None else str(entry["answer"]),
             "metadata": json.loads(json.dumps(entry["metadata"], default=str))} for entry in dataset]


def task_rows(source: str) -> list[tuple[int, dict]]:
    """(row number, row) pairs of a `reasoning-gym:` source, as a table file's read (core/data/formats.py)."""
    return list(enumerate(generate(parse_task_set(source)), start=1))


def scorer(name: str) -> Callable[..., float]:
    """The dataset's own `score_answer(answer, entry)`: 1.0 for a right answer, partial credit where the
    dataset gives it."""
    check_name(name)
    return _gym().get_score_answer_fn(name)


def extract_answer(completion: str) -> str | None:
    """The text inside the last `<answer>...</answer>` (reasoning-gym's convention), None without tags."""
    from reasoning_gym.utils import extract_answer as extract

    return extract(completion)


__all__ = ["EXAMPLES", "PREFIX", "TaskSet", "check_name", "dataset_names", "extract_answer", "generate", "is_task_set",
           "parse_task_set", "scorer", "task_rows"]
