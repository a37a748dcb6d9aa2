"""The built disk's root filesystem is sealed with dm-verity, checked without booting it.

What the boot relies on, read from the disk as it leaves the build: slot a's root hash is
on the ESP (EFI/edgepin/verity-a.cfg), GRUB's config on the boot partition has one entry per
root slot, which sources the slot's hash file and puts slot and hash on the kernel command
line, the ESP's environment blocks name slot a, slot b is empty, and the root partition
verifies against the hash with the tree in its verity partition. One changed byte fails
that verification, and sealing the same root partition again gives the same root hash
(fixed salt). The boot itself:
tests/image/test_host_image.py (root on /dev/mapper/edgepin-root) and
tests/image/test_node_image.py (an edited root is refused).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.testbed import disk

pytestmark = pytest.mark.image

REPO = Path(__file__).resolve().parents[2]
SEAL = REPO / "elements" / "edgepin-readonly" / "seal-verity"
ESP_FILE = "EFI/edgepin/verity-a.cfg"
SALT = "6564676570696e2d726f6f742d7665726974792d73616c742d30303030303031"
UUID = "6a0e3c5d-8b1f-4e27-9d40-3f5b7c2a1e90"


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False)


def loop(raw: Path, name: str, read_only: bool = True) -> str:
    offset, size = disk.partition(raw, name)
    args = ["losetup", "--find", "--show", "-o", str(offset), "--sizelimit", str(size)]
    r = run([*args, *(["--read-only"] if read_only else []), str(raw)])
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.fixture(scope="module")
def raw(host_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("verity") / "disk.raw"
    disk.to_raw(host_image, path)
    yield path
    path.unlink(missing_ok=True)


def root_hash_on_esp(raw: Path) -> str:
    cfg = disk.esp_file(raw, ESP_FILE).decode()
    found = re.findall(r"^set edgepin_roothash=([0-9a-f]{64})$", cfg, re.M)
    assert len(found) == 1, f"{ESP_FILE} on the ESP:\n{cfg}"
    return found[0]


def verify(raw: Path, root_hash: str) -> subprocess.CompletedProcess[str]:
    data, hashes = loop(raw, "root-a"), loop(raw, "verity-a")
    try:
        return run(["veritysetup", "verify", data, hashes, root_hash])
    finally:
        run(["losetup", "-d", data])
        run(["losetup", "-d", hashes])


def test_the_root_verifies_against_the_root_hash_on_the_esp(raw: Path, host_image: Path) -> None:
    root_hash = root_hash_on_esp(raw)
    r = verify(raw, root_hash)
    assert r.returncode == 0, f"veritysetup verify: {r.stdout}{r.stderr}"
    # the hash tree's superblock: the fixed salt and uuid, sha256, 4 KiB blocks
    hashes = loop(raw, "verity-a")
    try:
        dump = run(["veritysetup", "dump", hashes]).stdout
    finally:
        run(["losetup", "-d", hashes])
    assert re.search(rf"^Salt:\s+{SALT}$", dump, re.M), dump
    assert re.search(rf"^UUID:\s+{UUID}$", dump, re.M), dump
    assert re.search(r"^Hash algorithm:\s+sha256$", dump, re.M), dump
    assert re.search(r"^Data block size:\s+4096$", dump, re.M), dump
    # the data blocks cover the whole root partition
    _, size = disk.partition(raw, "root-a")
    assert re.search(rf"^Data blocks:\s+{size // 4096}$", dump, re.M), dump
    # and the build's manifest records the same hash
    manifest = host_image.with_name("edgepin-host.manifest.json")
    if manifest.exists():
        assert json.loads(manifest.read_text())["verity_root_hash"] == root_hash


def grub_cfg(raw: Path) -> str:
    dev = loop(raw, "boot")
    try:
        r = subprocess.run(
            ["debugfs", "-R", "cat /grub/grub.cfg", dev], capture_output=True, check=False
        )
    finally:
        run(["losetup", "-d", dev])
    return r.stdout.decode()


def entries(cfg: str) -> dict[str, str]:
    """grub.cfg's menu entries by --id: their bodies."""
    found = re.findall(r"^menuentry [^\n]*--id (\S+) \{\n(.*?)^\}", cfg, re.M | re.S)
    return dict(found)


def test_grub_has_an_entry_per_slot_with_its_root_hash_on_the_command_line(raw: Path) -> None:
    cfg = grub_cfg(raw)
    esp = '"${edgepin_esp}/EFI/edgepin/'
    # the slot to boot from the ESP's boot.env, slot a without it, before any entry
    head = cfg[: cfg.index("menuentry ")]
    assert head.index("set default=a\n") < head.index(
        f'load_env --skip-sig --file {esp}boot.env" default'
    ), head
    assert 'set edgepin_esp="(${edgepin_disk},gpt1)"' in head, head
    slots = entries(cfg)
    assert set(slots) == {"a", "b"}, cfg[:3000]
    for slot, body in slots.items():
        lines = [line.strip() for line in body.strip().splitlines()]
        # boot once: after.env's slot into boot.env first, whatever this boot does next
        assert lines[:2] == [
            f'load_env --skip-sig --file {esp}after.env" default',
            f'save_env --file {esp}boot.env" default',
        ], lines
        # the hash is empty unless the ESP's file sets it: no file, no root (the initramfs stops)
        assert lines.index("set edgepin_roothash=") < lines.index(f'source {esp}verity-{slot}.cfg"')
        linux = [line.split() for line in lines if line.startswith("linux ")]
        assert len(linux) == 1, lines
        words = linux[0]
        assert words[1] == f"/slot-{slot}/vmlinuz", words
        assert f"edgepin.slot={slot}" in words and "panic=0" in words, words
        assert "edgepin.roothash=${edgepin_roothash}" in words, words
        # diskimage-builder's boot=LABEL=... (for dracut) would name initramfs-tools' boot
        # script: the boot would stop in the initramfs
        assert not any(a.startswith("boot=") for a in words), words
        assert f"initrd /slot-{slot}/initrd.img" in lines
        # a kernel that does not load restarts the machine, into boot.env's slot
        rest = lines[lines.index("boot") :]
        assert rest[0] == "boot" and rest[-1] == "reboot", lines
        assert not any(line.startswith(("linux", "initrd", "source")) for line in rest), rest
    # no other Linux entry (Debian's 10_linux is off)
    assert len(re.findall(r"^\s*linux\s", cfg, re.M)) == 2, cfg[:3000]
    # the ESP is partition 1 of the same disk
    table = json.loads(run(["sfdisk", "--json", str(raw)]).stdout)["partitiontable"]
    assert table["partitions"][0]["name"] == "ESP"


def test_the_esp_names_slot_a_and_slot_b_is_empty(raw: Path) -> None:
    for name in ("boot", "after"):
        block = disk.esp_file(raw, f"EFI/edgepin/{name}.env")
        assert len(block) == 1024, name
        assert block == b"# GRUB Environment Block\ndefault=a\n".ljust(1024, b"#"), block[:80]
    with pytest.raises(RuntimeError):
        disk.esp_file(raw, "EFI/edgepin/verity-b.cfg")
    for part in ("root-b", "verity-b"):
        offset, size = disk.partition(raw, part)
        assert size == disk.partition(raw, part.replace("-b", "-a"))[1]
        assert _sha256_of(raw, offset, size) == hashlib.sha256(bytes(size)).hexdigest(), part
    # the boot partition: slot a's kernel, initramfs and kernel version; slot b's folder empty
    dev = loop(raw, "boot")
    try:
        a = run(["debugfs", "-R", "ls -l /slot-a", dev]).stdout
        b = run(["debugfs", "-R", "ls /slot-b", dev]).stdout
        top = run(["debugfs", "-R", "ls /", dev]).stdout
    finally:
        run(["losetup", "-d", dev])
    for name in ("vmlinuz", "initrd.img", "kernel-version"):
        assert re.search(rf"\s{re.escape(name)}\s*$", a, re.M), a
    assert "vmlinuz" not in b and "initrd" not in b, b
    assert "vmlinuz-" not in top and "initrd.img-" not in top, top


def test_one_changed_byte_of_the_root_fails_verification(raw: Path, tmp_path: Path) -> None:
    root_hash = root_hash_on_esp(raw)
    copy = tmp_path / "edited.raw"
    subprocess.run(["cp", "--sparse=always", str(raw), str(copy)], check=True)
    offset, size = disk.partition(copy, "root-a")
    with copy.open("r+b") as f:
        # a byte in the middle of the partition, whatever is there (free space included)
        f.seek(offset + size // 2 + 123)
        byte = f.read(1)
        f.seek(offset + size // 2 + 123)
        f.write(bytes([byte[0] ^ 0x01]))
    r = verify(copy, root_hash)
    said = (r.stdout + r.stderr).lower()
    assert r.returncode != 0, "veritysetup verify accepted a changed root partition"
    assert "verification failed" in said or "corrupted" in said, said


def test_sealing_the_same_root_again_gives_the_same_root_hash(raw: Path, tmp_path: Path) -> None:
    """The sealing step is deterministic: fixed salt and uuid. With the same root partition,
    which two builds of the same inputs give (test_reproducible.py), the same root hash."""
    copy = tmp_path / "again.raw"
    subprocess.run(["cp", "--sparse=always", str(raw), str(copy)], check=True)
    r = run([str(SEAL), str(copy)])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == root_hash_on_esp(raw)
    assert disk.esp_file(copy, ESP_FILE) == disk.esp_file(raw, ESP_FILE)


def test_the_root_partition_is_the_squashfs_the_manifest_names(raw: Path, host_image: Path) -> None:
    """What seal-verity hashed: a squashfs (zstd, no fragments) of the root's files, every
    time in it the build's SOURCE_DATE_EPOCH, the ESP's mount point in it, and zeros after
    it."""
    manifest = json.loads(host_image.with_name("edgepin-host.manifest.json").read_text())
    root = manifest["root_image"]
    epoch = int(manifest["inputs"]["settings"]["source_date_epoch"])
    offset, size = disk.partition(raw, "root-a")
    assert root["format"] == "squashfs" and 0 < root["bytes"] <= size, root
    h = hashlib.sha256()
    with raw.open("rb") as f:
        f.seek(offset)
        left = root["bytes"]
        while left:
            chunk = f.read(min(left, 1 << 20))
            h.update(chunk)
            left -= len(chunk)
        assert h.hexdigest() == root["sha256"]
        rest = size - root["bytes"]
        while rest:
            chunk = f.read(min(rest, 1 << 20))
            assert chunk.count(0) == len(chunk), "bytes after the squashfs are not zeros"
            rest -= len(chunk)
    stats = run(["unsquashfs", "-s", "-o", str(offset), str(raw)]).stdout
    assert re.search(r"^Compression zstd$", stats, re.M), stats
    assert re.search(r"^Block size 131072$", stats, re.M), stats
    # each file's blocks its own: reading a small file decompresses no other file
    assert re.search(r"^Fragments are not stored$", stats, re.M), stats
    made = run(["unsquashfs", "-mkfs-time", "-o", str(offset), str(raw)]).stdout.strip()
    assert made == str(epoch), made
    # every entry's time, and the ESP's mount point (the root's /boot is empty otherwise)
    listing = subprocess.run(
        ["unsquashfs", "-lln", "-o", str(offset), str(raw)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "TZ": "UTC"},
    ).stdout.splitlines()
    entries = [ln for ln in listing if ln[:1] in "-dlcbps" and " squashfs-root" in ln]
    assert len(entries) > 10000, listing[:20]
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(epoch))
    other = [ln for ln in entries if f" {when} " not in ln]
    assert not other, other[:10]
    assert any(ln.endswith(" squashfs-root/boot/efi") and ln.startswith("d") for ln in entries)
    assert not any("/lost+found" in ln for ln in entries)
    # trimmed (DIB_EDGEPIN_TRIM, on in the test image): the hardware database, the IEEE's
    # registries, Python packages' test suites and GRUB's installable modules are not in it
    paths = {ln.rsplit(" squashfs-root", 1)[1] for ln in entries}
    assert "/usr/bin/qemu-system-x86_64" in paths  # what must stay, stays
    gone = {
        "/usr/lib/udev/hwdb.bin",
        "/usr/lib/udev/hwdb.d",
        "/usr/share/ieee-data",
        "/usr/lib/grub/x86_64-efi",
        "/usr/lib/grub/x86_64-efi-signed",
        "/usr/lib/grub/i386-pc",
        "/usr/bin/qemu-system-i386",
        "/usr/bin/qemu-system-x86_64-microvm",
    }
    modules = (
        r"/usr/lib/modules/[^/]+/kernel/(sound|drivers/media|drivers/net/wireless|"
        r"drivers/bluetooth|drivers/staging|drivers/gpu/drm/(amd|i915|nouveau|radeon)|"
        r"drivers/infiniband|drivers/iio|drivers/scsi/(lpfc|qla2xxx)|drivers/target|"
        r"fs/(btrfs|xfs|nfs|ceph|smb))"
    )
    trimmed = [
        p
        for p in paths
        if p in gone
        or re.fullmatch(r"/usr/lib/python3/dist-packages/[^/]+/tests", p)
        or re.fullmatch(modules, p)
    ]
    assert not trimmed, trimmed
    assert any(
        re.fullmatch(r"/usr/lib/modules/[^/]+/kernel/drivers/net/ethernet", p) for p in paths
    )


def _sha256_of(path: Path, offset: int, size: int) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(offset)
        left = size
        while left:
            chunk = f.read(min(left, 1 << 20))
            assert chunk, f"{path} ends before {offset + size}"
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def test_the_host_update_holds_this_disk_s_root_hash_tree_and_boot_files(
    raw: Path, host_image: Path, tmp_path: Path
) -> None:
    """out/edgepin-host.update.tar, read and checked whole (every member in place, sizes
    and digests checked), holds exactly this disk's root squashfs, its hash tree (the rest
    of the verity partition zeros), and the kernel and initramfs GRUB loads from the boot
    partition; its manifest gives the root hash GRUB puts on the command line, the build's
    host version, and the command line the booted kernel gets."""
    from provisioner import hostupdate

    update = hostupdate.read(host_image.with_name("edgepin-host.update.tar"))
    manifest = json.loads(host_image.with_name("edgepin-host.manifest.json").read_text())
    settings = manifest["inputs"]["settings"]
    assert update.host_version == int(settings["host_version"]) > 0
    assert update.verity.root_hash == manifest["verity_root_hash"] == root_hash_on_esp(raw)
    assert update.verity.salt == SALT
    root_off, root_size = disk.partition(raw, "root-a")
    assert update.verity.data_bytes == root_size
    squashfs = update.member(hostupdate.ROOT)
    assert (squashfs.size, squashfs.sha256) == (
        manifest["root_image"]["bytes"],
        manifest["root_image"]["sha256"],
    )
    assert _sha256_of(raw, root_off, squashfs.size) == squashfs.sha256
    tree = update.member(hostupdate.VERITY)
    verity_off, verity_size = disk.partition(raw, "verity-a")
    assert _sha256_of(raw, verity_off, tree.size) == tree.sha256
    zeros = hashlib.sha256(bytes(verity_size - tree.size)).hexdigest()
    assert _sha256_of(raw, verity_off + tree.size, verity_size - tree.size) == zeros
    # the boot files, as the build's own script copies them from the boot partition
    r = run([str(REPO / "elements" / "edgepin-readonly" / "boot-files"), str(raw), str(tmp_path)])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == update.kernel_version
    for name in (hostupdate.KERNEL, hostupdate.INITRD):
        member = update.member(name)
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == member.sha256
    for slot, text in update.kernel_command_line.items():
        line = text.split()
        assert line[0] == f"BOOT_IMAGE=/slot-{slot}/vmlinuz"
        assert f"edgepin.slot={slot}" in line and "panic=0" in line
        assert f"edgepin.roothash={update.verity.root_hash}" in line
