"""The benchmark's test bed: its own control plane, a signer, published images.

Everything runs on loopback under one run directory. Secrets (the admin password, tokens)
stay in 0600 files or go to child processes through stdin, never on a command line.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.testbed.controlplane import ControlPlane, default_template_root
from tests.testbed.node import run_edgepin
from tests.testbed.process import write_private

MIB = 1024 * 1024


class BenchError(RuntimeError):
    pass


@dataclass
class Signer:
    cert_id: str
    key_id: str
    sha256: str
    pem_path: Path


@dataclass
class Bed:
    run_dir: Path
    store: str = "file"
    # the plain bed by default: the figures in docs/performance.md were measured on it
    shape: str = "plain"
    cp: ControlPlane = field(init=False)
    admin: Any = None
    signer: Signer | None = None

    def up(self) -> None:
        self.cp = ControlPlane(self.run_dir / "controlplane", store=self.store, shape=self.shape)
        try:
            self.cp.up(default_template_root())
        except Exception:
            self.cp.down()
            raise
        self.admin = self.cp.admin_connection()

    def down(self) -> None:
        if self.admin is not None:
            self.admin.close()
        self.cp.down()

    @property
    def cli_env(self) -> dict[str, str]:
        return {"OS_CLIENT_CONFIG_FILE": str(self.cp.clouds_yaml), "OS_CLOUD": "edgepin-testbed"}

    def signing_env(self) -> dict[str, str]:
        """``cli_env`` with the run's signer as the key that ``publish`` signs images and
        ``assign`` signs assignments with (nodes run only signed assignments)."""
        signer = self.make_signer()
        return {
            **self.cli_env,
            "EDGEPIN_SIGNING_CERT_ID": signer.cert_id,
            "EDGEPIN_SIGNING_KEY_ID": signer.key_id,
        }

    def edgepin(self, *args: str, timeout: float = 1800) -> dict[str, Any]:
        r = run_edgepin(list(args), self.cli_env, timeout=timeout)
        if r.returncode != 0:
            raise BenchError(f"edgepin {args[0]} failed: {r.stderr.strip()[-800:]}")
        data: dict[str, Any] = json.loads(r.stdout)
        return data

    def make_signer(self) -> Signer:
        if self.signer is None:
            pem = self.run_dir / "signing.pem"
            d = self.edgepin(
                "signing-cert",
                "create",
                "--name",
                "edgepin bench",
                "--cert-out",
                str(pem),
                "--json",
            )
            self.signer = Signer(d["cert_id"], d["key_id"], d["sha256"], pem)
        return self.signer

    def publish(self, guest: Path, version: str = "1") -> dict[str, Any]:
        s = self.make_signer()
        return self.edgepin(
            "publish",
            str(guest),
            "--name",
            f"bench-{secrets.token_hex(4)}",
            "--version",
            version,
            "--signing-cert-id",
            s.cert_id,
            "--signing-key-id",
            s.key_id,
            "--luks-iter-time",
            "100",
            "--json",
        )

    def publish_random(self, size: int) -> dict[str, Any]:
        """Publish an incompressible raw disk of ``size`` bytes; returns Glance's metadata."""
        raw = self.run_dir / f"random-{size // MIB}m.raw"
        with raw.open("wb") as f:
            left = size
            first = True
            while left:
                n = min(left, 8 * MIB)
                chunk = bytearray(os.urandom(n))
                if first:  # an MBR signature, so that publish takes it as a raw disk
                    chunk[510:512] = b"\x55\xaa"
                    first = False
                f.write(chunk)
                left -= n
        try:
            pub = self.publish(raw)
        finally:
            raw.unlink()
        return self.image(pub["image_id"])

    def image(self, image_id: str) -> dict[str, Any]:
        data: dict[str, Any] = self.admin.image.get(f"/images/{image_id}").json()
        return data

    def token(self) -> str:
        tok: str = self.admin.session.get_token()
        return tok

    def token_header_file(self) -> Path:
        """``X-Auth-Token: ...`` in a 0600 file, for ``curl -H @file``."""
        return write_private(
            self.run_dir / "secrets" / "token-header", f"X-Auth-Token: {self.token()}\n"
        )

    def admin_auth(self) -> dict[str, str]:
        """The admin's password auth, for a child process's stdin."""
        return {
            "auth_url": self.cp.auth_url,
            "password": self.cp.secrets()["admin_password"],
            "ca": str(self.cp.ca_path),
        }

    def service_pgids(self) -> dict[str, int]:
        """Each service runs in its own session: its pid is its process group id."""
        return dict(self.cp.pids)
