"""Image signatures in Glance's ``img_signature*`` convention, checked the way cursive does.

The signature covers the image bytes exactly as stored in Glance: a digest with
``img_signature_hash_method`` over the whole stream, signed with RSA-PSS (MGF1, maximum
salt length) or ECDSA. Signing and verifying are incremental so that one pass over the
data does the hash, the signature and the write.

The verifier hashes with hashlib, which releases the GIL on large buffers (cryptography's
``hashes.Hash`` holds it), so that a download can hash beside its socket reads. A caller that
already computes the digest with the signature's hash method (fetch's sha512 when the method
is SHA-512) passes it to ``verify(digest=...)`` instead of feeding the bytes a second time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from provisioner.errors import VerificationError

HASH_METHODS: dict[str, type[hashes.HashAlgorithm]] = {
    "SHA-224": hashes.SHA224,
    "SHA-256": hashes.SHA256,
    "SHA-384": hashes.SHA384,
    "SHA-512": hashes.SHA512,
}
ECC_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "ECC_SECP384R1": ec.SECP384R1,
    "ECC_SECP521R1": ec.SECP521R1,
}
KEY_TYPES = ("RSA-PSS", *ECC_CURVES)


def _hash(method: str) -> hashes.HashAlgorithm:
    try:
        return HASH_METHODS[method]()
    except KeyError:
        raise VerificationError(
            f"unknown img_signature_hash_method {method!r}",
            hint=f"supported: {', '.join(HASH_METHODS)}",
        ) from None


def _check_key_type(key_type: str) -> None:
    if key_type not in KEY_TYPES:
        raise VerificationError(
            f"unknown img_signature_key_type {key_type!r}",
            hint=f"supported: {', '.join(KEY_TYPES)}",
        )


def _pss(algorithm: hashes.HashAlgorithm) -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(algorithm), salt_length=padding.PSS.MAX_LENGTH)


def key_type_for(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "RSA-PSS"
    for name, curve in ECC_CURVES.items():
        if isinstance(key.curve, curve):
            return name
    raise VerificationError(f"unsupported signing curve {key.curve.name}")


class StreamSigner:
    """Feed the uploaded bytes with update(); signature() gives the base64 img_signature."""

    def __init__(self, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, hash_method: str):
        self.key = key
        self.hash_method = hash_method
        self.key_type = key_type_for(key)
        self._algorithm = _hash(hash_method)
        self._hasher = hashes.Hash(self._algorithm)

    def update(self, chunk: bytes) -> None:
        self._hasher.update(chunk)

    def signature(self) -> str:
        digest = self._hasher.finalize()
        prehashed = utils.Prehashed(self._algorithm)
        if isinstance(self.key, rsa.RSAPrivateKey):
            sig = self.key.sign(digest, _pss(self._algorithm), prehashed)
        else:
            sig = self.key.sign(digest, ec.ECDSA(prehashed))
        return base64.b64encode(sig).decode()


class StreamVerifier:
    """Verify an img_signature over a stream against one trusted certificate."""

    def __init__(
        self, certificate: x509.Certificate, signature_b64: str, hash_method: str, key_type: str
    ) -> None:
        _check_key_type(key_type)
        self._algorithm = _hash(hash_method)
        # hashlib's name for the method ("sha512"): a caller that hashes the stream with the
        # same algorithm passes its digest to verify() and skips update()
        self.hash_name = self._algorithm.name
        self._hasher = hashlib.new(self.hash_name)
        self._fed = False
        self.key_type = key_type
        try:
            self._signature = base64.b64decode(signature_b64, validate=True)
        except (binascii.Error, ValueError):
            raise VerificationError("img_signature is not valid base64") from None
        public_key = certificate.public_key()
        if key_type == "RSA-PSS" and not isinstance(public_key, rsa.RSAPublicKey):
            raise VerificationError("img_signature_key_type RSA-PSS but the certificate is not RSA")
        if key_type in ECC_CURVES and not (
            isinstance(public_key, ec.EllipticCurvePublicKey)
            and isinstance(public_key.curve, ECC_CURVES[key_type])
        ):
            raise VerificationError(
                f"img_signature_key_type {key_type} does not match the certificate's key"
            )
        self._public_key = public_key

    def update(self, chunk: bytes) -> None:
        self._fed = True
        self._hasher.update(chunk)

    def verify(self, digest: bytes | None = None) -> None:
        """Check the signature over the bytes fed with update(), or over ``digest``.

        ``digest`` is the caller's own digest of the whole image with the signature's hash
        method (``hash_name``); it is refused when bytes were also fed, or when its length
        is not the method's, since either means the caller mixed up its hashes.
        """
        if digest is None:
            digest = self._hasher.digest()
        elif self._fed:
            raise VerificationError("image signature: both a digest and streamed bytes given")
        elif len(digest) != self._algorithm.digest_size:
            raise VerificationError(
                f"image signature: a {len(digest)}-byte digest is not {self.hash_name}"
            )
        prehashed = utils.Prehashed(self._algorithm)
        try:
            if isinstance(self._public_key, rsa.RSAPublicKey):
                self._public_key.verify(self._signature, digest, _pss(self._algorithm), prehashed)
            elif isinstance(self._public_key, ec.EllipticCurvePublicKey):
                self._public_key.verify(self._signature, digest, ec.ECDSA(prehashed))
            else:  # pragma: no cover - rejected in __init__
                raise VerificationError("unsupported public key")
        except InvalidSignature:
            raise VerificationError("image signature does not verify") from None


def fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 fingerprint of the DER certificate, lowercase hex."""
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def load_certificate(data: bytes) -> x509.Certificate:
    """A certificate from PEM or DER bytes."""
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as e:
        raise VerificationError(f"not an X.509 certificate: {e}") from None
