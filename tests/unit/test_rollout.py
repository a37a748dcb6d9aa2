"""Rollouts: the section's strict parser, the waves, and the gate (pure)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from provisioner import nodereport
from provisioner.node.model import State
from provisioner.operator import labels, rollout
from provisioner.operator.placement import PlacementError
from provisioner.operator.rollout import Marker, Verdict
from tests.unit.fakes import IMAGE_A, IMAGE_B, json_values
from tests.unit.test_nodereport import report

pytestmark = pytest.mark.unit


def spec(**doc: Any) -> rollout.Rollout:
    return rollout.parse({"name": "web-1.4", "deadline": "30m", **doc})


def test_a_rollout_section() -> None:
    r = spec(
        canary={"count": 2},
        waves=[{"percent": 10}, {"by": "site"}, {"count": 5}],
        max_rejected="5%",
        max_timeouts=1,
    )
    assert r.deadline == 1800 and r.canary == rollout.WaveSpec(count=2)
    assert [w.by for w in r.waves] == [None, "site", None]
    assert r.max_rejected.allows(40) == 2 and r.max_timeouts.allows(40) == 1
    assert spec().max_rejected.allows(100) == 0  # strict by default
    assert spec(deadline=90).deadline == 90
    assert spec(canary={"select": {"hw": ["lab", "a"]}}).canary.select.text() == "hw=a|lab"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("doc", "why"),
    [
        ({"deadline": "30m"}, "name is missing"),
        ({"name": "x"}, "deadline is missing"),
        ({"name": "X", "deadline": "1m"}, "lowercase"),
        ({"name": "x", "deadline": "soon"}, "duration"),
        ({"name": "x", "deadline": "0s"}, "duration"),
        ({"name": "x", "deadline": True}, "duration"),
        ({"name": "x", "deadline": "1m", "wavez": []}, "unknown key"),
        ({"name": "x", "deadline": "1m", "waves": [{"percent": 0}]}, "above 0"),
        ({"name": "x", "deadline": "1m", "waves": [{"percent": 101}]}, "above 0"),
        ({"name": "x", "deadline": "1m", "waves": [{"count": 0}]}, "at least 1"),
        ({"name": "x", "deadline": "1m", "waves": [{"count": 1, "by": "a"}]}, "one of"),
        ({"name": "x", "deadline": "1m", "waves": [{"select": {"a": "b"}}]}, "one of"),
        ({"name": "x", "deadline": "1m", "canary": {"by": "site"}}, "one of"),
        ({"name": "x", "deadline": "1m", "canary": {"select": {"a": 1}}}, "quote"),
        ({"name": "x", "deadline": "1m", "max_rejected": "5"}, "percentage"),
        ({"name": "x", "deadline": "1m", "max_rejected": -1}, "percentage"),
        ({"name": "x", "deadline": "1m", "max_timeouts": "200%"}, "percentage"),
    ],
)
def test_what_a_rollout_section_may_not_say(doc: dict[str, Any], why: str) -> None:
    with pytest.raises(PlacementError, match=why):
        rollout.parse(doc)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            ["name", "deadline", "canary", "waves", "max_rejected", "max_timeouts", "x"]
        ),
        json_values,
        max_size=7,
    )
)
def test_any_section_is_a_rollout_or_a_placement_error(doc: dict[str, Any]) -> None:
    for candidate in (doc, {"name": "r", "deadline": "1m", **doc}):
        try:
            rollout.parse(candidate)
        except PlacementError:
            pass


def covered(n: int, site: Any = lambda i: f"s{i % 3}") -> dict[str, labels.Labels]:
    return {
        f"n{i:03d}": labels.labels_of([labels.tag("site", site(i))] if site(i) else [])
        for i in range(n)
    }


def test_waves_canary_percent_by_label_and_the_rest() -> None:
    r = spec(canary={"count": 2}, waves=[{"percent": 25}, {"percent": 50}, {"by": "site"}])
    nodes = covered(20, lambda i: f"s{i % 2}" if i < 18 else None)
    waves = rollout.layout(r, nodes)
    assert [w.name for w in waves] == ["canary", "25%", "50%", "site=s0", "site=s1", "rest"]
    assert [len(w.nodes) for w in waves[:3]] == [2, 3, 5]  # up to 25 %, then up to 50 %
    assert all(nodes[n].values["site"] == "s0" for n in waves[3].nodes)
    assert all("site" not in nodes[n].values for n in waves[5].nodes)
    flat = [n for w in waves for n in w.nodes]
    assert sorted(flat) == sorted(nodes) and len(flat) == len(set(flat))
    # the same at every run, and not the alphabet: a count takes nodes across the fleet
    assert rollout.layout(r, dict(reversed(list(nodes.items())))) == waves
    assert waves[0].nodes != ("n000", "n001")
    # canary by selector
    r = spec(canary={"select": {"site": "s1"}})
    six = covered(6)
    canary, rest = rollout.layout(r, six)
    assert canary.name == "canary" and {six[n].values["site"] for n in canary.nodes} == {"s1"}
    assert rest.name == "rest" and len(canary.nodes) + len(rest.nodes) == 6
    assert rollout.layout(spec(), {}) == []


@settings(max_examples=100, deadline=None)
@given(
    st.integers(0, 40),
    st.lists(
        st.sampled_from([{"count": 3}, {"percent": 30}, {"percent": 100}, {"by": "site"}]),
        max_size=4,
    ),
    st.sampled_from([None, {"count": 1}, {"percent": 5}, {"select": {"site": "s1"}}]),
)
def test_every_node_is_in_exactly_one_wave(n: int, waves: list[Any], canary: Any) -> None:
    doc: dict[str, Any] = {"waves": waves}
    if canary:
        doc["canary"] = canary
    nodes = covered(n)
    got = [x for w in rollout.layout(spec(**doc), nodes) for x in w.nodes]
    assert sorted(got) == sorted(nodes)


def mark(wave: int, at: float = 1000.0, gen: int = 5, image: str = IMAGE_B) -> Marker:
    return Marker("web-1.4", image, gen, at, wave, False, IMAGE_A, 4)


def test_a_node_s_verdict_from_its_report() -> None:
    m = mark(0)
    running = report(running=nodereport.Ref(IMAGE_B, 5), assignment=nodereport.Ref(IMAGE_B, 5))
    assert rollout.verdict(m, running, 1001, 60) is Verdict.RUNNING
    later = report(running=nodereport.Ref(IMAGE_B, 6))
    assert rollout.verdict(m, later, 1001, 60) is Verdict.RUNNING
    old = report(running=nodereport.Ref(IMAGE_A, 4), assignment=nodereport.Ref(IMAGE_A, 4))
    assert rollout.verdict(m, old, 1001, 60) is Verdict.PENDING
    assert rollout.verdict(m, old, 1060, 60) is Verdict.TIMED_OUT
    assert rollout.verdict(m, None, 1060, 60) is Verdict.TIMED_OUT
    for state in (State.REFUSED, State.ROLLED_BACK):
        refused = report(
            state=state,
            running=nodereport.Ref(IMAGE_A, 4),
            assignment=nodereport.Ref(IMAGE_B, 5),
        )
        assert rollout.verdict(m, refused, 1001, 60) is Verdict.REJECTED
    # a failure that is no verdict (Barbican busy) waits for the deadline
    failed = report(state=State.FAILED, running=None, assignment=nodereport.Ref(IMAGE_B, 5))
    assert rollout.verdict(m, failed, 1001, 60) is Verdict.PENDING


def test_the_gate() -> None:
    r = spec(canary={"count": 2}, waves=[{"percent": 50}], max_rejected=0, max_timeouts="50%")
    nodes = covered(10)
    waves = rollout.layout(r, nodes)
    # nothing started: the canary is next
    p = rollout.evaluate(r, nodes, {}, {}, 1000)
    assert p.started == -1 and p.passed and p.todo == waves[0].nodes and p.next_index == 0
    # the canary started: pending until the nodes report
    c1, c2 = waves[0].nodes
    marks = {c1: mark(0), c2: mark(0)}
    ok = report(running=nodereport.Ref(IMAGE_B, 5))
    p = rollout.evaluate(r, nodes, marks, {}, 1001)
    assert not p.passed and not p.halted and p.count(Verdict.PENDING) == 2
    p = rollout.evaluate(r, nodes, marks, {c1: ok, c2: ok}, 1001)
    assert p.passed and p.todo == waves[1].nodes and p.next_index == 1
    # one rejection halts at once, whatever the others do
    bad = report(state=State.REFUSED, assignment=nodereport.Ref(IMAGE_B, 5))
    p = rollout.evaluate(r, nodes, marks, {c1: bad}, 1001)
    assert p.halted and not p.passed
    # timeouts: one of two is allowed (50 %), two are not
    p = rollout.evaluate(r, nodes, marks, {c1: ok}, 5000)
    assert p.passed and p.count(Verdict.TIMED_OUT) == 1
    p = rollout.evaluate(r, nodes, marks, {}, 5000)
    assert p.halted
    # the last wave passed and every node is assigned: done
    marks = {n: mark(w.index) for w in waves for n in w.nodes}
    p = rollout.evaluate(r, nodes, marks, dict.fromkeys(nodes, ok), 1001)
    assert p.done and p.started == len(waves) - 1
    # a node that joins late goes with the next wave (here: the last, again)
    joined = {**nodes, "zzz": labels.Labels()}
    p = rollout.evaluate(r, joined, marks, dict.fromkeys(nodes, ok), 1001)
    assert p.todo == ("zzz",) and p.next_index == len(waves) - 1


def test_the_rollout_rides_in_the_signed_payload_and_the_node_ignores_it() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    from provisioner import assignment
    from provisioner.node.model import Assignment
    from provisioner.operator import nodes
    from provisioner.signing import fingerprint
    from tests.certs import self_signed

    key = ec.generate_private_key(ec.SECP384R1())
    cert = self_signed(key, "assignments")
    extra = {
        "rollout": {
            "name": "web-1.4",
            "wave": 2,
            "previous_image_id": IMAGE_A,
            "previous_generation": 4,
        },
        "image_id": "not this",
    }
    at = "2026-12-03T10:00:00Z"
    record = assignment.sign(key, cert, "p" * 32, "n1", IMAGE_B, "ab" * 64, 5, at, extra)
    # what the node reads: the same assignment, the rollout ignored, no field replaced
    got = assignment.verify(record, {fingerprint(cert): cert}, "p" * 32, "n1")
    assert got == Assignment(IMAGE_B, 5, "ab" * 64, at)
    node = nodes.Node("n1", {"id": "p" * 32, "edgepin_assignment": json.dumps(record)}, None)
    m = rollout.marker(node, cert)
    assert m == Marker("web-1.4", IMAGE_B, 5, 1796292000.0, 2, False, IMAGE_A, 4)
    # another key's record says nothing of any rollout
    other = ec.generate_private_key(ec.SECP384R1())
    assert rollout.marker(node, self_signed(other, "other")) is None
