"""``edgepin signing-cert create``: an image-signing key and certificate, kept in Barbican.

The private key is generated in memory and stored only in Barbican (secret type
``private``); the certificate goes to Barbican as well (type ``certificate``) and to a PEM
file that the factory pins in the host image. Both are stored as PEM, the form castellan
(and so Glance's own signature check) reads.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from provisioner import barbican
from provisioner.errors import UsageError, VerificationError
from provisioner.signing import ECC_CURVES, fingerprint


@dataclass
class SigningCert:
    cert_id: str
    key_id: str
    fingerprint: str
    cert_pem: bytes


def generate(
    name: str, key_type: str, days: int
) -> tuple[rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, x509.Certificate]:
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if key_type == "RSA-PSS":
        key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    elif key_type in ECC_CURVES:
        key = ec.generate_private_key(ECC_CURVES[key_type]())
    else:
        raise UsageError(f"unknown key type {key_type!r}")
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def create(conn: Any, name: str, key_type: str, days: int, cert_out: Path) -> SigningCert:
    if cert_out.exists():
        raise UsageError(f"{cert_out} exists; choose another --cert-out")
    key, cert = generate(name, key_type, days)
    pem_key = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_id = barbican.store(
        conn,
        f"edgepin-signing-cert:{name}",
        "certificate",
        cert.public_bytes(serialization.Encoding.PEM),
    )
    try:
        key_id = barbican.store(conn, f"edgepin-signing-key:{name}", "private", pem_key)
    except Exception:
        barbican.delete(conn, cert_id)
        raise
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_out.write_bytes(pem)
    return SigningCert(cert_id, key_id, fingerprint(cert), pem)


def load_key(conn: Any, key_id: str) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    """The signing key from Barbican, in memory only."""
    pem = barbican.payload(conn, key_id)
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except ValueError:
        raise VerificationError(f"secret {key_id} is not a private key") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise VerificationError(f"secret {key_id}: unsupported key type")
    return key


def load_cert(conn: Any, cert_id: str) -> x509.Certificate:
    from provisioner.signing import load_certificate

    return load_certificate(barbican.payload(conn, cert_id))
