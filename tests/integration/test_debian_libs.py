"""The node's code against the library versions the host image ships (Debian trixie's
python3-* packages: tpm2-pytss, cryptography, keystoneauth1, requests, libvirt, ...),
older than the dev venv's pins: tests/integration/test_tpm.py, and the node commands of
the main node tests, run in a child pytest with those versions first on the path. Three
bugs reached the booted image before this ran in the integration tier."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
LIBS = ROOT / ".venv-trixie-libs"
PINS = ROOT / "tests" / "requirements" / "debian-trixie.txt"


def pinned() -> dict[str, str]:
    lines = [ln.split("#")[0].strip() for ln in PINS.read_text().splitlines()]
    return dict(ln.split("==") for ln in lines if ln)


def probe(env: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Where the venv's interpreter (the one the edgepin console script runs) finds each
    pinned library under ``env``, and at which version."""
    code = (
        "import importlib, json, sys\n"
        "from importlib.metadata import version\n"
        "mods = {'tpm2-pytss': 'tpm2_pytss', 'cryptography': 'cryptography',\n"
        "        'keystoneauth1': 'keystoneauth1', 'requests': 'requests',\n"
        "        'urllib3': 'urllib3', 'tenacity': 'tenacity', 'libvirt-python': 'libvirt'}\n"
        "print(json.dumps({d: [importlib.import_module(m).__file__, version(d)]\n"
        "                  for d, m in mods.items()}))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return {k: (v[0], v[1]) for k, v in json.loads(r.stdout).items()}


def child_pytest(env: dict[str, str], *targets: str) -> str:
    # a short base: libvirtd's socket path under it must fit a unix socket (108 bytes)
    base = Path(tempfile.mkdtemp(prefix="edgepin-deb-"))
    try:
        return _child_pytest(base, env, *targets)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _child_pytest(base: Path, env: dict[str, str], *targets: str) -> str:
    # a run folder of its own: the session's (EDGEPIN_TEST_RUN_DIR, when set) holds this
    # session's control plane, swtpms and libvirtd
    env = {**env, "EDGEPIN_TEST_RUN_DIR": str(base / "run")}
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
            f"--basetemp={base}",
            *targets,
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=1800,
        check=False,
    )
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-2000:]}"
    assert " passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-500:]
    return r.stdout


def test_the_node_libraries_are_debians_versions() -> None:
    assert LIBS.is_dir(), f"{LIBS} is missing: ./build.sh setup installs it"
    found = probe({**os.environ, "PYTHONPATH": str(LIBS)})
    pins = pinned()
    for dist, (where, version) in found.items():
        assert where.startswith(str(LIBS)), (dist, where)
        assert version == pins[dist], (dist, version)


def test_tpm_code_on_debian_trixies_libraries() -> None:
    """Sealing, the anchor, the state vault (its key in the TPM, the `edgepin node
    vault` processes), and the salted, encrypted sessions seen from the bus, on Debian's
    tpm2-pytss."""
    env = {
        **os.environ,
        "PYTHONPATH": str(LIBS),
        "EDGEPIN_TEST_NODE_PYTHONPATH": str(LIBS),
    }
    child_pytest(
        env,
        str(ROOT / "tests" / "integration" / "test_tpm.py"),
        str(ROOT / "tests" / "integration" / "test_vault.py"),
        str(ROOT / "tests" / "integration" / "test_tpm_bus.py"),
    )


def test_signed_assignments_on_debian_trixies_libraries() -> None:
    """Every refusal of an assignment, and arbitrary records, with Debian's cryptography
    verifying the signatures."""
    env = {**os.environ, "PYTHONPATH": str(LIBS)}
    child_pytest(env, str(ROOT / "tests" / "unit" / "test_assignment.py"))


def test_transport_and_kept_token_on_debian_trixies_libraries() -> None:
    """The retrying adapter on Debian's requests, urllib3 and tenacity; the kept token on
    its keystoneauth1 (real TLS connections on loopback; keystoneauth's identity plugin)."""
    env = {**os.environ, "PYTHONPATH": str(LIBS)}
    child_pytest(
        env,
        str(ROOT / "tests" / "integration" / "test_transport.py"),
        str(ROOT / "tests" / "unit" / "test_transport.py"),
        str(ROOT / "tests" / "unit" / "test_token.py"),
    )


def test_node_commands_on_debian_trixies_libraries() -> None:
    """Enrollment, a first guest, nothing to do, an offline reboot, an update, a rollback,
    hostile assignments and a rollback attack, with every `edgepin node ...` process on
    Debian's library versions (the test bed around them on the venv's)."""
    env = {**os.environ, "EDGEPIN_TEST_NODE_PYTHONPATH": str(LIBS)}
    node_tests = ROOT / "tests" / "integration" / "test_node.py"
    child_pytest(
        env,
        f"{node_tests}::test_seed_to_running_guest_then_nothing_to_do",
        f"{node_tests}::test_offline_reboot_update_rollback_and_rollback_attack",
        f"{node_tests}::test_the_node_keeps_its_token_in_memory_and_a_revoked_node_is_refused_at_once",
    )


def test_bundles_on_debian_trixies_libraries() -> None:
    """An air-gapped bundle run with the control plane stopped, and every refusal of one,
    with `edgepin node import` on Debian's library versions (the key unwrapped by its
    tpm2-pytss, the image and the assignment verified by its cryptography)."""
    env = {**os.environ, "EDGEPIN_TEST_NODE_PYTHONPATH": str(LIBS)}
    bundles = ROOT / "tests" / "integration" / "test_bundle.py"
    child_pytest(
        env,
        f"{bundles}::test_a_bundle_runs_the_guest_with_no_network_and_the_node_reports_it_later",
        f"{bundles}::test_a_bundle_for_another_node_a_tampered_truncated_or_older_one_is_refused",
    )


def test_offline_enrollment_on_debian_trixies_libraries() -> None:
    """A node enrolled with `edgepin enroll --offline`: its seed unwrapped and sealed, the
    refusals of a seed for another TPM or other PCR values, a bundle run with the control
    plane stopped and the reconcile that joins the fleet, with `edgepin node ...` on
    Debian's library versions."""
    env = {**os.environ, "EDGEPIN_TEST_NODE_PYTHONPATH": str(LIBS)}
    child_pytest(env, str(ROOT / "tests" / "integration" / "test_offline_enroll.py"))
