"""The host image boots on UEFI (OVMF) and BIOS (SeaBIOS) with a TPM, and is what it claims.

Each boot gets a NoCloud seed with a check script in its meta-data (data: cloud-init keeps
it in its instance data); the QA image's edgepin-qa-check.service runs it once the system
has finished starting, and it prints the answers on the serial console, where the test
reads them. The seed's user-data and vendor-data hold every kind of part cloud-init can
run (a boothook, a script, bootcmd, runcmd, write_files), which the image must discard. The
image under test is what ./build.sh makes, plus that one unit (./build.sh image --qa-check).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from provisioner import hostupdate
from provisioner.tpm import verify_ek_cert_chain
from tests.testbed import disk
from tests.testbed.hostcheck import CheckedBoot, factory_pcrs
from tests.testbed.qemuvm import HostVm

pytestmark = pytest.mark.image


def pcrs(got: dict[str, str]) -> dict[int, str]:
    """check.sh's ``pcrs=4=hex,7=hex,...`` (sha256 bank) as {4: hex, ...}."""
    values = dict(item.split("=", 1) for item in got["pcrs"].split(",") if "=" in item)
    assert set(values) == {"4", "7", "8", "9"}, f"tpm2_pcrread: {got['pcrs']}"
    return {int(k): v for k, v in values.items()}


ZERO = "0" * 64


@pytest.mark.parametrize("firmware", ["uefi", "bios"])
def test_boots_read_only_with_tpm_and_no_way_in(
    firmware: str, checked_boot: Callable[[str], CheckedBoot], host_image: Path
) -> None:
    # one boot per firmware and session: the node tier enrolls its machine with the PCR
    # values the UEFI one printed (the factory's reference boot of the model)
    boot = checked_boot(firmware)
    got, tpm = boot.checks, boot.tpm
    print(json.dumps(boot.report))
    # not enrolled and no seed bundle: the node printed what the factory enrolls it with,
    # its EK certificate (from the TPM's NV, where swtpm_setup put one its local CA issued)
    # and its PCR values, which are the ones the check read
    console = boot.console
    said_cert = re.search(r"factory: ek-cert ([A-Za-z0-9+/=]+)", console)
    assert said_cert, "the node printed no EK certificate for the factory"
    verify_ek_cert_chain(base64.b64decode(said_cert.group(1)), tpm.ca_cert_pem())
    said_pcrs = factory_pcrs(boot)
    assert said_pcrs, "the node printed no PCR values for the factory"
    values = json.loads(said_pcrs)
    assert {int(k): v for k, v in values.items() if k != "0"} == pcrs(got), values
    tail = boot.tail
    # GRUB's menu is locked: a superuser and no password command (no one can log in, so no
    # entry can be edited and no command line opens); the Linux entries boot unattended
    assert got["grub-superusers"] == '"edgepin"', got
    assert got["grub-passwords"] == "0", got
    assert int(got["grub-linux-entries"]) == 2, got  # one per root slot
    assert got["grub-restricted-linux-entries"] == "0", got
    assert got["grub-recovery-entries"] == "0", got
    assert "console=ttyS0,115200" in got["cmdline"].split(), got["cmdline"]
    if firmware == "uefi":
        # OVMF enforces Secure Boot with Microsoft's keys: it started shim, shim started
        # Debian's signed GRUB, GRUB a signed kernel, which locked itself down
        assert got["secureboot"] == "1", got
        assert got["lockdown"] == "integrity", got
        esp = set(got["esp"].split(","))
        signed = {"EFI/BOOT/BOOTX64.EFI", "EFI/BOOT/grubx64.efi", "EFI/debian/grub.cfg"}
        assert signed <= esp, got["esp"]
        assert not {f for f in esp - signed if f.lower().endswith(".efi")}, got["esp"]
    measured = pcrs(got)
    if firmware == "uefi":
        # GRUB's tpm module: commands and the kernel command line in PCR 8, files in PCR 9
        assert measured[8] != ZERO and measured[9] != ZERO, f"GRUB measured nothing: {measured}"
    assert got["system"] == "running", f"{got}\n{tail}"
    assert got["failed"] == "", f"failed units: {got['failed']}\n{tail}"
    assert got["root"] == "ro", got
    # through dm-verity, with the root hash GRUB read from the ESP, and a corrupted block
    # panics the kernel, which then stays stopped
    assert got["root-source"] == "/dev/mapper/edgepin-root", got
    assert got["root-fstype"] == "squashfs", got
    assert got["boot-mounted"] == "0", "the boot partition is mounted on the running node"
    assert got["verity"] == "verity V panic_on_corruption", got
    cmdline = got["cmdline"].split()
    assert any(re.fullmatch(r"edgepin\.roothash=[0-9a-f]{64}", a) for a in cmdline), cmdline
    assert "panic=0" in cmdline, cmdline
    # the command line the host update says this release's kernel gets, which GRUB measures
    update = hostupdate.read(host_image.with_name("edgepin-host.update.tar"))
    # slot a: what the build wrote and the ESP names
    assert "edgepin.slot=a" in cmdline and got["root-partitions"] == "root-a,verity-a", got
    line = update.kernel_command_line["a"]
    assert cmdline == line.split(), (cmdline, line)
    fstype, size = got["var"].split()
    assert fstype == "ext4", got
    # the 4 GiB disk minus ESP, BIOS boot, boot and the two root slots (2,408 MiB): the
    # state partition, 663 MiB as built, grew on first boot
    assert int(size.rstrip("M")) > 1500, f"the state partition did not grow: {got['var']}"
    # the vault: its folders encrypted under one key, open (the journal flushed into it)
    assert got["vault"] == "active 1 encrypted", got["vault"]
    assert int(got["journal-files"]) >= 1, got
    assert got["ordering-cycles"] == "0", "systemd broke an ordering cycle at boot"
    assert got["state-features"] == "1", "the state filesystem has no encryption"
    # /etc: the read-only root under an overlay whose writable half is in memory
    assert got["etc"] == "overlay", got
    assert got["etc-upper"] == "/run/edgepin-host/etc tmpfs", got
    assert got["listen22"] == "0", "something listens on port 22"
    assert got["tpm0"] == "yes", got
    assert got["libvirtd"] == "active", got
    assert re.fullmatch(r"edgepin \d+\.\d+\.\d+\S*", got["edgepin"]), got["edgepin"]
    assert got["root-login"] == "L", "root can log in"
    assert got["compilers"] == "0", "a compiler or make is in the image"
    assert re.fullmatch(r"[0-9a-f]{32}", got["machine-id"]), got
    assert got["machine-id-kept"] == got["machine-id"], "the machine-id is not kept on /var"
    # cloud-init: reads the seed's meta-data only (the enrollment bundle, as data), runs no
    # module, discards user-data and vendor-data; never runs once the node is enrolled
    assert got["cloud-modules"] == "- - -", got["cloud-modules"]
    assert got["cloud-userdata"] == "False False False", got["cloud-userdata"]
    assert got["cloud-datasources"] == "NoCloud,None", got
    assert "cloud-init-main.service" in got["cloud-units"].split(","), got["cloud-units"]
    assert got["cloud-ungated"] == "", f"cloud-init units without the gate: {got['cloud-ungated']}"
    assert got["cloud-gate"] == "not-enrolled", got
    assert got["seed-commands"] == "", f"cloud-init ran parts of the seed: {got['seed-commands']}"
    assert got["enrolled-gate"] == "1 enrolled", got
    assert got["enrolled-cloud-final"] == "exec-condition", got
    # no login on any console, no setuid-root program for a user who is not root
    assert got["gettys"] == "", f"getty running: {got['gettys']}"
    assert got["unit-docs-missing"] == "", got["unit-docs-missing"]
    # --reconcile-interval 20s, --reconcile-delay 10s (hostimage.image_args)
    assert got["reconcile-timer"] == "OnUnitActiveUSec=20s 10s", got["reconcile-timer"]
    assert got["getty-ttyS0"] == "masked", got
    allowed_setuid = {"/usr/lib/dbus-1.0/dbus-daemon-launch-helper"}
    setuid = set(filter(None, got["setuid"].split(",")))
    assert setuid <= allowed_setuid, f"setuid-root: {sorted(setuid - allowed_setuid)}"
    # the guest networks (--guest-network bridge, --host-network's default): br0 filters
    # VLANs, the uplink is an untagged member of VLAN 1 (its PVID: the site's plain LAN,
    # the host's and a lan guest's) and a tagged member of every other VLAN; a guest in
    # VLAN 42 is an untagged member of VLAN 42 only, a lan guest of VLAN 1 only (it cannot
    # tag its way into a VLAN); brhost has the host's address, and the host forwards nothing
    assert got["br0-vlan-filtering"] == "1", got
    uplink, vlans = got["uplink-vlans"].split(" ", 1)
    assert uplink.startswith("en"), got["uplink-vlans"]
    assert sorted(vlans.split(",")) == ["1 1 PVID+Egress Untagged", "2 4094 tagged"], vlans
    assert got["guest-vlan-port"] == "42:PVID+Egress Untagged 1:PVID+Egress Untagged", got[
        "guest-vlan-port"
    ]
    assert got["brhost"] == "192.168.254.1/24", got
    assert got["ip-forward"] == "0", got
    # libvirt's per-domain keys and logged QEMU command lines never reach the disk
    # (in memory, with the mode and owner the package gave the folders on disk)
    qemu_on_disk, log_on_disk = got["libvirt-on-disk"].split(",")
    assert got["libvirt-qemu"] == f"tmpfs {qemu_on_disk}", got
    assert got["libvirt-log"] == f"tmpfs {log_on_disk}", got


@pytest.mark.parametrize(
    ("label", "loader", "refused"),
    [
        # shim checks GRUB against Debian's key (built into shim) and refuses it
        ("grub-changed", "EFI/BOOT/grubx64.efi", r"Verification failed: \(0x1A\) Security Viol"),
        # the firmware checks shim against the Microsoft UEFI CA in its db and refuses it
        ("shim-changed", "EFI/BOOT/BOOTX64.EFI", r"failed to load Boot\w+ .*: Access Denied"),
    ],
)
def test_secure_boot_refuses_a_boot_loader_changed_on_the_disk(
    label: str, loader: str, refused: str, host_image: Path, run_dir: Path, results_dir: Path
) -> None:
    """Someone with the disk changes one byte of a boot loader on the ESP (which nothing
    protects on the disk): with Secure Boot enforced the firmware or shim refuses to start
    it, and no kernel runs."""
    work = run_dir / f"vm-{label}"
    vm = HostVm(f"edgepin-{label}", host_image, work, firmware="uefi")
    binary = bytearray(disk.esp_file_of(vm.disk, loader, work))
    binary[len(binary) // 2] ^= 0xFF
    disk.write_esp_file(vm.disk, loader, bytes(binary), work)
    out = results_dir / f"host-image-{label}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    vm.start()
    try:
        vm.wait_for(refused, 600)
    finally:
        vm.stop()
        shutil.copy(vm.serial_log, out / "serial.log")
    console = vm.console()
    assert "Linux version" not in console, vm.tail()
    assert "Booting `" not in console, vm.tail()
