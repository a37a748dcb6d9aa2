"""``edgepin release``: the release key, and its approvals of a boot chain's PCR values.

The release key is an ECDSA P-256 key the factory holds. Its public half is pinned in the
host image (``./build.sh image --release-key PUB``); what a node seals is then also opened
in any measured state the key approved (``provisioner.node.policy``). An approval is the
key's signature over the TPM2 PolicyPCR digest of one set of PCR values: the values a
reference machine of a model prints when it boots a host release (``factory: pcrs`` on its
console, or the hint of a node that refused to open its secrets in that state).

Anyone who holds the private key can approve any boot chain on every node that pins it:
keep it offline, like a code-signing key. The private key is written with mode 0600,
encrypted under ``EDGEPIN_RELEASE_KEY_PASSPHRASE`` when that is set (never an option: a
command line is visible to every process).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from provisioner import tpm
from provisioner.errors import UsageError
from provisioner.node import state
from provisioner.operator.enroll import expected_pcr_values

PASSPHRASE_ENV = "EDGEPIN_RELEASE_KEY_PASSPHRASE"  # noqa: S105 (a variable name)


@dataclass(frozen=True)
class Approved:
    path: Path
    pcrs: tuple[int, ...]
    policy: str  # the approved policy's digest (PolicyPCR, then PolicyNV), hex
    key_sha256: str  # of the release key's public half (DER)
    epoch: int = 0


def public_sha256(key: ec.EllipticCurvePublicKey) -> str:
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    return digest.finalize().hex()


def _passphrase() -> bytes | None:
    value = os.environ.get(PASSPHRASE_ENV)
    return value.encode() if value else None


def create_key(key_out: Path, public_out: Path) -> str:
    """A new release key: the private key (0600) and its public half (the PEM the host
    image pins). Refuses to overwrite either. The public key's sha256."""
    for path in (key_out, public_out):
        if path.exists():
            raise UsageError(f"{path} exists: a release key is never overwritten")
    key = ec.generate_private_key(ec.SECP256R1())
    passphrase = _passphrase()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    state.atomic_write(key_out, private, 0o600)
    state.atomic_write(public_out, public, 0o644)
    return public_sha256(key.public_key())


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"--key {path}: {e.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=_passphrase())
    except TypeError:
        raise UsageError(
            f"--key {path} is encrypted: set {PASSPHRASE_ENV}",
        ) from None
    except ValueError:
        raise UsageError(
            f"--key {path} is not a PEM private key, or {PASSPHRASE_ENV} does not open it"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise UsageError(f"--key {path}: a release key is an ECDSA P-256 key")
    return key


def approve(
    key_path: Path,
    pcrs: tuple[int, ...],
    pcr_values: Path | None,
    zero: bool,
    out: Path,
    epoch: int = 0,
) -> Approved:
    """Sign the approval of ``pcrs`` in the values of ``pcr_values`` at host epoch
    ``epoch`` into ``out``."""
    if not 0 <= epoch <= tpm.MAX_EPOCH:
        raise UsageError(f"--epoch must be a whole number from 0 to {tpm.MAX_EPOCH}")
    key = load_key(key_path)
    values = expected_pcr_values(pcrs, pcr_values, zero)
    raw = tpm.sign_approval(key, values, epoch)
    approval = tpm.parse_approval(raw)  # what a node reads back
    tpm.verify_approval(
        approval,
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )
    state.atomic_write(out, raw + b"\n", 0o644)
    return Approved(
        out, pcrs, approval.policy.hex(), public_sha256(key.public_key()), approval.epoch
    )
