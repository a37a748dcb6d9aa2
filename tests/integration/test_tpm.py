"""A real swtpm: PCR-policy sealing, power cycles, and the factory's offline wrap."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from provisioner import tpm
from tests.certs import self_signed
from tests.testbed.swtpm import Swtpm

pytestmark = pytest.mark.integration


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
        assert t.unseal(blob) == b"node secret"
        t.extend_pcr(7, b"tampered bootloader")
        with pytest.raises(tpm.TpmPolicyError, match="measured boot state differs"):
            t.unseal(blob)
    # a power cycle resets the PCRs: the same boot state unseals again
    swtpm.power_cycle()
    with tpm.Tpm.open(swtpm.tcti) as t:
        assert t.read_pcrs([7])[7] == bytes(32)
        assert t.unseal(blob) == b"node secret"


def test_sealed_blob_is_useless_on_another_tpm(make_swtpm) -> None:  # type: ignore[no-untyped-def]
    a, b = make_swtpm("a"), make_swtpm("b")
    with tpm.Tpm.open(a.tcti) as t:
        blob = t.seal(b"only for a", [7])
    with tpm.Tpm.open(b.tcti) as t, pytest.raises(tpm.TpmBlobError):
        t.unseal(blob)


def test_factory_wrap_for_ek_certificate(make_swtpm) -> None:  # type: ignore[no-untyped-def]
    node, other = make_swtpm("node"), make_swtpm("other")
    cert = node.ek_cert_pem()
    tpm.verify_ek_cert_chain(cert, node.ca_cert_pem())
    ek_pem = tpm.ek_public_pem_from_cert(cert)
    assert ek_pem == node.ek_public_pem()  # the certificate is for the key the TPM derives
    wrapped = tpm.wrap_for_ek(ek_pem, b"bootstrap secret", {7: bytes(32)})
    with tpm.Tpm.open(node.tcti) as t:
        assert t.unseal(wrapped) == b"bootstrap secret"
    with tpm.Tpm.open(other.tcti) as t, pytest.raises(tpm.TpmBlobError, match="another TPM"):
        t.unseal(wrapped)
    with tpm.Tpm.open(node.tcti) as t:
        t.extend_pcr(7, b"changed")
        with pytest.raises(tpm.TpmPolicyError):
            t.unseal(wrapped)


def test_ek_chain_refused_with_a_wrong_ca(swtpm: Swtpm) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    ca = self_signed(key, "some other CA")
    with pytest.raises(tpm.EkCertificateError):
        tpm.verify_ek_cert_chain(swtpm.ek_cert_pem(), ca.public_bytes(serialization.Encoding.PEM))
