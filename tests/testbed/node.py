"""A virtual edge node for integration tests: its own root folder, swtpm and libvirtd.

The node runs the real ``edgepin node ...`` commands as subprocesses, as the host
image's units do; only the paths differ (``--root``).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from provisioner.seed import BUNDLE_PATH, INSTANCE_DATA
from tests.testbed.libvirtd import Libvirtd
from tests.testbed.swtpm import Swtpm

EDGEPIN = str(Path(sys.executable).parent / "edgepin")


def run_edgepin(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EDGEPIN, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        check=False,
    )


def seed_meta_data(seed_image: Path) -> dict[str, Any]:
    """A seed's meta-data as cloud-init's NoCloud reads it (YAML)."""
    r = subprocess.run(
        ["mcopy", "-i", str(seed_image), "::meta-data", "-"],
        capture_output=True,
        text=True,
        check=True,
    )
    meta = yaml.safe_load(r.stdout)
    assert isinstance(meta, dict), r.stdout
    return meta


@dataclass
class VirtualNode:
    name: str
    root: Path
    tpm: Swtpm
    libvirtd: Libvirtd
    logs: list[Path] = field(default_factory=list)

    def configure(self, pcrs: str = "7", health_timeout: int = 45, **extra: str) -> None:
        etc = self.root / "etc" / "edgepin"
        etc.mkdir(parents=True, exist_ok=True)
        settings = {
            "EDGEPIN_TCTI": self.tpm.tcti,
            "EDGEPIN_LIBVIRT_URI": self.libvirtd.uri,
            "EDGEPIN_VIRT_TYPE": "qemu",
            "EDGEPIN_PCRS": pcrs,
            "EDGEPIN_RESERVED_CPUS": "0",
            "EDGEPIN_HEALTH_TIMEOUT": str(health_timeout),
            **extra,
        }
        (etc / "edgepin.conf").write_text("".join(f"{k}={v}\n" for k, v in settings.items()))

    def pin_certificate(self, pem: bytes, name: str = "signing.pem") -> None:
        d = self.root / "etc" / "edgepin" / "signing-certs"
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(pem)

    def install_seed(self, seed_image: Path) -> subprocess.CompletedProcess[str]:
        """What a boot with the seed attached does: cloud-init keeps the seed's meta-data
        in its instance data, then `edgepin node seed` takes the bundle from there."""
        instance = self.root / INSTANCE_DATA.lstrip("/")
        instance.parent.mkdir(parents=True, exist_ok=True)
        instance.write_text(json.dumps({"ds": {"meta_data": seed_meta_data(seed_image)}}))
        instance.chmod(0o600)
        r = self.node("seed")
        assert r.returncode == 0, r.stderr
        return r

    def node(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        # EDGEPIN_TEST_NODE_PYTHONPATH: the node's commands (only they) run with these
        # libraries first, e.g. Debian's versions (tests/integration/test_debian_libs.py)
        # the libraries go before the rest of the path, which still finds the provisioner
        # under test (a worktree on PYTHONPATH, say)
        libs = os.environ.get("EDGEPIN_TEST_NODE_PYTHONPATH")
        path = [libs, os.environ.get("PYTHONPATH")] if libs else []
        env = {"PYTHONPATH": os.pathsep.join(p for p in path if p)} if libs else None
        r = run_edgepin(["node", "--root", str(self.root), *args], env, timeout=timeout)
        named = "-".join(Path(a).name if "/" in a else a for a in args)
        log = self.root / "test-logs" / f"{len(self.logs):03d}-{named}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"$ edgepin node {' '.join(args)}\n{r.stdout}\n--- stderr\n{r.stderr}")
        self.logs.append(log)
        return r

    def bootstrap_session(self, ca_path: Path) -> Any:
        """A keystoneauth session with the bootstrap credential of the node's seed, unsealed
        from its TPM as the node does (for tests that act as whoever holds it)."""
        from keystoneauth1 import session
        from keystoneauth1.identity import v3

        from provisioner import tpm

        bundle = json.loads((self.root / BUNDLE_PATH.lstrip("/")).read_text())
        boot = bundle["bootstrap"]
        with tpm.Tpm.open(self.tpm.tcti) as t:
            secret = t.unseal(
                base64.b64decode(boot["wrapped"]), bundle["pcrs"], (tpm.BlobKind.DUPLICATE,)
            )
        return session.Session(
            auth=v3.ApplicationCredential(
                auth_url=bundle["auth_url"],
                application_credential_id=boot["application_credential_id"],
                application_credential_secret=secret.decode(),
            ),
            verify=str(ca_path),
        )

    @property
    def serial_log(self) -> Path:
        return self.root / "var" / "log" / "edgepin" / "guest-serial.log"

    @property
    def status_path(self) -> Path:
        return self.root / "run" / "edgepin" / "status.json"


def ok(r: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    """``r``, which must have exited 0 (else its output says why)."""
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def node_status(node: VirtualNode) -> dict[str, Any]:
    """The status file the node's last command wrote."""
    data: dict[str, Any] = json.loads(node.status_path.read_text())
    return data


def wait_marker(node: VirtualNode, marker: str, timeout: float = 60) -> None:
    """Wait until the guest prints ``marker`` on its serial console."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.serial_log.exists() and marker.encode() in node.serial_log.read_bytes():
            return
        time.sleep(0.25)
    tail = node.serial_log.read_bytes()[-800:] if node.serial_log.exists() else b"(no log)"
    raise AssertionError(f"marker {marker} not seen; serial tail:\n{tail.decode(errors='replace')}")
