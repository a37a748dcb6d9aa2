"""A real swtpm: PCR-policy sealing, power cycles, the factory's offline wrap, and PCRs
extended while a PolicyPCR session is in use."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from provisioner import tpm
from tests.certs import self_signed
from tests.testbed.swtpm import Swtpm, forge_nv_index

pytestmark = pytest.mark.integration
DUP = ("duplicate",)


def trial_session(t: tpm.Tpm) -> Any:
    """A trial policy session: it computes a policy's digest and authorizes nothing."""
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_SE
    from tpm2_pytss.types import TPMT_SYM_DEF

    return t.esys.start_auth_session(
        ESYS_TR.NONE,
        ESYS_TR.NONE,
        TPM2_SE.TRIAL,
        TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
        TPM2_ALG.SHA256,
    )


def test_offline_policy_digest_equals_trial_session(swtpm: Swtpm) -> None:
    from tpm2_pytss.types import TPML_PCR_SELECTION

    with tpm.Tpm.open(swtpm.tcti) as t:
        t.extend_pcr(7, b"something measured")
        values = t.read_pcrs([0, 7])
        session = trial_session(t)
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


# -- a kernel that measures while the node uses a PolicyPCR session --------------------


class _RacingTpm(tpm.Tpm):
    """Extends ``pcr`` in the first ``races`` PolicyPCR sessions (in every one with None),
    right after PolicyPCR (``after``) or right before it, as a kernel that measures modules
    into PCR 10 while the node unseals does; counts the sessions."""

    def __init__(self, esys: Any) -> None:
        super().__init__(esys)
        self.pcr = 10
        self.races: int | None = 0
        self.after = True
        self.sessions = 0

    def _pcr_session(
        self, pcrs: Any, bank: str, crypt: tpm.Crypt, salt_key: Any = None, then: Any = None
    ) -> Any:
        self.sessions += 1
        racing = self.races is None or self.sessions <= self.races
        if racing and not self.after:
            self.extend_pcr(self.pcr, b"measured before PolicyPCR")
        session = super()._pcr_session(pcrs, bank, crypt, salt_key, then)
        if racing and self.after:
            self.extend_pcr(self.pcr, b"measured after PolicyPCR")
        return session


@contextmanager
def racing(
    swtpm: Swtpm, pcr: int = 10, races: int | None = 0, after: bool = True
) -> Iterator[_RacingTpm]:
    with _RacingTpm.open(swtpm.tcti) as t:
        assert isinstance(t, _RacingTpm)
        t.pcr, t.races, t.after = pcr, races, after
        yield t


def loaded_sessions(t: tpm.Tpm) -> list[int]:
    from tpm2_pytss.constants import TPM2_CAP, TPM2_HR

    found: list[int] = []
    for first in (TPM2_HR.HMAC_SESSION, TPM2_HR.POLICY_SESSION):
        _more, data = t.esys.get_capability(TPM2_CAP.HANDLES, int(first), 64)
        found += [int(h) for h in data.data.handles if int(h) >> 24 == int(first) >> 24]
    return found


KEY, ANCHOR = bytes(range(tpm.VAULT_KEY_SIZE)), bytes(range(tpm.ANCHOR_NV_SIZE))


def _enrolled(swtpm: Swtpm) -> tuple[bytes, bytes]:
    """A sealed secret, a factory-made duplicate, the vault key and the anchor, over PCR 7."""
    wrapped = tpm.wrap_for_ek(swtpm.ek_public_pem(), b"bootstrap", {7: bytes(32)})
    with tpm.Tpm.open(swtpm.tcti) as t:
        blob = t.seal(b"node secret", [7])
        t.vault_key_create([7], KEY)
        t.anchor_define([7])
        t.anchor_write([7], ANCHOR)
    return blob, wrapped


def _policy_uses(blob: bytes, wrapped: bytes) -> dict[str, Callable[[tpm.Tpm], object]]:
    """Every operation that runs a command under a PolicyPCR session."""
    return {
        "unseal": lambda t: t.unseal(blob, [7]),
        "unseal the bootstrap": lambda t: t.unseal(wrapped, [7], DUP),
        "read the vault key": lambda t: t.vault_key_read([7]),
        "write the anchor": lambda t: t.anchor_write([7], ANCHOR),
    }


@pytest.mark.parametrize("pcr", [10, 0])
def test_a_pcr_extended_during_a_policy_session_is_tried_again(swtpm: Swtpm, pcr: int) -> None:
    """A PCR outside the selection extended between PolicyPCR and the command: the TPM
    answers PCR_CHANGED, and a new session succeeds."""
    blob, wrapped = _enrolled(swtpm)
    with racing(swtpm, pcr, races=2) as t:
        t.vault_key_create([7], KEY)  # NV_Write under the policy, raced too
        assert t.sessions == 3
        expected = {
            "unseal": b"node secret",
            "unseal the bootstrap": b"bootstrap",
            "read the vault key": KEY,
            "write the anchor": None,
        }
        for what, use in _policy_uses(blob, wrapped).items():
            t.sessions = 0
            assert use(t) == expected[what], what
            assert t.sessions == 3, what  # two raced sessions, then one that worked
        assert t.anchor_read([7]) == ANCHOR
        assert t.read_pcrs([pcr])[pcr] != bytes(32)  # the race did happen
        assert t.read_pcrs([7])[7] == bytes(32)
        assert loaded_sessions(t) == []


def test_pcrs_extended_without_end_give_an_error_after_bounded_attempts(swtpm: Swtpm) -> None:
    blob, wrapped = _enrolled(swtpm)
    with racing(swtpm, races=None) as t:
        for what, use in _policy_uses(blob, wrapped).items():
            t.sessions = 0
            with pytest.raises(tpm.TpmError, match="sessions in a row") as refused:
                use(t)
            # not a policy refusal: the node's measured state is the enrolled one
            assert type(refused.value) is tpm.TpmError, what
            assert "PCR" in str(refused.value), what
            assert t.sessions == tpm.PCR_CHANGED_ATTEMPTS, what
            assert loaded_sessions(t) == [], what  # every session flushed
        t.races = 0  # the kernel is done measuring
        assert t.unseal(blob, [7]) == b"node secret"
        assert t.vault_key_read([7]) == KEY


@pytest.mark.parametrize("after", [False, True], ids=["before-policypcr", "after-policypcr"])
def test_a_pcr_of_the_selection_extended_is_a_refusal_not_tried_again(
    swtpm: Swtpm, after: bool
) -> None:
    """PCR 7, in the selection, extended before PolicyPCR (past the checks edgepin makes
    before asking the TPM): the TPM refuses the policy, once. Extended after PolicyPCR: the
    TPM answers PCR_CHANGED, and the next session is refused for the policy."""
    blob, wrapped = _enrolled(swtpm)
    for what, use in _policy_uses(blob, wrapped).items():
        swtpm.power_cycle()  # PCR 7 as enrolled
        with racing(swtpm, pcr=7, races=1, after=after) as t:
            with pytest.raises(tpm.TpmPolicyError, match="the measured boot state differs"):
                use(t)
            assert t.sessions == (2 if after else 1), what
            assert loaded_sessions(t) == [], what
    swtpm.power_cycle()
    with tpm.Tpm.open(swtpm.tcti) as t:
        assert t.unseal(blob, [7]) == b"node secret"
        assert t.anchor_read([7]) == ANCHOR  # the refused writes wrote nothing


# ------------------------------------------------- secrets sealed to a signed policy


def _release_key() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return key, pem


def _boot(t: tpm.Tpm, release: str) -> None:
    """What a boot chain of ``release`` measures: its boot loader (PCR 4), its GRUB
    commands and command line (PCR 8), the files GRUB read (PCR 9)."""
    for pcr in (4, 8, 9):
        t.extend_pcr(pcr, f"{release}: PCR {pcr}".encode())


PCRS = [4, 7, 8, 9]


def test_the_release_keys_name_and_authorized_policy_are_the_tpms(swtpm: Swtpm) -> None:
    from tpm2_pytss.constants import ESYS_TR, TPM2_EO, TPM2_ST
    from tpm2_pytss.types import (
        TPM2B_OPERAND,
        TPM2B_PUBLIC,
        TPML_DIGEST,
        TPML_PCR_SELECTION,
        TPMT_TK_VERIFIED,
    )

    _key, pem = _release_key()
    with tpm.Tpm.open(swtpm.tcti) as t:
        t.floor_define()
        floor = t.esys.tr_from_tpmpublic(tpm.FLOOR_NV_INDEX)
        _public, floor_name = t.esys.nv_read_public(floor)
        # the host floor's name, which every approval signs, is what the TPM says
        assert bytes(floor_name) == tpm.floor_name()
        # a release's policy, PolicyPCR then PolicyNV over the floor, computed offline
        session = trial_session(t)
        try:
            selection = TPML_PCR_SELECTION.unmarshal(tpm.pcr_selection_bytes(PCRS))[0]
            t.esys.policy_pcr(session, b"", selection)
            t.esys.policy_nv(
                floor, floor, session, TPM2B_OPERAND(tpm.floor_operand(5)), TPM2_EO.BITCLEAR
            )
            assert bytes(t.esys.policy_get_digest(session)) == tpm.release_policy_digest(
                t.read_pcrs(PCRS), 5
            )
        finally:
            t.esys.flush_context(session)
            t.esys.tr_close(floor)
        handle = t.esys.load_external(
            TPM2B_PUBLIC(publicArea=tpm.release_key_public(pem)), hierarchy=ESYS_TR.OWNER
        )
        _public, name, _qname = t.esys.read_public(handle)
        t.esys.flush_context(handle)
        assert bytes(name) == tpm.release_key_name(pem)
        session = trial_session(t)
        try:  # a trial session takes PolicyAuthorize without a real ticket
            t.esys.policy_authorize(
                session,
                approved_policy=b"",
                policy_ref=tpm.POLICY_REF,
                key_sign=bytes(name),
                check_ticket=TPMT_TK_VERIFIED(tag=TPM2_ST.VERIFIED, hierarchy=0x40000007),
            )
            trial = bytes(t.esys.policy_get_digest(session))
            # what a node seals to: that, or the running release's own state
            branches = [tpm.release_policy_digest(t.read_pcrs(PCRS), 0), trial]
            t.esys.policy_or(session, TPML_DIGEST(branches))
            trial_or = bytes(t.esys.policy_get_digest(session))
        finally:
            t.esys.flush_context(session)
    assert trial == tpm.authorize_policy_digest(tpm.release_key_name(pem))
    assert trial_or == tpm.or_policy_digest(branches)
    with tpm.Tpm.open(swtpm.tcti) as t:
        assert t.define_digest(tpm.SignedPolicy(pem, tuple(PCRS))) == trial_or


def test_a_secret_sealed_to_the_release_key_survives_an_approved_boot_chain_and_only_that(
    swtpm: Swtpm, monkeypatch: pytest.MonkeyPatch
) -> None:
    key, pem = _release_key()
    policy = tpm.SignedPolicy(pem, tuple(PCRS))
    with tpm.Tpm.open(swtpm.tcti) as t:
        t.floor_define()
        _boot(t, "release 1")
        blob = t.seal(b"node credential", policy)
        # in the state it was sealed in it opens as a secret sealed to PCR values does
        assert t.unseal(blob, policy) == b"node credential"
        assert tpm.parse_blob(blob)["pcr_policy"] == policy.branch(t.read_pcrs(PCRS)).hex()
    # the node reboots into release 2: other values in PCRs 4, 8 and 9
    swtpm.power_cycle()
    with tpm.Tpm.open(swtpm.tcti) as t:
        _boot(t, "release 2")
        with pytest.raises(tpm.TpmPolicyError, match="none of the 0 signed PCR policies"):
            t.unseal(blob, policy)
        # release 2 brings its approval: the same blob unseals, nothing was sealed again
        two = tpm.parse_approval(tpm.sign_approval(key, t.read_pcrs(PCRS)))
        approved = tpm.SignedPolicy(pem, tuple(PCRS), (two,))
        assert t.unseal(blob, approved) == b"node credential"
        # an approval over other PCRs than the node's selection does not count
        fewer = tpm.parse_approval(tpm.sign_approval(key, t.read_pcrs([7, 8, 9])))
        with pytest.raises(tpm.TpmPolicyError, match="none of the 0 signed PCR policies"):
            t.unseal(blob, tpm.SignedPolicy(pem, tuple(PCRS), (fewer,)))
        # an approval of these values by any other key is refused
        other, _ = _release_key()
        forged = tpm.parse_approval(tpm.sign_approval(other, t.read_pcrs(PCRS)))
        with pytest.raises(tpm.TpmPolicyError, match="not signed by the pinned release key"):
            t.unseal(blob, tpm.SignedPolicy(pem, tuple(PCRS), (forged,)))
        # the TPM checks the signature itself, not only edgepin's code before it
        monkeypatch.setattr(tpm, "verify_approval", lambda approval, key_pem: None)
        with pytest.raises(tpm.TpmPolicyError, match="the TPM refused the PCR approval"):
            t.unseal(blob, tpm.SignedPolicy(pem, tuple(PCRS), (forged,)))
        monkeypatch.undo()
        # ... and that the PCRs are the ones sealed to or approved: here the code is made
        # to believe the PCRs still hold release 1's values, and the TPM says otherwise
        one = tpm.parse_blob(blob)
        real_read = tpm.Tpm.read_pcrs
        monkeypatch.setattr(
            tpm.Tpm,
            "read_pcrs",
            lambda self, pcrs, bank="sha256": _release_1_values(one, real_read, self, pcrs),
        )
        with pytest.raises(tpm.TpmPolicyError, match="neither the one the secret was sealed"):
            t.unseal(blob, approved)
        monkeypatch.undo()
        # an unapproved change after an approved boot: nothing matches any more
        t.extend_pcr(9, b"a file no release measures")
        with pytest.raises(tpm.TpmPolicyError, match="none of the 1 signed PCR policies"):
            t.unseal(blob, approved)


def _release_1_values(
    blob: dict[str, Any], real_read: Callable[..., dict[int, bytes]], t: tpm.Tpm, pcrs: Any
) -> dict[int, bytes]:
    """PCR values whose PolicyPCR is the blob's PCR branch: release 1's, replayed."""
    values = {p: bytes(32) for p in pcrs}
    for p in (4, 8, 9):
        if p in values:
            data = f"release 1: PCR {p}".encode()
            values[p] = hashlib.sha256(bytes(32) + hashlib.sha256(data).digest()).digest()
    assert tpm.release_policy_digest(values, 0).hex() == blob["pcr_policy"]
    return values


def test_the_vault_key_and_the_anchor_survive_an_approved_boot_chain(swtpm: Swtpm) -> None:
    key, pem = _release_key()
    policy = tpm.SignedPolicy(pem, tuple(PCRS))
    with tpm.Tpm.open(swtpm.tcti) as t:
        t.floor_define()
        _boot(t, "release 1")
        t.vault_key_create(policy, KEY)
        t.anchor_define(policy)
        t.anchor_write(policy, ANCHOR)
        assert t.vault_key_read(policy) == KEY
        branch = policy.branch(t.read_pcrs(PCRS))
    swtpm.power_cycle()
    with tpm.Tpm.open(swtpm.tcti) as t:
        _boot(t, "release 2")
        two = tpm.parse_approval(tpm.sign_approval(key, t.read_pcrs(PCRS)))
        # the node must know the state it defined the indices in (it records it): the TPM
        # shows only their policy
        with pytest.raises(tpm.TpmPolicyError, match="not the one this node defined"):
            t.vault_key_read(tpm.SignedPolicy(pem, tuple(PCRS), (two,)))
        with pytest.raises(tpm.TpmPolicyError, match="none of the 0 signed PCR policies"):
            t.vault_key_read(tpm.SignedPolicy(pem, tuple(PCRS), (), (branch,)))
        approved = tpm.SignedPolicy(pem, tuple(PCRS), (two,), (branch,))
        assert t.vault_key_read(approved) == KEY
        t.anchor_write(approved, bytes(reversed(ANCHOR)))
        assert t.anchor_read(approved) == bytes(reversed(ANCHOR))
        # an index defined now, in release 2, is sealed to release 2's PCR branch
        t.vault_key_create(approved, KEY)
        assert t.vault_key_read(tpm.SignedPolicy(pem, tuple(PCRS))) == KEY
        assert loaded_sessions(t) == []


def test_a_blob_sealed_to_a_signed_policy_opens_only_with_its_key_on_its_tpm(
    make_swtpm: Callable[[str], Swtpm],
) -> None:
    node, other_tpm = make_swtpm("node"), make_swtpm("other")
    key, pem = _release_key()
    other_key, other_pem = _release_key()
    with tpm.Tpm.open(node.tcti) as t:
        t.floor_define()
        values = t.read_pcrs(PCRS)
        blob = t.seal(b"node credential", tpm.SignedPolicy(pem, tuple(PCRS)))
        # the other key signs the same state: its approval does not open this blob
        theirs = tpm.parse_approval(tpm.sign_approval(other_key, values))
        with pytest.raises(tpm.TpmPolicyError, match="not sealed to the pinned release key"):
            t.unseal(blob, tpm.SignedPolicy(other_pem, tuple(PCRS), (theirs,)))
        # a node without a release key does not open it, nor one with other PCRs
        with pytest.raises(tpm.TpmBlobError, match="this node has none"):
            t.unseal(blob, PCRS)
        with pytest.raises(tpm.TpmPolicyError, match="this node seals to"):
            t.unseal(blob, tpm.SignedPolicy(pem, (7,)))
    mine = tpm.parse_approval(tpm.sign_approval(key, values))
    with tpm.Tpm.open(other_tpm.tcti) as t, pytest.raises(tpm.TpmBlobError, match="this TPM"):
        t.floor_define()
        t.unseal(blob, tpm.SignedPolicy(pem, tuple(PCRS), (mine,)))


def test_an_approved_unseal_raced_by_a_measuring_kernel_is_tried_again(swtpm: Swtpm) -> None:
    """PCR 10 extended right after PolicyPCR, PolicyAuthorize and PolicyOR: PCR_CHANGED,
    then a new session (with its own policy commands) unseals; no session is left loaded."""
    key, pem = _release_key()
    with tpm.Tpm.open(swtpm.tcti) as t:
        t.floor_define()
        blob = t.seal(b"node credential", tpm.SignedPolicy(pem, tuple(PCRS)))
        _boot(t, "release 2")
        approval = tpm.parse_approval(tpm.sign_approval(key, t.read_pcrs(PCRS)))
    with racing(swtpm, 10, races=2) as t:
        assert t.unseal(blob, tpm.SignedPolicy(pem, tuple(PCRS), (approval,))) == b"node credential"
        assert t.sessions == 3
        assert loaded_sessions(t) == []


def test_the_host_floor_revokes_every_release_below_it_and_only_the_node_raises_it(
    swtpm: Swtpm,
) -> None:
    """Release 1 (epoch 0) enrolls; release 2 (epoch 1) is approved, kept, and raises the
    floor with the owner secret sealed at enrollment. Booted again, release 1 opens nothing:
    not in the state it sealed everything in, not with its own approval. The empty owner
    authorization, which would let anyone undefine the floor and define it again at 0, is
    gone."""
    from tpm2_pytss.constants import ESYS_TR
    from tpm2_pytss.TSS2_Exception import TSS2_Exception

    key, pem = _release_key()
    one = tpm.SignedPolicy(pem, tuple(PCRS), epoch=0)
    owner = bytes(range(100, 100 + tpm.OWNER_AUTH_SIZE))
    with tpm.Tpm.open(swtpm.tcti) as t:
        t.floor_define()
        t.floor_define()  # once only: a second call finds it
        assert t.floor_read() == 0
        _boot(t, "release 1")
        approval_1 = tpm.parse_approval(tpm.sign_approval(key, t.read_pcrs(PCRS), epoch=0))
        blob = t.seal(b"node credential", one)
        t.vault_key_create(one, KEY)
        branch = one.branch(t.read_pcrs(PCRS))
        t.storage_persist()
        sealed_owner = t.seal(owner, one)
        assert not t.owner_auth_is_set()
        t.owner_auth_set(owner)
        assert t.owner_auth_is_set()
        # the storage primary cannot be made again now; the persistent one still opens
        assert t.unseal(blob, one) == b"node credential"
    swtpm.power_cycle()
    with tpm.Tpm.open(swtpm.tcti) as t:
        _boot(t, "release 2")
        approval_2 = tpm.parse_approval(tpm.sign_approval(key, t.read_pcrs(PCRS), epoch=1))
        two = tpm.SignedPolicy(pem, tuple(PCRS), (approval_2,), (branch,), epoch=1)
        assert t.unseal(blob, two) == b"node credential"  # the floor (0) is not above 1
        with pytest.raises(tpm.TpmError, match="could not raise the host floor"):
            t.floor_raise(1, bytes(tpm.OWNER_AUTH_SIZE))  # not the owner's secret
        assert t.floor_read() == 0
        t.floor_raise(1, t.unseal(sealed_owner, two))
        assert t.floor_read() == 1
        t.floor_raise(0, owner)  # setting no bit lowers nothing
        assert t.floor_read() == 1
        assert t.unseal(blob, two) == b"node credential"
        assert t.vault_key_read(two) == KEY
        # the floor is not undefined, and the owner seed not used, without the secret
        floor = t.esys.tr_from_tpmpublic(tpm.FLOOR_NV_INDEX)
        with pytest.raises(TSS2_Exception):
            t.esys.nv_undefine_space(floor, ESYS_TR.OWNER, session1=ESYS_TR.PASSWORD)
        t.esys.tr_close(floor)
        with pytest.raises(TSS2_Exception):
            t.esys.create_primary(None, t._storage_template(), ESYS_TR.OWNER)
    swtpm.power_cycle()
    with tpm.Tpm.open(swtpm.tcti) as t:
        _boot(t, "release 1")  # someone pointed the boot at the old slot
        back = tpm.SignedPolicy(pem, tuple(PCRS), (approval_1, approval_2), (branch,), epoch=0)
        with pytest.raises(tpm.TpmPolicyError, match="host floor is above epoch 0"):
            t.unseal(blob, back)  # the state it was sealed in
        with pytest.raises(tpm.TpmPolicyError, match="host floor is above epoch 0"):
            t.vault_key_read(back)
        with pytest.raises(tpm.TpmPolicyError, match="host floor is above epoch 0"):
            t.unseal(sealed_owner, back)
        # claiming epoch 1 in the code changes nothing: the TPM computes the branch
        claimed = tpm.SignedPolicy(pem, tuple(PCRS), (approval_1,), (branch,), epoch=1)
        with pytest.raises(tpm.TpmPolicyError):
            t.unseal(blob, claimed)
        assert loaded_sessions(t) == []


def test_a_release_key_with_a_short_coordinate_loads_in_the_tpm(swtpm: Swtpm) -> None:
    """One P-256 key in 128 has a coordinate below 2**248; the TPM takes it at full size."""
    from tpm2_pytss.constants import ESYS_TR
    from tpm2_pytss.types import TPM2B_PUBLIC

    while True:
        key = ec.generate_private_key(ec.SECP256R1())
        if key.public_key().public_numbers().x < 2**248:
            break
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with tpm.Tpm.open(swtpm.tcti) as t:
        handle = t.esys.load_external(
            TPM2B_PUBLIC(publicArea=tpm.release_key_public(pem)), hierarchy=ESYS_TR.OWNER
        )
        _public, name, _qname = t.esys.read_public(handle)
        t.esys.flush_context(handle)
    assert bytes(name) == tpm.release_key_name(pem)


def test_a_persistent_key_at_the_storage_handle_that_is_not_edgepins_is_refused(
    swtpm: Swtpm,
) -> None:
    """Someone who planted a key of their own at the handle before the node's first boot
    (the owner authorization still empty) gets nothing sealed under it."""
    from tpm2_pytss.constants import ESYS_TR, TPMA_OBJECT

    with tpm.Tpm.open(swtpm.tcti) as t:
        # edgepin's template but for one attribute: a key the dictionary-attack lockout counts
        template = t._storage_template()
        template.publicArea.objectAttributes &= ~TPMA_OBJECT.NODA
        planted, *_ = t.esys.create_primary(None, template, ESYS_TR.OWNER)
        kept = t.esys.evict_control(ESYS_TR.OWNER, planted, tpm.STORAGE_HANDLE)
        t.esys.flush_context(planted)
        t.esys.tr_close(kept)
    with tpm.Tpm.open(swtpm.tcti) as t:
        with pytest.raises(tpm.TpmPolicyError, match="not edgepin's storage key"):
            t.seal(b"node credential", [7])
        with pytest.raises(tpm.TpmPolicyError, match="not edgepin's storage key"):
            t.storage_persist()


def test_a_tpm_cleared_through_its_lockout_hierarchy_keeps_nothing_to_open(swtpm: Swtpm) -> None:
    """Clearing is the way around the owner's secret, and it takes the node's keys with the
    floor: a floor defined again at 0 opens nothing that was sealed before."""
    from tpm2_pytss.constants import ESYS_TR

    _key, pem = _release_key()
    policy = tpm.SignedPolicy(pem, tuple(PCRS), epoch=0)
    with tpm.Tpm.open(swtpm.tcti) as t:
        t.storage_persist()
        t.floor_define()
        blob = t.seal(b"node credential", policy)
        t.vault_key_create(policy, KEY)
        t.owner_auth_set(bytes(range(tpm.OWNER_AUTH_SIZE)))
        t.esys.clear(ESYS_TR.LOCKOUT)
    with tpm.Tpm.open(swtpm.tcti) as t:
        assert t.floor_read() is None and not t.owner_auth_is_set()
        assert t.vault_key_read(policy) is None
        t.storage_persist()
        t.floor_define()  # what someone would do next: a floor at 0 again
        assert t.floor_read() == 0
        with pytest.raises(tpm.TpmBlobError, match="does not belong to this TPM"):
            t.unseal(blob, policy)
