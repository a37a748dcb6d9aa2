"""Which Barbican secrets belong to an image: what ``publish`` records, what ``assign`` checks.

An image names its passphrase (``os_encrypt_key_id``) and its signing certificate
(``img_signature_certificate_uuid``) in Glance properties, which anyone who can edit the
image can change. ``assign`` gives a node read access to what they name, so it must not
believe them: pointed at the operator's private signing key, they would hand it out.

So publish records the binding where image properties cannot reach it, in Barbican
itself, and in fields Barbican never lets anyone change after creation:

- the passphrase secret has type ``passphrase`` and the name
  ``edgepin-image:<image id>:cert:<certificate secret id>`` (publish chooses the image id
  before it stores the passphrase and creates the Glance image with that id);
- the certificate secret has type ``certificate``, holds an X.509 certificate (not a key),
  and its sha256 fingerprint is the image's ``edgepin_signing_cert_sha256``.

A secret's name, type and payload are immutable in Barbican (only its ACL, metadata and
consumers change), so an edited property can only point at a secret that already says
"I am the passphrase of this image, signed with that certificate". A private key, another
image's passphrase or any other secret is refused, by name.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from provisioner import barbican
from provisioner.errors import ImageError, NotFoundError, VerificationError
from provisioner.signing import fingerprint, load_certificate

NAME_PREFIX = "edgepin-image:"
LEGACY_PREFIX = "edgepin:"  # what publish named passphrases before it bound them to images
REPUBLISH = (
    "publish the guest again with `edgepin publish` (it binds the new passphrase to the "
    "new image) and assign the new image"
)


class SecretBindingError(ImageError):
    """An image names a secret that publish did not record for it: assign refuses it."""

    def __init__(self, image_id: str, secret_id: str, why: str, *, hint: str | None = None):
        super().__init__(
            f"image {image_id}: secret {secret_id} {why}; assign grants nodes only the "
            "passphrase and certificate that edgepin publish recorded for the image",
            hint=hint,
            image_id=image_id,
            secret_id=secret_id,
        )


@dataclass(frozen=True)
class ImageSecrets:
    """The two secrets a node assigned to an image may read."""

    key_id: str
    cert_id: str

    @property
    def ids(self) -> list[str]:
        return [self.key_id, self.cert_id]


def passphrase_name(image_id: str, cert_id: str) -> str:
    return f"{NAME_PREFIX}{image_id}:cert:{cert_id}"


def is_uuid(text: object) -> bool:
    if not isinstance(text, str):
        return False
    try:
        return str(uuid.UUID(text)) == text.lower()
    except ValueError:
        return False


def check_passphrase_meta(image_id: str, cert_id: str, key_id: str, meta: dict[str, Any]) -> None:
    """The passphrase secret's metadata against the binding publish writes (pure)."""
    name = str(meta.get("name") or "")
    if meta.get("secret_type") != "passphrase":
        raise SecretBindingError(
            image_id, key_id, f"is a {meta.get('secret_type')!r} secret, not a passphrase"
        )
    if name == passphrase_name(image_id, cert_id):
        return
    if name.startswith(LEGACY_PREFIX):
        raise SecretBindingError(
            image_id,
            key_id,
            f"(named {name!r}) was stored by an edgepin publish that did not bind "
            "passphrases to images",
            hint=REPUBLISH,
        )
    if name.startswith(f"{NAME_PREFIX}{image_id}:"):
        raise SecretBindingError(
            image_id,
            key_id,
            f"was published with another signing certificate than {cert_id} (named {name!r})",
        )
    raise SecretBindingError(image_id, key_id, f"is not this image's passphrase (named {name!r})")


def check_certificate_meta(image_id: str, cert_id: str, meta: dict[str, Any]) -> None:
    if meta.get("secret_type") != "certificate":
        raise SecretBindingError(
            image_id, cert_id, f"is a {meta.get('secret_type')!r} secret, not a certificate"
        )


def signing_certificate(conn: Any, cert_id: str) -> Any:
    """The certificate secret, checked to be one (publish refuses anything else)."""
    meta = barbican.secret_meta(conn, cert_id)
    if meta.get("secret_type") != "certificate":
        raise VerificationError(
            f"secret {cert_id} is a {meta.get('secret_type')!r} secret, not a certificate",
            hint="give --signing-cert-id the certificate of `edgepin signing-cert create`",
            secret_id=cert_id,
        )
    return load_certificate(barbican.payload(conn, cert_id))


def image_secrets(conn: Any, image: dict[str, Any]) -> ImageSecrets:
    """The image's passphrase and certificate, if and only if publish recorded them for it."""
    image_id = str(image["id"])
    key_id = image.get("os_encrypt_key_id")
    cert_id = image.get("img_signature_certificate_uuid")
    for prop, value in (
        ("os_encrypt_key_id", key_id),
        ("img_signature_certificate_uuid", cert_id),
    ):
        if not is_uuid(value):
            raise ImageError(
                f"image {image_id}: {prop} {value!r} is not a Barbican secret id",
                image_id=image_id,
            )
    assert isinstance(key_id, str) and isinstance(cert_id, str)
    try:
        check_passphrase_meta(image_id, cert_id, key_id, barbican.secret_meta(conn, key_id))
        check_certificate_meta(image_id, cert_id, barbican.secret_meta(conn, cert_id))
    except NotFoundError as e:
        raise SecretBindingError(
            image_id, str(e.fields.get("secret_id", "?")), "does not exist"
        ) from None
    pinned = image.get("edgepin_signing_cert_sha256")
    try:
        cert = load_certificate(barbican.payload(conn, cert_id))
    except VerificationError:
        raise SecretBindingError(image_id, cert_id, "does not hold a certificate") from None
    got = fingerprint(cert)
    if got != pinned:
        raise SecretBindingError(
            image_id,
            cert_id,
            f"holds a certificate whose sha256 {got} is not the image's "
            f"edgepin_signing_cert_sha256 {pinned}",
        )
    return ImageSecrets(key_id, cert_id)
