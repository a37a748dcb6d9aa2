"""Operator steps through the real ``edgepin`` CLI, for the tests and the benchmarks:
a signing certificate's ids, enrolling a virtual node, assigning it an image."""

from __future__ import annotations

import datetime
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provisioner import assignment
from provisioner.operator.signingcert import load_key
from provisioner.signing import load_certificate
from tests.testbed.node import VirtualNode, run_edgepin


@dataclass
class Signer:
    cert_id: str
    key_id: str
    sha256: str
    pem: bytes


def enroll_node(node: VirtualNode, cli_env: dict[str, str], signer: Signer, run_dir: Path) -> None:
    cert = run_dir / f"{node.name}.ek.pem"
    cert.write_bytes(node.tpm.ek_cert_pem())
    ca = run_dir / f"{node.name}.ekca.pem"
    ca.write_bytes(node.tpm.ca_cert_pem())
    seed = run_dir / f"{node.name}.seed.img"
    r = run_edgepin(
        [
            "enroll",
            node.name,
            "--ek-cert",
            str(cert),
            "--ek-ca",
            str(ca),
            "--pcrs",
            "7",
            "--pcr-values",
            "zero",
            "--seed-out",
            str(seed),
        ],
        cli_env,
    )
    assert r.returncode == 0, r.stderr
    node.configure(pcrs="7")
    node.pin_certificate(signer.pem)
    node.install_seed(seed)


def assign(cli_env: dict[str, str], node: VirtualNode, image_id: str) -> None:
    r = run_edgepin(["assign", node.name, image_id], cli_env)
    assert r.returncode == 0, r.stderr


def signed_assignment(
    admin: Any, signer: Signer, project_id: str, node_name: str, image_id: str, generation: int
) -> dict[str, Any]:
    """An assignment record signed with ``signer`` as `edgepin assign` writes it, for tests
    that write the record themselves (an image `assign` would refuse, a generation it would
    not choose). The image's sha512 is Glance's ``os_hash_value`` (zeros when it has none or
    is gone)."""
    r = admin.image.get(f"/images/{image_id}", raise_exc=False)
    image = r.json() if r.status_code == 200 else {}  # a deleted image: some cases want one
    sha = image.get("os_hash_value") or "0" * 128
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    key = load_key(admin, signer.key_id)
    cert = load_certificate(signer.pem)
    return assignment.sign(key, cert, project_id, node_name, image_id, sha, generation, now)


def pin_release_key(root: Path, tmp: Path) -> tuple[Path, Path]:
    """A release key made with `edgepin release key` in ``tmp``; its public half pinned
    in the node root ``root`` (as `./build.sh image --release-key` pins it)."""
    key, pub = tmp / "release.key.pem", tmp / "release.pub.pem"
    r = run_edgepin(["release", "key", "--key-out", str(key), "--public-out", str(pub)])
    assert r.returncode == 0, r.stderr
    (root / "etc" / "edgepin").mkdir(parents=True, exist_ok=True)
    shutil.copy(pub, root / "etc" / "edgepin" / "release-key.pem")
    return key, pub


def approve_pcrs(key: Path, values: dict[int, bytes], out: Path, epoch: int = 0) -> None:
    """`edgepin release approve` of ``values`` at ``epoch`` with ``key``, into ``out``."""
    pcr_values = out.with_suffix(".values")
    pcr_values.write_text(json.dumps({str(p): v.hex() for p, v in values.items()}))
    pcrs = ",".join(map(str, sorted(values)))
    args = ["--key", str(key), "--pcrs", pcrs, "--pcr-values", str(pcr_values)]
    r = run_edgepin(["release", "approve", *args, "--epoch", str(epoch), "--out", str(out)])
    assert r.returncode == 0, r.stderr
