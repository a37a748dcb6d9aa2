"""Air-gapped bundles as data: the manifest a stick carries, the TPM record the operator
wraps for, and how the node finds and opens its bundle on a medium. Every parser of
untrusted input gives a typed value or edgepin's own error, whatever the input."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from provisioner import airgap, tpm
from provisioner.errors import (
    BundleError,
    ImageError,
    NotFoundError,
    UsageError,
    VerificationError,
)
from provisioner.node import fetch, media
from provisioner.operator import bundle, enroll, tpmrecord
from provisioner.operator.tpmrecord import TpmTarget
from provisioner.signing import StreamSigner, fingerprint
from tests.certs import self_signed
from tests.unit.fakes import IMAGE_A, IMAGE_B, json_values

pytestmark = pytest.mark.unit

# the parsers are pure and fast; deadline=None so that a loaded machine does not fail them

EK = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EK_PEM = EK.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)
OTHER_EK = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_EK_PEM = OTHER_EK.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)
ZERO7 = {7: bytes(32)}
WRAPPED = tpm.wrap_for_ek(EK_PEM, b"the passphrase", ZERO7)
SIGNING_KEY = ec.generate_private_key(ec.SECP384R1())
SIGNING_CERT = self_signed(SIGNING_KEY, "images")
DATA = b"encrypted image bytes " * 1000


def _signature(data: bytes) -> tuple[str, str]:
    signer = StreamSigner(SIGNING_KEY, "SHA-512")
    signer.update(data)
    return signer.signature(), signer.key_type


SIGNATURE, KEY_TYPE = _signature(DATA)


def glance_image(**extra: Any) -> dict[str, Any]:
    return {
        "id": IMAGE_A,
        "size": len(DATA),
        "status": "active",
        "name": "web",  # not carried
        "checksum": "x",  # not carried
        "disk_format": "qcow2",
        "container_format": "bare",
        "os_hash_algo": "sha512",
        "os_hash_value": hashlib.sha512(DATA).hexdigest(),
        "img_signature": SIGNATURE,
        "img_signature_hash_method": "SHA-512",
        "img_signature_key_type": KEY_TYPE,
        "img_signature_certificate_uuid": IMAGE_B,
        "edgepin_signing_cert_sha256": fingerprint(SIGNING_CERT),
        "os_encrypt_format": "LUKSv1",
        "os_encrypt_key_id": IMAGE_B,
        "os_decrypt_size": 48 * 1024 * 1024,
        "edgepin_version": "1.4.0",
        "edgepin_vcpus": "1",
        "edgepin_memory_mb": "256",
        **extra,
    }


def manifest(node: str = "node-0042", wrapped: bytes = WRAPPED) -> airgap.Manifest:
    return airgap.Manifest(
        node=node,
        created_at="2026-12-02T13:00:00Z",
        assignment={"image_id": IMAGE_A, "generation": 3, "signed": {"payload": "e30="}},
        image=airgap.image_from_glance(glance_image()),
        key=airgap.WrappedKey(wrapped, (7,), tpmrecord.spki_sha256(EK_PEM)),
    )


def good() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(airgap.encode(manifest()))
    return doc


# ------------------------------------------------------------------ the manifest


def test_a_manifest_reads_back_as_written_and_carries_what_the_node_checks() -> None:
    m = manifest()
    assert airgap.parse(airgap.encode(m)) == m
    image = m.image.as_glance()
    # what Glance said, minus what the node does not read; numbers as Glance's strings
    assert "name" not in image and "checksum" not in image and "status" not in image
    assert image["os_decrypt_size"] == str(48 * 1024 * 1024)
    fetch.check_properties(image)  # the online checks accept it as they accept Glance's
    assert fetch.choose_certificate(image, {fingerprint(SIGNING_CERT): SIGNING_CERT}, _no)
    assert m.key.blob == WRAPPED and tpm.parse_blob(m.key.blob)["kind"] == "duplicate"


def _no(secret_id: str) -> bytes:
    raise AssertionError("offline: nothing is fetched")


def test_an_image_without_a_pinned_certificate_named_cannot_go_into_a_bundle() -> None:
    image = glance_image()
    del image["edgepin_signing_cert_sha256"]
    with pytest.raises(BundleError, match="edgepin_signing_cert_sha256"):
        airgap.image_from_glance(image)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda d: d.update(kind="other"), "kind"),
        (lambda d: d.update(extra=1), "unknown fields"),
        (lambda d: d["image"]["properties"].pop("os_hash_value"), "lacks os_hash_value"),
        (lambda d: d["image"]["properties"].update(os_hash_value="ab"), "not a sha512"),
        (lambda d: d["image"]["properties"].update(path="../../x"), "unknown fields"),
        (lambda d: d["image"].update(id="../../etc/edgepin"), "image.id is not a uuid"),
        (lambda d: d["image"].update(size=0), "image.size"),
        (lambda d: d["image"].update(size=True), "image.size"),
        (lambda d: d["image"]["properties"].update(edgepin_vcpus="1e9"), "not a number"),
        (lambda d: d["image"]["properties"].update(edgepin_health_marker="\x1b[2J"), "print"),
        (lambda d: d.update(node="../other"), "node is not a node id"),
        (lambda d: d.update(assignment="signed"), "assignment is not an object"),
        (lambda d: d["key"].update(wrapped="***"), "not base64"),
        (lambda d: d["key"].update(pcrs=[0, 7]), "not the PCRs the wrapped key names"),
        (lambda d: d["key"].update(pcrs=[7, 7]), "sorted list"),
        (lambda d: d["key"].update(ek_sha256="x"), "not a sha256"),
    ],
)
def test_a_manifest_that_is_not_one_is_refused_with_the_reason(change: Any, why: str) -> None:
    doc = good()
    change(doc)
    with pytest.raises(BundleError, match=why):
        airgap.parse(json.dumps(doc).encode())


def test_a_key_sealed_on_some_tpm_is_not_a_wrapped_key() -> None:
    doc = good()
    sealed = {"version": 1, "kind": "sealed", "public": "", "private": "", "pcrs": [7]}
    doc["key"]["wrapped"] = base64.b64encode(json.dumps(sealed).encode()).decode()
    with pytest.raises(BundleError, match="not a key wrapped for a TPM's endorsement key"):
        airgap.parse(json.dumps(doc).encode())


def test_another_format_version_says_which_one_the_node_reads() -> None:
    doc = {**good(), "version": 2}
    with pytest.raises(BundleError, match="version 2 is not the one this node reads") as e:
        airgap.parse(json.dumps(doc).encode())
    assert e.value.hint and "edgepin release" in e.value.hint
    with pytest.raises(BundleError, match="version"):
        airgap.parse(json.dumps({**good(), "version": True}).encode())


def test_a_truncated_manifest_is_refused_at_every_length() -> None:
    data = airgap.encode(manifest())
    for n in range(0, len(data) - 2, 97):
        with pytest.raises(BundleError):
            airgap.parse(data[:n])
    with pytest.raises(BundleError, match="more than"):
        airgap.parse(b" " * (airgap.MAX_MANIFEST + 1))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_bytes_give_a_manifest_or_a_bundle_error(data: bytes) -> None:
    try:
        airgap.parse(data)
    except BundleError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(sorted(airgap.TOP_FIELDS)), json_values, max_size=4))
def test_any_field_replaced_gives_a_manifest_or_a_bundle_error(fields: dict[str, Any]) -> None:
    try:
        parsed = airgap.parse(json.dumps({**good(), **fields}).encode())
    except BundleError:
        return
    assert airgap.parse(airgap.encode(parsed)) == parsed


PARTS = {
    "image": (lambda d: d["image"], ["id", "size", "properties"]),
    "properties": (lambda d: d["image"]["properties"], sorted(airgap.PROPERTIES)),
    "key": (lambda d: d["key"], ["wrapped", "pcrs", "ek_sha256"]),
}


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_field_of_the_image_or_the_key_replaced_gives_a_manifest_or_an_error(
    data: st.DataObject,
) -> None:
    part, names = PARTS[data.draw(st.sampled_from(sorted(PARTS)))]
    name = st.sampled_from(names) | st.text(max_size=20)
    value = json_values | st.text(max_size=200) | st.integers()
    doc = good()
    part(doc).update(data.draw(st.dictionaries(name, value, max_size=4)))
    try:
        parsed = airgap.parse(json.dumps(doc).encode())
    except BundleError:
        return
    assert airgap.parse(airgap.encode(parsed)) == parsed


# ------------------------------------------------------------------ the TPM record


def test_the_tpm_record_reads_back_and_ignores_how_the_pem_was_written() -> None:
    target = TpmTarget(tpmrecord.canonical_ek(EK_PEM), {7: bytes(32), 0: b"\x01" * 32})
    record = target.as_record()
    assert tpmrecord.parse(record) == target
    assert tpmrecord.parse(json.dumps(record)) == target  # as Keystone keeps it
    assert tpmrecord.parse(None) is None and tpmrecord.parse("") is None
    crlf = EK_PEM.replace(b"\n", b"\r\n")
    assert tpmrecord.canonical_ek(crlf) == tpmrecord.canonical_ek(EK_PEM)
    assert target.pcrs == (0, 7)
    with pytest.raises(UsageError, match="not an RSA key"):
        tpmrecord.canonical_ek(
            ec.generate_private_key(ec.SECP256R1())
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )


@settings(max_examples=300, deadline=None)
@given(json_values | st.text(max_size=80))
def test_any_tpm_record_gives_a_target_none_or_a_usage_error(raw: Any) -> None:
    try:
        tpmrecord.parse(raw)
    except UsageError as e:
        assert e.hint and "--ek-cert" in e.hint


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["ek_public_pem", "pcr_bank", "pcr_values"]), json_values))
def test_any_tpm_record_field_replaced_gives_a_target_or_a_usage_error(
    fields: dict[str, Any],
) -> None:
    record = {**TpmTarget(tpmrecord.canonical_ek(EK_PEM), ZERO7).as_record(), **fields}
    try:
        got = tpmrecord.parse(record)
    except UsageError:
        return
    assert got is not None and all(len(v) == 32 for v in got.pcr_values.values())


def test_the_ek_and_pcr_policy_come_from_the_enrollment_or_from_the_command_line() -> None:
    recorded = TpmTarget(tpmrecord.canonical_ek(EK_PEM), ZERO7)
    got, sources = bundle.resolve_target(recorded, None, None, None)
    assert got == recorded and "recorded at enrollment" in sources
    # the factory's EK, compared with the enrollment's
    got, sources = bundle.resolve_target(recorded, None, EK_PEM.replace(b"\n", b"\r\n"), None)
    assert got == recorded and sources.startswith("the EK given")
    with pytest.raises(UsageError, match="not the one the node was enrolled for"):
        bundle.resolve_target(recorded, None, OTHER_EK_PEM, None)
    # PCR values measured again replace the recorded ones
    values = {4: b"\x04" * 32, 7: b"\x07" * 32}
    got, _ = bundle.resolve_target(recorded, None, None, values)
    assert got.pcr_values == values and got.ek_public_pem == recorded.ek_public_pem
    # a node enrolled before the record: everything given, the EK checked against the
    # fingerprint enroll kept
    enrolled_for = enroll.ek_fingerprint(EK_PEM)
    got, _ = bundle.resolve_target(None, enrolled_for, EK_PEM, ZERO7)
    assert got.ek_public_pem == tpmrecord.canonical_ek(EK_PEM)
    with pytest.raises(UsageError, match="enrolled_for"):
        bundle.resolve_target(None, enrolled_for, OTHER_EK_PEM, ZERO7)
    with pytest.raises(UsageError, match="EK is not on record"):
        bundle.resolve_target(None, enrolled_for, None, ZERO7)
    with pytest.raises(UsageError, match="PCR policy is not on record"):
        bundle.resolve_target(None, enrolled_for, EK_PEM, None)


# ------------------------------------------------------------------ on the medium


def write_bundle(folder: Path, m: airgap.Manifest | None = None, image: bytes = DATA) -> Path:
    folder.mkdir(parents=True)
    (folder / airgap.MANIFEST).write_bytes(airgap.encode(m or manifest()))
    (folder / airgap.IMAGE_FILE).write_bytes(image)
    return folder


def test_the_node_finds_its_own_bundle_on_a_medium_that_carries_a_site(tmp_path: Path) -> None:
    for node in ("node-0041", "node-0042", "node-0043"):
        write_bundle(tmp_path / airgap.folder_name(node), manifest(node))
    carried = media.Carried.read(tmp_path, "node-0042")
    assert carried.folder == tmp_path / "edgepin-node-0042"
    assert carried.manifest == manifest("node-0042")
    # the bundle's folder itself works too
    assert media.Carried.read(carried.folder, "node-0042").manifest == manifest()
    with pytest.raises(NotFoundError, match="holds bundles for node-0041, node-0042, node-0043"):
        media.Carried.read(tmp_path, "node-0044")
    with pytest.raises(UsageError, match="not a folder"):
        media.Carried.read(tmp_path / "nothing", "node-0042")


def test_a_bundle_of_another_node_in_this_nodes_folder_is_refused(tmp_path: Path) -> None:
    write_bundle(tmp_path / "edgepin-node-0042", manifest("node-0043"))
    with pytest.raises(VerificationError, match="made for node node-0043, not for this node"):
        media.Carried.read(tmp_path, "node-0042")


def test_only_regular_files_are_read_from_a_medium(tmp_path: Path) -> None:
    folder = write_bundle(tmp_path / "edgepin-node-0042")
    (folder / airgap.MANIFEST).rename(tmp_path / "elsewhere.json")
    (folder / airgap.MANIFEST).symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(BundleError, match="cannot be opened"):
        media.Carried.read(tmp_path, "node-0042")
    (folder / airgap.MANIFEST).unlink()
    os.mkfifo(folder / airgap.MANIFEST)  # would block a reader forever
    with pytest.raises(BundleError, match="not a regular file"):
        media.Carried.read(tmp_path, "node-0042")
    (folder / airgap.MANIFEST).unlink()
    with pytest.raises(NotFoundError, match="no bundle for node node-0042"):
        media.Carried.read(folder, "node-0042")


def test_the_carried_image_is_the_assigned_one_and_whole(tmp_path: Path) -> None:
    carried = media.Carried.read(write_bundle(tmp_path / "b", image=DATA[:-10]), "node-0042")
    with pytest.raises(BundleError, match="carries image .*names " + IMAGE_B):
        carried.image(IMAGE_B)
    image = carried.image(IMAGE_A)
    with pytest.raises(BundleError, match="truncated"):
        carried.fetch(image, SIGNING_CERT, tmp_path / "images")
    (carried.folder / airgap.IMAGE_FILE).write_bytes(DATA + b"more")
    with pytest.raises(BundleError, match="longer than the image it names"):
        carried.fetch(image, SIGNING_CERT, tmp_path / "images")
    with pytest.raises(VerificationError, match="no pinned signing certificate"):
        carried.certificate(IMAGE_B)


def test_a_copy_that_fails_a_check_leaves_nothing(tmp_path: Path) -> None:
    images = tmp_path / "images"
    image = glance_image()
    tampered = bytearray(DATA)
    tampered[100] ^= 1
    src = tmp_path / "image"
    for data, error, why in (
        (bytes(tampered), VerificationError, "does not match os_hash_value"),
        (DATA[:-1], ImageError, "truncated"),
        (DATA + b"x", VerificationError, "more bytes than its declared size"),
    ):
        src.write_bytes(data)
        with src.open("rb") as f, pytest.raises(error, match=why):
            fetch.copy(f, image, SIGNING_CERT, images)
        assert list(images.iterdir()) == []
    other = self_signed(ec.generate_private_key(ec.SECP384R1()), "other")
    src.write_bytes(DATA)
    with src.open("rb") as f, pytest.raises(VerificationError, match="signature"):
        fetch.copy(f, image, other, images)
    assert list(images.iterdir()) == []


def test_an_import_waits_for_a_reconcile_that_holds_the_lock_then_gives_up(
    tmp_path: Path,
) -> None:
    import threading
    import time

    from provisioner.errors import StateError
    from provisioner.node import state

    lock = tmp_path / "run" / "lock"
    with state.node_lock(lock):
        with pytest.raises(StateError, match="lock held"):  # a reconcile fails at once
            with state.node_lock(lock):
                pass
        started = time.monotonic()
        with pytest.raises(StateError, match="lock held"):
            with state.node_lock(lock, timeout=0.6):
                pass
        assert time.monotonic() - started >= 0.6
    held = threading.Event()

    def reconcile() -> None:
        with state.node_lock(lock):
            held.set()
            time.sleep(0.7)

    thread = threading.Thread(target=reconcile)
    thread.start()
    held.wait()
    started = time.monotonic()
    with state.node_lock(lock, timeout=30):  # taken once the reconcile is done
        assert time.monotonic() - started > 0.3
    thread.join()
