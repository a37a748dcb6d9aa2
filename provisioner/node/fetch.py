"""Fetch and verify an image in one pass: stream, sha512, signature, write, atomically.

The download goes to ``<images>/<id>.partial`` and resumes with an HTTP Range request.
A store that refuses ranges (Glance on Ceph RBD answers 400, see ``range_action``) is
asked once more without a range, from byte zero; one that ignores them (200) is read
from byte zero. The bytes kept from an earlier run are hashed again only when the store
does resume (206). The node never loops on a 400 and never accepts a partial image. Only a
file whose sha512 equals ``os_hash_value`` and whose signature verifies against a pinned
certificate is renamed to ``<id>.qcow2``, after an fsync.

Speed (docs/performance.md, "1. Fetch"), with every check above kept:

- the calling thread reads the socket and writes the file; a second thread hashes the same
  chunks (``_HashThread``). Reading from a TLS socket, writing and hashlib's hashing all
  release the GIL, so they overlap on two cores. At most ``QUEUE_DEPTH`` chunks wait between
  the two, so memory stays flat whatever the image size; an error in the hash thread is
  raised in the caller, and the file is written in the caller's thread, so a cut stream and
  a full disk are told apart and counted as before;
- when the signature's hash method is SHA-512 the image is hashed once: the sha512 compared
  with ``os_hash_value`` is also the digest the signature is verified against. Other methods
  get a hasher of their own;
- every ``WRITEBACK_EVERY`` bytes a background fdatasync makes the disk write the image
  while the rest downloads (``_Sink``), so that the fsync before the rename finds little left.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal

from cryptography import x509

from provisioner import qemuimg
from provisioner.errors import (
    EdgepinError,
    ImageError,
    NotFoundError,
    ServiceUnavailableError,
    StateError,
    VerificationError,
)
from provisioner.node import state
from provisioner.node.client import NodeClient, check
from provisioner.node.model import Assignment
from provisioner.signing import StreamVerifier, fingerprint, load_certificate

LOG = logging.getLogger(__name__)
CHUNK = 1024 * 1024
QUEUE_DEPTH = 4  # chunks read but not yet hashed, at most
WRITEBACK_EVERY = 32 * 1024 * 1024  # bytes written between two background fdatasync calls
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


def assignment_pins(assignment_certs: Path, signing_certs: Path) -> dict[str, x509.Certificate]:
    """The certificates an assignment may be signed with: the pinned assignment-signing
    certificates, or, when none is pinned, the image-signing ones (one role, one key)."""
    return load_pinned(assignment_certs) or load_pinned(signing_certs)


def check_assigned(image: dict[str, Any], assignment: Assignment) -> None:
    """Refuse an image whose sha512 (Glance's ``os_hash_value``, or the bundle's copy of
    it) is not the one the signed assignment names."""
    if image.get("os_hash_value") != assignment.image_sha512:
        raise VerificationError(
            f"image {assignment.image_id} is not the one assigned (its sha512 "
            "differs from the signed assignment's): refused",
            image_id=assignment.image_id,
        )


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


class _Digests:
    """The image's sha512 and the signature's digest: one hash when the method is SHA-512."""

    def __init__(self, verifier: StreamVerifier) -> None:
        self.sha = hashlib.sha512()
        self.verifier = verifier
        self.shared = verifier.hash_name == self.sha.name

    def update(self, chunk: bytes) -> None:
        self.sha.update(chunk)
        if not self.shared:
            self.verifier.update(chunk)

    def verify_signature(self) -> None:
        self.verifier.verify(self.sha.digest() if self.shared else None)


class _HashThread:
    """Hashes the chunks handed to put() in a thread of its own, beside the socket reads.

    put() blocks while ``QUEUE_DEPTH`` chunks wait. An error in the thread is raised by the
    next put() or by finish(); after it the thread drains the queue without hashing, so that
    put() never blocks on a thread that has stopped. finish() waits for the last chunk;
    abort() drops what is queued; both end the thread and may be called more than once.
    """

    def __init__(self, digests: _Digests) -> None:
        self._digests = digests
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=QUEUE_DEPTH)
        self._error: BaseException | None = None
        self._dropping = False
        self._thread = threading.Thread(target=self._run, name="edgepin-fetch-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            if self._error is not None or self._dropping:
                continue
            try:
                self._digests.update(chunk)
            except BaseException as e:  # raised again in the caller's thread
                self._error = e

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, chunk: bytes) -> None:
        self._raise()
        self._queue.put(chunk)

    def _end(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def finish(self) -> None:
        self._end()
        self._raise()

    def abort(self) -> None:
        self._dropping = True
        self._end()


class _Sink:
    """Where the chunks read go: the file, written in the caller's thread, and the hash thread.

    Every ``WRITEBACK_EVERY`` bytes a short-lived thread calls fdatasync, so that the disk
    writes the image while the rest downloads instead of all of it in the final fsync (the
    kernel alone would start only at its dirty-memory threshold), and then lets the kernel
    drop the pages written (``_drop_cached``). That final fsync still
    happens, in commit(). An error of the hash thread or of a background fdatasync is raised
    by the next write() or by commit(). Leaving the ``with`` block ends both threads before
    the file is closed.
    """

    def __init__(self, file: IO[bytes], digests: _Digests) -> None:
        self._file = file
        self._hasher = _HashThread(digests)
        self._unsynced = 0
        self._syncer: threading.Thread | None = None
        self._sync_error: OSError | None = None

    def __enter__(self) -> _Sink:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        # no error from here: the one that ends the block (if any) is the one to report
        self._hasher.abort()
        if self._syncer is not None:
            self._syncer.join()

    def _sync(self, fd: int) -> None:
        try:
            os.fdatasync(fd)
            _drop_cached(fd)
        except OSError as e:
            self._sync_error = e

    def _join_syncer(self) -> None:
        if self._syncer is not None:
            self._syncer.join()
            self._syncer = None
        if self._sync_error is not None:
            raise self._sync_error

    def write(self, chunk: bytes) -> None:
        self._hasher.put(chunk)  # hashed in the other thread while this one writes
        self._file.write(chunk)
        self._unsynced += len(chunk)
        if self._unsynced >= WRITEBACK_EVERY and not (self._syncer and self._syncer.is_alive()):
            self._join_syncer()
            self._file.flush()
            self._syncer = threading.Thread(
                target=self._sync, args=(self._file.fileno(),), name="edgepin-fetch-sync"
            )
            self._syncer.start()
            self._unsynced = 0

    def commit(self) -> None:
        """Every byte is in: fsync the file, wait for the last hash."""
        self._join_syncer()
        self._file.flush()
        os.fsync(self._file.fileno())
        _drop_cached(self._file.fileno())
        self._hasher.finish()


def _drop_cached(fd: int) -> None:
    """Let the kernel drop the file's pages that are on the disk already.

    An image is written once and read again only when its guest starts: keeping it in the
    page cache would push out what the host and the running guest use, and a page cache
    that grows by the image's size made the kernel's side of the writes cost 1.5-2.5 times
    as much CPU (docs/performance.md). Dirty pages are left alone (and written back).
    """
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _rehash(path: Path, upto: int, digests: _Digests) -> None:
    with path.open("rb") as f:
        remaining = upto
        while remaining:
            chunk = f.read(min(CHUNK, remaining))
            if not chunk:
                break
            digests.update(chunk)
            remaining -= len(chunk)


def fetch(
    client: NodeClient,
    image: dict[str, Any],
    certificate: x509.Certificate,
    images_dir: Path,
    on_progress: Callable[[int], None] | None = None,
    suffix: str = ".qcow2",
    check_file: Callable[[Path], object] | None = None,
) -> FetchResult:
    """Download ``image`` into ``images_dir``, resuming a ``<id>.partial`` left there, and
    keep it as ``<id><suffix>`` only once its sha512, its signature and ``check_file``
    (a guest: a qcow2 with LUKS inside) pass."""
    image_id = str(image["id"])
    size = int(image["size"])
    expected = str(image["os_hash_value"])
    final = images_dir / f"{image_id}{suffix}"
    partial = images_dir / f"{image_id}.partial"
    # traversable, not listable: QEMU runs as its own user (libvirt's dynamic ownership
    # gives it the image file while the guest runs) and must reach the file here
    images_dir.mkdir(mode=0o711, parents=True, exist_ok=True)

    def fresh() -> _Digests:
        return _Digests(
            StreamVerifier(
                certificate,
                image["img_signature"],
                image["img_signature_hash_method"],
                image["img_signature_key_type"],
            )
        )

    digests = fresh()
    offset = partial.stat().st_size if partial.exists() else 0
    if offset > size:
        partial.unlink()
        offset = 0
    resumed_from = offset
    restarted = False
    fetched = 0
    started = time.monotonic()

    while True:
        if offset == size:
            _rehash(partial, offset, digests)  # everything was already there
            break
        asked_range = bool(offset)
        r = client.download(image_id, offset)
        action = range_action(r.status_code, restarted) if asked_range else None
        if action == "append":
            # the bytes kept from an earlier run count only now that the store resumes
            _rehash(partial, offset, digests)
        elif action in ("from_zero", "retry_from_zero"):
            LOG.info(
                "fetch: store answered %s to a range request; restarting from byte 0",
                r.status_code,
            )
            partial.unlink(missing_ok=True)
            offset, restarted = 0, True
            digests = fresh()
            if action == "retry_from_zero":
                r.close()
                continue
        try:
            # a 401/403 is access refused for now (AuthError), not a verdict on the image
            check(
                r.status_code,
                "glance",
                f"download of {image_id}",
                (206,) if offset else (200, 206),
                r.headers,
            )
        except NotFoundError:
            r.close()
            raise ImageError(f"image {image_id} is gone from glance", image_id=image_id) from None
        except EdgepinError:
            r.close()
            raise
        mode = "ab" if offset else "wb"
        too_long = False
        try:
            with partial.open(mode) as f, _Sink(f, digests) as sink:
                for chunk in r.iter_content(chunk_size=CHUNK):
                    if offset + len(chunk) > size:
                        too_long = True
                        break
                    sink.write(chunk)
                    offset += len(chunk)
                    fetched += len(chunk)
                    if on_progress:
                        on_progress(len(chunk))
                else:
                    sink.commit()
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
        if too_long:
            partial.unlink(missing_ok=True)
            raise VerificationError(
                f"image {image_id} sends more bytes than its declared size {size}"
            )
        break

    if offset < size:
        raise ServiceUnavailableError(
            f"download of {image_id} ended at {offset} of {size} bytes; it resumes on the next run"
        )
    got = digests.sha.hexdigest()
    if got != expected and resumed_from and not restarted:
        # the bytes kept from an earlier run may be what is wrong (a torn write on the
        # node's own disk): one full download decides, not the resumed one
        LOG.warning("fetch: resumed image %s failed its hash; downloading from zero", image_id)
        partial.unlink(missing_ok=True)
        again = fetch(client, image, certificate, images_dir, on_progress, suffix, check_file)
        again.bytes_fetched += fetched
        return again
    _accept(partial, final, digests, expected, image_id, check_file)
    LOG.info(
        "fetch: image %s verified (%d bytes fetched, %s, %.1fs)",
        image_id,
        fetched,
        "restarted from byte 0" if restarted else f"resumed from {resumed_from}",
        time.monotonic() - started,
    )
    return FetchResult(final, got, size, fetched, resumed_from, restarted)


def _accept(
    partial: Path,
    final: Path,
    digests: _Digests,
    expected: str,
    image_id: str,
    check_file: Callable[[Path], object] | None = None,
) -> None:
    """Keep ``partial`` as ``final`` if, and only if, its sha512 is ``expected``, its
    signature verifies and ``check_file`` passes (a guest: a qcow2 with LUKS inside);
    otherwise delete it."""
    got = digests.sha.hexdigest()
    if got != expected:
        partial.unlink(missing_ok=True)
        raise VerificationError(
            f"sha512 of image {image_id} does not match os_hash_value: refused",
            image_id=image_id,
            expected=expected,
            computed=got,
        )
    try:
        digests.verify_signature()
    except VerificationError as e:
        partial.unlink(missing_ok=True)
        raise VerificationError(f"{e.message} (image {image_id}): refused") from None
    try:
        (check_file or qemuimg.check_luks_qcow2)(partial)
    except ImageError as e:
        partial.unlink(missing_ok=True)
        raise ImageError(f"image {image_id}: {e.message}: refused") from None
    os.replace(partial, final)
    state.fsync_dir(final.parent)


def copy(
    source: IO[bytes],
    image: dict[str, Any],
    certificate: x509.Certificate,
    images_dir: Path,
    on_progress: Callable[[int], None] | None = None,
) -> FetchResult:
    """The online fetch's checks for an image read from a file (an air-gapped bundle).

    The bytes are copied to a temporary file in ``images_dir`` and hashed and verified as
    they are written, so what is kept is exactly what was verified, whatever the medium
    returns on a second read; only then is the copy renamed to ``<id>.qcow2``. A source
    that ends early, sends more than the image's size, or fails a check leaves nothing.
    """
    image_id = str(image["id"])
    size = int(image["size"])
    final = images_dir / f"{image_id}.qcow2"
    # a dot and .tmp: a copy cut by a crash is removed at the next run's start
    # (state.remove_stale_temp_files), and never taken for a download to resume
    partial = images_dir / f".{image_id}.copy.tmp"
    images_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
    digests = _Digests(
        StreamVerifier(
            certificate,
            image["img_signature"],
            image["img_signature_hash_method"],
            image["img_signature_key_type"],
        )
    )
    started = time.monotonic()
    done = 0
    try:
        with partial.open("wb") as f, _Sink(f, digests) as sink:
            while chunk := source.read(CHUNK):
                if done + len(chunk) > size:
                    raise VerificationError(
                        f"image {image_id} holds more bytes than its declared size {size}: refused",
                        image_id=image_id,
                    )
                sink.write(chunk)
                done += len(chunk)
                if on_progress:
                    on_progress(len(chunk))
            if done < size:
                raise ImageError(
                    f"image {image_id} ends at {done} of its {size} bytes: truncated, refused",
                    image_id=image_id,
                )
            sink.commit()
    except OSError as e:
        partial.unlink(missing_ok=True)
        if e.errno == 28:
            raise StateError(f"disk full while copying {image_id}") from None
        raise ImageError(
            f"image {image_id} cannot be read ({e.strerror or type(e).__name__}): refused"
        ) from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _accept(partial, final, digests, str(image["os_hash_value"]), image_id)
    LOG.info(
        "fetch: image %s copied and verified (%d bytes, %.1fs)",
        image_id,
        done,
        time.monotonic() - started,
    )
    return FetchResult(final, digests.sha.hexdigest(), size, 0, 0, False)
