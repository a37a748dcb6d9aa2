"""Operator-side fixtures shared by the integration tests: CLI environment, signer, publish."""

from __future__ import annotations

import json
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.testbed.controlplane import ControlPlane
from tests.testbed.libvirtd import Libvirtd
from tests.testbed.node import VirtualNode, run_edgepin
from tests.testbed.operator import Signer
from tests.testbed.swtpm import Swtpm


@pytest.fixture(scope="session")
def operator_env(controlplane: ControlPlane) -> dict[str, str]:
    """The operator's cloud: the test bed's clouds.yaml."""
    return {
        "OS_CLIENT_CONFIG_FILE": str(controlplane.clouds_yaml),
        "OS_CLOUD": "edgepin-testbed",
    }


@pytest.fixture(scope="session")
def signer(operator_env: dict[str, str], run_dir: Path) -> Signer:
    return make_signer(operator_env, run_dir)


@pytest.fixture(scope="session")
def cli_env(operator_env: dict[str, str], signer: Signer) -> dict[str, str]:
    """The operator's environment: the cloud, and the session's signer as the key that
    `publish` signs images and `assign` signs assignments with (the virtual nodes pin it)."""
    return {
        **operator_env,
        "EDGEPIN_SIGNING_CERT_ID": signer.cert_id,
        "EDGEPIN_SIGNING_KEY_ID": signer.key_id,
    }


def make_signer(cli_env: dict[str, str], run_dir: Path) -> Signer:
    """A signing certificate and key in the Barbican that ``cli_env`` points at."""
    out = run_dir / f"signing-{secrets.token_hex(3)}.pem"
    r = run_edgepin(
        ["signing-cert", "create", "--name", "edgepin tests", "--cert-out", str(out), "--json"],
        cli_env,
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    return Signer(data["cert_id"], data["key_id"], data["sha256"], out.read_bytes())


@pytest.fixture(scope="session")
def publish(
    cli_env: dict[str, str], signer: Signer, tiny_guest: Callable[..., Path]
) -> Callable[..., dict[str, Any]]:
    """Publish a tiny guest; returns the CLI's JSON plus the marker and plaintext path."""
    return make_publisher(cli_env, signer, tiny_guest)


def make_publisher(
    cli_env: dict[str, str], signer: Signer, tiny_guest: Callable[..., Path]
) -> Callable[..., dict[str, Any]]:
    """``publish`` for the control plane that ``cli_env`` points at."""

    def do(
        version: str = "1",
        behaviour: str = "run",
        extra: list[str] | None = None,
        signer_: Signer | None = None,
        kind: str = "linux",
        health_marker: bool = False,
    ) -> dict[str, Any]:
        """``kind``: the guest's (``tiny_guest``); ``health_marker``: the image names the
        guest's marker line as its health marker (the node waits for it on a switch)."""
        s = signer_ or signer
        marker = f"m{secrets.token_hex(5)}"
        guest = tiny_guest(marker, behaviour, kind=kind)
        if health_marker:
            extra = [*(extra or []), "--health-marker", f"EDGEPIN-GUEST-MARKER {marker}"]
        r = run_edgepin(
            [
                "publish",
                str(guest),
                "--name",
                f"tiny-{marker}",
                "--version",
                version,
                "--signing-cert-id",
                s.cert_id,
                "--signing-key-id",
                s.key_id,
                "--luks-iter-time",
                "100",
                "--json",
                *(extra or []),
            ],
            cli_env,
        )
        assert r.returncode == 0, r.stderr
        result: dict[str, Any] = json.loads(r.stdout)
        result.update(marker=marker, plaintext=guest)
        return result

    return do


@pytest.fixture
def virtual_node(
    swtpm: Swtpm, libvirtd: Libvirtd, run_dir: Path, request: pytest.FixtureRequest
) -> Iterator[VirtualNode]:
    name = f"n{secrets.token_hex(4)}"
    root = run_dir / "nodes" / name
    root.mkdir(parents=True)
    # a node's /run is in memory (tmpfs), and the node keeps its token only there
    memory = Path(tempfile.mkdtemp(prefix=f"edgepin-{name}-", dir="/dev/shm"))
    (root / "run").symlink_to(memory)
    node = VirtualNode(name, root, swtpm, libvirtd)
    yield node
    shutil.rmtree(memory, ignore_errors=True)
