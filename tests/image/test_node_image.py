"""The whole story on the real artefact: the built host image, booted in QEMU like a field
node (its own swtpm, the seed `edgepin enroll` wrote for that TPM, user networking to the
test bed on the host's loopback), against the real Keystone, Glance and Barbican.

The scenarios run in order on one node, as a field node would live them:
0. (the fixture) the machine is enrolled with the PCR values an unenrolled machine of its
   model printed on its console at its first boot (the host image's UEFI check boot,
   tests/testbed/hostcheck.py), as a factory does with a reference machine;
1. first boot: enroll, fetch, verify, define, and the nested guest's marker; the guest
   (iPXE running a script: tests/testbed/guest.py), whose image declares the site's
   network, gets its own address on the node's network by DHCP (through the node's
   bridge) and reaches a service there;
2. a reboot with the control plane out of reach: the guest starts from the cache;
3. someone with the disk and a USB stick (a certificate and an empty PCR selection planted
   on the state partition, a seed with commands), then bad assignments (an unpinned
   signer, bytes changed in Glance's store, a record an admin wrote without the assignment
   key): nothing planted takes effect, the images and the record are refused, the images
   reported as rejected, and the running guest keeps running;
4. a power cut: the state partition holds no image passphrase in any form and none of
   libvirt's key material; the vault's content (the image id, the guest's console, the
   ledger's and the serial log's names) is not readable on it;
5. someone with the disk puts back a copy of it taken before the bad assignments (an
   older ledger, encrypted as it was, under the same vault key): the vault opens, the
   ledger does not match the TPM's anchor, nothing of the node's state is used, no guest;
6. someone with the disk edits the root filesystem offline (a unit, in place, on a copy of
   the disk): dm-verity refuses the edited block and the kernel stops; nothing of the
   node runs. Without the root hash on the ESP, or with another one, the initramfs stops
   before mounting any root;
7. a boot with Secure Boot turned off in the firmware (PCR 7 and 0 differ from
   enrollment): the node refuses to unseal and says why on the console (and the unedited
   disk boots through verity);
8. GRUB's config edited on the disk: PCR 8 and 9 differ, the keys are refused. Then the
   factory approves that boot chain with the release key the image pins (the values the
   node said on its console, `edgepin release approve`), the approval is put in the
   node's approval folder, and the same node opens its vault, credential and image key in
   it and starts its guest: what is sealed survives an approved change of the boot chain;
9. the disk booted with another TPM: the vault is not opened, nothing of the node runs;
10. after all of it, the genuine disk, TPM and firmware, offline: the guest starts from the
    local copy (nothing above harmed it, its key or the node's state).
11. another node of the same model, at a site without any network (no network card at
    all): enrolled at the factory with `edgepin enroll --offline` and the PCR values the
    first node said, it boots with its factory seed and a USB stick holding its bundle,
    enrolls with no Keystone, imports the bundle and runs the guest (iPXE again): its
    image declares the network with only the host on it, and the guest is healthy once
    the host leased it an address there. The machine has QEMU's emulated IOMMU and its
    edu test device, which the image asks for by class: the guest gets it through VFIO.
The images test 3 refuses are bare guests (a boot sector): refused before they run, small
to fetch.
Each boot leaves its serial log and a timeline in out/results/node-image/.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from provisioner import barbican
from provisioner.seed import write_nocloud
from provisioner.signing import fingerprint, load_certificate
from tests.testbed import disk
from tests.testbed.controlplane import ControlPlane
from tests.testbed.disk import write_state_files
from tests.testbed.guest import LEASED_BY
from tests.testbed.hostcheck import CheckedBoot, factory_pcrs
from tests.testbed.hostimage import IMAGE_PCRS, ImageSigner, qemu_node_enroll_args
from tests.testbed.node import run_edgepin
from tests.testbed.operator import Signer, approve_pcrs
from tests.testbed.qemuvm import HostVm
from tests.testbed.site import HOST_FROM_USER_NET, SiteService, site_service
from tests.testbed.swtpm import Swtpm, SwtpmFactory

pytestmark = pytest.mark.image
INCREMENTAL = True  # one node lives the scenarios in order (see conftest)

# power-on -> kernel -> first-boot unit -> enrolled -> image verified -> guest running
USB_KEYBOARD = "0627:0001"  # QEMU's usb-kbd: vendor QEMU, product HID
# the address the test image's host has on brhost, the network with only the host on it
# (./build.sh image's default --host-network)
HOST_NETWORK_ADDRESS = "192.168.254.1"
EDU_CLASS = "class:00ff"  # QEMU's edu test device: class ff (unclassified), subclass 00
# QEMU's emulated IOMMU (VT-d) with interrupt remapping, which VFIO needs, and its edu
# device: test_11's machine has them (the DMAR table they add is measured into PCR 1, which
# the node does not seal to)
IOMMU_AND_EDU = ["-device", "intel-iommu,intremap=on", "-device", "edu"]
TIMELINE = {
    "firmware": r"BdsDxe|UEFI|SeaBIOS",
    "kernel": r"Linux version \d",
    "verity root": r"edgepin: verity: root \S+ opened",
    "vault open": r"vault open: key [0-9a-f]{32}",
    "first-boot unit": r"Start(ing|ed) \S*edgepin-enroll\.service",
    "enrolled": r"enrolled: node ",
    "image verified": r"fetch: image \S+ verified",
    "guest running": r"reconcile: switched to image|guest \S+ started from the local copy",
}
# software emulation inside software emulation, with the other tiers beside: generous (the
# nested guest's first start took 700 s to its marker in a fresh-clone run)
BOOT_TIMEOUT = 1500.0


@dataclass
class Node:
    name: str
    vm: HostVm
    project_id: str
    results: Path
    timelines: dict[str, Any]
    label: str = ""
    user_id: str = ""
    # a copy of the disk as it was before the bad assignments (test_3), for test_5
    older_disk: Path | None = None
    # the PCR values this image measures on this firmware, as the node said them (what a
    # factory learns from a reference node and enrolls every node of the model with)
    pcr_values: Path | None = None

    def boot(self, label: str, **changes: Any) -> None:
        for k, v in changes.items():
            setattr(self.vm, k, v)
        self.vm.start()
        self.label = label

    def wait(self, pattern: str, timeout: float = BOOT_TIMEOUT) -> re.Match[str]:
        try:
            return self.vm.wait_for(pattern, timeout)
        finally:
            self.save()

    def save(self) -> None:
        shutil.copy(self.vm.serial_log, self.results / f"serial-{self.label}.log")
        self.timelines[self.label] = self.vm.timeline()
        (self.results / "timeline.json").write_text(json.dumps(self.timelines, indent=2) + "\n")


@pytest.fixture(scope="module")
def pinned_signer(admin: Any, image_signer: ImageSigner) -> Signer:
    """The test-only signing key that the test image pins, stored in this run's Barbican."""
    cert_id = barbican.store(
        admin, "edgepin-signing-cert:image-tier", "certificate", image_signer.cert_pem
    )
    key_id = barbican.store(
        admin, "edgepin-signing-key:image-tier", "private", image_signer.key_pem
    )
    cert = load_certificate(image_signer.cert_pem)
    return Signer(cert_id, key_id, fingerprint(cert), image_signer.cert_pem)


def new_machine(vm_tpms: SwtpmFactory, run_dir: Path) -> tuple[str, Swtpm, Path]:
    """A new machine's name, its swtpm, and its folder holding the EK certificate and CA
    as the factory reads them (what ``qemu_node_enroll_args`` takes)."""
    name = f"q{secrets.token_hex(3)}"
    tpm = vm_tpms.create(name)
    work = run_dir / "qemu-nodes" / name
    work.mkdir(parents=True)
    (work / "ek.pem").write_bytes(tpm.ek_cert_pem())
    (work / "ek-ca.pem").write_bytes(tpm.ca_cert_pem())
    return name, tpm, work


def model_vm(
    name: str,
    image: Path,
    work: Path,
    tpm: Swtpm,
    seed: Path,
    devices: list[str] | None = None,
    **changes: Any,
) -> HostVm:
    """A QEMU machine of the module's hardware model: UEFI with Secure Boot, its swtpm, its
    seed, and a USB keyboard (QEMU's, 0627:0001) plugged in, which v1 asks for; ``devices``,
    QEMU arguments for more."""
    return HostVm(
        name,
        image,
        work / "vm",
        firmware="uefi",
        tpm=tpm,
        seed=seed,
        milestones=TIMELINE,
        append_args=[
            *("-device", "qemu-xhci,id=xhci", "-device", "usb-kbd,bus=xhci.0"),
            *(devices or []),
        ],
        **changes,
    )


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
    # the factory enrolls the machine with the PCR values its model measures, read from a
    # reference boot of the model with no seed, where the node printed them on its console
    # (there is no login): the host image's UEFI check boot (test_host_image.py), the same
    # machine model and image; its values and those of this machine were the same
    said = factory_pcrs(checked_boot("uefi"))
    assert said, "the reference boot printed no PCR values for the factory"
    measured.write_text(said)
    r = run_edgepin([*qemu_node_enroll_args(name, work, measured, seed), "--json"], cli_env)
    assert r.returncode == 0, r.stderr
    enrolled = json.loads(r.stdout)
    results = results_dir / "node-image"
    shutil.rmtree(results, ignore_errors=True)
    results.mkdir(parents=True)
    vm = model_vm(name, host_image, work, tpm, seed)
    n = Node(name, vm, enrolled["project_id"], results, {}, user_id=enrolled["user_id"])
    n.pcr_values = measured
    yield n
    vm.stop()


def publish_signed(
    cli_env: dict[str, str],
    tiny_guest: Callable[..., Path],
    signer: Signer,
    version: str,
    site: SiteService | None = None,
    *,
    kind: str = "linux",
    net: str | None = None,
    needs: tuple[str, ...] = (),
    healthy_after: str = "",
) -> dict[str, Any]:
    """Publish a tiny guest of ``kind`` (tests/testbed/guest.py); with ``site``, one that
    needs the site's network (``--network lan``) and asks ``site`` for ``/<marker>/<its
    address>`` once it has one, and the node's USB keyboard (``--usb``); else with ``net``
    as the guest's network URL (``host``: a lease from the host), declaring ``needs``.
    The health marker is the marker line, followed by ``healthy_after`` when given."""
    marker = f"m{secrets.token_hex(5)}"
    guest = tiny_guest(marker, "run", site.url if site else net, kind=kind)
    health = f"EDGEPIN-GUEST-MARKER {marker}" + (f" {healthy_after}" if healthy_after else "")
    r = run_edgepin(
        [
            "publish",
            str(guest),
            "--name",
            f"tiny-{marker}",
            "--version",
            version,
            "--signing-cert-id",
            signer.cert_id,
            "--signing-key-id",
            signer.key_id,
            "--health-marker",
            health,
            "--luks-iter-time",
            "100",
            *(["--network", "lan", "--usb", USB_KEYBOARD] if site else []),
            *needs,
            "--json",
        ],
        cli_env,
    )
    assert r.returncode == 0, r.stderr
    result: dict[str, Any] = json.loads(r.stdout)
    result["marker"] = marker
    result["health"] = health
    return result


def assign(cli_env: dict[str, str], name: str, image_id: str, signer: Signer) -> None:
    """``edgepin assign``, the assignment signed with ``signer`` (the pinned one: the image
    pins no assignment certificate, so its image-signing certificate signs assignments)."""
    ids = ["--assignment-cert-id", signer.cert_id, "--assignment-key-id", signer.key_id]
    r = run_edgepin(["assign", name, image_id, *ids], cli_env)
    assert r.returncode == 0, r.stderr


def member_status(admin: Any, image_id: str, project_id: str) -> str:
    return str(admin.image.get(f"/images/{image_id}/members/{project_id}").json()["status"])


@pytest.fixture(scope="module")
def site() -> Iterator[SiteService]:
    with site_service() as s:
        yield s


@pytest.fixture(scope="module")
def v1(
    cli_env: dict[str, str],
    tiny_guest: Callable[..., Path],
    pinned_signer: Signer,
    site: SiteService,
) -> dict[str, Any]:
    # an iPXE guest: DHCP and HTTP in a fraction of a Linux boot under nested emulation
    return publish_signed(cli_env, tiny_guest, pinned_signer, "1", site, kind="ipxe")


def test_1_first_boot_enrolls_fetches_verifies_and_runs_the_guest(
    node: Node,
    v1: dict[str, Any],
    cli_env: dict[str, str],
    admin: Any,
    pinned_signer: Signer,
    site: SiteService,
) -> None:
    assign(cli_env, node.name, v1["image_id"], pinned_signer)
    node.boot("first-boot")
    node.wait(r"enrolled: node " + node.name)
    node.wait(rf"fetch: image {v1['image_id']} verified")
    node.wait(rf"switched to image {v1['image_id']}.*reported healthy")
    # the guest's own marker, which the node saw on the guest's console
    assert f"EDGEPIN-GUEST-MARKER {v1['marker']}" in node.vm.console()
    node.wait(rf"running: guest {v1['image_id']} running", 120)
    assert member_status(admin, v1["image_id"], node.project_id) == "accepted"
    timeline = node.timelines["first-boot"]
    assert all(timeline[k] is not None for k in TIMELINE), timeline
    order = [timeline[k] for k in TIMELINE]
    assert order == sorted(order), f"milestones out of order: {timeline}"
    # the image declared the site's network (signed into the assignment): the nested
    # guest, bridged through the node's br0 onto the node's network, got an address of
    # its own by DHCP and reached a service there
    # (the guest asks after its marker line; a Linux guest, with the other tiers beside,
    # once took more than 300 s for it under emulation inside emulation)
    asked = site.wait_for(f"/{v1['marker']}/", 900)
    address = ipaddress.ip_address(asked.rsplit("/", 1)[1])
    assert address in ipaddress.ip_network("10.0.2.0/24"), asked
    # QEMU's user network leases 10.0.2.15 first: the node's own br0 took it at boot
    assert str(address) not in (HOST_FROM_USER_NET, "10.0.2.15"), asked
    # the image also asked for the node's USB keyboard: the node has it (its report says
    # so) and the guest started with it (libvirt refuses to start a domain whose USB
    # host device it cannot find)
    rows = json.loads(run_edgepin(["status", node.name, "--json"], cli_env).stdout)
    assert USB_KEYBOARD in rows[0]["report"]["report"]["facts"]["usb"], rows


def env_block(default: str) -> bytes:
    """A GRUB environment block naming root slot ``default``, as seal-verity writes it."""
    return f"# GRUB Environment Block\ndefault={default}\n".encode().ljust(1024, b"#")


def test_2_reboot_with_the_control_plane_out_of_reach_through_a_slot_that_does_not_boot(
    node: Node, v1: dict[str, Any]
) -> None:
    node.vm.stop()
    # slot b put on trial (the ESP's boot.env names it, after.env still slot a) while it
    # is empty, as a host update cut off before it wrote the slot's kernel would leave it:
    # GRUB boots slot b once, finds no kernel and restarts the machine, and the next boot is
    # slot a's, which measures what slot a's every boot measures: the node opens its keys
    disk.write_esp_file(node.vm.disk, "EFI/edgepin/boot.env", env_block("b"), node.vm.workdir)
    # QEMU's restrict=on: the node sees no network at all, as with the control plane down
    node.boot("offline-reboot", netdev="user,id=n0,restrict=on", reboot=True)
    try:
        node.wait(r"Loading root slot b")
        node.wait(r"root slot b does not boot: restarting", 120)
        node.wait(r"Loading root slot a", 600)
        node.wait(rf"guest {v1['image_id']} started from the local copy")
        node.wait(r"offline: guest running from the local copy", 300)
    finally:
        node.vm.stop()
        node.vm.reboot = False
    console = node.vm.console()
    assert "edgepin.slot=b" not in console.split("Loading root slot a", 1)[1], "slot b booted"
    assert re.search(r"edgepin: verity: root \S+ opened as \S+ \(slot a\)", console), console[
        -3000:
    ]
    # GRUB put after.env's slot back into boot.env before it tried slot b
    assert disk.esp_file_of(node.vm.disk, "EFI/edgepin/boot.env", node.vm.workdir) == (
        env_block("a")
    )
    # the enroll unit runs at every boot while the seed is there, and finds nothing to do
    assert "enrollment: already done" in console, node.vm.tail()
    assert "created and sealed" not in console, "enrolled again on a reboot"


def test_3_bad_assignments_are_refused_and_the_guest_keeps_running(
    node: Node,
    v1: dict[str, Any],
    cli_env: dict[str, str],
    admin: Any,
    tiny_guest: Callable[..., Path],
    signer: Signer,
    pinned_signer: Signer,
    controlplane: ControlPlane,
) -> None:
    node.vm.stop()
    # the disk as it is now, for someone to put back later (test_5)
    node.older_disk = node.vm.workdir / "older-state.qcow2"
    shutil.copyfile(node.vm.disk, node.older_disk)
    # someone with the disk and a USB stick, before this boot: the unpinned signer's
    # certificate and an empty PCR selection planted where /etc's writable half lived on
    # the state partition, and a new NoCloud seed whose commands would show on the console
    write_state_files(
        node.vm.disk,
        {
            "lib/edgepin-host/etc/edgepin/signing-certs/planted.pem": signer.pem,
            "lib/edgepin-host/etc/edgepin/edgepin.conf": b"EDGEPIN_PCRS=\n",
        },
        node.vm.workdir,
    )
    hostile = node.vm.workdir / "hostile-seed.img"
    attack = "echo EDGEPIN-ATTACK-RAN >/dev/console"
    write_nocloud(
        hostile,
        {
            "meta-data": "instance-id: attacker-1\n",
            "user-data": "#cloud-config\n"
            + json.dumps(
                {
                    "bootcmd": [["sh", "-c", attack]],
                    "runcmd": [["sh", "-c", attack]],
                    "write_files": [{"path": "/var/lib/edgepin-host/planted", "content": "x"}],
                }
            ),
        },
    )
    node.boot("bad-assignments", netdev="user,id=n0", seed=hostile)
    node.wait(rf"running: guest {v1['image_id']} running")
    # signed by a certificate Barbican offers but the image does not pin
    unpinned = publish_signed(cli_env, tiny_guest, signer, "unpinned", kind="bare")
    assign(cli_env, node.name, unpinned["image_id"], pinned_signer)
    node.wait(rf"refused: .*{unpinned['image_id']}|image {unpinned['image_id']} refused", 600)
    # the end of that reconcile, which reported the refusal before it printed this line (a
    # "current:" line of an earlier reconcile would not do)
    node.wait(rf"image {unpinned['image_id']} refused[\s\S]*current: image {v1['image_id']}", 120)
    assert member_status(admin, unpinned["image_id"], node.project_id) == "rejected"
    # bytes changed in Glance's store after a correct upload
    tampered = publish_signed(cli_env, tiny_guest, pinned_signer, "tampered", kind="bare")
    stored = controlplane.run_dir / "glance" / "images" / tampered["image_id"]
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    assign(cli_env, node.name, tampered["image_id"], pinned_signer)
    node.wait(rf"image {tampered['image_id']} refused: .*os_hash_value", 600)
    node.wait(rf"image {tampered['image_id']} refused[\s\S]*current: image {v1['image_id']}", 120)
    assert member_status(admin, tampered["image_id"], node.project_id) == "rejected"
    assert f"switched to image {tampered['image_id']}" not in node.vm.console()
    # an assignment written without the assignment key (a Keystone admin's): not read
    unsigned = {"image_id": unpinned["image_id"], "generation": 99}
    admin.identity.patch(
        f"/projects/{node.project_id}",
        json={"project": {"edgepin_assignment": json.dumps(unsigned)}},
    )
    # the next reconcile (the timer's randomized delay, two processes started under
    # emulation): not the same run, so as long as the refusals' first waits
    node.wait(rf"the assignment is not signed[\s\S]*current: image {v1['image_id']}", 600)
    # the planted certificate did not make the unpinned image acceptable (above), the empty
    # PCR selection was never read, the stick's commands never ran
    assert "EDGEPIN_PCRS is empty" not in node.vm.console()
    assert "EDGEPIN-ATTACK-RAN" not in node.vm.console()


def test_4_the_disk_of_a_node_that_lost_power_holds_no_key(
    node: Node, v1: dict[str, Any], admin: Any, signer: Signer
) -> None:
    node.vm.stop()  # QEMU killed with the guest running: a power cut, no shutdown
    passphrase = admin.key_manager.get(
        f"/secrets/{v1['key_id']}/payload", headers={"Accept": "text/plain"}
    ).content
    assert len(passphrase) >= 16
    needles = {
        "the image passphrase": passphrase,
        "the image passphrase (base64)": base64.b64encode(passphrase),
        "the image passphrase (hex)": passphrase.hex().encode(),
        # libvirt's per-domain AES key file and the secret it encrypts, on QEMU's command
        # line as libvirt logs it: together they give the passphrase back
        "libvirt's master-key.aes": b"master-key.aes",
        "libvirt's encrypted secret": b"masterKey0",
        # the vault: what the node keeps and what the guest printed are ciphertext
        "the image id": v1["image_id"].encode(),
        "the guest's console": f"EDGEPIN-GUEST-MARKER {v1['marker']}".encode(),
        "the ledger's name": b"node.json",
        "the guest's serial log's name": b"guest-serial.log",
    }
    # the node credential: the test cannot know its secret (the node made it and sealed it
    # at once; the integration tier scans for it), but its id is in the same sealed file
    creds = admin.identity.get(f"/users/{node.user_id}/application_credentials").json()
    ids = [c["id"] for c in creds["application_credentials"]]
    assert ids, "the node has no application credential"
    needles |= {f"the node credential's id {i}": i.encode() for i in ids}
    found = disk.scan(node.vm.disk, needles, node.vm.workdir)
    assert found == [], f"on the state partition of a powered-off node: {found}"
    planted = disk.read_state_file(node.vm.disk, "lib/edgepin-host/planted", node.vm.workdir)
    assert planted is None, "the USB stick's write_files ran on an enrolled node"
    # what was planted before the last boot was there all along, and ignored
    cert = disk.read_state_file(
        node.vm.disk, "lib/edgepin-host/etc/edgepin/signing-certs/planted.pem", node.vm.workdir
    )
    assert cert == signer.pem
    # the ledger is in the vault: not even its name can be read without the key
    ledger = disk.read_state_file(node.vm.disk, "lib/edgepin/node.json", node.vm.workdir)
    assert ledger is None, "the ledger is readable on the disk"


def test_5_an_older_copy_of_the_disk_is_refused(node: Node, v1: dict[str, Any]) -> None:
    """The disk as it was before test_3 (the ledger without the refusals and the higher
    generation floor since), put back whole: it is ciphertext under the same key in the
    same TPM, so the vault opens, but the ledger's digest is not the anchor's."""
    node.vm.stop()
    genuine, older = node.vm.disk, node.older_disk
    assert older is not None, "test_3 kept no copy of the disk"
    try:
        node.boot("older-state", disk=older)
        node.wait(r"vault open: key", BOOT_TIMEOUT)
        node.wait(r"node\.json does not match the record in the TPM", BOOT_TIMEOUT)
    finally:
        node.vm.stop()
        node.vm.disk = genuine
        older.unlink(missing_ok=True)
    console = node.vm.console()
    assert "started from the local copy" not in console, "the older state started a guest"
    assert "switched to image" not in console
    assert f"guest {v1['image_id']} running" not in console


def test_6_a_root_filesystem_edited_offline_is_refused_by_verity(node: Node) -> None:
    node.vm.stop()
    # someone with the disk (here a copy of it) changes what the reconcile unit runs:
    # unpacks the squashfs root, edits the unit, packs it again and writes it back
    genuine = node.vm.disk
    edited = node.vm.workdir / "root-edited.qcow2"
    shutil.copyfile(genuine, edited)
    old = b"ExecStartPre=-/usr/bin/edgepin node enroll\nExecStart=/usr/bin/edgepin node reconcile"
    attack = b'ExecStart=/bin/sh -c "echo EDGEPIN-ATTACK-RAN"\n#'
    new = attack + b"x" * (len(old) - len(attack))
    unit = "usr/lib/systemd/system/edgepin-reconcile.service"
    assert disk.repack_root(edited, unit, old, new, node.vm.workdir) == 1
    try:
        node.boot("root-edited", disk=edited)
        # the initramfs opens the root with the genuine root hash from the measured command
        # line; its first read of the repacked root fails its hash and panics the kernel,
        # before anything is mounted
        node.wait(r"verity: \S+: data block \d+ is corrupted", BOOT_TIMEOUT)
        node.wait(r"Kernel panic - not syncing: dm-verity device corrupted", 120)
    finally:
        node.vm.stop()
        node.vm.disk = genuine
        edited.unlink(missing_ok=True)
    console = node.vm.console()
    assert "EDGEPIN-ATTACK-RAN" not in console, "the edited unit ran"
    # nothing of the node ran: no enrollment, no reconcile, no key unsealed, no guest
    for said in ("enrollment:", "reconcile:", "unseal", "started from the local copy"):
        assert said not in console, f"{said!r} on the console of the edited root"

    # the root hash on the ESP removed, then replaced by another one (what goes with a root
    # of the attacker's): the initramfs stops before any root is mounted, with no shell
    cfg = disk.esp_file_of(genuine, "EFI/edgepin/verity-a.cfg", node.vm.workdir)
    genuine_hash = re.search(rb"set edgepin_roothash=([0-9a-f]{64})", cfg)
    assert genuine_hash is not None, cfg
    other = genuine_hash.group(1)[:-1] + (b"0" if genuine_hash.group(1)[-1:] != b"0" else b"1")
    for label, data, stopped in (
        ("no-root-hash", None, r"edgepin: verity: no root hash on the kernel command line"),
        (
            "other-root-hash",
            cfg.replace(genuine_hash.group(1), other),
            r"edgepin: verity: veritysetup could not open|"
            r"Kernel panic - not syncing: dm-verity device corrupted",
        ),
    ):
        copy = node.vm.workdir / f"{label}.qcow2"
        shutil.copyfile(genuine, copy)
        disk.write_esp_file(copy, "EFI/edgepin/verity-a.cfg", data, node.vm.workdir)
        try:
            node.boot(label, disk=copy)
            node.wait(stopped, BOOT_TIMEOUT)
            if data is None:
                node.wait(r"the root filesystem is not opened: the node stops here", 60)
        finally:
            node.vm.stop()
            node.vm.disk = genuine
            copy.unlink(missing_ok=True)
        console = node.vm.console()
        assert re.search(r"EXT4-fs \(dm-\d+\): mounted", console) is None, "a root was mounted"
        assert "systemd[1]" not in console and "(initramfs)" not in console, node.vm.tail()


def test_7_a_boot_with_secure_boot_off_is_refused_the_keys(node: Node) -> None:
    node.vm.stop()
    # Secure Boot turned off (firmware without it): the signed chain still boots, but PCR 7
    # (and PCR 0) differ from what the node sealed to on first boot
    node.boot("secure-boot-off", firmware="uefi-insecure")
    node.wait(
        r"(TPM refused to unseal the \S+|TPM's anchor|vault key).*measured boot state differs",
        BOOT_TIMEOUT,
    )
    console = node.vm.console()
    assert "started from the local copy" not in console
    assert "switched to image" not in console
    # the genuine disk, after the edited copy's boot, opens through verity as before
    assert re.search(r"edgepin: verity: root \S+ opened", console), node.vm.tail()


def test_8_a_boot_loader_edited_on_the_disk_is_refused_the_keys_until_approved(
    node: Node, v1: dict[str, Any], image_signer: ImageSigner
) -> None:
    node.vm.stop()
    # someone with the disk changes a kernel parameter in grub.cfg on the boot partition
    # (the same change as typing init=/bin/sh at a GRUB prompt, which the locked menu
    # refuses), in place: GRUB reads the boot partition without verity, and the booted
    # system never reads grub.cfg, so only the measurement sees it
    n = disk.edit_in_place(
        node.vm.disk,
        "grub/grub.cfg",
        b" no_timer_check ",
        b" edgepin.edited ",
        node.vm.workdir,
        "boot",
    )
    assert n > 0, "no no_timer_check on a linux line of grub.cfg"
    try:
        node.boot("boot-loader-edited", firmware="uefi")
        node.wait(
            r"(TPM refused to unseal the \S+|TPM's anchor|vault key).*measured boot state "
            r"differs",
            BOOT_TIMEOUT,
        )
        refused = node.vm.console()
        # the image pins a release key: the console says the values to approve
        said = re.search(r"edgepin release approve.*FILE holding: (\{[^}]*\})", refused)
        assert said, node.vm.tail()
        node.vm.stop()
        assert "edgepin.edited" in refused, "the edited command line was not booted"
        assert "started from the local copy" not in refused
        assert "switched to image" not in refused
        # the factory approves this boot chain (as it would a host update's)
        values = {int(k): bytes.fromhex(v) for k, v in json.loads(said.group(1)).items()}
        assert sorted(values) == [int(p) for p in IMAGE_PCRS.split(",")], values
        approval = node.vm.workdir / "edited.approval.json"
        approve_pcrs(image_signer.release_key, values, approval)
        write_state_files(
            node.vm.disk,
            {"lib/edgepin-host/approvals/edited.json": approval.read_bytes()},
            node.vm.workdir,
        )
        node.boot("boot-loader-edited-approved", firmware="uefi")
        node.wait(rf"guest {v1['image_id']} started from the local copy")
        approved = node.vm.console()
        assert "edgepin.edited" in approved
        assert "vault open" in approved, node.vm.tail()
    finally:
        node.vm.stop()
        # the edit undone, for the last scenario
        back = disk.edit_in_place(
            node.vm.disk,
            "grub/grub.cfg",
            b" edgepin.edited ",
            b" no_timer_check ",
            node.vm.workdir,
            "boot",
        )
        assert back == n, f"{back} of {n} edits undone"
    # the approval stays in the folder: it names the edited boot chain and nothing else


def test_9_the_disk_booted_with_another_tpm_gives_nothing(
    node: Node, vm_tpms: SwtpmFactory
) -> None:
    """The node's disk in another machine: a TPM that holds none of the node's keys and no
    anchor. Nothing unseals, the ledger is not trusted, the seed on the disk cannot enroll
    it (its bootstrap credential is wrapped for the node's own EK), no guest starts."""
    node.vm.stop()
    genuine = node.vm.tpm
    try:
        node.boot("another-tpm", firmware="uefi", tpm=vm_tpms.create(f"{node.name}-other"))
        # the vault is not opened: its folders are under a key this TPM does not hold, so
        # nothing that needs them starts (no enrollment, no reconcile, no cloud-init)
        node.wait(r"encrypted under a key this TPM does not hold", BOOT_TIMEOUT)
    finally:
        node.vm.stop()
        node.vm.tpm = genuine
    console = node.vm.console()
    assert "vault open" not in console, "the vault opened with another TPM"
    assert "enrollment passed" not in console, "the node enrolled on another TPM"
    assert "started from the local copy" not in console
    assert "switched to image" not in console
    assert "fetch: image" not in console


def test_10_after_all_of_it_the_genuine_node_runs_its_guest(node: Node, v1: dict[str, Any]) -> None:
    """The genuine disk, TPM and firmware once more, offline: none of the attempts above
    harmed the guest, its key or the node's state; the guest starts from the local copy."""
    node.vm.stop()
    node.boot("genuine-again", firmware="uefi", netdev="user,id=n0,restrict=on")
    node.wait(rf"guest {v1['image_id']} started from the local copy")
    node.wait(r"offline: guest running from the local copy", 300)
    console = node.vm.console()
    assert "does not match the record in the TPM" not in console, node.vm.tail()
    assert "measured boot state differs" not in console, node.vm.tail()


def test_11_a_node_without_any_network_runs_its_guest_from_its_seed_and_a_bundle(
    node: Node,
    host_image: Path,
    vm_tpms: SwtpmFactory,
    run_dir: Path,
    cli_env: dict[str, str],
    pinned_signer: Signer,
    tiny_guest: Callable[..., Path],
) -> None:
    node.vm.stop()
    # an iPXE guest (no kernel: what this scenario shows is the node's way from a seed and a
    # stick to a running guest, not a Linux boot) on the network with only the host on it,
    # healthy once the host leased it an address, and with the machine's one edu device
    guest = publish_signed(
        cli_env,
        tiny_guest,
        pinned_signer,
        "1",
        kind="ipxe",
        net="host",
        needs=("--network", "host", "--pci", EDU_CLASS),
        healthy_after=f"{LEASED_BY} {HOST_NETWORK_ADDRESS}",
    )
    assert node.pcr_values is not None, "the fixture kept no PCR values"
    name, tpm, work = new_machine(vm_tpms, run_dir)
    seed = work / "seed.img"
    # at the factory: the node's identity and its own credential, wrapped for its EK under
    # the PCR values of its model, and its assignment and bundle made from the records
    enroll_args = qemu_node_enroll_args(name, work, node.pcr_values, seed)
    r = run_edgepin([*enroll_args, "--offline"], cli_env)
    assert r.returncode == 0, r.stderr
    assign(cli_env, name, guest["image_id"], pinned_signer)
    r = run_edgepin(["bundle", name, "--out", str(work / "bundles")], cli_env)
    assert r.returncode == 0, r.stderr
    stick = disk.usb_stick(work / "stick.img", "EDGEPIN", [work / "bundles" / f"edgepin-{name}"])
    vm = model_vm(name, host_image, work, tpm, seed, IOMMU_AND_EDU, nic=False, media=[stick])
    offline = Node(name, vm, "", node.results, node.timelines)
    try:
        offline.boot("no-network")
        offline.wait(rf"enrolled: node {name}")
        offline.wait(rf"import: bundle \S+: image {guest['image_id']}, generation \d+")
        offline.wait(rf"running: guest {guest['image_id']} running \(generation \d+, from a bundle")
    finally:
        vm.stop()
    console = vm.console()
    # the health marker: the guest was leased an address on brhost by the host itself
    assert f"reported healthy ({guest['health']!r} on its console)" in console, vm.tail()
    # the edu device, in an IOMMU group of its own: libvirt bound it to vfio-pci and started
    # the guest with it (libvirt refuses to start a domain whose PCI device it cannot assign)
    assert re.search(rf"guest {guest['image_id']} has the host's PCI [0-9a-f:.]+", console), (
        vm.tail()
    )
    # the boot's reconcile found no network; the image came from the stick, not Glance
    assert "control plane unreachable" in console, vm.tail()
    assert f"fetch: image {guest['image_id']} copied and verified" in console, vm.tail()
    assert re.search(r"fetch: image \S+ verified", console) is None, "downloaded with no network"
