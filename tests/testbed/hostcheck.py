"""The host image's check boot: an unenrolled machine booted with a NoCloud seed that holds
the check script (``tests/image/check.sh``) in its meta-data; the QA image's
edgepin-qa-check.service runs it and prints the answers on the serial console. One such
boot per firmware and image-tier session (``checked_boot`` in ``tests/image/conftest.py``):
``test_host_image.py`` checks its answers, and the node tier enrolls its machine with the
PCR values the UEFI boot printed, as a factory does with a reference boot of the model.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from dataclasses import dataclass
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path
from typing import Any

from provisioner.seed import write_nocloud
from tests.testbed.qemuvm import HostVm, VmError
from tests.testbed.swtpm import Swtpm, SwtpmFactory

CHECK = (Path(__file__).resolve().parents[1] / "image" / "check.sh").read_text()


def check_seed(path: Path, instance_id: str = "image-check") -> Path:
    """The check script in meta-data (data, which the QA unit runs); in user-data and
    vendor-data, every kind of part cloud-init can run (a boothook, a shell script, a
    cloud-config's bootcmd, runcmd and write_files), each leaving a file that the check
    counts: the image must run none of them."""

    def ran(what: str) -> str:
        return f"mkdir -p /run/edgepin-qa && touch /run/edgepin-qa/{what}-ran"

    def parts(source: str) -> str:
        msg = MIMEMultipart()
        msg.attach(
            MIMEText(f"#cloud-boothook\n#!/bin/sh\n{ran(source + '-boothook')}\n", "cloud-boothook")
        )
        msg.attach(MIMEText(f"#!/bin/sh\n{ran(source + '-script')}\n", "x-shellscript"))
        config = {
            "bootcmd": [["sh", "-c", ran(source + "-bootcmd")]],
            "runcmd": [["sh", "-c", ran(source + "-runcmd")]],
            "write_files": [{"path": f"/run/edgepin-qa/{source}-write-files-ran", "content": "x"}],
        }
        msg.attach(MIMEText("#cloud-config\n" + json.dumps(config) + "\n", "cloud-config"))
        return msg.as_string()

    check = base64.b64encode(CHECK.encode()).decode()
    write_nocloud(
        path,
        {
            "meta-data": f"instance-id: {instance_id}\nedgepin_qa_check: {check}\n",
            "user-data": parts("user-data"),
            "vendor-data": parts("vendor-data"),
        },
    )
    return path


def checks(vm: HostVm, timeout: float) -> dict[str, str]:
    vm.wait_for(r"EDGEPIN-CHECK-END", timeout)
    found = re.findall(r"EDGEPIN-CHECK (\S+?)=(.*)", vm.console())
    return {k: v.strip() for k, v in found}


# power-on -> kernel -> state partition -> systemd -> cloud-init -> multi-user -> check
TIMELINE = {
    # OVMF prints on the serial port; SeaBIOS does not, so BIOS boots start at GRUB
    "firmware": r"BdsDxe|UEFI|SeaBIOS|GRUB|Booting `",
    "kernel": r"Linux version \d",
    "verity root": r"edgepin: verity: root \S+ opened",
    "state partition": r"edgepin: state partition on /var",
    "systemd": r"systemd\[1\]: .*(Detected|running in system mode)|Welcome to ",
    "cloud-init": r"cloud-init\[\d+\]",
    "multi-user": r"Reached target .*[Mm]ulti-[Uu]ser",
    "check": r"EDGEPIN-CHECK system=",
}


@dataclass(frozen=True)
class CheckedBoot:
    firmware: str
    checks: dict[str, str]
    console: str
    tail: str
    tpm: Swtpm
    out: Path
    report: dict[str, Any]


def check_boot(
    firmware: str, image: Path, tpms: SwtpmFactory, run_dir: Path, results: Path
) -> CheckedBoot:
    """Boot ``image`` on ``firmware`` with the check seed and its own swtpm, up to the check's
    answers; its console and answers are kept in ``results/host-image-<firmware>/``."""
    work = run_dir / f"vm-{firmware}"
    tpm = tpms.create(f"image-{firmware}")
    vm = HostVm(
        f"edgepin-image-{firmware}",
        image,
        work,
        firmware=firmware,
        tpm=tpm,
        seed=check_seed(work / "seed.img"),
        milestones=TIMELINE,
    )
    out = results / f"host-image-{firmware}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    vm.start()
    try:
        try:
            got = checks(vm, timeout=900)
        except VmError:
            shutil.copy(vm.serial_log, out / "serial.log")
            raise
        seconds = vm.seconds_since_start()
    finally:
        vm.stop()
    shutil.copy(vm.serial_log, out / "serial.log")
    report = {
        "firmware": firmware,
        "seconds_to_check": round(seconds, 1),
        "timeline": vm.timeline(),
        "pcrs": got.get("pcrs"),
    }
    # that what the firmware and GRUB measure does not change from boot to boot is shown by
    # the node tier: its second boot (after a slot on trial that did not boot) unseals what
    # its first sealed to PCRs 0, 4, 7, 8 and 9 (test_node_image.py::test_2_...)
    (out / "checks.json").write_text(json.dumps({**report, "checks": got}, indent=2) + "\n")
    console = (out / "serial.log").read_text(errors="replace")
    return CheckedBoot(firmware, got, console, vm.tail(40), tpm, out, report)


def factory_pcrs(boot: CheckedBoot) -> str | None:
    """The PCR values (JSON) the unenrolled node printed for the factory, if it did."""
    said = re.search(r"factory: pcrs (\{[^}]*\})", boot.console)
    return said.group(1) if said else None
