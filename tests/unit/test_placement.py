"""Placement files and plans: a strict parser (any input gives a placement or a
PlacementError) and a pure, deterministic plan that explains every node left out."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from provisioner import nodereport
from provisioner.node.model import State
from provisioner.operator import labels, placement
from provisioner.operator.placement import Action, Image, NodeView, PlacementError
from tests.unit.fakes import IMAGE_A, IMAGE_B, json_values
from tests.unit.test_nodereport import FACTS, report

pytestmark = pytest.mark.unit

IMAGE_C = "3c1d2e4f-0a9b-4c8d-8e7f-6a5b4c3d2e1f"
WEB_13 = Image(IMAGE_A, "web", "1.3.0", 1, 256, 100 * 2**20)
WEB_14 = Image(IMAGE_B, "web", "1.4.0", 2, 2048, 300 * 2**20)
BIG = Image(IMAGE_C, "big", "1", 8, 256, 2**20)

FILE = b"""
placement: 1
rules:
  - name: eu
    select: {region: eu-west, hw: [small, medium]}
    image: {name: web, version: "1.4.0"}
    require: {cpu_flags: [avx2]}
  - name: big
    select: {hw: huge}
    image: {id: 3c1d2e4f-0a9b-4c8d-8e7f-6a5b4c3d2e1f}
  - name: rest
    image: {name: web, version: "1.3.0"}
"""


def test_a_placement_file() -> None:
    p = placement.load(FILE)
    assert [r.name for r in p.rules] == ["eu", "big", "rest"]
    eu = p.rules[0]
    assert eu.select.text() == "hw=medium|small,region=eu-west"
    assert eu.image == placement.ImageRef(name="web", version="1.4.0")
    assert eu.cpu_flags == ("avx2",)
    assert p.rules[1].image.image_id == IMAGE_C
    assert p.rules[2].select.text() == "all nodes"
    assert p.rollout is None and len(p.digest) == 64


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("placement: 2\nrules: []", "must be 1"),
        ("rules: []", "placement is missing"),
        ("placement: 1\nrules: []", "at least one rule"),
        ("placement: 1\nrulez: []", "unknown key"),
        ("placement: 1\nrules:\n- {name: a, image: {name: w, version: 1.10}}", "quote it"),
        (
            "placement: 1\nrules:\n- {name: a, image: {name: w, version: '1'}, select: {on: yes}}",
            "quote it",
        ),
        ("placement: 1\nrules:\n- {name: a, image: {id: nope}}", "not a Glance image id"),
        ("placement: 1\nrules:\n- {name: a, image: {id: x, name: y}}", "either id"),
        ("placement: 1\nrules:\n- {name: A, image: {name: w, version: '1'}}", "lowercase"),
        (
            "placement: 1\nrules:\n- {name: a, image: {name: w, version: '1'}}\n"
            "- {name: a, image: {name: w, version: '2'}}",
            "used twice",
        ),
        ("placement: 1\nplacement: 1\nrules: []", "given twice"),
        (
            "placement: 1\nrules:\n- {name: a, image: {name: w, version: '1'}, "
            "require: {cpu_flags: [AVX]}}",
            "no CPU flag",
        ),
        (
            "placement: 1\nrules:\n- {name: a, image: {name: w, version: '1'}, select: {s: []}}",
            "allows no value",
        ),
        ("placement: [", "not valid YAML"),
        ("- 1", "must be a mapping"),
    ],
)
def test_what_a_placement_file_may_not_say(text: str, why: str) -> None:
    with pytest.raises(PlacementError, match=why):
        placement.load(text.encode())


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_document_is_a_placement_or_a_placement_error(doc: Any) -> None:
    for candidate in (
        doc,
        {"placement": 1, "rules": doc},
        {"placement": 1, "rules": [doc]},
        {"placement": 1, "rules": [{"name": "a", "image": doc, "select": doc}]},
    ):
        try:
            placement.parse(candidate)
        except PlacementError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_any_bytes_are_a_placement_or_a_placement_error(data: bytes) -> None:
    try:
        placement.load(data)
    except PlacementError:
        pass


def view(name: str, lbl: dict[str, str], **kw: Any) -> NodeView:
    tags = [labels.tag(k, v) for k, v in lbl.items()]
    kw.setdefault("report", report(node=name))
    return NodeView(name, labels.labels_of(tags), **kw)


FLEET = [
    view("n-01", {"region": "eu-west", "hw": "small"}),  # eu: assign web 1.4.0
    view("n-02", {"region": "eu-west", "hw": "small"}, image_id=IMAGE_B, generation=4),
    view(
        "n-03",
        {"region": "eu-west", "hw": "medium"},
        report=report(facts=nodereport.Facts(**{**FACTS.as_dict(), "guest_cpus": 1})),
    ),
    view(
        "n-04",
        {"region": "eu-west", "hw": "small"},
        report=report(facts=nodereport.Facts(**{**FACTS.as_dict(), "cpu_flags": ("sse",)})),
    ),
    view("n-05", {"hw": "huge"}),  # big: 8 vCPUs on 3
    view("n-06", {"site": "x"}, image_id=IMAGE_B, generation=2),  # rest: assign web 1.3.0
    view("n-07", {"site": "x"}, report=None, report_problem="no report yet"),
    view("n-08", {"site": "x"}, revoked=True),
    view(
        "n-09",
        {"region": "eu-west", "hw": "small"},
        report=report(facts=nodereport.Facts(**{**FACTS.as_dict(), "memory_mb": 1024})),
    ),
    view(
        "n-10",
        {"region": "eu-west", "hw": "small"},
        report=report(facts=nodereport.Facts(**{**FACTS.as_dict(), "disk_free_mb": 256})),
    ),
    view(
        "n-11",
        {"region": "eu-west", "hw": "small"},
        report=report(
            facts=nodereport.Facts(
                **{**FACTS.as_dict(), "disk_free_mb": 0, "local_images": (IMAGE_B,)}
            )
        ),
    ),
    NodeView("n-12", labels.labels_of(["edgepin-label:hw=a", "edgepin-label:hw=b"])),
    view("n-13", {"region": "eu-west", "hw": "small"}, report=report(facts=None)),
]


def test_the_plan_explains_every_node() -> None:
    p = placement.plan(FLEET, placement.load(FILE), [WEB_13, WEB_14, BIG])
    got = {e.node: (e.action, e.reason) for e in p.entries}
    assert got["n-01"] == (Action.ASSIGN, "eu places web 1.4.0")
    assert got["n-02"] == (Action.UNCHANGED, "assigned already")
    assert got["n-03"] == (Action.LEFT_OUT, "web 1.4.0 wants 2 vCPUs; the node has 1 for guests")
    assert got["n-04"] == (Action.LEFT_OUT, "the node's CPU lacks avx2")
    assert got["n-05"][1] == "big 1 wants 8 vCPUs; the node has 3 for guests"
    assert got["n-06"] == (Action.ASSIGN, "rest places web 1.3.0")
    assert got["n-07"] == (Action.LEFT_OUT, "no report yet")
    assert got["n-08"] == (Action.LEFT_OUT, "revoked")
    assert got["n-09"][1] == "web 1.4.0 wants 2048 MiB; the node has 1024 MiB"
    assert got["n-10"][1] == "web 1.4.0 needs 300 MiB of disk; the node has 256 MiB free for images"
    assert got["n-11"][0] is Action.ASSIGN  # it holds the image already: no disk needed
    assert got["n-12"] == (Action.LEFT_OUT, "label hw has two values (a|b)")
    assert got["n-13"][1].startswith("its report has no facts")
    assert [e.node for e in p.entries] == sorted(got)
    text = p.text()
    assert text.splitlines()[0] == "plan: 3 to assign, 1 unchanged, 9 left out (13 nodes)"
    assert "assign     n-06  web 1.4.0 (gen 2) -> web 1.3.0  [rule rest]" in text
    assert text.endswith(f"digest {p.digest}\n")


def test_no_rule_selects_it() -> None:
    p = placement.parse(
        {"placement": 1, "rules": [{"name": "a", "select": {"s": "y"}, "image": {"id": IMAGE_A}}]}
    )
    (e,) = placement.plan([view("n", {"s": "x", "t": "1"})], p, [WEB_13]).entries
    assert (e.action, e.reason) == (Action.LEFT_OUT, "no rule selects it (labels: s=x,t=1)")


def test_a_node_without_a_usb_device_the_image_asks_for_is_left_out() -> None:
    record = {"id": IMAGE_A, "name": "cam", "edgepin_version": "1", "edgepin_usb": "0627:0001"}
    cam = placement.image_of(record)
    assert cam.usb == ("0627:0001",)
    with pytest.raises(PlacementError, match="edgepin_usb"):
        placement.image_of({**record, "edgepin_usb": "keyboard"})
    p = placement.parse(
        {"placement": 1, "rules": [{"name": "a", "select": {"s": "x"}, "image": {"id": IMAGE_A}}]}
    )
    with_it = nodereport.Facts(**{**FACTS.as_dict(), "usb": ("0627:0001", "1d6b:0002")})
    fleet = [
        view("n-1", {"s": "x"}, report=report(facts=with_it)),
        view("n-2", {"s": "x"}),
    ]
    got = {e.node: (e.action, e.reason) for e in placement.plan(fleet, p, [cam]).entries}
    assert got["n-1"] == (Action.ASSIGN, "a places cam 1")
    assert got["n-2"] == (Action.LEFT_OUT, "cam 1 needs USB device 0627:0001; the node has none")


def test_a_node_without_exactly_one_pci_device_the_image_asks_for_is_left_out() -> None:
    record = {"id": IMAGE_A, "name": "nvr", "edgepin_version": "1", "edgepin_pci": "class:0c03"}
    nvr = placement.image_of(record)
    assert nvr.pci == ("class:0c03",)
    with pytest.raises(PlacementError, match="edgepin_pci"):
        placement.image_of({**record, "edgepin_pci": "usb-controller"})
    p = placement.parse(
        {"placement": 1, "rules": [{"name": "a", "select": {"s": "x"}, "image": {"id": IMAGE_A}}]}
    )
    one = ("0000:00:02.0=020000", "0000:00:1d.0=0c0330")
    two = (*one, "0000:00:1e.0=0c0320")
    fleet = [
        view("n-1", {"s": "x"}, report=report(facts=replace(FACTS, pci=one))),
        view("n-2", {"s": "x"}, report=report(facts=replace(FACTS, pci=two))),
        view("n-3", {"s": "x"}),
    ]
    got = {e.node: (e.action, e.reason) for e in placement.plan(fleet, p, [nvr]).entries}
    assert got["n-1"] == (Action.ASSIGN, "a places nvr 1")
    assert got["n-2"] == (Action.LEFT_OUT, "nvr 1 needs PCI device class:0c03; the node has 2")
    assert got["n-3"] == (Action.LEFT_OUT, "nvr 1 needs PCI device class:0c03; the node has 0")


def test_a_rule_whose_image_is_not_one_published_image_is_an_error() -> None:
    p = placement.load(FILE)
    with pytest.raises(PlacementError, match=f"no active edgepin image is {IMAGE_C}"):
        placement.plan(FLEET, p, [WEB_13, WEB_14])
    twin = Image("9" * 8 + "-9999-9999-9999-" + "9" * 12, "web", "1.4.0", 1, 256, 1)
    with pytest.raises(PlacementError, match=r"2 images are web 1\.4\.0"):
        placement.plan(FLEET, p, [WEB_13, WEB_14, BIG, twin])


def test_the_same_inputs_give_the_same_plan_byte_for_byte() -> None:
    p = placement.load(FILE)
    first = placement.plan(FLEET, p, [WEB_13, WEB_14, BIG], {IMAGE_C: "big 1"})
    for seed in range(5):
        fleet, images = list(FLEET), [BIG, WEB_14, WEB_13]
        random.Random(seed).shuffle(fleet)
        random.Random(seed).shuffle(images)
        again = placement.plan(fleet, placement.load(FILE), images, {IMAGE_C: "big 1"})
        assert again.text() == first.text() and again.digest == first.digest


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["eu-west", "us", "x"]),
            st.sampled_from(["small", "medium", "huge"]),
            st.sampled_from([None, IMAGE_A, IMAGE_B]),
            st.integers(0, 8),
            st.booleans(),
            st.sampled_from(list(State)),
        ),
        max_size=12,
    )
)
def test_every_node_gets_one_entry_and_a_reason(rows: list[tuple[Any, ...]]) -> None:
    fleet = []
    for i, (region, hw, image, cpus, has_report, state) in enumerate(rows):
        facts = nodereport.Facts(**{**FACTS.as_dict(), "guest_cpus": min(cpus, 4)})
        rep = report(node=f"n{i}", facts=facts, state=state) if has_report else None
        fleet.append(
            view(f"n{i}", {"region": region, "hw": hw}, image_id=image, generation=1, report=rep)
        )
    p = placement.plan(fleet, placement.load(FILE), [WEB_13, WEB_14, BIG])
    assert sorted(e.node for e in p.entries) == sorted(n.node_id for n in fleet)
    for e in p.entries:
        assert e.reason
        if e.action is Action.ASSIGN:
            assert e.target and e.target != e.current and e.rule
