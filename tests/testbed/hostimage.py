"""The host image the image tier and the demo boot: built by ``./build.sh image`` with the
settings a QEMU-booted node under test needs, and rebuilt only when what it is made of
changed; the test-only signing key it pins; how such a node is enrolled."""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from provisioner.operator import release, signingcert


class HostImageError(RuntimeError):
    """``./build.sh image`` failed; the message holds its output's end."""


REPO = Path(__file__).resolve().parents[2]
# build.sh squashes and seals the root and writes the host update; docs/node.md is in the
# image (/usr/share/edgepin/node.md)
IMAGE_INPUTS = ("elements", "provisioner", "pyproject.toml", "build.sh", "docs/node.md")
# one build at a time on this machine, whichever test session asks (./build.sh's work
# folder, .cache/image, is one for all of them)
BUILD_LOCK = REPO / ".cache" / "image-build.lock"


def inputs_digest(extra: list[str]) -> str:
    """What the image is built from: tracked files of the elements and the provisioner."""
    h = hashlib.sha256()
    files = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", *IMAGE_INPUTS],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in sorted(files):
        path = REPO / name
        if path.is_file():
            h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(" ".join(extra).encode())
    return h.hexdigest()


def is_current(out: Path, args: list[str]) -> bool:
    """Whether ``out`` holds an image built from the current inputs with these arguments."""
    stamp = out / "edgepin-host.inputs"
    return (out / "edgepin-host.qcow2").exists() and (
        stamp.exists() and stamp.read_text() == inputs_digest(args)
    )


def build_image(out: Path, args: list[str]) -> Path:
    """Build (or reuse, when nothing it is made of changed) the host image in ``out``; one
    build at a time (:data:`BUILD_LOCK`)."""
    BUILD_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with BUILD_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_image(out, args)


def _build_image(out: Path, args: list[str]) -> Path:
    image = out / "edgepin-host.qcow2"
    stamp = out / "edgepin-host.inputs"
    want = inputs_digest(args)
    if is_current(out, args):
        stamp.touch()  # current as of now (./build.sh test waits for a fresh stamp)
        return image
    stamp.unlink(missing_ok=True)
    # a cache: the old image goes (diskimage-builder would keep it under a dated name, and
    # a raw a failed build left behind too)
    for old in [image, *out.glob("edgepin-host-*.qcow2"), *out.glob("edgepin-host*.raw")]:
        old.unlink(missing_ok=True)
    r = subprocess.run(
        [str(REPO / "build.sh"), "image", "--out", str(out), *args],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        log = out / "edgepin-host.log"
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:]) if log.exists() else ""
        raise HostImageError(
            f"./build.sh image failed:\n{r.stderr[-3000:]}\n--- build log tail ---\n{tail}"
        )
    stamp.write_text(want)
    return image


@dataclass
class ImageSigner:
    """A test-only image-signing key, pinned in the test image, kept between runs.

    Test-bed material like the test bed's own CA key: it lives under .cache with mode 0600
    and signs only test guests. Each run stores it in that run's Barbican.
    """

    key_pem: bytes
    cert_pem: bytes
    cert_path: Path
    # the test-only release key (``edgepin release key``): the image pins its public half,
    # the image tier approves boot chains with the private one
    release_key: Path
    release_public: Path


def image_signer_material(cache: Path) -> ImageSigner:
    d = cache / "image-tier"
    d.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = d / "signing-key.pem", d / "signing-cert.pem"
    if not (key_path.exists() and cert_path.exists()):
        key, cert = signingcert.generate("edgepin image-tier tests", "RSA-PSS", 3650)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    release_key, release_public = d / "release-key.pem", d / "release-public.pem"
    if not (release_key.exists() and release_public.exists()):
        release_key.unlink(missing_ok=True)
        release_public.unlink(missing_ok=True)
        release.create_key(release_key, release_public)
    return ImageSigner(
        key_path.read_bytes(), cert_path.read_bytes(), cert_path, release_key, release_public
    )


# the test image seals to the default selection plus PCR 0 (the firmware), so that a boot
# with other firmware shows a refusal too
IMAGE_PCRS = "0,4,7,8,9"


def qemu_node_enroll_args(name: str, tpm: Path, values: Path, seed: Path) -> list[str]:
    """`edgepin enroll` for a QEMU-booted node of the test image: its EK certificate and CA
    (``tpm`` is the folder holding ek.pem and ek-ca.pem), the image's PCRs with ``values``,
    and the catalog's internal interface (how QEMU's user networking shows the host)."""
    return [
        "enroll",
        name,
        "--ek-cert",
        str(tpm / "ek.pem"),
        "--ek-ca",
        str(tpm / "ek-ca.pem"),
        "--node-interface",
        "internal",
        "--pcrs",
        IMAGE_PCRS,
        "--pcr-values",
        str(values),
        "--seed-out",
        str(seed),
    ]


# the test image: the real build, with settings a QEMU-booted node under test needs
def image_args(material: ImageSigner) -> list[str]:
    return [
        "--signing-cert",
        str(material.cert_path),
        "--virt-type",
        "qemu",
        "--pcrs",
        IMAGE_PCRS,
        "--release-key",
        str(material.release_public),
        "--reconcile-interval",
        "20s",
        "--reconcile-delay",
        # short: every wait for a reconcile in the node tier costs the timer's delay
        "10s",
        # the nested guest runs in software emulation inside software emulation: its
        # kernel took 700 s to reach the marker with the other tiers running beside
        "--health-timeout",
        "1500",
        # the unit that runs test_host_image's check script (never in a node's image)
        "--qa-check",
    ]
