"""Host updates: the root filesystem, its dm-verity hash tree and the boot files of one
host release, in one file that ``./build.sh image`` writes beside the disk image
(``out/edgepin-host.update.tar``).

The file is a POSIX tar (ustar) whose members have fixed names, in this order:

- ``manifest.json``: what the rest is. ``kind`` and ``format``; the host ``name`` and
  ``host_version`` (a whole number: later releases have greater ones); the edgepin
  release and the kernel version in it; ``verity``, the dm-verity parameters a node opens
  the root with (root hash, salt, block size, the bytes of the root partition the tree
  covers); ``members``, each other member's name, size and sha256; and ``measured``, the
  kernel command line GRUB builds for this root (root hash in it), which it measures into
  PCR 8 as it measures the kernel and the initramfs (their sha256 in ``members``) into
  PCR 9;
- ``vmlinuz`` and ``initrd.img``: the kernel and the initramfs GRUB loads;
- ``root.verity``: the hash tree, its superblock first (the verity partition holds it,
  zeros after it);
- ``root.squashfs``: the root filesystem (the root partition holds it, zeros after it up
  to ``verity.data_bytes``: the tree covers those zeros too).

Every header has the time ``SOURCE_DATE_EPOCH``, owner 0 and mode 0644, so that two builds
of the same root give the same ``root.squashfs`` and ``root.verity`` members (the
initramfs is not built byte for byte alike; docs/host-image.md#reproducibility). No name
in the tar is ever used as a path: a reader takes the members by position and checks
their names.

:func:`parse_manifest` reads a manifest from untrusted bytes into a :class:`HostUpdate` or
raises :class:`~provisioner.errors.HostUpdateError`; :func:`read` does the same for a whole
file, its members' sizes and digests checked against the manifest.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import struct
import sys
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from provisioner import __version__
from provisioner.errors import HostUpdateError

KIND = "edgepin-host-update"
FORMAT = 1
MANIFEST = "manifest.json"
KERNEL = "vmlinuz"
INITRD = "initrd.img"
VERITY = "root.verity"
ROOT = "root.squashfs"
PAYLOAD = (KERNEL, INITRD, VERITY, ROOT)  # after the manifest, in this order
SLOTS = ("a", "b")  # the root slots; a host update can be written into either
MAX_MANIFEST = 64 * 1024  # bytes; a manifest is under 2 KiB
MAX_MEMBER = 8**11 - 1  # bytes: what a ustar header's size holds (8 GiB less one byte)
BLOCK = 4096  # dm-verity's data and hash block size, as seal-verity formats it
HASH = "sha256"
VERITY_MAGIC = b"verity\0\0"
SHA256 = re.compile(r"[0-9a-f]{64}")
SALT = re.compile(r"(?:[0-9a-f]{2}){1,256}")
NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
VERSION_TEXT = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+~_-]{0,127}")
TOP_FIELDS = {
    "kind",
    "format",
    "name",
    "host_version",
    "edgepin_version",
    "kernel_version",
    "verity",
    "members",
    "measured",
}
VERITY_FIELDS = {"root_hash", "salt", "hash_algorithm", "block_size", "data_bytes"}
MAX_HOST_VERSION = 2**63 - 1


@dataclass(frozen=True)
class Member:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Verity:
    root_hash: str
    salt: str
    data_bytes: int  # the root partition's size: the squashfs, then zeros
    block_size: int = BLOCK
    hash_algorithm: str = HASH


@dataclass(frozen=True)
class HostUpdate:
    name: str
    host_version: int
    edgepin_version: str
    kernel_version: str
    verity: Verity
    members: tuple[Member, ...]  # PAYLOAD's members, in its order
    # per root slot: the command line GRUB gives the kernel when this release is in it
    kernel_command_line: dict[str, str]

    def member(self, name: str) -> Member:
        return next(m for m in self.members if m.name == name)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": KIND,
            "format": FORMAT,
            "name": self.name,
            "host_version": self.host_version,
            "edgepin_version": self.edgepin_version,
            "kernel_version": self.kernel_version,
            "verity": {
                "root_hash": self.verity.root_hash,
                "salt": self.verity.salt,
                "hash_algorithm": self.verity.hash_algorithm,
                "block_size": self.verity.block_size,
                "data_bytes": self.verity.data_bytes,
            },
            "members": [
                {"name": m.name, "bytes": m.size, "sha256": m.sha256} for m in self.members
            ],
            "measured": {"kernel_command_line": dict(self.kernel_command_line)},
        }


# ------------------------------------------------------------------ the parser


def _fail(what: str) -> HostUpdateError:
    return HostUpdateError(f"the host update's manifest is malformed: {what}")


def _object(value: Any, what: str, keys: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(f"{what} is not an object")
    unknown = sorted(str(k)[:40] for k in value if k not in keys)
    if unknown:
        raise _fail(f"{what} has unknown fields {unknown[:3]}")
    missing = sorted(keys - set(value))
    if missing:
        raise _fail(f"{what} lacks {', '.join(missing)}")
    return value


def _text(value: Any, what: str, pattern: re.Pattern[str], size: int = 128) -> str:
    if not isinstance(value, str) or len(value) > size or not pattern.fullmatch(value):
        raise _fail(f"{what} is not {pattern.pattern!r}")
    return value


def _shown(value: Any) -> str:
    return "".join(c for c in str(value)[:20] if c.isprintable())


def _whole(value: Any, what: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise _fail(f"{what} is not a whole number from {low} to {high}")
    return value


def _members(value: Any) -> tuple[Member, ...]:
    if not isinstance(value, list) or len(value) != len(PAYLOAD):
        raise _fail(f"members is not a list of {len(PAYLOAD)}: {', '.join(PAYLOAD)}")
    out = []
    for i, (doc, name) in enumerate(zip(value, PAYLOAD, strict=True)):
        doc = _object(doc, f"members[{i}]", {"name", "bytes", "sha256"})
        if doc["name"] != name:
            raise _fail(f"members[{i}] is not {name}")
        size = _whole(doc["bytes"], f"members[{i}].bytes", 1, MAX_MEMBER)
        out.append(Member(name, size, _text(doc["sha256"], f"members[{i}].sha256", SHA256)))
    return tuple(out)


def parse_manifest(data: bytes) -> HostUpdate:
    """A host update's manifest from untrusted bytes: a :class:`HostUpdate`, or
    HostUpdateError; nothing else."""
    if len(data) > MAX_MANIFEST:
        raise _fail(f"more than {MAX_MANIFEST} bytes")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _fail("not JSON (a truncated or damaged copy?)") from None
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise HostUpdateError(
            f"not a host update: its manifest's kind is not {KIND!r}",
            hint="a guest image or another file was given where a host update belongs",
        )
    doc = _object(doc, "the manifest", TOP_FIELDS)
    if type(doc["format"]) is not int or doc["format"] != FORMAT:
        raise HostUpdateError(
            f"host update format {_shown(doc['format'])} is not the one this edgepin "
            f"reads ({FORMAT})",
            hint="build the host update with the edgepin release the node runs, or newer",
        )
    verity = _object(doc["verity"], "verity", VERITY_FIELDS)
    if verity["hash_algorithm"] != HASH:
        raise _fail(f"verity.hash_algorithm is not {HASH}")
    if verity["block_size"] != BLOCK or type(verity["block_size"]) is not int:
        raise _fail(f"verity.block_size is not {BLOCK}")
    data_bytes = _whole(verity["data_bytes"], "verity.data_bytes", BLOCK, MAX_MEMBER)
    if data_bytes % BLOCK:
        raise _fail(f"verity.data_bytes is not a multiple of {BLOCK}")
    measured = _object(doc["measured"], "measured", {"kernel_command_line"})
    lines = _object(measured["kernel_command_line"], "measured.kernel_command_line", set(SLOTS))
    for slot, line in lines.items():
        if not isinstance(line, str) or not line or len(line) > 4096 or not line.isprintable():
            raise _fail(
                f"measured.kernel_command_line.{slot} is not printable text of at most 4096"
            )
    update = HostUpdate(
        name=_text(doc["name"], "name", NAME, 63),
        host_version=_whole(doc["host_version"], "host_version", 1, MAX_HOST_VERSION),
        edgepin_version=_text(doc["edgepin_version"], "edgepin_version", VERSION_TEXT),
        kernel_version=_text(doc["kernel_version"], "kernel_version", VERSION_TEXT),
        verity=Verity(
            root_hash=_text(verity["root_hash"], "verity.root_hash", SHA256),
            salt=_text(verity["salt"], "verity.salt", SALT, 512),
            data_bytes=data_bytes,
        ),
        members=_members(doc["members"]),
        kernel_command_line={slot: lines[slot] for slot in SLOTS},
    )
    if update.member(ROOT).size > data_bytes:
        raise _fail("root.squashfs is larger than verity.data_bytes")
    for slot, line in update.kernel_command_line.items():
        words = line.split()
        if f"edgepin.roothash={update.verity.root_hash}" not in words:
            raise _fail(f"measured.kernel_command_line.{slot} does not carry verity.root_hash")
        if f"edgepin.slot={slot}" not in words:
            raise _fail(f"measured.kernel_command_line.{slot} does not name root slot {slot}")
    return update


TAR_BLOCK = 512
MAX_TAR_SIZE = 8**11 - 1  # what a ustar header's 11 octal digits hold


class _Stream:
    """An untrusted file read once, front to back; every byte read also goes to
    ``on_data`` (a signer and a hash, for ``edgepin host publish``), in order."""

    def __init__(self, f: IO[bytes], on_data: Callable[[bytes], None] | None) -> None:
        self._f, self._on_data = f, on_data

    def read(self, n: int, what: str) -> bytes:
        data = self._f.read(n)
        if self._on_data and data:
            self._on_data(data)
        if len(data) != n:
            raise HostUpdateError(f"the host update is truncated: in {what}")
        return data

    def digest(self, size: int, what: str) -> str:
        h = hashlib.sha256()
        left = size
        while left:
            chunk = self.read(min(left, 1 << 20), what)
            h.update(chunk)
            left -= len(chunk)
        return h.hexdigest()

    def rest_is_zeros(self) -> bool:
        """Whether what is left (the end-of-archive blocks) is zeros, two blocks at least."""
        seen = 0
        while chunk := self._f.read(1 << 16):
            if self._on_data:
                self._on_data(chunk)
            if chunk.count(0) != len(chunk):
                return False
            seen += len(chunk)
        return seen >= 2 * TAR_BLOCK and seen % TAR_BLOCK == 0


def _octal(field: bytes, what: str) -> int:
    digits = field.rstrip(b"\0 ")
    if not digits or len(digits) > 11 or not all(0x30 <= c <= 0x37 for c in digits):
        raise HostUpdateError(f"the host update's header of {what} is damaged")
    return int(digits, 8)


def _member(stream: _Stream, want: str) -> int:
    """The size of the next member, whose header must be a plain ustar header of a regular
    file named ``want``: no other kind of entry (links, folders, sparse or extended
    headers) is read."""
    block = stream.read(TAR_BLOCK, f"the header of {want}")
    if block.count(0) == TAR_BLOCK:
        raise HostUpdateError(f"the host update is truncated: no {want}")
    if sum(block[:148]) + 8 * 0x20 + sum(block[156:]) != _octal(block[148:156], want):
        raise HostUpdateError(f"the host update's header of {want} is damaged (checksum)")
    if block[257:265] != b"ustar\x0000":
        raise HostUpdateError("not a host update: not a ustar tar file")
    name = block[:100].rstrip(b"\0")
    shown = name.decode("ascii", "replace")[:64]
    if name != want.encode() or block[345:500].count(0) != 155:
        raise HostUpdateError(f"the host update's member {shown!r} is not {want}")
    if block[156:157] != b"0" or block[157:257].count(0) != 100:
        raise HostUpdateError(f"the host update's {want} is not a regular file")
    return _octal(block[124:136], want)


def _padding(stream: _Stream, size: int, what: str) -> None:
    pad = -size % TAR_BLOCK
    if pad and stream.read(pad, what).count(0) != pad:
        raise HostUpdateError(f"the host update has data after {what}")


def read(path: Path, on_data: Callable[[bytes], None] | None = None) -> HostUpdate:
    """A whole host update from an untrusted file, read once, front to back: its manifest
    parsed, every member in its place (plain ustar headers of regular files, in the
    format's order) with the size and sha256 the manifest gives, nothing after the last
    one but the end-of-archive zeros. HostUpdateError otherwise. Every byte read also goes
    to ``on_data``."""
    try:
        with path.open("rb") as f:
            stream = _Stream(f, on_data)
            try:
                size = _member(stream, MANIFEST)
            except HostUpdateError as e:
                raise HostUpdateError(
                    f"not a host update: it does not start with its {MANIFEST} ({e.message})"
                ) from None
            if size > MAX_MANIFEST:
                raise _fail(f"more than {MAX_MANIFEST} bytes")
            update = parse_manifest(stream.read(size, MANIFEST))
            _padding(stream, size, MANIFEST)
            for want in update.members:
                size = _member(stream, want.name)
                if size != want.size:
                    raise HostUpdateError(
                        f"{want.name} has {size} bytes, the manifest says {want.size}"
                    )
                if stream.digest(size, want.name) != want.sha256:
                    raise HostUpdateError(f"{want.name} is not what the manifest's sha256 says")
                _padding(stream, size, want.name)
            if not stream.rest_is_zeros():
                raise HostUpdateError(
                    "the host update has a member too many, or data after its last member"
                )
    except OSError as e:
        raise HostUpdateError(f"cannot read the host update {path}: {e.strerror}") from None
    return update


# ------------------------------------------------------------------ the writer


@dataclass(frozen=True)
class Superblock:
    """What a dm-verity superblock (format 1) says, as veritysetup wrote it."""

    algorithm: str
    data_block_size: int
    hash_block_size: int
    data_blocks: int
    salt: str


def superblock(f: IO[bytes], offset: int) -> Superblock:
    """The dm-verity superblock at ``offset``: magic, version 1, the hash algorithm, the
    block sizes, the data blocks and the salt."""
    f.seek(offset)
    sb = f.read(512)
    if len(sb) < 512 or sb[:8] != VERITY_MAGIC:
        raise HostUpdateError("the verity partition has no dm-verity superblock")
    version, hash_type = struct.unpack_from("<II", sb, 8)
    algorithm = sb[32:64].rstrip(b"\0").decode("ascii", "replace")
    data_bs, hash_bs, blocks, salt_size = struct.unpack_from("<IIQH", sb, 64)
    if version != 1 or hash_type != 1 or salt_size > 256:
        raise HostUpdateError("the verity partition's superblock is not version 1, hash type 1")
    return Superblock(algorithm, data_bs, hash_bs, blocks, sb[88 : 88 + salt_size].hex())


def hash_tree_size(f: IO[bytes], offset: int, size: int) -> int:
    """The bytes of the verity partition the hash tree takes: its superblock, then the
    levels; zero blocks after it. (The tree's last block holds at least one hash.)"""
    superblock(f, offset)
    end = size - size % BLOCK
    zero = bytes(BLOCK)
    while end > BLOCK:
        f.seek(offset + end - BLOCK)
        if f.read(BLOCK) != zero:
            break
        end -= BLOCK
    return end


def kernel_command_line(grub_cfg: str, slot: str, root_hash: str) -> str:
    """The command line the kernel gets from grub.cfg's ``linux`` line for root ``slot``
    (as ``/proc/cmdline`` shows it: GRUB joins the words with one space and puts
    ``BOOT_IMAGE=`` first), with the slot's root hash put in for its variable."""
    kernel = f"/slot-{slot}/{KERNEL}"
    for line in grub_cfg.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "linux" and words[1] == kernel:
            args = " ".join([f"BOOT_IMAGE={words[1]}", *words[2:]])
            for var in ("${edgepin_roothash}", "$edgepin_roothash"):
                args = args.replace(var, root_hash)
            return args
    raise HostUpdateError(f"grub.cfg has no linux line for {kernel}")


def _members_of(
    raw: Path,
    boot_dir: Path,
    root_part: tuple[int, int],
    root_bytes: int,
    verity_part: tuple[int, int],
) -> Iterator[tuple[str, Path, int, int]]:
    """(name, file, offset, size) of each payload member, in PAYLOAD's order."""
    kernel, initrd = boot_dir / KERNEL, boot_dir / INITRD
    yield KERNEL, kernel, 0, kernel.stat().st_size
    yield INITRD, initrd, 0, initrd.stat().st_size
    with raw.open("rb") as f:
        tree = hash_tree_size(f, *verity_part)
    yield VERITY, raw, verity_part[0], tree
    if root_bytes > root_part[1]:
        raise HostUpdateError("the squashfs is larger than the root partition")
    yield ROOT, raw, root_part[0], root_bytes


def write(
    out: Path,
    *,
    raw: Path,
    boot_dir: Path,
    root_part: tuple[int, int],
    root_bytes: int,
    verity_part: tuple[int, int],
    name: str,
    host_version: int,
    kernel_version: str,
    root_hash: str,
    epoch: int,
) -> HostUpdate:
    """Write the host update of a built disk (``raw``) to ``out``, whole or not at all."""
    parts = list(_members_of(raw, boot_dir, root_part, root_bytes, verity_part))
    members = []
    for member, path, offset, size in parts:
        if size > MAX_MEMBER:
            raise HostUpdateError(f"{member} has {size} bytes, more than a ustar member holds")
        with path.open("rb") as f:
            f.seek(offset)
            digest = _Stream(f, None).digest(size, member)
        members.append(Member(member, size, digest))
    with raw.open("rb") as f:
        sb = superblock(f, verity_part[0])
    if (sb.algorithm, sb.data_block_size, sb.hash_block_size) != (HASH, BLOCK, BLOCK) or (
        sb.data_blocks * BLOCK != root_part[1]
    ):
        raise HostUpdateError(
            f"the verity superblock ({sb.algorithm}, {sb.data_blocks} blocks of "
            f"{sb.data_block_size}) does not cover the root partition ({root_part[1]} bytes)"
        )
    grub_cfg = (boot_dir / "grub.cfg").read_text()
    update = HostUpdate(
        name=name,
        host_version=host_version,
        edgepin_version=__version__,
        kernel_version=kernel_version,
        verity=Verity(root_hash=root_hash, salt=sb.salt, data_bytes=root_part[1]),
        members=tuple(members),
        kernel_command_line={
            slot: kernel_command_line(grub_cfg, slot, root_hash) for slot in SLOTS
        },
    )
    manifest = (json.dumps(update.to_json(), indent=2) + "\n").encode()
    parse_manifest(manifest)  # what is written, the parser reads

    def info(member: str, size: int) -> tarfile.TarInfo:
        t = tarfile.TarInfo(member)
        t.size, t.mtime, t.mode, t.uid, t.gid, t.uname, t.gname = size, epoch, 0o644, 0, 0, "", ""
        return t

    part = out.with_name(out.name + ".part")
    try:
        with part.open("wb") as fileobj:
            with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                tar.addfile(info(MANIFEST, len(manifest)), io.BytesIO(manifest))
                for member, path, offset, size in parts:
                    with path.open("rb") as f:
                        f.seek(offset)
                        tar.addfile(info(member, size), f)  # exactly ``size`` bytes
            fileobj.flush()
            os.fsync(fileobj.fileno())
        if read(part) != update:  # the bytes written are the ones hashed
            raise HostUpdateError("the host update written does not read back as written")
        part.replace(out)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return update


def _pair(text: list[str]) -> tuple[int, int]:
    return int(text[0]), int(text[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m provisioner.hostupdate",
        description="Write or check a host update (run by ./build.sh image).",
    )
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write the host update of a built raw disk")
    w.add_argument("--out", type=Path, required=True)
    w.add_argument("--raw", type=Path, required=True, help="the built disk, raw")
    w.add_argument("--boot-dir", type=Path, required=True, help="vmlinuz, initrd.img and grub.cfg")
    w.add_argument("--root-partition", nargs=2, metavar=("OFFSET", "SIZE"), required=True)
    w.add_argument("--root-bytes", type=int, required=True, help="the squashfs's size")
    w.add_argument("--verity-partition", nargs=2, metavar=("OFFSET", "SIZE"), required=True)
    w.add_argument("--name", required=True)
    w.add_argument("--host-version", type=int, required=True)
    w.add_argument("--kernel-version", required=True)
    w.add_argument("--root-hash", required=True)
    w.add_argument("--epoch", type=int, required=True, help="SOURCE_DATE_EPOCH")
    c = sub.add_parser("check", help="read a host update and check every member")
    c.add_argument("file", type=Path)
    args = p.parse_args(argv)
    try:
        if args.command == "write":
            update = write(
                args.out,
                raw=args.raw,
                boot_dir=args.boot_dir,
                root_part=_pair(args.root_partition),
                root_bytes=args.root_bytes,
                verity_part=_pair(args.verity_partition),
                name=args.name,
                host_version=args.host_version,
                kernel_version=args.kernel_version,
                root_hash=args.root_hash,
                epoch=args.epoch,
            )
        else:
            update = read(args.file)
    except HostUpdateError as e:
        print(f"hostupdate: error: {e.message}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"hostupdate: error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 1
    print(json.dumps(update.to_json(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
