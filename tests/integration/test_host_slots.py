"""A host update into the other root slot on an enrolled test bed node, through the node's
own commands and reconcile against the test bed's Keystone and Glance: `edgepin node host
install` arms the slot, the reconcile on it commits it and reports the slot, and a slot the
node came back from is reported and shown by `edgepin status`. The slots are files under
the node's root and GRUB's part is played as grub.cfg does it (tests.hostupdates); the
image tier boots the real GRUB (tests/image/test_node_image.py)."""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt

from provisioner import tpm
from tests.hostupdates import esp_slot, grub_boots, lay_out_slots, write
from tests.integration.conftest import make_signer
from tests.integration.test_fleet import fleet_status, ok
from tests.testbed.node import EDGEPIN, VirtualNode, node_status, run_edgepin, wait_marker
from tests.testbed.operator import (
    Signer,
    approve_pcrs,
    assign,
    enroll_node,
    pin_release_key,
)

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
    restarted = node.root / "restarted"
    conf.write_text(
        conf.read_text()
        + f"EDGEPIN_HOST_VERSION={VERSION - 1}\nEDGEPIN_RESTART_COMMAND=touch {restarted}\n"
    )
    ok(node.node("enroll"))
    lay_out_slots(node.root, "a")
    update, _, d = write(tmp_path)
    # what edgepin-host-leave.service runs when the vault does not open: not on a trial
    assert "nothing to do" in ok(node.node("host", "leave")).stdout
    assert not restarted.exists()

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
    # on the trial: the machine restarts at once, into slot a, which boot.env names already
    r = ok(node.node("host", "leave"))
    assert "root slot b is on trial and the node's state did not open: restarting into root " in (
        r.stderr
    ), r.stderr
    assert restarted.exists() and esp_slot(node.root, "boot.env") == "a"
    # what edgepin-host-watch.service runs at every boot: on the trial, with its time up, it
    # restarts into slot a as well
    restarted.unlink()
    settings = conf.read_text()
    conf.write_text(settings + "EDGEPIN_HOST_TRIAL_TIMEOUT=1\n")
    r = ok(node.node("host", "watch"))
    assert "root slot b did not get healthy within 1 s: restarting into root slot a" in r.stderr
    assert restarted.exists()
    # with time left, the reconcile keeps the slot (healthy: enrolled, nothing assigned) and
    # the watch ends without a restart, at its next look at the ESP
    restarted.unlink()
    conf.write_text(settings + "EDGEPIN_HOST_TRIAL_TIMEOUT=300\n")
    watch = subprocess.Popen(
        [EDGEPIN, "node", "--root", str(node.root), "host", "watch"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watch.stderr is not None
        first = watch.stderr.readline()
        assert "root slot b is on trial: unless the node is healthy on it within 300 s" in first
        r = ok(node.node("reconcile"))
        assert "host: root slot b committed: host update edgepin" in r.stderr, r.stderr
        rest = watch.stderr.read()  # to its end: the watch's next look at the ESP
        assert watch.wait(timeout=30) == 0, rest
    finally:
        watch.kill()  # a failed check leaves no watch behind; nothing once it ended
        watch.wait()
    assert rest.strip().endswith("host: root slot b is kept: the trial watch ends"), rest
    assert "restarting" not in rest
    assert not restarted.exists()
    # on a boot that is not a trial, at once
    assert "is not on trial: nothing to watch" in ok(node.node("host", "watch")).stderr
    assert not restarted.exists()
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


def glance_newest(cli_env: dict[str, str]) -> int:
    r = ok(run_edgepin(["host", "list", "--json"], cli_env))
    return max([1_700_000_000, *(int(rel["host_version"]) for rel in json.loads(r.stdout))])


def host_publish(cli_env: dict[str, str], tmp: Path, version: int, *extra: str) -> dict[str, Any]:
    tmp.mkdir(parents=True, exist_ok=True)
    update, _, _ = write(tmp, host_version=version)
    r = ok(run_edgepin(["host", "publish", str(update), "--json", *extra], cli_env))
    release: dict[str, Any] = json.loads(r.stdout)
    return release


def stop_guest(node: VirtualNode) -> None:
    conn = libvirt.open(node.libvirtd.uri)
    try:
        conn.lookupByName("edgepin-guest").destroy()
    finally:
        conn.close()


def test_an_assigned_host_release_is_fetched_written_restarted_into_and_kept_with_its_secrets(
    virtual_node: VirtualNode,
    cli_env: dict[str, str],
    signer: Signer,
    run_dir: Path,
    publish: Callable[..., dict[str, Any]],
    tmp_path: Path,
) -> None:
    """The whole way of a host release on a node that pins a release key: published with
    the release key's approval of the PCR values it measures, assigned, fetched and checked
    by the reconcile while the guest runs, written into slot b, restarted into (the restart
    command runs), and on its first boot (another PCR 7, as a new boot chain measures) the
    node opens its credential and image key through the approval that came with the
    release, starts its guest again and keeps slot b. Nothing of the release stays in the
    vault."""
    node = virtual_node
    key, _pub = pin_release_key(node.root, tmp_path)
    enroll_node(node, cli_env, signer, run_dir)
    version = glance_newest(cli_env) + 1 + secrets.randbelow(10**6)
    restarted = node.root / "restarted"
    conf = node.root / "etc/edgepin/edgepin.conf"
    conf.write_text(
        conf.read_text()
        + f"EDGEPIN_HOST_VERSION={version - 1}\nEDGEPIN_RESTART_COMMAND=touch {restarted}\n"
    )
    ok(node.node("enroll"))
    lay_out_slots(node.root, "a")
    guest = publish(version="1")
    assign(cli_env, node, guest["image_id"])
    ok(node.node("reconcile"))
    wait_marker(node, guest["marker"])

    # the factory measures the release's boot chain (here: what PCR 7 becomes) and approves it
    node.tpm.power_cycle()
    with tpm.Tpm.open(node.tpm.tcti) as t:
        t.extend_pcr(7, b"host release's boot loader")
        measured = t.read_pcrs([7])
    node.tpm.power_cycle()  # back to the boot chain the node runs
    approval = tmp_path / "approval.json"
    approve_pcrs(key, measured, approval)
    release = host_publish(cli_env, tmp_path / "rel", version, "--approval", str(approval))
    assert release["approvals"] == 1, release
    # approvals added after publishing, each kept once; one of PCRs this node does not seal
    # to, which it skips
    other = tmp_path / "approval-other.json"
    approve_pcrs(key, {4: b"\x04" * 32, 7: b"\x07" * 32}, other)
    args = ["--approval", str(approval), "--approval", str(other), "--json"]
    r = ok(run_edgepin(["host", "approve", release["image_id"], *args], cli_env))
    assert json.loads(r.stdout)["approvals"] == 2, r.stdout
    # the guest was stopped by the power cycle: the next reconcile starts it again
    ok(node.node("reconcile"))
    wait_marker(node, guest["marker"])

    r = ok(run_edgepin(["host", "assign", str(version), node.name, "--restart", "now"], cli_env))
    assert f"{node.name}: generation 1 (before: none)" in r.stdout, r.stdout
    row = fleet_status(cli_env, node.name)[0]
    assert row["host_assigned"] == version and row["host_next"] is None, row
    r = ok(node.node("reconcile"))
    assert f"host: host release {release['image_id']} verified" in r.stderr, r.stderr
    said = "written into root slot b: the next boot tries it once (restart: now)"
    assert said in r.stderr, r.stderr
    assert restarted.exists(), "the restart command did not run"
    assert node_status(node)["state"] == "running"  # the guest ran on through all of it
    assert esp_slot(node.root, "boot.env") == "b"
    assert not list((node.root / "var/lib/edgepin/host-release").iterdir())
    saved = list((node.root / "var/lib/edgepin-host/approvals").glob("release-*.json"))
    assert [json.loads(p.read_bytes()) for p in saved] == [json.loads(approval.read_bytes())]
    row = fleet_status(cli_env, node.name)[0]
    assert row["host_next"] == version and row["host_refused"] is None, row
    # the host column (a table cell may fold its text)
    assert "NEXT" in ok(run_edgepin(["status", node.name], cli_env)).stdout

    # the restart: slot b's boot chain measures what the factory approved
    stop_guest(node)
    node.tpm.power_cycle()
    with tpm.Tpm.open(node.tpm.tcti) as t:
        t.extend_pcr(7, b"host release's boot loader")
    assert grub_boots(node.root) == "b"
    conf.write_text(conf.read_text().replace(f"={version - 1}\n", f"={version}\n"))
    restarted.unlink()
    r = ok(node.node("reconcile"))
    assert "root slot b committed" in r.stderr, r.stderr
    wait_marker(node, guest["marker"])
    assert node_status(node)["state"] == "running"
    assert not restarted.exists(), "restarted again"
    row = fleet_status(cli_env, node.name)[0]
    assert (row["host_version"], row["host_slot"], row["host_next"]) == (version, "b", None), row


def test_a_host_release_that_is_not_the_nodes_to_take_is_refused_and_nothing_changes(
    virtual_node: VirtualNode,
    cli_env: dict[str, str],
    signer: Signer,
    operator_env: dict[str, str],
    run_dir: Path,
    publish: Callable[..., dict[str, Any]],
    tmp_path: Path,
) -> None:
    """A guest image is no host release, a release signed by a certificate the node does not
    pin is refused once (not fetched again at every run) and reported, a release older than
    the host is left, and none of it arms a slot or restarts the node."""
    node = virtual_node
    enroll_node(node, cli_env, signer, run_dir)
    restarted = node.root / "restarted"
    conf = node.root / "etc/edgepin/edgepin.conf"
    base = conf.read_text() + f"EDGEPIN_RESTART_COMMAND=touch {restarted}\n"
    conf.write_text(base + "EDGEPIN_HOST_VERSION=1700000000\n")
    ok(node.node("enroll"))
    lay_out_slots(node.root, "a")
    slot_b = (node.root / "dev/disk/by-partlabel/root-b").read_bytes()

    guest = publish(version="1")
    r = run_edgepin(["host", "assign", guest["image_id"], node.name], cli_env)
    assert r.returncode != 0 and "is not a host release" in r.stderr, r.stderr

    # signed with a certificate the node does not pin
    stranger = make_signer(operator_env, run_dir)
    env = {
        **cli_env,
        "EDGEPIN_SIGNING_CERT_ID": stranger.cert_id,
        "EDGEPIN_SIGNING_KEY_ID": stranger.key_id,
    }
    version = glance_newest(cli_env) + 1 + secrets.randbelow(10**6)
    release = host_publish(env, tmp_path / "stranger", version)
    ok(run_edgepin(["host", "assign", release["image_id"], node.name, "--restart", "now"], cli_env))
    r = ok(node.node("reconcile"))
    assert "is signed by a certificate that is not pinned" in r.stderr, r.stderr
    assert "verified" not in r.stderr, r.stderr
    row = fleet_status(cli_env, node.name)[0]
    assert "not pinned" in row["host_refused"] and row["host_next"] is None, row
    assert "REFUSED" in ok(run_edgepin(["status", node.name], cli_env)).stdout
    r = ok(node.node("reconcile"))  # remembered: not asked again
    assert "not pinned" not in r.stderr and "host release" not in r.stderr, r.stderr
    assert fleet_status(cli_env, node.name)[0]["host_refused"], "the refusal is still reported"

    # a release the host is newer than: left, without a download
    conf.write_text(base + f"EDGEPIN_HOST_VERSION={version + 1}\n")
    r = ok(node.node("reconcile"))
    assert f"version {version}, older than this host" in r.stderr, r.stderr
    assert not (node.root / "var/lib/edgepin/host-release").exists() or not list(
        (node.root / "var/lib/edgepin/host-release").iterdir()
    )
    assert (esp_slot(node.root, "boot.env"), esp_slot(node.root, "after.env")) == ("a", "a")
    assert not restarted.exists()
    assert (node.root / "dev/disk/by-partlabel/root-b").read_bytes() == slot_b  # untouched
