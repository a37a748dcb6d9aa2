"""``edgepin host publish`` and ``edgepin host list``: host releases in Glance.

A host release is the host update that ``./build.sh image`` writes
(``out/edgepin-host.update.tar``, :mod:`provisioner.hostupdate`), uploaded to Glance as an
image of its own kind and signed like a guest image:

1. read the file completely, once (every member in its place, with the size and sha256
   its manifest gives: :func:`provisioner.hostupdate.read`): anything that is not a whole
   host update is refused before anything is created;
2. in the same pass, hash (sha512) and sign (``img_signature*``, with the same signing key
   and certificate as guest images) the bytes checked;
3. refuse a host version that is not greater than every host release in Glance: host
   versions only go up;
4. create the Glance image with every property set before upload, so that Glance verifies
   the signature itself, then upload with progress; on any failure the image is deleted;
5. check that Glance's ``os_hash_value`` equals the sha512 computed while uploading.

The kind keeps host releases and guest images apart: a host release has
``disk_format=raw``, ``edgepin_kind=host-update`` and no ``os_encrypt_*`` (a host root holds
no secret: Debian's packages and edgepin's; a node's secrets are in its TPM and its state
partition). ``edgepin assign`` refuses it as a guest, as a node refuses any guest that is
not qcow2 with LUKS inside; and a guest image is not a host update, whose manifest a
reader checks first.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provisioner import hostupdate
from provisioner.cloud import translate
from provisioner.errors import EdgepinError, ImageError, UsageError, VerificationError
from provisioner.operator.imagesecrets import signing_certificate
from provisioner.operator.publish import delete_image, spki, upload
from provisioner.operator.signingcert import load_key
from provisioner.progress import step, transfer
from provisioner.signing import StreamSigner, fingerprint

KIND = "host-update"  # edgepin_kind
KIND_PROPERTY = "edgepin_kind"
VERSION_PROPERTY = "edgepin_host_version"
ROOT_HASH_PROPERTY = "edgepin_host_root_hash"
HASH_METHOD = "SHA-512"
PAGE = 200


@dataclass
class Release:
    image_id: str
    name: str
    host_version: int
    root_hash: str
    size: int
    sha512: str
    created_at: str = ""


def _release(image: dict[str, Any]) -> Release | None:
    """A Glance image as a host release; None for any other image (or a malformed one)."""
    if image.get(KIND_PROPERTY) != KIND:
        return None
    try:
        version = int(str(image.get(VERSION_PROPERTY)))
    except ValueError:
        return None
    return Release(
        image_id=str(image.get("id")),
        name=str(image.get("name") or ""),
        host_version=version,
        root_hash=str(image.get(ROOT_HASH_PROPERTY) or ""),
        size=int(image.get("size") or 0),
        sha512=str(image.get("os_hash_value") or ""),
        created_at=str(image.get("created_at") or ""),
    )


def releases(conn: Any) -> list[Release]:
    """Every host release the caller can see, oldest version first."""
    found: list[Release] = []
    params: dict[str, Any] = {KIND_PROPERTY: KIND, "limit": PAGE}
    while True:
        with translate("glance", "list host releases"):
            r = conn.image.get("/images", params=params)
            r.raise_for_status()
        page = r.json().get("images", [])
        found += [rel for rel in map(_release, page) if rel is not None]
        if len(page) < PAGE or not r.json().get("next"):
            return sorted(found, key=lambda rel: (rel.host_version, rel.created_at))
        params["marker"] = page[-1]["id"]


def publish(
    conn: Any,
    file: Path,
    *,
    signing_cert_id: str,
    signing_key_id: str,
    name: str | None = None,
    progress: bool = True,
) -> Release:
    """Sign ``file`` (a host update) and upload it to Glance as a host release."""
    if not file.is_file():
        raise UsageError(f"{file}: no such file")
    step("reading the signing key and certificate from Barbican")
    key = load_key(conn, signing_key_id)
    cert = signing_certificate(conn, signing_cert_id)
    if spki(cert.public_key()) != spki(key.public_key()):
        raise VerificationError(
            "the signing key does not belong to the signing certificate",
            hint="check --signing-key-id and --signing-cert-id",
        )
    size = file.stat().st_size
    signer = StreamSigner(key, HASH_METHOD)
    digest = hashlib.sha512()
    # one pass: the bytes checked are the bytes signed
    with transfer(f"checking and signing {file.name}", size, progress) as bar:

        def on_data(chunk: bytes) -> None:
            signer.update(chunk)
            digest.update(chunk)
            bar(len(chunk))

        update = hostupdate.read(file, on_data)
    sha512 = digest.hexdigest()
    name = name or f"{update.name}-{update.host_version}"
    newest = max(releases(conn), key=lambda r: r.host_version, default=None)
    if newest is not None and update.host_version <= newest.host_version:
        raise ImageError(
            f"host version {update.host_version} is not greater than the newest host release "
            f"in Glance ({newest.host_version}, image {newest.image_id})",
            hint="build the release from a later commit (the version defaults to its time) or "
            "with a greater --host-version",
        )
    properties = {
        KIND_PROPERTY: KIND,
        VERSION_PROPERTY: str(update.host_version),
        ROOT_HASH_PROPERTY: update.verity.root_hash,
        "img_signature": signer.signature(),
        "img_signature_hash_method": HASH_METHOD,
        "img_signature_key_type": signer.key_type,
        "img_signature_certificate_uuid": signing_cert_id,
        "edgepin_signing_cert_sha256": fingerprint(cert),
        "edgepin_version": update.edgepin_version,
    }
    with translate("glance", "create image"):
        r = conn.image.post(
            "/images",
            json={
                "name": name,
                "disk_format": "raw",
                "container_format": "bare",
                "visibility": "shared",
                **properties,
            },
        )
        r.raise_for_status()
    image_id = str(r.json()["id"])
    try:
        image = upload(conn, image_id, file, name, sha512, progress)
    except BaseException:
        try:
            delete_image(conn, image_id)
        except EdgepinError:
            pass
        raise
    step(f"published host release {name} (host version {update.host_version}) as {image_id}")
    release = _release(image)
    assert release is not None  # its kind and version were set above
    return release
