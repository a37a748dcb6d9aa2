"""Signed assignments: which image a node runs, signed by the operator, checked by the node.

The assignment record lives in the node's Keystone project (``edgepin_assignment``), where
anyone who can write project attributes (a Keystone admin, a compromised Keystone) could
change it. So the operator signs what the node needs to know, and the node acts only on
that: this node (its project id), the image id, the image's sha512 (Glance's
``os_hash_value``, which the fetched bytes are checked against), the generation and when it
was made, the guest network and the USB devices the image declares
(:class:`~provisioner.node.model.GuestNetwork`, vendor:product ids), the vCPUs, memory and
health marker it asks for (:class:`~provisioner.node.model.GuestResources`),
and the node's name (its id in edgepin, which the node keeps from its enrollment):
a project renamed to another node's name in Keystone does not make an assignment for one
node valid for the other. The signature is RSA-PSS or ECDSA over SHA-512 of a canonical
JSON payload, with a key whose certificate is pinned on the node:
``/etc/edgepin/assignment-certs`` when that folder holds one, otherwise the image-signing
certificates (``/etc/edgepin/signing-certs``), so that the two roles can be held apart or
by one key.

The record keeps readable copies of the payload's fields for operators; the node reads only
the signed payload. :func:`verify` is total: any input gives an :class:`Assignment`, None
(no assignment) or an :class:`~provisioner.errors.ImageError` /
:class:`~provisioner.errors.VerificationError` that says why it is refused.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from provisioner.errors import ImageError, VerificationError
from provisioner.node.model import (
    IMAGE_ID,
    MAX_GENERATION,
    Assignment,
    GuestNetwork,
    GuestResources,
    guest_network,
    guest_resources,
    pci_selectors,
    usb_ids,
)
from provisioner.signing import StreamSigner, StreamVerifier, fingerprint, key_type_for

KIND = "edgepin-assignment/1"
HASH_METHOD = "SHA-512"
SHA512 = re.compile(r"[0-9a-f]{128}")
FINGERPRINT = re.compile(r"[0-9a-f]{64}")
MAX_RECORD = 16384  # characters of a record: a signed one is under 2 KiB
SIGNED_FIELDS = ("payload", "signature", "certificate_sha256", "key_type")


def payload(
    node: str,
    node_name: str,
    image_id: str,
    image_sha512: str,
    generation: int,
    assigned_at: str,
    extra: dict[str, Any] | None = None,
    network: GuestNetwork | None = None,
    usb: tuple[str, ...] = (),
    resources: GuestResources | None = None,
    pci: tuple[str, ...] = (),
) -> bytes:
    """The signed bytes: canonical JSON (sorted keys, no spaces, ASCII). ``network`` is the
    guest network the image declares (absent when it declares none), ``usb`` the USB devices
    it asks for (absent when none), ``pci`` its PCI devices (addresses or classes; absent
    when none), ``resources`` its vCPUs, memory and health marker.
    ``extra`` adds
    fields the node does not read (a rollout's name and wave, the previous image), signed
    with the rest so that the operator's tools can trust them; it cannot replace a field."""
    doc = {
        **{
            k: v
            for k, v in (extra or {}).items()
            if k not in ("network", "usb", "pci", "resources")
        },
        **({"network": str(network)} if network is not None else {}),
        **({"usb": list(usb)} if usb else {}),
        **({"pci": list(pci)} if pci else {}),
        **({"resources": resources.as_dict()} if resources is not None else {}),
        "kind": KIND,
        "node": node,
        "node_name": node_name,
        "image_id": image_id,
        "image_sha512": image_sha512,
        "generation": generation,
        "assigned_at": assigned_at,
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def sign(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    certificate: x509.Certificate,
    node: str,
    node_name: str,
    image_id: str,
    image_sha512: str,
    generation: int,
    assigned_at: str,
    extra: dict[str, Any] | None = None,
    network: GuestNetwork | None = None,
    usb: tuple[str, ...] = (),
    resources: GuestResources | None = None,
    pci: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The record ``edgepin assign`` writes: readable fields, and the signed payload."""
    data = payload(
        node,
        node_name,
        image_id,
        image_sha512,
        generation,
        assigned_at,
        extra,
        network,
        usb,
        resources,
        pci,
    )
    return {
        "image_id": image_id,
        "generation": generation,
        "image_sha512": image_sha512,
        "assigned_at": assigned_at,
        "signed": envelope(key, certificate, data),
    }


def envelope(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, certificate: x509.Certificate, data: bytes
) -> dict[str, str]:
    """``data`` signed (SHA-512) for a record's ``signed`` field: what :func:`open_envelope`
    checks."""
    signer = StreamSigner(key, HASH_METHOD)
    signer.update(data)
    return {
        "payload": base64.b64encode(data).decode(),
        "signature": signer.signature(),
        "certificate_sha256": fingerprint(certificate),
        "key_type": key_type_for(key),
    }


def _decode(raw: Any, what: str = "assignment") -> Any:
    """The record as JSON decodes it (an object given as such is taken as is)."""
    if isinstance(raw, str | bytes) and len(raw) > MAX_RECORD:
        raise ImageError(f"the {what} record is too long")
    try:
        return json.loads(raw) if isinstance(raw, str | bytes) else raw
    except (ValueError, RecursionError):
        raise ImageError(f"the {what} record is not JSON") from None


def open_envelope(
    raw: Any,
    pinned: dict[str, x509.Certificate],
    what: str = "assignment",
    hint: str = "assign images with `edgepin assign`, which signs the assignment",
) -> bytes | None:
    """The signed payload of the record in ``raw`` (a project attribute: JSON text or an
    object) once its signature verifies against a pinned certificate; None when there is
    no record. ``what`` names the record in the errors."""
    if raw is None or raw == "":
        return None
    data = _decode(raw, what)
    if not isinstance(data, dict):
        raise ImageError(f"the {what} record is not an object")
    signed = data.get("signed")
    if not isinstance(signed, dict) or not all(
        isinstance(signed.get(k), str) for k in SIGNED_FIELDS
    ):
        raise ImageError(f"the {what} is not signed: refused", hint=hint)
    fp = signed["certificate_sha256"]
    if not FINGERPRINT.fullmatch(fp):
        raise VerificationError(f"the {what} names no certificate fingerprint: refused")
    if not pinned:
        raise VerificationError("no assignment-signing certificate is pinned on this node")
    cert = pinned.get(fp)
    if cert is None:
        raise VerificationError(
            f"the {what} is signed by a certificate that is not pinned (sha256 {fp[:16]}…): refused"
        )
    try:
        body = base64.b64decode(signed["payload"], validate=True)
    except (binascii.Error, ValueError):
        raise VerificationError(f"the {what}'s payload is not base64: refused") from None
    try:
        verifier = StreamVerifier(cert, signed["signature"], HASH_METHOD, signed["key_type"])
        verifier.update(body)
        verifier.verify()
    except VerificationError as e:
        raise VerificationError(f"the {what}'s signature: {e.message}: refused") from None
    return body


def verify(
    raw: Any, pinned: dict[str, x509.Certificate], node: str, node_name: str
) -> Assignment | None:
    """The assignment in ``raw`` (the project attribute: JSON text or an object), if it is
    signed for ``node`` (project id) named ``node_name`` by a pinned certificate; None when
    there is none."""
    body = open_envelope(raw, pinned)
    return None if body is None else _payload(body, node, node_name)


def read_signed(raw: Any, node: str, node_name: str) -> tuple[Assignment, str]:
    """The operator's reading of a record (``edgepin bundle``): the signed payload for
    ``node`` and the fingerprint of the certificate it claims, without checking the
    signature, which is the node's to check against the certificates it pins. Refuses
    what the node would refuse before that: no record, no signature, another node."""
    if raw is None or raw == "":
        raise ImageError("there is no assignment record")
    data = _decode(raw)
    signed = data.get("signed") if isinstance(data, dict) else None
    if not isinstance(signed, dict) or not all(
        isinstance(signed.get(k), str) for k in SIGNED_FIELDS
    ):
        raise ImageError(
            "the assignment is not signed",
            hint="assign the image with `edgepin assign`, which signs the assignment",
        )
    try:
        body = base64.b64decode(signed["payload"], validate=True)
    except (binascii.Error, ValueError):
        raise VerificationError("the assignment's payload is not base64") from None
    return _payload(body, node, node_name), signed["certificate_sha256"]


def _payload(body: bytes, node: str, node_name: str) -> Assignment:
    # signed by a pinned key, so written by the operator's tool; still checked field by field
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise VerificationError("the signed assignment is not JSON") from None
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise VerificationError("the signed payload is not an edgepin assignment")
    if doc.get("node") != node or doc.get("node_name") != node_name:
        raise VerificationError(
            "the assignment is signed for another node: refused",
            signed_for=str(doc.get("node_name"))[:64],
        )
    image_id, sha, gen, at = (
        doc.get("image_id"),
        doc.get("image_sha512"),
        doc.get("generation"),
        doc.get("assigned_at"),
    )
    if not isinstance(image_id, str) or not IMAGE_ID.fullmatch(image_id):
        raise ImageError("the assignment names no valid image id")
    if not isinstance(sha, str) or not SHA512.fullmatch(sha):
        raise ImageError("the assignment names no valid image sha512")
    if type(gen) is not int or not 0 <= gen <= MAX_GENERATION:
        raise ImageError("the assignment's generation is not a whole number in range")
    if not isinstance(at, str) or len(at) > 64 or not at.isprintable():
        raise ImageError("the assignment's time is not valid")
    usb = doc.get("usb")
    if usb is not None and not isinstance(usb, list):
        raise ImageError("the assignment's USB devices are not a list")
    pci = doc.get("pci")
    if pci is not None and not isinstance(pci, list):
        raise ImageError("the assignment's PCI devices are not a list")
    resources = doc.get("resources")
    return Assignment(
        image_id,
        gen,
        sha,
        at,
        guest_network(doc.get("network")),
        usb_ids(usb),
        pci=pci_selectors(pci),
        resources=None if resources is None else guest_resources(resources),
    )
