"""The built disk's ESP holds the signed boot chain and nothing else, checked without booting.

What Secure Boot relies on, read from the disk as it leaves the build: the removable-media
boot loader is shim with an Authenticode signature under Microsoft's UEFI CA, beside it is
GRUB signed by Debian, no other EFI program is there (no MokManager, no fallback loader, no
unsigned GRUB), and the ESP's grub.cfg locks GRUB's command line before it looks for the
root. The boot itself under Secure Boot, and the refusal of a changed boot loader:
tests/image/test_host_image.py.
"""

from __future__ import annotations

import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from tests.testbed import disk

pytestmark = pytest.mark.image

SHIM, GRUB, GRUB_CFG = "EFI/BOOT/BOOTX64.EFI", "EFI/BOOT/grubx64.efi", "EFI/debian/grub.cfg"
WIN_CERT_TYPE_PKCS_SIGNED_DATA = 0x0002


@pytest.fixture(scope="module")
def raw(host_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("boot-chain") / "disk.raw"
    disk.to_raw(host_image, path)
    yield path
    path.unlink(missing_ok=True)


def esp_files(raw: Path) -> list[str]:
    offset, _ = disk.partition(raw, "ESP")
    r = subprocess.run(
        ["mdir", "-/", "-b", "-i", f"{raw}@@{offset}", "::/"],
        capture_output=True,
        text=True,
        env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"},
        check=True,
    )
    return sorted(
        line.removeprefix("::/") for line in r.stdout.splitlines() if not line.endswith("/")
    )


def der(blob: bytes) -> bytes:
    """The DER SEQUENCE at the start of ``blob``, without the padding that follows it."""
    assert blob[0] == 0x30, "not a DER SEQUENCE"
    if blob[1] < 0x80:
        return blob[: 2 + blob[1]]
    n = blob[1] & 0x7F
    return blob[: 2 + n + int.from_bytes(blob[2 : 2 + n], "big")]


def signers(pe: bytes) -> list[str]:
    """The common names of every certificate in a PE file's Authenticode signatures."""
    assert pe[:2] == b"MZ", "not a PE file"
    (pe_offset,) = struct.unpack_from("<I", pe, 0x3C)
    assert pe[pe_offset : pe_offset + 4] == b"PE\0\0", "no PE header"
    optional = pe_offset + 24
    magic = struct.unpack_from("<H", pe, optional)[0]
    assert magic == 0x20B, f"not PE32+ (magic {magic:#x})"
    # the data directories follow PE32+'s 112-byte optional header; the 5th is the
    # certificate table (a file offset and a size)
    cert_offset, cert_size = struct.unpack_from("<II", pe, optional + 112 + 4 * 8)
    names: list[str] = []
    pos, end = cert_offset, cert_offset + cert_size
    assert cert_size > 0 and end <= len(pe), "no certificate table: the file is not signed"
    while pos + 8 <= end:
        length, _revision, kind = struct.unpack_from("<IHH", pe, pos)
        assert kind == WIN_CERT_TYPE_PKCS_SIGNED_DATA, f"certificate type {kind:#x}"
        for cert in pkcs7.load_der_pkcs7_certificates(der(pe[pos + 8 : pos + length])):
            for attr in cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME):
                names.append(f"issuer:{attr.value!s}")
            for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
                names.append(f"subject:{attr.value!s}")
        pos += (length + 7) & ~7  # entries are 8-byte aligned
    return names


def test_the_esp_holds_the_signed_chain_and_no_other_efi_program(raw: Path) -> None:
    files = esp_files(raw)
    programs = [f for f in files if f.lower().endswith(".efi")]
    assert programs == sorted([SHIM, GRUB]), files
    assert GRUB_CFG in files, files


def test_shim_is_signed_under_microsofts_uefi_ca(raw: Path) -> None:
    names = signers(disk.esp_file(raw, SHIM))
    assert "issuer:Microsoft Corporation UEFI CA 2011" in names, names


def test_grub_is_signed_by_debian(raw: Path) -> None:
    names = signers(disk.esp_file(raw, GRUB))
    assert any(n.startswith("issuer:Debian Secure Boot CA") for n in names), names


def test_the_esp_grub_cfg_locks_the_command_line_before_it_finds_the_root(raw: Path) -> None:
    """Should the root not be found, GRUB would stop at its command line: a superuser with
    no password is set first, so that command line asks for a login no one has."""
    lines = [ln.strip() for ln in disk.esp_file(raw, GRUB_CFG).decode().splitlines()]
    assert lines[:2] == ['set superusers="edgepin"', "export superusers"], lines
    search = [ln for ln in lines if ln.startswith("search.fs_uuid ")]
    assert len(search) == 1 and search[0].endswith(" root"), lines
    assert lines[-1] == "configfile $prefix/grub.cfg", lines
    assert not any(ln.startswith(("password", "insmod")) for ln in lines), lines
