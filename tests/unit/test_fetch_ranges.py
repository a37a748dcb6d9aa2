"""Resuming a download against stores that do and do not serve HTTP ranges.

Glance on Ceph RBD answers a Range request with 400; the file store with 206. The node
must converge on both: resume where it can, start from byte zero once where it cannot,
never loop on a 400 and never accept a partial image. A fake Glance session stands in for
the network (the real stores are exercised in tests/integration/test_ceph.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from provisioner.errors import ServiceUnavailableError
from provisioner.node import fetch
from provisioner.signing import StreamSigner
from tests.certs import self_signed
from tests.unit.fakes import node_client

pytestmark = pytest.mark.unit

DATA = bytes(range(256)) * 4096  # 1 MiB: one chunk


@pytest.mark.parametrize(
    ("status", "restarted", "action"),
    [
        (206, False, "append"),
        (200, False, "from_zero"),
        (400, False, "retry_from_zero"),
        (416, False, "retry_from_zero"),
        (400, True, "other"),  # never a second time: no loop on 400
        (416, True, "other"),
        (404, False, "other"),
        (503, False, "other"),
    ],
)
def test_range_action(status: int, restarted: bool, action: str) -> None:
    assert fetch.range_action(status, restarted) == action


class Response:
    def __init__(self, status: int, body: bytes) -> None:
        self.status_code = status
        self.body = body
        self.headers: dict[str, str] = {}

    def iter_content(self, chunk_size: int) -> Iterator[bytes]:
        for i in range(0, len(self.body), chunk_size):
            yield self.body[i : i + chunk_size]

    def close(self) -> None:
        pass


class Store:
    """Glance's download endpoint; ``ranges`` is what it answers to a Range request."""

    def __init__(self, data: bytes, ranges: str) -> None:
        self.data = data
        self.ranges = ranges  # "206", "400" (Ceph RBD), "200" (ignored), "always-400"
        self.requests: list[str] = []

    def get(self, path: str, headers: dict[str, str], **kwargs: Any) -> Response:
        rng = headers.get("Range", "")
        self.requests.append(rng or "full")
        if self.ranges == "always-400":
            return Response(400, b"")
        if not rng:
            return Response(200, self.data)
        start = int(rng.removeprefix("bytes=").rstrip("-"))
        if self.ranges == "206":
            return Response(206, self.data[start:])
        if self.ranges == "200":
            return Response(200, self.data)
        return Response(400, b"Getting images randomly from this store is not supported")


@pytest.fixture(scope="module")
def signed() -> tuple[x509.Certificate, dict[str, Any]]:
    key = ec.generate_private_key(ec.SECP384R1())
    cert = self_signed(key)
    signer = StreamSigner(key, "SHA-256")
    signer.update(DATA)
    image = {
        "id": "img",
        "size": len(DATA),
        "os_hash_value": hashlib.sha512(DATA).hexdigest(),
        "img_signature": signer.signature(),
        "img_signature_hash_method": "SHA-256",
        "img_signature_key_type": signer.key_type,
    }
    return cert, image


@pytest.fixture(autouse=True)
def _no_qemu_img(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch.qemuimg, "check_luks_qcow2", lambda path: None)


def cut_download(tmp: Path, keep: int) -> None:
    """What a download cut after ``keep`` bytes leaves behind."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "img.partial").write_bytes(DATA[:keep])


@pytest.mark.parametrize(
    ("ranges", "requests", "fetched", "restarted"),
    [
        ("206", ["bytes=300000-"], len(DATA) - 300000, False),  # file store: resumes
        ("400", ["bytes=300000-", "full"], len(DATA), True),  # Ceph RBD: once from zero
        ("200", ["bytes=300000-"], len(DATA), True),  # ignored: the 200 body is used
    ],
)
def test_cut_download_converges(
    tmp_path: Path,
    signed: tuple[x509.Certificate, dict[str, Any]],
    ranges: str,
    requests: list[str],
    fetched: int,
    restarted: bool,
) -> None:
    cert, image = signed
    cut_download(tmp_path, 300000)
    store = Store(DATA, ranges)
    result = fetch.fetch(node_client(store), image, cert, tmp_path)
    assert store.requests == requests
    assert result.bytes_fetched == fetched and result.restarted is restarted
    assert result.path.read_bytes() == DATA
    assert not (tmp_path / "img.partial").exists()


def test_a_store_that_always_answers_400_fails_after_one_retry(
    tmp_path: Path, signed: tuple[x509.Certificate, dict[str, Any]]
) -> None:
    cert, image = signed
    cut_download(tmp_path, 300000)
    store = Store(DATA, "always-400")
    with pytest.raises(ServiceUnavailableError, match="unexpected status 400"):
        fetch.fetch(node_client(store), image, cert, tmp_path)
    assert store.requests == ["bytes=300000-", "full"]
    assert not (tmp_path / "img.qcow2").exists()


def test_a_partial_image_is_never_accepted(
    tmp_path: Path, signed: tuple[x509.Certificate, dict[str, Any]]
) -> None:
    """A store that ends the body early (no error) leaves a .partial, not an image."""
    cert, image = signed
    store = Store(DATA[:500000], "400")
    with pytest.raises(ServiceUnavailableError, match="ended at 500000"):
        fetch.fetch(node_client(store), image, cert, tmp_path)
    assert not (tmp_path / "img.qcow2").exists()
    # the next run: Range refused with 400, from zero once, and now the whole image
    store.data = DATA
    result = fetch.fetch(node_client(store), image, cert, tmp_path)
    assert store.requests == ["full", "bytes=500000-", "full"]
    assert result.restarted and result.path.read_bytes() == DATA
