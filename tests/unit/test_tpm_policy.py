"""Pure logic of the TPM module: policy digests, blob parsing, and which TPM answers a
PolicyPCR session is started again for."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from provisioner import tpm
from tests.unit.fakes import json_values

pytestmark = pytest.mark.unit


def test_pcr_selection_marshalling() -> None:
    # count=1, TPM2_ALG_SHA256=0x000b, sizeofSelect=3, bitmap with PCR 0 and 7
    assert tpm.pcr_selection_bytes([0, 7]) == bytes.fromhex("00000001000b03810000")
    assert tpm.pcr_selection_bytes([16]) == bytes.fromhex("00000001000b03000001")


def test_policy_digest_matches_the_spec_formula() -> None:
    values = {7: bytes(32)}
    pcr_digest = hashlib.sha256(bytes(32)).digest()
    expected = hashlib.sha256(
        bytes(32) + bytes.fromhex("0000017f") + bytes.fromhex("00000001000b03800000") + pcr_digest
    ).digest()
    assert tpm.pcr_policy_digest(values) == expected


def test_policy_digest_depends_on_values_and_selection() -> None:
    a = tpm.pcr_policy_digest({7: bytes(32)})
    b = tpm.pcr_policy_digest({7: b"\x01" * 32})
    c = tpm.pcr_policy_digest({0: bytes(32), 7: bytes(32)})
    assert len({a, b, c}) == 3


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"not json",
        b"[]",
        b'{"version": 9, "kind": "sealed"}',
        b'{"version": 1, "kind": "x"}',
        b'{"version": 1, "kind": "sealed", "public": "!!", "private": "AA=="}',
    ],
)
def test_garbage_blobs_are_refused(blob: bytes) -> None:
    with pytest.raises(tpm.TpmBlobError):
        tpm.parse_blob(blob)


def test_out_of_range_pcr_refused() -> None:
    with pytest.raises(tpm.TpmBlobError):
        tpm.pcr_selection_bytes([24])


@settings(max_examples=300)
@given(
    st.binary(max_size=200)
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.fixed_dictionaries(
        {
            "version": st.just(tpm.BLOB_VERSION),
            "kind": st.sampled_from(["sealed", "duplicate", "other"]),
        },
        optional={k: json_values for k in ("public", "private", "duplicate", "seed", "pcrs")},
    ).map(lambda v: json.dumps(v).encode())
)
def test_the_blob_parser_returns_fields_or_its_own_error(blob: bytes) -> None:
    try:
        data = tpm.parse_blob(blob)
    except tpm.TpmBlobError:
        return
    assert data["kind"] in set(tpm.BlobKind)
    assert all(type(p) is int for p in data.get("pcrs", []))


# -- signed PCR policies (PolicyAuthorize) -----------------------------------------------

RELEASE_KEY = ec.generate_private_key(ec.SECP256R1())
RELEASE_PEM = RELEASE_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)


def test_the_authorized_policy_is_the_spec_formula() -> None:
    name = bytes.fromhex("000b") + bytes(range(32))
    first = hashlib.sha256(bytes(32) + bytes.fromhex("0000016a") + name).digest()
    assert tpm.authorize_policy_digest(name) == hashlib.sha256(first + tpm.POLICY_REF).digest()
    assert tpm.authorize_policy_digest(name, b"other") != tpm.authorize_policy_digest(name)
    assert tpm.release_key_name(RELEASE_PEM)[:2] == bytes.fromhex("000b")


def test_the_host_floor_and_a_releases_policy_are_the_spec_formulas() -> None:
    # TPMS_NV_PUBLIC: index, sha256, TPM_NT_BITS | OWNERWRITE | AUTHREAD | NO_DA | WRITTEN,
    # no authPolicy, 8 bytes
    public = bytes.fromhex("0100e9d2000b2204002200000008")
    assert tpm.floor_public_bytes() == public
    assert tpm.floor_name() == bytes.fromhex("000b") + hashlib.sha256(public).digest()
    values = {7: bytes(32)}
    args = hashlib.sha256((1 << 3).to_bytes(8, "big") + bytes.fromhex("0000000b")).digest()
    assert (
        tpm.release_policy_digest(values, 3)
        == hashlib.sha256(
            tpm.pcr_policy_digest(values) + bytes.fromhex("00000149") + args + tpm.floor_name()
        ).digest()
    )
    assert tpm.release_policy_digest(values, 3) != tpm.release_policy_digest(values, 4)
    # raising the floor to E sets the bits of every epoch below E: E passes, E-1 does not
    for floor in range(tpm.MAX_EPOCH + 1):
        bits = tpm.floor_bits(floor)
        assert tpm.floor_of(bits) == floor
        for epoch in range(tpm.MAX_EPOCH + 1):
            passes = not bits & int.from_bytes(tpm.floor_operand(epoch), "big")
            assert passes == (epoch >= floor)
    for bad in (-1, tpm.MAX_EPOCH + 1):
        with pytest.raises(tpm.TpmError, match="host epoch"):
            tpm.floor_operand(bad)


def test_an_approval_round_trips_and_verifies_only_under_its_key() -> None:
    values = {7: bytes(32), 9: b"\x09" * 32}
    approval = tpm.parse_approval(tpm.sign_approval(RELEASE_KEY, values, epoch=2))
    assert approval.pcr_values == values and approval.pcrs == [7, 9] and approval.epoch == 2
    assert approval.policy == tpm.release_policy_digest(values, 2)
    tpm.verify_approval(approval, RELEASE_PEM)
    # the epoch is signed: an approval claiming another one does not verify
    with pytest.raises(tpm.TpmPolicyError):
        tpm.verify_approval(tpm.Approval("sha256", values, approval.signature, 3), RELEASE_PEM)
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    other_pem = other.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(tpm.TpmPolicyError, match="not signed by the pinned release key"):
        tpm.verify_approval(approval, other_pem)
    changed = tpm.Approval("sha256", {7: bytes(32), 9: bytes(32)}, approval.signature, 2)
    with pytest.raises(tpm.TpmPolicyError):
        tpm.verify_approval(changed, RELEASE_PEM)


@pytest.mark.parametrize(
    "key",
    [
        b"not a key",
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
    ],
    ids=["garbage", "rsa", "p384"],
)
def test_a_release_key_is_an_ecdsa_p256_public_key(key: bytes) -> None:
    with pytest.raises(tpm.TpmBlobError, match="release key"):
        tpm.release_key_name(key)


def _approval_docs() -> st.SearchStrategy[bytes]:
    digest = st.binary(min_size=32, max_size=32).map(bytes.hex)
    pcr_key = st.integers(-1, 30).map(str) | st.text(max_size=3)
    return st.fixed_dictionaries(
        {
            "version": st.just(tpm.APPROVAL_VERSION) | json_values,
            "kind": st.just("pcr-approval") | st.text(max_size=5),
            "bank": st.sampled_from(["sha256", "sha1", ""]),
            "epoch": st.integers(-2, 70) | json_values,
            "pcrs": st.dictionaries(pcr_key, digest | json_values, max_size=4) | json_values,
            "signature": st.binary(max_size=90).map(lambda b: base64.b64encode(b).decode())
            | json_values,
        }
    ).map(lambda v: json.dumps(v).encode())


@settings(max_examples=400)
@given(
    st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()) | _approval_docs()
)
def test_the_approval_parser_returns_an_approval_or_its_own_error(raw: bytes) -> None:
    try:
        approval = tpm.parse_approval(raw)
    except tpm.TpmBlobError:
        return
    assert approval.bank == "sha256" and approval.pcr_values
    assert 0 <= approval.epoch <= tpm.MAX_EPOCH
    assert all(0 <= p < 24 and len(v) == 32 for p, v in approval.pcr_values.items())
    try:  # arbitrary input never verifies, and fails only with edgepin's error
        tpm.verify_approval(approval, RELEASE_PEM)
    except tpm.TpmPolicyError:
        return
    raise AssertionError("an approval no one signed verified")


# -- PolicyPCR sessions started again on TPM_RC_PCR_CHANGED, and only on it -------------

PCR_CHANGED = 0x128  # TPM_RC_PCR_CHANGED, format 0
POLICY_FAIL_SESSION_1 = 0x99D  # TPM_RC_POLICY_FAIL | TPM_RC_S | TPM_RC_1


def tss_error(rc: int) -> Exception:
    from tpm2_pytss.TSS2_Exception import TSS2_Exception

    error: Exception = TSS2_Exception(rc)
    return error


def test_pcr_changed_is_told_apart_from_a_policy_refusal() -> None:
    from tpm2_pytss.constants import TPM2_RC

    assert int(TPM2_RC.PCR_CHANGED) == PCR_CHANGED
    assert tpm._is_pcr_changed(tss_error(PCR_CHANGED))
    # as a resource manager's layer passes it on
    assert tpm._is_pcr_changed(tss_error(0xB0000 | PCR_CHANGED))
    assert not tpm._is_policy_failure(tss_error(PCR_CHANGED))
    for rc in (POLICY_FAIL_SESSION_1, int(TPM2_RC.POLICY_FAIL), int(TPM2_RC.VALUE), 0x922):
        assert not tpm._is_pcr_changed(tss_error(rc)), hex(rc)
    assert tpm._is_policy_failure(tss_error(POLICY_FAIL_SESSION_1))
    assert not tpm._is_pcr_changed(RuntimeError("PCR have changed since checked"))


class _SessionsTpm(tpm.Tpm):
    """No TPM: sessions are numbers, and what was flushed is recorded."""

    def __init__(self) -> None:
        super().__init__(None)
        self.started: list[int] = []
        self.flushed: list[int] = []

    def _pcr_session(
        self, pcrs: Any, bank: str, crypt: tpm.Crypt, salt_key: Any = None, then: Any = None
    ) -> Any:
        self.started.append(len(self.started) + 1)
        return self.started[-1]

    def _flush(self, handle: Any) -> None:
        self.flushed.append(handle)


def failing(rcs: list[int]) -> Any:
    """A command that raises these TSS errors in turn, then answers with its session."""

    def command(session: Any) -> Any:
        if rcs:
            raise tss_error(rcs.pop(0))
        return ("done in", session)

    return command


def test_a_command_is_run_again_in_a_new_session_on_pcr_changed() -> None:
    t = _SessionsTpm()
    got = t._under_pcr_policy([7], "sha256", tpm.Crypt.RESPONSE, failing([PCR_CHANGED] * 3))
    assert got == ("done in", 4)
    assert t.started == t.flushed == [1, 2, 3, 4]


def test_pcr_changed_without_end_is_raised_after_the_bounded_attempts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tpm2_pytss.TSS2_Exception import TSS2_Exception

    pauses: list[float] = []
    monkeypatch.setattr(tpm.time, "sleep", pauses.append)
    t = _SessionsTpm()
    command = failing([PCR_CHANGED] * 100)
    with pytest.raises(TSS2_Exception) as raised:
        t._under_pcr_policy([7], "sha256", tpm.Crypt.COMMAND, command)
    assert tpm._is_pcr_changed(raised.value)
    assert len(t.started) == tpm.PCR_CHANGED_ATTEMPTS
    assert t.flushed == t.started
    # a pause between sessions, doubling: a burst of measurements is waited out, and the
    # whole wait stays bounded (seconds, not minutes)
    assert len(pauses) == tpm.PCR_CHANGED_ATTEMPTS - 1
    assert all(b == 2 * a for a, b in itertools.pairwise(pauses)), pauses
    assert 1.0 < sum(pauses) < 5.0, pauses
    assert f"{tpm.PCR_CHANGED_ATTEMPTS} sessions in a row" in tpm._tss_text(raised.value)
    message = str(tpm._nv_failure(raised.value, tpm.VAULT_KEY, "read"))
    assert message.startswith("could not read the vault key: ")


# the policy refused, TPM_RC_VALUE, TPM_RC_RETRY (ESAPI resubmits that one itself), an
# ESAPI failure
@pytest.mark.parametrize("rc", [POLICY_FAIL_SESSION_1, 0x084, 0x922, 0x00070001])
def test_any_other_error_is_raised_at_once(rc: int) -> None:
    from tpm2_pytss.TSS2_Exception import TSS2_Exception

    t = _SessionsTpm()
    with pytest.raises(TSS2_Exception) as raised:
        t._under_pcr_policy([7], "sha256", tpm.Crypt.RESPONSE, failing([PCR_CHANGED, rc]))
    assert int(raised.value.rc) == rc
    assert t.started == t.flushed == [1, 2]  # one retry for PCR_CHANGED, none for this one


def test_a_policy_failure_is_still_a_policy_refusal() -> None:
    refused = tpm._nv_failure(tss_error(POLICY_FAIL_SESSION_1), tpm.VAULT_KEY, "read")
    assert isinstance(refused, tpm.TpmPolicyError)
    assert not isinstance(
        tpm._nv_failure(tss_error(PCR_CHANGED), tpm.ANCHOR, "write"), tpm.TpmPolicyError
    )
