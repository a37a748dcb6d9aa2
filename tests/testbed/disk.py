"""A node's disk as someone who took it out of the machine sees it: read and write its state
and boot partitions offline, without booting it and without mounting anything (debugfs on
a loop device over a raw copy), repack its squashfs root, and scan every byte of it.
"""

from __future__ import annotations

import json
import mmap
import re
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

STATE_PARTITION = "state"  # its GPT name in elements/edgepin-readonly/block-device-default.yaml


def _run(args: list[str]) -> str:
    r = subprocess.run(args, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{args[0]} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def to_raw(disk: Path, raw: Path) -> None:
    _run(["qemu-img", "convert", "-O", "raw", str(disk), str(raw)])


def partition(raw: Path, name: str = STATE_PARTITION) -> tuple[int, int]:
    """Byte offset and size of the GPT partition called ``name``."""
    table = json.loads(_run(["sfdisk", "--json", str(raw)]))["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    for part in table["partitions"]:
        if part.get("name") == name:
            return int(part["start"]) * sector, int(part["size"]) * sector
    raise RuntimeError(f"no partition named {name!r} in {raw}")


@contextmanager
def loop(raw: Path, offset: int, size: int) -> Iterator[str]:
    """A loop device over the partition of a raw copy, its ext4 journal replayed first: a
    node that lost power leaves recent changes in the journal only, where debugfs would not
    see them (and a later replay at boot would undo an edit made beside them)."""
    dev = _run(
        ["losetup", "--find", "--show", "-o", str(offset), "--sizelimit", str(size), str(raw)]
    ).strip()
    try:
        fsck = subprocess.run(["e2fsck", "-f", "-y", dev], capture_output=True, text=True)
        if fsck.returncode > 2:  # 1 and 2: errors corrected (a replayed journal among them)
            raise RuntimeError(f"e2fsck {dev} ({fsck.returncode}): {fsck.stdout[-500:]}")
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def write_state_files(
    disk: Path, files: Mapping[str, bytes], work: Path, name: str = STATE_PARTITION
) -> None:
    """Write ``files`` (paths inside partition ``name``, e.g. ``lib/edgepin/node.json`` in
    the state partition) into the powered-off node's disk, replacing what is there."""
    raw = work / "offline-edit.raw"
    to_raw(disk, raw)
    try:
        with loop(raw, *partition(raw, name)) as dev, tempfile.TemporaryDirectory() as tmp:
            for n, (path, data) in enumerate(files.items()):
                local = Path(tmp) / str(n)
                local.write_bytes(data)
                target = "/" + path.strip("/")
                parent = ""
                for part in target.strip("/").split("/")[:-1]:
                    parent += "/" + part
                    subprocess.run(
                        ["debugfs", "-w", "-R", f"mkdir {parent}", dev],
                        capture_output=True,
                        check=False,
                    )
                subprocess.run(
                    ["debugfs", "-w", "-R", f"rm {target}", dev], capture_output=True, check=False
                )
                out = _run(["debugfs", "-w", "-R", f"write {local} {target}", dev])
                got = subprocess.run(
                    ["debugfs", "-R", f"cat {target}", dev], capture_output=True, check=False
                ).stdout
                if got != data:
                    raise RuntimeError(f"debugfs did not write {target}: {out}")
        _run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(disk)])
    finally:
        raw.unlink(missing_ok=True)


def read_state_file(disk: Path, path: str, work: Path, name: str = STATE_PARTITION) -> bytes | None:
    raw = work / "offline-read.raw"
    to_raw(disk, raw)
    try:
        with loop(raw, *partition(raw, name)) as dev:
            r = subprocess.run(
                ["debugfs", "-R", f"cat /{path.strip('/')}", dev], capture_output=True, check=False
            )
            return r.stdout if r.returncode == 0 and r.stdout else None
    finally:
        raw.unlink(missing_ok=True)


def scan(
    disk: Path, needles: Mapping[str, bytes], work: Path, name: str = STATE_PARTITION
) -> list[str]:
    """The names of the needles found anywhere in the bytes of partition ``name``: files,
    free space, deleted files and the journal of its filesystem."""
    raw = work / "scan.raw"
    to_raw(disk, raw)
    try:
        offset, size = partition(raw, name)
        rx = re.compile(b"|".join(re.escape(n) for n in needles.values()))
        by_value = {v: k for k, v in needles.items()}
        found: set[str] = set()
        with raw.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            for hit in rx.finditer(m, offset, offset + size):
                found.add(by_value[hit.group(0)])
        return sorted(found)
    finally:
        raw.unlink(missing_ok=True)


def edit_in_place(
    disk: Path, path: str, old: bytes, new: bytes, work: Path, name: str = "boot"
) -> int:
    """Replace ``old`` by ``new`` (the same length) in the data blocks of file ``path`` on
    partition ``name``, as someone who writes the powered-off disk with dd would: no inode,
    bitmap, journal or superblock is touched and the filesystem is never opened for
    writing, so only that file's blocks differ. Returns how many were replaced."""
    if len(old) != len(new):
        raise ValueError("an in-place edit keeps the length")
    raw = work / "offline-inplace.raw"
    to_raw(disk, raw)
    try:
        offset, size = partition(raw, name)
        dev = _run(
            [
                "losetup",
                "--find",
                "--show",
                "--read-only",
                "-o",
                str(offset),
                "--sizelimit",
                str(size),
                str(raw),
            ]
        ).strip()
        try:
            target = "/" + path.strip("/")
            content = subprocess.run(
                ["debugfs", "-R", f"cat {target}", dev], capture_output=True, check=True
            ).stdout
            blocks = [int(b) for b in _run(["debugfs", "-R", f"blocks {target}", dev]).split()]
            super_stats = _run(["debugfs", "-R", "stats -h", dev])
        finally:
            subprocess.run(["losetup", "-d", dev], check=False)
        m = re.search(r"Block size:\s+(\d+)", super_stats)
        if not content or not blocks or m is None:
            raise RuntimeError(f"debugfs found no {target} on partition {name}")
        block_size = int(m.group(1))
        hits = [h.start() for h in re.finditer(re.escape(old), content)]
        with raw.open("r+b") as f:
            for start in hits:
                for i in range(len(old)):
                    pos = start + i
                    f.seek(offset + blocks[pos // block_size] * block_size + pos % block_size)
                    f.write(new[i : i + 1])
        _run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(disk)])
        return len(hits)
    finally:
        raw.unlink(missing_ok=True)


def repack_root(disk: Path, path: str, old: bytes, new: bytes, work: Path) -> int:
    """Replace ``old`` by ``new`` in file ``path`` of the squashfs on the root partition,
    as someone with the powered-off disk and squashfs-tools would: unpack the root, edit
    the file, pack the tree again (uncompressed, which the kernel mounts as well) and write
    it over the partition. Returns how many were replaced."""
    raw = work / "offline-root.raw"
    tree = work / "offline-root"
    packed = work / "offline-root.squashfs"
    to_raw(disk, raw)
    try:
        offset, size = partition(raw, "root-a")
        unpack = ["unsquashfs", "-quiet", "-no-progress", "-no-xattrs", "-o", str(offset)]
        _run([*unpack, "-d", str(tree), str(raw)])
        target = tree / path.strip("/")
        content = target.read_bytes()
        hits = content.count(old)
        target.write_bytes(content.replace(old, new))
        uncompressed = ["-noI", "-noD", "-noF", "-noX"]
        _run(["mksquashfs", str(tree), str(packed), "-noappend", "-no-progress", *uncompressed])
        if packed.stat().st_size > size:
            raise RuntimeError(f"the repacked root ({packed.stat().st_size} bytes) does not fit")
        with raw.open("r+b") as out, packed.open("rb") as src:
            out.seek(offset)
            while chunk := src.read(1 << 20):
                out.write(chunk)
        _run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(disk)])
        return hits
    finally:
        raw.unlink(missing_ok=True)
        packed.unlink(missing_ok=True)
        subprocess.run(["rm", "-rf", str(tree)], check=False)


def esp_file(raw: Path, path: str) -> bytes:
    """A file on the ESP (partition ``ESP``, vfat) of a raw disk, read with mtools."""
    offset, _ = partition(raw, "ESP")
    r = subprocess.run(
        ["mtype", "-i", f"{raw}@@{offset}", f"::/{path.strip('/')}"],
        capture_output=True,
        env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"},
        check=False,
    )
    if r.returncode != 0:
        raise RuntimeError(f"mtype {path} on the ESP: {r.stderr.decode(errors='replace')}")
    return r.stdout


def write_esp_file(disk: Path, path: str, data: bytes | None, work: Path) -> None:
    """Replace (or, with ``data`` None, remove) a file on the ESP of a powered-off disk,
    with mtools: the FAT filesystem is never mounted."""
    raw = work / "offline-esp.raw"
    to_raw(disk, raw)
    try:
        offset, _ = partition(raw, "ESP")
        env = {"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"}
        target = f"::/{path.strip('/')}"
        image = f"{raw}@@{offset}"
        if data is None:
            subprocess.run(["mdel", "-i", image, target], env=env, check=True, capture_output=True)
        else:
            with tempfile.NamedTemporaryFile() as f:
                f.write(data)
                f.flush()
                subprocess.run(
                    ["mcopy", "-o", "-i", image, f.name, target],
                    env=env,
                    check=True,
                    capture_output=True,
                )
        _run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(disk)])
    finally:
        raw.unlink(missing_ok=True)


def esp_file_of(disk: Path, path: str, work: Path) -> bytes:
    """A file on the ESP of a powered-off disk (qcow2 or raw)."""
    raw = work / "offline-esp-read.raw"
    to_raw(disk, raw)
    try:
        return esp_file(raw, path)
    finally:
        raw.unlink(missing_ok=True)


def usb_stick(path: Path, label: str, folders: list[Path]) -> Path:
    """A raw FAT32 filesystem image labelled ``label`` holding ``folders`` (each copied
    whole to its root): what a person writes to a USB stick, here for a QEMU drive."""
    content = sum(f.stat().st_size for d in folders for f in d.rglob("*") if f.is_file())
    # FAT32 wants at least 33 MiB; room for the FATs and the clusters' slack
    kib = max(64 * 1024, (content * 5 // 4) // 1024 + 16 * 1024)
    path.unlink(missing_ok=True)
    _run(["mkfs.vfat", "-C", "-F", "32", "-n", label, str(path), str(kib)])
    for folder in folders:
        _run(["mcopy", "-s", "-i", str(path), str(folder), "::"])
    return path
