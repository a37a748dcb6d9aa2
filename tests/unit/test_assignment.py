"""Signed assignments: what the operator signs is exactly what the node runs, for that node
only; anything else is refused with edgepin's own error, whatever the input."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from provisioner import assignment
from provisioner.errors import ImageError, VerificationError
from provisioner.node.model import (
    IMAGE_ID,
    MAX_VCPUS,
    MEMORY_MB,
    Assignment,
    GuestNetwork,
    GuestResources,
    assigned_guest,
)
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
SHA = "ab" * 64
AT = "2026-12-02T13:00:00Z"


def signed(
    node: str = NODE, image_id: str = IMAGE_A, gen: int = 3, key: Any = KEY, name: str = NAME
) -> Any:
    cert = CERT if key is KEY else OTHER_CERT
    return assignment.sign(key, cert, node, name, image_id, SHA, gen, AT)


def test_what_is_signed_for_this_node_is_what_it_runs() -> None:
    record = signed()
    assert assignment.verify(record, PINNED, NODE, NAME) == Assignment(IMAGE_A, 3, SHA, AT)
    # as Keystone may hand it back: JSON text
    assert assignment.verify(json.dumps(record), PINNED, NODE, NAME) == Assignment(
        IMAGE_A, 3, SHA, AT
    )
    assert assignment.verify(None, PINNED, NODE, NAME) is None
    assert assignment.verify("", PINNED, NODE, NAME) is None


def test_an_rsa_key_signs_too() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = self_signed(key)
    record = assignment.sign(key, cert, NODE, NAME, IMAGE_B, SHA, 9, AT)
    got = assignment.verify(record, {fingerprint(cert): cert}, NODE, NAME)
    assert got == Assignment(IMAGE_B, 9, SHA, AT)


def test_the_readable_copies_are_not_what_the_node_reads() -> None:
    record = {**signed(), "image_id": IMAGE_B, "generation": 99, "image_sha512": "cd" * 64}
    assert assignment.verify(record, PINNED, NODE, NAME) == Assignment(IMAGE_A, 3, SHA, AT)


def test_an_unsigned_record_is_refused() -> None:
    with pytest.raises(ImageError, match="not signed"):
        assignment.verify({"image_id": IMAGE_A, "generation": 3}, PINNED, NODE, NAME)
    with pytest.raises(ImageError, match="not signed"):
        assignment.verify({**signed(), "signed": {"payload": "x"}}, PINNED, NODE, NAME)


def test_a_record_signed_for_another_node_is_refused() -> None:
    with pytest.raises(VerificationError, match="another node"):
        assignment.verify(signed(node="q" * 32), PINNED, NODE, NAME)


def test_a_record_signed_for_this_project_under_another_nodes_name_is_refused() -> None:
    """Projects renamed in Keystone: the operator assigned "node-lab", whose name now
    points at this node's project."""
    with pytest.raises(VerificationError, match="another node"):
        assignment.verify(signed(name="node-lab"), PINNED, NODE, NAME)


def test_a_record_signed_by_a_key_that_is_not_pinned_is_refused() -> None:
    with pytest.raises(VerificationError, match="not pinned"):
        assignment.verify(signed(key=OTHER_KEY), PINNED, NODE, NAME)
    with pytest.raises(VerificationError, match="no assignment-signing certificate"):
        assignment.verify(signed(), {}, NODE, NAME)


def test_a_changed_payload_or_signature_is_refused() -> None:
    record = signed()
    body = json.loads(base64.b64decode(record["signed"]["payload"]))
    for change in ({"generation": 4}, {"image_id": IMAGE_B}, {"image_sha512": "cd" * 64}):
        forged = json.dumps({**body, **change}, sort_keys=True, separators=(",", ":"))
        bad = {**record["signed"], "payload": base64.b64encode(forged.encode()).decode()}
        with pytest.raises(VerificationError, match="signature"):
            assignment.verify({**record, "signed": bad}, PINNED, NODE, NAME)
    # another record's signature, the certificate claimed by fingerprint kept
    other = signed(gen=4)["signed"]["signature"]
    with pytest.raises(VerificationError, match="signature"):
        assignment.verify(
            {**record, "signed": {**record["signed"], "signature": other}}, PINNED, NODE, NAME
        )


def test_a_well_signed_payload_that_is_no_assignment_is_refused() -> None:
    """Even what a pinned key signed is read field by field (an operator tool's bug)."""
    for node, image_id, sha, gen in (
        (NODE, "../../etc/passwd", SHA, 1),
        (NODE, IMAGE_A, "x" * 128, 1),
        (NODE, IMAGE_A, SHA, -1),
        (NODE, IMAGE_A, SHA, 2**64),
    ):
        record = assignment.sign(KEY, CERT, node, NAME, image_id, sha, gen, AT)
        with pytest.raises(ImageError):
            assignment.verify(record, PINNED, NODE, NAME)


def test_malformed_signed_blocks_are_refused_with_edgepins_errors() -> None:
    good = signed()["signed"]
    cases: list[tuple[Any, type[Exception], str]] = [
        ("x" * (assignment.MAX_RECORD + 1), ImageError, "too long"),
        ({**signed(), "signed": {**good, "payload": "not base64!"}}, VerificationError, "base64"),
        (
            {**signed(), "signed": {**good, "certificate_sha256": "AB" * 32}},
            VerificationError,
            "fingerprint",
        ),
        ({**signed(), "signed": {**good, "key_type": "DSA"}}, VerificationError, "key_type"),
    ]
    for raw, error, why in cases:
        with pytest.raises(error, match=why):
            assignment.verify(raw, PINNED, NODE, NAME)


def test_a_signed_payload_of_another_kind_or_with_a_bad_time_is_refused() -> None:
    body = json.loads(base64.b64decode(signed()["signed"]["payload"]))
    with pytest.raises(VerificationError, match="not an edgepin assignment"):
        assignment.verify(sign_payload({**body, "kind": "edgepin-image/1"}), PINNED, NODE, NAME)
    with pytest.raises(ImageError, match="time"):
        assignment.verify(sign_payload({**body, "assigned_at": "\x1b[2J"}), PINNED, NODE, NAME)
    assert assignment.verify(sign_payload(body), PINNED, NODE, NAME) == Assignment(
        IMAGE_A, 3, SHA, AT
    )


def test_assignment_certificates_are_pinned_apart_or_the_image_ones_sign(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    from provisioner.node.fetch import assignment_pins

    signing, assigning = tmp_path / "signing-certs", tmp_path / "assignment-certs"
    signing.mkdir()
    assigning.mkdir()
    (signing / "image.pem").write_bytes(CERT.public_bytes(serialization.Encoding.PEM))
    # none pinned for assignments: the image-signing certificate signs them
    assert set(assignment_pins(assigning, signing)) == {fingerprint(CERT)}
    assert assignment.verify(signed(), assignment_pins(assigning, signing), NODE, NAME)
    # one pinned apart: only it, and a record signed with the image key is refused
    (assigning / "assign.pem").write_bytes(OTHER_CERT.public_bytes(serialization.Encoding.PEM))
    pins = assignment_pins(assigning, signing)
    assert set(pins) == {fingerprint(OTHER_CERT)}
    with pytest.raises(VerificationError, match="not pinned"):
        assignment.verify(signed(), pins, NODE, NAME)
    assert assignment.verify(signed(key=OTHER_KEY), pins, NODE, NAME)


signed_blocks = st.fixed_dictionaries(
    {},
    optional={
        "payload": st.one_of(st.text(max_size=40), st.just(signed()["signed"]["payload"])),
        "signature": st.one_of(st.text(max_size=40), st.just(signed()["signed"]["signature"])),
        "certificate_sha256": st.one_of(st.text(max_size=70), st.just(fingerprint(CERT))),
        "key_type": st.one_of(st.text(max_size=20), st.sampled_from(["RSA-PSS", "ECC_SECP384R1"])),
    },
)


@settings(max_examples=300)
@given(
    json_values
    | st.text(max_size=80)
    | st.builds(
        lambda s, extra: {"signed": s, **extra},
        signed_blocks,
        st.dictionaries(st.text(max_size=5), json_values, max_size=3),
    )
)
def test_any_record_gives_an_assignment_or_edgepins_own_error(raw: Any) -> None:
    try:
        got = assignment.verify(raw, PINNED, NODE, NAME)
    except (ImageError, VerificationError):
        return
    assert got is None or (IMAGE_ID.fullmatch(got.image_id) and got.image_sha512 == SHA)


def sign_payload(doc: dict[str, Any]) -> dict[str, Any]:
    """A record whose payload is ``doc``, signed with the pinned key."""
    data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    s = StreamSigner(KEY, "SHA-512")
    s.update(data)
    block = {
        "payload": base64.b64encode(data).decode(),
        "signature": s.signature(),
        "certificate_sha256": fingerprint(CERT),
        "key_type": "ECC_SECP384R1",
    }
    return {"signed": block}


NETWORKS = [
    GuestNetwork.LAN,
    GuestNetwork.NONE,
    GuestNetwork.HOST,
    GuestNetwork("vlan:1"),
    GuestNetwork("vlan:4094"),
]


def _is_network(value: Any) -> bool:
    """What a declared network may be, written out independently of the parser."""
    if not isinstance(value, str):
        return False
    if value in ("lan", "none", "host"):
        return True
    number = value.removeprefix("vlan:")
    return (
        value.startswith("vlan:")
        and number.isascii()
        and number.isdigit()
        and not number.startswith("0")
        and 1 <= int(number) <= 4094
    )


def test_the_guest_network_the_image_declares_is_signed_with_the_rest() -> None:
    for network in NETWORKS:
        record = assignment.sign(KEY, CERT, NODE, NAME, IMAGE_A, SHA, 3, AT, None, network)
        got = assignment.verify(record, PINNED, NODE, NAME)
        assert got == Assignment(IMAGE_A, 3, SHA, AT, network)
    # none declared: none in the payload, and the node's own attachment applies
    assert assignment.verify(signed(), PINNED, NODE, NAME).network is None  # type: ignore[union-attr]
    # a rollout's extra fields cannot declare one
    record = assignment.sign(KEY, CERT, NODE, NAME, IMAGE_A, SHA, 3, AT, {"network": "lan"})
    assert assignment.verify(record, PINNED, NODE, NAME).network is None  # type: ignore[union-attr]
    body = json.loads(base64.b64decode(signed()["signed"]["payload"]))
    for bad in ("vlan:0", "vlan:4095", "vlan:07", "vlan:", "VLAN:7", "vlan:7\n", "wifi", ["lan"]):
        with pytest.raises(ImageError, match="guest network"):
            assignment.verify(sign_payload({**body, "network": bad}), PINNED, NODE, NAME)
    assert GuestNetwork("vlan:42").vlan == 42 and GuestNetwork("vlan:42").site
    assert GuestNetwork.HOST.vlan is None and not GuestNetwork.HOST.site


@settings(max_examples=300)
@given(
    st.one_of(
        json_values,
        st.integers(-5, 5000).map(lambda n: f"vlan:{n}"),
        st.text(max_size=8).map(lambda t: f"vlan:{t}"),
        st.sampled_from(["lan", "none", "host", "Lan", "host ", "vlan:٣"]),
    )
)
def test_any_signed_network_gives_a_declared_one_or_edgepins_own_error(value: Any) -> None:
    body = json.loads(base64.b64decode(signed()["signed"]["payload"]))
    try:
        got = assignment.verify(sign_payload({**body, "network": value}), PINNED, NODE, NAME)
    except ImageError:
        assert value is not None and not _is_network(value)
        return
    assert value is None or _is_network(value)
    assert got is not None and got.network == value
    assert got.network is None or isinstance(got.network, GuestNetwork)


def test_the_usb_devices_the_image_declares_are_signed_with_the_rest() -> None:
    usb = ("0627:0001", "1d6b:0002")
    record = assignment.sign(KEY, CERT, NODE, NAME, IMAGE_A, SHA, 3, AT, None, None, usb)
    got = assignment.verify(record, PINNED, NODE, NAME)
    assert got == Assignment(IMAGE_A, 3, SHA, AT, None, usb)
    # a rollout's extra fields cannot add one
    record = assignment.sign(KEY, CERT, NODE, NAME, IMAGE_A, SHA, 3, AT, {"usb": ["dead:beef"]})
    assert assignment.verify(record, PINNED, NODE, NAME).usb == ()  # type: ignore[union-attr]
    body = json.loads(base64.b64decode(signed()["signed"]["payload"]))
    for bad in ("0627:0001", ["0627:1"], ["x" * 9]):
        with pytest.raises(ImageError):
            assignment.verify(sign_payload({**body, "usb": bad}), PINNED, NODE, NAME)


def test_the_pci_devices_the_image_declares_are_signed_with_the_rest() -> None:
    pci = ("0000:03:00.0", "class:0c03")
    record = assignment.sign(KEY, CERT, NODE, NAME, IMAGE_A, SHA, 3, AT, pci=pci)
    got = assignment.verify(record, PINNED, NODE, NAME)
    assert got == Assignment(IMAGE_A, 3, SHA, AT, pci=pci)
    # a rollout's extra fields cannot add one
    record = assignment.sign(KEY, CERT, NODE, NAME, IMAGE_A, SHA, 3, AT, {"pci": ["class:02"]})
    assert assignment.verify(record, PINNED, NODE, NAME).pci == ()  # type: ignore[union-attr]
    body = json.loads(base64.b64decode(signed()["signed"]["payload"]))
    for bad in ("class:0c03", ["class:0c"], ["03:00.0"], ["0000:03:00.8"], [None]):
        with pytest.raises(ImageError):
            assignment.verify(sign_payload({**body, "pci": bad}), PINNED, NODE, NAME)
    # the node takes them from the signed assignment, whatever Glance says afterwards
    image = {"id": IMAGE_A, "edgepin_pci": "0000:00:1f.3"}
    assert assigned_guest(image, Assignment(IMAGE_A, 3, SHA, AT, pci=pci)).pci == pci


def test_the_vcpus_memory_and_health_marker_are_signed_and_win_over_glance() -> None:
    want = GuestResources(2, 512, "READY")
    record = assignment.sign(KEY, CERT, NODE, NAME, IMAGE_A, SHA, 3, AT, None, None, (), want)
    got = assignment.verify(record, PINNED, NODE, NAME)
    assert got == Assignment(IMAGE_A, 3, SHA, AT, None, (), want)
    # the image's properties, changed in Glance after signing, change nothing
    image = {
        "id": IMAGE_A,
        "edgepin_vcpus": "64",
        "edgepin_memory_mb": "16",
        "edgepin_health_marker": "NEVER",
    }
    guest = assigned_guest(image, got)
    assert (guest.vcpus, guest.memory_mb, guest.health_marker) == (2, 512, "READY")
    assert guest.generation == 3
    # a record signed without them (an older edgepin): the image's properties decide
    old = assignment.verify(signed(), PINNED, NODE, NAME)
    assert old is not None and old.resources is None
    guest = assigned_guest(image, old)
    assert (guest.vcpus, guest.memory_mb, guest.health_marker) == (64, 16, "NEVER")
    # a rollout's extra fields cannot set them
    record = assignment.sign(
        KEY, CERT, NODE, NAME, IMAGE_A, SHA, 3, AT, {"resources": {"vcpus": 9, "memory_mb": 99}}
    )
    assert assignment.verify(record, PINNED, NODE, NAME).resources is None  # type: ignore[union-attr]
    # no health marker: none in the payload
    body = json.loads(base64.b64decode(signed()["signed"]["payload"]))
    got = assignment.verify(
        sign_payload({**body, "resources": {"vcpus": 1, "memory_mb": 64}}), PINNED, NODE, NAME
    )
    assert got is not None and got.resources == GuestResources(1, 64, None)
    for bad in (
        {"vcpus": 0, "memory_mb": 64},
        {"vcpus": True, "memory_mb": 64},
        {"vcpus": 1, "memory_mb": "64"},
        {"vcpus": 1, "memory_mb": 64, "health_marker": "\x1b[2J"},
        {"vcpus": 1, "memory_mb": 64, "cpu_model": "host"},
        [1, 64],
    ):
        with pytest.raises(ImageError):
            assignment.verify(sign_payload({**body, "resources": bad}), PINNED, NODE, NAME)


@settings(max_examples=300)
@given(
    st.one_of(
        json_values,
        st.fixed_dictionaries(
            {"vcpus": st.integers(-2, MAX_VCPUS + 2), "memory_mb": st.integers(-1, 1 << 23)},
            optional={"health_marker": st.one_of(st.text(max_size=300), json_values)},
        ),
    )
)
def test_any_signed_resources_give_checked_ones_or_edgepins_own_error(value: Any) -> None:
    body = json.loads(base64.b64decode(signed()["signed"]["payload"]))
    try:
        got = assignment.verify(sign_payload({**body, "resources": value}), PINNED, NODE, NAME)
    except ImageError:
        return
    assert got is not None
    r = got.resources
    if value is None:
        assert r is None
        return
    assert r is not None and 1 <= r.vcpus <= MAX_VCPUS
    assert MEMORY_MB[0] <= r.memory_mb <= MEMORY_MB[1]
    assert r.health_marker is None or (r.health_marker.isprintable() and r.health_marker)
    assert r == GuestResources(value["vcpus"], value["memory_mb"], value.get("health_marker"))
