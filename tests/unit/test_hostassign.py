"""Signed host assignments, and the node's checks of the release they name: what the
operator signs for a node is what it installs, for that node only, a kind apart from the
guest's; a release record that is not the signed one, or whose approvals do not count on
the node, is refused with edgepin's own error, whatever the input."""

from __future__ import annotations

import base64
import calendar
import json
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from provisioner import assignment, hostassign, tpm
from provisioner.errors import ImageError, UsageError, VerificationError
from provisioner.hostassign import HostAssignment, Restart
from provisioner.node import hostfetch
from provisioner.node.config import NodeConfig
from provisioner.signing import StreamSigner, fingerprint
from tests.certs import self_signed
from tests.unit.fakes import IMAGE_A, IMAGE_B, json_values

pytestmark = pytest.mark.unit

KEY = ec.generate_private_key(ec.SECP384R1())
CERT = self_signed(KEY, "assignments")
OTHER_KEY = ec.generate_private_key(ec.SECP384R1())
OTHER_CERT = self_signed(OTHER_KEY, "someone else")
PINNED = {fingerprint(CERT): CERT}
NODE = "p" * 32
NAME = "node-0042"
SHA = "cd" * 64
AT = "2026-12-06T02:00:00Z"
WANT = HostAssignment(IMAGE_A, SHA, 1764940001, 2, AT, Restart("02:00-04:00"))


def record(a: HostAssignment = WANT, key: Any = KEY, node: str = NODE, name: str = NAME) -> Any:
    return hostassign.sign(key, CERT if key is KEY else OTHER_CERT, node, name, a)


def test_what_is_signed_for_this_node_is_what_it_installs() -> None:
    assert hostassign.verify(record(), PINNED, NODE, NAME) == WANT
    assert hostassign.verify(json.dumps(record()), PINNED, NODE, NAME) == WANT
    assert hostassign.verify(None, PINNED, NODE, NAME) is None
    assert hostassign.verify("", PINNED, NODE, NAME) is None
    # the readable copy is the operator's; the node reads the signed payload only
    changed = {**record(), "host_version": 1, "image_id": IMAGE_B}
    assert hostassign.verify(changed, PINNED, NODE, NAME) == WANT
    assert hostassign.previous(record(), CERT, NODE, NAME) == WANT
    assert hostassign.previous(record(key=OTHER_KEY), CERT, NODE, NAME) is None


def test_another_node_another_key_or_a_change_is_refused() -> None:
    with pytest.raises(VerificationError, match="another node"):
        hostassign.verify(record(node="q" * 32), PINNED, NODE, NAME)
    with pytest.raises(VerificationError, match="another node"):
        hostassign.verify(record(name="node-0043"), PINNED, NODE, NAME)
    with pytest.raises(VerificationError, match="not pinned"):
        hostassign.verify(record(key=OTHER_KEY), PINNED, NODE, NAME)
    rec = record()
    body = json.loads(base64.b64decode(rec["signed"]["payload"]))
    forged = base64.b64encode(json.dumps({**body, "host_version": 9}).encode()).decode()
    with pytest.raises(VerificationError, match="host assignment's signature"):
        hostassign.verify({"signed": {**rec["signed"], "payload": forged}}, PINNED, NODE, NAME)
    with pytest.raises(ImageError, match="host assignment is not signed"):
        hostassign.verify({"host_version": 5}, PINNED, NODE, NAME)


def test_a_guest_assignment_and_a_host_assignment_are_never_taken_for_each_other() -> None:
    guest = assignment.sign(KEY, CERT, NODE, NAME, IMAGE_A, SHA, 2, AT)
    with pytest.raises(VerificationError, match="not an edgepin host assignment"):
        hostassign.verify(guest, PINNED, NODE, NAME)
    with pytest.raises(VerificationError, match="not an edgepin assignment"):
        assignment.verify(record(), PINNED, NODE, NAME)


def at(hhmm: str) -> float:
    h, m = hhmm.split(":")
    return calendar.timegm((2026, 12, 6, int(h), int(m), 0))


@pytest.mark.parametrize(
    ("when", "inside", "outside"),
    [
        ("now", ["00:00", "13:37"], []),
        ("never", [], ["00:00", "13:37", "23:59"]),
        ("02:00-04:00", ["02:00", "03:59"], ["01:59", "04:00", "14:00"]),
        ("22:30-01:15", ["22:30", "23:59", "00:00", "01:14"], ["01:15", "12:00", "22:29"]),
    ],
)
def test_the_restart_is_now_never_or_inside_a_daily_window_in_utc(
    when: str, inside: list[str], outside: list[str]
) -> None:
    r = hostassign.restart(when)
    assert [t for t in inside if r.due(at(t))] == inside
    assert [t for t in outside if r.due(at(t))] == []


@pytest.mark.parametrize("bad", ["", "soon", "2:00-4:00", "02:00-02:00", "24:00-01:00", 5, None])
def test_a_restart_that_is_no_window_is_refused(bad: Any) -> None:
    with pytest.raises(ImageError):
        hostassign.restart(bad)
    if isinstance(bad, str):
        with pytest.raises(UsageError, match="HH:MM-HH:MM"):
            hostassign.restart_option(bad)


def sign_payload(doc: Any) -> dict[str, Any]:
    data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    s = StreamSigner(KEY, "SHA-512")
    s.update(data)
    return {
        "signed": {
            "payload": base64.b64encode(data).decode(),
            "signature": s.signature(),
            "certificate_sha256": fingerprint(CERT),
            "key_type": "ECC_SECP384R1",
        }
    }


BODY = json.loads(base64.b64decode(record()["signed"]["payload"]))


@settings(max_examples=300)
@given(
    st.one_of(
        json_values,
        st.text(max_size=80),
        st.dictionaries(
            st.sampled_from(sorted(BODY)), st.one_of(json_values, st.integers()), max_size=4
        ).map(lambda change: sign_payload({**BODY, **change})),
        json_values.map(sign_payload),
    )
)
def test_any_record_gives_a_host_assignment_or_edgepins_own_error(raw: Any) -> None:
    try:
        got = hostassign.verify(raw, PINNED, NODE, NAME)
    except (ImageError, VerificationError):
        return
    assert got is None or isinstance(got, HostAssignment)
    if got is not None:
        assert 1 <= got.host_version and 1 <= got.generation
        assert got.restart.when in ("now", "never") or got.restart.window is not None


# ------------------------------------------------------------------ the release, on the node

RELEASE: dict[str, Any] = {
    "id": IMAGE_A,
    "edgepin_kind": "host-update",
    "disk_format": "raw",
    "os_hash_algo": "sha512",
    "os_hash_value": SHA,
    "edgepin_host_version": str(WANT.host_version),
    "img_signature": "c2ln",
    "img_signature_hash_method": "SHA-512",
    "img_signature_key_type": "RSA-PSS",
    "img_signature_certificate_uuid": "u" * 36,
    "size": 200 << 20,
}


def test_the_release_record_is_the_signed_one_or_refused() -> None:
    hostfetch.check_release(RELEASE, WANT)
    changes: list[tuple[dict[str, Any], str]] = [
        ({"edgepin_kind": None}, "not a host release"),
        ({"disk_format": "qcow2"}, "not a host release"),
        ({"os_hash_value": "ef" * 64}, "sha512 differs"),
        ({"edgepin_host_version": "1764940002"}, "not host version"),
        ({"img_signature": ""}, "not signed"),
        ({"size": 5 << 30}, "too large"),
        ({"name": "x" * 5000}, "malformed"),
    ]
    for change, error in changes:
        with pytest.raises((ImageError, VerificationError), match=error):
            hostfetch.check_release({**RELEASE, **change}, WANT)


@settings(max_examples=200)
@given(st.dictionaries(st.sampled_from(sorted(RELEASE)), json_values, max_size=3))
def test_any_release_record_passes_only_as_signed_or_gives_edgepins_own_error(
    change: dict[str, Any],
) -> None:
    try:
        hostfetch.check_release({**RELEASE, **change}, WANT)
    except (ImageError, VerificationError):
        return
    for key in ("edgepin_kind", "os_hash_value", "edgepin_host_version", "disk_format"):
        assert change.get(key, RELEASE[key]) == RELEASE[key]


RELEASE_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_RELEASE_KEY = ec.generate_private_key(ec.SECP256R1())


def node_with_release_key(tmp_path: Path) -> NodeConfig:
    cfg = NodeConfig(root=tmp_path)
    cfg.release_key_path.parent.mkdir(parents=True, exist_ok=True)
    cfg.release_key_path.write_bytes(
        RELEASE_KEY.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return cfg


def approval(
    key: ec.EllipticCurvePrivateKey, pcrs: tuple[int, ...], fill: int, epoch: int = 0
) -> Any:
    return json.loads(tpm.sign_approval(key, {p: bytes([fill]) * 32 for p in pcrs}, epoch))


def test_a_release_approved_only_below_the_host_floor_is_refused(tmp_path: Path) -> None:
    cfg = node_with_release_key(tmp_path)
    old, new = approval(RELEASE_KEY, cfg.pcrs, 1, epoch=2), approval(RELEASE_KEY, cfg.pcrs, 2, 3)
    release = {**RELEASE, hostfetch.APPROVALS_PROPERTY: json.dumps([old, new])}
    assert len(hostfetch.release_approvals(cfg, release, floor=2)) == 2
    kept = hostfetch.release_approvals(cfg, release, floor=3)
    assert [json.loads(k) for k in kept] == [new]  # the one below the floor is not kept
    with pytest.raises(ImageError, match=r"only at epoch 3, below this node's host floor \(4\)"):
        hostfetch.release_approvals(cfg, release, floor=4)


def test_only_approvals_of_the_nodes_key_and_pcrs_go_with_the_release(tmp_path: Path) -> None:
    plain = NodeConfig(root=tmp_path / "plain")
    assert hostfetch.release_approvals(plain, RELEASE) == []  # no release key: none needed
    cfg = node_with_release_key(tmp_path)
    good_a, good_b = approval(RELEASE_KEY, cfg.pcrs, 1), approval(RELEASE_KEY, cfg.pcrs, 2)
    docs = [
        good_a,
        approval(OTHER_RELEASE_KEY, cfg.pcrs, 3),  # another key's
        approval(RELEASE_KEY, (4, 7), 4),  # other PCRs
        {"version": 1, "kind": "pcr-approval"},
        good_b,
    ]
    kept = hostfetch.release_approvals(
        cfg, {**RELEASE, hostfetch.APPROVALS_PROPERTY: json.dumps(docs)}
    )
    assert [json.loads(k) for k in kept] == [good_a, good_b]
    for value in (None, "[]", json.dumps(docs[1:4]), "{", json.dumps([good_a] * 9)):
        with pytest.raises(ImageError):
            hostfetch.release_approvals(cfg, {**RELEASE, hostfetch.APPROVALS_PROPERTY: value})


GOOD = approval(RELEASE_KEY, NodeConfig().pcrs, 1)
PEM = RELEASE_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)


@settings(max_examples=200)
@given(
    st.one_of(json_values, st.text()),
    st.lists(json_values, max_size=4),
    st.booleans(),
)
def test_no_approvals_property_makes_an_approval_that_counts(
    value: Any, docs: list[Any], with_good: bool
) -> None:
    cfg = NodeConfig(root=Path("/nonexistent/edgepin-unit"))
    with mock.patch("provisioner.node.policy.release_key", return_value=PEM):
        for anything in (value, json.dumps(docs)):
            with pytest.raises(ImageError):
                hostfetch.release_approvals(
                    cfg, {**RELEASE, hostfetch.APPROVALS_PROPERTY: anything}
                )
        mixed = json.dumps([*docs, GOOD] if with_good else docs)
        if with_good:
            kept = hostfetch.release_approvals(
                cfg, {**RELEASE, hostfetch.APPROVALS_PROPERTY: mixed}
            )
            assert [json.loads(k) for k in kept] == [GOOD]
