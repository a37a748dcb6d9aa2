"""The host update (provisioner/hostupdate.py): written from a disk's parts, read back with
every member checked; any bytes, any manifest, any cut or changed file gives a host update
or edgepin's own error. The disk here is a file laid out as a built disk's partitions are
(a dm-verity superblock and hash blocks, a root, zeros); the image tier writes and reads
the real one (tests/image/test_verity.py)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from provisioner import hostupdate
from provisioner.errors import HostUpdateError, ImageError
from tests import hostupdates
from tests.unit.fakes import json_values

BLOCK = hostupdate.BLOCK
ROOT_HASH = hostupdates.ROOT_HASH
SALT = hostupdates.SALT
KVER = hostupdates.KVER
disk = hostupdates.disk
write = hostupdates.write


def good() -> dict[str, Any]:
    return {
        "kind": hostupdate.KIND,
        "format": hostupdate.FORMAT,
        "name": "edgepin-host",
        "host_version": 7,
        "edgepin_version": "0.1.0",
        "kernel_version": KVER,
        "verity": {
            "root_hash": ROOT_HASH,
            "salt": SALT.hex(),
            "hash_algorithm": "sha256",
            "block_size": BLOCK,
            "data_bytes": 16 * BLOCK,
        },
        "members": [{"name": n, "bytes": 100, "sha256": "0" * 64} for n in hostupdate.PAYLOAD],
        "measured": {
            "kernel_command_line": {
                slot: f"ro edgepin.slot={slot} edgepin.roothash={ROOT_HASH} panic=0"
                for slot in hostupdate.SLOTS
            }
        },
    }


# ------------------------------------------------------------------ writing


def test_the_update_holds_the_disk_s_parts_in_order_and_reads_back(tmp_path: Path) -> None:
    out, update, d = write(tmp_path)
    assert not out.with_name(out.name + ".part").exists()
    with tarfile.open(out) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [hostupdate.MANIFEST, *hostupdate.PAYLOAD]
        assert {(m.mtime, m.uid, m.gid, m.mode, m.uname) for m in members} == {
            (1764940000, 0, 0, 0o644, "")
        }
        squashfs = tar.extractfile(hostupdate.ROOT)
        verity = tar.extractfile(hostupdate.VERITY)
        assert squashfs is not None and verity is not None
        # the squashfs without the zeros after it; the tree without the zeros after it
        assert squashfs.read() == d["root"]
        assert verity.read() == d["tree"]
    assert hostupdate.read(out) == update
    assert update.verity.salt == SALT.hex()
    assert update.verity.data_bytes == 16 * BLOCK
    assert update.member(hostupdate.KERNEL).sha256 == hashlib.sha256(b"kernel" * 100).hexdigest()
    # as the kernel gets it: BOOT_IMAGE first, one space between words, the root hash in
    assert update.kernel_command_line == {
        slot: f"BOOT_IMAGE=/slot-{slot}/vmlinuz root=/dev/mapper/edgepin-root ro "
        f"edgepin.slot={slot} edgepin.roothash={ROOT_HASH} panic=0"
        for slot in hostupdate.SLOTS
    }


def test_the_same_parts_give_the_same_bytes(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, _, _ = write(tmp_path / "a")
    b, _, _ = write(tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()


def test_a_disk_whose_parts_do_not_fit_gives_no_update(tmp_path: Path) -> None:
    d = disk(tmp_path)
    out = tmp_path / "u.tar"
    common = {
        "raw": d["raw"],
        "boot_dir": d["boot_dir"],
        "name": "edgepin-host",
        "host_version": 1,
        "kernel_version": KVER,
        "root_hash": ROOT_HASH,
        "epoch": 0,
    }
    # the verity superblock covers another size than the root partition
    with pytest.raises(HostUpdateError, match="does not cover the root partition"):
        hostupdate.write(
            out,
            **common,
            root_part=(BLOCK, 8 * BLOCK),
            root_bytes=100,
            verity_part=d["verity_part"],
        )
    # no superblock where the verity partition should be
    with pytest.raises(HostUpdateError, match="no dm-verity superblock"):
        hostupdate.write(
            out, **common, root_part=d["root_part"], root_bytes=100, verity_part=(0, BLOCK)
        )
    # no linux line for slot b's kernel in grub.cfg
    grub_cfg = d["boot_dir"] / "grub.cfg"
    grub_cfg.write_text(grub_cfg.read_text().replace("/slot-b/", "/slot-c/"))
    with pytest.raises(HostUpdateError, match="no linux line for /slot-b/vmlinuz"):
        hostupdate.write(
            out,
            **common,
            root_part=d["root_part"],
            root_bytes=d["root_bytes"],
            verity_part=d["verity_part"],
        )


# ------------------------------------------------------------------ reading


def test_a_cut_update_is_refused_at_any_length(tmp_path: Path) -> None:
    out, _, _ = write(tmp_path)
    data = out.read_bytes()
    with tarfile.open(out) as tar:
        last = tar.getmembers()[-1]
    end = last.offset_data + last.size  # after it: the end-of-archive blocks, zeros
    cut = tmp_path / "cut.tar"
    for n in [0, 1, 511, 512, 1024, 2048, *range(0, end, 1531), end - 1]:
        cut.write_bytes(data[:n])
        with pytest.raises(HostUpdateError):
            hostupdate.read(cut)


def test_a_changed_byte_in_any_member_is_refused(tmp_path: Path) -> None:
    out, _, _ = write(tmp_path)
    data = bytearray(out.read_bytes())
    with tarfile.open(out) as tar:
        offsets = [m.offset_data for m in tar.getmembers()[1:]]
    changed = tmp_path / "changed.tar"
    for offset in offsets:
        flipped = bytearray(data)
        flipped[offset + 3] ^= 0x01
        changed.write_bytes(flipped)
        with pytest.raises(HostUpdateError, match="is not what the manifest's sha256 says"):
            hostupdate.read(changed)


def tar_of(tmp_path: Path, members: list[tuple[str, bytes]]) -> Path:
    path = tmp_path / "made.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_members_out_of_place_missing_or_too_many_are_refused(tmp_path: Path) -> None:
    out, _, _ = write(tmp_path)
    with tarfile.open(out) as tar:
        parts = []
        for m in tar.getmembers():
            f = tar.extractfile(m)
            assert f is not None
            parts.append((m.name, f.read()))
    cases = {
        "'initrd.img' is not vmlinuz": [parts[0], parts[2], parts[1], *parts[3:]],
        "truncated: no root.squashfs": parts[:-1],
        "a member too many": [*parts, ("extra", b"x")],
        "does not start with its manifest.json": parts[1:],
        "'../../etc/passwd' is not root.squashfs": [
            *parts[:-1],
            ("../../etc/passwd", parts[-1][1]),
        ],
    }
    for why, members in cases.items():
        with pytest.raises(HostUpdateError, match=re.escape(why)):
            hostupdate.read(tar_of(tmp_path, members))


def test_a_guest_image_or_another_file_is_not_a_host_update(tmp_path: Path) -> None:
    qcow2 = tmp_path / "guest.qcow2"
    qcow2.write_bytes(b"QFI\xfb" + bytes(4096))
    with pytest.raises(HostUpdateError, match="not a host update"):
        hostupdate.read(qcow2)
    guest_manifest = json.dumps({"kind": "edgepin-bundle", "version": 1}).encode()
    with pytest.raises(HostUpdateError, match="not a host update") as e:
        hostupdate.read(tar_of(tmp_path, [(hostupdate.MANIFEST, guest_manifest)]))
    assert isinstance(e.value, ImageError)
    with pytest.raises(HostUpdateError, match="cannot read"):
        hostupdate.read(tmp_path / "absent.tar")


def test_a_manifest_reads_back_and_a_wrong_one_says_why() -> None:
    update = hostupdate.parse_manifest(json.dumps(good()).encode())
    assert hostupdate.parse_manifest(json.dumps(update.to_json()).encode()) == update
    assert update.host_version == 7
    cases: dict[str, tuple[Any, str]] = {
        "format": ({"format": 2}, "format 2 is not the one"),
        "version 0": ({"host_version": 0}, "host_version is not a whole number"),
        "version text": ({"host_version": "7"}, "host_version is not a whole number"),
        "version bool": ({"host_version": True}, "host_version is not a whole number"),
        "other hash": (
            {
                "measured": {
                    "kernel_command_line": {
                        "a": f"edgepin.slot=a edgepin.roothash={ROOT_HASH}",
                        "b": "edgepin.slot=b edgepin.roothash=" + "cd" * 32,
                    }
                }
            },
            "kernel_command_line.b does not carry verity.root_hash",
        ),
        "other slot": (
            {
                "measured": {
                    "kernel_command_line": {
                        slot: f"edgepin.slot=a edgepin.roothash={ROOT_HASH}" for slot in "ab"
                    }
                }
            },
            "kernel_command_line.b does not name root slot b",
        ),
        "one slot": (
            {"measured": {"kernel_command_line": f"edgepin.roothash={ROOT_HASH}"}},
            "kernel_command_line",
        ),
        "unknown": ({"extra": 1}, "unknown fields"),
        "members": ({"members": good()["members"][::-1]}, "members\\[0\\] is not vmlinuz"),
    }
    for change, match in cases.values():
        with pytest.raises(HostUpdateError, match=match):
            hostupdate.parse_manifest(json.dumps({**good(), **change}).encode())
    doc = good()
    doc["members"][3]["bytes"] = 17 * BLOCK
    with pytest.raises(HostUpdateError, match=r"larger than verity\.data_bytes"):
        hostupdate.parse_manifest(json.dumps(doc).encode())
    with pytest.raises(HostUpdateError, match="more than"):
        hostupdate.parse_manifest(b" " * (hostupdate.MAX_MANIFEST + 1))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_bytes_give_a_manifest_or_a_host_update_error(data: bytes) -> None:
    try:
        hostupdate.parse_manifest(data)
    except HostUpdateError:
        pass


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(st.sampled_from(sorted(hostupdate.TOP_FIELDS)), json_values, max_size=3),
    st.dictionaries(st.sampled_from(sorted(hostupdate.VERITY_FIELDS)), json_values, max_size=2),
)
def test_any_field_replaced_gives_a_manifest_or_a_host_update_error(
    top: dict[str, Any], verity: dict[str, Any]
) -> None:
    doc = {**good(), **top}
    if isinstance(doc.get("verity"), dict):
        doc["verity"] = {**doc["verity"], **verity}
    try:
        parsed = hostupdate.parse_manifest(json.dumps(doc).encode())
    except HostUpdateError:
        return
    assert hostupdate.parse_manifest(json.dumps(parsed.to_json()).encode()) == parsed


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=4096), st.integers(min_value=0, max_value=8192))
def test_any_file_gives_a_host_update_or_a_host_update_error(
    tmp_path_factory: pytest.TempPathFactory, noise: bytes, at: int
) -> None:
    tmp = tmp_path_factory.mktemp("any")
    good_tar = tar_of(tmp, [(hostupdate.MANIFEST, json.dumps(good()).encode())])
    data = bytearray(good_tar.read_bytes())
    data[at : at + len(noise)] = noise
    path = tmp / "any.tar"
    path.write_bytes(bytes(data))
    try:
        hostupdate.read(path)
    except HostUpdateError:
        pass


def test_the_command_checks_a_file_and_says_why_it_refuses_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, update, _ = write(tmp_path)
    assert hostupdate.main(["check", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == update.to_json()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(out.read_bytes()[:5000])
    assert hostupdate.main(["check", str(cut)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hostupdate: error: ") and len(err.splitlines()) == 1, err


def pax_or_gnu(kind: bytes, size: int) -> bytes:
    """A tar header of another kind (pax 'x', GNU long name 'L', sparse 'S') whose size
    field says ``size`` in base 256, as tarfile reads it."""
    block = bytearray(512)
    block[:13] = b"manifest.json"
    block[100:108] = b"0000644\0"
    block[124:136] = b"\x80" + size.to_bytes(11, "big")
    block[156:157] = kind
    block[257:265] = b"ustar\x0000"
    block[148:156] = b"        "
    block[148:156] = f"{sum(block):06o}\0 ".encode()
    return bytes(block) + bytes(1024)


def test_other_kinds_of_tar_entries_are_refused_without_reading_them(tmp_path: Path) -> None:
    """Extended (pax) and GNU headers with huge sizes, sparse members, links and folders:
    each a HostUpdateError, at once (tarfile would read a 2**40-byte pax header into
    memory, or expand a sparse member)."""
    path = tmp_path / "odd.tar"
    for kind in (b"x", b"g", b"L", b"S", b"1", b"2", b"5"):
        for size in (100, 2**40, 2**80):
            path.write_bytes(pax_or_gnu(kind, size))
            with pytest.raises(HostUpdateError, match="not a host update"):
                hostupdate.read(path)


def test_a_sparse_or_linked_member_is_refused(tmp_path: Path) -> None:
    out, _, _ = write(tmp_path)
    data = bytearray(out.read_bytes())
    with tarfile.open(out) as tar:
        kernel = tar.getmembers()[1]
    header = kernel.offset
    changed = tmp_path / "changed.tar"
    for kind in (b"S", b"1", b"2", b"7"):
        block = bytearray(data[header : header + 512])
        block[156:157] = kind
        block[148:156] = b"        "
        block[148:156] = f"{sum(block):06o}\0 ".encode()
        changed.write_bytes(bytes(data[:header] + block + data[header + 512 :]))
        with pytest.raises(HostUpdateError, match="vmlinuz is not a regular file"):
            hostupdate.read(changed)


def test_anything_after_the_last_member_is_refused(tmp_path: Path) -> None:
    out, _, _ = write(tmp_path)
    data = out.read_bytes()
    changed = tmp_path / "changed.tar"
    for tail in (b"\x01", b"\x01" * 512, bytes(512) + b"garbage".ljust(512, b"\0")):
        changed.write_bytes(data + tail)
        with pytest.raises(HostUpdateError, match="data after its last member"):
            hostupdate.read(changed)
    # fewer than the two end-of-archive blocks
    with tarfile.open(out) as tar:
        last = tar.getmembers()[-1]
    end = last.offset_data + last.size + (-last.size % 512)
    changed.write_bytes(data[: end + 512])
    with pytest.raises(HostUpdateError):
        hostupdate.read(changed)


def test_every_byte_read_goes_to_the_callback_once_in_order(tmp_path: Path) -> None:
    out, update, _ = write(tmp_path)
    seen = hashlib.sha512()
    assert hostupdate.read(out, seen.update) == update
    assert seen.hexdigest() == hashlib.sha512(out.read_bytes()).hexdigest()


def test_a_write_that_fails_after_it_began_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = hostupdate.read

    def read_back_otherwise(path: Path, on_data: Any = None) -> hostupdate.HostUpdate:
        assert path.name.endswith(".part") and path.stat().st_size > 0  # it was written
        return replace(real(path), host_version=1)

    monkeypatch.setattr(hostupdate, "read", read_back_otherwise)
    with pytest.raises(HostUpdateError, match="does not read back as written"):
        write(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.tar*")) == []
