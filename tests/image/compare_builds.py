"""Compare two host image builds: what differs, file by file.

    python -m tests.image.compare_builds A.qcow2 B.qcow2 [--json OUT]

Run as root: each image is converted to raw, its partitions are attached read-only (partx)
and mounted read-only (boot and state: ext4; root: squashfs); the ESP is read with mtools.
For every file the content hash, mode, owner, mtime and link target are compared. The
images, and their root partitions, are compared byte for byte too, to say whether the build
is bit-identical or only file-identical. Used for the reproducibility figures in docs/host-image.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from provisioner.imagemanifest import sha256

# the partitions with files, by number in the layout, and their mount options: 1 is the
# ESP (read with mtools), 2 GRUB's BIOS boot partition, 5 slot a's dm-verity hash tree, 6
# and 7 slot b (empty in a built disk)
PARTS = {3: ("boot", "ro,noload"), 4: ("root", "ro"), 8: ("state", "ro,noload")}
VERITY_CFG = Path("EFI/edgepin/verity-a.cfg")  # on the ESP: slot a's root hash


def run(args: list[str]) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p), st.st_uid, st.st_gid)
            elif p.is_file():
                h = hashlib.sha256(p.read_bytes()).hexdigest()
                out[rel] = ("file", h, oct(st.st_mode), st.st_uid, st.st_gid, int(st.st_mtime))
            elif p.is_dir():
                out[rel] = ("dir", oct(st.st_mode), st.st_uid, st.st_gid, int(st.st_mtime))
            else:
                out[rel] = ("other", oct(st.st_mode))
    return out


def esp_files(raw_part: str, into: Path) -> dict[str, tuple[object, ...]]:
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mcopy", "-s", "-n", "-i", raw_part, "::/", str(into)], check=False)
    return {k: v[:2] for k, v in tree(into).items()}  # FAT keeps no owners; times vary


@contextlib.contextmanager
def attached(image: Path, work: Path) -> Iterator[dict[str, dict[str, tuple[object, ...]]]]:
    raw = work / "disk.raw"
    run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)])
    loop = run(["losetup", "--find", "--show", "--read-only", str(raw)]).strip()
    mounts: list[Path] = []
    try:
        subprocess.run(["partx", "-d", loop], check=False, capture_output=True)
        run(["partx", "-a", loop])
        result = {}
        for num, (name, options) in PARTS.items():
            mnt = work / name
            mnt.mkdir()
            run(["mount", "-o", options, f"{loop}p{num}", str(mnt)])
            mounts.append(mnt)
            result[name] = tree(mnt)
        result["esp"] = esp_files(f"{loop}p1", work / "esp")
        yield result
    finally:
        for mnt in mounts:
            subprocess.run(["umount", str(mnt)], check=False)
        subprocess.run(["partx", "-d", loop], check=False, capture_output=True)
        subprocess.run(["losetup", "-d", loop], check=False)


def partition_sha256(raw: Path, name: str = "root-a") -> str:
    table = json.loads(run(["sfdisk", "--json", str(raw)]))["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    part = next(p for p in table["partitions"] if p.get("name") == name)
    h = hashlib.sha256()
    with raw.open("rb") as f:
        f.seek(int(part["start"]) * sector)
        left = int(part["size"]) * sector
        while left:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def root_hash(cfg: Path) -> str | None:
    if not cfg.is_file():
        return None
    for line in cfg.read_text().splitlines():
        if line.startswith("set edgepin_roothash="):
            return line.split("=", 1)[1]
    return None


def compare(a: Path, b: Path) -> dict[str, object]:
    report: dict[str, object] = {"qcow2_identical": sha256(a) == sha256(b)}
    with tempfile.TemporaryDirectory(prefix="edgepin-cmp-") as tmp:
        (Path(tmp) / "a").mkdir()
        (Path(tmp) / "b").mkdir()
        with attached(a, Path(tmp) / "a") as ta, attached(b, Path(tmp) / "b") as tb:
            report["raw_identical"] = sha256(Path(tmp) / "a" / "disk.raw") == sha256(
                Path(tmp) / "b" / "disk.raw"
            )
            # the root partition byte for byte (the squashfs, zeros after it)
            report["root_partition_identical"] = partition_sha256(
                Path(tmp) / "a" / "disk.raw"
            ) == partition_sha256(Path(tmp) / "b" / "disk.raw")
            # the root hash covers every byte of the root partition, metadata included
            report["verity_root_hash"] = [
                root_hash(Path(tmp) / side / "esp" / VERITY_CFG) for side in ("a", "b")
            ]
            for part in ta:
                fa, fb = ta[part], tb[part]
                differ = sorted(k for k in fa.keys() & fb.keys() if fa[k] != fb[k])
                report[part] = {
                    "files": len(fa),
                    "only_in_a": sorted(fa.keys() - fb.keys()),
                    "only_in_b": sorted(fb.keys() - fa.keys()),
                    "differ": [
                        {"path": k, "a": list(map(str, fa[k])), "b": list(map(str, fb[k]))}
                        for k in differ
                    ],
                }
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--json", type=Path, help="write the full report here")
    args = p.parse_args(argv)
    report = compare(args.a, args.b)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"qcow2 identical: {report['qcow2_identical']}; raw identical: {report['raw_identical']}; "
        f"root partition identical: {report['root_partition_identical']}"
    )
    hashes = report["verity_root_hash"]
    assert isinstance(hashes, list)
    print(f"verity root hash: {'equal' if hashes[0] == hashes[1] else 'differs'}: {hashes}")
    for part in ("boot", "root", "state", "esp"):
        r = report[part]
        assert isinstance(r, dict)
        print(
            f"{part}: {r['files']} entries, {len(r['differ'])} differ, "
            f"{len(r['only_in_a'])} only in A, {len(r['only_in_b'])} only in B"
        )
        for d in r["differ"][:15]:
            print(f"    {d['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
