"""Faults and bad input: the node fails closed, loses nothing, and its guest keeps running.

One virtual node runs guest v1 for the whole module; every case then hands it something bad
and checks the one-line error, the exit code / status reason, that state converged or is
unchanged, that the v1 guest still runs, and (at the end) that no secret leaked.
Each case id is listed in docs/faults.md; a test keeps the two in step.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import random
import re
import secrets
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import pytest
import requests

from provisioner.errors import EdgepinError
from provisioner.node.fetch import CHUNK
from provisioner.operator.assign import grant
from provisioner.operator.signingcert import load_key
from provisioner.signing import StreamSigner
from tests.integration.test_node import member_status
from tests.testbed.controlplane import ControlPlane, make_ca
from tests.testbed.faultproxy import FaultProxy, Seen
from tests.testbed.libvirtd import Libvirtd
from tests.testbed.node import EDGEPIN, VirtualNode, node_status, wait_marker
from tests.testbed.operator import Signer, assign, enroll_node, signed_assignment
from tests.testbed.swtpm import SwtpmFactory

pytestmark = pytest.mark.integration

CASES: list[str] = []


def case(name: str) -> str:
    CASES.append(name)
    return name


@dataclass
class Bed:
    node: VirtualNode
    v1: dict[str, Any]
    project_id: str
    user_id: str
    signer: Signer


@pytest.fixture(scope="module")
def bed(
    swtpm_factory: SwtpmFactory,
    libvirtd_factory: Callable[[str], Libvirtd],
    run_dir: Path,
    cli_env: dict[str, str],
    signer: Signer,
    publish: Callable[..., dict[str, Any]],
) -> Iterator[Bed]:
    name = f"f{secrets.token_hex(3)}"
    root = run_dir / "nodes" / name
    root.mkdir(parents=True)
    node = VirtualNode(name, root, swtpm_factory.create(name), libvirtd_factory(name))
    enroll_node(node, cli_env, signer, run_dir)
    node.configure(pcrs="7", health_timeout=20)
    r = node.node("enroll")
    assert r.returncode == 0, r.stderr
    v1 = publish(version="1")
    assign(cli_env, node, v1["image_id"])
    r = node.node("reconcile")
    assert r.returncode == 0, r.stderr
    wait_marker(node, v1["marker"])
    bundle = json.loads((root / "var/lib/edgepin/seed/bundle.json").read_text())
    yield Bed(node, v1, bundle["project_id"], bundle["user_id"], signer)
    node.tpm.stop()


def guest_image(node: VirtualNode) -> str | None:
    conn = libvirt.open(node.libvirtd.uri)
    try:
        dom = conn.lookupByName("edgepin-guest")
        if not dom.isActive():
            return None
        xml = dom.XMLDesc(0)
        return xml.split("<edgepin:image>")[1].split("<")[0]
    except libvirt.libvirtError:
        return None
    finally:
        conn.close()


def refused(
    bed: Bed, r: subprocess.CompletedProcess[str], code: int, words: str, running: str = ""
) -> dict[str, Any]:
    """One error line with the words, the exit code, and the expected guest still running."""
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("edgepin: error")]
    assert len(errors) == 1, r.stdout + r.stderr
    assert words in errors[0], errors[0]
    assert r.returncode == code, f"exit {r.returncode}: {errors[0]}"
    assert "Traceback" not in r.stderr
    expected = running or current(bed)
    assert guest_image(bed.node) == expected, "the running guest was harmed"
    return node_status(bed.node)


def current(bed: Bed) -> str:
    return str(
        json.loads((bed.node.root / "var/lib/edgepin/node.json").read_text())["current"]["image_id"]
    )


# ------------------------------------------------------------------ image variants


def encrypted_bytes(admin: Any, image_id: str) -> bytes:
    return bytes(admin.image.get(f"/images/{image_id}/file").content)


def upload(admin: Any, data: bytes, props: dict[str, str], disk_format: str = "qcow2") -> str:
    """An image created without Glance's own signature check, then given properties."""
    created = admin.image.post(
        "/images",
        json={
            "name": f"fault-{secrets.token_hex(3)}",
            "disk_format": disk_format,
            "container_format": "bare",
            "visibility": "shared",
        },
    ).json()
    r = admin.image.put(
        f"/images/{created['id']}/file",
        data=data,
        headers={"Content-Type": "application/octet-stream"},
        raise_exc=False,
    )
    assert r.status_code == 204, r.text
    patch(admin, created["id"], props)
    return str(created["id"])


def patch(admin: Any, image_id: str, props: dict[str, str]) -> None:
    ops = [{"op": "add", "path": f"/{k}", "value": v} for k, v in props.items()]
    r = admin.image.patch(
        f"/images/{image_id}",
        json=ops,
        headers={"Content-Type": "application/openstack-images-v2.1-json-patch"},
        raise_exc=False,
    )
    assert r.status_code == 200, r.text


def signed_props(admin: Any, signer: Signer, data: bytes, base: dict[str, Any]) -> dict[str, str]:
    s = StreamSigner(load_key(admin, signer.key_id), "SHA-256")
    s.update(data)
    keep = {
        k: str(v) for k, v in base.items() if k.startswith(("os_encrypt", "os_decrypt", "edgepin_"))
    }
    return {
        **keep,
        "img_signature": s.signature(),
        "img_signature_hash_method": "SHA-256",
        "img_signature_key_type": "RSA-PSS",
        "img_signature_certificate_uuid": signer.cert_id,
    }


def force_assign(
    admin: Any, bed: Bed, image_id: str, share: bool = True, readable: bool = True
) -> None:
    """Write the assignment record directly, bypassing `edgepin assign`'s own checks."""
    if share:
        admin.image.post(
            f"/images/{image_id}/members", json={"member": bed.project_id}, raise_exc=False
        )
    if share and readable:
        # the key and certificate are readable, as `edgepin assign` would have made them
        props = admin.image.get(f"/images/{image_id}").json()
        for sid in (props.get("os_encrypt_key_id"), props.get("img_signature_certificate_uuid")):
            if sid:
                try:
                    grant(admin, sid, bed.user_id)
                except EdgepinError:
                    pass  # a secret that does not exist: some cases want exactly that
    project = admin.identity.get(f"/projects/{bed.project_id}").json()["project"]
    gen = json.loads(project.get("edgepin_assignment") or '{"generation": 0}')["generation"] + 1
    record = json.dumps(
        signed_assignment(admin, bed.signer, bed.project_id, bed.node.name, image_id, gen)
    )
    admin.identity.patch(
        f"/projects/{bed.project_id}", json={"project": {"edgepin_assignment": record}}
    )


def v1_props(admin: Any, bed: Bed) -> dict[str, Any]:
    data: dict[str, Any] = admin.image.get(f"/images/{bed.v1['image_id']}").json()
    return data


@contextmanager
def image_endpoint(admin: Any, url: str) -> Iterator[None]:
    """Point the catalog's public image endpoint at a proxy (nodes follow the catalog)."""
    service = next(s for s in admin.identity.services() if s.type == "image")
    ep = next(e for e in admin.identity.endpoints(service_id=service.id, interface="public"))
    old = ep.url
    admin.identity.update_endpoint(ep, url=url)
    try:
        yield
    finally:
        admin.identity.update_endpoint(ep, url=old)


@pytest.fixture
def proxy(controlplane: ControlPlane) -> Iterator[FaultProxy]:
    tls = controlplane.run_dir / "tls"
    p = FaultProxy(
        controlplane.url("glance"), controlplane.ca_path, tls / "server.pem", tls / "server-key.pem"
    )
    p.start()
    yield p
    p.stop()


# ------------------------------------------------------------------------- image


def test_bytes_changed_in_glance_store(
    bed: Bed,
    admin: Any,
    publish: Callable[..., dict[str, Any]],
    cli_env: dict[str, str],
    controlplane: ControlPlane,
) -> None:
    case("image-bytes-changed")
    pub = publish(version="tampered")
    stored = controlplane.run_dir / "glance" / "images" / pub["image_id"]
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    assign(cli_env, bed.node, pub["image_id"])
    st = refused(bed, bed.node.node("reconcile"), 8, "does not match os_hash_value")
    assert st["state"] == "refused" and st["error"] == "verification"
    assert member_status(admin, pub["image_id"], bed.node) == "rejected"
    assert not list((bed.node.root / "var/lib/edgepin/images").glob(f"{pub['image_id']}*"))


def test_truncated_then_resumed(
    bed: Bed,
    publish: Callable[..., dict[str, Any]],
    cli_env: dict[str, str],
    admin: Any,
    proxy: FaultProxy,
) -> None:
    case("image-truncated-download")
    case("glance-connection-reset")
    pub = publish(version="cut")
    size = len(encrypted_bytes(admin, pub["image_id"]))
    assign(cli_env, bed.node, pub["image_id"])
    before = node_status(bed.node)["bytes_fetched_total"]
    with image_endpoint(admin, proxy.url):
        proxy.fault = ("reset", size // 2)
        st = refused(bed, bed.node.node("reconcile"), 5, "resumes on the next run")
        assert st["state"] == "offline"
        assert (bed.node.root / "var/lib/edgepin/images" / f"{pub['image_id']}.partial").exists()
        kept = (bed.node.root / "var/lib/edgepin/images" / f"{pub['image_id']}.partial").stat()
        proxy.fault = None
        mark = len(proxy.seen)
        r = bed.node.node("reconcile")
    assert r.returncode == 0, r.stderr
    st = node_status(bed.node)
    assert st["image_id"] == pub["image_id"]
    assert st["bytes_fetched_total"] - before <= size * 1.05
    # resumed, not restarted: one request for the rest, from where the kept bytes end
    files = [s for s in proxy.seen[mark:] if s.path.endswith("/file")]
    assert [(s.range, s.status) for s in files] == [(f"bytes={kept.st_size}-", 206)]
    assert 0 < kept.st_size and files[0].sent == size - kept.st_size
    wait_marker(bed.node, pub["marker"])


def test_more_bytes_than_declared(
    bed: Bed,
    publish: Callable[..., dict[str, Any]],
    cli_env: dict[str, str],
    admin: Any,
    proxy: FaultProxy,
) -> None:
    case("image-more-bytes")
    pub = publish(version="extra")
    assign(cli_env, bed.node, pub["image_id"])
    with image_endpoint(admin, proxy.url):
        proxy.fault = ("extra", 4096)
        refused(bed, bed.node.node("reconcile"), 8, "more bytes than its declared size")


def test_no_os_hash_value(
    bed: Bed,
    publish: Callable[..., dict[str, Any]],
    cli_env: dict[str, str],
    admin: Any,
    proxy: FaultProxy,
) -> None:
    case("image-no-hash")
    pub = publish(version="nohash")
    assign(cli_env, bed.node, pub["image_id"])
    with image_endpoint(admin, proxy.url):
        proxy.fault = ("drop_property", "os_hash_value")
        refused(bed, bed.node.node("reconcile"), 8, "no sha512 os_hash_value")


@pytest.mark.parametrize(
    ("name", "change", "code", "words"),
    [
        ("image-no-signature", {"img_signature": None}, 8, "not signed"),
        (
            "image-wrong-signature",
            {"img_signature": base64.b64encode(b"\x01" * 384).decode()},
            8,
            "does not verify",
        ),
        (
            "image-unknown-hash-method",
            {"img_signature_hash_method": "MD5"},
            8,
            "unknown img_signature_hash_method",
        ),
        (
            "image-unknown-key-type",
            {"img_signature_key_type": "DSA"},
            8,
            "unknown img_signature_key_type",
        ),
        ("image-vcpus-beyond-host", {"edgepin_vcpus": "64"}, 11, "vCPUs"),
        ("image-memory-beyond-host", {"edgepin_memory_mb": str(4 * 1024 * 1024)}, 11, "MiB"),
        ("image-long-property", {"edgepin_version": "v" * 5000}, 7, "malformed"),
    ],
)
def test_bad_metadata(
    bed: Bed,
    admin: Any,
    signer: Signer,
    name: str,
    change: dict[str, str | None],
    code: int,
    words: str,
) -> None:
    case(name)
    data = encrypted_bytes(admin, bed.v1["image_id"])
    props = signed_props(admin, signer, data, v1_props(admin, bed))
    for k, v in change.items():
        if v is None:
            props.pop(k, None)
        else:
            props[k] = v
    image_id = upload(admin, data, props)
    force_assign(admin, bed, image_id)
    refused(bed, bed.node.node("reconcile"), code, words)


def test_hostile_property_values(bed: Bed, admin: Any, signer: Signer) -> None:
    case("image-hostile-values")
    data = encrypted_bytes(admin, bed.v1["image_id"])
    props = signed_props(admin, signer, data, v1_props(admin, bed))
    props["edgepin_version"] = "1'/><devices><hostdev/></devices><x a='../../etc/passwd\x07 ✓"
    # a key that edgepin never looks up: ignored, but it must not break anything
    props["edgepin_name"] = "]]><!ENTITY x SYSTEM 'file:///etc/shadow'>"
    image_id = upload(admin, data, props)
    force_assign(admin, bed, image_id)
    r = bed.node.node("reconcile")
    assert r.returncode == 0, r.stderr
    conn = libvirt.open(bed.node.libvirtd.uri)
    try:
        xml = conn.lookupByName("edgepin-guest").XMLDesc(0)
    finally:
        conn.close()
    assert "<hostdev" not in xml and "passwd" not in xml and "ENTITY" not in xml
    # printed on consoles: control characters (here a bell) are dropped
    shown = "".join(c for c in props["edgepin_version"] if c.isprintable())[:64]
    assert node_status(bed.node)["version"] == shown and "\x07" not in shown
    # back to a clean v1 for the next cases
    force_assign(admin, bed, bed.v1["image_id"])
    assert bed.node.node("reconcile").returncode == 0


def test_key_missing_or_not_readable_or_wrong(bed: Bed, admin: Any, signer: Signer) -> None:
    data = encrypted_bytes(admin, bed.v1["image_id"])
    base = v1_props(admin, bed)

    case("image-key-missing")
    props = signed_props(admin, signer, data, base)
    props["os_encrypt_key_id"] = str(uuid.uuid4())
    force_assign(admin, bed, upload(admin, data, props))
    refused(bed, bed.node.node("reconcile"), 6, "not found")

    case("image-key-not-readable")
    other = admin.key_manager.create_secret(
        name="not-for-nodes",
        payload="x" * 20,
        payload_content_type="text/plain",
        secret_type="passphrase",
    )
    props["os_encrypt_key_id"] = other.secret_id
    force_assign(admin, bed, upload(admin, data, props), readable=False)
    st = refused(bed, bed.node.node("reconcile"), 4, "forbidden (403)")
    assert st["error"] == "auth"

    case("image-wrong-passphrase")
    wrong = admin.key_manager.create_secret(
        name="wrong",
        payload="not-the-passphrase",
        payload_content_type="text/plain",
        secret_type="passphrase",
    )
    admin.key_manager.put(
        f"/secrets/{wrong.secret_id}/acl",
        json={"read": {"users": [bed.user_id], "project-access": True}},
    )
    props["os_encrypt_key_id"] = wrong.secret_id
    force_assign(admin, bed, upload(admin, data, props))
    st = refused(bed, bed.node.node("reconcile"), 11, "rolled back")
    assert st["state"] == "rolled-back"


def test_not_qcow2_or_not_luks(
    bed: Bed, admin: Any, signer: Signer, tiny_guest: Callable[..., Path]
) -> None:
    base = v1_props(admin, bed)
    case("image-not-luks")
    plain = tiny_guest("plain").read_bytes()
    force_assign(admin, bed, upload(admin, plain, signed_props(admin, signer, plain, base)))
    refused(bed, bed.node.node("reconcile"), 7, "not LUKS-encrypted")
    case("image-not-qcow2")
    raw = os.urandom(1024 * 1024)
    force_assign(
        admin, bed, upload(admin, raw, signed_props(admin, signer, raw, base), disk_format="raw")
    )
    refused(bed, bed.node.node("reconcile"), 7, "not qcow2")


# -------------------------------------------------------------------- assignment


def test_assignment_faults(bed: Bed, admin: Any, publish: Callable[..., dict[str, Any]]) -> None:
    case("assignment-deleted-image")
    pub = publish(version="gone")
    admin.image.delete(f"/images/{pub['image_id']}")
    force_assign(admin, bed, pub["image_id"], share=False)
    refused(bed, bed.node.node("reconcile"), 7, "does not exist or is not shared")
    case("assignment-not-shared")
    pub = publish(version="unshared")
    force_assign(admin, bed, pub["image_id"], share=False)
    refused(bed, bed.node.node("reconcile"), 7, "does not exist or is not shared")


def test_no_assignment_at_all(
    swtpm_factory: SwtpmFactory,
    libvirtd_factory: Callable[[str], Libvirtd],
    run_dir: Path,
    cli_env: dict[str, str],
    signer: Signer,
) -> None:
    case("assignment-none")
    name = f"e{secrets.token_hex(3)}"
    node = VirtualNode(
        name, run_dir / "nodes" / name, swtpm_factory.create(name), libvirtd_factory(name)
    )
    node.root.mkdir(parents=True)
    try:
        enroll_node(node, cli_env, signer, run_dir)
        assert node.node("enroll").returncode == 0
        r = node.node("reconcile")
        assert r.returncode == 0 and node_status(node)["state"] == "waiting"
    finally:
        node.tpm.stop()


def test_assignment_changes_during_download(
    bed: Bed,
    admin: Any,
    publish: Callable[..., dict[str, Any]],
    cli_env: dict[str, str],
    proxy: FaultProxy,
) -> None:
    case("assignment-changes-mid-download")
    a, b = publish(version="A"), publish(version="B")
    assign(cli_env, bed.node, a["image_id"])
    with image_endpoint(admin, proxy.url):
        proxy.fault = ("slow", 4 * 1024 * 1024)
        proc = subprocess.Popen(
            [EDGEPIN, "node", "--root", str(bed.node.root), "reconcile"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.5)
        assign(cli_env, bed.node, b["image_id"])
        proc.communicate(timeout=300)
        proxy.fault = None
        r = bed.node.node("reconcile")
    assert r.returncode == 0, r.stderr
    assert node_status(bed.node)["image_id"] == b["image_id"]
    wait_marker(bed.node, b["marker"])


# ---------------------------------------------------------------------- services


def test_glance_5xx_and_slow(
    bed: Bed,
    admin: Any,
    publish: Callable[..., dict[str, Any]],
    cli_env: dict[str, str],
    proxy: FaultProxy,
) -> None:
    case("glance-5xx")
    pub = publish(version="5xx")
    assign(cli_env, bed.node, pub["image_id"])
    counters = bed.node.root / "var/lib/edgepin/counters.json"
    with image_endpoint(admin, proxy.url):
        # a busy Glance without Retry-After: the node pauses 30-60 s (a random part of
        # the first 60 s back-off), the guest keeps running
        proxy.fault = ("status", 503)
        before = time.time()
        refused(bed, bed.node.node("reconcile"), 5, "server error 503")
        kept = json.loads(counters.read_text())
        assert kept["busy_streak"] == 1
        assert before + 30 <= kept["quiet_until"] <= time.time() + 60, kept
        case("glance-busy-retry-after")
        # the same with Retry-After: 3; a second busy answer in a row, the server's pause
        proxy.fault = ("status", (503, {"Retry-After": "3"}))
        counters.write_text(json.dumps({**kept, "quiet_until": None}))
        before = time.time()
        refused(bed, bed.node.node("reconcile"), 5, "server error 503")
        kept = json.loads(counters.read_text())
        assert kept["busy_streak"] == 2
        assert before + 3 <= kept["quiet_until"] <= time.time() + 3, kept
        # while it pauses the node asks nothing of anyone, and its guest runs
        seen = len(proxy.seen)
        r = bed.node.node("reconcile")
        assert r.returncode == 0, r.stdout + r.stderr
        st = node_status(bed.node)
        assert st["state"] == "offline" and "asks it nothing before" in st["reason"], st
        assert len(proxy.seen) == seen and guest_image(bed.node) == current(bed)
        time.sleep(max(0.0, kept["quiet_until"] - time.time()) + 0.5)
        case("glance-slow")
        proxy.fault = ("slow", 2 * 1024 * 1024)
        r = bed.node.node("reconcile")
    assert r.returncode == 0, r.stderr
    assert node_status(bed.node)["image_id"] == pub["image_id"]


def test_barbican_down(
    bed: Bed,
    controlplane: ControlPlane,
    publish: Callable[..., dict[str, Any]],
    cli_env: dict[str, str],
) -> None:
    case("barbican-down")
    pub = publish(version="nobarbican")
    assign(cli_env, bed.node, pub["image_id"])
    controlplane.stop_service("barbican")
    try:
        st = refused(bed, bed.node.node("reconcile"), 5, "")
        assert st["state"] == "offline"
    finally:
        controlplane.start_service("barbican")
    assert bed.node.node("reconcile").returncode == 0
    assert node_status(bed.node)["image_id"] == pub["image_id"]


def test_keystone_down(bed: Bed, controlplane: ControlPlane) -> None:
    case("keystone-down")
    controlplane.stop_service("keystone")
    try:
        r = bed.node.node("reconcile")
    finally:
        controlplane.start_service("keystone")
    assert r.returncode == 0
    assert node_status(bed.node)["state"] == "offline"
    assert guest_image(bed.node) == current(bed)


# Keystone's [token] expiration while the token cases run: far below keystoneauth's
# MIN_TOKEN_LIFE_SECONDS (120), so the node takes a fresh token for every request, and a
# download throttled to last ~TOKEN_LIFETIME + 10 s outlives the token it started with.
TOKEN_LIFETIME = 15


def keystone_view(admin: Any, seen: Seen, allow_expired: bool = False) -> dict[str, Any] | None:
    """Keystone's record of the token a request carried (GET /v3/auth/tokens), None on 404.

    With ``allow_expired`` Keystone also shows a token that has expired (within its
    ``allow_expired_window``), so that its issue and expiry times can be read afterwards.
    The node's tokens come from an application credential with access rules: without the
    access-rules header Keystone answers 404 for them whether they expired or not.
    """
    assert seen.token, f"{seen.method} {seen.path} carried no token"
    r = admin.identity.get(
        "/auth/tokens" + ("?allow_expired=true" if allow_expired else ""),
        headers={"X-Subject-Token": seen.token, "OpenStack-Identity-Access-Rules": "1.0"},
        raise_exc=False,
    )
    if r.status_code == 404:
        return None
    assert r.status_code == 200, f"keystone answered {r.status_code} about a token"
    token: dict[str, Any] = r.json()["token"]
    return token


def when(stamp: str) -> float:
    return datetime.datetime.fromisoformat(stamp).timestamp()


def tokens_issued(cp: ControlPlane) -> int:
    """Tokens Keystone has issued so far: POST /v3/auth/tokens lines in its access log."""
    log = cp.run_dir / "keystone" / "access.log"
    return sum('"POST /v3/auth/tokens' in line for line in log.read_text().splitlines())


def downloads(proxy: FaultProxy, image_id: str, since: int = 0) -> list[Seen]:
    path = f"/v2/images/{image_id}/file"
    return [s for s in proxy.seen[since:] if s.method == "GET" and s.path == path]


LOG_STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", re.MULTILINE)


def converged(
    bed: Bed, admin: Any, r: subprocess.CompletedProcess[str], pub: dict[str, Any]
) -> None:
    """Exit 0, no error and no token trouble in the output, the new guest runs and is reported."""
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout + r.stderr
    assert "edgepin: error" not in out and "Traceback" not in out, out
    # the log's time stamps go first: their milliseconds can read "401"
    messages = LOG_STAMP.sub("", out)
    trouble = re.search(r"\b401\b|unauthori[sz]ed|expired|token", messages, re.IGNORECASE)
    assert trouble is None, f"{trouble.group()!r} in the node's output:\n{out}"
    st = node_status(bed.node)
    assert (st["state"], st["image_id"], st["error"]) == ("running", pub["image_id"], None), st
    images = bed.node.root / "var/lib/edgepin/images"
    assert (images / f"{pub['image_id']}.qcow2").exists()  # verified and renamed
    assert not (images / f"{pub['image_id']}.partial").exists()
    assert guest_image(bed.node) == pub["image_id"]
    wait_marker(bed.node, pub["marker"])
    assert member_status(admin, pub["image_id"], bed.node) == "accepted"


def test_token_expires_during_long_download(
    bed: Bed, admin: Any, controlplane: ControlPlane, proxy: FaultProxy, signer: Signer
) -> None:
    lifetime = TOKEN_LIFETIME
    # two images, made and assigned while tokens live an hour (with 15 s tokens openstacksdk
    # authenticates before every request: the operator's side is not this case): v1's
    # encrypted guest under two new ids, signed again; the guest's console log starts empty
    # at every start, so its marker shows that the new image booted
    data = encrypted_bytes(admin, bed.v1["image_id"])
    props = signed_props(admin, signer, data, v1_props(admin, bed))
    a, b = ({"image_id": upload(admin, data, props), "marker": bed.v1["marker"]} for _ in "ab")
    size_a = size_b = len(data)
    force_assign(admin, bed, a["image_id"])
    figures: dict[str, Any] = {"token_lifetime_s": lifetime}
    # the admin session keeps its token while it lives; later ones live 15 s, which only slows it
    with (
        controlplane.reconfigured("keystone", "token", {"expiration": str(lifetime)}),
        image_endpoint(admin, proxy.url),
    ):
        case("keystone-token-expires-mid-download")
        before = node_status(bed.node)["bytes_fetched_total"]
        issued0, seen0 = tokens_issued(controlplane), len(proxy.seen)
        proxy.fault = ("slow", size_a / (lifetime + 10))
        r = bed.node.node("reconcile")
        proxy.fault = None
        converged(bed, admin, r, a)
        [d] = downloads(proxy, a["image_id"], seen0)  # one stream: nothing was retried
        assert (d.status, d.range, d.sent, d.cut) == (200, None, size_a, False), d
        assert d.ended is not None
        # the token of that GET: valid when the stream began, expired long before it ended
        assert keystone_view(admin, d) is None, "the download's token is still valid"
        tok = keystone_view(admin, d, allow_expired=True)
        assert tok is not None
        issued_at, expires_at = when(tok["issued_at"]), when(tok["expires_at"])
        assert abs(expires_at - issued_at - lifetime) <= 1, tok["expires_at"]
        assert issued_at - 1 <= d.started < expires_at
        assert d.ended > expires_at + 5, "the stream did not outlive its token"
        gone = requests.get(
            f"{controlplane.url('glance')}/v2/images/{a['image_id']}",
            headers={"X-Auth-Token": d.token or ""},
            verify=str(controlplane.ca_path),
            timeout=30,
        )
        assert gone.status_code == 401, "glance still takes the download's token"
        assert node_status(bed.node)["bytes_fetched_total"] - before == size_a
        figures["long"] = {
            "size": size_a,
            "download_s": round(d.ended - d.started, 1),
            "streamed_after_expiry_s": round(d.ended - expires_at, 1),
            "node_tokens_seen_by_glance": len({s.token_digest for s in proxy.seen[seen0:]}),
            "glance_requests": len(proxy.seen) - seen0,
            "keystone_tokens_issued": tokens_issued(controlplane) - issued0,
        }

        case("keystone-token-expired-then-cut")
        force_assign(admin, bed, b["image_id"])  # with admin's hour-long token
        before = node_status(bed.node)["bytes_fetched_total"]
        issued0, seen0 = tokens_issued(controlplane), len(proxy.seen)
        rate = size_b / (lifetime + 10)
        cut_at = int(rate * (lifetime + 5))  # ~5 s after the token expired
        proxy.fault = ("slow_reset", (rate, cut_at))
        st = refused(bed, bed.node.node("reconcile"), 5, "resumes on the next run")
        proxy.fault = None
        assert st["state"] == "offline", st
        partial = bed.node.root / "var/lib/edgepin/images" / f"{b['image_id']}.partial"
        kept = partial.stat().st_size
        # lost at most what was in flight: the read under way and the bytes behind the reset
        assert cut_at - 2 * CHUNK <= kept <= cut_at, (kept, cut_at)
        r = bed.node.node("reconcile")
        converged(bed, admin, r, b)
        first, resume = downloads(proxy, b["image_id"], seen0)
        assert (first.status, first.range, first.sent, first.cut) == (200, None, cut_at, True)
        assert first.ended is not None and resume.ended is not None
        tok = keystone_view(admin, first, allow_expired=True)
        assert tok is not None
        expired_at = when(tok["expires_at"])
        assert when(tok["issued_at"]) - 1 <= first.started < expired_at
        assert first.ended > expired_at, "the stream was cut before its token expired"
        assert keystone_view(admin, first) is None
        # the resume: a Range request with another token, issued after the first expired
        assert (resume.status, resume.range) == (206, f"bytes={kept}-"), resume
        assert resume.sent == size_b - kept
        assert resume.token_digest != first.token_digest
        new = keystone_view(admin, resume, allow_expired=True)
        assert new is not None and when(new["issued_at"]) >= expired_at - 1
        sent = first.sent + resume.sent
        assert sent <= size_b + 2 * CHUNK, f"{sent} bytes sent for an image of {size_b}"
        assert node_status(bed.node)["bytes_fetched_total"] - before <= size_b
        figures["cut"] = {
            "size": size_b,
            "cut_at": cut_at,
            "kept": kept,
            "first_stream_s": round(first.ended - first.started, 1),
            "cut_after_expiry_s": round(first.ended - expired_at, 1),
            "resumed_bytes": resume.sent,
            "bytes_sent_over_size": round(sent / size_b, 3),
            "keystone_tokens_issued": tokens_issued(controlplane) - issued0,
        }
    print(f"token-expiry figures: {json.dumps(figures)}")


def test_tls_certificate_not_from_pinned_ca(
    bed: Bed,
    admin: Any,
    controlplane: ControlPlane,
    publish: Callable[..., dict[str, Any]],
    cli_env: dict[str, str],
    run_dir: Path,
) -> None:
    case("tls-wrong-ca")
    pub = publish(version="mitm")
    assign(cli_env, bed.node, pub["image_id"])
    _, cert, key = make_ca(run_dir / f"rogue-tls-{secrets.token_hex(2)}", ["127.0.0.1"])
    rogue = FaultProxy(controlplane.url("glance"), controlplane.ca_path, cert, key).start()
    try:
        with image_endpoint(admin, rogue.url):
            refused(bed, bed.node.node("reconcile"), 5, "TLS verification failed")
    finally:
        rogue.stop()


# -------------------------------------------------------------------------- node


def test_libvirtd_restart(bed: Bed) -> None:
    case("node-libvirtd-restart")
    # converge first: an earlier case may have left an assignment the node could not reach
    converged = bed.node.node("reconcile")
    assert converged.returncode == 0, converged.stderr
    running = current(bed)
    assert guest_image(bed.node) == running
    bed.node.libvirtd.stop_daemon("libvirtd")
    for pid in bed.node.libvirtd.qemu_pids():
        os.kill(pid, signal.SIGKILL)
    bed.node.libvirtd.stop_daemon("virtlogd")
    bed.node.libvirtd.start()
    r = bed.node.node("reconcile")
    assert r.returncode == 0, r.stderr
    assert guest_image(bed.node) == running


def test_no_tpm(bed: Bed) -> None:
    case("node-no-tpm")
    bed.node.tpm.stop()
    try:
        r = bed.node.node("reconcile")
    finally:
        bed.node.tpm.start()
        bed.node.configure(pcrs="7", health_timeout=20)  # the swtpm port changed
    refused(bed, r, 9, "no TPM")


def test_seed_for_another_tpm(
    swtpm_factory: SwtpmFactory,
    libvirtd_factory: Callable[[str], Libvirtd],
    run_dir: Path,
    cli_env: dict[str, str],
    signer: Signer,
) -> None:
    case("node-seed-for-another-tpm")
    a = f"a{secrets.token_hex(3)}"
    b = f"b{secrets.token_hex(3)}"
    node_a = VirtualNode(a, run_dir / "nodes" / a, swtpm_factory.create(a), libvirtd_factory(a))
    tpm_b = swtpm_factory.create(b)
    try:
        node_a.root.mkdir(parents=True)
        enroll_node(node_a, cli_env, signer, run_dir)
        node_a.tpm, tpm_b = tpm_b, node_a.tpm  # boot the seed on the wrong machine
        node_a.configure(pcrs="7")
        r = node_a.node("enroll")
        assert r.returncode == 9 and "another TPM" in r.stderr, r.stderr
        assert not (node_a.root / "var/lib/edgepin/node-credential.json").exists()
    finally:
        node_a.tpm.stop()
        tpm_b.stop()


def test_disk_full_during_download(
    bed: Bed, publish: Callable[..., dict[str, Any]], cli_env: dict[str, str]
) -> None:
    case("node-disk-full")
    pub = publish(version="big")
    images = bed.node.root / "var/lib/edgepin/images"
    keep = {p.name: p.read_bytes() for p in images.glob("*.qcow2")}
    subprocess.run(
        [
            "mount",
            "-t",
            "tmpfs",
            "-o",
            f"size={sum(map(len, keep.values())) + 4 * 1024 * 1024}",
            "tmpfs",
            str(images),
        ],
        check=True,
    )
    try:
        for name, data in keep.items():
            (images / name).write_bytes(data)
        assign(cli_env, bed.node, pub["image_id"])
        st = refused(bed, bed.node.node("reconcile"), 10, "disk full")
        assert st["state"] == "offline"
    finally:
        subprocess.run(["umount", "-l", str(images)], check=True)
    r = bed.node.node("reconcile")
    assert r.returncode == 0, r.stderr
    assert node_status(bed.node)["image_id"] == pub["image_id"]


def test_kill_9_anywhere_converges(
    bed: Bed, publish: Callable[..., dict[str, Any]], cli_env: dict[str, str]
) -> None:
    case("node-kill-9")
    rng = random.Random(1234)
    for i in range(8):
        pub = publish(version=f"k{i}")
        assign(cli_env, bed.node, pub["image_id"])
        proc = subprocess.Popen(
            [EDGEPIN, "node", "--root", str(bed.node.root), "reconcile"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.3, 4.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        r = bed.node.node("reconcile")
        assert r.returncode == 0, f"iteration {i}: {r.stdout}{r.stderr}"
        assert node_status(bed.node)["image_id"] == pub["image_id"]
        assert guest_image(bed.node) == pub["image_id"]
        leftovers = [p.name for p in (bed.node.root / "var/lib/edgepin").rglob(".*.tmp")]
        assert leftovers == []


# ---------------------------------------------------------------------- security


def test_node_cannot_read_another_nodes_things(
    bed: Bed,
    swtpm_factory: SwtpmFactory,
    libvirtd_factory: Callable[[str], Libvirtd],
    run_dir: Path,
    cli_env: dict[str, str],
    signer: Signer,
    publish: Callable[..., dict[str, Any]],
    admin: Any,
) -> None:
    case("security-two-nodes")
    name = f"o{secrets.token_hex(3)}"
    other = VirtualNode(
        name, run_dir / "nodes" / name, swtpm_factory.create(name), libvirtd_factory(name)
    )
    other.root.mkdir(parents=True)
    try:
        enroll_node(other, cli_env, signer, run_dir)
        assert other.node("enroll").returncode == 0
        pub = publish(version="other")
        assign(cli_env, other, pub["image_id"])
        from provisioner.node import config, credentials, ledger

        cfg = config.load(bed.node.root, environ={})
        record = ledger.load(cfg.state_dir, ledger.TpmAnchor(cfg.tcti, cfg.pcrs)).enrollment
        ident, sess = credentials.node_session(cfg, record)
        other_project = json.loads((other.root / "var/lib/edgepin/seed/bundle.json").read_text())[
            "project_id"
        ]
        assert sess.get(
            f"{ident.auth_url}/projects/{other_project}", raise_exc=False
        ).status_code in (401, 403)
        img = sess.get(
            f"/v2/images/{pub['image_id']}",
            endpoint_filter={"service_type": "image", "interface": "public"},
            raise_exc=False,
        )
        assert img.status_code == 404
        key = sess.get(
            f"/v1/secrets/{pub['key_id']}/payload",
            endpoint_filter={"service_type": "key-manager", "interface": "public"},
            headers={"Accept": "text/plain"},
            raise_exc=False,
        )
        assert key.status_code == 403
        # and outside its access rules, even its own project's other APIs are closed
        users = sess.get(f"{ident.auth_url}/users/{bed.user_id}", raise_exc=False)
        assert users.status_code in (401, 403)
    finally:
        other.tpm.stop()


REVOKE_GRACE = 4  # seconds, for this test's node (the default is an hour)


def test_revoked_node_stops_its_guest_and_destroys_its_keys_after_the_grace_period(
    swtpm_factory: SwtpmFactory,
    libvirtd_factory: Callable[[str], Libvirtd],
    run_dir: Path,
    cli_env: dict[str, str],
    signer: Signer,
    publish: Callable[..., dict[str, Any]],
    controlplane: ControlPlane,
) -> None:
    """`edgepin revoke` on a node that runs a guest: Keystone (over TLS against the CA
    fixed at enrollment) refuses the node's credential. The node keeps its guest for the
    grace period, an unreachable Keystone never counts towards it, and once Keystone has
    refused it for the whole period the guest is stopped and the sealed keys and images
    are destroyed."""
    case("security-revoked")
    from tests.testbed.node import run_edgepin

    name = f"r{secrets.token_hex(3)}"
    node = VirtualNode(
        name, run_dir / "nodes" / name, swtpm_factory.create(name), libvirtd_factory(name)
    )
    node.root.mkdir(parents=True)
    var = node.root / "var/lib/edgepin"
    try:
        enroll_node(node, cli_env, signer, run_dir)
        node.configure(pcrs="7", health_timeout=30, EDGEPIN_REVOKE_GRACE=str(REVOKE_GRACE))
        assert node.node("enroll").returncode == 0
        pub = publish(version="revoked")
        assign(cli_env, node, pub["image_id"])
        r = node.node("reconcile")
        assert r.returncode == 0, r.stdout + r.stderr
        wait_marker(node, pub["marker"])
        assert list((var / "keys").glob("*.sealed")) and list((var / "images").glob("*.qcow2"))

        assert run_edgepin(["revoke", name], cli_env).returncode == 0
        r = node.node("reconcile")
        assert r.returncode == 4, r.stdout + r.stderr
        assert "refused the node credential" in r.stderr
        first = node_status(node)
        assert first["state"] == "offline" and first["error"] == "auth", first
        assert guest_image(node) == pub["image_id"], "the guest was stopped within the grace"

        # Keystone unreachable for longer than the grace period: that never revokes
        controlplane.stop_service("keystone")
        try:
            time.sleep(REVOKE_GRACE + 1)
            r = node.node("reconcile")
        finally:
            controlplane.start_service("keystone")
        assert r.returncode == 0, r.stdout + r.stderr
        assert node_status(node)["state"] == "offline"
        assert guest_image(node) == pub["image_id"]
        assert list((var / "keys").glob("*.sealed"))

        # refused again, and for longer than the grace period since the first refusal
        r = node.node("reconcile")
        assert r.returncode == 4, r.stdout + r.stderr
        revoked = node_status(node)
        assert revoked["state"] == "revoked" and revoked["image_id"] is None, revoked
        assert "keys and images destroyed" in revoked["reason"]
        assert guest_image(node) is None
        assert not list((var / "keys").glob("*.sealed"))
        assert not list((var / "images").glob("*"))
        assert (
            'edgepin_state{state="revoked"} 1'
            in (node.root / "run/edgepin/edgepin.prom").read_text()
        )
        # and it stays so: nothing to start, nothing fetched
        r = node.node("reconcile")
        assert r.returncode == 4 and node_status(node)["state"] == "revoked"
        assert not list((var / "images").glob("*"))
    finally:
        node.tpm.stop()


def test_no_secret_anywhere(bed: Bed, admin: Any) -> None:
    case("security-secret-scan")
    from tests.integration.test_node import scan, secrets_of

    keys = []
    for image_id in {current(bed), bed.v1["image_id"]}:
        kid = admin.image.get(f"/images/{image_id}").json()["os_encrypt_key_id"]
        keys.append(
            admin.key_manager.get(
                f"/secrets/{kid}/payload", headers={"Accept": "text/plain"}
            ).content
        )
    hits = scan(
        [
            bed.node.root / "var",
            bed.node.root / "run",
            bed.node.root / "test-logs",
            bed.node.libvirtd.base_dir,
        ],
        secrets_of(bed.node, keys),
    )
    assert hits == []


def test_fault_table_matches_the_suite() -> None:
    """docs/faults.md lists exactly the cases this module tests."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "faults.md").read_text()
    documented = {
        line.split("|")[1].strip().strip("`") for line in doc.splitlines() if line.startswith("| `")
    }
    import ast

    tree = ast.parse(Path(__file__).read_text())
    tested = {
        n.args[0].value
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
        and getattr(n.func, "id", "") == "case"
        and isinstance(n.args[0], ast.Constant)
    }
    tested |= {
        elt.elts[0].value
        for n in ast.walk(tree)
        if isinstance(n, ast.List)
        for elt in n.elts
        if isinstance(elt, ast.Tuple)
        and elt.elts
        and isinstance(elt.elts[0], ast.Constant)
        and str(elt.elts[0].value).startswith("image-")
    }
    assert documented == tested, (
        f"only in docs: {documented - tested}; only in tests: {tested - documented}"
    )
