"""An air-gapped bundle on removable media, as the node reads it (``edgepin node import``).

The medium is untrusted: anyone can write a stick. This module only finds the node's
bundle folder, reads its manifest (bounded, parsed by :mod:`provisioner.airgap`) and opens
its two files as regular files (no symlink, no device, no FIFO); every check of what they
hold is the online one. :class:`Carried` is the bundle as an image source for
:meth:`provisioner.node.reconcile.Run.stage`, in place of Glance and Barbican: the image's
properties from the manifest, its bytes copied from the medium and verified while they
are written (:func:`provisioner.node.fetch.copy`), its key unwrapped by this TPM
(:func:`provisioner.node.keys.seal_carried`).
"""

from __future__ import annotations

import fcntl
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from provisioner import airgap
from provisioner.errors import BundleError, NotFoundError, UsageError, VerificationError
from provisioner.node import fetch, keys
from provisioner.node.config import NodeConfig

MAX_LISTED = 256  # folders looked at on a medium


def open_regular(path: Path, what: str) -> int:
    """A read-only descriptor of ``path`` if it is a regular file (not through a symlink)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BundleError(f"the bundle in {path.parent} has no {what}: refused") from None
    except OSError as e:
        raise BundleError(
            f"the bundle's {what} cannot be opened ({e.strerror or type(e).__name__}): refused"
        ) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BundleError(f"the bundle's {what} is not a regular file: refused")
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
    return fd


def _is_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def find(path: Path, node_id: str) -> Path:
    """The node's bundle folder: ``path`` itself when it holds a manifest, else the folder
    ``edgepin-<node>`` in it (a medium can carry the bundles of a whole site)."""
    if not _is_dir(path):
        raise UsageError(f"{path} is not a folder", hint="give the folder a medium is mounted on")
    if os.path.lexists(path / airgap.MANIFEST):
        return path
    own = path / airgap.folder_name(node_id)
    if _is_dir(own):
        return own
    others: list[str] = []
    try:
        with os.scandir(path) as entries:
            for n, entry in enumerate(entries):
                if n >= MAX_LISTED:
                    break
                if entry.name.startswith(airgap.DIR_PREFIX) and entry.is_dir(follow_symlinks=False):
                    others.append(entry.name.removeprefix(airgap.DIR_PREFIX))
    except OSError:
        pass
    held = "".join(c for c in ", ".join(sorted(others)[:8]) if c.isprintable())
    raise NotFoundError(
        f"no bundle for node {node_id} in {path}"
        + (f" (it holds bundles for {held})" if held else ""),
        hint=f"make one with `edgepin bundle {node_id} --out DIR` and copy "
        f"{airgap.folder_name(node_id)}/ to the medium",
    )


@dataclass(frozen=True)
class Carried:
    """A node's bundle, read and parsed; an image source like Glance and Barbican."""

    folder: Path
    manifest: airgap.Manifest
    resumable = False  # nothing to resume: a copy that fails is started again whole

    @classmethod
    def read(cls, path: Path, node_id: str) -> Carried:
        folder = find(path, node_id)
        fd = open_regular(folder / airgap.MANIFEST, airgap.MANIFEST)
        with os.fdopen(fd, "rb") as f:
            try:
                data = f.read(airgap.MAX_MANIFEST + 1)
            except OSError as e:
                raise BundleError(
                    f"the bundle's manifest cannot be read ({e.strerror}): refused"
                ) from None
        manifest = airgap.parse(data)
        if manifest.node != node_id:
            raise VerificationError(
                f"the bundle in {folder} was made for node {manifest.node}, not for this "
                f"node ({node_id}): refused",
                made_for=manifest.node,
            )
        return cls(folder, manifest)

    # ------------------------------------------------- what Run.stage asks of a source
    def image(self, image_id: str) -> dict[str, Any]:
        carried = self.manifest.image
        if carried.image_id != image_id:
            raise BundleError(
                f"the bundle carries image {carried.image_id}, its signed assignment names "
                f"{image_id}: refused",
                image_id=image_id,
            )
        return carried.as_glance()

    def certificate(self, secret_id: str) -> bytes:
        raise VerificationError(
            "the bundle's image names no pinned signing certificate "
            "(edgepin_signing_cert_sha256), and offline no other can be fetched: refused"
        )

    def fetch(
        self, image: dict[str, Any], certificate: x509.Certificate, images_dir: Path
    ) -> fetch.FetchResult:
        fd = open_regular(self.folder / airgap.IMAGE_FILE, airgap.IMAGE_FILE)
        with os.fdopen(fd, "rb") as f:
            held, size = os.fstat(f.fileno()).st_size, int(image["size"])
            if held != size:
                cut = "truncated" if held < size else "longer than the image it names"
                raise BundleError(
                    f"the bundle's {airgap.IMAGE_FILE} holds {held} bytes, its manifest "
                    f"says {size}: {cut}, refused",
                    image_id=image["id"],
                    held=held,
                    size=size,
                )
            return fetch.copy(f, image, certificate, images_dir)

    def seal_key(self, cfg: NodeConfig, image: dict[str, Any], known: str | None) -> str:
        image_id = str(image["id"])
        return keys.seal_carried(
            cfg, image_id, self.manifest.key.blob, known, cfg.images_dir / f"{image_id}.qcow2"
        )
