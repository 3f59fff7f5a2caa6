"""The Train page's reward picker: stage 3's reward as a list of terms, each picked from the built-ins (or your
own function: a file path and a function name) with its options and a weight.

The list is written as the one-line spec `core.config.parse_reward` reads (`rm,length:target=24`), which is
what the run's config, the `rlhf` command and the YAML hold; the parser is the only judge of it: the list's
values go through it as a list of mappings (its errors shown as they are), the spec is written back from the
parsed terms with only what differs from the defaults, and read again to check it says the same. An
"advanced" field shows the spec; editing it redraws the list (several terms of one kind, names, ...).
"""

from __future__ import annotations

import ast
from pathlib import Path

import streamlit as st

from core.config import DEFAULT_WEIGHTS, REWARD_TERMS, RewardTerm, parse_reward

# What each term is, for a person picking one (core/stages/reward_terms.py computes them).
TERMS = {
    "rm": ("Reward model", "the trained reward model's score of the answer (an ensemble's reward_aggregate)"),
    "exact": ("Exact answer", "1 if the answer's final answer equals the prompt row's column, else 0"),
    "numeric": ("Numeric answer", "1 if the answer's last number is within tolerance of the column's number"),
    "math": ("Math answer", "1 if math-verify finds the answer equal to the column (LaTeX, fractions, sets ...)"),
    "regex": ("Regular expression", "1 if the pattern matches somewhere in the answer"),
    "choice": ("Multiple choice", "1 if the first option named in the answer is the row's column"),
    "contains": ("Contains", "1 if the answer contains the text (or the row's column)"),
    "length": ("Length", "answer tokens beyond the target; the default weight -0.05 makes it a penalty"),
    "eos": ("Ends properly", "1 if the answer ended with EOS, 0 if it was cut at the length limit"),
    "reasoning_gym": ("Reasoning-gym scorer", "the prompt's reasoning-gym set scores the answer (1 right, partial "
                                              "credit where the set gives it)"),
    "python": ("Your own function", "a Python function in a file on this machine, called with the prompts, the "
                                    "answers and the prompt rows' columns: def score(prompts, completions, "
                                    "**columns) -> list[float]"),
    "gold": ("Demo labeler (gold)", "the demo's simulated labeler itself: CHEATING on the proxy, demo prompts only"),
}
OPTIONS = {
    "column": "the prompt row's column holding the reference (imported with the prompts)",
    "tolerance": "largest difference still counted as right",
    "pattern": "a Python regular expression",
    "options": "the labels, separated by |",
    "text": "the text the answer must contain (or leave empty and name a column)",
    "target": "answer tokens allowed before each further token counts",
    "path": "a .py file on this machine",
    "function": "the function's name in that file",
    "timeout": "seconds a batch may take before the run stops",
    "dataset": "the reasoning-gym set's name (empty: the set each prompt row's metadata names)",
}
# The terms offered, in the order of `TERMS` (the labeler's cheat last); a term core adds later is offered too.
KINDS = [k for k in TERMS if k in REWARD_TERMS] + [k for k in REWARD_TERMS if k not in TERMS]


def spec_of(terms: list[RewardTerm]) -> str:
    """The one-line spec of parsed terms, writing only what differs from the defaults."""
    parts = []
    for term in terms:
        defaults = REWARD_TERMS[term.kind]
        head = [f"python:{term.options['path']}:{term.options['function']}"] if term.kind == "python" else [term.kind]
        shown = {k: v for k, v in term.options.items() if k not in ("path", "function") or term.kind != "python"}
        head += [f"{k}={text(v)}" for k, v in shown.items() if v != defaults[k]]
        if term.weight != DEFAULT_WEIGHTS.get(term.kind, 1.0):
            head.append(f"weight={text(term.weight)}")
        if term.name != default_name(term):
            head.append(f"name={term.name}")
        parts.append(":".join(head))
    return ",".join(parts)


def default_name(term: RewardTerm) -> str:
    """The metric name parse_reward gives a term without `name=`."""
    return term.options["function"] if term.kind == "python" else term.kind


def text(value) -> str:
    return f"{value:.12g}" if isinstance(value, float) else str(value)


def new_row(kind: str, uid: int, options: dict, weight: float, name: str = "") -> dict:
    """A row of the list: its kind and each field's text as its widget shows it (a required option empty)."""
    return {"uid": uid, "kind": kind, "values": {**{k: "" if v is None else text(v) for k, v in options.items()},
                                                 "weight": text(weight), "name": name}}


def row_of(term: RewardTerm, uid: int) -> dict:
    """A parsed term as a row."""
    return new_row(term.kind, uid, term.options, term.weight, "" if term.name == default_name(term) else term.name)


def mapping_of(row: dict) -> dict:
    """A row as parse_reward's mapping form; an empty field takes the term's default."""
    return {"term": row["kind"], **{k: v for k, v in row["values"].items() if v.strip()}}


def functions_in(path: str) -> list[str]:
    """The top-level functions of a Python file, read without running it (a hint beside the path)."""
    try:
        tree = ast.parse(Path(path).expanduser().read_text())
    except (OSError, SyntaxError, ValueError):
        return []
    return [node.name for node in tree.body if isinstance(node, ast.FunctionDef)]


class RewardPicker:
    """The picker's state lives in st.session_state under `key` (the field's key on the Train page): `key`
    holds the spec last taken from outside the list (a loaded config, the advanced field), the rows and
    their widgets hang under `key__...`."""

    def __init__(self, key: str, default: str | list):
        self.key, self.default = key, default
        self.rows_key, self.source_key, self.advanced_key = f"{key}__rows", f"{key}__source", f"{key}__advanced"
        self.error_key, self.built_key, self.add_key = f"{key}__spec_error", f"{key}__built", f"{key}__add"

    # -- the list's state --------------------------------------------------------------------------------

    def _next_uid(self) -> int:
        uid = st.session_state.get(f"{self.key}__next", 0)
        st.session_state[f"{self.key}__next"] = uid + 1
        return uid

    def _load(self, spec: str | list) -> None:
        """Rows from a spec; a spec the parser refuses leaves the rows as they were and its error stays
        beside the advanced field until the spec or the list changes."""
        try:
            terms = parse_reward(spec)
        except ValueError as exc:
            st.session_state[self.error_key] = str(exc)
            st.session_state.setdefault(self.rows_key, [])
            if isinstance(spec, str):  # shown in the advanced field, to be mended there
                st.session_state[self.advanced_key] = spec
        else:
            st.session_state[self.rows_key] = [row_of(t, self._next_uid()) for t in terms]
            st.session_state.pop(self.error_key, None)
        st.session_state[self.source_key] = spec

    def _sync(self) -> None:
        """Take a spec set from outside the list (first draw, a loaded config, the advanced field)."""
        outside = st.session_state.get(self.key, self.default)
        if self.rows_key not in st.session_state or outside != st.session_state.get(self.source_key):
            self._load(outside)

    def _add(self) -> None:
        kind = st.session_state.get(self.add_key)
        if kind:
            st.session_state[self.rows_key].append(
                new_row(kind, self._next_uid(), REWARD_TERMS[kind], DEFAULT_WEIGHTS.get(kind, 1.0)))
        st.session_state[self.add_key] = None

    def _remove(self, uid: int) -> None:
        st.session_state[self.rows_key] = [r for r in st.session_state[self.rows_key] if r["uid"] != uid]

    def _edit_spec(self) -> None:
        st.session_state[self.key] = st.session_state[self.advanced_key]

    # -- drawing -----------------------------------------------------------------------------------------

    def _field(self, row: dict, name: str, label: str, help_text: str, placeholder: str = "") -> None:
        widget = f"{self.key}__{row['uid']}__{name}"
        if widget not in st.session_state:  # new, or dropped while another stage was shown: the row's value
            st.session_state[widget] = row["values"].get(name, "")
        row["values"][name] = st.text_input(label, key=widget, help=help_text, placeholder=placeholder)

    def _row(self, row: dict) -> None:
        kind = row["kind"]
        title, what = TERMS.get(kind, (kind, ""))
        with st.container(border=True):
            head, weight, name, remove = st.columns([5, 2, 2, 1], vertical_alignment="bottom")
            head.markdown(f"**{title}** `{kind}`  \n{what}")
            with weight:
                self._field(row, "weight", "weight", "the term's factor in the total reward (negative: a penalty)")
            with name:
                self._field(row, "name", "name", "the metric's name, reward/<name> (needed when two terms share "
                            "a kind)", placeholder=kind if kind != "python" else "the function's name")
            remove.button("", icon=":material/delete:", key=f"{self.key}__{row['uid']}__remove",
                          help="remove this term", on_click=self._remove, args=(row["uid"],))
            options = list(REWARD_TERMS[kind])
            if options:
                for column, option in zip(st.columns(len(options)), options):
                    with column:
                        self._field(row, option, option, OPTIONS.get(option, ""))
            if kind == "python" and (found := functions_in(row["values"].get("path", ""))):
                st.caption("Functions in this file: " + ", ".join(f"`{f}`" for f in found))

    def draw(self) -> tuple[str | None, str | None]:
        """The picker; returns (the spec for the config, None) or (None, the error to show and block on)."""
        self._sync()
        rows = st.session_state[self.rows_key]
        for row in rows:
            self._row(row)
        st.selectbox("Add a term", KINDS, index=None, placeholder="choose a term to add…",
                     format_func=lambda k: f"{TERMS.get(k, (k,))[0]} ({k})", key=self.add_key, on_change=self._add)
        spec, error = None, None
        try:
            terms = parse_reward([mapping_of(r) for r in rows])
            spec = spec_of(terms)
            if parse_reward(spec) != terms:
                raise ValueError(f"the reward {spec!r} does not read back as these terms on one line (a ',' or ':' "
                                 "inside a value?): load it as a YAML list instead")
        except ValueError as exc:
            error = str(exc)
        if self.error_key in st.session_state and spec == st.session_state.get(self.built_key):
            # The advanced spec the user typed does not parse, and the list has not changed since: it stands.
            error = st.session_state[self.error_key]
        else:
            st.session_state.pop(self.error_key, None)
            if spec is not None:
                st.session_state[self.key] = st.session_state[self.source_key] = spec
                st.session_state[self.advanced_key] = spec
        st.session_state[self.built_key] = spec
        st.text_input("Advanced: the reward as one line", key=self.advanced_key, on_change=self._edit_spec,
                      help="what the config and `rlhf --set reward=...` hold; edit it and press Enter to redraw "
                           "the list (e.g. two regex terms with name=...)")
        if error:
            st.error(error, icon=":material/error:")
        return (None, error) if error else (spec, None)
