"""A host update made from a file laid out as a built disk's partitions are (a dm-verity
superblock and hash blocks, a root, zeros): for the unit tests of provisioner/hostupdate.py
and the integration tests of host releases in Glance. The image tier makes the real one.

And a node's two root slots laid out in files under a node's root (partitions as files of
their sizes, the boot partition and the ESP as folders), with GRUB's part played by
:func:`grub_boots` exactly as grub.cfg's slot entries do it (tests/image/test_verity.py
reads that grub.cfg; tests/image/test_node_image.py boots it)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from provisioner import hostupdate
from provisioner.node import hostslot

BLOCK = hostupdate.BLOCK
SALT = bytes(range(32))
ROOT_HASH = "ab" * 32
KVER = "6.12.0-1-amd64"
ARGS = (
    "root=/dev/mapper/edgepin-root ro edgepin.slot={slot}  edgepin.roothash=${{edgepin_roothash}}"
)
GRUB_CFG = "".join(
    f"""menuentry 'edgepin (root slot {slot})' --unrestricted --id {slot} {{
\tset edgepin_roothash=
\tlinux\t/slot-{slot}/vmlinuz {ARGS.format(slot=slot)} panic=0
\tinitrd\t/slot-{slot}/initrd.img
}}
"""
    for slot in hostupdate.SLOTS
)


def verity_superblock(data_blocks: int) -> bytes:
    sb = bytearray(512)
    sb[:8] = hostupdate.VERITY_MAGIC
    struct.pack_into("<II", sb, 8, 1, 1)
    sb[32:38] = b"sha256"
    struct.pack_into("<IIQH", sb, 64, BLOCK, BLOCK, data_blocks, len(SALT))
    sb[88 : 88 + len(SALT)] = SALT
    return bytes(sb).ljust(BLOCK, b"\0")


def disk(tmp_path: Path) -> dict[str, Any]:
    """A raw 'disk': a root partition (a 'squashfs' of 3 blocks and a half, zeros after
    it, 16 blocks in all) and a verity partition (superblock, two hash blocks, zeros)."""
    root = bytes(range(256)) * 56  # 14,336 bytes
    root_part = root.ljust(16 * BLOCK, b"\0")
    tree = verity_superblock(16) + b"\x11" * BLOCK + b"\x22" * 100 + bytes(BLOCK - 100)
    verity_part = tree.ljust(8 * BLOCK, b"\0")
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\xee" * BLOCK + root_part + verity_part)
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / "vmlinuz").write_bytes(b"kernel" * 100)
    (boot / "initrd.img").write_bytes(b"initrd" * 50)
    (boot / "grub.cfg").write_text(GRUB_CFG)
    return {
        "raw": raw,
        "boot_dir": boot,
        "root_part": (BLOCK, len(root_part)),
        "root_bytes": len(root),
        "verity_part": (BLOCK + len(root_part), len(verity_part)),
        "root": root,
        "tree": tree[: 3 * BLOCK],
    }


def write(tmp_path: Path, **changes: Any) -> tuple[Path, hostupdate.HostUpdate, dict[str, Any]]:
    d = disk(tmp_path)
    args = {
        "raw": d["raw"],
        "boot_dir": d["boot_dir"],
        "root_part": d["root_part"],
        "root_bytes": d["root_bytes"],
        "verity_part": d["verity_part"],
        "name": "edgepin-host",
        "host_version": 1764940000,
        "kernel_version": KVER,
        "root_hash": ROOT_HASH,
        "epoch": 1764940000,
        **changes,
    }
    out = tmp_path / "edgepin-host.update.tar"
    return out, hostupdate.write(out, **args), d


# ------------------------------------------------------------------ root slots in files


def lay_out_slots(root: Path, booted: str = "a") -> None:
    """Both slots' partitions of 16 + 8 blocks (full of an older release's bytes), the
    boot partition as a folder, the ESP's blocks naming ``booted``, booted from it."""
    parts = root / "dev" / "disk" / "by-partlabel"
    parts.mkdir(parents=True, exist_ok=True)
    for slot in hostslot.SLOTS:
        (parts / f"root-{slot}").write_bytes(b"\x5a" * 16 * BLOCK)
        (parts / f"verity-{slot}").write_bytes(b"\xa5" * 8 * BLOCK)
    (parts / "boot").mkdir(exist_ok=True)
    esp = root / "boot" / "efi" / "EFI" / "edgepin"
    esp.mkdir(parents=True, exist_ok=True)
    for name in ("boot.env", "after.env"):
        (esp / name).write_bytes(hostslot.env_block(booted))
    (root / "proc").mkdir(exist_ok=True)
    boot_slot(root, booted)


def boot_slot(root: Path, slot: str) -> None:
    (root / "proc" / "cmdline").write_text(f"BOOT_IMAGE=/slot-{slot}/vmlinuz edgepin.slot={slot}\n")


def esp_slot(root: Path, name: str) -> str:
    return hostslot.parse_env_block(hostslot.Layout(root).esp_file(name).read_bytes(), name)


def grub_boots(root: Path) -> str:
    """What grub.cfg does at power-on: boot.env's slot, after after.env was copied into
    boot.env; then the kernel's command line names that slot."""
    layout = hostslot.Layout(root)
    slot = esp_slot(root, "boot.env")
    layout.esp_file("boot.env").write_bytes(layout.esp_file("after.env").read_bytes())
    boot_slot(root, slot)
    return slot
