"""Air-gapped bundles against the real test bed: ``edgepin bundle`` writes a node's signed
assignment, its encrypted image and the image key wrapped for the node's TPM; ``edgepin
node import`` runs it on a virtual node (its own swtpm and libvirtd) with the control plane
stopped, and refuses, with the reason and without touching the running guest, a bundle for
another node, a tampered, truncated or older one."""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt
import pytest

from provisioner import tpm
from tests.testbed.controlplane import ControlPlane
from tests.testbed.node import VirtualNode, node_status, ok, run_edgepin, wait_marker
from tests.testbed.operator import Signer, assign, enroll_node
from tests.testbed.swtpm import Swtpm

pytestmark = pytest.mark.integration

SERVICES = ("keystone", "glance", "barbican")


def project_of(node: VirtualNode) -> str:
    bundle = json.loads((node.root / "var/lib/edgepin/seed/bundle.json").read_text())
    return str(bundle["project_id"])


def member_status(admin: Any, image_id: str, node: VirtualNode) -> str:
    r = admin.image.get(f"/images/{image_id}/members/{project_of(node)}")
    return str(r.json()["status"])


def make_bundle(cli_env: dict[str, str], node: str, out: Path, *extra: str) -> Path:
    r = run_edgepin(["bundle", node, "--out", str(out), "--json", *extra], cli_env)
    ok(r)
    result = json.loads(r.stdout)
    folder = Path(result["bundle"])
    assert folder == out / f"edgepin-{node}"
    assert sorted(p.name for p in folder.iterdir()) == ["image.qcow2", "manifest.json"]
    assert sorted(p.name for p in out.iterdir()) == [folder.name]  # no temporary folder
    return folder


def passphrase_forms(admin: Any, key_id: str) -> list[bytes]:
    raw = admin.key_manager.get(
        f"/secrets/{key_id}/payload", headers={"Accept": "text/plain"}
    ).content
    return [raw, base64.b64encode(raw), raw.hex().encode()]


def files_holding(root: Path, needles: list[bytes]) -> list[str]:
    return [
        f"{p}: {n[:6]!r}…"
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink()
        for n in needles
        if n in p.read_bytes()
    ]


def guest_active(node: VirtualNode) -> bool:
    conn = libvirt.open(node.libvirtd.uri)
    try:
        return bool(conn.lookupByName("edgepin-guest").isActive())
    finally:
        conn.close()


def test_a_bundle_runs_the_guest_with_no_network_and_the_node_reports_it_later(
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
    stick = run_dir / f"stick-{node.name}"
    folder = make_bundle(cli_env, node.name, stick)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert (manifest["kind"], manifest["version"], manifest["node"]) == (
        "edgepin-bundle",
        1,
        node.name,
    )
    assert manifest["image"]["id"] == v1["image_id"]
    assert manifest["key"]["pcrs"] == [7]
    assert json.loads(base64.b64decode(manifest["key"]["wrapped"]))["kind"] == "duplicate"
    # the image's passphrase is nowhere in the clear on the stick (raw, base64, hex)
    secret = passphrase_forms(admin, v1["key_id"])
    assert files_holding(stick, secret) == []

    # the site has no network: the control plane is out of reach for the whole import
    for service in SERVICES:
        controlplane.stop_service(service)
    try:
        r = node.node("import", str(stick))
        ok(r)
        wait_marker(node, v1["marker"])
        st = node_status(node)
        assert (st["state"], st["image_id"], st["generation"]) == ("running", v1["image_id"], 1)
        assert st["bytes_fetched_total"] == 0
        # the same stick again: nothing to do, the guest is left as it runs
        r = node.node("import", str(stick))
        ok(r)
        assert "nothing to import" in r.stdout, r.stdout
        assert guest_active(node)
        # a reconcile with no network keeps it running from the local copy
        ok(node.node("reconcile"))
        assert node_status(node)["state"] == "offline"
    finally:
        for service in SERVICES:
            controlplane.start_service(service)
    # the key was unwrapped by the TPM and sealed again: in clear nowhere on the node
    assert files_holding(node.root / "var", secret) == []
    assert files_holding(node.root / "run", secret) == []

    # the control plane heard nothing yet; the first reconcile that reaches it reports
    assert member_status(admin, v1["image_id"], node) == "pending"
    ok(node.node("reconcile"))
    st = node_status(node)
    assert (st["state"], st["image_id"], st["bytes_fetched_total"]) == (
        "running",
        v1["image_id"],
        0,
    )
    assert member_status(admin, v1["image_id"], node) == "accepted"


def test_a_bundle_for_another_node_a_tampered_truncated_or_older_one_is_refused(
    virtual_node: VirtualNode,
    make_swtpm: Callable[[str], Swtpm],
    cli_env: dict[str, str],
    signer: Signer,
    run_dir: Path,
    publish: Callable[..., dict[str, Any]],
) -> None:
    node = virtual_node
    enroll_node(node, cli_env, signer, run_dir)
    ok(node.node("enroll"))
    v1, v2 = publish(version="1"), publish(version="2")
    assign(cli_env, node, v1["image_id"])
    older = make_bundle(cli_env, node.name, run_dir / f"older-{node.name}")  # generation 1
    ok(node.node("reconcile"))
    wait_marker(node, v1["marker"])

    # another node of the site, enrolled with its own TPM, assigned v2
    other = f"{node.name}-b"
    other_tpm = make_swtpm("other")
    ek = run_dir / f"{other}.ek.pem"
    ek.write_bytes(other_tpm.ek_cert_pem())
    seed = run_dir / f"{other}.seed.img"
    ok(
        run_edgepin(
            [
                *("enroll", other, "--ek-cert", str(ek), "--pcrs", "7"),
                *("--pcr-values", "zero", "--seed-out", str(seed)),
            ],
            cli_env,
        )
    )
    ok(run_edgepin(["assign", other, v2["image_id"]], cli_env))
    site = run_dir / f"site-{node.name}"
    theirs = make_bundle(cli_env, other, site)
    # this node's own bundle of v2, at generation 2
    assign(cli_env, node, v2["image_id"])
    good = make_bundle(cli_env, node.name, run_dir / f"good-{node.name}")
    images = node.root / "var/lib/edgepin/images"

    def refused(path: Path, code: int, why: str, keeps_v2: bool = False) -> None:
        r = node.node("import", str(path))
        assert r.returncode == code and why in r.stderr, f"{r.stdout}\n{r.stderr}"
        assert "Traceback" not in r.stderr
        st = node_status(node)
        assert (st["state"], st["image_id"]) == ("refused", v1["image_id"]), st
        assert guest_active(node)
        assert not [p.name for p in images.iterdir() if p.name.startswith(".")]
        assert (images / f"{v2['image_id']}.qcow2").exists() == keeps_v2

    def copy_of(folder: Path, name: str) -> Path:
        target = run_dir / f"{name}-{node.name}" / f"edgepin-{node.name}"
        shutil.copytree(folder, target)
        return target

    def edit_manifest(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
        doc = json.loads((folder / "manifest.json").read_text())
        change(doc)
        (folder / "manifest.json").write_text(json.dumps(doc))

    # a stick that carries only another node's bundle
    refused(site, 6, f"no bundle for node {node.name}")
    # another node's bundle, given as such
    refused(theirs, 8, f"made for node {other}, not for this node")
    # another node's bundle put in this node's folder, its manifest edited to say so
    disguised = copy_of(theirs, "disguised")
    edit_manifest(disguised, lambda d: d.update(node=node.name))
    refused(disguised, 8, "signed for another node")

    # this node's bundle, tampered: one byte of the image flipped
    flipped = copy_of(good, "flipped")
    with (flipped / "image.qcow2").open("r+b") as f:
        f.seek(4096)
        byte = f.read(1)
        f.seek(4096)
        f.write(bytes([byte[0] ^ 1]))
    refused(flipped, 8, "does not match os_hash_value")
    # truncated: the copy to the stick was cut short
    cut = copy_of(good, "cut")
    with (cut / "image.qcow2").open("r+b") as f:
        f.truncate(1024 * 1024)
    refused(cut, 7, "truncated")
    half = copy_of(good, "half")
    data = (half / "manifest.json").read_bytes()
    (half / "manifest.json").write_bytes(data[: len(data) // 2])
    refused(half, 7, "not JSON")
    # the signed assignment changed (a higher generation): its signature no longer verifies
    forged = copy_of(good, "forged")

    def higher(doc: dict[str, Any]) -> None:
        signed = doc["assignment"]["signed"]
        payload = json.loads(base64.b64decode(signed["payload"]))
        payload["generation"] = 99
        signed["payload"] = base64.b64encode(
            json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        ).decode()

    edit_manifest(forged, higher)
    refused(forged, 8, "signature")
    # the image's sha512 in the manifest changed to match other bytes: not the signed one
    swapped = copy_of(good, "swapped")
    edit_manifest(swapped, lambda d: d["image"]["properties"].update(os_hash_value="0" * 128))
    refused(swapped, 8, "not the one assigned")

    # the key wrapped for another TPM (the other node's): the image verifies and is kept,
    # the key does not unwrap, nothing runs from it
    foreign = copy_of(good, "foreign")
    their_key = json.loads((theirs / "manifest.json").read_text())["key"]
    edit_manifest(foreign, lambda d: d.update(key=their_key))
    refused(foreign, 9, "not wrapped for this node's TPM", keeps_v2=True)
    # a key for this TPM (anyone with its EK public key can make one) that opens nothing
    wrong = copy_of(good, "wrong")
    own_ek = node.tpm.ek_cert_pem()
    blob = tpm.wrap_for_ek(tpm.ek_public_pem_from_cert(own_ek), b"not the key", {7: bytes(32)})
    edit_manifest(wrong, lambda d: d["key"].update(wrapped=base64.b64encode(blob).decode()))
    refused(wrong, 8, "does not open image", keeps_v2=True)
    # a bundle made for other PCR values than the node measures: the node says its own
    values = run_dir / f"{node.name}.other-pcrs.json"
    values.write_text(json.dumps({"7": "ab" * 32}))
    elsewhere = make_bundle(
        cli_env,
        node.name,
        run_dir / f"elsewhere-{node.name}",
        *("--pcrs", "7", "--pcr-values", str(values)),
    )
    r = node.node("import", str(elsewhere))
    assert r.returncode == 9 and "bound to other PCRs or values" in r.stderr, r.stderr
    assert (
        '--pcr-values FILE`, FILE holding this node\'s PCR values: {"7": "' + "0" * 64 in r.stderr
    )
    st = node_status(node)
    assert (st["state"], st["image_id"]) == ("refused", v1["image_id"])
    assert guest_active(node)

    # the genuine bundle: switched to v2, the previous guest kept for rollback
    r = node.node("import", str(good.parent))
    ok(r)
    wait_marker(node, v2["marker"])
    st = node_status(node)
    assert (st["state"], st["image_id"], st["generation"]) == ("running", v2["image_id"], 2)
    assert st["previous_image_id"] == v1["image_id"]

    # an older bundle, genuine and signed for this node: refused as a rollback
    r = node.node("import", str(older))
    assert r.returncode == 10 and "rollback attack" in r.stderr, r.stdout + r.stderr
    st = node_status(node)
    assert (st["state"], st["image_id"]) == ("refused", v2["image_id"])
    assert guest_active(node)

    # a node that Keystone refuses (being revoked; the refusal clock in counters.json, as a
    # reconcile leaves it) takes no bundle, not even the one it runs
    counters = node.root / "var/lib/edgepin/counters.json"
    kept = json.loads(counters.read_text())
    counters.write_text(json.dumps({**kept, "refused_since": 1.0}))
    r = node.node("import", str(good.parent))
    assert r.returncode == 4 and "being revoked takes no bundle" in r.stderr, r.stderr
    assert guest_active(node)


def test_bundle_refuses_a_node_without_an_assignment_and_an_ek_it_was_not_enrolled_for(
    virtual_node: VirtualNode,
    make_swtpm: Callable[[str], Swtpm],
    cli_env: dict[str, str],
    signer: Signer,
    run_dir: Path,
    publish: Callable[..., dict[str, Any]],
    admin: Any,
) -> None:
    node = virtual_node
    enroll_node(node, cli_env, signer, run_dir)
    out = run_dir / f"nothing-{node.name}"
    r = run_edgepin(["bundle", node.name, "--out", str(out)], cli_env)
    assert r.returncode == 6 and "has no assignment" in r.stderr, r.stderr
    assert not out.exists() or list(out.iterdir()) == []
    # enroll recorded the node's EK and PCR policy: public values, no secret
    project = admin.identity.get(f"/projects/{project_of(node)}").json()["project"]
    record = json.loads(project["edgepin_tpm"])
    assert record["pcr_values"] == {"7": "0" * 64}
    assert "BEGIN PUBLIC KEY" in record["ek_public_pem"]

    v1 = publish(version="1")
    assign(cli_env, node, v1["image_id"])
    thief = make_swtpm("thief")
    ek = run_dir / f"{node.name}.thief.pem"
    ek.write_bytes(thief.ek_cert_pem())
    r = run_edgepin(["bundle", node.name, "--out", str(out), "--ek-cert", str(ek)], cli_env)
    assert r.returncode == 2 and "not the one the node was enrolled for" in r.stderr, r.stderr
    assert not out.exists() or list(out.iterdir()) == []
    # the node's own EK certificate, checked against its CA, and PCR values given again
    own = run_dir / f"{node.name}.ek.pem"
    ca = run_dir / f"{node.name}.ekca.pem"
    values = run_dir / f"{node.name}.pcrs.json"
    values.write_text(json.dumps({"7": "0" * 64}))
    folder = make_bundle(
        cli_env,
        node.name,
        out,
        "--ek-cert",
        str(own),
        "--ek-ca",
        str(ca),
        "--pcrs",
        "7",
        "--pcr-values",
        str(values),
    )
    assert json.loads((folder / "manifest.json").read_text())["image"]["id"] == v1["image_id"]
