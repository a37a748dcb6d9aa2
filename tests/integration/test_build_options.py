"""``./build.sh image`` refuses bad option values before it installs or writes anything.

Running it with a bad value costs a bash process and touches nothing: no apt, no venv, no
output folder.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def build_image(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(REPO / "build.sh"), "image", *args, "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--reconcile-interval", "soon"),
        ("--reconcile-interval", "0"),
        ("--reconcile-interval", "0min"),
        ("--reconcile-interval", "5x"),
        ("--reconcile-interval", ""),
        ("--reconcile-delay", "later"),
        ("--reconcile-delay", "10 parsecs"),
        ("--reconcile-delay", "1h;reboot"),
    ],
)
def test_a_bad_time_span_is_refused_before_anything_is_built(
    tmp_path: Path, option: str, value: str
) -> None:
    done = build_image(tmp_path, option, value)
    assert done.returncode == 1, done
    assert f"build.sh: error: {option} must be a systemd time span" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["1h", "15min", "1h 30min", "90s", "2.5h"])
def test_a_good_time_span_passes_the_check(tmp_path: Path, value: str) -> None:
    # a good value gets past the option checks: --pins then names a missing file, which is
    # the next check, so nothing is installed or built
    missing = tmp_path / "no-such-pins.json"
    done = build_image(
        tmp_path, "--reconcile-interval", value, "--reconcile-delay", value, "--pins", str(missing)
    )
    assert done.returncode == 1, done
    assert "time span" not in done.stderr
    assert "--pins: no such file" in done.stderr


@pytest.mark.parametrize("value", ["", "all", "0-3", "0,", ",1", "0;1", "-1"])
def test_a_bad_reserved_cpu_list_is_refused_before_anything_is_built(
    tmp_path: Path, value: str
) -> None:
    done = build_image(tmp_path, "--reserved-cpus", value)
    assert done.returncode == 1, done
    assert "build.sh: error: --reserved-cpus must be a list of CPU numbers" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("option", "value"),
    [
        *(("--reserved-cpus", v) for v in ["0", "0,1", "2,3,10", "none"]),
        *(("--host-epoch", v) for v in ["0", "9", "63"]),
    ],
)
def test_a_good_value_passes_the_check(tmp_path: Path, option: str, value: str) -> None:
    missing = tmp_path / "no-such-pins.json"
    done = build_image(tmp_path, option, value, "--pins", str(missing))
    assert done.returncode == 1, done
    assert option not in done.stderr
    assert "--pins: no such file" in done.stderr


HOST_VERSION_ERROR = "--host-version must be a whole number above zero"
HOST_EPOCH_ERROR = "--host-epoch must be a whole number from 0 to 63"


@pytest.mark.parametrize(
    ("option", "value", "error"),
    [
        *(
            ("--host-version", v, HOST_VERSION_ERROR)
            for v in ["0", "-1", "1.5", "v2", "1234567890123456789", "1;reboot"]
        ),
        *(
            ("--host-epoch", v, HOST_EPOCH_ERROR)
            for v in ["-1", "64", "007", "1.5", "", "1;reboot"]
        ),
    ],
)
def test_a_bad_host_version_or_epoch_is_refused_before_anything_is_built(
    tmp_path: Path, option: str, value: str, error: str
) -> None:
    done = build_image(tmp_path, option, value)
    assert done.returncode == 1, done
    assert f"build.sh: error: {error}" in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_source_date_epoch_that_is_no_time_is_refused_before_anything_is_built(
    tmp_path: Path,
) -> None:
    done = subprocess.run(
        ["bash", str(REPO / "build.sh"), "image", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "SOURCE_DATE_EPOCH": "yesterday"},
    )
    assert done.returncode == 1, done
    assert "build.sh: error: SOURCE_DATE_EPOCH must be a time in seconds" in done.stderr
    assert not (tmp_path / "out").exists()
