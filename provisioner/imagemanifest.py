"""The host image's manifest and pin file, written by ``./build.sh image`` after a build.

``python -m provisioner.imagemanifest --out out --name edgepin-host ...`` reads what
diskimage-builder left (its dpkg manifest and its log) and writes, beside the image:

- ``<name>.manifest.json``: every package with its version, the image's sha256 and sizes,
  the build inputs (settings, wheel, edgepin version, git commit, build requirements) and
  the elements used;
- ``<name>.pins.json``: the dpkg manifest, which ``./build.sh image --pins FILE`` (through
  diskimage-builder's ``apt-preferences`` element) rebuilds with exactly the same versions.

Nothing in here is secret: certificates and the CA are public and only their hashes are
recorded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from provisioner import __version__


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def dpkg_manifest(out: Path, name: str) -> dict[str, Any]:
    path = out / f"{name}.d" / "dib-manifests" / f"dib-manifest-dpkg-{name}"
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"imagemanifest: no dpkg manifest at {path}") from None
    return data


def package_sizes(out: Path, name: str) -> dict[str, int]:
    """Installed size (KiB) per package, as the image build recorded it."""
    path = out / f"{name}.d" / "dib-manifests" / "edgepin-package-sizes"
    sizes: dict[str, int] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            size, _, package = line.partition("\t")
            if size.isdigit() and package:
                sizes[package] = int(size)
    return sizes


def elements_used(log: str) -> list[str]:
    """The expanded element list diskimage-builder printed in its log."""
    m = re.search(r"Expanded element dependencies to:\s*(.+)", log)
    return sorted(m.group(1).split()) if m else []


def image_info(path: Path) -> dict[str, Any]:
    info: dict[str, Any] = {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256(path)}
    try:
        q = subprocess.run(
            ["qemu-img", "info", "--output=json", str(path)],
            capture_output=True,
            text=True,
            check=True,
        )
        info["virtual_bytes"] = json.loads(q.stdout)["virtual-size"]
    except (OSError, subprocess.CalledProcessError, ValueError, KeyError):
        pass
    return info


def git_commit(repo: Path) -> str | None:
    try:
        r = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True
        )
    except OSError:
        return None
    return r.stdout.strip() or None


def build(args: argparse.Namespace) -> dict[str, Any]:
    out: Path = args.out
    log_path = out / f"{args.name}.log"
    log = log_path.read_text(errors="replace") if log_path.exists() else ""
    dpkg = dpkg_manifest(out, args.name)
    sizes = package_sizes(out, args.name)
    packages = sorted(
        (
            {
                "package": p["package"],
                "version": p["version"],
                "arch": p.get("arch"),
                "installed_kib": sizes.get(p["package"]),
            }
            for p in dpkg.get("packages", [])
        ),
        key=lambda p: str(p["package"]),
    )
    images = [
        image_info(p) for p in sorted(out.glob(f"{args.name}.*")) if p.suffix in (".qcow2", ".raw")
    ]
    settings = dict(s.split("=", 1) for s in args.setting)
    reqs = args.elements_dir / "build-requirements.txt"
    return {
        "name": args.name,
        "edgepin_version": __version__,
        "images": images,
        "packages": packages,
        "inputs": {
            "settings": settings,
            "git_commit": git_commit(args.elements_dir.parent),
            "wheel": {"file": args.wheel.name, "sha256": sha256(args.wheel)},
            "build_requirements_sha256": sha256(reqs) if reqs.exists() else None,
        },
        "elements": elements_used(log),
        # on the ESP and the kernel command line: GRUB measures it into PCR 8
        "verity_root_hash": args.verity_root_hash,
        # the root partition's content: a squashfs of this size and sha256, zeros after it
        "root_image": (
            {"format": "squashfs", "bytes": int(args.root_image[0]), "sha256": args.root_image[1]}
            if args.root_image
            else None
        ),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m provisioner.imagemanifest", description=__doc__)
    p.add_argument("--out", type=Path, required=True, help="the build's output folder")
    p.add_argument("--name", required=True, help="image name (file stem)")
    p.add_argument("--elements-dir", type=Path, required=True)
    p.add_argument("--wheel", type=Path, required=True, help="the edgepin wheel in the image")
    p.add_argument("--setting", action="append", default=[], help="KEY=VALUE build input")
    p.add_argument(
        "--verity-root-hash", default=None, help="the root filesystem's dm-verity root hash"
    )
    p.add_argument(
        "--root-image",
        nargs=2,
        metavar=("BYTES", "SHA256"),
        default=None,
        help="size and sha256 of the root partition's squashfs",
    )
    args = p.parse_args(argv)
    if args.root_image and not (
        args.root_image[0].isdigit() and re.fullmatch(r"[0-9a-f]{64}", args.root_image[1])
    ):
        p.error("--root-image takes a size in bytes and a sha256 (64 hex digits)")
    manifest = build(args)
    (args.out / f"{args.name}.manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    pins = {
        "packages": [
            {k: p[k] for k in ("package", "version", "arch")} for p in manifest["packages"]
        ]
    }
    (args.out / f"{args.name}.pins.json").write_text(json.dumps(pins, indent=2) + "\n")
    for image in manifest["images"]:
        print(f"{image['file']}: {image['bytes'] / 2**20:.1f} MiB, sha256 {image['sha256']}")
    print(f"{len(manifest['packages'])} packages; manifest {args.name}.manifest.json")
    largest = sorted(
        (p for p in manifest["packages"] if p["installed_kib"]),
        key=lambda p: -int(p["installed_kib"]),
    )[:10]
    if largest:
        print(
            "largest installed: "
            + ", ".join(f"{p['package']} {int(p['installed_kib']) / 1024:.0f} MiB" for p in largest)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
