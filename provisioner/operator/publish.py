"""``edgepin publish``: encrypt a guest image client-side, sign it and upload it to Glance.

Steps, each undone if a later one fails (nothing half-created is left behind):

1. check the input is a disk image (qcow2, or raw with a partition table);
2. encrypt it into a qcow2 with LUKS inside under a fresh random passphrase, which
   reaches qemu-img through a pipe and never touches the disk;
3. hash (sha512) and sign (``img_signature*``) the encrypted bytes in one pass;
4. store the passphrase in Barbican (type ``passphrase``), named after the image id chosen
   here and the signing certificate: the binding ``assign`` checks before it grants a node
   read access (provisioner/operator/imagesecrets.py);
5. create the Glance image with that id and every property set before upload, so that
   Glance verifies the signature itself, then upload with progress;
6. check that Glance's ``os_hash_value`` equals the sha512 computed while uploading.
"""

from __future__ import annotations

import hashlib
import secrets
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from provisioner import barbican, qemuimg
from provisioner.cloud import translate
from provisioner.errors import EdgepinError, ImageError, UsageError, VerificationError
from provisioner.node.model import (
    NETWORK_PROPERTY,
    PCI_PROPERTY,
    USB_PROPERTY,
    guest_network,
    pci_selectors,
    usb_ids,
)
from provisioner.operator.imagesecrets import passphrase_name, signing_certificate
from provisioner.operator.signingcert import load_key
from provisioner.progress import step, transfer
from provisioner.signing import StreamSigner, fingerprint

CHUNK = 1024 * 1024
REQUIRED_PROPERTIES = (
    "os_hash_algo",
    "os_hash_value",
    "os_encrypt_format",
    "os_encrypt_key_id",
    "img_signature",
    "img_signature_hash_method",
    "img_signature_key_type",
    "img_signature_certificate_uuid",
    "edgepin_version",
    "edgepin_vcpus",
    "edgepin_memory_mb",
)


@dataclass
class PublishRequest:
    guest: Path
    name: str
    version: str
    vcpus: int
    memory_mb: int
    signing_cert_id: str
    signing_key_id: str
    hash_method: str = "SHA-512"
    health_marker: str | None = None
    network: str | None = None  # edgepin_network: lan, vlan:N, host or none
    usb: tuple[str, ...] = ()  # edgepin_usb: vendor:product ids
    pci: tuple[str, ...] = ()  # edgepin_pci: PCI addresses and classes
    key_deletion_policy: str = "on_image_deletion"
    luks_iter_time_ms: int = 1000
    work_dir: Path | None = None
    progress: bool = True


@dataclass
class Published:
    image_id: str
    key_id: str
    sha512: str
    size: int
    properties: dict[str, str] = field(default_factory=dict)


def detect_format(path: Path) -> str:
    """'qcow2' or 'raw'; anything else, or a raw file without a partition table, is refused."""
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    with path.open("rb") as f:
        head = f.read(1024)
    if head[:4] == b"QFI\xfb":
        info = qemuimg.info(path)
        if info.get("encrypted"):
            raise ImageError(f"{path}: already encrypted; give the plaintext guest image")
        if info.get("backing-filename"):
            raise ImageError(f"{path}: has a backing file; flatten it first")
        return "qcow2"
    has_mbr = len(head) >= 512 and head[510:512] == b"\x55\xaa"
    has_gpt = head[512:520] == b"EFI PART"
    if (has_mbr or has_gpt) and path.stat().st_size % 512 == 0:
        return "raw"
    raise ImageError(
        f"{path}: not a disk image",
        hint="give a qcow2 image or a raw disk with a partition table",
    )


def file_chunks(path: Path, on_chunk: Callable[[bytes], None]) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            on_chunk(chunk)
            yield chunk


def publish(conn: Any, req: PublishRequest) -> Published:
    if req.vcpus < 1 or req.memory_mb < 64:
        raise UsageError("--vcpus must be >= 1 and --memory >= 64 (MiB)")
    try:
        usb_ids(list(req.usb))
    except ImageError as e:
        raise UsageError(f"--usb: {e.message}") from None
    try:
        pci_selectors(list(req.pci))
    except ImageError as e:
        raise UsageError(f"--pci: {e.message}") from None
    src_format = detect_format(req.guest)
    virtual_size = int(qemuimg.info(req.guest)["virtual-size"])
    step("reading the signing key and certificate from Barbican")
    key = load_key(conn, req.signing_key_id)
    cert = signing_certificate(conn, req.signing_cert_id)
    if spki(cert.public_key()) != spki(key.public_key()):
        raise VerificationError(
            "the signing key does not belong to the signing certificate",
            hint="check --signing-key-id and --signing-cert-id",
        )
    undo: list[Callable[[], None]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="edgepin-publish-", dir=req.work_dir) as tmp:
            encrypted = Path(tmp) / "encrypted.qcow2"
            # a passphrase of printable characters: LUKS and libvirt both take it as is
            passphrase = secrets.token_urlsafe(48).encode()
            step(f"encrypting {req.guest.name} ({src_format}) into qcow2+LUKS")
            qemuimg.encrypt(req.guest, src_format, encrypted, passphrase, req.luks_iter_time_ms)
            size = encrypted.stat().st_size

            signer = StreamSigner(key, req.hash_method)
            digest = hashlib.sha512()
            with transfer("hashing and signing", size, req.progress) as bar:
                for chunk in file_chunks(encrypted, lambda c: bar(len(c))):
                    signer.update(chunk)
                    digest.update(chunk)
            sha512 = digest.hexdigest()

            # the image's id is chosen here so that the passphrase's (immutable) name can
            # bind it to this image and this certificate before either exists
            image_id = str(uuid.uuid4())
            step("storing the passphrase in Barbican")
            key_id = barbican.store(
                conn,
                passphrase_name(image_id, req.signing_cert_id),
                "passphrase",
                passphrase,
                text=True,
            )
            del passphrase
            undo.append(lambda: barbican.delete(conn, key_id))

            properties = {
                "os_encrypt_format": "LUKSv1",
                "os_encrypt_key_id": key_id,
                "os_encrypt_key_deletion_policy": req.key_deletion_policy,
                "os_decrypt_container_format": "bare",
                "os_decrypt_size": str(virtual_size),
                "img_signature": signer.signature(),
                "img_signature_hash_method": req.hash_method,
                "img_signature_key_type": signer.key_type,
                "img_signature_certificate_uuid": req.signing_cert_id,
                "edgepin_version": req.version,
                "edgepin_vcpus": str(req.vcpus),
                "edgepin_memory_mb": str(req.memory_mb),
                "edgepin_signing_cert_sha256": fingerprint(cert),
            }
            if req.health_marker:
                properties["edgepin_health_marker"] = req.health_marker
            if req.network:
                properties[NETWORK_PROPERTY] = str(guest_network(req.network))
            if req.usb:
                properties[USB_PROPERTY] = ",".join(usb_ids(list(req.usb)))
            if req.pci:
                properties[PCI_PROPERTY] = ",".join(pci_selectors(list(req.pci)))
            with translate("glance", "create image"):
                r = conn.image.post(
                    "/images",
                    json={
                        "id": image_id,
                        "name": req.name,
                        "disk_format": "qcow2",
                        "container_format": "bare",
                        "visibility": "shared",
                        **properties,
                    },
                )
                r.raise_for_status()
            if r.json()["id"] != image_id:
                raise ImageError(f"glance created image {r.json()['id']}, not {image_id}")
            undo.append(lambda: delete_image(conn, image_id))

            upload(conn, image_id, encrypted, req.name, sha512, req.progress)
            step(f"published {req.name} {req.version} as image {image_id}")
            return Published(image_id, key_id, sha512, size, properties)
    except BaseException:
        for action in reversed(undo):
            try:
                action()
            except EdgepinError:
                pass
        raise


def spki(public_key: Any) -> bytes:
    data: bytes = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


def delete_image(conn: Any, image_id: str) -> None:
    with translate("glance", f"delete image {image_id}"):
        conn.image.delete(f"/images/{image_id}", raise_exc=False)


def upload(
    conn: Any, image_id: str, path: Path, name: str, sha512: str, progress: bool
) -> dict[str, Any]:
    """Upload ``path`` into the created image ``image_id`` with progress, then check that the
    bytes sent are the ones hashed (``sha512``), that the image is active and that Glance's
    own ``os_hash_value`` is that hash; returns Glance's record of the image."""
    size = path.stat().st_size
    sent = hashlib.sha512()
    with transfer(f"uploading {name}", size, progress) as bar:

        def on_chunk(chunk: bytes) -> None:
            sent.update(chunk)
            bar(len(chunk))

        with translate("glance", f"upload of {image_id}"):
            up = conn.image.put(
                f"/images/{image_id}/file",
                data=file_chunks(path, on_chunk),
                headers={"Content-Type": "application/octet-stream"},
                raise_exc=False,
            )
    if up.status_code >= 300:
        detail = up.text.strip().splitlines()[-1][:200] if up.text else ""
        raise ImageError(f"glance refused the upload ({up.status_code}): {detail}")
    if sent.hexdigest() != sha512:
        raise VerificationError("the file changed while it was being uploaded")
    with translate("glance", f"image {image_id}"):
        image = conn.image.get(f"/images/{image_id}").json()
    if image.get("status") != "active":
        raise ImageError(f"image {image_id} is {image.get('status')}, not active")
    if image.get("os_hash_algo") != "sha512" or image.get("os_hash_value") != sha512:
        raise VerificationError(
            "glance's os_hash_value differs from the sha512 computed while uploading",
            image_id=image_id,
            expected=sha512,
            got=image.get("os_hash_value"),
        )
    record: dict[str, Any] = image
    return record
