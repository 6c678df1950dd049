"""Spec strings parse, round-trip and fail with actionable messages."""

from __future__ import annotations

import pytest

from longreach import SpecError, method_names, parse_spec


@pytest.mark.parametrize("text", ["dense", "quest:budget=2048,block=64", "moba:density=0.1",
                                  "streaming:sinks=4,window=1024", "quest:density=0.25,group=q",
                                  "quest:budget=4k"])
def test_round_trip(text):
    spec = parse_spec(text)
    assert parse_spec(str(spec)) == spec


def test_values_are_typed():
    m = parse_spec("quest:budget=4k,density=none,sinks=0").selector
    assert m.budget == 4096 and m.density is None and m.sinks == 0


@pytest.mark.parametrize("text, message", [
    ("", "empty method spec"),
    ("qest:budget=10", "did you mean 'quest'"),
    ("quest:budget", "key=value"),
    ("quest:budget=0", "budget must be an integer >= 1"),
    ("quest:budget=-5", "budget must be an integer >= 1"),
    ("quest:block=6.5", "block=6.5 is not a valid int"),
    ("quest:block=0", "block must be an integer >= 1"),
    ("quest:density=0", "density must be in"),
    ("quest:budget=100,density=0.1", "not both"),
    ("quest:budget=10", "smaller than the always-kept sinks"),
    ("quest:bugdet=10", "unknown parameter 'bugdet'"),
    ("quest:budget=1,budget=2", "given twice"),
    ("quest+moba", "cannot combine quest and moba"),
    ("quest++dense", "empty item"),
    ("quest:group=heads", "group must be 'kv' or 'q'"),
    ("streaming:window=8,budget=16", "only one of"),
])
def test_bad_specs_fail_clearly(text, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(text)


def test_every_registered_method_has_docs_and_round_trips_defaults(tmp_path):
    from longreach.cache.press import Press
    from longreach.heads import HeadProfile
    from longreach.heads.policies import Profiled
    from longreach.methods import method_class

    profile = HeadProfile("", 1, 1, 1, {"retrieval": [[0.5]]}).save(tmp_path / "p.json")
    for name in method_names():
        cls = method_class(name)
        # presses need a budget and head policies a profile: those are their only required parameters
        needed = ["density=0.5"] * issubclass(cls, Press) + [f"profile={profile}"] * issubclass(cls, Profiled)
        item = name + (":" + ",".join(needed) if needed else "")
        spec = parse_spec(item)
        assert str(spec) == item
        assert spec.methods[0].summary
