"""The node provisioner against the real test bed, a swtpm and an isolated libvirtd."""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt
import pytest

from provisioner import assignment, tpm
from provisioner.node import token
from provisioner.operator.assign import share
from provisioner.operator.signingcert import load_key
from provisioner.signing import load_certificate
from tests.integration.conftest import make_signer
from tests.testbed.controlplane import ControlPlane
from tests.testbed.node import VirtualNode, node_status, ok, run_edgepin, wait_marker
from tests.testbed.operator import (
    Signer,
    approve_pcrs,
    assign,
    enroll_node,
    pin_release_key,
    signed_assignment,
)

pytestmark = pytest.mark.integration


def app_credentials(admin: Any, node: VirtualNode) -> list[dict[str, Any]]:
    bundle = json.loads((node.root / "var/lib/edgepin/seed/bundle.json").read_text())
    r = admin.identity.get(f"/users/{bundle['user_id']}/application_credentials")
    creds: list[dict[str, Any]] = r.json()["application_credentials"]
    return creds


def member_status(admin: Any, image_id: str, node: VirtualNode) -> str:
    bundle = json.loads((node.root / "var/lib/edgepin/seed/bundle.json").read_text())
    r = admin.image.get(f"/images/{image_id}/members/{bundle['project_id']}")
    return str(r.json()["status"])


def secrets_of(node: VirtualNode, passphrases: list[bytes]) -> list[bytes]:
    """The actual secret bytes to scan for: the node credential, the image keys."""
    cred = json.loads((node.root / "var/lib/edgepin/node-credential.json").read_text())
    with tpm.Tpm.open(node.tpm.tcti) as t:
        node_secret = t.unseal(base64.b64decode(cred["sealed"]), [7])
    found = [node_secret, *passphrases]
    forms = []
    for s in found:
        forms += [s, base64.b64encode(s), s.hex().encode()]
    return forms


def scan(paths: list[Path], needles: list[bytes]) -> list[str]:
    hits = []
    for root in paths:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for f in files:
            data = f.read_bytes()
            hits += [f"{f}: {n[:6]!r}…" for n in needles if n in data]
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            hits += [f"cmdline of {pid}" for n in needles if n in cmd]
    return hits


def test_seed_to_running_guest_then_nothing_to_do(
    virtual_node: VirtualNode,
    cli_env: dict[str, str],
    signer: Signer,
    run_dir: Path,
    publish: Callable[..., dict[str, Any]],
    admin: Any,
    controlplane: ControlPlane,
) -> None:
    node = virtual_node
    enroll_node(node, cli_env, signer, run_dir)
    ok(node.node("enroll"))
    creds = app_credentials(admin, node)
    assert [c["name"] for c in creds] == ["edgepin-node"]  # bootstrap deleted
    assert creds[0]["access_rules"], "the node credential must be least-privilege"
    ok(node.node("enroll"))  # a no-op
    assert app_credentials(admin, node) == creds

    pub = publish(version="1")
    assign(cli_env, node, pub["image_id"])
    ok(node.node("reconcile"))
    wait_marker(node, pub["marker"])
    st = node_status(node)
    assert st["state"] == "running" and st["image_id"] == pub["image_id"]
    assert st["generation"] == 1
    assert member_status(admin, pub["image_id"], node) == "accepted"
    fetched = st["bytes_fetched_total"]
    assert fetched > 0
    prom = (node.root / "run/edgepin/edgepin.prom").read_text()
    assert 'edgepin_state{state="running"} 1' in prom and "edgepin_generation 1" in prom

    # a second run downloads nothing and mints nothing
    ok(node.node("reconcile"))
    assert node_status(node)["bytes_fetched_total"] == fetched
    assert app_credentials(admin, node) == creds

    # the domain XML is pinned and carries the key only by reference
    conn = libvirt.open(node.libvirtd.uri)
    try:
        dom = conn.lookupByName("edgepin-guest")
        xml = dom.XMLDesc(0)
        assert "<vcpupin vcpu='0' cpuset='1'/>" in xml
        assert "encryption format='luks'" in xml
        assert conn.listAllSecrets() == []  # handed to QEMU, then undefined
    finally:
        conn.close()

    # secrets appear nowhere: state, logs, status, command lines
    passphrase = admin.key_manager.get(
        f"/secrets/{pub['key_id']}/payload", headers={"Accept": "text/plain"}
    ).content
    hits = scan(
        [node.root / "var", node.root / "run", node.root / "test-logs", node.libvirtd.base_dir],
        secrets_of(node, [passphrase]),
    )
    assert hits == []

    # the bootstrap credential no longer works
    from keystoneauth1 import exceptions

    with pytest.raises((exceptions.Unauthorized, exceptions.NotFound)):
        node.bootstrap_session(controlplane.ca_path).get_token()


@pytest.mark.parametrize("kind", ["bare", "ipxe"])
def test_a_guest_with_no_kernel_is_run_and_reported_healthy(
    virtual_node: VirtualNode,
    cli_env: dict[str, str],
    signer: Signer,
    run_dir: Path,
    publish: Callable[..., dict[str, Any]],
    kind: str,
) -> None:
    """The image tier's cheap guests: a boot sector that prints its marker line and halts,
    and iPXE running a script (whose output reaches the serial console only because the
    domain sends the BIOS console there). To the node each is an encrypted disk like any
    other, and the switch's health check sees its marker."""
    node = virtual_node
    enroll_node(node, cli_env, signer, run_dir)
    ok(node.node("enroll"))
    pub = publish(version="1", kind=kind, health_marker=True)
    assign(cli_env, node, pub["image_id"])
    r = node.node("reconcile")
    ok(r)
    assert re.search(rf"switched to image {pub['image_id']}.*reported healthy", r.stderr), r.stderr
    wait_marker(node, pub["marker"])
    st = node_status(node)
    assert st["state"] == "running" and st["image_id"] == pub["image_id"]


def keystone_requests(controlplane: ControlPlane) -> list[str]:
    """The request lines in Keystone's access log so far, e.g. "POST /v3/auth/tokens"."""
    log = controlplane.run_dir / "keystone" / "access.log"
    return [m.group(1) for m in re.finditer(r'"([A-Z]+ /[^ "]*)', log.read_text())]


def test_the_node_keeps_its_token_in_memory_and_a_revoked_node_is_refused_at_once(
    virtual_node: VirtualNode,
    cli_env: dict[str, str],
    signer: Signer,
    run_dir: Path,
    admin: Any,
    controlplane: ControlPlane,
) -> None:
    node = virtual_node
    enroll_node(node, cli_env, signer, run_dir)
    ok(node.node("enroll"))
    ok(node.node("reconcile"))  # issues the token and keeps it
    kept = node.root / "run/edgepin/token.json"
    assert kept.stat().st_mode & 0o777 == 0o600
    assert token.filesystem_of(kept) == "tmpfs"
    token_id = json.loads(json.loads(kept.read_text())["auth_state"])["auth_token"]
    assert node_status(node)["state"] == "waiting"

    # a reconcile with nothing to do: one request to Keystone, with the kept token
    before = len(keystone_requests(controlplane))
    ok(node.node("reconcile"))
    project = json.loads((node.root / "var/lib/edgepin/seed/bundle.json").read_text())
    assert keystone_requests(controlplane)[before:] == [f"GET /v3/projects/{project['project_id']}"]
    assert json.loads(json.loads(kept.read_text())["auth_state"])["auth_token"] == token_id
    # the token never reaches the disk, the logs or a command line
    paths = [node.root / "var", node.root / "test-logs", node.libvirtd.base_dir]
    assert scan(paths, [token_id.encode()]) == []

    # a kept token of another credential is not used (a state copied from another node)
    doc = json.loads(kept.read_text())
    kept.write_text(json.dumps({**doc, "credential_id": "another"}))
    before = len(keystone_requests(controlplane))
    ok(node.node("reconcile"))
    assert keystone_requests(controlplane)[before:][0] == "POST /v3/auth/tokens"

    # the operator revokes the node (`edgepin revoke`: its user disabled, its credential
    # deleted): Keystone refuses its tokens, and the next reconcile is refused although the
    # node still holds one
    r = run_edgepin(["revoke", node.name], cli_env)
    assert r.returncode == 0, r.stderr
    assert app_credentials(admin, node) == []
    r = node.node("reconcile")
    assert r.returncode == 4, r.stdout + r.stderr
    st = node_status(node)
    assert (st["state"], st["error"]) == ("offline", "auth"), st
    assert not kept.exists()  # an invalidated token is forgotten


def test_only_an_assignment_signed_for_this_node_is_run(
    virtual_node: VirtualNode,
    cli_env: dict[str, str],
    signer: Signer,
    run_dir: Path,
    publish: Callable[..., dict[str, Any]],
    admin: Any,
) -> None:
    """Whoever can write the node's project attributes (a Keystone admin) cannot choose its
    image: unsigned, foreign-signed, other-node and wrong-image assignments are refused with
    the reason, and the running guest is untouched."""
    node = virtual_node
    enroll_node(node, cli_env, signer, run_dir)
    ok(node.node("enroll"))
    v1, v2 = publish(version="1"), publish(version="2")
    assign(cli_env, node, v1["image_id"])
    ok(node.node("reconcile"))
    wait_marker(node, v1["marker"])
    project = json.loads((node.root / "var/lib/edgepin/seed/bundle.json").read_text())["project_id"]
    signed = json.loads(
        admin.identity.get(f"/projects/{project}").json()["project"]["edgepin_assignment"]
    )
    assert signed["signed"]["certificate_sha256"] == signer.sha256

    def refused(value: Any, code: int, why: str) -> None:
        admin.identity.patch(
            f"/projects/{project}", json={"project": {"edgepin_assignment": json.dumps(value)}}
        )
        r = node.node("reconcile")
        assert r.returncode == code and why in r.stderr, r.stdout + r.stderr
        st = node_status(node)
        assert st["state"] == "refused" and st["image_id"] == v1["image_id"], st
        conn = libvirt.open(node.libvirtd.uri)
        try:
            assert conn.lookupByName("edgepin-guest").isActive()
        finally:
            conn.close()
        assert not (node.root / f"var/lib/edgepin/images/{v2['image_id']}.qcow2").exists()

    # what an admin can write without the key
    refused({"image_id": v2["image_id"], "generation": 2}, 7, "not signed")
    # signed, but with a key the node does not pin
    other = make_signer(cli_env, run_dir)
    refused(signed_assignment(admin, other, project, node.name, v2["image_id"], 2), 8, "not pinned")
    # another node's assignment, replayed here
    refused(
        signed_assignment(admin, signer, "f" * 32, node.name, v2["image_id"], 2), 8, "another node"
    )
    # signed for this project under another node's name (projects renamed in Keystone)
    refused(
        signed_assignment(admin, signer, project, "other", v2["image_id"], 2), 8, "another node"
    )
    # the readable copy changed: not what the node reads (it keeps v1, fetches nothing)
    readable = {**signed, "image_id": v2["image_id"], "generation": 2}
    admin.identity.patch(
        f"/projects/{project}", json={"project": {"edgepin_assignment": json.dumps(readable)}}
    )
    ok(node.node("reconcile"))
    assert node_status(node)["image_id"] == v1["image_id"]
    assert not (node.root / f"var/lib/edgepin/images/{v2['image_id']}.qcow2").exists()
    # the signed payload changed: the signature no longer verifies
    payload = json.loads(base64.b64decode(signed["signed"]["payload"]))
    forged = json.dumps({**payload, "image_id": v2["image_id"], "generation": 2}, sort_keys=True)
    tampered = {**signed["signed"], "payload": base64.b64encode(forged.encode()).decode()}
    refused({**signed, "signed": tampered}, 8, "signature")
    # signed for v2's id with v1's sha512: Glance's v2 is not what was signed (v2 shared
    # with the node, as an admin can do)
    share(admin, v2["image_id"], project)
    key = load_key(admin, signer.key_id)
    cert = load_certificate(signer.pem)
    mismatch = assignment.sign(
        key, cert, project, node.name, v2["image_id"], v1["sha512"], 2, "now"
    )
    refused(mismatch, 8, "not the one assigned")
    assert member_status(admin, v2["image_id"], node) == "rejected"

    # the operator's assignment, signed: run
    v3 = publish(version="3")
    assign(cli_env, node, v3["image_id"])
    ok(node.node("reconcile"))
    wait_marker(node, v3["marker"])
    assert node_status(node)["image_id"] == v3["image_id"]


def test_offline_reboot_update_rollback_and_rollback_attack(
    virtual_node: VirtualNode,
    cli_env: dict[str, str],
    signer: Signer,
    run_dir: Path,
    publish: Callable[..., dict[str, Any]],
    admin: Any,
    controlplane: ControlPlane,
) -> None:
    node = virtual_node
    enroll_node(node, cli_env, signer, run_dir)
    ok(node.node("enroll"))
    v1 = publish(version="1")
    assign(cli_env, node, v1["image_id"])
    ok(node.node("reconcile"))
    wait_marker(node, v1["marker"])

    # a reboot with the control plane stopped: the guest comes back from the cache
    conn = libvirt.open(node.libvirtd.uri)
    conn.lookupByName("edgepin-guest").destroy()
    conn.close()
    node.tpm.power_cycle()
    node.serial_log.unlink()
    for service in ("keystone", "glance", "barbican"):
        controlplane.stop_service(service)
    try:
        r = node.node("reconcile")
        assert r.returncode == 0, r.stderr
        assert node_status(node)["state"] == "offline"
        wait_marker(node, v1["marker"])
    finally:
        for service in ("keystone", "glance", "barbican"):
            controlplane.start_service(service)

    # a new assignment leads to an update; the previous image is kept for rollback
    v2 = publish(version="2")
    assign(cli_env, node, v2["image_id"])
    ok(node.node("reconcile"))
    wait_marker(node, v2["marker"])
    st = node_status(node)
    assert st["image_id"] == v2["image_id"] and st["previous_image_id"] == v1["image_id"]
    images = sorted(p.name for p in (node.root / "var/lib/edgepin/images").iterdir())
    assert images == sorted([f"{v1['image_id']}.qcow2", f"{v2['image_id']}.qcow2"])

    # an update to a guest that never becomes healthy is rolled back
    bad = publish(version="3", behaviour="poweroff", extra=["--health-marker", "never-printed"])
    assign(cli_env, node, bad["image_id"])
    r = node.node("reconcile")
    assert r.returncode == 11, r.stdout + r.stderr
    st = node_status(node)
    assert st["state"] == "rolled-back" and st["image_id"] == v2["image_id"]
    assert member_status(admin, bad["image_id"], node) == "rejected"
    conn = libvirt.open(node.libvirtd.uri)
    try:
        assert conn.lookupByName("edgepin-guest").isActive()
    finally:
        conn.close()
    # and it is not retried until a new assignment
    r = node.node("reconcile")
    assert "already refused" in r.stdout

    # an older assignment, validly signed (a replay), is refused as a rollback attack
    project = json.loads((node.root / "var/lib/edgepin/seed/bundle.json").read_text())["project_id"]

    def record(value: Any) -> Any:
        text = value if isinstance(value, str) else json.dumps(value)  # as Keystone keeps it
        admin.identity.patch(f"/projects/{project}", json={"project": {"edgepin_assignment": text}})
        return node.node("reconcile")

    r = record(signed_assignment(admin, signer, project, node.name, v1["image_id"], 1))
    assert r.returncode == 10
    assert "rollback attack" in r.stderr
    assert node_status(node)["image_id"] == v2["image_id"]

    # the highest generation seen (3, the image that was rolled back) names one image only
    r = record(signed_assignment(admin, signer, project, node.name, v1["image_id"], 3))
    assert r.returncode == 10, r.stdout + r.stderr
    assert f"named image {bad['image_id']} before" in r.stderr
    # records that are none: refused, the guest untouched, a status written
    for hostile in (
        f'{{"image_id": "{v1["image_id"]}", "generation": Infinity}}',
        '{"image_id": {}, "generation": 4}',
        '{"image_id": "../../../etc/edgepin/ca", "generation": 4}',
    ):
        r = record(hostile)
        assert r.returncode == 7 and "Traceback" not in r.stderr, r.stdout + r.stderr
        st = node_status(node)
        assert st["state"] == "refused" and st["image_id"] == v2["image_id"], st
    conn = libvirt.open(node.libvirtd.uri)
    try:
        assert conn.lookupByName("edgepin-guest").isActive()
    finally:
        conn.close()


def test_pcr_change_refuses_and_foreign_domain_removed(
    virtual_node: VirtualNode,
    cli_env: dict[str, str],
    signer: Signer,
    run_dir: Path,
    publish: Callable[..., dict[str, Any]],
) -> None:
    node = virtual_node
    enroll_node(node, cli_env, signer, run_dir)
    ok(node.node("enroll"))
    pub = publish(version="1")
    assign(cli_env, node, pub["image_id"])

    # a domain defined by hand is removed
    conn = libvirt.open(node.libvirtd.uri)
    conn.defineXML(
        "<domain type='qemu'><name>intruder</name><memory unit='MiB'>64</memory>"
        "<os><type arch='x86_64'>hvm</type></os></domain>"
    )
    conn.close()
    ok(node.node("reconcile"))
    conn = libvirt.open(node.libvirtd.uri)
    try:
        assert [d.name() for d in conn.listAllDomains()] == ["edgepin-guest"]
        conn.lookupByName("edgepin-guest").destroy()
    finally:
        conn.close()

    # a tampered boot: PCR 7 differs, the node refuses, says why, starts nothing
    with tpm.Tpm.open(node.tpm.tcti) as t:
        t.extend_pcr(7, b"a different bootloader")
    r = node.node("reconcile")
    assert r.returncode == 9
    assert "measured boot state differs" in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("edgepin: error")]) == 1
    st = node_status(node)
    assert st["state"] == "refused" and "measured boot state" in st["reason"]
    conn = libvirt.open(node.libvirtd.uri)
    try:
        assert not conn.lookupByName("edgepin-guest").isActive()
    finally:
        conn.close()


def test_two_provisioners_at_once(virtual_node: VirtualNode) -> None:
    from provisioner.errors import StateError
    from provisioner.node import state

    lock = virtual_node.root / "run/edgepin/lock"
    with state.node_lock(lock):
        r = virtual_node.node("reconcile")
        with pytest.raises(StateError, match="lock held"), state.node_lock(lock):
            pass
    assert r.returncode == 10 and "another edgepin provisioner" in r.stderr


def test_image_signed_by_an_unpinned_certificate_is_refused(
    virtual_node: VirtualNode,
    cli_env: dict[str, str],
    signer: Signer,
    run_dir: Path,
    publish: Callable[..., dict[str, Any]],
    admin: Any,
) -> None:
    node = virtual_node
    enroll_node(node, cli_env, signer, run_dir)
    ok(node.node("enroll"))
    out = run_dir / f"rogue-{secrets.token_hex(3)}.pem"
    r = run_edgepin(
        ["signing-cert", "create", "--name", "rogue", "--cert-out", str(out), "--json"], cli_env
    )
    rogue_ids = json.loads(r.stdout)
    rogue = Signer(rogue_ids["cert_id"], rogue_ids["key_id"], rogue_ids["sha256"], out.read_bytes())
    pub = publish(version="1", signer_=rogue)
    assign(cli_env, node, pub["image_id"])
    r = node.node("reconcile")
    assert r.returncode == 8
    assert "not pinned" in r.stderr
    assert member_status(admin, pub["image_id"], node) == "rejected"
    assert not list((node.root / "var/lib/edgepin/images").glob("*.qcow2"))


def test_interrupted_download_resumes_with_range(
    virtual_node: VirtualNode,
    cli_env: dict[str, str],
    signer: Signer,
    run_dir: Path,
    publish: Callable[..., dict[str, Any]],
    admin: Any,
) -> None:
    """A download cut half-way resumes from where it stopped, and the result verifies."""
    node = virtual_node
    enroll_node(node, cli_env, signer, run_dir)
    ok(node.node("enroll"))
    pub = publish(version="1")
    assign(cli_env, node, pub["image_id"])
    data = admin.image.get(f"/images/{pub['image_id']}/file").content
    half = len(data) // 2
    images = node.root / "var/lib/edgepin/images"
    images.mkdir(parents=True, exist_ok=True)
    (images / f"{pub['image_id']}.partial").write_bytes(data[:half])
    ok(node.node("reconcile"))
    st = node_status(node)
    assert st["state"] == "running"
    assert st["bytes_fetched_total"] == len(data) - half
    wait_marker(node, pub["marker"])
    # a partial file corrupted on the node's own disk: the resumed hash fails, the node
    # downloads once more from zero instead of blaming the image
    v2 = publish(version="2")
    size2 = len(admin.image.get(f"/images/{v2['image_id']}/file").content)
    (images / f"{v2['image_id']}.partial").write_bytes(os.urandom(size2 // 2))
    before = node_status(node)["bytes_fetched_total"]
    assign(cli_env, node, v2["image_id"])
    ok(node.node("reconcile"))
    st = node_status(node)
    assert st["image_id"] == v2["image_id"]
    assert st["bytes_fetched_total"] - before == size2 - size2 // 2 + size2
    r = node.node("status")
    assert r.returncode == 0 and "running" in r.stdout and v2["image_id"] in r.stdout


def test_edits_to_the_state_partition_give_an_attacker_nothing(
    virtual_node: VirtualNode,
    cli_env: dict[str, str],
    signer: Signer,
    run_dir: Path,
    publish: Callable[..., dict[str, Any]],
) -> None:
    """Someone who can write the node's disk offline: an older node.json, an image and key
    blob swapped for others that this TPM unseals, a planted CA, credential or seed."""
    node = virtual_node
    enroll_node(node, cli_env, signer, run_dir)
    node.configure(pcrs="0,7")  # a host image that seals to other PCRs than the seed's
    r = node.node("enroll")
    assert r.returncode == 3 and "the seed was made for PCRs [7]" in r.stderr, r.stderr
    node.configure(pcrs="7")
    ok(node.node("enroll"))
    var = node.root / "var/lib/edgepin"
    first, second = publish(version="1"), publish(version="2")
    assign(cli_env, node, first["image_id"])
    ok(node.node("reconcile"))
    old_ledger = (var / "node.json").read_bytes()
    assign(cli_env, node, second["image_id"])
    ok(node.node("reconcile"))
    wait_marker(node, second["marker"])
    good_ledger = (var / "node.json").read_bytes()

    def guest() -> tuple[bool, str]:
        conn = libvirt.open(node.libvirtd.uri)
        try:
            dom = conn.lookupByName("edgepin-guest")
            return bool(dom.isActive()), dom.XMLDesc(0)
        finally:
            conn.close()

    def refused(code: int, words: str) -> None:
        r = node.node("reconcile")
        assert r.returncode == code and words in r.stderr, f"{r.returncode}: {r.stderr}"
        assert node_status(node)["state"] in ("refused", "failed"), node_status(node)

    # an older, genuine copy of node.json (generation 1): refused, the running guest kept
    (var / "node.json").write_bytes(old_ledger)
    refused(9, "older copy")
    active, xml = guest()
    assert active and second["image_id"] in xml
    (var / "node.json").write_bytes(good_ledger)
    ok(node.node("reconcile"))

    # a planted CA (the seed's CA is used when the image has none), credential or seed
    ca = var / "seed" / "ca.pem"
    genuine_ca = ca.read_bytes()
    ca.write_bytes(signer.pem)
    refused(9, "not the one the node enrolled with")
    ca.write_bytes(genuine_ca)
    cred = var / "node-credential.json"
    genuine_cred = cred.read_bytes()
    planted = json.loads(genuine_cred)
    planted["sealed"] = (var / "keys" / f"{second['image_id']}.sealed").read_text()
    cred.write_text(json.dumps(planted))
    refused(9, "not the credential the node sealed")
    cred.write_bytes(genuine_cred)
    bundle_path = var / "seed" / "bundle.json"
    bundle = json.loads(bundle_path.read_text())
    bundle["auth_url"] = "https://127.0.0.1:1/v3"  # nothing listens: a use would fail
    bundle_path.write_text(json.dumps(bundle))
    ok(node.node("reconcile"))  # the seed is not read after enrollment

    # the current image and its key blob swapped for the previous ones (an image this
    # TPM unseals the key of), then a reboot: nothing starts, the copy is fetched again
    images, keys_dir = var / "images", var / "keys"
    for d, suffix in ((images, ".qcow2"), (keys_dir, ".sealed")):
        (d / f"{first['image_id']}{suffix}").replace(d / f"{second['image_id']}{suffix}")
    conn = libvirt.open(node.libvirtd.uri)
    conn.lookupByName("edgepin-guest").destroy()
    conn.close()
    fetched = node_status(node)["bytes_fetched_total"]
    refused(8, "the local copy of image")
    assert not guest()[0], "a swapped image was started"
    assert not (images / f"{second['image_id']}.qcow2").exists()
    ok(node.node("reconcile"))
    wait_marker(node, second["marker"])
    st = node_status(node)
    assert st["state"] == "running" and st["image_id"] == second["image_id"]
    assert st["bytes_fetched_total"] > fetched

    # only the key blob replaced, by one this TPM made in the node's measured state (the
    # worst case: fixedTPM, the node's exact policy, the attacker's passphrase): not started
    with tpm.Tpm.open(node.tpm.tcti) as t:
        planted = t.seal(b"the attacker's passphrase", [7])
    (keys_dir / f"{second['image_id']}.sealed").write_bytes(base64.b64encode(planted))
    conn = libvirt.open(node.libvirtd.uri)
    conn.lookupByName("edgepin-guest").destroy()
    conn.close()
    refused(8, "the sealed key of image")
    assert not guest()[0], "a guest was started with a swapped key blob"
    ok(node.node("reconcile"))
    assert node_status(node)["state"] == "running"


def test_a_node_seeded_for_other_pcr_values_says_its_own_and_takes_a_new_seed(
    virtual_node: VirtualNode,
    cli_env: dict[str, str],
    signer: Signer,
    run_dir: Path,
    admin: Any,
    controlplane: ControlPlane,
) -> None:
    """The factory's path without a login, and re-seeding a node that has not enrolled."""
    import re
    import subprocess

    node = virtual_node
    ek, ekca = run_dir / f"{node.name}.ek.pem", run_dir / f"{node.name}.ekca.pem"
    ek.write_bytes(node.tpm.ek_cert_pem())
    ekca.write_bytes(node.tpm.ca_cert_pem())

    def enroll(values: Path, seed: Path) -> None:
        args = ["enroll", node.name, "--ek-cert", str(ek), "--ek-ca", str(ekca)]
        r = run_edgepin(
            [*args, "--pcrs", "7", "--pcr-values", str(values), "--seed-out", str(seed)], cli_env
        )
        assert r.returncode == 0, r.stderr

    def instance(seed: Path) -> str:
        meta = subprocess.run(
            ["mcopy", "-i", str(seed), "::meta-data", "-"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return meta.splitlines()[0]

    guessed = run_dir / f"{node.name}.guessed.json"
    guessed.write_text(json.dumps({"7": "ff" * 32}))
    first = run_dir / f"{node.name}.seed1.img"
    enroll(guessed, first)
    node.configure(pcrs="7")
    node.pin_certificate(signer.pem)
    node.install_seed(first)
    r = node.node("enroll")
    assert r.returncode == 9, r.stderr
    said = re.search(r"PCR values: (\{[^}]*\})", r.stderr)
    assert said, r.stderr
    measured = node.root / "measured.json"
    measured.write_text(said.group(1))
    assert json.loads(said.group(1)) == {"7": "00" * 32}  # what this swtpm measured

    second = run_dir / f"{node.name}.seed2.img"
    enroll(measured, second)
    assert instance(first) != instance(second), "cloud-init would ignore the new seed"
    node.install_seed(second)  # a new instance: cloud-init reads the new seed
    # whoever held the bootstrap credential minted one of their own: enrollment removes it
    bundle = json.loads((node.root / "var/lib/edgepin/seed/bundle.json").read_text())
    node.bootstrap_session(controlplane.ca_path).post(
        f"{bundle['auth_url']}/users/{bundle['user_id']}/application_credentials",
        json={"application_credential": {"name": "stray", "roles": [{"name": "member"}]}},
    )
    names_before = sorted(c["name"] for c in app_credentials(admin, node))
    assert "stray" in names_before, names_before
    ok(node.node("enroll"))
    assert [c["name"] for c in app_credentials(admin, node)] == ["edgepin-node"]
    # enrolled: the seed cloud-init would hand over (it does not run on an enrolled node)
    # is not taken
    kept = (node.root / "var/lib/edgepin/seed/bundle.json").read_bytes()
    r = node.install_seed(first)
    assert "the node is enrolled: no seed is read" in r.stdout, r.stdout
    assert (node.root / "var/lib/edgepin/seed/bundle.json").read_bytes() == kept


def test_the_installed_node_command_imports_no_openstacksdk(tmp_path: Path) -> None:
    """The console script as the units run it: `edgepin node reconcile` loads keystoneauth,
    libvirt, tpm2-pytss and cryptography, never openstacksdk (the operator's library)."""
    import subprocess
    import sys

    script = str(Path(sys.executable).parent / "edgepin")
    for args in (["status"], ["--tcti", "swtpm:port=1", "reconcile"]):
        r = subprocess.run(
            [sys.executable, "-X", "importtime", script, "node", "--root", str(tmp_path), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        imported = [ln.split("|")[-1].strip() for ln in r.stderr.splitlines() if "|" in ln]
        assert "provisioner.node.cli" in imported, r.stderr[-500:]
        assert not [m for m in imported if m.split(".")[0] == "openstack"], args
        if args[-1] == "reconcile":
            assert {"keystoneauth1", "libvirt", "provisioner.node.reconcile"} <= set(imported)


def test_an_image_that_needs_the_site_network_or_a_usb_device_is_refused_by_a_node_without_it(
    virtual_node: VirtualNode,
    cli_env: dict[str, str],
    signer: Signer,
    run_dir: Path,
    publish: Callable[..., dict[str, Any]],
    admin: Any,
) -> None:
    node = virtual_node  # EDGEPIN_NETWORK=none: a node built with --guest-network none
    enroll_node(node, cli_env, signer, run_dir)
    ok(node.node("enroll"))
    quiet = publish(version="1", extra=["--network", "none"])
    assign(cli_env, node, quiet["image_id"])
    # Glance properties changed after the assignment was signed: the node reads the network,
    # vCPUs, memory and health marker only from the signed assignment, so this changes
    # nothing (a marker the guest never prints would roll it back; 4096 MiB would not fit)
    r = admin.image.patch(
        f"/images/{quiet['image_id']}",
        json=[
            {"op": "replace", "path": "/edgepin_network", "value": "lan"},
            {"op": "replace", "path": "/edgepin_memory_mb", "value": "4096"},
            {"op": "add", "path": "/edgepin_health_marker", "value": "NEVER-PRINTED"},
        ],
        headers={"Content-Type": "application/openstack-images-v2.1-json-patch"},
    )
    assert r.status_code == 200, r.text
    ok(node.node("reconcile"))
    wait_marker(node, quiet["marker"])
    assert node_status(node)["state"] == "running"
    conn = libvirt.open(node.libvirtd.uri)
    try:
        xml = conn.lookupByName("edgepin-guest").XMLDesc(0)
    finally:
        conn.close()
    assert "<interface" not in xml
    assert "<memory unit='KiB'>262144</memory>" in xml, xml  # --memory 256, as signed

    lan = publish(version="2", extra=["--network", "lan"])
    assign(cli_env, node, lan["image_id"])
    r = node.node("reconcile")
    assert r.returncode == 11, r.stderr  # a guest this host cannot run, as too many vCPUs
    assert "the image needs the site's network (lan); this node has no guest attachment" in (
        r.stderr
    )
    st = node_status(node)
    assert st["state"] == "refused" and st["image_id"] == quiet["image_id"], st
    assert member_status(admin, lan["image_id"], node) == "rejected"
    # refused before anything was fetched; the running guest untouched
    assert not (node.root / f"var/lib/edgepin/images/{lan['image_id']}.qcow2").exists()
    assert not list((node.root / "var/lib/edgepin/images").glob("*.partial"))

    # a USB device the node does not have (its root has no USB device in sysfs): the same
    usb = publish(version="3", extra=["--usb", "0627:0001"])
    assign(cli_env, node, usb["image_id"])
    r = node.node("reconcile")
    assert r.returncode == 11, r.stderr
    assert "the image needs USB device 0627:0001, which this node does not have" in r.stderr
    assert node_status(node)["image_id"] == quiet["image_id"]
    assert member_status(admin, usb["image_id"], node) == "rejected"
    assert not (node.root / f"var/lib/edgepin/images/{usb['image_id']}.qcow2").exists()
    wait_marker(node, quiet["marker"])  # still there, from the guest that kept running

    # the network with only the host (the node has none: EDGEPIN_HOST_NETWORK=none), a VLAN
    # of the site's network (no guest attachment) and a PCI device (its root has no PCI
    # device in sysfs): each refused the same way, before anything is fetched
    for n, (args, refusal) in enumerate(
        (
            (["--network", "host"], "the image needs the network with the host (host)"),
            (["--network", "vlan:42"], "the image needs the site's network (vlan:42)"),
            (["--pci", "class:00ff"], "needs PCI device class:00ff, which this node does not"),
        )
    ):
        needy = publish(version=f"4.{n}", extra=args)
        assign(cli_env, node, needy["image_id"])
        r = node.node("reconcile")
        assert r.returncode == 11, r.stderr
        assert refusal in r.stderr, r.stderr
        assert node_status(node)["image_id"] == quiet["image_id"]
        assert member_status(admin, needy["image_id"], node) == "rejected"
        assert not (node.root / f"var/lib/edgepin/images/{needy['image_id']}.qcow2").exists()
    wait_marker(node, quiet["marker"])


def test_a_node_without_a_seed_prints_what_the_factory_enrolls_it_with(
    virtual_node: VirtualNode, cli_env: dict[str, str], signer: Signer, run_dir: Path
) -> None:
    """The factory's path without a login: a node booted with no seed prints its EK
    certificate, EK public key and PCR values on its console; enrolled with exactly those,
    it enrolls; enrolled, it prints nothing of the kind."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    node = virtual_node
    node.configure(pcrs="4,7")
    node.pin_certificate(signer.pem)
    r = node.node("seed")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("no seed: cloud-init found none"), r.stdout
    said = dict(
        line.removeprefix("factory: ").split(" ", 1)
        for line in r.stdout.splitlines()
        if line.startswith("factory: ")
    )
    assert set(said) == {"ek-cert", "ek-pub", "pcrs"}, r.stdout
    cert = base64.b64decode(said["ek-cert"], validate=True)
    # the certificate swtpm_setup stored in the TPM's NV, read here another way
    pem = x509.load_der_x509_certificate(cert).public_bytes(serialization.Encoding.PEM)
    assert pem == x509.load_pem_x509_certificate(node.tpm.ek_cert_pem()).public_bytes(
        serialization.Encoding.PEM
    )
    said_pub = serialization.load_pem_public_key(base64.b64decode(said["ek-pub"], validate=True))
    cert_pub = serialization.load_pem_public_key(tpm.ek_public_pem_from_cert(cert))
    assert said_pub.public_numbers() == cert_pub.public_numbers()  # type: ignore[union-attr]
    assert json.loads(said["pcrs"]) == {"4": "00" * 32, "7": "00" * 32}  # nothing measured

    # at the factory: exactly what the console said, as files
    ek, values, ekca = run_dir / "console-ek.der", run_dir / "console-pcrs.json", run_dir / "ca"
    ek.write_bytes(cert)
    values.write_text(said["pcrs"])
    ekca.write_bytes(node.tpm.ca_cert_pem())
    seed = run_dir / f"{node.name}.factory-seed.img"
    args = ["enroll", node.name, "--ek-cert", str(ek), "--ek-ca", str(ekca), "--pcrs", "4,7"]
    r = run_edgepin([*args, "--pcr-values", str(values), "--seed-out", str(seed)], cli_env)
    assert r.returncode == 0, r.stderr
    node.install_seed(seed)
    ok(node.node("enroll"))
    r = node.node("seed")
    assert r.returncode == 0, r.stderr
    assert "factory:" not in r.stdout, r.stdout


def test_a_node_with_a_release_key_keeps_its_secrets_through_an_approved_boot_chain(
    virtual_node: VirtualNode,
    cli_env: dict[str, str],
    signer: Signer,
    run_dir: Path,
    publish: Callable[..., dict[str, Any]],
    tmp_path: Path,
) -> None:
    """A host update on a node that pins a release key: its credential, its image key and
    its anchor open in the new measured state once the release key approved it, in the
    old one as before, and never in a state no one approved."""
    node = virtual_node
    key, _pub = pin_release_key(node.root, tmp_path)
    enroll_node(node, cli_env, signer, run_dir)
    ok(node.node("enroll"))
    sealed = json.loads((node.root / "var/lib/edgepin/node-credential.json").read_text())
    blob = tpm.parse_blob(base64.b64decode(sealed["sealed"]))
    assert blob["policy"] == "signed" and blob["pcrs"] == [7], blob
    pub = publish(version="1")
    assign(cli_env, node, pub["image_id"])
    ok(node.node("reconcile"))
    wait_marker(node, pub["marker"])

    def guest_stopped() -> None:  # the next reconcile must unseal the image key again
        conn = libvirt.open(node.libvirtd.uri)
        try:
            conn.lookupByName("edgepin-guest").destroy()
        finally:
            conn.close()

    # the host is updated: its boot chain measures other values into PCR 7
    guest_stopped()
    node.tpm.power_cycle()
    with tpm.Tpm.open(node.tpm.tcti) as t:
        t.extend_pcr(7, b"release 2's boot loader")
        release_2 = t.read_pcrs([7])
    r = node.node("reconcile")
    assert r.returncode == 9, r.stderr
    assert "none of the 0 signed PCR policies" in r.stderr, r.stderr
    assert "edgepin release approve" in r.stderr and release_2[7].hex() in r.stderr, r.stderr
    assert node_status(node)["state"] == "refused"

    # the factory approves release 2's values: the same secrets open, nothing was sealed again
    approvals = node.root / "var/lib/edgepin-host/approvals"
    approvals.mkdir(parents=True)
    approve_pcrs(key, release_2, approvals / "release-2.json")
    ok(node.node("reconcile"))
    st = node_status(node)
    assert st["state"] == "running" and st["image_id"] == pub["image_id"], st
    assert json.loads((node.root / "var/lib/edgepin/node-credential.json").read_text()) == sealed

    # release 2 is of epoch 1: once it is kept, the reconcile raises the TPM's host floor
    # with the owner hierarchy's secret that enrollment sealed
    with tpm.Tpm.open(node.tpm.tcti) as t:
        assert t.floor_read() == 0 and t.owner_auth_is_set()
    host_epoch(node, 1)
    approve_pcrs(key, release_2, approvals / "release-2.json", epoch=1)
    guest_stopped()
    r = ok(node.node("reconcile"))
    assert "host floor rose from epoch 0 to 1" in r.stderr, r.stderr
    assert node_status(node)["state"] == "running"
    with tpm.Tpm.open(node.tpm.tcti) as t:
        assert t.floor_read() == 1
    [row] = json.loads(ok(run_edgepin(["status", node.name, "--json"], cli_env)).stdout)
    assert (row["host_epoch"], row["host_floor"]) == (1, 1), row

    # a boot chain no one approved: refused, the guest not started
    guest_stopped()
    with tpm.Tpm.open(node.tpm.tcti) as t:
        t.extend_pcr(7, b"an attacker's boot loader")
    r = node.node("reconcile")
    assert r.returncode == 9 and "none of the 1 signed PCR policies" in r.stderr, r.stderr
    assert_guest_stopped(node)

    # release 1 again (someone points the boot at the old slot): the state every secret
    # was sealed in, and an approval of it on the disk, but below the floor: nothing opens
    node.tpm.power_cycle()
    host_epoch(node, 0)
    approve_pcrs(key, {7: bytes(32)}, approvals / "release-1.json", epoch=0)
    r = node.node("reconcile")
    assert r.returncode == 9 and "host floor is above epoch 0" in r.stderr, r.stderr
    assert "this host release (epoch 0) is below the TPM's host floor" in r.stderr, r.stderr
    assert_guest_stopped(node)


def host_epoch(node: VirtualNode, epoch: int) -> None:
    """The running release's EDGEPIN_HOST_EPOCH, as its image would have it."""
    conf = node.root / "etc" / "edgepin" / "edgepin.conf"
    lines = [x for x in conf.read_text().splitlines() if not x.startswith("EDGEPIN_HOST_EPOCH=")]
    conf.write_text("\n".join([*lines, f"EDGEPIN_HOST_EPOCH={epoch}", ""]))


def assert_guest_stopped(node: VirtualNode) -> None:
    conn = libvirt.open(node.libvirtd.uri)
    try:
        assert not conn.lookupByName("edgepin-guest").isActive()
    finally:
        conn.close()
