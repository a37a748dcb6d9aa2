"""A newer host release made from a built one, for the image tier's host update: the same
Debian packages and edgepin, with a greater host version (and, if asked, another epoch).

The build's root (``root.squashfs`` of its host update) is unpacked, its
``/etc/edgepin/edgepin.conf`` given the new ``EDGEPIN_HOST_VERSION`` (and
``EDGEPIN_HOST_EPOCH``), packed again with the
build's squashfs options, sealed with ``veritysetup format`` as seal-verity seals it, and
written with the kernel, the initramfs and the build's ``grub.cfg`` (read from the built
disk's boot partition by the build's own ``boot-files``) by
:func:`provisioner.hostupdate.write`, as ``./build.sh image`` writes its host update. What
a later build would bring, without a second build.
"""

from __future__ import annotations

import os
import re
import subprocess
import tarfile
from pathlib import Path

from provisioner import hostupdate
from tests.testbed import disk

ROOT = Path(__file__).resolve().parents[2]
BLOCK = 4096


def _run(args: list[str]) -> str:
    r = subprocess.run(args, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{args[0]} failed ({r.returncode}): {r.stderr[-2000:]}")
    return r.stdout


def newer_release(
    update: Path, image: Path, version: int, work: Path, epoch: int | None = None
) -> Path:
    """The host release of the build that wrote ``update`` and ``image`` (its qcow2), with
    host version ``version`` (and host epoch ``epoch``); written in ``work``."""
    built = hostupdate.read(update)
    if version <= built.host_version:
        raise ValueError(f"{version} is not newer than the build's {built.host_version}")
    work.mkdir(parents=True, exist_ok=True)
    tree, squashfs = work / "root", work / "root.squashfs"
    with tarfile.open(update) as tar:
        member = tar.extractfile(hostupdate.ROOT)
        assert member is not None
        with squashfs.open("wb") as f:
            while chunk := member.read(1 << 20):
                f.write(chunk)
    _run(["rm", "-rf", str(tree)])
    _run(["unsquashfs", "-quiet", "-no-progress", "-d", str(tree), str(squashfs)])
    conf = tree / "etc/edgepin/edgepin.conf"
    text, n = re.subn(
        r"^EDGEPIN_HOST_VERSION=\d+$",
        f"EDGEPIN_HOST_VERSION={version}",
        conf.read_text(),
        flags=re.MULTILINE,
    )
    if n != 1:
        raise RuntimeError(f"{conf} has no EDGEPIN_HOST_VERSION line")
    if epoch is not None:
        text, n = re.subn(
            r"^EDGEPIN_HOST_EPOCH=\d+$", f"EDGEPIN_HOST_EPOCH={epoch}", text, flags=re.MULTILINE
        )
        if n != 1:
            raise RuntimeError(f"{conf} has no EDGEPIN_HOST_EPOCH line")
    conf.write_text(text)
    squashfs.unlink()
    _run(
        [
            "mksquashfs",
            str(tree),
            str(squashfs),
            "-noappend",
            "-no-progress",
            "-quiet",
            *("-comp", "zstd", "-Xcompression-level", "3", "-b", "128K"),
            *("-no-fragments", "-no-exports", "-xattrs"),
        ]
    )
    _run(["rm", "-rf", str(tree)])
    root_bytes = squashfs.stat().st_size
    data_bytes = built.verity.data_bytes
    if root_bytes > data_bytes:
        raise RuntimeError(f"the new root ({root_bytes} bytes) does not fit the partition")
    raw, boot = work / "disk.raw", work / "boot"
    disk.to_raw(image, raw)
    try:
        _, verity_size = disk.partition(raw, "verity-a")
        boot.mkdir(exist_ok=True)
        kver = _run([str(ROOT / "elements/edgepin-readonly/boot-files"), str(raw), str(boot)])
    finally:
        raw.unlink(missing_ok=True)
    # the slot as a node's partitions hold it: the root, zeros up to the size the hash
    # tree covers, then the verity partition
    data, tree_file = work / "root.part", work / "verity.part"
    os.replace(squashfs, data)
    os.truncate(data, data_bytes)
    with tree_file.open("wb") as f:
        f.truncate(verity_size)
    said = _run(
        [
            "veritysetup",
            "format",
            str(data),
            str(tree_file),
            "--format=1",
            "--hash=sha256",
            "--data-block-size=4096",
            "--hash-block-size=4096",
            f"--salt={built.verity.salt}",
        ]
    )
    m = re.search(r"^Root hash:\s*([0-9a-f]{64})$", said, re.MULTILINE)
    if m is None:
        raise RuntimeError(f"veritysetup format said no root hash: {said}")
    with data.open("ab") as f, tree_file.open("rb") as t:
        while chunk := t.read(1 << 20):
            f.write(chunk)
    tree_file.unlink()
    out = work / f"{built.name}-{version}.update.tar"
    try:
        hostupdate.write(
            out,
            raw=data,
            boot_dir=boot,
            root_part=(0, data_bytes),
            root_bytes=root_bytes,
            verity_part=(data_bytes, verity_size),
            name=built.name,
            host_version=version,
            kernel_version=kver.strip(),
            root_hash=m.group(1),
            epoch=int(os.environ.get("SOURCE_DATE_EPOCH", "0")),
        )
    finally:
        data.unlink(missing_ok=True)
        _run(["rm", "-rf", str(boot)])
    return out
