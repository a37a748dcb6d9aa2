"""Fetch and verify an image in one pass: stream, sha512, signature, write, atomically.

The download goes to ``<images>/<id>.partial`` and resumes with an HTTP Range request.
A store that refuses ranges (Glance on Ceph RBD answers 400, see ``range_action``) is
asked once more without a range, from byte zero; one that ignores them (200) is read
from byte zero. The bytes kept from an earlier run are hashed again only when the store
does resume (206). The node never loops on a 400 and never accepts a partial image. Only a
file whose sha512 equals ``os_hash_value`` and whose signature verifies against a pinned
certificate is renamed to ``<id>.qcow2``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography import x509

from provisioner import qemuimg
from provisioner.cloud import translate
from provisioner.errors import (
    ImageError,
    ServiceUnavailableError,
    StateError,
    VerificationError,
)
from provisioner.node import state
from provisioner.signing import StreamVerifier, fingerprint, load_certificate

LOG = logging.getLogger(__name__)
CHUNK = 1024 * 1024
MAX_PROPERTY = 4096

RangeAction = Literal["append", "from_zero", "retry_from_zero", "other"]


@dataclass
class FetchResult:
    path: Path
    sha512: str
    size: int
    bytes_fetched: int
    resumed_from: int
    restarted: bool


def load_pinned(certs_dir: Path) -> dict[str, x509.Certificate]:
    """The signing certificates baked into the image, by sha256 fingerprint."""
    pinned: dict[str, x509.Certificate] = {}
    if certs_dir.is_dir():
        for path in sorted(certs_dir.glob("*.pem")):
            cert = load_certificate(path.read_bytes())
            pinned[fingerprint(cert)] = cert
    return pinned


def check_properties(image: dict[str, Any]) -> None:
    """Refuse an image that lacks what a node needs, or whose values are hostile."""
    for key, value in image.items():
        if isinstance(value, str) and (len(value) > MAX_PROPERTY or "\x00" in value):
            raise ImageError(f"image property {key[:40]!r} is malformed (too long or NUL)")
    if image.get("os_hash_algo") != "sha512" or not image.get("os_hash_value"):
        raise VerificationError(
            "image has no sha512 os_hash_value: refused", image_id=image.get("id")
        )
    for key in (
        "img_signature",
        "img_signature_hash_method",
        "img_signature_key_type",
        "img_signature_certificate_uuid",
    ):
        if not image.get(key):
            raise VerificationError(f"image is not signed ({key} missing): refused")
    if not image.get("os_encrypt_key_id") or image.get("os_encrypt_format") not in (
        "LUKSv1",
        "LUKS",
    ):
        raise ImageError("image is not LUKS-encrypted (os_encrypt_* missing): refused")
    if image.get("disk_format") != "qcow2":
        raise ImageError(f"disk_format {image.get('disk_format')!r} is not qcow2: refused")
    size = image.get("size")
    if not isinstance(size, int) or size <= 0:
        raise ImageError("image has no size")


def choose_certificate(
    image: dict[str, Any],
    pinned: dict[str, x509.Certificate],
    barbican_cert: Callable[[str], bytes],
) -> x509.Certificate:
    """The pinned certificate the image claims to be signed with; never any other."""
    if not pinned:
        raise VerificationError("no signing certificate is pinned on this node: refused")
    claimed = image.get("edgepin_signing_cert_sha256")
    if isinstance(claimed, str) and claimed in pinned:
        return pinned[claimed]
    offered = load_certificate(barbican_cert(image["img_signature_certificate_uuid"]))
    fp = fingerprint(offered)
    if fp not in pinned:
        raise VerificationError(
            f"image is signed by a certificate that is not pinned (sha256 {fp[:16]}…): refused"
        )
    return pinned[fp]


def range_action(status: int, restarted: bool) -> RangeAction:
    """What to do with the answer to a ``Range: bytes=N-`` request.

    206: the store resumes, append. 200: it ignored the range and sends the whole image,
    keep that from byte zero. 400 (Glance on Ceph RBD: "Getting images randomly from this
    store is not supported") or 416: ask again without a range, from byte zero, and only
    if that has not happened yet in this fetch. Anything else ("other", a 400 the second time
    included) is judged like the answer to any request: 404, 5xx, unexpected status.
    """
    if status == 206:
        return "append"
    if status == 200:
        return "from_zero"
    if status in (400, 416) and not restarted:
        return "retry_from_zero"
    return "other"


def _rehash(path: Path, upto: int, sha: Any, verifier: StreamVerifier) -> None:
    with path.open("rb") as f:
        remaining = upto
        while remaining:
            chunk = f.read(min(CHUNK, remaining))
            if not chunk:
                break
            sha.update(chunk)
            verifier.update(chunk)
            remaining -= len(chunk)


def fetch(
    sess: Any,
    interface: str,
    image: dict[str, Any],
    certificate: x509.Certificate,
    images_dir: Path,
    on_progress: Callable[[int], None] | None = None,
) -> FetchResult:
    image_id = str(image["id"])
    size = int(image["size"])
    expected = str(image["os_hash_value"])
    final = images_dir / f"{image_id}.qcow2"
    partial = images_dir / f"{image_id}.partial"
    # traversable, not listable: QEMU runs as its own user (libvirt's dynamic ownership
    # gives it the image file while the guest runs) and must reach the file here
    images_dir.mkdir(mode=0o711, parents=True, exist_ok=True)

    def fresh() -> tuple[Any, StreamVerifier]:
        return hashlib.sha512(), StreamVerifier(
            certificate,
            image["img_signature"],
            image["img_signature_hash_method"],
            image["img_signature_key_type"],
        )

    sha, verifier = fresh()
    offset = partial.stat().st_size if partial.exists() else 0
    if offset > size:
        partial.unlink()
        offset = 0
    resumed_from = offset
    restarted = False
    fetched = 0
    url_filter = {"service_type": "image", "interface": interface}
    path = f"/v2/images/{image_id}/file"
    started = time.monotonic()

    while True:
        if offset == size:
            _rehash(partial, offset, sha, verifier)  # everything was already there
            break
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        with translate("glance", f"download of {image_id}"):
            r = sess.get(
                path, endpoint_filter=url_filter, stream=True, headers=headers, raise_exc=False
            )
        action = range_action(r.status_code, restarted) if headers else None
        if action == "append":
            # the bytes kept from an earlier run count only now that the store resumes
            _rehash(partial, offset, sha, verifier)
        elif action in ("from_zero", "retry_from_zero"):
            LOG.info(
                "fetch: store answered %s to a range request; restarting from byte 0",
                r.status_code,
            )
            partial.unlink(missing_ok=True)
            offset, restarted = 0, True
            sha, verifier = fresh()
            if action == "retry_from_zero":
                r.close()
                continue
        if r.status_code == 404:
            raise ImageError(f"image {image_id} is gone from glance")
        if r.status_code in (401, 403):
            raise VerificationError(f"not allowed to download image {image_id}")
        if r.status_code >= 500:
            raise ServiceUnavailableError(f"glance: server error {r.status_code} on download")
        if r.status_code not in (200, 206) or (offset and r.status_code != 206):
            raise ServiceUnavailableError(f"glance: unexpected status {r.status_code}")
        mode = "ab" if offset else "wb"
        try:
            with partial.open(mode) as f:
                for chunk in r.iter_content(chunk_size=CHUNK):
                    if offset + len(chunk) > size:
                        f.close()
                        partial.unlink(missing_ok=True)
                        raise VerificationError(
                            f"image {image_id} sends more bytes than its declared size {size}"
                        )
                    f.write(chunk)
                    sha.update(chunk)
                    verifier.update(chunk)
                    offset += len(chunk)
                    fetched += len(chunk)
                    if on_progress:
                        on_progress(len(chunk))
                f.flush()
                os.fsync(f.fileno())
        except Exception as e:
            # requests' errors derive from OSError: tell a cut stream from a full disk
            if type(e).__module__.startswith(("requests", "urllib3", "keystoneauth1")):
                raise ServiceUnavailableError(
                    f"download of {image_id} cut at {offset} of {size} bytes "
                    f"({type(e).__name__}); it resumes on the next run"
                ) from None
            if isinstance(e, OSError) and e.errno == 28:
                raise StateError(
                    f"disk full while downloading {image_id} ({offset} of {size} bytes kept)"
                ) from None
            raise
        finally:
            r.close()
        break

    if offset < size:
        raise ServiceUnavailableError(
            f"download of {image_id} ended at {offset} of {size} bytes; it resumes on the next run"
        )
    got = sha.hexdigest()
    if got != expected and resumed_from and not restarted:
        # the bytes kept from an earlier run may be what is wrong (a torn write on the
        # node's own disk): one full download decides, not the resumed one
        LOG.warning("fetch: resumed image %s failed its hash; downloading from zero", image_id)
        partial.unlink(missing_ok=True)
        again = fetch(sess, interface, image, certificate, images_dir, on_progress)
        again.bytes_fetched += fetched
        return again
    if got != expected:
        partial.unlink(missing_ok=True)
        raise VerificationError(
            f"sha512 of image {image_id} does not match os_hash_value: refused",
            image_id=image_id,
            expected=expected,
            computed=got,
        )
    try:
        verifier.verify()
    except VerificationError as e:
        partial.unlink(missing_ok=True)
        raise VerificationError(f"{e.message} (image {image_id}): refused") from None
    try:
        qemuimg.check_luks_qcow2(partial)
    except ImageError as e:
        partial.unlink(missing_ok=True)
        raise ImageError(f"image {image_id}: {e.message}: refused") from None
    os.replace(partial, final)
    state.fsync_dir(images_dir)
    LOG.info(
        "fetch: image %s verified (%d bytes fetched, %s, %.1fs)",
        image_id,
        fetched,
        "restarted from byte 0" if restarted else f"resumed from {resumed_from}",
        time.monotonic() - started,
    )
    return FetchResult(final, got, size, fetched, resumed_from, restarted)
