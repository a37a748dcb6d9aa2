"""A host update into the other root slot on an enrolled test bed node, through the node's
own commands and reconcile against the test bed's Keystone and Glance: `edgepin node host
install` arms the slot, the reconcile on it commits it and reports the slot, and a slot the
node came back from is reported and shown by `edgepin status`. The slots are files under
the node's root and GRUB's part is played as grub.cfg does it (tests.hostupdates); the
image tier boots the real GRUB (tests/image/test_node_image.py)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.hostupdates import esp_slot, grub_boots, lay_out_slots, write
from tests.integration.test_fleet import fleet_status, ok
from tests.testbed.node import VirtualNode, run_edgepin
from tests.testbed.operator import Signer, enroll_node

VERSION = 1764940000  # tests.hostupdates.write's host version


def test_an_update_is_installed_tried_committed_and_one_it_came_back_from_is_reported(
    virtual_node: VirtualNode,
    cli_env: dict[str, str],
    signer: Signer,
    run_dir: Path,
    tmp_path: Path,
) -> None:
    node = virtual_node
    enroll_node(node, cli_env, signer, run_dir)
    conf = node.root / "etc/edgepin/edgepin.conf"
    conf.write_text(conf.read_text() + f"EDGEPIN_HOST_VERSION={VERSION - 1}\n")
    ok(node.node("enroll"))
    lay_out_slots(node.root, "a")
    update, _, d = write(tmp_path)

    status = json.loads(ok(node.node("host", "status", "--json")).stdout)
    assert (status["booted"], status["state"], status["update"]) == ("a", "running", None)
    r = ok(node.node("host", "install", str(update)))
    assert "written into root slot b: the next boot tries it once" in r.stdout, r.stdout
    assert "writing root slot b" in r.stderr
    assert (node.root / "dev/disk/by-partlabel/root-b").read_bytes().startswith(d["root"])
    status = json.loads(ok(node.node("host", "status", "--json")).stdout)
    assert (status["next"], status["state"]) == ("b", "armed"), status
    assert status["update"]["slot"] == "b" and status["update"]["host_version"] == VERSION

    # the next start is slot b's one try; healthy there (enrolled, nothing assigned): kept
    assert grub_boots(node.root) == "b"
    assert json.loads(ok(node.node("host", "status", "--json")).stdout)["state"] == "on trial"
    r = ok(node.node("reconcile"))
    assert "host: root slot b committed: host update edgepin-host version" in r.stderr, r.stderr
    assert (esp_slot(node.root, "boot.env"), esp_slot(node.root, "after.env")) == ("b", "b")
    row = fleet_status(cli_env, node.name)[0]
    assert row["outcome"] == "waiting" and row["host_slot"] == "b", row
    assert row["host_fallback"] is None, row
    assert grub_boots(node.root) == "b"

    # the same release into slot a (newer than this host's configured version), tried, and
    # the machine stops before the node gets healthy: the next start is slot b's again
    ok(node.node("host", "install", str(update)))
    assert grub_boots(node.root) == "a"
    assert grub_boots(node.root) == "b"
    r = ok(node.node("reconcile"))
    said = "did not come up healthy: back on root slot b"
    assert said in r.stderr, r.stderr
    row = fleet_status(cli_env, node.name)[0]
    assert (row["host_slot"], row["host_fallback"]) == ("b", VERSION), row
    table = ok(run_edgepin(["status", node.name], cli_env)).stdout
    assert "FELL" in table, table  # the host column (a table cell may fold its text)
    status = ok(node.node("host", "status")).stdout
    assert f"edgepin-host version {VERSION}: came back from it" in status, status
    # an update on a boot that is itself on trial is refused, nothing changed
    ok(node.node("host", "install", str(update)))
    grub_boots(node.root)
    r = node.node("host", "install", str(update))
    assert r.returncode == 10 and "trial" in r.stderr, r.stderr
    assert esp_slot(node.root, "boot.env") == "b"
