"""Shared pytest setup: the run directory, the test-bed plugins and the skip policy."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# No time limit on an example: the suite runs beside booted VMs on a shared two-core machine,
# where a signature check took 282 ms once (hypothesis' 200 ms deadline failed a test that
# was right); speed is measured by the benchmarks, not by the tests
settings.register_profile("edgepin", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("edgepin")

pytest_plugins = [
    "tests.testbed.fixtures_controlplane",
    "tests.testbed.fixtures_tpm",
    "tests.testbed.fixtures_libvirt",
]

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The one directory that everything a test session creates lives in."""
    explicit = os.environ.get("EDGEPIN_TEST_RUN_DIR")
    if explicit:
        path = Path(explicit)
        path.mkdir(parents=True, exist_ok=True)
    else:
        path = tmp_path_factory.mktemp("edgepin-run")
    yield path


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """Downloaded inputs (Debian packages for the tiny guest) kept between runs."""
    path = Path(os.environ.get("EDGEPIN_CACHE_DIR", REPO / ".cache"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    terminalreporter.section("skipped tests and why")
    for report in skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        terminalreporter.write_line(f"{report.nodeid}: {reason}")
    if os.environ.get("CI"):
        terminalreporter.write_line("CI forbids skipped tests: failing the run", red=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if os.environ.get("CI") and reporter is not None and reporter.stats.get("skipped"):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
