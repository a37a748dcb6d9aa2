"""5c. Reading the root: what the root squashfs's compression costs a boot.

A boot reads a few thousand of the root's files (Python's imports, libraries, units) in
no order the filesystem chose. This section reads every file of the built image's root
in a fixed random order, on a fresh mount with the page cache dropped, and counts the
kernel CPU time the reads take (``cat``'s system time: decompression happens in the
kernel), for three squashfs images of the same files:

- the image's own (zstd, 128 KiB blocks, no fragments: ``squash-root``);
- the same with fragments (mksquashfs's default: the tails of small files packed
  together, so that reading one small file decompresses a block of several);
- uncompressed and without fragments, the baseline (no decompression at all).

Under software emulation (the QA tier's boots) every kernel CPU second is many, so the
ratios matter, not the seconds. Needs root (loop mounts) and squashfs-tools; reads
``out/edgepin-host.qcow2`` and never builds it.
"""

from __future__ import annotations

import os
import random
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import stats
from benchmarks.bed import MIB
from benchmarks.report import Row

REPO = Path(__file__).resolve().parent.parent
GPT_PARTITION = REPO / "elements" / "edgepin-readonly" / "gpt-partition"
SEED = 16  # the same order in every run
COMMON = ["-noappend", "-no-progress", "-quiet", "-no-exports", "-xattrs"]
VARIANTS = {
    "zstd, 128 KiB, with fragments": ["-comp", "zstd", "-Xcompression-level", "15", "-b", "128K"],
    "uncompressed": ["-noI", "-noD", "-noF", "-noX", "-no-fragments"],
}


def _run(args: list[str]) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


def _read_all(mountpoint: Path, files: list[str]) -> tuple[float, float]:
    """Kernel and wall seconds to read ``files`` under a fresh mount, page cache dropped."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    for i in range(0, len(files), 500):
        subprocess.run(
            ["cat", *files[i : i + 500]],
            cwd=mountpoint,
            stdout=subprocess.DEVNULL,
            check=True,
        )
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_stime - before.ru_stime, wall


def _measure(image: Path, offset: int, mnt: Path, files: list[str]) -> tuple[float, float]:
    subprocess.run(
        ["mount", "-t", "squashfs", "-o", f"ro,loop,offset={offset}", str(image), str(mnt)],
        check=True,
    )
    try:
        return _read_all(mnt, files)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def bench(out_dir: Path, work: Path, log: Any) -> dict[str, Any]:
    qcow2 = out_dir / "edgepin-host.qcow2"
    if not qcow2.exists():
        return {"skipped": "out/edgepin-host.qcow2 is not built (./build.sh image)"}
    if os.geteuid() != 0 or not shutil.which("mksquashfs"):
        return {"skipped": "needs root (loop mounts) and squashfs-tools"}
    work.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="rootread-", dir=work))
    try:
        raw = tmp / "disk.raw"
        log("root read: converting the image to raw")
        _run(["qemu-img", "convert", "-O", "raw", str(qcow2), str(raw)])
        offset = int(_run([str(GPT_PARTITION), str(raw), "root-a"]).split()[0])
        tree, mnt = tmp / "tree", tmp / "mnt"
        tree.mkdir()
        mnt.mkdir()
        subprocess.run(
            ["mount", "-t", "squashfs", "-o", f"ro,loop,offset={offset}", str(raw), str(tree)],
            check=True,
        )
        try:
            files = sorted(
                str(p.relative_to(tree))
                for p in tree.rglob("*")
                if p.is_file() and not p.is_symlink()
            )
            random.Random(SEED).shuffle(files)  # noqa: S311 (an order, not a secret)
            result: dict[str, Any] = {"files": len(files), "variants": {}}
            size = int(
                _run(["unsquashfs", "-s", "-o", str(offset), str(raw)])
                .split("Filesystem size ")[1]
                .split()[0]
            )
            log(f"root read: the image's own squashfs, {len(files)} files in random order")
            cpu, wall = _measure(raw, offset, mnt, files)
            result["variants"]["the image's (zstd, 128 KiB, no fragments)"] = {
                "bytes": size,
                "kernel_s": cpu,
                "wall_s": wall,
            }
            for name, opts in VARIANTS.items():
                path = tmp / "variant.squashfs"
                log(f"root read: making a squashfs {name}")
                _run(["mksquashfs", str(tree), str(path), *COMMON, *opts])
                log(f"root read: reading it, {name}")
                cpu, wall = _measure(path, 0, mnt, files)
                result["variants"][name] = {
                    "bytes": path.stat().st_size,
                    "kernel_s": cpu,
                    "wall_s": wall,
                }
                path.unlink()
            return result
        finally:
            subprocess.run(["umount", str(tree)], check=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def rows(res: dict[str, Any]) -> list[Row]:
    if "skipped" in res:
        return [Row("rootread", "reading the root: skipped", None, "", goal=res["skipped"])]
    base = res["variants"]["uncompressed"]
    out = []
    for name, v in res["variants"].items():
        out.append(
            Row(
                "rootread",
                f"read {res['files']:,} files at random: {name}",
                v["kernel_s"],
                "s CPU",
                "uncompressed",
                base["kernel_s"],
                stats.ratio(v["kernel_s"], base["kernel_s"]),
            )
        )
    for name, v in res["variants"].items():
        out.append(
            Row(
                "rootread",
                f"squashfs size: {name}",
                v["bytes"] / MIB,
                "MiB",
                "uncompressed",
                base["bytes"] / MIB,
                stats.ratio(v["bytes"], base["bytes"]),
            )
        )
    return out
