"""The node's report: what it says, when it is written, and how the operator reads it (any
text gives a report of that node or a ReportError, nothing else)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from provisioner import nodereport
from provisioner.errors import Reason
from provisioner.node import facts
from provisioner.node.model import State
from provisioner.operator import nodes, reports
from tests.unit.fakes import IMAGE_A, IMAGE_B, json_values

pytestmark = pytest.mark.unit

FACTS = nodereport.Facts(
    cpus=4,
    guest_cpus=3,
    memory_mb=7936,
    disk_free_mb=20480,
    cpu_model="Intel(R) Xeon(R) CPU",
    cpu_flags=("avx2", "sse4_2", "vmx"),
    host="Debian GNU/Linux 13 (trixie)",
    kernel="6.12.0-1-amd64",
    virt_type="kvm",
    edgepin_version="0.1.0",
    local_images=(IMAGE_A,),
)


def report(**changes: Any) -> nodereport.NodeReport:
    base: dict[str, Any] = {
        "node": "node-1",
        "reported_at": "2026-12-03T10:00:00Z",
        "state": State.RUNNING,
        "reason": f"guest {IMAGE_A} running",
        "error": None,
        "assignment": nodereport.Ref(IMAGE_A, 3),
        "running": nodereport.Ref(IMAGE_A, 3),
        "running_version": "1.4.0",
        "facts": FACTS,
    }
    return nodereport.NodeReport(**{**base, **changes})


def test_a_report_reads_back_as_written() -> None:
    for r in (
        report(),
        report(facts=None, running=None, assignment=None, running_version=""),
        report(state=State.REFUSED, error=Reason.GUEST, reason="image wants 8 vCPUs"),
        report(facts=replace(FACTS, pci=("0000:00:1d.0=0c0330",))),
    ):
        assert nodereport.parse(r.text(), "node-1") == r
    # canonical: sorted keys, no spaces
    text = report().text()
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))


def test_the_host_version_reads_back_and_an_older_node_s_report_has_none() -> None:
    r = report(facts=replace(FACTS, host_version=1764940000))
    assert nodereport.parse(r.text(), "node-1").facts == r.facts
    doc = json.loads(report().text())
    del doc["facts"]["host_version"]  # a node from before host versions
    got = nodereport.parse(json.dumps(doc), "node-1").facts
    assert got is not None and got.host_version == 0
    for bad in (-1, True, "7", 2**63):
        doc["facts"]["host_version"] = bad
        with pytest.raises(nodereport.ReportError, match="host_version"):
            nodereport.parse(json.dumps(doc), "node-1")


def test_the_host_slot_and_fallback_read_back_and_an_older_node_s_report_has_none() -> None:
    r = report(facts=replace(FACTS, host_slot="b", host_fallback=1764940000))
    assert nodereport.parse(r.text(), "node-1").facts == r.facts
    r = report(facts=replace(FACTS, host_next=1764940001, host_refused="not pinned: refused"))
    assert nodereport.parse(r.text(), "node-1").facts == r.facts
    r = report(facts=replace(FACTS, host_watchdog="iTCO_wdt, 120 s"))
    assert nodereport.parse(r.text(), "node-1").facts == r.facts
    r = report(facts=replace(FACTS, host_epoch=3, host_floor=2))
    assert nodereport.parse(r.text(), "node-1").facts == r.facts
    doc = json.loads(report().text())
    for key in (
        "host_slot",
        "host_fallback",
        "host_next",
        "host_refused",
        "host_watchdog",
        "host_epoch",
        "host_floor",
    ):
        del doc["facts"][key]  # from before root slots, host assignments, watchdog, floor
    got = nodereport.parse(json.dumps(doc), "node-1").facts
    assert got is not None and (got.host_slot, got.host_fallback) == ("", 0)
    assert (got.host_next, got.host_refused, got.host_watchdog) == (0, "", "")
    assert (got.host_epoch, got.host_floor) == (0, 0)
    for key, bad in (
        ("host_slot", "c"),
        ("host_slot", 1),
        ("host_fallback", -1),
        ("host_next", "5"),
        ("host_refused", "x\x1b[2J"),
        ("host_refused", "x" * 600),
        ("host_watchdog", "x" * 200),
        ("host_watchdog", 120),
        ("host_epoch", 64),
        ("host_floor", -1),
        ("host_floor", "1"),
    ):
        changed = json.loads(json.dumps(doc))
        changed["facts"][key] = bad
        with pytest.raises(nodereport.ReportError, match=key):
            nodereport.parse(json.dumps(changed), "node-1")


def test_a_report_for_another_node_or_malformed_is_refused() -> None:
    with pytest.raises(nodereport.ReportError, match="another node"):
        nodereport.parse(report().text(), "node-2")
    doc = report().as_dict()
    for key, bad in (
        ("kind", "edgepin-node-report/2"),
        ("state", "happy"),
        ("error", "meltdown"),
        ("reason", "x" * 600),
        ("reason", "\x1b[31mred"),
        ("assignment", {"image_id": "../etc", "generation": 1}),
        ("running", {"image_id": IMAGE_A, "generation": -1}),
        ("running", {"image_id": IMAGE_A, "generation": True}),
        ("facts", {**FACTS.as_dict(), "guest_cpus": 5}),
        ("facts", {**FACTS.as_dict(), "cpu_flags": ["AVX2"]}),
        ("facts", {**FACTS.as_dict(), "virt_type": "lxc"}),
        ("facts", {**FACTS.as_dict(), "memory_mb": 2**41}),
        ("facts", {**FACTS.as_dict(), "local_images": ["x"]}),
        ("facts", {**FACTS.as_dict(), "pci": ["0000:00:1d.0"]}),
        ("facts", {**FACTS.as_dict(), "pci": ["0000:00:1d.0=0c03"]}),
        ("facts", {**FACTS.as_dict(), "pci": "0000:00:1d.0=0c0330"}),
        ("facts", []),
    ):
        with pytest.raises(nodereport.ReportError):
            nodereport.parse(json.dumps({**doc, key: bad}), "node-1")
    with pytest.raises(nodereport.ReportError, match="longer"):
        nodereport.parse(" " * (nodereport.MAX_TEXT + 1), "node-1")


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_json_is_a_report_or_a_report_error(value: Any) -> None:
    for text in (json.dumps(value), value):
        try:
            got = nodereport.parse(text, "node-1")
        except nodereport.ReportError:
            continue
        assert got.node == "node-1"


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.sampled_from([*report().as_dict(), "extra"]), json_values, max_size=10),
    st.dictionaries(st.sampled_from(list(FACTS.as_dict())), json_values, max_size=11),
)
def test_a_report_with_any_fields_replaced_parses_or_is_refused(
    top: dict[str, Any], inner: dict[str, Any]
) -> None:
    doc = {**report().as_dict(), **top}
    if isinstance(doc.get("facts"), dict):
        doc["facts"] = {**doc["facts"], **inner}
    try:
        got = nodereport.parse(json.dumps(doc), "node-1")
    except nodereport.ReportError:
        return
    assert got.text() == nodereport.parse(got.text(), "node-1").text()


def test_written_when_it_changed_or_when_due_again() -> None:
    r = report()
    d = nodereport.digest(r)
    assert nodereport.due(r, None, None, 1000.0, 3600)
    assert not nodereport.due(r, d, 1000.0, 1000.0 + 3599, 3600)
    assert nodereport.due(r, d, 1000.0, 1000.0 + 3600, 3600)
    assert nodereport.due(r, d, 1000.0, 999.0, 3600)  # the clock went back
    # the time alone is no change; the outcome, a fact or the running image is
    assert nodereport.digest(report(reported_at="2027-01-01T00:00:00Z")) == d
    assert nodereport.digest(report(state=State.OFFLINE)) != d
    changed = nodereport.Facts(**{**FACTS.as_dict(), "cpu_flags": ("avx2",), "local_images": ()})
    assert nodereport.digest(report(facts=changed)) != d


CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz
flags\t\t: fpu vme avx2 sse4_2 vmx BAD:FLAG avx2

processor\t: 1
model name\t: something else
flags\t\t: fpu
"""


def test_cpu_model_and_flags_from_cpuinfo() -> None:
    model, flags = facts.cpu_model_and_flags(CPUINFO)
    assert model == "Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz"
    assert flags == ("avx2", "fpu", "sse4_2", "vme", "vmx")
    assert facts.cpu_model_and_flags("") == ("unknown", ())


def test_host_from_os_release(tmp_path: Path) -> None:
    assert facts.os_release(tmp_path) == "unknown"
    (tmp_path / "usr/lib").mkdir(parents=True)
    (tmp_path / "usr/lib/os-release").write_text('NAME="Debian"\nPRETTY_NAME="Debian 13"\n')
    assert facts.os_release(tmp_path) == "Debian 13"


def test_free_disk_in_steps(tmp_path: Path) -> None:
    free = facts.disk_free_mb(tmp_path / "not" / "yet")
    assert free % nodereport.DISK_QUANTUM_MB == 0 and free >= 0


def node(name: str, report_image: str | None, project_id: str = "") -> nodes.Node:
    project: dict[str, Any] = {"id": project_id or name * 4}
    if report_image:
        project["edgepin_report_image"] = report_image
    return nodes.Node(name, project, {"id": "u-" + name})


def test_the_operator_takes_a_report_only_from_the_node_s_own_record() -> None:
    a, b, c, d, e = "node-a", "node-b", "node-c", "node-d", "node-e"
    fleet = [
        node(a, IMAGE_A),
        node(b, IMAGE_B),
        node(c, None),
        node(d, "1" * 8 + "-1111-1111-1111-" + "1" * 12),
        node(e, "2" * 8 + "-2222-2222-2222-" + "2" * 12),
    ]
    text_a = report(node=a).text()
    images = [
        {"id": IMAGE_A, "owner": a * 4, "edgepin_report": text_a, "updated_at": "T1"},
        # b's record holds a's report: written for another node
        {"id": IMAGE_B, "owner": b * 4, "edgepin_report": text_a, "updated_at": "T2"},
        # d's record is owned by someone else
        {"id": "1" * 8 + "-1111-1111-1111-" + "1" * 12, "owner": "x", "edgepin_report": text_a},
    ]
    seen = reports.match(fleet, images)
    assert seen[a].report == report(node=a) and seen[a].seen_at == "T1"
    assert seen[b].report is None and "another node" in (seen[b].problem or "")
    assert seen[c].report is None and "enroll again" in (seen[c].problem or "")
    assert "not the node's" in (seen[d].problem or "")
    assert "gone" in (seen[e].problem or "")
    images[0].pop("edgepin_report")
    assert reports.match(fleet, images)[a].problem == "no report yet"


def test_the_status_table_s_host_column_says_version_slot_and_fallback() -> None:
    from provisioner.fleetcli import _host

    assert _host({"host_version": None}) == "-"
    assert _host({"host_version": 7, "host_slot": None, "host_fallback": None}) == "7"
    assert _host({"host_version": 7, "host_slot": "b", "host_fallback": None}) == "7 (slot b)"
    row = {"host_version": 7, "host_slot": "a", "host_fallback": 8}
    assert _host(row) == "7 (slot a); FELL BACK from 8"
    row = {"host_version": 7, "host_slot": "a", "host_assigned": 9}
    assert _host(row) == "7 (slot a); ASSIGNED 9"
    assert _host({**row, "host_next": 9}) == "7 (slot a); NEXT 9"
    assert _host({**row, "host_refused": "not pinned"}) == "7 (slot a); REFUSED 9"
    assert _host({**row, "host_assigned": 7}) == "7 (slot a)"  # done
    assert _host({**row, "host_fallback": 9}) == "7 (slot a); FELL BACK from 9"
