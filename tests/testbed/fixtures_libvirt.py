"""Fixtures for the libvirt part of the test bed: isolated libvirtd pairs, the tiny guest."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.testbed.guest import build_tiny_guest
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
    """Build a tiny guest: ``tiny_guest(marker, behaviour="run", net_url=None) -> Path``
    (qcow2; see tests/testbed/guest.py for ``net_url``)."""
    counter = itertools.count()

    def build(marker: str, behaviour: str = "run", net_url: str | None = None) -> Path:
        out = run_dir / "guests" / f"{marker}-{behaviour}-{next(counter)}.qcow2"
        return build_tiny_guest(cache_dir, out, marker, behaviour, net_url)

    return build
