"""Labels, node reports and the fleet view, against the real test bed with virtual nodes."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from keystoneauth1 import session as ksa_session
from keystoneauth1.identity import v3

from provisioner import tpm
from tests.testbed.controlplane import ControlPlane
from tests.testbed.node import VirtualNode, run_edgepin
from tests.testbed.operator import Signer, assign, enroll_node

pytestmark = pytest.mark.integration


def ok(r: Any) -> Any:
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def fleet_status(cli_env: dict[str, str], *args: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(
        ok(run_edgepin(["status", *args, "--json"], cli_env)).stdout
    )
    return rows


def node_session(node: VirtualNode, controlplane: ControlPlane) -> Any:
    """A session with the node's own credential, unsealed from its TPM (what a node, or
    whoever controls one, can do with it)."""
    cred = json.loads((node.root / "var/lib/edgepin/node-credential.json").read_text())
    bundle = json.loads((node.root / "var/lib/edgepin/seed/bundle.json").read_text())
    with tpm.Tpm.open(node.tpm.tcti) as t:
        secret = t.unseal(base64.b64decode(cred["sealed"]), [7]).decode()
    return ksa_session.Session(
        auth=v3.ApplicationCredential(
            auth_url=bundle["auth_url"],
            application_credential_id=cred["id"],
            application_credential_secret=secret,
        ),
        verify=str(controlplane.ca_path),
    )


def project_of(admin: Any, name: str) -> dict[str, Any]:
    r = admin.identity.get("/projects", params={"name": name})
    project: dict[str, Any] = r.json()["projects"][0]
    return project


def test_labels_are_project_tags(
    virtual_node: VirtualNode, cli_env: dict[str, str], signer: Signer, run_dir: Path, admin: Any
) -> None:
    node = virtual_node
    enroll_node(node, cli_env, signer, run_dir)
    r = ok(run_edgepin(["label", node.name, "site=paris-1", "hw=small", "--json"], cli_env))
    assert json.loads(r.stdout)["labels"] == {"hw": "small", "site": "paris-1"}
    tags = project_of(admin, node.name)["tags"]
    assert sorted(tags) == ["edgepin-label:hw=small", "edgepin-label:site=paris-1", "edgepin-node"]
    # a new value replaces the old one; KEY- removes; other tags stay
    ok(run_edgepin(["label", node.name, "site=lyon", "hw-"], cli_env))
    assert sorted(project_of(admin, node.name)["tags"]) == [
        "edgepin-label:site=lyon",
        "edgepin-node",
    ]
    assert ok(run_edgepin(["label", node.name], cli_env)).stdout == "site=lyon\n"
    # Keystone filters by them; edgepin status too
    found = admin.identity.get("/projects", params={"tags": "edgepin-label:site=lyon"}).json()
    assert [p["name"] for p in found["projects"]] == [node.name]
    assert [r["node"] for r in fleet_status(cli_env, "--label", "site=lyon")] == [node.name]
    assert fleet_status(cli_env, "--label", "site=paris-1") == []
    # a label that is no label is refused before anything changes
    r = run_edgepin(["label", node.name, "Site=Paris"], cli_env)
    assert r.returncode == 2 and "invalid label key" in r.stderr, r.stderr


def test_the_node_reports_its_facts_and_outcome_and_only_its_own(
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
    row = fleet_status(cli_env, node.name)[0]
    assert row["report"]["problem"] == "no report yet" and row["outcome"] is None

    ok(node.node("reconcile"))  # nothing assigned: waiting, reported
    row = fleet_status(cli_env, node.name)[0]
    assert row["outcome"] == "waiting" and row["reason"] == "no assignment yet", row
    facts = row["report"]["report"]["facts"]
    assert facts["cpus"] >= 2 and facts["guest_cpus"] == facts["cpus"] - 1
    assert facts["memory_mb"] > 256 and facts["disk_free_mb"] > 0
    assert facts["virt_type"] == "qemu" and facts["cpu_flags"], facts
    first_seen = row["seen_at"]
    assert first_seen

    # nothing changed: the next reconcile writes nothing (one Keystone request, no Glance)
    counters = node.root / "var/lib/edgepin/counters.json"
    sent = json.loads(counters.read_text())["report_sent_at"]
    ok(node.node("reconcile"))
    assert json.loads(counters.read_text())["report_sent_at"] == sent
    assert fleet_status(cli_env, node.name)[0]["seen_at"] == first_seen

    pub = publish(version="7")
    assign(cli_env, node, pub["image_id"])
    ok(node.node("reconcile"))
    row = fleet_status(cli_env, node.name)[0]
    assert row["outcome"] == "running", row
    assert (row["running_image_id"], row["running_generation"]) == (pub["image_id"], 1)
    assert row["running_image"] == row["image"] and row["image"].endswith(" 7")
    assert row["report"]["report"]["facts"]["local_images"] == [pub["image_id"]]

    # the node's credential: its own report record and nothing else
    mine = project_of(admin, node.name)["edgepin_report_image"]
    other = "second-" + node.name
    theirs_seed = run_dir / f"{other}.seed.img"
    ek = run_dir / f"{node.name}.ek.pem"
    r = run_edgepin(
        [
            "enroll",
            other,
            "--ek-cert",
            str(ek),
            "--pcrs",
            "7",
            "--pcr-values",
            "zero",
            "--seed-out",
            str(theirs_seed),
        ],
        cli_env,
    )
    ok(r)
    theirs = project_of(admin, other)["edgepin_report_image"]
    sess = node_session(node, controlplane)
    image = {"service_type": "image", "interface": "public"}
    patch = {"Content-Type": "application/openstack-images-v2.1-json-patch"}
    forged = [{"op": "add", "path": "/edgepin_report", "value": "{}"}]
    r = sess.patch(
        f"/v2/images/{theirs}", endpoint_filter=image, headers=patch, json=forged, raise_exc=False
    )
    assert r.status_code in (401, 403, 404), r.status_code
    # nor any image property of a guest image shared with it
    r = sess.patch(
        f"/v2/images/{pub['image_id']}",
        endpoint_filter=image,
        headers=patch,
        json=forged,
        raise_exc=False,
    )
    assert r.status_code in (401, 403, 404), r.status_code
    assert "edgepin_report" not in admin.image.get(f"/images/{theirs}").json()
    # its own, yes (what the reconcile does)
    r = sess.patch(
        f"/v2/images/{mine}", endpoint_filter=image, headers=patch, json=forged, raise_exc=False
    )
    assert r.status_code == 200, r.status_code
    # and the operator reads a forged report as unreadable, never as facts
    row = fleet_status(cli_env, node.name)[0]
    assert row["outcome"] is None and "unreadable node report" in row["reason"], row
    # Keystone's credential API, where a report could have gone, refuses node credentials
    # outright: why the report is a Glance record
    user_id = json.loads((node.root / "var/lib/edgepin/seed/bundle.json").read_text())["user_id"]
    r = sess.post(
        f"{controlplane.auth_url}/credentials",
        json={"credential": {"type": "edgepin-report", "user_id": user_id, "blob": "{}"}},
        raise_exc=False,
    )
    assert r.status_code in (401, 403), r.status_code
