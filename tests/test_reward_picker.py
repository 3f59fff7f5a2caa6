"""The Train page's reward picker (workbench/reward_picker.py): terms picked from a list with their options and
weights become the one-line spec `parse_reward` reads, checked by it; the advanced field round-trips."""

from __future__ import annotations

import pytest

from core.config import parse_reward
from tests.test_pages import button, db, open_page, texts
from workbench.reward_picker import spec_of

KEY = "cfg_ppo_quick_reward"


@pytest.mark.parametrize("spec", [
    "rm", "rm,length:target=24:weight=-0.05", "exact:column=solution,eos:weight=0.5",
    "numeric:tolerance=0.01,regex:pattern=^The answer is \\d{1,3}:name=starts", "choice:options=A|B|C:weight=2",
    "contains:text=please,length:target=12:weight=-0.1:name=long", "gold"])
def test_the_spec_written_from_parsed_terms_reads_back_as_them(spec):
    terms = parse_reward(spec)
    written = spec_of(terms)
    assert parse_reward(written) == terms
    assert len(written) <= len(spec)  # defaults left out
    assert spec_of(parse_reward("rm,length:target=24:weight=-0.05")) == "rm,length:target=24"


def test_every_term_core_knows_is_offered_and_described():
    from core.config import REWARD_TERMS
    from workbench.reward_picker import KINDS, OPTIONS, TERMS

    assert sorted(KINDS) == sorted(REWARD_TERMS) and set(TERMS) == set(REWARD_TERMS)
    assert {option for options in REWARD_TERMS.values() for option in options} <= set(OPTIONS)


def widget(at, uid: int, name: str):
    return at.text_input(key=f"{KEY}__{uid}__{name}")


def test_train_page_picks_terms_and_weights_and_round_trips_the_spec(app, workbench_home, tmp_path):
    store = db(workbench_home)
    for name, kind in (("my-sft", "sft"), ("my-rm", "rm")):
        (tmp_path / name).mkdir()
        store.add_checkpoint(name, kind, tmp_path / name)
    rewards = tmp_path / "my_rewards.py"
    rewards.write_text("def strict(prompts, completions, **columns):\n    return [1.0] * len(completions)\n\n"
                       "def lenient(prompts, completions):\n    return [0.5] * len(completions)\n")
    at = open_page(app, "train")
    at.get("button_group")[0].set_value("ppo").run()
    assert at.text_input(key=f"{KEY}__advanced").value == "rm"  # the default: the reward model alone
    assert widget(at, 0, "weight").value == "1"

    # A length term: its required target is named by the parser, and nothing can launch until it is given.
    at.selectbox(key=f"{KEY}__add").set_value("length").run()
    assert "reward term length needs target=..." in texts(at.error)
    assert button(at, "Launch").disabled
    assert widget(at, 1, "weight").value == "-0.05"  # the term's default weight: a penalty
    widget(at, 1, "target").input("24").run()
    assert not at.error, texts(at.error)
    assert at.text_input(key=f"{KEY}__advanced").value == "rm,length:target=24"
    assert "reward: rm,length:target=24" in texts(at.code)  # the run's YAML holds the spec
    assert not button(at, "Launch").disabled
    widget(at, 1, "weight").input("nan").run()
    assert "weight must be a finite number" in texts(at.error) and button(at, "Launch").disabled
    widget(at, 1, "weight").input("-0.1").run()
    assert at.text_input(key=f"{KEY}__advanced").value == "rm,length:target=24:weight=-0.1"

    # Without the rm term no reward model is needed.
    next(b for b in at.button if b.key == f"{KEY}__0__remove").click().run()
    assert at.text_input(key=f"{KEY}__advanced").value == "length:target=24:weight=-0.1"
    assert "Reward model: not needed" in texts(at.caption)

    # Your own function: a path (its functions listed, read without running it) and a name.
    at.selectbox(key=f"{KEY}__add").set_value("python").run()
    assert "reward term python needs path=..., function=..." in texts(at.error)
    widget(at, 2, "path").input(str(rewards)).run()
    assert "Functions in this file: `strict`, `lenient`" in texts(at.caption)
    widget(at, 2, "function").input("strict").run()
    assert not at.error, texts(at.error)
    assert at.text_input(key=f"{KEY}__advanced").value == f"length:target=24:weight=-0.1,python:{rewards}:strict"
    widget(at, 2, "path").input(str(tmp_path / "missing.py")).run()
    assert "no file" in texts(at.error) and button(at, "Launch").disabled
    widget(at, 2, "path").input(str(rewards)).run()

    # The advanced field: two terms of one kind with names; the list follows.
    at.text_input(key=f"{KEY}__advanced").input("rm,regex:pattern=^The:name=starts,regex:pattern=\\.$:name=ends:weight=0.5").run()
    assert not at.error, texts(at.error)
    rows = at.session_state[f"{KEY}__rows"]
    assert [(r["kind"], r["values"].get("pattern"), r["values"]["name"], r["values"]["weight"]) for r in rows] == [
        ("rm", None, "", "1"), ("regex", "^The", "starts", "1"), ("regex", "\\.$", "ends", "0.5")]
    assert [widget(at, r["uid"], "name").value for r in rows] == ["", "starts", "ends"]
    assert "reward: rm,regex:pattern=^The:name=starts,regex:pattern=\\.$:weight=0.5:name=ends" in texts(at.code)

    # A spec the parser refuses: its message, nothing launches, the list stays; editing the list wins again.
    at.text_input(key=f"{KEY}__advanced").input("rm,regex:pattern=(").run()
    assert "does not compile" in texts(at.error) and button(at, "Launch").disabled
    assert at.text_input(key=f"{KEY}__advanced").value == "rm,regex:pattern=("
    assert len(at.session_state[f"{KEY}__rows"]) == 3
    at.run()
    assert "does not compile" in texts(at.error)  # it stands until the spec or the list changes
    widget(at, rows[2]["uid"], "weight").input("2").run()
    assert not at.error, texts(at.error)
    assert at.text_input(key=f"{KEY}__advanced").value == "rm,regex:pattern=^The:name=starts,regex:pattern=\\.$:weight=2:name=ends"

    # A loaded config's reward (a YAML list of mappings) redraws the list.
    at.session_state[KEY] = [{"term": "exact"}, {"term": "eos", "weight": 0.5}]
    at.run()
    assert at.text_input(key=f"{KEY}__advanced").value == "exact,eos:weight=0.5"
    assert [r["kind"] for r in at.session_state[f"{KEY}__rows"]] == ["exact", "eos"]
