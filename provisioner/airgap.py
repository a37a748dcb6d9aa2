"""Air-gapped bundles: what one node needs to run its guest with no network.

``edgepin bundle NODE --out DIR`` writes one folder, ``DIR/edgepin-<node>/``, that holds
two files with fixed names (no name in the manifest is ever used as a path):

- ``manifest.json``: the format's ``kind`` and ``version``, the node it was made for, the
  node's **signed assignment record** exactly as ``edgepin assign`` wrote it in Keystone,
  the image's id, size and the Glance properties a node reads online (hash, signature,
  encryption, vCPUs, memory, health marker), and the image's **passphrase wrapped for the
  node's TPM**: a TPM2 duplication blob for the node's endorsement key (EK), under a
  PolicyPCR over the node's PCR selection and values (:func:`provisioner.tpm.wrap_for_ek`,
  as the bootstrap credential at enrollment);
- ``image.qcow2``: the encrypted image, byte for byte Glance's (qcow2 with LUKS inside).

Nothing in it is secret in the clear. The node believes none of it for itself: it verifies
the assignment with its pinned certificates, the image's bytes against the signed sha512
and the image signature, and only its own TPM, in its measured state, can unwrap the key
(``provisioner/node/media.py``).

:func:`parse` reads a manifest from untrusted bytes (a stick anyone can write) into a
:class:`Manifest`, or raises :class:`~provisioner.errors.BundleError`; nothing else.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import re
from dataclasses import dataclass, field
from typing import Any

from provisioner.errors import BundleError
from provisioner.tpm import BlobKind, TpmBlobError, parse_blob

KIND = "edgepin-bundle"
VERSION = 1
MANIFEST = "manifest.json"
IMAGE_FILE = "image.qcow2"
DIR_PREFIX = "edgepin-"
LABEL = "EDGEPIN"  # the filesystem label the node's units mount read-only
MAX_MANIFEST = 256 * 1024  # bytes; a manifest is under 8 KiB
MAX_ASSIGNMENT = 16384  # characters of the signed record, as provisioner.assignment reads it
MAX_IMAGE_SIZE = 2**50
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
SHA512 = re.compile(r"[0-9a-f]{128}")
SHA256 = re.compile(r"[0-9a-f]{64}")
DIGITS = re.compile(r"[0-9]{1,12}")
NODE_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
WORD = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


class Form(enum.Enum):
    """What an image property's value must look like (its worth is the node's checks' to
    judge, as online: provisioner.node.fetch.check_properties, model.guest_from_image)."""

    WORD = "word"  # short text: a format, a method, a key type
    TEXT = "text"  # printable text up to 4096 characters (a signature, a marker)
    UUID = "uuid"
    SHA512 = "sha512"
    SHA256 = "sha256"
    NUMBER = "number"


# The Glance properties a bundle carries, and whether a bundle without one is refused.
# edgepin_signing_cert_sha256 is required here: offline the node cannot ask Barbican for
# the certificate a signature names, so it must name a pinned one.
PROPERTIES: dict[str, tuple[Form, bool]] = {
    "disk_format": (Form.WORD, True),
    "container_format": (Form.WORD, False),
    "os_hash_algo": (Form.WORD, True),
    "os_hash_value": (Form.SHA512, True),
    "img_signature": (Form.TEXT, True),
    "img_signature_hash_method": (Form.WORD, True),
    "img_signature_key_type": (Form.WORD, True),
    "img_signature_certificate_uuid": (Form.UUID, True),
    "edgepin_signing_cert_sha256": (Form.SHA256, True),
    "os_encrypt_format": (Form.WORD, True),
    "os_encrypt_key_id": (Form.UUID, True),
    "os_encrypt_key_deletion_policy": (Form.WORD, False),
    "os_decrypt_container_format": (Form.WORD, False),
    "os_decrypt_size": (Form.NUMBER, False),
    "edgepin_version": (Form.TEXT, False),
    "edgepin_vcpus": (Form.NUMBER, False),
    "edgepin_memory_mb": (Form.NUMBER, False),
    "edgepin_health_marker": (Form.TEXT, False),
}
TOP_FIELDS = {"kind", "version", "node", "created_at", "assignment", "image", "key"}


@dataclass(frozen=True)
class BundleImage:
    """The image a bundle carries: its id, its size and the Glance properties listed in
    :data:`PROPERTIES`."""

    image_id: str
    size: int
    properties: dict[str, str] = field(default_factory=dict)

    def as_glance(self) -> dict[str, Any]:
        """The image as Glance describes it, for the checks the node makes online."""
        return {**self.properties, "id": self.image_id, "size": self.size}

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.image_id, "size": self.size, "properties": dict(self.properties)}


@dataclass(frozen=True)
class WrappedKey:
    """The image's passphrase as a TPM2 duplication blob for one TPM's EK, under a PolicyPCR
    over ``pcrs``. ``ek_sha256`` (the EK public key's SubjectPublicKeyInfo, SHA-256) says
    which TPM it was made for, for people; the TPM itself decides."""

    blob: bytes
    pcrs: tuple[int, ...]
    ek_sha256: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "wrapped": base64.b64encode(self.blob).decode(),
            "pcrs": list(self.pcrs),
            "ek_sha256": self.ek_sha256,
        }


@dataclass(frozen=True)
class Manifest:
    node: str  # the node's id (its name in edgepin): for people and for the folder's name
    created_at: str
    assignment: dict[str, Any]  # the signed record; provisioner.assignment.verify reads it
    image: BundleImage
    key: WrappedKey

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": KIND,
            "version": VERSION,
            "node": self.node,
            "created_at": self.created_at,
            "assignment": self.assignment,
            "image": self.image.as_dict(),
            "key": self.key.as_dict(),
        }


def folder_name(node_id: str) -> str:
    """The bundle's folder on the medium: one per node, so that a stick can carry a site."""
    return f"{DIR_PREFIX}{node_id}"


def encode(manifest: Manifest) -> bytes:
    return (json.dumps(manifest.as_dict(), indent=2, sort_keys=True) + "\n").encode()


def image_from_glance(image: dict[str, Any]) -> BundleImage:
    """What a bundle carries of a Glance image (the operator's side), checked as the node
    will check it."""
    properties = {
        name: str(image[name]) for name in PROPERTIES if image.get(name) not in (None, "")
    }
    return _image({"id": image.get("id"), "size": image.get("size"), "properties": properties})


# ------------------------------------------------------------------ the parser


def _fail(what: str, hint: str | None = None) -> BundleError:
    return BundleError(f"the bundle's manifest is malformed: {what}", hint=hint)


def _text(value: Any, what: str, size: int = 4096) -> str:
    if not isinstance(value, str) or not value or len(value) > size or not value.isprintable():
        raise _fail(f"{what} is not printable text of at most {size} characters")
    return value


def _form(value: Any, what: str, form: Form) -> str:
    if form is Form.TEXT:
        return _text(value, what)
    text = _text(value, what, 64 if form is Form.WORD else 128)
    pattern = {
        Form.WORD: WORD,
        Form.UUID: UUID,
        Form.SHA512: SHA512,
        Form.SHA256: SHA256,
        Form.NUMBER: DIGITS,
    }[form]
    if not pattern.fullmatch(text):
        raise _fail(f"{what} is not a {form.value}")
    return text


def _object(value: Any, what: str, keys: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(f"{what} is not an object")
    unknown = sorted(str(k)[:40] for k in value if k not in keys)
    if unknown:
        raise _fail(f"{what} has unknown fields {unknown[:3]}")
    return value


def _image(value: Any) -> BundleImage:
    doc = _object(value, "image", {"id", "size", "properties"})
    size = doc.get("size")
    if type(size) is not int or not 0 < size <= MAX_IMAGE_SIZE:
        raise _fail(f"image.size is not a whole number from 1 to {MAX_IMAGE_SIZE}")
    props = _object(doc.get("properties"), "image.properties", set(PROPERTIES))
    properties = {
        name: _form(v, f"image.properties.{name}", PROPERTIES[name][0]) for name, v in props.items()
    }
    missing = [name for name, (_, required) in PROPERTIES.items() if required and name not in props]
    if missing:
        raise _fail(f"image.properties lacks {', '.join(missing)}")
    return BundleImage(_form(doc.get("id"), "image.id", Form.UUID), size, properties)


def _key(value: Any) -> WrappedKey:
    doc = _object(value, "key", {"wrapped", "pcrs", "ek_sha256"})
    wrapped = _text(doc.get("wrapped"), "key.wrapped", MAX_MANIFEST)
    try:
        blob = base64.b64decode(wrapped, validate=True)
        form = parse_blob(blob)
    except (binascii.Error, ValueError):
        raise _fail("key.wrapped is not base64") from None
    except TpmBlobError as e:
        raise _fail(f"key.wrapped: {e}") from None
    if form["kind"] != BlobKind.DUPLICATE:
        raise _fail("key.wrapped is not a key wrapped for a TPM's endorsement key")
    pcrs = doc.get("pcrs")
    if (
        not isinstance(pcrs, list)
        or not pcrs
        or not all(type(p) is int and 0 <= p <= 23 for p in pcrs)
        or pcrs != sorted(set(pcrs))
    ):
        raise _fail("key.pcrs is not a sorted list of PCR numbers 0..23")
    if sorted(form.get("pcrs", [])) != pcrs:
        raise _fail("key.pcrs are not the PCRs the wrapped key names")
    return WrappedKey(blob, tuple(pcrs), _form(doc.get("ek_sha256"), "key.ek_sha256", Form.SHA256))


def _shown(value: Any) -> str:
    return "".join(c for c in str(value)[:20] if c.isprintable())


def parse(data: bytes) -> Manifest:
    """A manifest from untrusted bytes: a :class:`Manifest`, or BundleError; nothing else."""
    if len(data) > MAX_MANIFEST:
        raise _fail(f"more than {MAX_MANIFEST} bytes")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _fail("not JSON (a truncated or damaged copy?)") from None
    doc = _object(doc, "the manifest", TOP_FIELDS)
    if doc.get("kind") != KIND:
        raise _fail(f"kind is not {KIND!r}")
    version = doc.get("version")
    if version != VERSION or type(version) is not int:
        raise BundleError(
            f"bundle format version {_shown(version)} is not the one this node reads ({VERSION})",
            hint="make the bundle with the edgepin release that the node's host image has",
        )
    node = _text(doc.get("node"), "node", 63)
    if not NODE_ID.fullmatch(node):
        raise _fail("node is not a node id")
    record = doc.get("assignment")
    if not isinstance(record, dict):
        raise _fail("assignment is not an object")
    try:
        if len(json.dumps(record)) > MAX_ASSIGNMENT:
            raise _fail("assignment is too long")
    except (ValueError, RecursionError):  # pragma: no cover: json.loads gave it
        raise _fail("assignment is not JSON") from None
    return Manifest(
        node=node,
        created_at=_text(doc.get("created_at"), "created_at", 64),
        assignment=record,
        image=_image(doc.get("image")),
        key=_key(doc.get("key")),
    )
