"""Fixtures for the libvirt part of the test bed: isolated libvirtd pairs, the tiny guest."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.testbed.guest import build_bare_guest, build_ipxe_guest, build_tiny_guest
from tests.testbed.libvirtd import Libvirtd
from tests.testbed.process import alive


@pytest.fixture(scope="session")
def libvirtd_factory(run_dir: Path) -> Iterator[Callable[[str], Libvirtd]]:
    made: list[Libvirtd] = []
    counter = itertools.count()

    def make(name: str) -> Libvirtd:
        d = Libvirtd(run_dir / "libvirt" / f"{name}-{next(counter)}")
        d.start()
        made.append(d)
        return d

    yield make
    pids = [p for d in made for p in d.pids()]
    for d in made:
        d.stop()
    left = [p for p in pids if alive(p)]
    assert not left, f"libvirt/qemu processes left behind: {left}"


@pytest.fixture
def libvirtd(libvirtd_factory: Callable[[str], Libvirtd]) -> Iterator[Libvirtd]:
    d = libvirtd_factory("node")
    yield d
    d.stop()


@pytest.fixture(scope="session")
def tiny_guest(run_dir: Path, cache_dir: Path) -> Callable[..., Path]:
    """Build a tiny guest: ``tiny_guest(marker, behaviour="run", net_url=None, kind="linux")
    -> Path`` (qcow2; tests/testbed/guest.py). ``kind``: ``linux`` (Debian's kernel and a
    busybox initramfs; with ``net_url``, DHCP and a GET of that URL), ``ipxe`` (iPXE and a
    script; ``net_url`` a URL as for linux, or ``host`` for a lease from the host) or
    ``bare`` (a boot sector that prints the marker and halts). The last two only run."""
    counter = itertools.count()

    def build(
        marker: str, behaviour: str = "run", net_url: str | None = None, kind: str = "linux"
    ) -> Path:
        out = run_dir / "guests" / f"{marker}-{behaviour}-{next(counter)}.qcow2"
        if kind not in ("linux", "ipxe", "bare"):
            raise ValueError(f"no tiny guest of kind {kind!r}: linux, ipxe or bare")
        if kind != "linux" and behaviour != "run":
            raise ValueError(f"a {kind} guest only runs")
        if kind == "bare":
            if net_url:
                raise ValueError("a bare guest has no network")
            return build_bare_guest(cache_dir, out, marker)
        if kind == "ipxe":
            return build_ipxe_guest(cache_dir, out, marker, net_url)
        return build_tiny_guest(cache_dir, out, marker, behaviour, net_url)

    return build
