"""What the operator keeps of a node's TPM: its endorsement key and the PCR policy the node
was enrolled under, so that a key can be wrapped for that TPM later (air-gapped bundles).

``edgepin enroll`` records them as the node project's attribute ``edgepin_tpm``: the EK's
public key (PEM) and the PCR selection with its expected sha256 values. None of it is
secret (a public key, measurements). They are the values the bootstrap credential was
wrapped with, so a node that has enrolled has shown that its TPM unseals under them.

Who can write the node's project can change the record, and a bundle made from a changed
record wraps the image's passphrase for another key: that someone is an administrator of
Keystone, who can read the passphrase in Barbican anyway (docs/trust-and-threats.md). The
factory that keeps the EK certificates can give them to ``edgepin bundle`` instead
(``--ek-cert`` with ``--ek-ca``), and the record is then only compared.

:func:`parse` reads the record (Keystone's answer, untrusted) into a :class:`TpmTarget` or
raises :class:`~provisioner.errors.UsageError` (with the options that replace it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from provisioner.errors import UsageError

TPM_ATTR = "edgepin_tpm"
MAX_RECORD = 8192
REPLACE = "give the node's EK (--ek-cert or --ek-pub) and PCR policy (--pcrs, --pcr-values)"


@dataclass(frozen=True)
class TpmTarget:
    """A TPM to wrap a secret for: its RSA EK (canonical PEM) and a PCR policy."""

    ek_public_pem: bytes
    pcr_values: dict[int, bytes]

    @property
    def pcrs(self) -> tuple[int, ...]:
        return tuple(sorted(self.pcr_values))

    @property
    def ek_sha256(self) -> str:
        return spki_sha256(self.ek_public_pem)

    def as_record(self) -> dict[str, Any]:
        return {
            "ek_public_pem": self.ek_public_pem.decode(),
            "pcr_bank": "sha256",
            "pcr_values": {str(p): v.hex() for p, v in sorted(self.pcr_values.items())},
        }


def canonical_ek(pem: bytes, what: str = "the EK public key") -> bytes:
    """An RSA public key as PEM SubjectPublicKeyInfo, whatever its PEM text looked like."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError):
        raise UsageError(f"{what} is not a PEM public key") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise UsageError(f"{what} is not an RSA key (only RSA endorsement keys are supported)")
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def spki_sha256(pem: bytes) -> str:
    key = serialization.load_pem_public_key(pem)
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def _fail(what: str) -> UsageError:
    return UsageError(
        f"the node's {TPM_ATTR} record in Keystone is malformed: {what}", hint=REPLACE
    )


def parse(raw: Any) -> TpmTarget | None:
    """The record (JSON text or an object, as Keystone gives it back); None when absent."""
    if raw is None or raw == "":
        return None
    if isinstance(raw, str):
        if len(raw) > MAX_RECORD:
            raise _fail("too long")
        try:
            raw = json.loads(raw)
        except (ValueError, RecursionError):
            raise _fail("not JSON") from None
    if not isinstance(raw, dict):
        raise _fail("not an object")
    if raw.get("pcr_bank", "sha256") != "sha256":
        raise _fail("the PCR bank is not sha256")
    pem = raw.get("ek_public_pem")
    if not isinstance(pem, str) or len(pem) > MAX_RECORD:
        raise _fail("no EK public key")
    try:
        ek = canonical_ek(pem.encode(), "its EK public key")
    except UsageError as e:
        raise _fail(e.message) from None
    values = raw.get("pcr_values")
    if not isinstance(values, dict) or not values or len(values) > 24:
        raise _fail("no PCR values")
    parsed: dict[int, bytes] = {}
    for key, value in values.items():
        if not (
            isinstance(key, str)
            and key.isascii()
            and key.isdigit()
            and len(key) <= 2
            and int(key) <= 23
        ):
            raise _fail("a PCR number is not 0..23")
        if not isinstance(value, str) or len(value) != 64:
            raise _fail(f"PCR {key}'s value is not a sha256 in hex")
        try:
            digest = bytes.fromhex(value)
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise _fail(f"PCR {key}'s value is not a sha256 in hex")
        parsed[int(key)] = digest
    return TpmTarget(ek, parsed)
