"""The hash and signature checks of a fetch, and the threads that make them fast.

When ``img_signature_hash_method`` is SHA-512 the image is hashed once: the sha512 that is
compared with ``os_hash_value`` is the digest the signature is verified against. Other
methods keep a hasher of their own. Hashing runs in a thread beside the reads, and every
few MiB a background fdatasync writes the image out; errors in either thread reach the
caller, and every refusal leaves no image behind. A fake Glance stands in for the network.
"""

from __future__ import annotations

import errno
import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from provisioner.errors import (
    AuthError,
    ServiceUnavailableError,
    StateError,
    VerificationError,
)
from provisioner.node import fetch
from provisioner.signing import HASH_METHODS, StreamSigner, StreamVerifier
from tests.certs import self_signed
from tests.unit.fakes import node_client

pytestmark = pytest.mark.unit

DATA = bytes(range(256)) * 4096  # 1 MiB
SMALL = 64 * 1024  # the chunk size in these tests: 16 chunks


def certificate(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> x509.Certificate:
    return self_signed(key)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def sign(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, method: str, data: bytes) -> str:
    signer = StreamSigner(key, method)
    signer.update(data)
    return signer.signature()


def image_for(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, method: str, data: bytes = DATA
) -> dict[str, Any]:
    return {
        "id": "img",
        "size": len(data),
        "os_hash_value": hashlib.sha512(data).hexdigest(),
        "img_signature": sign(key, method, data),
        "img_signature_hash_method": method,
        "img_signature_key_type": StreamSigner(key, method).key_type,
    }


# ------------------------------------------------------------------ StreamVerifier


def verifier(cert: x509.Certificate, sig: str, method: str) -> StreamVerifier:
    key = cert.public_key()
    key_type = "RSA-PSS" if isinstance(key, rsa.RSAPublicKey) else "ECC_SECP384R1"
    return StreamVerifier(cert, sig, method, key_type)


@pytest.mark.parametrize("which", ["ec", "rsa"])
def test_a_sha512_signature_verifies_from_the_callers_digest(
    which: str, ec_key: ec.EllipticCurvePrivateKey, rsa_key: rsa.RSAPrivateKey
) -> None:
    key = ec_key if which == "ec" else rsa_key
    v = verifier(certificate(key), sign(key, "SHA-512", DATA), "SHA-512")
    assert v.hash_name == "sha512"
    v.verify(digest=hashlib.sha512(DATA).digest())


@pytest.mark.parametrize("which", ["ec", "rsa"])
def test_a_digest_of_other_bytes_is_refused(
    which: str, ec_key: ec.EllipticCurvePrivateKey, rsa_key: rsa.RSAPrivateKey
) -> None:
    key = ec_key if which == "ec" else rsa_key
    v = verifier(certificate(key), sign(key, "SHA-512", DATA), "SHA-512")
    with pytest.raises(VerificationError, match="does not verify"):
        v.verify(digest=hashlib.sha512(DATA + b"!").digest())


def test_a_digest_is_refused_after_streamed_bytes_or_with_the_wrong_length(
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    cert, sig = certificate(ec_key), sign(ec_key, "SHA-512", DATA)
    v = verifier(cert, sig, "SHA-512")
    v.update(DATA)
    with pytest.raises(VerificationError, match="both a digest and streamed bytes"):
        v.verify(digest=hashlib.sha512(DATA).digest())
    v = verifier(cert, sig, "SHA-512")
    with pytest.raises(VerificationError, match="32-byte digest is not sha512"):
        v.verify(digest=hashlib.sha256(DATA).digest())


@pytest.mark.parametrize("method", sorted(HASH_METHODS))
def test_every_hash_method_still_verifies_streamed_bytes(
    method: str, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    """The verifier hashes with hashlib, the signer with cryptography: the digests agree."""
    cert, sig = certificate(ec_key), sign(ec_key, method, DATA)
    v = verifier(cert, sig, method)
    for i in range(0, len(DATA), SMALL):
        v.update(DATA[i : i + SMALL])
    v.verify()
    v = verifier(cert, sig, method)
    v.update(DATA[:-1])
    with pytest.raises(VerificationError, match="does not verify"):
        v.verify()


# ------------------------------------------------------------------ fetch


class Response:
    def __init__(self, status: int, chunks: Iterator[bytes]) -> None:
        self.status_code = status
        self.chunks = chunks
        self.headers: dict[str, str] = {}

    def iter_content(self, chunk_size: int) -> Iterator[bytes]:
        return self.chunks

    def close(self) -> None:
        pass


def chunks_of(data: bytes, size: int = SMALL) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


class Store:
    """Glance's download endpoint serving ``body`` (a callable: range start -> chunks)."""

    def __init__(self, body: Any) -> None:
        self.body = body
        self.requests: list[str] = []

    def get(self, path: str, headers: dict[str, str], **kwargs: Any) -> Response:
        rng = headers.get("Range", "")
        self.requests.append(rng or "full")
        start = int(rng.removeprefix("bytes=").rstrip("-")) if rng else 0
        return Response(206 if rng else 200, self.body(start))


def serving(data: bytes) -> Store:
    return Store(lambda start: chunks_of(data[start:]))


@pytest.fixture(autouse=True)
def _small_chunks_no_qemu_img(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(fetch, "CHUNK", SMALL)
    monkeypatch.setattr(fetch.qemuimg, "check_luks_qcow2", lambda path: None)
    yield
    # whatever happened, no hash or fdatasync thread outlives the fetch
    assert not [t for t in threading.enumerate() if t.name.startswith("edgepin-fetch")]


def nothing_left(tmp: Path) -> bool:
    return not list(tmp.glob("img.*"))


class Spy:
    """Counts the bytes fed to StreamVerifier.update and the digests given to verify()."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.fed = 0
        self.digests: list[bytes | None] = []
        update, verify = StreamVerifier.update, StreamVerifier.verify

        def spy_update(v: StreamVerifier, chunk: bytes) -> None:
            self.fed += len(chunk)
            update(v, chunk)

        def spy_verify(v: StreamVerifier, digest: bytes | None = None) -> None:
            self.digests.append(digest)
            verify(v, digest)

        monkeypatch.setattr(StreamVerifier, "update", spy_update)
        monkeypatch.setattr(StreamVerifier, "verify", spy_verify)


def test_sha512_method_hashes_once(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy(monkeypatch)
    result = fetch.fetch(
        node_client(serving(DATA)), image_for(ec_key, "SHA-512"), certificate(ec_key), tmp_path
    )
    assert result.path.read_bytes() == DATA and result.sha512 == hashlib.sha512(DATA).hexdigest()
    assert spy.fed == 0  # the verifier hashed nothing itself
    assert spy.digests == [hashlib.sha512(DATA).digest()]


def test_sha512_method_and_a_resume_hash_once(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bytes kept from an earlier run go into the shared sha512 too."""
    spy = Spy(monkeypatch)
    (tmp_path / "img.partial").write_bytes(DATA[:300000])
    store = serving(DATA)
    result = fetch.fetch(
        node_client(store), image_for(ec_key, "SHA-512"), certificate(ec_key), tmp_path
    )
    assert store.requests == ["bytes=300000-"] and result.bytes_fetched == len(DATA) - 300000
    assert result.path.read_bytes() == DATA
    assert spy.fed == 0 and spy.digests == [hashlib.sha512(DATA).digest()]


def test_sha512_method_with_a_wrong_signature_is_refused(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    """The sha512 matches os_hash_value; the signature is over other bytes."""
    image = image_for(ec_key, "SHA-512")
    image["img_signature"] = sign(ec_key, "SHA-512", DATA[:-1] + b"\x00")
    with pytest.raises(VerificationError, match="does not verify"):
        fetch.fetch(node_client(serving(DATA)), image, certificate(ec_key), tmp_path)
    assert nothing_left(tmp_path)


def test_sha512_method_signed_by_another_key_is_refused(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    other = ec.generate_private_key(ec.SECP384R1())
    image = image_for(other, "SHA-512")
    with pytest.raises(VerificationError, match="does not verify"):
        fetch.fetch(node_client(serving(DATA)), image, certificate(ec_key), tmp_path)
    assert nothing_left(tmp_path)


@pytest.mark.parametrize("method", ["SHA-224", "SHA-256", "SHA-384"])
def test_other_methods_use_their_own_hasher(
    tmp_path: Path,
    method: str,
    rsa_key: rsa.RSAPrivateKey,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spy = Spy(monkeypatch)
    image = image_for(rsa_key, method)
    result = fetch.fetch(node_client(serving(DATA)), image, certificate(rsa_key), tmp_path)
    assert result.path.read_bytes() == DATA
    assert spy.fed == len(DATA) and spy.digests == [None]
    # and a signature over other bytes is refused with these methods too
    (tmp_path / "img.qcow2").unlink()
    image["img_signature"] = sign(rsa_key, method, DATA[:-1])
    with pytest.raises(VerificationError, match="does not verify"):
        fetch.fetch(node_client(serving(DATA)), image, certificate(rsa_key), tmp_path)
    assert nothing_left(tmp_path)


def test_a_wrong_sha512_is_refused_before_the_signature(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    image = image_for(ec_key, "SHA-512")
    image["os_hash_value"] = hashlib.sha512(b"other").hexdigest()
    with pytest.raises(VerificationError, match="does not match os_hash_value"):
        fetch.fetch(node_client(serving(DATA)), image, certificate(ec_key), tmp_path)
    assert nothing_left(tmp_path)


def test_an_error_in_the_hash_thread_reaches_the_caller(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    update = fetch._Digests.update
    calls = []

    def failing(self: fetch._Digests, chunk: bytes) -> None:
        calls.append(len(chunk))
        if len(calls) == 3:
            raise RuntimeError("hasher broke")
        update(self, chunk)

    monkeypatch.setattr(fetch._Digests, "update", failing)
    with pytest.raises(RuntimeError, match="hasher broke"):
        fetch.fetch(
            node_client(serving(DATA)), image_for(ec_key, "SHA-512"), certificate(ec_key), tmp_path
        )
    assert not (tmp_path / "img.qcow2").exists()
    assert len(calls) == 3  # nothing hashed after the error


def test_more_bytes_than_declared_are_refused(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    image = image_for(ec_key, "SHA-512")
    store = serving(DATA + b"more")
    with pytest.raises(VerificationError, match="more bytes than its declared size"):
        fetch.fetch(node_client(store), image, certificate(ec_key), tmp_path)
    assert nothing_left(tmp_path)


def test_a_cut_stream_keeps_what_was_written_and_resumes(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    def cut(start: int) -> Iterator[bytes]:
        yield from chunks_of(DATA[start : 5 * SMALL])
        raise requests.exceptions.ChunkedEncodingError("connection reset")

    image, cert = image_for(ec_key, "SHA-512"), certificate(ec_key)
    with pytest.raises(ServiceUnavailableError, match=f"cut at {5 * SMALL} of"):
        fetch.fetch(node_client(Store(cut)), image, cert, tmp_path)
    assert (tmp_path / "img.partial").read_bytes() == DATA[: 5 * SMALL]
    assert not (tmp_path / "img.qcow2").exists()
    store = serving(DATA)
    result = fetch.fetch(node_client(store), image, cert, tmp_path)
    assert store.requests == [f"bytes={5 * SMALL}-"] and result.path.read_bytes() == DATA


def test_disk_full_is_a_state_error(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    write = fetch._Sink.write

    def full(self: fetch._Sink, chunk: bytes) -> None:
        if self._unsynced >= 3 * SMALL:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(self, chunk)

    monkeypatch.setattr(fetch._Sink, "write", full)
    with pytest.raises(StateError, match=f"disk full .*\\({3 * SMALL} of"):
        fetch.fetch(
            node_client(serving(DATA)), image_for(ec_key, "SHA-512"), certificate(ec_key), tmp_path
        )
    assert (tmp_path / "img.partial").stat().st_size == 3 * SMALL
    assert not (tmp_path / "img.qcow2").exists()


def test_the_image_is_written_out_while_it_downloads(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    monkeypatch.setattr(fetch, "WRITEBACK_EVERY", 4 * SMALL)
    monkeypatch.setattr(fetch.os, "fdatasync", lambda fd: synced.append(fd))
    result = fetch.fetch(
        node_client(serving(DATA)), image_for(ec_key, "SHA-512"), certificate(ec_key), tmp_path
    )
    assert result.path.read_bytes() == DATA
    assert synced  # several times before the final fsync


def test_a_background_fdatasync_error_reaches_the_caller(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fails(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fetch, "WRITEBACK_EVERY", 2 * SMALL)
    monkeypatch.setattr(fetch.os, "fdatasync", fails)
    with pytest.raises(StateError, match="disk full"):
        fetch.fetch(
            node_client(serving(DATA)), image_for(ec_key, "SHA-512"), certificate(ec_key), tmp_path
        )
    assert not (tmp_path / "img.qcow2").exists()


def test_the_reader_is_never_more_than_a_few_chunks_ahead_of_the_hash(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory stays flat: a slow hash holds the reads back instead of queueing the image."""
    read = 0
    ahead: list[int] = []
    update = fetch._Digests.update

    def counting(start: int) -> Iterator[bytes]:
        nonlocal read
        for chunk in chunks_of(DATA[start:]):
            read += 1
            yield chunk

    def slow(self: fetch._Digests, chunk: bytes) -> None:
        if not ahead:
            time.sleep(0.3)  # plenty of time to read all 16 chunks, were the queue unbounded
            ahead.append(read)
        update(self, chunk)

    monkeypatch.setattr(fetch._Digests, "update", slow)
    result = fetch.fetch(
        node_client(Store(counting)), image_for(ec_key, "SHA-512"), certificate(ec_key), tmp_path
    )
    assert result.path.read_bytes() == DATA
    # one chunk being hashed, QUEUE_DEPTH queued, one waiting in put(), one being read
    assert ahead[0] <= fetch.QUEUE_DEPTH + 3 < len(DATA) // SMALL


class _Refusing:
    """A Glance that refuses the download (an ACL or token being rewritten)."""

    def __init__(self, status: int) -> None:
        self.status_code = status
        self.closed = False
        self.headers: dict[str, str] = {}

    def get(self, *args: Any, **kwargs: Any) -> _Refusing:
        return self

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_download_is_access_denied_for_now_not_a_bad_image(
    status: int, tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    store = _Refusing(status)
    with pytest.raises(AuthError) as e:
        fetch.fetch(node_client(store), image_for(ec_key, "SHA-512"), certificate(ec_key), tmp_path)
    assert not isinstance(e.value, VerificationError) and store.closed
    assert nothing_left(tmp_path)
