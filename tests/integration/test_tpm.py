"""A real swtpm: PCR-policy sealing, power cycles, and the factory's offline wrap."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from provisioner import tpm
from tests.certs import self_signed
from tests.testbed.swtpm import Swtpm, forge_nv_index

pytestmark = pytest.mark.integration
DUP = ("duplicate",)


def test_offline_policy_digest_equals_trial_session(swtpm: Swtpm) -> None:
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_SE
    from tpm2_pytss.types import TPML_PCR_SELECTION, TPMT_SYM_DEF

    with tpm.Tpm.open(swtpm.tcti) as t:
        t.extend_pcr(7, b"something measured")
        values = t.read_pcrs([0, 7])
        session = t.esys.start_auth_session(
            ESYS_TR.NONE,
            ESYS_TR.NONE,
            TPM2_SE.TRIAL,
            TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
            TPM2_ALG.SHA256,
        )
        try:
            selection = TPML_PCR_SELECTION.unmarshal(tpm.pcr_selection_bytes([0, 7]))[0]
            t.esys.policy_pcr(session, b"", selection)
            trial = bytes(t.esys.policy_get_digest(session))
        finally:
            t.esys.flush_context(session)
    assert trial == tpm.pcr_policy_digest(values)


def test_seal_unseal_then_refused_after_extend(swtpm: Swtpm) -> None:
    with tpm.Tpm.open(swtpm.tcti) as t:
        blob = t.seal(b"node secret", [7])
        assert t.unseal(blob, [7]) == b"node secret"
        t.extend_pcr(7, b"tampered bootloader")
        with pytest.raises(tpm.TpmPolicyError, match="measured boot state differs"):
            t.unseal(blob, [7])
    # a power cycle resets the PCRs: the same boot state unseals again
    swtpm.power_cycle()
    with tpm.Tpm.open(swtpm.tcti) as t:
        assert t.read_pcrs([7])[7] == bytes(32)
        assert t.unseal(blob, [7]) == b"node secret"


def test_sealed_blob_is_useless_on_another_tpm(make_swtpm) -> None:  # type: ignore[no-untyped-def]
    a, b = make_swtpm("a"), make_swtpm("b")
    with tpm.Tpm.open(a.tcti) as t:
        blob = t.seal(b"only for a", [7])
    with tpm.Tpm.open(b.tcti) as t, pytest.raises(tpm.TpmBlobError):
        t.unseal(blob, [7])


def test_factory_wrap_for_ek_certificate(make_swtpm) -> None:  # type: ignore[no-untyped-def]
    node, other = make_swtpm("node"), make_swtpm("other")
    cert = node.ek_cert_pem()
    tpm.verify_ek_cert_chain(cert, node.ca_cert_pem())
    ek_pem = tpm.ek_public_pem_from_cert(cert)
    assert ek_pem == node.ek_public_pem()  # the certificate is for the key the TPM derives
    wrapped = tpm.wrap_for_ek(ek_pem, b"bootstrap secret", {7: bytes(32)})
    with tpm.Tpm.open(node.tcti) as t:
        assert t.unseal(wrapped, [7], DUP) == b"bootstrap secret"
    with tpm.Tpm.open(other.tcti) as t, pytest.raises(tpm.TpmBlobError, match="another TPM"):
        t.unseal(wrapped, [7], DUP)
    with tpm.Tpm.open(node.tcti) as t:
        t.extend_pcr(7, b"changed")
        with pytest.raises(tpm.TpmPolicyError):
            t.unseal(wrapped, [7], DUP)


def test_ek_chain_refused_with_a_wrong_ca(swtpm: Swtpm) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    ca = self_signed(key, "some other CA")
    with pytest.raises(tpm.EkCertificateError):
        tpm.verify_ek_cert_chain(swtpm.ek_cert_pem(), ca.public_bytes(serialization.Encoding.PEM))


def test_unseal_refuses_what_the_node_did_not_seal(make_swtpm) -> None:  # type: ignore[no-untyped-def]
    """Blobs that anyone with the EK public key, or with the TPM in another boot, can make."""
    node = make_swtpm("node")
    ek_pem = node.ek_public_pem()
    planted = tpm.wrap_for_ek(ek_pem, b"attacker's passphrase", {7: bytes(32)})
    with tpm.Tpm.open(node.tcti) as t:
        # a duplicate is accepted only where the bootstrap credential is expected
        with pytest.raises(tpm.TpmBlobError, match="not accepted here"):
            t.unseal(planted, [7])
        # a blob for other PCRs than the node's selection is refused before the TPM
        other = t.seal(b"secret", [0, 7])
        with pytest.raises(tpm.TpmPolicyError, match="this node seals to"):
            t.unseal(other, [7])
        with pytest.raises(tpm.TpmPolicyError, match="empty selection"):
            t.unseal(other, [])
        with pytest.raises(tpm.TpmError, match="without a PCR policy"):
            t.seal(b"secret", [])
        # a sealed object created in another measured state (an attacker's own boot)
        t.extend_pcr(7, b"the attacker's boot loader")
        other_state = t.seal(b"attacker's passphrase", [7])
    node.power_cycle()
    with tpm.Tpm.open(node.tcti) as t, pytest.raises(tpm.TpmPolicyError):
        t.unseal(other_state, [7])
    with pytest.raises(tpm.TpmError, match="PCR policy is required"):
        tpm.wrap_for_ek(ek_pem, b"secret", {})


def test_anchor_is_written_only_in_the_measured_state(swtpm: Swtpm) -> None:
    value = bytes(range(40))
    with tpm.Tpm.open(swtpm.tcti) as t:
        assert t.anchor_read([7]) is None
        with pytest.raises(tpm.TpmPolicyError, match="no edgepin anchor"):
            t.anchor_write([7], value)
        t.anchor_define([7])
        assert t.anchor_read([7]) is None  # defined, never written: an enrollment cut short
        t.anchor_write([7], value)
        assert t.anchor_read([7]) == value
        # another boot (PCR 7 differs) can neither read it as ours nor write it
        t.extend_pcr(7, b"another boot loader")
        with pytest.raises(tpm.TpmPolicyError):
            t.anchor_read([7])
        with pytest.raises(tpm.TpmPolicyError):
            t.anchor_write([7], bytes(40))
    swtpm.power_cycle()
    with tpm.Tpm.open(swtpm.tcti) as t:
        assert t.anchor_read([7]) == value  # it survives a power cycle
        # an index redefined by someone else (owner authorization is empty) is not ours
        assert t.anchor_remove()
        forge_nv_index(t, tpm.ANCHOR_NV_INDEX, tpm.ANCHOR_NV_SIZE)
        with pytest.raises(tpm.TpmPolicyError, match="not the one this node defined"):
            t.anchor_read([7])
