"""Pure logic of the TPM module: policy digests and blob parsing."""

from __future__ import annotations

import hashlib
import json

import pytest
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
