"""The tiny guest boots as a libvirt domain under software emulation; libvirtds are isolated."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.testbed.libvirtd import Libvirtd
from tests.testbed.process import alive

pytestmark = pytest.mark.integration


def domain_xml(name: str, disk: Path, serial_log: Path) -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='pty'><log file='{serial_log}' append='off'/><target port='0'/></serial>
  </devices>
</domain>"""


def wait_for(path: Path, needle: bytes, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    data = b""
    while time.monotonic() < deadline:
        data = path.read_bytes() if path.exists() else b""
        if needle in data:
            return data
        time.sleep(0.25)
    tail = data[-1500:].decode(errors="replace")
    raise AssertionError(f"{needle!r} not on the serial console after {timeout}s; tail:\n{tail}")


def test_tiny_guest_boots_and_prints_marker(
    libvirtd: Libvirtd, tiny_guest: Callable[..., Path], run_dir: Path
) -> None:
    marker = secrets.token_hex(6)
    disk = tiny_guest(marker)
    log = run_dir / f"serial-{marker}.log"
    conn = libvirtd.connect()
    try:
        dom = conn.defineXML(domain_xml(f"tiny-{marker}", disk, log))
        dom.create()
        data = wait_for(log, f"EDGEPIN-GUEST-MARKER {marker}".encode(), 90)
        assert b"EDGEPIN-GUEST-MARKER" in data
        assert dom.isActive()
        dom.destroy()
        dom.undefine()
    finally:
        conn.close()


def test_poweroff_guest_stops_itself(
    libvirtd: Libvirtd, tiny_guest: Callable[..., Path], run_dir: Path
) -> None:
    marker = secrets.token_hex(6)
    disk = tiny_guest(marker, "poweroff")
    log = run_dir / f"serial-{marker}.log"
    conn = libvirtd.connect()
    try:
        dom = conn.defineXML(domain_xml(f"off-{marker}", disk, log))
        dom.create()
        wait_for(log, marker.encode(), 90)
        deadline = time.monotonic() + 60
        while dom.isActive() and time.monotonic() < deadline:
            time.sleep(0.25)
        assert not dom.isActive(), "the poweroff guest is still running"
    finally:
        conn.close()


def test_two_libvirtds_are_isolated(libvirtd_factory: Callable[[str], Libvirtd]) -> None:
    a, b = libvirtd_factory("iso-a"), libvirtd_factory("iso-b")
    ca, cb = a.connect(), b.connect()
    try:
        ca.defineXML(domain_xml("only-in-a", Path("/nonexistent.qcow2"), a.base_dir / "s.log"))
        assert [d.name() for d in ca.listAllDomains()] == ["only-in-a"]
        assert cb.listAllDomains() == []
    finally:
        ca.close()
        cb.close()
    pids = a.pids()
    a.stop()
    b.stop()
    assert pids and not [p for p in pids if alive(p)]
    assert not Path("/etc/libvirt/qemu/only-in-a.xml").exists()
