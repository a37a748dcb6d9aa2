"""Fixtures for the TPM part of the test bed: a swtpm per test node."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.testbed.process import alive
from tests.testbed.swtpm import Swtpm, SwtpmFactory


@pytest.fixture(scope="session")
def swtpm_factory(run_dir: Path) -> Iterator[SwtpmFactory]:
    # a folder per session: the child sessions of tests/integration/test_debian_libs.py
    # share the run directory, and each session numbers its TPMs from the start
    base = Path(tempfile.mkdtemp(prefix="swtpm-", dir=run_dir))
    factory = SwtpmFactory(base)
    yield factory
    pids = [t.pid for t in factory.created if t.pid]
    factory.stop_all()
    left = [p for p in pids if p and alive(p)]
    assert not left, f"swtpm processes left behind: {left}"


@pytest.fixture
def swtpm(swtpm_factory: SwtpmFactory, request: pytest.FixtureRequest) -> Iterator[Swtpm]:
    """A fresh, manufactured TPM 2.0 for one test."""
    name = request.node.name.replace("[", "-").replace("]", "")[:40]
    tpm = swtpm_factory.create(f"{name}-{len(swtpm_factory.created)}")
    yield tpm
    tpm.stop()


@pytest.fixture
def make_swtpm(swtpm_factory: SwtpmFactory) -> Iterator[Callable[[str], Swtpm]]:
    made: list[Swtpm] = []

    def make(name: str) -> Swtpm:
        tpm = swtpm_factory.create(f"{name}-{len(swtpm_factory.created)}")
        made.append(tpm)
        return tpm

    yield make
    for tpm in made:
        tpm.stop()
