"""Node labels as Keystone project tags: the encoding, the parser and what a change does."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from provisioner.errors import UsageError
from provisioner.operator import labels

pytestmark = pytest.mark.unit

names = st.from_regex(labels.NAME, fullmatch=True)


def test_a_label_is_one_tag() -> None:
    assert labels.tag("site", "paris-1") == "edgepin-label:site=paris-1"
    assert labels.parse_tag("edgepin-label:site=paris-1") == ("site", "paris-1")
    for other in ("edgepin-node", "edgepin-label:site", "edgepin-label:Site=x", "label:a=b", 7):
        assert labels.parse_tag(other) is None


@settings(max_examples=200, deadline=None)
@given(names, names)
def test_every_label_round_trips_and_is_a_valid_keystone_tag(key: str, value: str) -> None:
    t = labels.tag(key, value)
    assert labels.parse_tag(t) == (key, value)
    assert len(t) <= 255 and "/" not in t and "," not in t and t == t.lower()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=40) | st.integers() | st.none(), max_size=12))
def test_any_tags_give_labels_and_conflicts(tags: list[Any]) -> None:
    got = labels.labels_of(tags)
    assert not set(got.values) & set(got.conflicts)
    for k, v in got.values.items():
        assert labels.tag(k, v) in tags


def test_a_key_with_two_values_is_a_conflict() -> None:
    got = labels.labels_of(
        ["edgepin-node", "edgepin-label:site=a", "edgepin-label:site=b", "edgepin-label:hw=x"]
    )
    assert got.values == {"hw": "x"}
    assert got.conflicts == {"site": ("a", "b")}
    assert got.text() == "hw=x,site=a|b"
    assert labels.labels_of("not a list") == labels.Labels()


def test_changes_are_parsed_strictly() -> None:
    c = labels.parse_changes(["site=paris", "region=eu-west", "old-"])
    assert c.set == {"site": "paris", "region": "eu-west"} and c.remove == {"old"}
    for bad in (["Site=x"], ["site="], ["site"], ["a=b", "a-"], ["a=b", "a=c"], ["x=a/b"]):
        with pytest.raises(UsageError):
            labels.parse_changes(bad)


def test_a_change_adds_and_deletes_single_tags() -> None:
    tags = ["edgepin-node", "edgepin-label:site=a", "edgepin-label:site=b", "edgepin-label:hw=x"]
    add, delete = labels.tag_changes(tags, labels.parse_changes(["site=b", "hw-", "new=1"]))
    assert add == ["edgepin-label:new=1"]
    assert delete == ["edgepin-label:hw=x", "edgepin-label:site=a"]
    assert labels.tag_changes(tags, labels.parse_changes([])) == ([], [])
    many = [f"edgepin-label:k{i}=v" for i in range(79)]
    with pytest.raises(UsageError, match="at most"):
        labels.tag_changes(["edgepin-node", *many], labels.parse_changes(["one=more"]))
