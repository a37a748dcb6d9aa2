"""Nodes that never see the control plane: ``edgepin enroll --offline`` at the factory puts
the node's own restricted credential, wrapped for its TPM, in the seed; the node enrolls and
runs its guest from a bundle with the control plane stopped, refuses a seed made for another
TPM or for other PCR values, and joins the online fleet (reconcile, member status, report)
once it reaches the control plane."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from provisioner import seed, tpm
from tests.testbed.controlplane import ControlPlane
from tests.testbed.node import VirtualNode, node_status, ok, run_edgepin, wait_marker
from tests.testbed.operator import Signer, assign
from tests.testbed.swtpm import Swtpm

pytestmark = pytest.mark.integration

SERVICES = ("keystone", "glance", "barbican")


def enroll_offline(
    name: str, ek_of: Swtpm, cli_env: dict[str, str], run_dir: Path, values: str = "zero"
) -> tuple[dict[str, Any], Path, Any]:
    """`edgepin enroll --offline` for ``name`` with ``ek_of``'s EK: its JSON, the seed, and
    the finished process (to look for the secret in what it printed)."""
    cert = run_dir / f"{name}.ek.pem"
    cert.write_bytes(ek_of.ek_cert_pem())
    ca = run_dir / f"{name}.ekca.pem"
    ca.write_bytes(ek_of.ca_cert_pem())
    out = run_dir / f"{name}.offline-seed.img"
    r = ok(
        run_edgepin(
            [
                *("enroll", name, "--offline", "--ek-cert", str(cert), "--ek-ca", str(ca)),
                *("--pcrs", "7", "--pcr-values", values, "--seed-out", str(out), "--json"),
            ],
            cli_env,
        )
    )
    return json.loads(r.stdout), out, r


@contextmanager
def no_control_plane(controlplane: ControlPlane) -> Iterator[None]:
    for service in SERVICES:
        controlplane.stop_service(service)
    try:
        yield
    finally:
        for service in SERVICES:
            controlplane.start_service(service)


def credentials_of(admin: Any, user_id: str) -> list[dict[str, Any]]:
    r = admin.identity.get(f"/users/{user_id}/application_credentials")
    creds: list[dict[str, Any]] = r.json()["application_credentials"]
    return creds


def files_holding(root: Path, needle: bytes) -> list[str]:
    return [
        str(p)
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink() and needle in p.read_bytes()
    ]


def test_an_offline_enrolled_node_runs_from_a_bundle_and_joins_the_fleet_later(
    virtual_node: VirtualNode,
    cli_env: dict[str, str],
    signer: Signer,
    run_dir: Path,
    publish: Callable[..., dict[str, Any]],
    admin: Any,
    controlplane: ControlPlane,
) -> None:
    node = virtual_node
    result, seed_image, r = enroll_offline(node.name, node.tpm, cli_env, run_dir)
    assert result["offline"] is True and result["expires_at"] is None
    assert "bootstrap_credential_id" not in result

    # the seed wraps the node's own credential, and only that
    bundle = seed.read_seed_bundle(seed_image)
    kind, cred = seed.credential(bundle)
    assert kind is seed.Credential.NODE and "bootstrap" not in bundle
    assert cred["application_credential_id"] == result["node_credential_id"]
    assert json.loads(base64.b64decode(cred["wrapped"]))["kind"] == "duplicate"
    # Keystone holds exactly that one credential for the node's user: restricted, access
    # rules, no expiry
    creds = credentials_of(admin, result["user_id"])
    assert [(c["id"], c["name"]) for c in creds] == [(result["node_credential_id"], "edgepin-node")]
    one = admin.identity.get(
        f"/users/{result['user_id']}/application_credentials/{result['node_credential_id']}"
    ).json()["application_credential"]
    assert not one.get("unrestricted") and one["expires_at"] is None, one
    assert {(r["service"], r["method"], r["path"]) for r in one["access_rules"]} >= {
        ("identity", "GET", f"/v3/projects/{result['project_id']}")
    }, one
    # its secret (unwrapped here as only this TPM can) is in the clear nowhere the factory
    # wrote or printed
    with tpm.Tpm.open(node.tpm.tcti) as t:
        secret = t.unseal(base64.b64decode(cred["wrapped"]), [7], ("duplicate",))
    assert secret not in (r.stdout + r.stderr).encode()
    factory = [p for p in run_dir.iterdir() if p.name.startswith(node.name) and p.is_file()]
    assert seed_image in factory
    assert [p for p in factory if secret in p.read_bytes()] == []

    v1 = publish(version="1")
    assign(cli_env, node, v1["image_id"])
    stick = run_dir / f"stick-{node.name}"
    ok(run_edgepin(["bundle", node.name, "--out", str(stick), "--json"], cli_env))

    node.configure(pcrs="7")
    node.pin_certificate(signer.pem)
    node.install_seed(seed_image)
    var = node.root / "var/lib/edgepin"
    with no_control_plane(controlplane):
        # enrollment asks Keystone nothing
        out = ok(node.node("enroll"))
        assert out.stdout.startswith(
            f"enrolled: node {node.name}, credential {result['node_credential_id']}"
        ), out.stdout
        enrollment = json.loads((var / "enrollment.json").read_text())
        assert enrollment["phase"] == "done"
        assert enrollment["credential_id"] == result["node_credential_id"]
        assert (enrollment["project_id"], enrollment["user_id"]) == (
            result["project_id"],
            result["user_id"],
        )
        # the seed's copy of the wrapped credential is gone: the sealed one is what it keeps
        assert not (var / "seed" / "bundle.json").exists()
        assert (var / "node-credential.json").exists()
        ok(node.node("enroll"))  # again: nothing to do
        # the guest from the bundle alone
        ok(node.node("import", str(stick)))
        wait_marker(node, v1["marker"])
        st = node_status(node)
        assert (st["state"], st["image_id"], st["generation"]) == ("running", v1["image_id"], 1)
        ok(node.node("reconcile"))
        assert node_status(node)["state"] == "offline"
    assert files_holding(node.root / "var", secret) == []
    assert files_holding(node.root / "run", secret) == []

    # the control plane is reachable: the node reconciles and reports with that credential
    r = admin.image.get(f"/images/{v1['image_id']}/members/{result['project_id']}")
    assert r.json()["status"] == "pending"
    ok(node.node("reconcile"))
    st = node_status(node)
    assert (st["state"], st["image_id"], st["bytes_fetched_total"]) == (
        "running",
        v1["image_id"],
        0,
    )
    r = admin.image.get(f"/images/{v1['image_id']}/members/{result['project_id']}")
    assert r.json()["status"] == "accepted"
    row = json.loads(ok(run_edgepin(["status", node.name, "--json"], cli_env)).stdout)[0]
    assert row["outcome"] == "running", row
    assert row["report"]["report"]["facts"]["local_images"] == [v1["image_id"]], row


def test_an_offline_seed_for_another_tpm_or_other_pcr_values_is_refused(
    virtual_node: VirtualNode,
    make_swtpm: Callable[[str], Swtpm],
    cli_env: dict[str, str],
    signer: Signer,
    run_dir: Path,
    controlplane: ControlPlane,
) -> None:
    node = virtual_node
    var = node.root / "var/lib/edgepin"
    node.configure(pcrs="7")
    node.pin_certificate(signer.pem)

    # a seed made for another machine's TPM
    other = make_swtpm("other")
    _, theirs, _ = enroll_offline(f"{node.name}-b", other, cli_env, run_dir)
    node.install_seed(theirs)
    with no_control_plane(controlplane):
        r = node.node("enroll")
    assert r.returncode == 9 and "another TPM" in r.stderr, r.stderr
    assert not (var / "node-credential.json").exists()
    assert not (var / "enrollment.json").exists()

    # a seed for this TPM, bound to other PCR values: the node says the ones it measures
    values = run_dir / f"{node.name}.other-pcrs.json"
    values.write_text(json.dumps({"7": "ab" * 32}))
    _, elsewhere, _ = enroll_offline(node.name, node.tpm, cli_env, run_dir, str(values))
    node.install_seed(elsewhere)
    with no_control_plane(controlplane):
        r = node.node("enroll")
    assert r.returncode == 9, r.stderr
    assert "bound to other PCR values" in r.stderr, r.stderr
    assert (
        '--pcr-values FILE`, FILE holding this node\'s PCR values: {"7": "' + "0" * 64 in r.stderr
    )
    assert not (var / "node-credential.json").exists()

    # the factory enrolls it again with what the node said: the earlier credential goes
    result, right, _ = enroll_offline(node.name, node.tpm, cli_env, run_dir)
    assert len(result["rotated"]) == 1
    node.install_seed(right)
    with no_control_plane(controlplane):
        ok(node.node("enroll"))
    assert (
        json.loads((var / "enrollment.json").read_text())["credential_id"]
        == (result["node_credential_id"])
    )
