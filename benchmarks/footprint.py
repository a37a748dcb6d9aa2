"""5. Footprint: the host image's size against the installed size of its packages.

The image is built by ``./build.sh image`` (never by the benchmarks: two image builds at
once would overload a small machine). Without ``out/edgepin-host.qcow2`` and its manifest
the section says "not built".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks import stats
from benchmarks.bed import MIB
from benchmarks.report import Row

IMAGE = "edgepin-host.qcow2"
IMAGE_GOAL_MIB = 200  # the default host image, qcow2
MANIFESTS = ("edgepin-host.manifest.json", "manifest.json")


def _packages(manifest: dict[str, Any]) -> list[tuple[str, int]]:
    """(name, installed bytes) from a manifest's package list, whatever its exact shape."""
    pkgs = manifest.get("packages") or []
    if isinstance(pkgs, dict):
        pkgs = [{"name": k, **(v if isinstance(v, dict) else {})} for k, v in pkgs.items()]
    found = []
    for p in pkgs:
        if not isinstance(p, dict):
            continue
        kib = next(
            (
                p[k]
                for k in ("installed_kib", "installed_size_kib", "installed_size", "Installed-Size")
                if k in p
            ),
            None,
        )
        if kib is None:
            continue
        try:
            found.append((str(p.get("name", p.get("package", "?"))), int(kib) * 1024))
        except (TypeError, ValueError):
            continue
    return sorted(found, key=lambda x: -x[1])


def measure(out_dir: Path) -> dict[str, Any]:
    image = out_dir / IMAGE
    manifest = next((out_dir / m for m in MANIFESTS if (out_dir / m).exists()), None)
    if not image.exists() or manifest is None:
        return {"built": False}
    data = json.loads(manifest.read_text())
    pkgs = _packages(data)
    images = [i for i in data.get("images", []) if isinstance(i, dict)]
    virtual = next((i.get("virtual_bytes") for i in images if i.get("file") == IMAGE), None)
    return {
        "built": True,
        "image_bytes": image.stat().st_size,
        "virtual_bytes": virtual,
        "manifest": str(manifest),
        "packages": len(data.get("packages") or []),
        "packages_with_size": len(pkgs),
        "installed_bytes": sum(b for _, b in pkgs),
        "largest": pkgs[:8],
        # the root partition's squashfs, as the build recorded it
        "root_bytes": (data.get("root_image") or {}).get("bytes"),
    }


def rows(fp: dict[str, Any]) -> list[Row]:
    if not fp["built"]:
        return [Row("footprint", "host image: not built", None, "", goal="./build.sh image")]
    installed = fp["installed_bytes"]
    out = [
        Row(
            "footprint",
            f"host image qcow2 / virtual size ({fp['packages']} packages)",
            fp["image_bytes"] / MIB,
            "MiB",
            "virtual size",
            fp["virtual_bytes"] / MIB if fp.get("virtual_bytes") else None,
            stats.ratio(fp["image_bytes"], fp["virtual_bytes"])
            if fp.get("virtual_bytes")
            else None,
        )
    ]
    if not installed:
        out.append(
            Row(
                "footprint",
                "installed size of packages",
                None,
                "",
                goal="not in the manifest (needs Installed-Size)",
            )
        )
        return out
    out += [
        Row(
            "footprint",
            "host image qcow2",
            fp["image_bytes"] / MIB,
            "MiB",
            "installed packages",
            installed / MIB if installed else None,
            stats.ratio(fp["image_bytes"], installed) if installed else None,
            goal=f"at most {IMAGE_GOAL_MIB} MiB",
        )
    ]
    if fp.get("root_bytes"):
        out.append(
            Row(
                "footprint",
                "root filesystem (squashfs, zstd)",
                fp["root_bytes"] / MIB,
                "MiB",
                "installed packages",
                installed / MIB,
                stats.ratio(fp["root_bytes"], installed),
            )
        )
    for name, size in fp["largest"][:5]:
        out.append(
            Row(
                "footprint",
                f"package {name}",
                size / MIB,
                "MiB",
                "installed packages",
                installed / MIB,
                stats.ratio(size, installed),
            )
        )
    return out


# 5b. Boot: the timelines the QA image tests leave (tests/image/, docs/qa.md). The
# benchmarks never boot the image themselves; they read the last QA run's results.
BOOT_ORDER = (
    "firmware",
    "kernel",
    "first-boot unit",
    "enrolled",
    "image verified",
    "guest running",
)


def boot_measure(results: Path) -> dict[str, Any]:
    found: dict[str, Any] = {}
    node = results / "node-image" / "timeline.json"
    if node.exists():
        found["node"] = json.loads(node.read_text())
    for fw in ("uefi", "bios"):
        checks = results / f"host-image-{fw}" / "checks.json"
        if checks.exists():
            found[f"host-{fw}"] = json.loads(checks.read_text()).get("timeline", {})
    return found


def boot_rows(boot: dict[str, Any]) -> list[Row]:
    if not boot:
        return [Row("boot", "QA boot timeline: no results", None, "", goal="pytest -m image")]
    out: list[Row] = []
    first = boot.get("node", {}).get("first-boot", {})
    total = first.get("guest running")
    for name in BOOT_ORDER:
        at = first.get(name)
        out.append(
            Row(
                "boot",
                f"first boot (TCG): {name}",
                at,
                "s",
                "to guest running",
                total,
                stats.ratio(at, total) if at is not None and total else None,
            )
        )
    again = boot.get("node", {}).get("offline-reboot", {}).get("guest running")
    if again is not None:
        out.append(
            Row(
                "boot",
                "offline reboot: guest running (cache + sealed key)",
                again,
                "s",
                "first boot",
                total,
                stats.ratio(again, total) if total else None,
            )
        )
    for fw in ("uefi", "bios"):
        tl = boot.get(f"host-{fw}")
        if tl:
            out.append(
                Row(
                    "boot",
                    f"host image ({fw}): multi-user",
                    tl.get("multi-user"),
                    "s",
                    "kernel",
                    tl.get("kernel"),
                    stats.ratio(tl["multi-user"], tl["kernel"])
                    if tl.get("multi-user") and tl.get("kernel")
                    else None,
                )
            )
    return out
