"""The Ceph tier: Glance on a real single-node Ceph (RBD), and a node that copes with it.

One control plane with ``--store ceph`` serves the module. A virtual node boots its first
guest from an image that lives in RBD, takes an update, and survives a download cut in
the middle: on RBD Glance refuses the Range request that would resume it (400), so the
node starts once more from byte zero and converges, without looping and without ever
accepting a partial image. The image's bytes in Ceph are ciphertext only.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import secrets
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import make_publisher, make_signer
from tests.integration.test_faults import image_endpoint
from tests.integration.test_node import member_status
from tests.testbed.ceph import GLANCE_USER, IMAGES_POOL, CephError
from tests.testbed.controlplane import ControlPlane
from tests.testbed.faultproxy import FaultProxy
from tests.testbed.guest import build_initramfs
from tests.testbed.libvirtd import Libvirtd
from tests.testbed.node import VirtualNode, node_status, wait_marker
from tests.testbed.operator import Signer, assign, enroll_node
from tests.testbed.swtpm import SwtpmFactory

pytestmark = [pytest.mark.integration, pytest.mark.ceph]


# ----------------------------------------------------------------- the ceph bed


@pytest.fixture(scope="module")
def operator_env(ceph_controlplane: ControlPlane) -> dict[str, str]:
    return {
        "OS_CLIENT_CONFIG_FILE": str(ceph_controlplane.clouds_yaml),
        "OS_CLOUD": "edgepin-testbed",
    }


@pytest.fixture(scope="module")
def cli_env(operator_env: dict[str, str], signer: Signer) -> dict[str, str]:
    return {
        **operator_env,
        "EDGEPIN_SIGNING_CERT_ID": signer.cert_id,
        "EDGEPIN_SIGNING_KEY_ID": signer.key_id,
    }


@pytest.fixture(scope="module")
def admin(ceph_controlplane: ControlPlane) -> Iterator[Any]:
    conn = ceph_controlplane.admin_connection()
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def signer(operator_env: dict[str, str], run_dir: Path) -> Signer:
    return make_signer(operator_env, run_dir)


@pytest.fixture(scope="module")
def publish(
    cli_env: dict[str, str], signer: Signer, tiny_guest: Callable[..., Path]
) -> Callable[..., dict[str, Any]]:
    return make_publisher(cli_env, signer, tiny_guest)


@dataclass
class Bed:
    node: VirtualNode
    v1: dict[str, Any]


@pytest.fixture(scope="module")
def bed(
    swtpm_factory: SwtpmFactory,
    libvirtd_factory: Callable[[str], Libvirtd],
    run_dir: Path,
    cli_env: dict[str, str],
    signer: Signer,
    publish: Callable[..., dict[str, Any]],
) -> Iterator[Bed]:
    """A node enrolled against the Ceph-backed control plane, with guest v1 published."""
    name = f"c{secrets.token_hex(3)}"
    root = run_dir / "nodes" / name
    root.mkdir(parents=True)
    node = VirtualNode(name, root, swtpm_factory.create(name), libvirtd_factory(name))
    enroll_node(node, cli_env, signer, run_dir)
    node.configure(pcrs="7", health_timeout=30)
    ok(node.node("enroll"))
    yield Bed(node, publish(version="1"))
    node.tpm.stop()


def ok(r: subprocess.CompletedProcess[str]) -> None:
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"


def glance_log(cp: ControlPlane) -> str:
    return (cp.run_dir / "glance" / "access.log").read_text(errors="replace")


# ---------------------------------------------------------------- Glance on RBD


def test_glance_keeps_images_in_rbd_through_a_user_limited_to_the_pool(
    ceph_controlplane: ControlPlane, admin: Any, bed: Bed
) -> None:
    cluster = ceph_controlplane.ceph_cluster
    image_id = bed.v1["image_id"]
    assert image_id in cluster.rbd(["ls", IMAGES_POOL]).split()
    assert admin.image.get(f"/images/{image_id}").json()["stores"] == "ceph"
    health = json.loads(cluster.ceph(["health", "-f", "json"]))
    assert health["status"] == "HEALTH_OK", health

    # cephx: Glance's user works on the images pool and nowhere else
    assert image_id in cluster.rbd(["ls", IMAGES_POOL], user=GLANCE_USER).split()
    cluster.ceph(["osd", "pool", "create", "scratch", "8", "8"])
    with pytest.raises(CephError, match=r"Operation not permitted|EPERM|denied"):
        cluster.rbd(["create", "--size", "1M", "scratch/x"], user=GLANCE_USER)
    with pytest.raises(CephError, match=r"Operation not permitted|EACCES|denied"):
        cluster.ceph(["auth", "ls"], user=GLANCE_USER)
    cluster.ceph(["osd", "pool", "delete", "scratch", "scratch", "--yes-i-really-really-mean-it"])

    # keys live in 0600 files and on no command line
    keyrings = sorted((cluster.run_dir / "keys").glob("*.keyring"))
    assert {p.name for p in keyrings} == {"ceph.client.admin.keyring", "ceph.client.glance.keyring"}
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in keyrings)
    keys = [
        line.split("=", 1)[1].strip().encode()
        for p in keyrings
        for line in p.read_text().splitlines()
        if line.strip().startswith("key")
    ]
    assert len(keys) == 2
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        assert not any(k in cmdline for k in keys), f"a cephx key is on the command line of {pid}"

    # the behaviour the node has to cope with: RBD serves no ranges
    r = admin.image.get(f"/images/{image_id}/file", headers={"Range": "bytes=100-"})
    assert r.status_code == 400, r.status_code
    whole = admin.image.get(f"/images/{image_id}/file")
    assert whole.status_code == 200
    meta = admin.image.get(f"/images/{image_id}").json()
    assert hashlib.sha512(whole.content).hexdigest() == meta["os_hash_value"]


def test_rbd_export_holds_ciphertext_only(
    ceph_controlplane: ControlPlane, admin: Any, bed: Bed, tmp_path: Path
) -> None:
    """The image's bytes as Ceph stores them: no plaintext of the guest in them."""
    image_id, marker = bed.v1["image_id"], bed.v1["marker"]
    exported = tmp_path / "export.bin"
    ceph_controlplane.ceph_cluster.rbd(["export", f"{IMAGES_POOL}/{image_id}", str(exported)])
    data = exported.read_bytes()
    meta = admin.image.get(f"/images/{image_id}").json()
    assert hashlib.sha512(data).hexdigest() == meta["os_hash_value"]  # the very image
    assert data[:4] == b"QFI\xfb"  # qcow2 ...
    assert int.from_bytes(data[32:36], "big") == 2  # ... with LUKS encryption (crypt_method 2)

    # what to look for: the marker, and windows of the guest's own (compressed) initramfs,
    # which sits verbatim in the plaintext disk: the check would find a plaintext leak
    plaintext = Path(bed.v1["plaintext"]).read_bytes()
    initrd = gzip.compress(gzip.decompress(build_initramfs(marker, "run")), mtime=0)
    windows = [initrd[i : i + 64] for i in range(4096, len(initrd) - 64, len(initrd) // 16)]
    needles = [marker.encode(), *windows]
    assert all(w in plaintext for w in windows), "the needles must be in the plaintext guest"
    leaks = [n[:12] for n in needles if n in data]
    assert leaks == [], f"plaintext of the guest found in RBD: {leaks}"


# ------------------------------------------------------------- the node on Ceph


def test_first_boot_to_a_running_guest(bed: Bed, cli_env: dict[str, str], admin: Any) -> None:
    node = bed.node
    assign(cli_env, node, bed.v1["image_id"])
    ok(node.node("reconcile"))
    wait_marker(node, bed.v1["marker"])
    st = node_status(node)
    assert st["state"] == "running" and st["image_id"] == bed.v1["image_id"]
    assert member_status(admin, bed.v1["image_id"], node) == "accepted"
    assert st["bytes_fetched_total"] > 0


def test_update(bed: Bed, cli_env: dict[str, str], publish: Callable[..., dict[str, Any]]) -> None:
    v2 = publish(version="2")
    assign(cli_env, bed.node, v2["image_id"])
    ok(bed.node.node("reconcile"))
    wait_marker(bed.node, v2["marker"])
    st = node_status(bed.node)
    assert st["state"] == "running" and st["image_id"] == v2["image_id"]
    assert st["generation"] == 2


def test_cut_download_restarts_from_zero_once_and_converges(
    bed: Bed,
    cli_env: dict[str, str],
    admin: Any,
    ceph_controlplane: ControlPlane,
    publish: Callable[..., dict[str, Any]],
) -> None:
    cp = ceph_controlplane
    v3 = publish(version="3")
    image_id = v3["image_id"]
    size = int(admin.image.get(f"/images/{image_id}").json()["size"])
    assign(cli_env, bed.node, image_id)
    before = node_status(bed.node)["bytes_fetched_total"]
    images = bed.node.root / "var/lib/edgepin/images"
    tls = cp.run_dir / "tls"
    proxy = FaultProxy(cp.url("glance"), cp.ca_path, tls / "server.pem", tls / "server-key.pem")
    proxy.start()
    try:
        with image_endpoint(admin, proxy.url):
            proxy.fault = ("reset", size // 2)
            r = bed.node.node("reconcile")
            assert r.returncode == 5, r.stdout + r.stderr
            assert "resumes on the next run" in r.stderr
            assert node_status(bed.node)["state"] == "offline"
            kept = (images / f"{image_id}.partial").stat().st_size
            assert 0 < kept < size
            assert not (images / f"{image_id}.qcow2").exists()  # never a partial image

            proxy.fault = None
            proxy.requests.clear()
            ok(bed.node.node("reconcile"))
    finally:
        proxy.stop()
    downloads = [q for q in proxy.requests if q == f"GET /v2/images/{image_id}/file"]
    assert len(downloads) == 2, proxy.requests  # the refused range, then once from zero
    refused = [
        line for line in glance_log(cp).splitlines() if f"/v2/images/{image_id}/file" in line
    ]
    assert any('" 400 ' in line for line in refused), refused[-4:]
    assert "restarting from byte 0" in bed.node.logs[-1].read_text()
    wait_marker(bed.node, v3["marker"])
    st = node_status(bed.node)
    assert st["state"] == "running" and st["image_id"] == image_id
    # the whole image once more (a resume would have fetched size - kept)
    assert size <= st["bytes_fetched_total"] - before <= size * 1.05
    assert not (images / f"{image_id}.partial").exists()
