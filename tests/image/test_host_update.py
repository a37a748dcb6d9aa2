"""A host update from Glance on the real artefact: the built host image booted in QEMU with
Secure Boot and its swtpm, against the real Keystone, Glance and Barbican.

The release is the build's own, one host version and one host epoch later
(tests/testbed/hostrelease.py: the same packages, its root packed again with the new
EDGEPIN_HOST_VERSION and EDGEPIN_HOST_EPOCH=1 and sealed with dm-verity as the build seals
it), published with `edgepin host publish` and assigned with `edgepin host assign --restart
now`. One node, in order:

1. first boot: it enrolls and runs its guest (a bare boot sector that prints its marker),
   then fetches and checks the release while the guest runs, writes it into root slot b and
   restarts. Slot b boots (its kernel, its verified root), but the approval that came with
   the release is of other PCR values than its boot chain measures, so the TPM does not
   give the vault's key: the node says the values, restarts into slot a at once, opens its
   keys there, starts its guest again and reports that it came back (`host_fallback`);
2. the factory approves the values slot b measured (`edgepin release approve`, `edgepin
   host approve`) and the release is assigned again: the node fetches it again, restarts
   into slot b, opens its vault, credential and image key through the approval, starts its
   guest and keeps slot b; the TPM's host floor rises to slot b's epoch (1); `edgepin
   status` shows the new host version on slot b;
3. a release older than the node's host, and a newer one signed by a certificate the node
   does not pin, are refused and reported; the node stays as it is;
4. slot a armed again on the disk, with a root hash its root does not have: its initramfs
   sees a try (the ESP names slot b next), the root's first block panics the kernel, and
   the machine restarts into slot b after 10 s instead of stopping for good;
5. slot a named on the disk as the slot to keep booting, with its own root hash back, as
   someone holding the disk would do to run the release before the update: it boots, its
   root verifies, its measured state is the one the node sealed everything in, but its
   epoch (0) is below the TPM's floor: the vault does not open and no guest starts.

In test 2 `edgepin-host-watch.service` watches slot b's try until it is kept; the reports
name the hardware watchdog systemd keeps armed (the ICH9's TCO, `iTCO_wdt`).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from provisioner import hostupdate
from tests.image.test_node_image import (
    BOOT_TIMEOUT,
    Node,
    assign,
    env_block,
    model_vm,
    new_machine,
    pinned_signer,  # noqa: F401  (a fixture)
    publish_signed,
)
from tests.testbed import disk
from tests.testbed.hostcheck import CheckedBoot, factory_pcrs
from tests.testbed.hostimage import IMAGE_PCRS, ImageSigner, qemu_node_enroll_args
from tests.testbed.hostrelease import newer_release
from tests.testbed.node import run_edgepin
from tests.testbed.operator import Signer, approve_pcrs
from tests.testbed.swtpm import SwtpmFactory

pytestmark = pytest.mark.image
INCREMENTAL = True  # one node lives the scenarios in order (see conftest)


@dataclass
class Releases:
    """The build's own host release, the one after it, and one after that signed by a
    certificate the node does not pin (Glance holds host versions in that order)."""

    built: dict[str, Any]
    newer: dict[str, Any]
    unpinned: dict[str, Any]


def publish_release(env: dict[str, str], update: Path, *extra: str) -> dict[str, Any]:
    r = run_edgepin(["host", "publish", str(update), "--json", *extra], env)
    assert r.returncode == 0, r.stderr
    release: dict[str, Any] = json.loads(r.stdout)
    return release


@pytest.fixture(scope="module")
def releases(
    host_image: Path,
    cli_env: dict[str, str],
    pinned_signer: Signer,  # noqa: F811
    image_signer: ImageSigner,
    run_dir: Path,
) -> Releases:
    update = host_image.with_name("edgepin-host.update.tar")
    version = hostupdate.read(update).host_version
    work = run_dir / "host-releases"
    pinned = {
        **cli_env,
        "EDGEPIN_SIGNING_CERT_ID": pinned_signer.cert_id,
        "EDGEPIN_SIGNING_KEY_ID": pinned_signer.key_id,
    }
    built = publish_release(pinned, update)
    newer_file = newer_release(update, host_image, version + 1, work / "newer", epoch=1)
    # a node with a release key takes no release without an approval of its key; this one
    # approves values that its boot chain does not measure (as one measured on other
    # firmware, or for the other slot, would)
    wrong = work / "wrong.approval.json"
    approve_pcrs(
        image_signer.release_key,
        {int(p): bytes([int(p)]) * 32 for p in IMAGE_PCRS.split(",")},
        wrong,
    )
    newer = publish_release(pinned, newer_file, "--approval", str(wrong))
    newer_file.unlink()
    # the session's signer is not the one the test image pins
    unpinned_file = newer_release(update, host_image, version + 2, work / "unpinned")
    unpinned = publish_release(cli_env, unpinned_file)
    unpinned_file.unlink()
    return Releases(built, newer, unpinned)


@pytest.fixture(scope="module")
def node(
    host_image: Path,
    vm_tpms: SwtpmFactory,
    run_dir: Path,
    results_dir: Path,
    cli_env: dict[str, str],
    checked_boot: Callable[[str], CheckedBoot],
) -> Iterator[Node]:
    name, tpm, work = new_machine(vm_tpms, run_dir)
    seed = work / "seed.img"
    measured = work / "measured-pcrs.json"
    said = factory_pcrs(checked_boot("uefi"))  # as test_node_image's node is enrolled
    assert said, "the reference boot printed no PCR values for the factory"
    measured.write_text(said)
    r = run_edgepin([*qemu_node_enroll_args(name, work, measured, seed), "--json"], cli_env)
    assert r.returncode == 0, r.stderr
    enrolled = json.loads(r.stdout)
    results = results_dir / "host-update"
    results.mkdir(parents=True, exist_ok=True)
    # a restart inside the machine restarts it (firmware, TPM reset), as on hardware
    vm = model_vm(name, host_image, work, tpm, seed, reboot=True)
    yield Node(name, vm, enrolled["project_id"], results, {}, user_id=enrolled["user_id"])
    vm.stop()


class Console:
    """The node's serial console read in order: each wait looks after the last match, so
    that a line of an earlier boot of the same machine never answers for a later one."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.at = 0

    def wait(self, pattern: str, timeout: float = BOOT_TIMEOUT) -> re.Match[str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        vm = self.node.vm
        try:
            while True:
                m = rx.search(vm.console(), self.at)
                if m:
                    self.at = m.end()
                    return m
                assert vm.proc is not None and vm.proc.poll() is None, (
                    f"QEMU ended before /{pattern}/:\n{vm.tail()}"
                )
                assert time.monotonic() < deadline, (
                    f"no /{pattern}/ within {timeout:.0f} s:\n{vm.tail()}"
                )
                time.sleep(0.5)
        finally:
            self.node.save()

    def skip_to_end(self) -> None:
        self.at = len(self.node.vm.console())


def status_row(cli_env: dict[str, str], name: str) -> dict[str, Any]:
    r = run_edgepin(["status", name, "--json"], cli_env)
    assert r.returncode == 0, r.stderr
    rows: list[dict[str, Any]] = json.loads(r.stdout)
    return rows[0]


def wait_row(
    cli_env: dict[str, str], name: str, done: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """The node's status row once its report says ``done`` (reports are written by the
    reconcile, a few seconds after what they report)."""
    deadline = time.monotonic() + 180
    while True:
        row = status_row(cli_env, name)
        if done(row) or time.monotonic() > deadline:
            return row
        time.sleep(5)


def host_assign(
    cli_env: dict[str, str], signer: Signer, release: dict[str, Any], name: str
) -> None:
    ids = ["--assignment-cert-id", signer.cert_id, "--assignment-key-id", signer.key_id]
    args = ["host", "assign", release["image_id"], name, "--restart", "now", *ids]
    r = run_edgepin(args, cli_env)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def console(node: Node) -> Console:
    return Console(node)


@pytest.fixture(scope="module")
def guest(
    cli_env: dict[str, str],
    tiny_guest: Callable[..., Path],
    pinned_signer: Signer,  # noqa: F811
) -> dict[str, Any]:
    return publish_signed(cli_env, tiny_guest, pinned_signer, "1", kind="bare")


@pytest.fixture(scope="module")
def slot_a_cfg() -> dict[str, str]:
    """Slot a's verity-a.cfg as the node left it, before test 4 changed its root hash."""
    return {}


@pytest.fixture(scope="module")
def said_values() -> dict[str, Any]:
    """The PCR values root slot b measured, as the node said them on its console."""
    return {}


def test_1_a_release_whose_boot_chain_is_not_approved_is_tried_once_and_left(
    node: Node,
    console: Console,
    guest: dict[str, Any],
    releases: Releases,
    cli_env: dict[str, str],
    pinned_signer: Signer,  # noqa: F811
    said_values: dict[str, Any],
) -> None:
    newer = releases.newer
    assign(cli_env, node.name, guest["image_id"], pinned_signer)
    host_assign(cli_env, pinned_signer, newer, node.name)
    node.boot("host-update-first-boot")
    console.wait(rf"switched to image {guest['image_id']}.*reported healthy")
    console.wait(rf"host: host release {newer['image_id']} verified")
    console.wait(r"written into root slot b: the next boot tries it once \(restart: now\)")
    # the guest ran on while the release was fetched, checked and written; at the restart
    # it had 30 s to shut down (the bare guest never does), not libvirt-guests' 300
    console.wait(r"Loading root slot b", 600)
    waits = re.findall(r"Waiting for guest \S+ to shut down, (\d+) seconds left", node.vm.console())
    assert max(map(int, waits), default=0) <= 30, waits
    console.wait(r"edgepin: verity: root \S+ opened as \S+ \(slot b\)")
    said = console.wait(r"edgepin release approve.*FILE holding: (\{[^}]*\})")
    said_values.update(json.loads(said.group(1)))
    assert sorted(int(p) for p in said_values) == [int(p) for p in IMAGE_PCRS.split(",")]
    console.wait(
        r"root slot b is on trial and the node's state did not open: restarting into root "
        r"slot a",
        300,
    )
    console.wait(r"Loading root slot a", 600)
    console.wait(r"vault open: key")
    console.wait(rf"guest {guest['image_id']} started from the local copy")
    console.wait(r"root slot b did not come up healthy: back on root slot a")
    row = wait_row(cli_env, node.name, lambda r: bool(r["host_fallback"]))
    assert row["host_fallback"] == newer["host_version"], row
    assert row["host_slot"] == "a" and row["host_version"] == releases.built["host_version"]
    assert row["outcome"] == "running", row
    # the board's watchdog (the ICH9's TCO), armed by systemd and kept from firing
    assert row["host_watchdog"] == "iTCO_wdt, 120 s", row
    assert (row["host_epoch"], row["host_floor"]) == (0, 0), row


def test_2_an_approved_release_is_kept_and_the_guest_comes_back_on_it(
    node: Node,
    console: Console,
    guest: dict[str, Any],
    releases: Releases,
    cli_env: dict[str, str],
    pinned_signer: Signer,  # noqa: F811
    image_signer: ImageSigner,
    said_values: dict[str, Any],
) -> None:
    newer = releases.newer
    approval = node.vm.workdir / "slot-b.approval.json"
    values = {int(p): bytes.fromhex(v) for p, v in said_values.items()}
    approve_pcrs(image_signer.release_key, values, approval, epoch=1)
    r = run_edgepin(["host", "approve", newer["image_id"], "--approval", str(approval)], cli_env)
    assert r.returncode == 0, r.stderr
    console.skip_to_end()
    # assigned again (a new generation): the node that came back from it tries it again
    host_assign(cli_env, pinned_signer, newer, node.name)
    console.wait(rf"host: host release {newer['image_id']} verified", 600)
    console.wait(r"written into root slot b: the next boot tries it once")
    trial = console.wait(r"Loading root slot b", 600).end()
    console.wait(r"vault open: key")
    console.wait(rf"guest {guest['image_id']} started from the local copy")
    console.wait(r"host: root slot b committed: host update \S+ version \d+ stays")
    console.wait(r"host: the TPM's host floor rose from epoch 0 to 1")
    # edgepin-host-watch.service watched the try from early in its boot, and ended with it
    console.wait(r"host: root slot b is kept: the trial watch ends")
    watched = "host: root slot b is on trial: unless the node is healthy on it within 1200 s"
    assert watched in node.vm.console()[trial : console.at], node.vm.tail()
    row = wait_row(cli_env, node.name, lambda r: r["host_slot"] == "b")
    assert row["host_version"] == newer["host_version"], row
    assert (row["host_slot"], row["host_fallback"], row["host_next"]) == ("b", None, None), row
    assert row["outcome"] == "running", row
    assert row["host_watchdog"] == "iTCO_wdt, 120 s", row
    assert (row["host_epoch"], row["host_floor"]) == (1, 1), row


def test_3_an_older_release_and_one_not_signed_by_a_pinned_certificate_are_refused(
    node: Node,
    console: Console,
    releases: Releases,
    cli_env: dict[str, str],
    pinned_signer: Signer,  # noqa: F811
) -> None:
    try:
        console.skip_to_end()
        host_assign(cli_env, pinned_signer, releases.built, node.name)
        console.wait(rf"version {releases.built['host_version']}, older than this host", 300)
        row = wait_row(cli_env, node.name, lambda r: bool(r["host_refused"]))
        assert "older than this host" in row["host_refused"], row
        host_assign(cli_env, pinned_signer, releases.unpinned, node.name)
        console.wait(r"signed by a certificate that is not pinned", 300)
        row = wait_row(cli_env, node.name, lambda r: "pinned" in (r["host_refused"] or ""))
        assert "not pinned" in row["host_refused"], row
        assert (row["host_slot"], row["host_next"]) == ("b", None), row
        assert row["host_version"] == releases.newer["host_version"], row
        assert f"host release {releases.unpinned['image_id']} verified" not in (node.vm.console())
    finally:
        node.vm.stop()


def test_4_a_try_whose_root_does_not_verify_restarts_into_the_slot_the_node_kept(
    node: Node,
    console: Console,
    guest: dict[str, Any],
    releases: Releases,
    cli_env: dict[str, str],
    slot_a_cfg: dict[str, str],
) -> None:
    node.vm.stop()
    # slot a (the build's release, which the node left for b) armed for one try on the
    # disk, with a root hash on the ESP that its root does not have: its kernel and
    # initramfs start, and the first block of the root panics the kernel
    cfg = disk.esp_file_of(node.vm.disk, "EFI/edgepin/verity-a.cfg", node.vm.workdir).decode()
    slot_a_cfg["verity-a.cfg"] = cfg
    wrong, found = re.subn(
        r"(?m)^set edgepin_roothash=[0-9a-f]{64}$", f"set edgepin_roothash={'0' * 64}", cfg
    )
    assert found == 1, cfg
    disk.write_esp_file(node.vm.disk, "EFI/edgepin/verity-a.cfg", wrong.encode(), node.vm.workdir)
    disk.write_esp_file(node.vm.disk, "EFI/edgepin/boot.env", env_block("a"), node.vm.workdir)
    node.boot("host-update-root-does-not-verify")
    console.at = 0  # the console of this QEMU
    try:
        console.wait(r"Loading root slot a")
        console.wait(r"root slot a is on trial: a stop or a kernel panic restarts into root slot b")
        # the first block read panics the kernel (or veritysetup refuses the hash at once)
        console.wait(r"Kernel panic - not syncing|restarting into root slot b in 10 s")
        console.wait(r"Loading root slot b", 300)
        console.wait(r"vault open: key")
        console.wait(rf"guest {guest['image_id']} started from the local copy")
        row = wait_row(cli_env, node.name, lambda r: r["outcome"] == "running")
    finally:
        node.vm.stop()
    assert "edgepin.slot=a" not in node.vm.console().split("Loading root slot b", 1)[1]
    assert (row["host_slot"], row["host_version"]) == ("b", releases.newer["host_version"]), row
    # GRUB put after.env's slot back before it tried slot a
    assert disk.esp_file_of(node.vm.disk, "EFI/edgepin/boot.env", node.vm.workdir) == (
        env_block("b")
    )


def test_5_the_release_below_the_tpms_host_floor_opens_nothing(
    node: Node,
    console: Console,
    guest: dict[str, Any],
    slot_a_cfg: dict[str, str],
) -> None:
    node.vm.stop()
    # slot a (the build's release, epoch 0) put back as it was and named as the slot to
    # keep booting: its measured state is the one the node sealed everything in
    assert slot_a_cfg, "test 4 did not run"
    image = node.vm.disk
    disk.write_esp_file(
        image, "EFI/edgepin/verity-a.cfg", slot_a_cfg["verity-a.cfg"].encode(), node.vm.workdir
    )
    for name in ("boot.env", "after.env"):
        disk.write_esp_file(image, f"EFI/edgepin/{name}", env_block("a"), node.vm.workdir)
    node.boot("host-update-below-the-floor")
    console.at = 0
    try:
        console.wait(r"Loading root slot a")
        console.wait(r"edgepin: verity: root \S+ opened as \S+ \(slot a\)")
        refused = console.wait(
            r"the TPM's host floor is above epoch 0: this host release is revoked"
        )
        console.wait(r"this host release \(epoch 0\) is below the TPM's host floor")
        console.wait(r"Failed to start .{0,16}edgepin-vault", 120)
    finally:
        node.vm.stop()
    after = node.vm.console()[refused.start() :]
    assert "vault open: key" not in after, node.vm.tail()
    assert f"guest {guest['image_id']} started" not in after, node.vm.tail()
    assert "is on trial" not in after  # a committed slot: nothing restarts it
