"""The TPM: PCR policies, sealing, and the factory's offline wrap for a node's EK.

Works with tpm2-pytss 2.3 (Debian trixie) and 3.0; ``tpm2_pytss.policy`` is not used
(it needs tss2-policy >= 4.0): the PolicyPCR digest is computed here.

Blobs are JSON bytes:
- ``kind: "sealed"``: created on this TPM under the owner hierarchy's storage key
  (an ECC P-256 primary recreated from the owner seed each time; a node with a release key
  keeps the same key at ``STORAGE_HANDLE`` before its owner hierarchy gets a secret); the
  object is fixedTPM|fixedParent.
- ``kind: "duplicate"``: made offline by the factory for one TPM's endorsement key; it
  is imported under the EK (which needs PolicySecret(endorsement)) and unsealed once.
Both are sealed with PolicyPCR; there is no way to seal or unseal without one. The node
unseals under the PCR selection it is configured with, never the one a blob names.
A node whose image pins a release key seals to a ``SignedPolicy`` instead: PolicyOR of
PolicyPCR over the PCRs in the values they have when it seals, and PolicyAuthorize over the
release key, which approves other PCR values (``Approval``). Such a secret opens in the
measured state it was sealed in, as before, and in any state the key approved (a host
update that brings its approval), and in no other; both branches also check the host
floor (``FLOOR_NV_INDEX``, PolicyNV), so that a release of an epoch below it opens nothing.

The anchor is an ordinary NV index (``ANCHOR_NV_INDEX``, 40 bytes) that anyone may read
and only a PolicyPCR session over the node's PCRs may write: someone who boots anything
else on the machine cannot change it. It holds the node's generation floor and the digest
of its ledger (``provisioner.node.ledger``).

No secret crosses the TPM's bus in clear. Each command that carries one runs under a
session salted with a key of this TPM and with AES-128-CFB parameter encryption: Create's
inSensitive (``seal``) and NV_Write's data (the vault key, the anchor) go to the TPM
encrypted (the session's DECRYPT attribute), Unseal's data (the node credential, image
passphrases, the imported bootstrap credential) and NV_Read's data for the vault key come
back encrypted (ENCRYPT). The PolicyPCR session itself is salted and encrypts; ``seal``
authorizes the storage key with a salted HMAC session. The salt key is the storage
primary, or the EK for a factory-made duplicate, as the TPM presents it at that moment:
its public part is not pinned. That defeats a passive sniffer on the bus; it does not
defeat an active interposer that answers as the TPM with a key of its own (such a device
can also send the TPM its own PolicyPCR and Unseal once the boot has set the PCRs).
Commands without a secret (PCR reads, Load, Import of the EK-wrapped duplicate, the
anchor's read) are not encrypted.

A command under PolicyPCR that the TPM answers with TPM_RC_PCR_CHANGED (a PCR was extended
after PolicyPCR, by a kernel that measures as it runs) is run again in a new session, a
bounded number of times (``PCR_CHANGED_ATTEMPTS``); any other refusal is final.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import enum
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

BLOB_VERSION = 1
TPM_CC_POLICY_PCR = 0x0000017F
TPM_CC_POLICY_AUTHORIZE = 0x0000016A
TPM_CC_POLICY_OR = 0x00000171
TPM_CC_POLICY_NV = 0x00000149
TPM_EO_BITCLEAR = 0x000B
# what the release key's approvals are for: part of the authorized policy, so that a
# signature the same key made for anything else authorizes nothing here
POLICY_REF = b"edgepin host boot"
APPROVAL_VERSION = 2  # 2: the approved policy checks the host floor (version 1 did not)
APPROVAL_MAX_BYTES = 8192
SIGNED_MISMATCH = (
    "the measured boot state differs: it is neither the one the secret was sealed in nor "
    "one the release key approved"
)
# edgepin's NV index in the owner range: the node's anchor (generation floor and the
# digest of its ledger), defined at enrollment, written only under the PCR policy
ANCHOR_NV_INDEX = 0x0100E9D0
ANCHOR_NV_SIZE = 40
# the key of the node's state vault (provisioner.node.vault): readable and writable only
# under the PCR policy, never in the clear on any disk
VAULT_NV_INDEX = 0x0100E9D1
VAULT_KEY_SIZE = 64
# the host floor: a bit field (TPM_NT_BITS, whose bits the TPM only ever sets) that every
# policy of a node with a release key checks (PolicyNV). Raising the floor to epoch E sets
# bits 0 .. E-1; a release of epoch e passes while bit e is clear, so a release below the
# floor opens nothing, whatever the disk says. Anyone may read it; only the owner
# hierarchy may set its bits or undefine it, and the node gives that hierarchy a secret
# of its own at enrollment. Its public area is the same on every node (no authPolicy), so
# its name, which the release key's approvals sign, is too.
FLOOR_NV_INDEX = 0x0100E9D2
FLOOR_REFUSAL = "host floor is above epoch"  # how a refusal for it reads
FLOOR_NV_SIZE = 8
MAX_EPOCH = 63
# the owner hierarchy's storage primary, kept at this persistent handle once the node has
# given that hierarchy a secret (it can then no longer be made again without the secret)
STORAGE_HANDLE = 0x8100E9D0
OWNER_AUTH_SIZE = 32
BANKS = {"sha256": (0x000B, hashlib.sha256)}
EK_CERT_RSA_NV_INDEX = 0x01C00002
EK_CERT_READ_CHUNK = 512  # bytes per NV_Read: within every TPM's NV buffer (1024 is common)
# TPM_RC_PCR_CHANGED is transient, not a refusal: between PolicyPCR and the command that
# uses the session the TPM compares one update counter shared by the PCRs (on swtpm every
# PCR from 0 to 15, whether in the selection or not), not the selection's values, and a
# running kernel extends PCRs at any time (module and IMA measurements into PCR 10). So
# the command is run again in a new session, this many times in all: enough for a burst
# of measurements, bounded so that PCRs extended without end give an error, not a hang.
# A PCR of the selection that really changed fails the policy in the next session
# (TPM_RC_POLICY_FAIL), which is never retried.
PCR_CHANGED_ATTEMPTS = 8
# the pause before the next session doubles from this (0.02 s ... 1.28 s, 2.5 s in all):
# a burst of module loads at boot is waited out rather than raced
PCR_CHANGED_PAUSE = 0.02

_T = TypeVar("_T")


@dataclasses.dataclass(frozen=True)
class NvSlot:
    """One of edgepin's NV indices: defined with an empty owner authorization, written
    only under PolicyPCR; read with the index's empty authorization, or under the
    policy too (``policy_read``)."""

    name: str
    index: int
    size: int
    policy_read: bool

    def attributes(self) -> int:
        from tpm2_pytss.constants import TPMA_NV

        read = TPMA_NV.POLICYREAD if self.policy_read else TPMA_NV.AUTHREAD
        return int(TPMA_NV.POLICYWRITE | read | TPMA_NV.NO_DA)


ANCHOR = NvSlot("anchor", ANCHOR_NV_INDEX, ANCHOR_NV_SIZE, policy_read=False)
VAULT_KEY = NvSlot("vault key", VAULT_NV_INDEX, VAULT_KEY_SIZE, policy_read=True)
# the host floor's handle and name in messages (its public area: ``floor_public_bytes``)
FLOOR_SLOT = NvSlot("host floor", FLOOR_NV_INDEX, FLOOR_NV_SIZE, policy_read=False)


class SessionKind(enum.Enum):
    POLICY = "policy"
    HMAC = "hmac"


class Crypt(enum.Enum):
    """Which way a session's parameter encryption protects the first parameter."""

    COMMAND = "command"  # to the TPM: the secret is in the command (Create, NV_Write)
    RESPONSE = "response"  # from the TPM: the secret is in the response (Unseal, NV_Read)
    NONE = "none"  # an HMAC session that only keeps an authorization off the bus


class TpmError(Exception):
    """Base class of TPM failures."""


class TpmUnavailableError(TpmError):
    """The TPM cannot be opened."""


class TpmPolicyError(TpmError):
    """The PCR policy does not match: the measured state differs from enrollment."""


class TpmBlobError(TpmError):
    """The blob is malformed or belongs to another TPM."""


class EkCertificateError(TpmError):
    """The EK certificate chain does not verify."""


# ------------------------------------------------------------------ pure logic


def _bank(bank: str) -> tuple[int, Any]:
    try:
        return BANKS[bank]
    except KeyError:
        raise TpmBlobError(f"unsupported PCR bank {bank!r}") from None


def pcr_selection_bytes(pcrs: Sequence[int], bank: str = "sha256") -> bytes:
    """A marshalled TPML_PCR_SELECTION with one bank."""
    alg, _ = _bank(bank)
    bitmap = bytearray(3)
    for p in pcrs:
        if not 0 <= p < 24:
            raise TpmBlobError(f"PCR {p} out of range")
        bitmap[p // 8] |= 1 << (p % 8)
    return (1).to_bytes(4, "big") + alg.to_bytes(2, "big") + bytes([3]) + bytes(bitmap)


def pcr_policy_digest(pcr_values: Mapping[int, bytes], bank: str = "sha256") -> bytes:
    """TPM2_PolicyPCR's policy digest, from an all-zero start, for the given PCR values."""
    _, hfunc = _bank(bank)
    pcrs = sorted(pcr_values)
    pcr_digest = hfunc(b"".join(pcr_values[p] for p in pcrs)).digest()
    start = bytes(hfunc().digest_size)
    digest: bytes = hfunc(
        start + TPM_CC_POLICY_PCR.to_bytes(4, "big") + pcr_selection_bytes(pcrs, bank) + pcr_digest
    ).digest()
    return digest


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ---------------------------------------------------------- signed PCR policies
#
# What is sealed to a ``SignedPolicy`` has as authPolicy PolicyOR of two branches: the
# PolicyPCR digest of the PCRs as they were when it was sealed (the PCR branch, as a node
# without a release key seals), and TPM2_PolicyAuthorize over the release key's name and
# ``POLICY_REF`` (the signed branch). The signed branch opens it in any measured state for
# which the release key signed the PolicyPCR digest (an approval): the TPM itself checks the
# signature (VerifySignature, whose ticket PolicyAuthorize requires) and that the session's
# PolicyPCR, over the PCRs as they are, gives the digest that was signed. A host release
# whose boot chain measures other values brings its approval; nothing is sealed again.


def release_key_public(pem: bytes) -> Any:
    """The release key as the TPM loads it (TPMT_PUBLIC, sha256 name, signing only):
    an ECDSA P-256 public key in PEM. TpmBlobError for anything else."""
    from tpm2_pytss.constants import TPM2_ALG, TPMA_OBJECT
    from tpm2_pytss.types import TPMT_PUBLIC

    key = _load_release_key(pem)
    try:
        public = TPMT_PUBLIC.from_pem(
            key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            nameAlg=TPM2_ALG.SHA256,
            objectAttributes=TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.USERWITHAUTH,
        )
    except (ValueError, TypeError) as e:
        raise TpmBlobError(f"not a usable release key: {e}") from None
    # tpm2-pytss gives a coordinate below 2**248 in fewer than 32 bytes (one key in 128);
    # the TPM takes a P-256 point only at its full size
    numbers = key.public_numbers()
    public.unique.ecc.x = numbers.x.to_bytes(32, "big")
    public.unique.ecc.y = numbers.y.to_bytes(32, "big")
    return public


def _load_release_key(pem: bytes) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError):
        raise TpmBlobError("the release key is not a PEM public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise TpmBlobError("the release key must be an ECDSA P-256 public key")
    return key


def release_key_name(pem: bytes) -> bytes:
    """The TPM name of the release key: its name algorithm, then sha256 of its public area."""
    return bytes(release_key_public(pem).get_name())


def authorize_policy_digest(key_name: bytes, policy_ref: bytes = POLICY_REF) -> bytes:
    """TPM2_PolicyAuthorize's policy digest for ``key_name``: what a sealed object's
    authPolicy is when any PCR state the key signs may unseal it."""
    first = hashlib.sha256(
        bytes(32) + TPM_CC_POLICY_AUTHORIZE.to_bytes(4, "big") + key_name
    ).digest()
    return hashlib.sha256(first + policy_ref).digest()


def or_policy_digest(branches: Sequence[bytes]) -> bytes:
    """TPM2_PolicyOR's policy digest over ``branches`` (2 to 8 policy digests)."""
    if not 2 <= len(branches) <= 8:
        raise TpmError("PolicyOR takes 2 to 8 branches")
    return hashlib.sha256(
        bytes(32) + TPM_CC_POLICY_OR.to_bytes(4, "big") + b"".join(branches)
    ).digest()


def floor_public_bytes(written: bool = True) -> bytes:
    """The host floor's TPMS_NV_PUBLIC, marshalled: the same on every node."""
    from tpm2_pytss.constants import TPM2_NT, TPMA_NV

    attributes = (
        (int(TPM2_NT.BITS) << int(TPMA_NV.TPM2_NT_SHIFT))
        | int(TPMA_NV.OWNERWRITE)
        | int(TPMA_NV.AUTHREAD)
        | int(TPMA_NV.NO_DA)
        | (int(TPMA_NV.WRITTEN) if written else 0)
    )
    return (
        FLOOR_NV_INDEX.to_bytes(4, "big")
        + BANKS["sha256"][0].to_bytes(2, "big")
        + attributes.to_bytes(4, "big")
        + (0).to_bytes(2, "big")  # authPolicy: none
        + FLOOR_NV_SIZE.to_bytes(2, "big")
    )


def floor_name() -> bytes:
    """The TPM name of the host floor once written: its name algorithm, then sha256 of its
    public area."""
    return BANKS["sha256"][0].to_bytes(2, "big") + hashlib.sha256(floor_public_bytes()).digest()


def floor_operand(epoch: int) -> bytes:
    """PolicyNV's operand for a release of ``epoch``: its bit, which must be clear."""
    if not 0 <= epoch <= MAX_EPOCH:
        raise TpmError(f"a host epoch is a whole number from 0 to {MAX_EPOCH}")
    return (1 << epoch).to_bytes(FLOOR_NV_SIZE, "big")


def floor_bits(epoch: int) -> int:
    """The bits NV_SetBits sets to raise the floor to ``epoch``: every epoch below it."""
    floor_operand(epoch)
    return (1 << epoch) - 1


def floor_of(value: int) -> int:
    """The floor a bit field holds: the lowest epoch that still passes above every set bit."""
    return value.bit_length()


def release_policy_digest(
    pcr_values: Mapping[int, bytes], epoch: int, bank: str = "sha256"
) -> bytes:
    """The policy of one host release's measured state: PolicyPCR over ``pcr_values``, then
    PolicyNV that the host floor is at most ``epoch`` (the floor's bit ``epoch`` is clear)."""
    args = hashlib.sha256(
        floor_operand(epoch) + (0).to_bytes(2, "big") + TPM_EO_BITCLEAR.to_bytes(2, "big")
    ).digest()
    return hashlib.sha256(
        pcr_policy_digest(pcr_values, bank)
        + TPM_CC_POLICY_NV.to_bytes(4, "big")
        + args
        + floor_name()
    ).digest()


def approval_hash(approved_policy: bytes, policy_ref: bytes = POLICY_REF) -> bytes:
    """aHash: the digest the release key signs for one approved policy."""
    return hashlib.sha256(approved_policy + policy_ref).digest()


@dataclasses.dataclass(frozen=True)
class Approval:
    """The release key's signature over the policy of one host release's measured state:
    its PCR values, and its epoch, which the host floor must not be above."""

    bank: str
    pcr_values: Mapping[int, bytes]
    signature: bytes  # DER ECDSA over approval_hash(policy)
    epoch: int = 0

    @property
    def policy(self) -> bytes:
        return release_policy_digest(self.pcr_values, self.epoch, self.bank)

    @property
    def pcrs(self) -> list[int]:
        return sorted(self.pcr_values)


def sign_approval(
    key: ec.EllipticCurvePrivateKey,
    pcr_values: Mapping[int, bytes],
    epoch: int = 0,
    bank: str = "sha256",
) -> bytes:
    """An approval (JSON bytes) of ``pcr_values`` at host epoch ``epoch``, signed with the
    release key."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import utils

    _, hfunc = _bank(bank)
    if not pcr_values:
        raise TpmError("an approval names at least one PCR")
    for p, v in pcr_values.items():
        pcr_selection_bytes([p], bank)
        if len(v) != hfunc().digest_size:
            raise TpmError(f"PCR {p}: a {bank} value is {hfunc().digest_size} bytes")
    ahash = approval_hash(release_policy_digest(pcr_values, epoch, bank))
    signature = key.sign(ahash, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    return json.dumps(
        {
            "version": APPROVAL_VERSION,
            "kind": "pcr-approval",
            "bank": bank,
            "epoch": epoch,
            "pcrs": {str(p): pcr_values[p].hex() for p in sorted(pcr_values)},
            "signature": _b64(signature),
        },
        sort_keys=True,
    ).encode()


def parse_approval(raw: bytes) -> Approval:
    """An approval read from a disk or a release (untrusted): its form checked, its
    signature not yet (``verify_approval``); TpmBlobError for anything else."""
    if len(raw) > APPROVAL_MAX_BYTES:
        raise TpmBlobError("the PCR approval is too large")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise TpmBlobError("the PCR approval is not JSON") from None
    if (
        not isinstance(doc, dict)
        or doc.get("version") != APPROVAL_VERSION
        or doc.get("kind") != "pcr-approval"
    ):
        raise TpmBlobError("the PCR approval has an unknown version or kind")
    bank = doc.get("bank")
    if not isinstance(bank, str) or bank not in BANKS:
        raise TpmBlobError("the PCR approval names an unsupported PCR bank")
    size = BANKS[bank][1]().digest_size
    epoch = doc.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 <= epoch <= MAX_EPOCH:
        raise TpmBlobError(f"the PCR approval's epoch is not a whole number from 0 to {MAX_EPOCH}")
    pcrs, signature = doc.get("pcrs"), doc.get("signature")
    if not isinstance(pcrs, dict) or not pcrs or not isinstance(signature, str):
        raise TpmBlobError("the PCR approval is malformed")
    values: dict[int, bytes] = {}
    for key, value in pcrs.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 2):
            raise TpmBlobError("the PCR approval names a PCR that is not a number")
        if not 0 <= int(key) < 24 or int(key) in values:
            raise TpmBlobError("the PCR approval names a PCR out of range, or twice")
        if not isinstance(value, str) or len(value) != 2 * size:
            raise TpmBlobError(f"the PCR approval's value of PCR {key} is not a {bank} digest")
        try:
            values[int(key)] = bytes.fromhex(value)
        except ValueError:
            raise TpmBlobError(f"the PCR approval's value of PCR {key} is not hex") from None
    try:
        sig = base64.b64decode(signature, validate=True)
    except ValueError:
        raise TpmBlobError("the PCR approval's signature is not base64") from None
    if not 8 <= len(sig) <= 80:  # DER ECDSA P-256: 8 to 72 bytes
        raise TpmBlobError("the PCR approval's signature is not an ECDSA P-256 signature")
    return Approval(bank, values, sig, epoch)


def verify_approval(approval: Approval, release_key_pem: bytes) -> None:
    """TpmPolicyError unless the pinned release key signed ``approval``."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import utils

    key = _load_release_key(release_key_pem)
    try:
        key.verify(
            approval.signature,
            approval_hash(approval.policy),
            ec.ECDSA(utils.Prehashed(hashes.SHA256())),
        )
    except (InvalidSignature, ValueError):
        raise TpmPolicyError("the PCR approval is not signed by the pinned release key") from None


@dataclasses.dataclass(frozen=True)
class SignedPolicy:
    """What a node seals to when its image pins a release key: the key, and the approvals
    it has. Only approvals over exactly ``pcrs`` (the node's selection) count."""

    release_key_pem: bytes
    pcrs: tuple[int, ...]
    approvals: tuple[Approval, ...] = ()
    # the branches (``release_policy_digest``) the node sealed its NV indices under: the
    # TPM shows an index's authPolicy, not the branches it was made of
    branches: tuple[bytes, ...] = ()
    # the running host release's epoch (EDGEPIN_HOST_EPOCH): what is sealed now opens
    # only while the host floor is not above it
    epoch: int = 0

    @property
    def digest(self) -> bytes:
        """The signed branch: PolicyAuthorize over the release key."""
        return authorize_policy_digest(release_key_name(self.release_key_pem))

    def sealed_digest(self, pcr_branch: bytes) -> bytes:
        """The authPolicy of what was sealed in the state whose branch is ``pcr_branch``."""
        return or_policy_digest([pcr_branch, self.digest])

    def branch(self, pcr_values: Mapping[int, bytes]) -> bytes:
        """The branch of the running release in the state ``pcr_values``."""
        return release_policy_digest(pcr_values, self.epoch)

    def usable(self) -> list[Approval]:
        return [a for a in self.approvals if a.pcrs == sorted(self.pcrs) and a.bank == "sha256"]


# a node's policy: PCRs sealed to in their current values, or a signed policy
Policy = Sequence[int] | SignedPolicy


def _tpm_signature(der: bytes) -> Any:
    """A DER ECDSA signature as TPMT_SIGNATURE (ECDSA, sha256)."""
    from cryptography.hazmat.primitives.asymmetric import utils
    from tpm2_pytss.constants import TPM2_ALG
    from tpm2_pytss.types import TPMT_SIGNATURE

    try:
        r, s = utils.decode_dss_signature(der)
        r_bytes, s_bytes = r.to_bytes(32, "big"), s.to_bytes(32, "big")
    except (ValueError, OverflowError):
        raise TpmBlobError("the PCR approval's signature is not an ECDSA P-256 signature") from None
    sig = TPMT_SIGNATURE(sigAlg=TPM2_ALG.ECDSA)
    sig.signature.ecdsa.hash = TPM2_ALG.SHA256
    sig.signature.ecdsa.signatureR = r_bytes
    sig.signature.ecdsa.signatureS = s_bytes
    return sig


class BlobKind(enum.StrEnum):
    SEALED = "sealed"  # made on this TPM, under its storage key
    DUPLICATE = "duplicate"  # made offline for this TPM's EK (the bootstrap credential)


def parse_blob(blob: bytes) -> dict[str, Any]:
    """A blob's fields, checked for form (what they are worth is the TPM's to say);
    TpmBlobError for anything else."""
    try:
        data = json.loads(blob)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise TpmBlobError("TPM blob is not JSON") from None
    if not isinstance(data, dict) or data.get("version") != BLOB_VERSION:
        raise TpmBlobError("TPM blob has an unknown version")
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in set(BlobKind):
        raise TpmBlobError(f"TPM blob has an unknown kind {str(kind)[:20]!r}")
    if kind == BlobKind.SEALED:
        need: tuple[str, ...] = ("public", "private")
    else:
        need = ("public", "duplicate", "seed")
    try:
        for key in need:
            base64.b64decode(data[key], validate=True)
        pcrs = data.get("pcrs", [])
        if not isinstance(pcrs, list) or any(type(p) is not int for p in pcrs):
            raise ValueError
    except (KeyError, ValueError, TypeError):
        raise TpmBlobError("TPM blob is malformed") from None
    return data


# ------------------------------------------------------------------- EK helpers


def ek_public_pem_from_cert(cert: bytes) -> bytes:
    """The public key (PEM) of an EK certificate given as PEM or DER."""
    parsed = _load_cert(cert)
    return parsed.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _load_cert(data: bytes) -> x509.Certificate:
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as e:
        raise EkCertificateError(f"not an X.509 certificate: {e}") from None


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    key = issuer.public_key()
    algorithm = cert.signature_hash_algorithm
    try:
        if isinstance(key, rsa.RSAPublicKey) and algorithm is not None:
            key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey) and algorithm is not None:
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algorithm))
        else:
            return False
    except InvalidSignature:
        return False
    return True


def verify_ek_cert_chain(cert: bytes, ca_bundle: bytes) -> None:
    """Check that the EK certificate chains up to a self-signed CA in the bundle.

    EK certificates carry extensions (TPM SAN in a critical extension, no key usage for
    signing) that general X.509 path validation rejects, so the signatures and validity
    periods are checked one link at a time.
    """
    import datetime

    leaf = _load_cert(cert)
    try:
        bundle = x509.load_pem_x509_certificates(ca_bundle)
    except ValueError:
        raise EkCertificateError("the EK CA bundle holds no PEM certificate") from None
    now = datetime.datetime.now(datetime.UTC)
    current = leaf
    for _ in range(8):
        if not (current.not_valid_before_utc <= now <= current.not_valid_after_utc):
            raise EkCertificateError(f"certificate {current.subject.rfc4514_string()} expired")
        issuer = next((c for c in bundle if _signed_by(current, c)), None)
        if issuer is None:
            raise EkCertificateError(
                f"no issuer of {current.subject.rfc4514_string() or 'the EK'} in the CA bundle"
            )
        if issuer.issuer == issuer.subject and _signed_by(issuer, issuer):
            return
        current = issuer
    raise EkCertificateError("EK certificate chain too long")


# --------------------------------------------------------------- factory, offline


def wrap_for_ek(
    ek_public_pem: bytes,
    secret: bytes,
    pcr_values: Mapping[int, bytes] | None,
    bank: str = "sha256",
) -> bytes:
    """A duplication blob of a sealed object holding ``secret``, for one TPM's RSA EK."""
    from tpm2_pytss.constants import TPM2_ALG, TPMA_OBJECT
    from tpm2_pytss.types import (
        TPM2B_PUBLIC,
        TPM2B_SENSITIVE,
        TPMT_PUBLIC,
        TPMT_SYM_DEF_OBJECT,
        TPMU_SYM_KEY_BITS,
        TPMU_SYM_MODE,
    )
    from tpm2_pytss.utils import wrap

    if len(secret) > 128:
        raise TpmError("a sealed secret holds at most 128 bytes")
    aes128cfb = TPMT_SYM_DEF_OBJECT(
        algorithm=TPM2_ALG.AES,
        keyBits=TPMU_SYM_KEY_BITS(aes=128),
        mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB),
    )
    try:
        ek = TPMT_PUBLIC.from_pem(
            ek_public_pem,
            nameAlg=TPM2_ALG.SHA256,
            objectAttributes=TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT,
            symmetric=aes128cfb,
        )
    except (ValueError, TypeError) as e:
        raise TpmBlobError(f"not a usable EK public key: {e}") from None
    if ek.type != TPM2_ALG.RSA:
        raise TpmBlobError("only RSA endorsement keys are supported")
    if not pcr_values:
        raise TpmError("a PCR policy is required: name the PCRs and their values")
    attrs = TPMA_OBJECT.NODA
    policy = pcr_policy_digest(pcr_values, bank)
    sensitive, public = TPM2B_SENSITIVE.keyedhash_from_secret(secret, objectAttributes=attrs)
    # tpm2-pytss versions differ in returning the TPMT_ or the TPM2B_ forms
    pub2b = public if isinstance(public, TPM2B_PUBLIC) else TPM2B_PUBLIC(publicArea=public)
    pub2b.publicArea.authPolicy = policy
    sens2b = (
        sensitive
        if isinstance(sensitive, TPM2B_SENSITIVE)
        else TPM2B_SENSITIVE(sensitiveArea=sensitive)
    )
    _key, duplicate, seed = wrap(ek, pub2b, sens2b)
    return json.dumps(
        {
            "version": BLOB_VERSION,
            "kind": BlobKind.DUPLICATE,
            "public": _b64(pub2b.marshal()),
            "duplicate": _b64(duplicate.marshal()),
            "seed": _b64(seed.marshal()),
            "pcrs": sorted(pcr_values or {}),
            "bank": bank,
        },
        sort_keys=True,
    ).encode()


# ------------------------------------------------------------------- on a TPM


class Tpm:
    """An ESAPI connection; transient objects and sessions are always flushed."""

    def __init__(self, esys: Any) -> None:
        self.esys = esys
        self._storage: Any = None  # the persistent storage primary, once looked up

    @classmethod
    @contextmanager
    def open(cls, tcti: str) -> Iterator[Tpm]:
        # tpm2-tss logs expected misses (absent NV indices) as ERROR on stderr; edgepin
        # reports TPM failures itself, in one line
        os.environ.setdefault("TSS2_LOG", "all+NONE")
        try:
            from tpm2_pytss import ESAPI
            from tpm2_pytss.TCTILdr import TCTILdr

            name, _, conf = tcti.partition(":")
            esys = ESAPI(TCTILdr(name, conf or None))
        except Exception as e:
            raise TpmUnavailableError(f"cannot open TPM {tcti!r}: {e}") from None
        try:
            yield cls(esys)
        finally:
            esys.close()

    # -- helpers --------------------------------------------------------------
    def _flush(self, handle: Any) -> None:
        if handle is not None and handle is self._storage:
            return  # persistent: it stays for the connection
        with contextlib.suppress(Exception):  # already gone
            self.esys.flush_context(handle)

    def _storage_primary(self) -> Any:
        """The storage primary: the persistent one (``STORAGE_HANDLE``) when the node made
        it so, else recreated from the owner seed (the same key)."""
        from tpm2_pytss.constants import ESYS_TR

        persistent = self._persistent_storage()
        if persistent is not None:
            return persistent
        handle, *_ = self.esys.create_primary(None, self._storage_template(), ESYS_TR.OWNER)
        return handle

    def _persistent_storage(self) -> Any | None:
        """The persistent storage primary, or None when there is none. Anything else at
        its handle (another template, a key that was not made inside this TPM) is a
        TpmPolicyError: a key whose private part someone else knows must never wrap a
        secret."""
        from tpm2_pytss.TSS2_Exception import TSS2_Exception

        if self._storage is not None:
            return self._storage
        try:
            handle = self.esys.tr_from_tpmpublic(STORAGE_HANDLE)
        except TSS2_Exception:
            return None
        try:
            public, _name, _qname = self.esys.read_public(handle)
            want = self._storage_template().publicArea
            got = public.publicArea
            want.unique = got.unique
            if bytes(want.marshal()) != bytes(got.marshal()):
                raise TpmPolicyError(
                    f"the TPM's persistent object {STORAGE_HANDLE:#x} is not edgepin's storage key"
                )
        except BaseException:
            self._close(handle)
            raise
        self._storage = handle
        return handle

    def _storage_template(self) -> Any:
        from tpm2_pytss.constants import TPMA_OBJECT
        from tpm2_pytss.types import TPM2B_PUBLIC

        return TPM2B_PUBLIC.parse(
            "ecc256:aes128cfb",
            objectAttributes=TPMA_OBJECT.RESTRICTED
            | TPMA_OBJECT.DECRYPT
            | TPMA_OBJECT.FIXEDTPM
            | TPMA_OBJECT.FIXEDPARENT
            | TPMA_OBJECT.SENSITIVEDATAORIGIN
            | TPMA_OBJECT.USERWITHAUTH
            | TPMA_OBJECT.NODA,
        )

    def _ek(self) -> Any:
        from tpm2_pytss.constants import ESYS_TR
        from tpm2_pytss.utils import NVReadEK, create_ek_template

        _cert, template = create_ek_template("EK-RSA2048", NVReadEK(self.esys))
        handle, *_ = self.esys.create_primary(None, template, ESYS_TR.ENDORSEMENT)
        return handle

    def _policy_session(self) -> Any:
        """An unsalted policy session without parameter encryption: for commands that
        carry no secret (PolicySecret, Import and Load of an EK-wrapped blob)."""
        from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_SE
        from tpm2_pytss.types import TPMT_SYM_DEF

        return self.esys.start_auth_session(
            ESYS_TR.NONE,
            ESYS_TR.NONE,
            TPM2_SE.POLICY,
            TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
            TPM2_ALG.SHA256,
        )

    def _salted_session(self, salt_key: Any, kind: SessionKind, crypt: Crypt) -> Any:
        """A session salted with ``salt_key`` (a loaded decryption key: the TPM decrypts
        the salt, so the session key is not derived from anything on the bus) that
        encrypts, with AES-128-CFB, the first parameter of the commands (``Crypt.COMMAND``)
        or responses (``Crypt.RESPONSE``) it is used in."""
        from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_SE, TPMA_SESSION
        from tpm2_pytss.types import TPMT_SYM_DEF, TPMU_SYM_KEY_BITS, TPMU_SYM_MODE

        aes128cfb = TPMT_SYM_DEF(
            algorithm=TPM2_ALG.AES,
            keyBits=TPMU_SYM_KEY_BITS(aes=128),
            mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB),
        )
        se = TPM2_SE.POLICY if kind is SessionKind.POLICY else TPM2_SE.HMAC
        session = self.esys.start_auth_session(
            salt_key, ESYS_TR.NONE, se, aes128cfb, TPM2_ALG.SHA256, None
        )
        direction = {
            Crypt.COMMAND: TPMA_SESSION.DECRYPT,
            Crypt.RESPONSE: TPMA_SESSION.ENCRYPT,
            Crypt.NONE: 0,
        }[crypt]
        try:
            self.esys.trsess_set_attributes(session, TPMA_SESSION.CONTINUESESSION | direction, 0xFF)
        except BaseException:
            self._flush(session)
            raise
        return session

    def _pcr_session(
        self,
        pcrs: Sequence[int],
        bank: str,
        crypt: Crypt,
        salt_key: Any = None,
        then: Callable[[Any], None] | None = None,
    ) -> Any:
        """A salted policy session past PolicyPCR over ``pcrs`` (and ``then(session)``,
        the policy commands that follow it), encrypting as ``crypt`` says. Without a
        ``salt_key`` the storage primary is recreated to salt it."""
        from tpm2_pytss.types import TPML_PCR_SELECTION

        selection = TPML_PCR_SELECTION.unmarshal(pcr_selection_bytes(sorted(pcrs), bank))[0]
        own_key = salt_key is None
        key = self._storage_primary() if own_key else salt_key
        try:
            session = self._salted_session(key, SessionKind.POLICY, crypt)
        finally:
            if own_key:
                self._flush(key)  # the salt is in the session now
        try:
            self.esys.policy_pcr(session, b"", selection)
            if then is not None:
                then(session)
        except BaseException:
            self._flush(session)
            raise
        return session

    def _under_pcr_policy(
        self,
        pcrs: Sequence[int],
        bank: str,
        crypt: Crypt,
        command: Callable[[Any], _T],
        salt_key: Any = None,
        then: Callable[[Any], None] | None = None,
    ) -> _T:
        """``command(session)`` with a PolicyPCR session from ``_pcr_session``, flushed
        afterwards whatever happens. On TPM_RC_PCR_CHANGED it starts again with a new
        session, ``PCR_CHANGED_ATTEMPTS`` times in all; that error after the last attempt,
        and any other at once, is raised as the TSS raised it, for the caller to translate."""
        from tpm2_pytss.TSS2_Exception import TSS2_Exception

        attempt = 1
        while True:
            session = self._pcr_session(pcrs, bank, crypt, salt_key, then)
            try:
                return command(session)
            except TSS2_Exception as e:
                if not _is_pcr_changed(e) or attempt >= PCR_CHANGED_ATTEMPTS:
                    raise
            finally:
                self._flush(session)
            time.sleep(PCR_CHANGED_PAUSE * 2 ** (attempt - 1))
            attempt += 1

    def _ek_session(self) -> Any:
        from tpm2_pytss.constants import ESYS_TR
        from tpm2_pytss.types import TPM2B_DIGEST, TPM2B_NONCE

        session = self._policy_session()
        # every argument explicit: tpm2-pytss 2.3 (Debian's, in the host image) has no
        # defaults for them, 3.0 has
        self.esys.policy_secret(
            ESYS_TR.ENDORSEMENT, session, TPM2B_NONCE(), TPM2B_DIGEST(), TPM2B_NONCE(), 0
        )
        return session

    def _unseal_loaded(self, handle: Any, salt_key: Any, pcrs: list[int], bank: str) -> bytes:
        """Unseal under a PolicyPCR session salted with ``salt_key`` that encrypts the
        response: the secret leaves the TPM only encrypted."""
        from tpm2_pytss.constants import ESYS_TR
        from tpm2_pytss.TSS2_Exception import TSS2_Exception

        def unseal(session: Any) -> bytes:
            return bytes(self.esys.unseal(handle, session, ESYS_TR.NONE, ESYS_TR.NONE))

        try:
            return self._under_pcr_policy(pcrs, bank, Crypt.RESPONSE, unseal, salt_key)
        except TSS2_Exception as e:
            if _is_policy_failure(e):
                raise TpmPolicyError(
                    f"PCR policy over {bank} PCRs {pcrs} does not match: the measured "
                    "boot state differs from enrollment"
                ) from None
            raise TpmError(f"unseal failed: {_tss_text(e)}") from None

    # -- API --------------------------------------------------------------------
    def read_pcrs(self, pcrs: Sequence[int], bank: str = "sha256") -> dict[int, bytes]:
        from tpm2_pytss.types import TPML_PCR_SELECTION

        values: dict[int, bytes] = {}
        for p in pcrs:  # one at a time: PCR_Read returns at most 8 digests per call
            selection = TPML_PCR_SELECTION.unmarshal(pcr_selection_bytes([p], bank))[0]
            _counter, _sel, digests = self.esys.pcr_read(selection)
            values[p] = bytes(digests.digests[0])
        return values

    def extend_pcr(self, pcr: int, data: bytes) -> None:
        from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
        from tpm2_pytss.types import TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA

        digest = hashlib.sha256(data).digest()
        values = TPML_DIGEST_VALUES(
            [TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=digest))]
        )
        self.esys.pcr_extend(ESYS_TR.PCR0 + pcr, values)

    def ek_certificate(self) -> bytes | None:
        """The RSA EK certificate the TPM's vendor stored in NV (index 0x01c00002), as
        stored (DER); None when the TPM keeps none there. Read with the owner's empty
        authorization, in pieces the TPM's NV buffer holds."""
        from tpm2_pytss.constants import ESYS_TR, TPMA_NV
        from tpm2_pytss.TSS2_Exception import TSS2_Exception

        try:
            handle = self.esys.tr_from_tpmpublic(EK_CERT_RSA_NV_INDEX)
        except TSS2_Exception:
            return None  # not defined
        try:
            public, _name = self.esys.nv_read_public(handle)
            size = int(public.nvPublic.dataSize)
            attributes = int(public.nvPublic.attributes)
            # the owner's (empty) authorization where the index allows it, else its own
            auth = ESYS_TR.OWNER if attributes & int(TPMA_NV.OWNERREAD) else handle
            data = b""
            while len(data) < size:
                piece = min(EK_CERT_READ_CHUNK, size - len(data))
                data += bytes(
                    self.esys.nv_read(handle, piece, len(data), auth, session1=ESYS_TR.PASSWORD)
                )
            return data
        except TSS2_Exception as e:
            raise TpmError(f"the TPM's EK certificate could not be read: {e}") from None
        finally:
            self._close(handle)

    def ek_public_pem(self) -> bytes:
        handle = self._ek()
        try:
            public, _name, _qname = self.esys.read_public(handle)
            return bytes(public.to_pem())
        finally:
            self._flush(handle)

    def seal(self, secret: bytes, policy: Policy, bank: str = "sha256") -> bytes:
        """Seal ``secret`` to ``policy``: PolicyPCR over these PCRs in their current
        values, or (a ``SignedPolicy``) that or the release key's signed policy."""
        if len(secret) > 128:
            raise TpmError("a sealed secret holds at most 128 bytes")
        signed = policy if isinstance(policy, SignedPolicy) else None
        selection = policy.pcrs if isinstance(policy, SignedPolicy) else policy
        if signed is not None:
            bank = "sha256"
        pcrs = sorted(set(selection))
        if not pcrs:
            raise TpmError("refusing to seal without a PCR policy (empty PCR selection)")
        values = self.read_pcrs(pcrs, bank)
        if signed is not None:
            branch = signed.branch(values)
            auth = signed.sealed_digest(branch)
        else:
            auth = branch = pcr_policy_digest(values, bank)
        public, private = self._create_sealed(secret, auth)
        # a signed policy's blob names its PCR branch: the TPM shows only the OR of both
        extra = {"policy": "signed", "pcr_policy": branch.hex()} if signed is not None else {}
        return json.dumps(
            {
                "version": BLOB_VERSION,
                "kind": BlobKind.SEALED,
                **extra,
                "public": _b64(public),
                "private": _b64(private),
                "pcrs": pcrs,
                "bank": bank,
            },
            sort_keys=True,
        ).encode()

    def _create_sealed(self, secret: bytes, policy: bytes) -> tuple[bytes, bytes]:
        """A sealed object holding ``secret`` under the storage primary, usable only
        with ``policy``: its marshalled public and private parts."""
        from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPMA_OBJECT
        from tpm2_pytss.types import (
            TPM2B_DATA,
            TPM2B_PUBLIC,
            TPM2B_SENSITIVE_CREATE,
            TPML_PCR_SELECTION,
            TPMS_SENSITIVE_CREATE,
            TPMT_PUBLIC,
        )

        attrs = TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.NODA
        public = TPMT_PUBLIC(
            type=TPM2_ALG.KEYEDHASH, nameAlg=TPM2_ALG.SHA256, objectAttributes=attrs
        )
        public.parameters.keyedHashDetail.scheme.scheme = TPM2_ALG.NULL
        public.authPolicy = policy
        sensitive = TPM2B_SENSITIVE_CREATE(sensitive=TPMS_SENSITIVE_CREATE(data=secret))
        parent = self._storage_primary()
        session = None
        try:
            # the parent's authorization (empty) by an HMAC session salted with the parent
            # itself, which encrypts inSensitive, the secret
            session = self._salted_session(parent, SessionKind.HMAC, Crypt.COMMAND)
            private, out_public, *_ = self.esys.create(
                parent,
                sensitive,
                TPM2B_PUBLIC(publicArea=public),
                TPM2B_DATA(),
                TPML_PCR_SELECTION(),
                session,
                ESYS_TR.NONE,
                ESYS_TR.NONE,
            )
        finally:
            if session is not None:
                self._flush(session)
            self._flush(parent)
        return out_public.marshal(), private.marshal()

    def _unseal_signed(self, data: dict[str, Any], policy: SignedPolicy) -> bytes:
        """Unseal a blob sealed to ``policy`` (``data``, parsed): under its PCR branch when
        the PCRs hold the values it was sealed in, else under the signed branch with the
        approval, signed by the pinned release key, of the values they hold now."""
        from tpm2_pytss.constants import ESYS_TR, TPMA_OBJECT
        from tpm2_pytss.TSS2_Exception import TSS2_Exception
        from tpm2_pytss.types import TPM2B_PRIVATE, TPM2B_PUBLIC

        if sorted(int(p) for p in data.get("pcrs", [])) != sorted(set(policy.pcrs)):
            raise TpmPolicyError(
                f"the blob names PCRs {data.get('pcrs')}, this node seals to {list(policy.pcrs)}"
            )
        try:
            branch = bytes.fromhex(str(data.get("pcr_policy")))
            public = TPM2B_PUBLIC.unmarshal(base64.b64decode(data["public"]))[0]
        except Exception as e:  # the unmarshaller raises several kinds
            raise TpmBlobError(f"the blob is malformed ({e})") from None
        area = public.publicArea
        attrs = int(area.objectAttributes)
        if attrs & int(TPMA_OBJECT.USERWITHAUTH):
            raise TpmPolicyError("the sealed object can be used without its policy")
        need = int(TPMA_OBJECT.FIXEDTPM) | int(TPMA_OBJECT.FIXEDPARENT)
        if attrs & need != need:
            raise TpmBlobError("the sealed object was not created inside this TPM")
        if len(branch) != 32 or bytes(area.authPolicy) != policy.sealed_digest(branch):
            raise TpmPolicyError("the sealed object is not sealed to the pinned release key")
        handles: list[Any] = []
        try:
            parent = self._storage_primary()
            handles.append(parent)
            private = TPM2B_PRIVATE.unmarshal(base64.b64decode(data["private"]))[0]
            try:
                obj = self.esys.load(parent, private, public)
            except TSS2_Exception as e:
                raise TpmBlobError(f"sealed object does not belong to this TPM ({e})") from None
            handles.append(obj)

            def unseal(session: Any) -> bytes:
                return bytes(self.esys.unseal(obj, session, ESYS_TR.NONE, ESYS_TR.NONE))

            with self._signed_commands(policy, branch) as (pcrs, then):
                try:
                    return self._under_pcr_policy(
                        pcrs, "sha256", Crypt.RESPONSE, unseal, parent, then
                    )
                except TSS2_Exception as e:
                    if _is_policy_failure(e):
                        raise TpmPolicyError(SIGNED_MISMATCH) from None
                    raise TpmError(f"unseal failed: {_tss_text(e)}") from None
        finally:
            for h in reversed(handles):
                self._flush(h)

    @contextmanager
    def _signed_commands(
        self, policy: SignedPolicy, branch: bytes
    ) -> Iterator[tuple[list[int], Callable[[Any], None]]]:
        """The PCRs of a session under ``policy`` for what was sealed under the PCR branch
        ``branch``, and the commands after its PolicyPCR: PolicyOR alone in the state it
        was sealed in, PolicyAuthorize (with the approval of the state now) and PolicyOR in
        any other."""
        from tpm2_pytss.TSS2_Exception import TSS2_Exception
        from tpm2_pytss.types import TPML_DIGEST

        pcrs = sorted(set(policy.pcrs))
        branches = TPML_DIGEST([branch, policy.digest])
        floor = self._floor_handle()

        def policy_or(session: Any) -> None:
            # TPM_RC_VALUE: the session's digest is neither branch (the PCRs are not in the
            # state the object was sealed in, nor in the one the approval names)
            try:
                self.esys.policy_or(session, branches)
            except TSS2_Exception as e:
                raise TpmPolicyError(f"{SIGNED_MISMATCH} ({_tss_text(e)})") from None

        try:
            if policy.branch(self.read_pcrs(pcrs)) == branch:

                def sealed_state(session: Any) -> None:
                    self._policy_floor(session, floor, policy.epoch)
                    policy_or(session)

                yield pcrs, sealed_state
                return
            approval = self._approval_now(policy.usable(), policy.release_key_pem)
            with self._authorized(approval, policy.release_key_pem) as authorize:

                def signed(session: Any) -> None:
                    self._policy_floor(session, floor, approval.epoch)
                    authorize(session)
                    policy_or(session)

                yield approval.pcrs, signed
        finally:
            self._close(floor)

    def _floor_handle(self) -> Any:
        handle = self._nv_handle(FLOOR_SLOT)
        if handle is None:
            raise TpmPolicyError(
                "the TPM holds no edgepin host floor: it was cleared or replaced, or the node "
                "never defined it"
            )
        return handle

    def _policy_floor(self, session: Any, floor: Any, epoch: int) -> None:
        """PolicyNV: the host floor is not above ``epoch`` (its bit ``epoch`` is clear)."""
        from tpm2_pytss.constants import ESYS_TR, TPM2_EO
        from tpm2_pytss.TSS2_Exception import TSS2_Exception
        from tpm2_pytss.types import TPM2B_OPERAND

        try:
            self.esys.policy_nv(
                floor,
                floor,
                session,
                TPM2B_OPERAND(floor_operand(epoch)),
                TPM2_EO.BITCLEAR,
                0,
                ESYS_TR.PASSWORD,
                ESYS_TR.NONE,
                ESYS_TR.NONE,
            )
        except TSS2_Exception as e:
            if _is_pcr_changed(e):
                raise
            raise TpmPolicyError(
                f"the TPM's {FLOOR_REFUSAL} {epoch}: this host release is revoked ({_tss_text(e)})"
            ) from None

    def _approval_now(self, approvals: Sequence[Approval], release_key_pem: bytes) -> Approval:
        """The approval, signed by the release key, of the PCR values as they are now."""
        now = [a for a in approvals if self.read_pcrs(a.pcrs, a.bank) == dict(a.pcr_values)]
        if not now:
            raise TpmPolicyError(
                "the measured boot state differs from the one it was sealed in, and none "
                f"of the {len(approvals)} signed PCR policies matches it"
            )
        refused: TpmPolicyError | None = None
        for approval in now:
            try:
                verify_approval(approval, release_key_pem)
                return approval
            except TpmPolicyError as e:
                refused = e
        assert refused is not None
        raise refused

    @contextmanager
    def _authorized(
        self, approval: Approval, release_key_pem: bytes
    ) -> Iterator[Callable[[Any], None]]:
        """The policy commands that follow PolicyPCR under a signed policy: the TPM verifies
        the approval's signature with the release key (loaded, public only, for as long as
        this lasts) and its ticket authorizes the approved policy."""
        from tpm2_pytss.constants import ESYS_TR
        from tpm2_pytss.TSS2_Exception import TSS2_Exception
        from tpm2_pytss.types import TPM2B_PUBLIC

        name = release_key_name(release_key_pem)
        key = self.esys.load_external(
            TPM2B_PUBLIC(publicArea=release_key_public(release_key_pem)),
            hierarchy=ESYS_TR.OWNER,
        )
        try:
            try:
                ticket = self.esys.verify_signature(
                    key, approval_hash(approval.policy), _tpm_signature(approval.signature)
                )
            except TSS2_Exception as e:
                raise TpmPolicyError(
                    f"the TPM refused the PCR approval's signature ({_tss_text(e)})"
                ) from None

            def authorize(session: Any) -> None:
                # the TPM answers TPM_RC_VALUE when the session's PolicyPCR, over the PCRs
                # as they are, did not give the approved policy
                try:
                    # keywords: tpm2-pytss 2.3 and 3.0 order these arguments differently
                    self.esys.policy_authorize(
                        session,
                        approved_policy=approval.policy,
                        policy_ref=POLICY_REF,
                        key_sign=name,
                        check_ticket=ticket,
                    )
                except TSS2_Exception as e:
                    raise TpmPolicyError(f"{SIGNED_MISMATCH} ({_tss_text(e)})") from None

            yield authorize
        finally:
            self._flush(key)

    @contextmanager
    def _policy_commands(
        self, policy: Policy, auth_policy: bytes
    ) -> Iterator[tuple[list[int], Callable[[Any], None] | None]]:
        """The PCRs of a session under ``policy`` for an NV index whose authPolicy is
        ``auth_policy``, and what follows its PolicyPCR."""
        if not isinstance(policy, SignedPolicy):
            yield sorted(set(policy)), None
            return
        with self._signed_commands(policy, self._nv_branch(policy, auth_policy)) as plan:
            yield plan

    def _nv_branch(self, policy: SignedPolicy, auth_policy: bytes) -> bytes:
        """The PCR branch an index of authPolicy ``auth_policy`` was defined under: the
        state now, or one the node recorded (``SignedPolicy.branches``)."""
        now = policy.branch(self.read_pcrs(sorted(set(policy.pcrs))))
        for branch in (now, *policy.branches):
            if policy.sealed_digest(branch) == auth_policy:
                return branch
        raise TpmPolicyError(
            "the NV index is not sealed to this node's policy in any state it recorded"
        )

    def define_digest(self, policy: Policy) -> bytes:
        """The authPolicy of what is sealed to ``policy`` now: the PolicyPCR digest of the
        PCRs in their current values, or (a ``SignedPolicy``) the PolicyOR of the running
        release's branch and the signed branch."""
        pcrs = sorted(set(policy.pcrs if isinstance(policy, SignedPolicy) else policy))
        if not pcrs:
            raise TpmError("refusing to seal without a PCR policy (empty PCR selection)")
        values = self.read_pcrs(pcrs)
        if isinstance(policy, SignedPolicy):
            return policy.sealed_digest(policy.branch(values))
        return pcr_policy_digest(values)

    def unseal(
        self, blob: bytes, policy: Policy, kinds: Sequence[BlobKind] = (BlobKind.SEALED,)
    ) -> bytes:
        """Unseal ``blob`` under a PolicyPCR over the selection the node expects (``policy``,
        or a ``SignedPolicy``'s PCRs), or, for a blob sealed to a ``SignedPolicy``, under
        the node's (``_unseal_signed``).

        The blob's own claims decide nothing: its kind must be one of ``kinds`` (only the
        bootstrap credential may be a factory-made duplicate; anyone holding the EK public
        key can make one), its PCR list must be ``pcrs``, and a ``sealed`` object must have
        been created inside this TPM (fixedTPM, fixedParent), need the policy (no
        userWithAuth) and carry exactly the policy of ``pcrs`` in their current values.
        """
        from tpm2_pytss.constants import TPMA_OBJECT
        from tpm2_pytss.TSS2_Exception import TSS2_Exception
        from tpm2_pytss.types import (
            TPM2B_ENCRYPTED_SECRET,
            TPM2B_PRIVATE,
            TPM2B_PUBLIC,
            TPMT_SYM_DEF_OBJECT,
        )

        data = parse_blob(blob)
        if isinstance(policy, SignedPolicy):
            if data.get("policy") == "signed" and data["kind"] == BlobKind.SEALED:
                return self._unseal_signed(data, policy)
            policy = policy.pcrs
        expected = sorted(set(policy))
        if not expected:
            raise TpmPolicyError("refusing to unseal without a PCR policy (empty selection)")
        if data["kind"] not in kinds:
            raise TpmBlobError(f"a blob of kind {data['kind']!r} is not accepted here")
        if data.get("policy", "pcr") != "pcr":
            raise TpmBlobError("the blob is sealed to a signed policy, and this node has none")
        if sorted(int(p) for p in data.get("pcrs", [])) != expected:
            raise TpmPolicyError(
                f"the blob names PCRs {data.get('pcrs')}, this node seals to {expected}"
            )
        pcrs = expected
        bank = str(data.get("bank", "sha256"))
        try:
            public = TPM2B_PUBLIC.unmarshal(base64.b64decode(data["public"]))[0]
        except Exception as e:  # the unmarshaller raises several kinds
            raise TpmBlobError(f"the blob's public area is malformed ({e})") from None
        area = public.publicArea
        attrs = int(area.objectAttributes)
        if attrs & int(TPMA_OBJECT.USERWITHAUTH):
            raise TpmPolicyError("the sealed object can be used without its policy")
        if data["kind"] == BlobKind.SEALED:
            need = int(TPMA_OBJECT.FIXEDTPM) | int(TPMA_OBJECT.FIXEDPARENT)
            if attrs & need != need:
                raise TpmBlobError("the sealed object was not created inside this TPM")
            if bytes(area.authPolicy) != pcr_policy_digest(self.read_pcrs(pcrs, bank), bank):
                raise TpmPolicyError(
                    f"PCR policy over {bank} PCRs {pcrs} does not match: the measured "
                    "boot state differs from the one the object was sealed in"
                )
        handles: list[Any] = []
        try:
            if data["kind"] == BlobKind.SEALED:
                parent = salt_key = self._storage_primary()
                handles.append(parent)
                private = TPM2B_PRIVATE.unmarshal(base64.b64decode(data["private"]))[0]
                try:
                    obj = self.esys.load(parent, private, public)
                except TSS2_Exception as e:
                    raise TpmBlobError(f"sealed object does not belong to this TPM ({e})") from None
            else:
                from tpm2_pytss.constants import TPM2_ALG

                ek = salt_key = self._ek()
                handles.append(ek)
                duplicate = TPM2B_PRIVATE.unmarshal(base64.b64decode(data["duplicate"]))[0]
                seed = TPM2B_ENCRYPTED_SECRET.unmarshal(base64.b64decode(data["seed"]))[0]
                session = self._ek_session()
                try:
                    private = self.esys.import_(
                        ek,
                        b"",
                        public,
                        duplicate,
                        seed,
                        TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
                        session1=session,
                    )
                except TSS2_Exception as e:
                    raise TpmBlobError(
                        f"the wrapped credential was made for another TPM ({e})"
                    ) from None
                finally:
                    self._flush(session)
                session = self._ek_session()
                try:
                    obj = self.esys.load(ek, private, public, session1=session)
                finally:
                    self._flush(session)
            handles.append(obj)
            return self._unseal_loaded(obj, salt_key, pcrs, bank)
        finally:
            for h in reversed(handles):
                self._flush(h)

    # -- NV indices: the anchor and the vault key ----------------------------------
    def _nv_template(self, slot: NvSlot, auth_policy: bytes) -> Any:
        from tpm2_pytss.constants import TPM2_ALG
        from tpm2_pytss.types import TPM2B_NV_PUBLIC, TPMS_NV_PUBLIC

        return TPM2B_NV_PUBLIC(
            nvPublic=TPMS_NV_PUBLIC(
                nvIndex=slot.index,
                nameAlg=TPM2_ALG.SHA256,
                attributes=slot.attributes(),
                authPolicy=auth_policy,
                dataSize=slot.size,
            )
        )

    def _nv_handle(self, slot: NvSlot) -> Any | None:
        from tpm2_pytss.TSS2_Exception import TSS2_Exception

        try:
            return self.esys.tr_from_tpmpublic(slot.index)
        except TSS2_Exception:
            return None  # not defined

    def _close(self, handle: Any) -> None:
        with contextlib.suppress(Exception):
            self.esys.tr_close(handle)

    def _nv_is_ours(self, slot: NvSlot, public: Any, policy: Policy) -> bool:
        from tpm2_pytss.constants import TPMA_NV

        got = public.nvPublic
        want = self._nv_template(slot, bytes(32)).nvPublic
        if not (
            int(got.nameAlg) == int(want.nameAlg)
            and int(got.attributes) & ~int(TPMA_NV.WRITTEN) == int(want.attributes)
            and int(got.dataSize) == slot.size
        ):
            return False
        if isinstance(policy, SignedPolicy):
            try:
                self._nv_branch(policy, bytes(got.authPolicy))
            except TpmPolicyError:
                return False
            return True
        return bytes(got.authPolicy) == self.define_digest(policy)

    def _nv_define(self, slot: NvSlot, policy: Policy) -> None:
        from tpm2_pytss.constants import ESYS_TR

        if not isinstance(policy, SignedPolicy) and not policy:
            raise TpmError(f"refusing to define the {slot.name} without a PCR policy")
        template = self._nv_template(slot, self.define_digest(policy))
        self._nv_remove(slot)
        handle = self.esys.nv_define_space(b"", template, ESYS_TR.OWNER, session1=ESYS_TR.PASSWORD)
        self._close(handle)

    def _nv_remove(self, slot: NvSlot) -> bool:
        from tpm2_pytss.constants import ESYS_TR

        handle = self._nv_handle(slot)
        if handle is None:
            return False
        self.esys.nv_undefine_space(handle, ESYS_TR.OWNER, session1=ESYS_TR.PASSWORD)
        return True

    def _nv_read(self, slot: NvSlot, policy: Policy) -> bytes | None:
        from tpm2_pytss.constants import ESYS_TR, TPMA_NV
        from tpm2_pytss.TSS2_Exception import TSS2_Exception

        handle = self._nv_handle(slot)
        if handle is None:
            return None

        def read(session: Any) -> bytes:
            return bytes(
                self.esys.nv_read(handle, slot.size, 0, handle, session, ESYS_TR.NONE, ESYS_TR.NONE)
            )

        try:
            public, _name = self.esys.nv_read_public(handle)
            if not self._nv_is_ours(slot, public, policy):
                raise TpmPolicyError(
                    f"the TPM's edgepin {slot.name} is not the one this node defined (other "
                    "attributes or policy), or the measured boot state differs"
                )
            if not int(public.nvPublic.attributes) & int(TPMA_NV.WRITTEN):
                return None  # cut short between defining and writing it
            if not slot.policy_read:
                return bytes(
                    self.esys.nv_read(handle, slot.size, 0, handle, session1=ESYS_TR.PASSWORD)
                )
            with self._policy_commands(policy, bytes(public.nvPublic.authPolicy)) as (pcrs, then):
                return self._under_pcr_policy(pcrs, "sha256", Crypt.RESPONSE, read, None, then)
        except TSS2_Exception as e:
            raise _nv_failure(e, slot, "read") from None
        finally:
            self._close(handle)

    def _nv_write(self, slot: NvSlot, policy: Policy, data: bytes) -> None:
        from tpm2_pytss.constants import ESYS_TR
        from tpm2_pytss.TSS2_Exception import TSS2_Exception

        if len(data) != slot.size:
            raise TpmError(f"the {slot.name} holds {slot.size} bytes")
        handle = self._nv_handle(slot)
        if handle is None:
            raise TpmPolicyError(f"the TPM holds no edgepin {slot.name}")

        def write(session: Any) -> None:
            self.esys.nv_write(handle, data, 0, handle, session, ESYS_TR.NONE, ESYS_TR.NONE)

        try:
            public, _name = self.esys.nv_read_public(handle)
            if not self._nv_is_ours(slot, public, policy):
                raise TpmPolicyError(
                    f"the TPM's edgepin {slot.name} is not the one this node defined"
                )
            with self._policy_commands(policy, bytes(public.nvPublic.authPolicy)) as (pcrs, then):
                self._under_pcr_policy(pcrs, "sha256", Crypt.COMMAND, write, None, then)
        except TSS2_Exception as e:
            raise _nv_failure(e, slot, "write") from None
        finally:
            self._close(handle)

    # -- the anchor ---------------------------------------------------------------
    def anchor_read(self, policy: Policy) -> bytes | None:
        """The anchor's bytes; None when it is not defined or was never written. A foreign
        definition (other attributes, policy or size) is a TpmPolicyError."""
        return self._nv_read(ANCHOR, policy)

    def anchor_define(self, policy: Policy) -> None:
        """(Re)define the anchor for ``policy``: these PCRs in their current values, or a
        signed policy (enrollment only: whatever was there before is gone)."""
        self._nv_define(ANCHOR, policy)

    def anchor_write(self, policy: Policy, data: bytes) -> None:
        """Write the anchor under ``policy``; it must exist with edgepin's definition."""
        self._nv_write(ANCHOR, policy, data)

    def anchor_defined(self) -> bool:
        """Whether any NV index is defined at the anchor's handle, edgepin's or not."""
        handle = self._nv_handle(ANCHOR)
        if handle is None:
            return False
        self._close(handle)
        return True

    def anchor_remove(self) -> bool:
        """Undefine the anchor (owner authorization); True when there was one."""
        return self._nv_remove(ANCHOR)

    # -- the vault key ------------------------------------------------------------
    def vault_key_read(self, policy: Policy) -> bytes | None:
        """The state vault's key; None when the TPM holds none (never made, or made and
        not written). Readable only in the measured state; a foreign definition is a
        TpmPolicyError."""
        return self._nv_read(VAULT_KEY, policy)

    def vault_key_create(self, policy: Policy, key: bytes) -> None:
        """Define the vault key's index for ``policy`` (these PCRs in their current values,
        or a signed policy) and write ``key`` into it under that policy (whatever was there
        before is gone)."""
        self._nv_define(VAULT_KEY, policy)
        self._nv_write(VAULT_KEY, policy, key)

    # -- the host floor and the owner hierarchy's secret ---------------------------------
    def floor_read(self) -> int | None:
        """The host floor: the lowest epoch whose policies still pass. None when the TPM
        holds no floor or it was never written; a foreign index at its handle is a
        TpmPolicyError."""
        from tpm2_pytss.constants import ESYS_TR, TPMA_NV
        from tpm2_pytss.TSS2_Exception import TSS2_Exception

        handle = self._nv_handle(FLOOR_SLOT)
        if handle is None:
            return None
        try:
            public, _name = self.esys.nv_read_public(handle)
            written = bool(int(public.nvPublic.attributes) & int(TPMA_NV.WRITTEN))
            if bytes(public.nvPublic.marshal()) != floor_public_bytes(written):
                raise TpmPolicyError(
                    f"the TPM's NV index {FLOOR_NV_INDEX:#x} is not edgepin's host floor"
                )
            if not written:
                return None
            data = self.esys.nv_read(handle, FLOOR_NV_SIZE, 0, handle, session1=ESYS_TR.PASSWORD)
        except TSS2_Exception as e:
            raise _nv_failure(e, FLOOR_SLOT, "read") from None
        finally:
            self._close(handle)
        return floor_of(int.from_bytes(bytes(data), "big"))

    def floor_define(self) -> None:
        """Define the host floor at epoch 0 (written, no bit set) with the owner
        hierarchy's empty authorization: at a node's first boot, before enrollment gives
        the hierarchy its secret. Nothing happens when the TPM holds it already."""
        from tpm2_pytss.constants import ESYS_TR
        from tpm2_pytss.TSS2_Exception import TSS2_Exception
        from tpm2_pytss.types import TPM2B_NV_PUBLIC

        if self.floor_read() is not None:
            return
        try:
            handle = self._nv_handle(FLOOR_SLOT)
            if handle is None:
                size = len(floor_public_bytes(False)).to_bytes(2, "big")
                template = TPM2B_NV_PUBLIC.unmarshal(size + floor_public_bytes(False))[0]
                handle = self.esys.nv_define_space(
                    b"", template, ESYS_TR.OWNER, session1=ESYS_TR.PASSWORD
                )
            try:
                self.esys.nv_set_bits(handle, 0, ESYS_TR.OWNER, session1=ESYS_TR.PASSWORD)
            finally:
                self._close(handle)
        except TSS2_Exception as e:
            raise _nv_failure(e, FLOOR_SLOT, "define") from None

    def floor_raise(self, epoch: int, owner_auth: bytes) -> None:
        """Raise the host floor to ``epoch``: from now on the TPM passes no policy of a
        release below it. The owner hierarchy's secret authorizes it by HMAC: it does not
        cross the bus."""
        from tpm2_pytss.constants import ESYS_TR
        from tpm2_pytss.TSS2_Exception import TSS2_Exception

        bits = floor_bits(epoch)
        handle = self._nv_handle(FLOOR_SLOT)
        if handle is None:
            raise TpmPolicyError("the TPM holds no edgepin host floor")
        salt = session = None
        try:
            self.esys.tr_set_auth(ESYS_TR.OWNER, owner_auth)
            salt = self._storage_primary()
            session = self._salted_session(salt, SessionKind.HMAC, Crypt.NONE)
            self.esys.nv_set_bits(handle, bits, ESYS_TR.OWNER, session1=session)
        except TSS2_Exception as e:
            raise _nv_failure(e, FLOOR_SLOT, "raise") from None
        finally:
            self._flush(session)
            self._flush(salt)
            self._close(handle)
            self.esys.tr_set_auth(ESYS_TR.OWNER, b"")

    def owner_auth_is_set(self) -> bool:
        """Whether the owner hierarchy has an authorization value (TPMA_PERMANENT)."""
        from tpm2_pytss.constants import TPM2_CAP, TPM2_PT, TPMA_PERMANENT

        _more, data = self.esys.get_capability(TPM2_CAP.TPM_PROPERTIES, int(TPM2_PT.PERMANENT), 1)
        for prop in data.data.tpmProperties:
            if int(prop.property) == int(TPM2_PT.PERMANENT):
                return bool(int(prop.value) & int(TPMA_PERMANENT.OWNERAUTHSET))
        raise TpmError("the TPM does not report its permanent attributes")

    def owner_auth_set(self, secret: bytes) -> None:
        """Give the owner hierarchy ``secret`` as its authorization (from the empty one),
        sent encrypted. Without it nobody can undefine or reset the host floor, or make
        the storage primary again: the persistent one must exist first."""
        from tpm2_pytss.constants import ESYS_TR
        from tpm2_pytss.TSS2_Exception import TSS2_Exception

        if len(secret) != OWNER_AUTH_SIZE:
            raise TpmError(f"the owner hierarchy's secret is {OWNER_AUTH_SIZE} bytes")
        if self._persistent_storage() is None:
            raise TpmError("the storage primary is not persistent yet")
        salt = self._storage_primary()
        session = self._salted_session(salt, SessionKind.HMAC, Crypt.COMMAND)
        try:
            self.esys.hierarchy_change_auth(ESYS_TR.OWNER, secret, session1=session)
        except TSS2_Exception as e:
            raise TpmError(f"could not set the owner hierarchy's secret: {_tss_text(e)}") from None
        finally:
            self._flush(session)

    def storage_persist(self) -> None:
        """Keep the storage primary at ``STORAGE_HANDLE`` (owner authorization, still empty):
        the same key as the one made from the owner seed, so earlier blobs still load."""
        from tpm2_pytss.constants import ESYS_TR
        from tpm2_pytss.TSS2_Exception import TSS2_Exception

        if self._persistent_storage() is not None:
            return
        handle = self._storage_primary()
        try:
            kept = self.esys.evict_control(
                ESYS_TR.OWNER, handle, STORAGE_HANDLE, session1=ESYS_TR.PASSWORD
            )
            self._close(kept)
        except TSS2_Exception as e:
            raise TpmError(f"could not keep the storage primary: {_tss_text(e)}") from None
        finally:
            self._flush(handle)


def _nv_failure(e: Exception, slot: NvSlot, doing: str) -> TpmError:
    if _is_policy_failure(e):
        return TpmPolicyError(
            f"the TPM refused to {doing} the {slot.name}: the measured boot state differs"
        )
    return TpmError(f"could not {doing} the {slot.name}: {_tss_text(e)}")


def _tss_text(e: Exception) -> str:
    """A TSS error in a message; a PCR_CHANGED that is left after every attempt says so."""
    if _is_pcr_changed(e):
        return f"{e} (PCRs were extended during each of {PCR_CHANGED_ATTEMPTS} sessions in a row)"
    return str(e)


def _is_pcr_changed(e: Exception) -> bool:
    """TPM_RC_PCR_CHANGED: a PCR was extended between PolicyPCR and the command that
    used the session. A format-0 code (no handle, parameter or session number in it); the
    layer byte above it names the part of the stack that passed the TPM's answer on."""
    from tpm2_pytss.constants import TPM2_RC

    rc = getattr(e, "rc", None)
    return rc is not None and int(rc) & 0xFFFF == int(TPM2_RC.PCR_CHANGED)


def _is_policy_failure(e: Exception) -> bool:
    from tpm2_pytss.constants import TPM2_RC

    rc = getattr(e, "rc", None)
    if rc is None or _is_pcr_changed(e):
        return False
    base = int(rc) & 0xFFF if int(rc) & 0x80 else int(rc) & 0xFF
    codes = {int(TPM2_RC.POLICY_FAIL) & 0xFF, int(TPM2_RC.VALUE) & 0xFF}
    return base in codes or "policy" in str(e).lower()
