"""The host's two root slots: which one booted, which one the next boot takes, and a host
update written into the other one, booted once, then kept or left
(docs/host-image.md#root-slots).

The disk (elements/edgepin-readonly): partitions ``root-a``/``verity-a`` and
``root-b``/``verity-b``, each slot's kernel and initramfs in ``/slot-<x>/`` on the boot
partition, and on the ESP each slot's root hash (``EFI/edgepin/verity-<x>.cfg``) and two
GRUB environment blocks: ``boot.env`` names the slot the next boot takes, ``after.env`` the
one GRUB writes into ``boot.env`` as it boots. So:

======================  ========  ========  =========  =================================
state                   booted    boot.env  after.env
======================  ========  ========  =========  =================================
running                 a         a         a
armed (update in b)     a         b         a          the next boot tries b, once
on trial                b         a         a          GRUB already pointed the next boot back
committed               b         b         b
======================  ========  ========  =========  =================================

A trial boot that fails anywhere (no kernel, a kernel that stops, a root that does not
verify, a node that never gets healthy) leaves ``boot.env`` naming the old slot: the next
boot is the old slot's, measured as its every boot is. Only :func:`commit`, after the node
was healthy on the new slot, makes it stay.

Paths derive from the node's root (``NodeConfig.root``) so that the tests run this code on
files: partitions under ``dev/disk/by-partlabel``, the ESP at ``boot/efi``; the boot
partition is mounted for the write unless it is a folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from provisioner import hostupdate
from provisioner.errors import HostSlotError, HostUpdateError
from provisioner.hostupdate import HostUpdate
from provisioner.node import state
from provisioner.node.config import NodeConfig

LOG = logging.getLogger(__name__)
SLOTS = hostupdate.SLOTS
ENV_SIZE = 1024  # a GRUB environment block as grub-editenv makes it, rewritten in place
ENV_HEADER = b"# GRUB Environment Block\n"
CHUNK = 1 << 20
BLKZEROOUT = 0x127F  # _IO(0x12, 127): the block device writes zeros over a range
ESP_DIR = "EFI/edgepin"


def other(slot: str) -> str:
    return "b" if slot == "a" else "a"


def env_block(slot: str) -> bytes:
    """The environment block naming ``slot``, byte for byte as seal-verity writes it."""
    if slot not in SLOTS:
        raise ValueError(slot)
    return (ENV_HEADER + f"default={slot}\n".encode()).ljust(ENV_SIZE, b"#")


def parse_env_block(data: bytes, what: str) -> str:
    """The slot an environment block from the ESP names, or HostSlotError: untrusted
    bytes (anyone with the disk can write them)."""
    if len(data) != ENV_SIZE or not data.startswith(ENV_HEADER):
        raise HostSlotError(f"{what} on the ESP is not a GRUB environment block")
    body = data[len(ENV_HEADER) :].rstrip(b"#")
    match = re.fullmatch(rb"default=([ab])\n", body)
    if match is None:
        raise HostSlotError(f"{what} on the ESP names no root slot (default=a or default=b)")
    return match.group(1).decode()


def booted_slot(cmdline: str) -> str | None:
    """The root slot this boot's kernel command line names (``edgepin.slot=``)."""
    found = [w.split("=", 1)[1] for w in cmdline.split() if w.startswith("edgepin.slot=")]
    return found[-1] if found and found[-1] in SLOTS else None


@dataclass(frozen=True)
class Slots:
    booted: str  # the slot this boot's root is from
    next: str  # boot.env: the slot the next boot takes
    after: str  # after.env: what GRUB writes into boot.env as it boots

    @property
    def armed(self) -> bool:
        """The other slot holds an update that the next boot tries once."""
        return self.booted == self.after != self.next

    @property
    def trial(self) -> bool:
        """This boot is a slot's one try: the next boot goes back unless it is committed."""
        return self.booted != self.after

    @property
    def state(self) -> str:
        return "on trial" if self.trial else "armed" if self.armed else "running"

    def to_json(self) -> dict[str, Any]:
        return {"booted": self.booted, "next": self.next, "after": self.after, "state": self.state}


@dataclass(frozen=True)
class Layout:
    """Where the slots are, under the node's root."""

    root: Path

    @classmethod
    def of(cls, cfg: NodeConfig) -> Layout:
        return cls(cfg.root)

    def partition(self, name: str) -> Path:
        return self.root / "dev" / "disk" / "by-partlabel" / name

    @property
    def esp(self) -> Path:
        return self.root / "boot" / "efi"

    @property
    def cmdline(self) -> Path:
        return self.root / "proc" / "cmdline"

    def esp_file(self, name: str) -> Path:
        return self.esp / ESP_DIR / name


def read_slots(layout: Layout) -> Slots:
    try:
        cmdline = layout.cmdline.read_text()
    except OSError as e:
        raise HostSlotError(f"cannot read the kernel command line: {e.strerror}") from None
    booted = booted_slot(cmdline)
    if booted is None:
        raise HostSlotError(
            "this boot names no root slot (no edgepin.slot= on the kernel command line)",
            hint="a host image from before the two root slots cannot take a host update",
        )
    names = {}
    for name in ("boot.env", "after.env"):
        try:
            data = layout.esp_file(name).read_bytes()
        except OSError as e:
            raise HostSlotError(
                f"cannot read {ESP_DIR}/{name} on the ESP ({layout.esp}): {e.strerror}"
            ) from None
        names[name] = parse_env_block(data, f"{ESP_DIR}/{name}")
    return Slots(booted, names["boot.env"], names["after.env"])


# ------------------------------------------------------------------ writing


@contextlib.contextmanager
def _esp_writable(layout: Layout) -> Iterator[None]:
    """The ESP read-write while the block runs, read-only again after (it is mounted
    read-only on the node); a folder (the tests) as it is."""
    if not os.path.ismount(layout.esp):
        yield
        return
    _run(["mount", "-o", "remount,rw", str(layout.esp)], "make the ESP writable")
    try:
        yield
    finally:
        os.sync()
        _run(["mount", "-o", "remount,ro", str(layout.esp)], "make the ESP read-only again")


@contextlib.contextmanager
def _boot_partition(layout: Layout) -> Iterator[Path]:
    """The boot partition mounted read-write in a private folder for the block's length,
    or the folder itself when it is one (the tests)."""
    dev = layout.partition("boot")
    if dev.is_dir():
        yield dev
        return
    with tempfile.TemporaryDirectory(prefix="edgepin-boot-") as mnt:
        _run(["mount", "-t", "ext4", "-o", "nodev,nosuid,noexec", str(dev), mnt], "mount boot")
        try:
            yield Path(mnt)
        finally:
            _run(["umount", mnt], "unmount the boot partition")


def _run(args: list[str], what: str) -> None:
    r = subprocess.run(args, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise HostSlotError(f"cannot {what}: {r.stderr.strip() or r.returncode}")


def _write_in_place(path: Path, data: bytes) -> None:
    """Overwrite a file's bytes where they are (a GRUB environment block: GRUB finds it by
    its blocks), synced. Its header and variable sit in its first 512-byte sector."""
    with path.open("r+b") as f:
        if os.fstat(f.fileno()).st_size != len(data):
            raise HostSlotError(f"{path.name} on the ESP is not {len(data)} bytes")
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _replace_on_esp(path: Path, data: bytes) -> None:
    """A file on the ESP replaced whole: written beside it, synced, renamed over it. Not
    state.atomic_write: FAT has no modes, and the kernel's vfat refuses fchmod."""
    tmp = path.with_name(path.name + ".new")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    state.fsync_dir(path.parent)


def _point(layout: Layout, name: str, slot: str) -> None:
    _write_in_place(layout.esp_file(name), env_block(slot))


def _members(path: Path, update: HostUpdate) -> dict[str, int]:
    """Where each member's data starts in the file: the reader took exactly this layout
    (plain ustar headers, the manifest first, each member padded to 512 bytes)."""
    with path.open("rb") as f:
        header = f.read(hostupdate.TAR_BLOCK)
    try:
        pos = hostupdate.TAR_BLOCK + _padded(int(header[124:136].rstrip(b"\0 "), 8))
    except ValueError:
        raise HostUpdateError("the host update changed while it was read") from None
    found = {}
    for m in update.members:
        found[m.name] = pos + hostupdate.TAR_BLOCK
        pos += hostupdate.TAR_BLOCK + _padded(m.size)
    return found


def _padded(size: int) -> int:
    return size + (-size % hostupdate.TAR_BLOCK)


def _copy(src: IO[bytes], offset: int, size: int, dst: IO[bytes], at: int) -> None:
    src.seek(offset)
    dst.seek(at)
    left = size
    while left:
        chunk = src.read(min(CHUNK, left))
        if not chunk:
            raise HostUpdateError("the host update ended early")
        dst.write(chunk)
        left -= len(chunk)


def _zero(dst: IO[bytes], start: int, end: int) -> None:
    """Zeros from ``start`` to ``end``: BLKZEROOUT on a block device, written otherwise."""
    if end <= start:
        return
    dst.flush()
    try:
        fcntl.ioctl(dst.fileno(), BLKZEROOUT, struct.pack("QQ", start, end - start))
        return
    except OSError:
        pass
    dst.seek(start)
    left = end - start
    zeros = bytes(CHUNK)
    while left:
        n = min(CHUNK, left)
        dst.write(zeros[:n])
        left -= n


def _size(f: IO[bytes]) -> int:
    return f.seek(0, os.SEEK_END)


def _sha256(f: IO[bytes], offset: int, size: int) -> str:
    h = hashlib.sha256()
    f.seek(offset)
    left = size
    while left:
        chunk = f.read(min(CHUNK, left))
        if not chunk:
            break
        h.update(chunk)
        left -= len(chunk)
    return h.hexdigest()


def _write_partition(
    path: Path, src: IO[bytes], offset: int, size: int, want: str, total: int
) -> None:
    """``size`` bytes of the update at ``offset`` at the start of the partition, zeros after
    them up to ``total`` bytes, synced, and read back against the manifest's sha256."""
    with path.open("r+b") as dst:
        if _size(dst) < total:
            raise HostSlotError(f"{path.name} has {_size(dst)} bytes, the update needs {total}")
        _copy(src, offset, size, dst, 0)
        _zero(dst, size, total)
        dst.flush()
        os.fsync(dst.fileno())
        # what is on the disk now, not what was meant to be
        with path.open("rb") as back:
            os.posix_fadvise(back.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            if _sha256(back, 0, size) != want:
                raise HostSlotError(f"{path.name} does not read back as the update's bytes")


def install(
    cfg: NodeConfig,
    update_path: Path,
    log: Callable[[str], None] | None = None,
    *,
    expect_version: int | None = None,
    generation: int = 0,
) -> tuple[HostUpdate, Slots]:
    """Write the host update at ``update_path`` into the slot that did not boot and arm it:
    the next boot tries it once. Refused: an update that is not whole, not newer than this
    host, not ``expect_version`` when given (the signed host assignment's), or a node whose
    own boot is still on trial. Whatever fails, ``boot.env`` names the slot that booted
    until the new slot is whole. ``generation`` (the host assignment's) is recorded."""
    layout = Layout.of(cfg)
    slots = read_slots(layout)
    if slots.trial:
        raise HostSlotError(
            f"this boot is root slot {slots.booted}'s trial: it is committed (or left) first",
            hint="the first reconcile that finds the node healthy commits it",
        )
    update = hostupdate.read(update_path)
    if expect_version is not None and update.host_version != expect_version:
        raise HostUpdateError(
            f"host update {update.name} is version {update.host_version}, not the "
            f"{expect_version} its assignment names: refused"
        )
    if update.host_version <= cfg.host_version:
        raise HostSlotError(
            f"host update {update.name} is version {update.host_version}, not newer than this "
            f"host ({cfg.host_version}): refused",
            hint="a host is never taken back to an older release",
        )
    target = other(slots.booted)
    say: Callable[[str], None] = log or (lambda _msg: None)
    root = update.member(hostupdate.ROOT)
    tree = update.member(hostupdate.VERITY)
    # both partitions big enough before a byte is written
    for name, need in (
        (f"root-{target}", update.verity.data_bytes),
        (f"verity-{target}", tree.size),
    ):
        try:
            with layout.partition(name).open("rb") as f:
                have = _size(f)
        except OSError as e:
            raise HostSlotError(f"cannot open partition {name}: {e.strerror}") from None
        if have < need:
            raise HostSlotError(f"{name} has {have} bytes, the update needs {need}")
    if slots.armed:
        # the slot about to be written must not be the next boot's while it is
        with _esp_writable(layout):
            _point(layout, "boot.env", slots.booted)
    offsets = _members(update_path, update)
    with update_path.open("rb") as src:
        say(f"writing root slot {target}: {root.size} bytes of root filesystem")
        _write_partition(
            layout.partition(f"root-{target}"),
            src,
            offsets[hostupdate.ROOT],
            root.size,
            root.sha256,
            update.verity.data_bytes,
        )
        verity = layout.partition(f"verity-{target}")
        with verity.open("rb") as v:
            verity_size = _size(v)
        _write_partition(
            verity, src, offsets[hostupdate.VERITY], tree.size, tree.sha256, verity_size
        )
        say(f"writing root slot {target}: kernel {update.kernel_version} and initramfs")
        with _boot_partition(layout) as boot:
            folder = boot / f"slot-{target}"
            folder.mkdir(mode=0o755, exist_ok=True)
            for name in (hostupdate.KERNEL, hostupdate.INITRD):
                m = update.member(name)
                src.seek(offsets[name])
                data = src.read(m.size)
                if hashlib.sha256(data).hexdigest() != m.sha256:
                    raise HostSlotError(f"{name} changed while it was written")
                state.atomic_write(folder / name, data, mode=0o644)
            state.atomic_write(
                folder / "kernel-version", f"{update.kernel_version}\n".encode(), mode=0o644
            )
    cfg_text = (
        f"# edgepin: the dm-verity root hash of root slot {target}, host release "
        f"{update.name} version {update.host_version}\nset edgepin_roothash="
        f"{update.verity.root_hash}\n"
    )
    with _esp_writable(layout):
        _replace_on_esp(layout.esp_file(f"verity-{target}.cfg"), cfg_text.encode())
        _record(
            cfg,
            Pending(
                target,
                update.host_version,
                update.name,
                slots.booted,
                cfg.host_version,
                generation=generation,
            ),
        )
        # last: the slot is whole, the next boot tries it
        _point(layout, "boot.env", target)
    return update, read_slots(layout)


def commit(cfg: NodeConfig) -> Slots | None:
    """Keep the slot this boot is on trial in: the next boots take it. None when this boot
    is not a trial. Called once the node is healthy on it."""
    layout = Layout.of(cfg)
    slots = read_slots(layout)
    if not slots.trial:
        return None
    with _esp_writable(layout):
        # boot.env first: cut off between the two, the next boot is one more trial of
        # this slot, never the old slot's without a try
        _point(layout, "boot.env", slots.booted)
        _point(layout, "after.env", slots.booted)
    return read_slots(layout)


def restart(cfg: NodeConfig) -> bool:
    """Restart the machine (``EDGEPIN_RESTART_COMMAND``): into the slot ``boot.env`` names.
    False (logged) when the command fails."""
    LOG.info("host: restarting the machine: %s", " ".join(cfg.restart_command))
    try:
        subprocess.run(list(cfg.restart_command), check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        LOG.error("host: the restart failed: %s", e)
        return False
    return True


# ------------------------------------------------------------------ the trial watch

WATCH_POLL = 5.0  # seconds between two looks at the ESP during a trial


def trial_verdict(slots: Slots, elapsed: float, timeout: float) -> str:
    """What the trial watch does after ``elapsed`` of ``timeout`` seconds: "kept" (this boot
    is not, or no longer, a trial: committed), "wait", or "leave" (the time is up)."""
    if not slots.trial:
        return "kept"
    return "leave" if elapsed >= timeout else "wait"


def watch(
    cfg: NodeConfig,
    *,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
    say: Callable[[str], None],
    leave: Callable[[NodeConfig], bool] = restart,
) -> bool:
    """On a root slot's one try: wait for the reconcile to commit it, and restart into the
    slot it came from when that has not happened ``EDGEPIN_HOST_TRIAL_TIMEOUT`` seconds
    after the start (a node that opened its vault but never got healthy, a reconcile that
    hangs). Returns at once on any other boot. False when the restart failed."""
    layout = Layout.of(cfg)
    start = clock()
    slots = read_slots(layout)
    if not slots.trial:
        say(f"host: root slot {slots.booted} is not on trial: nothing to watch")
        return True
    timeout = cfg.host_trial_timeout
    say(
        f"host: root slot {slots.booted} is on trial: unless the node is healthy on it "
        f"within {timeout:.0f} s, it restarts into root slot {slots.next}"
    )
    while True:
        elapsed = clock() - start
        try:
            slots = read_slots(layout)
        except HostSlotError as e:
            # the ESP changes only through commit(), which writes each block in place
            say(f"host: the root slots cannot be read ({e}): still on trial")
        verdict = trial_verdict(slots, elapsed, timeout)
        if verdict == "kept":
            say(f"host: root slot {slots.booted} is kept: the trial watch ends")
            return True
        if verdict == "leave":
            say(
                f"host: root slot {slots.booted} did not get healthy within {timeout:.0f} s: "
                f"restarting into root slot {slots.next}"
            )
            return leave(cfg)
        sleep(min(WATCH_POLL, timeout - elapsed))


# ------------------------------------------------------------------ the record

RECORD = "host-update.json"  # in the vault: the update written, until it is settled


@dataclass(frozen=True)
class Pending:
    """The host update this node wrote into a slot, as :func:`install` recorded it."""

    slot: str
    host_version: int
    name: str
    from_slot: str
    from_version: int
    fell_back: bool = False  # the node came back on ``from_slot`` without committing it
    generation: int = 0  # the host assignment's that brought it; 0: installed by hand

    def to_json(self) -> dict[str, Any]:
        return {
            "slot": self.slot,
            "host_version": self.host_version,
            "name": self.name,
            "from_slot": self.from_slot,
            "from_version": self.from_version,
            "fell_back": self.fell_back,
            "generation": self.generation,
        }


def parse_pending(data: bytes) -> Pending:
    """The record from the vault's bytes, or HostSlotError."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise HostSlotError(f"{RECORD} is not JSON") from None
    keys = {"slot", "host_version", "name", "from_slot", "from_version", "fell_back"}
    # generation: absent in records of an edgepin from before host assignments
    if not isinstance(doc, dict) or not keys <= set(doc) <= {*keys, "generation"}:
        raise HostSlotError(f"{RECORD} does not have the fields {sorted(keys)}")
    for key in ("host_version", "from_version", "generation"):
        if key in doc and (
            type(doc[key]) is not int or not 0 <= doc[key] <= hostupdate.MAX_HOST_VERSION
        ):
            raise HostSlotError(f"{RECORD}: {key} is not a whole number")
    if doc["slot"] not in SLOTS or doc["from_slot"] not in SLOTS or doc["slot"] == doc["from_slot"]:
        raise HostSlotError(f"{RECORD}: slot and from_slot are not the two root slots")
    if not isinstance(doc["name"], str) or not hostupdate.NAME.fullmatch(doc["name"]):
        raise HostSlotError(f"{RECORD}: name is not a host release's name")
    if type(doc["fell_back"]) is not bool:
        raise HostSlotError(f"{RECORD}: fell_back is not true or false")
    return Pending(**doc)


def _record(cfg: NodeConfig, pending: Pending | None) -> None:
    path = cfg.state_dir / RECORD
    if pending is None:
        path.unlink(missing_ok=True)
        return
    state.atomic_write(path, json.dumps(pending.to_json()).encode())


def pending(cfg: NodeConfig) -> Pending | None:
    try:
        return parse_pending((cfg.state_dir / RECORD).read_bytes())
    except FileNotFoundError:
        return None
    except OSError as e:
        raise HostSlotError(f"cannot read {RECORD}: {e.strerror}") from None


def settle(cfg: NodeConfig, healthy: bool) -> str | None:
    """After a reconcile: commit the slot this boot is on trial in when the node is
    ``healthy`` (its keys opened, the guest running), and note a host update whose slot the
    node came back from. What it did (logged); None when there was nothing to do or this
    host has no root slots (a development machine)."""
    layout = Layout.of(cfg)
    if not layout.cmdline.exists() or booted_slot(layout.cmdline.read_text()) is None:
        return None
    slots = read_slots(layout)
    record = pending(cfg)
    if slots.trial:
        if not healthy:
            return None
        commit(cfg)
        _record(cfg, None)
        what = f"host update {record.name} version {record.host_version}" if record else "it"
        said = f"host: root slot {slots.booted} committed: {what} stays"
        LOG.info("%s", said)
        return said
    if record is None or slots.armed:
        return None
    if record.slot == slots.booted:
        _record(cfg, None)  # committed by an earlier run
        return None
    if not record.fell_back:
        _record(cfg, Pending(**{**record.to_json(), "fell_back": True}))
        said = (
            f"host: host update {record.name} version {record.host_version} in root slot "
            f"{record.slot} did not come up healthy: back on root slot {slots.booted}"
        )
        LOG.error("%s", said)
        return said
    return None
