"""The node's TPM code against the library versions the host image ships (Debian trixie's
python3-tpm2-pytss and python3-cryptography), older than the dev venv's pins: the same
tests as tests/integration/test_tpm.py, run in a child pytest with those versions first
on the path. Three bugs reached the booted image before this ran in the integration tier."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
LIBS = ROOT / ".venv-trixie-libs"
PINS = ROOT / "tests" / "requirements" / "debian-trixie.txt"


def pinned() -> dict[str, str]:
    lines = [ln.split("#")[0].strip() for ln in PINS.read_text().splitlines()]
    return dict(ln.split("==") for ln in lines if ln)


def test_tpm_code_on_debian_trixies_libraries(tmp_path: Path) -> None:
    assert LIBS.is_dir(), f"{LIBS} is missing: ./build.sh setup installs it"
    env = {**os.environ, "PYTHONPATH": str(LIBS)}
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import tpm2_pytss, cryptography; "
            "from importlib.metadata import version; "
            "print(tpm2_pytss.__file__); print(version('tpm2-pytss'), version('cryptography'))",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    where, versions = probe.stdout.splitlines()
    assert where.startswith(str(LIBS)), where
    pins = pinned()
    assert versions.split() == [pins["tpm2-pytss"], pins["cryptography"]], versions
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-W",
            "ignore::DeprecationWarning",
            f"--basetemp={tmp_path / 'child'}",
            str(ROOT / "tests" / "integration" / "test_tpm.py"),
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
        check=False,
    )
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-2000:]}"
    assert " passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-500:]
