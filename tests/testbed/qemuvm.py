"""Boot the built host image in QEMU, like a field node: its own swtpm, a NoCloud seed,
user networking that reaches the host's loopback as 10.0.2.2, and the serial console
captured to a file.

Software emulation (TCG) unless KVM is asked for: on this machine /dev/kvm exists but
does not work (../shared/MACHINE-NOTES.md), so its presence decides nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.testbed.process import stop_group
from tests.testbed.swtpm import Swtpm

# OVMF with Secure Boot enforced: the build with SMM (so that only the firmware writes
# its authenticated variables) and a variable store with Microsoft's keys enrolled, as
# on a PC off the shelf; shim, signed with Microsoft's UEFI CA, is what it starts
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd")
# the same firmware with Secure Boot off (the build without it, and a variable store
# with no keys): what someone with the machine gets by turning Secure Boot off in the
# firmware's setup or flashing other firmware; a node booted so measures another PCR 7
# (and PCR 0)
INSECURE_OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
INSECURE_OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
FIRMWARE = {
    "uefi": (OVMF_CODE, OVMF_VARS),
    "uefi-insecure": (INSECURE_OVMF_CODE, INSECURE_OVMF_VARS),
}

# The whole image tier's wall-clock budget, counted from the first boot: software
# emulation is slow and a hung boot must not eat CI's limit. Every wait is cut to it.
BUDGET_SECONDS = float(os.environ.get("EDGEPIN_IMAGE_TIER_BUDGET", "4500"))
# what a node prints on its console when its seed is bound to other PCR values than it
# measures: the factory reads them there (the node has no login) and enrolls it again
PCR_VALUES_SAID = r"PCR values: (\{[^}\r\n]*\})"
_first_boot: float | None = None


def budget_left() -> float:
    if _first_boot is None:
        return BUDGET_SECONDS
    return BUDGET_SECONDS - (time.monotonic() - _first_boot)


# what a guest kernel in trouble prints: the test says so instead of timing out
PANIC = re.compile(r"Kernel panic|Oops: |BUG: unable to handle|end Kernel panic")


class VmError(AssertionError):
    """A boot that did not reach what the test waited for; carries the console's tail."""


@dataclass
class HostVm:
    name: str
    image: Path
    workdir: Path
    # "uefi" (OVMF, Secure Boot enforced), "uefi-insecure" (OVMF, Secure Boot off) or
    # "bios" (SeaBIOS)
    firmware: str = "uefi"
    tpm: Swtpm | None = None
    seed: Path | None = None
    disk_size: str = "4G"
    memory_mb: int = 2048
    cpus: int = 2
    accel: str = field(default_factory=lambda: os.environ.get("EDGEPIN_QEMU_ACCEL", "tcg"))
    # QEMU user networking: the guest reaches the host's loopback as 10.0.2.2;
    # "user,id=n0,restrict=on" cuts the node off (the control plane out of reach)
    netdev: str = "user,id=n0"
    # False: no network card at all (a site without a network)
    nic: bool = True
    # True: a reboot restarts the machine (the firmware, the TPM reset) instead of ending
    # QEMU, which is what a reboot does otherwise (-no-reboot)
    reboot: bool = False
    # more read-only media (raw filesystem images, e.g. a USB stick's), in this order
    media: list[Path] = field(default_factory=list)
    append_args: list[str] = field(default_factory=list)
    # milestones on the console (name -> regex); wait_for notes when each first shows
    milestones: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    # how many times this machine was started (the serial log and stderr are per boot)
    boots: int = 0
    boot_started: float = 0.0
    seen: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.disk = self.workdir / "disk.qcow2"
        if not self.disk.exists():
            # an overlay: the built image is never written; the state partition grows
            # into the larger virtual disk on first boot
            subprocess.run(
                [
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-F",
                    "qcow2",
                    "-b",
                    str(self.image.resolve()),
                    str(self.disk),
                    self.disk_size,
                ],
                check=True,
            )

    @property
    def vars(self) -> Path:
        """The machine's own UEFI variable store, one per firmware build."""
        return self.workdir / f"VARS-{self.firmware}.fd"

    @property
    def serial_log(self) -> Path:
        return self.workdir / f"serial-boot{self.boots}.log"

    def command(self) -> list[str]:
        cmd = [
            "qemu-system-x86_64",
            "-name",
            self.name,
            "-machine",
            "q35",
            # the ICH9's TCO watchdog may reset the machine, as on a board whose firmware
            # clears its no-reboot strap: the host image's systemd arms it (iTCO_wdt)
            "-global",
            "ICH9-LPC.noreboot=off",
            "-accel",
            self.accel,
            "-m",
            str(self.memory_mb),
            "-smp",
            str(self.cpus),
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            f"file:{self.serial_log}",
            "-drive",
            f"file={self.disk},if=virtio,format=qcow2,cache=unsafe",
            *(["-netdev", self.netdev, "-device", "virtio-net-pci,netdev=n0"] if self.nic else []),
            *(["-nic", "none"] if not self.nic else []),
            *([] if self.reboot else ["-no-reboot"]),
        ]
        if self.accel == "tcg":
            # one thread for all vCPUs: with multi-threaded TCG (QEMU 7.2), a vCPU kept
            # running code another vCPU had just patched, and the node's kernel stopped with
            # "Oops: int3" whenever it flipped a static key (a boot now and then; a port
            # joining br0, a guest starting: most of the time); docs/testbed.md
            cmd[cmd.index("-accel") + 1] = "tcg,thread=single"
            cmd += ["-cpu", "max"]
        if self.firmware in FIRMWARE:
            code, template = FIRMWARE[self.firmware]
            if not self.vars.exists():
                shutil.copyfile(template, self.vars)
            cmd[cmd.index("-machine") + 1] = "q35,smm=on"
            cmd += [
                # the firmware's flash is writable only from SMM: the booted OS cannot
                # change the Secure Boot variables behind the firmware's back
                "-global",
                "driver=cfi.pflash01,property=secure,value=on",
                "-drive",
                f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
                "-drive",
                f"if=pflash,format=raw,unit=1,file={self.vars}",
            ]
        if self.seed is not None:
            cmd += ["-drive", f"file={self.seed},if=virtio,format=raw,readonly=on"]
        for medium in self.media:
            cmd += ["-drive", f"file={medium},if=virtio,format=raw,readonly=on"]
        if self.tpm is not None:
            sock = self.tpm.start_for_qemu()
            cmd += [
                "-chardev",
                f"socket,id=chrtpm,path={sock}",
                "-tpmdev",
                "emulator,id=tpm0,chardev=chrtpm",
                "-device",
                "tpm-tis,tpmdev=tpm0",
            ]
        return cmd + self.append_args

    def start(self) -> None:
        global _first_boot
        if _first_boot is None:
            _first_boot = time.monotonic()
        self.seen = {}
        self.boots += 1
        self.serial_log.unlink(missing_ok=True)
        self.serial_log.touch()
        stderr = (self.workdir / f"qemu-boot{self.boots}.stderr").open("wb")
        self.boot_started = time.monotonic()
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            start_new_session=True,
        )

    def console(self) -> str:
        return self.serial_log.read_text(errors="replace")

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.console().splitlines()[-lines:])

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait for a regex on the serial console; fail with the console's tail."""
        rx = re.compile(pattern)
        left = budget_left()
        if left < timeout:
            timeout = max(left, 30.0)
            why = f"the image tier's budget (EDGEPIN_IMAGE_TIER_BUDGET={BUDGET_SECONDS:.0f} s)"
        else:
            why = "the test's limit"
        deadline = time.monotonic() + timeout
        while True:
            text = self.console()
            for name, mrx in self.milestones.items():
                if name not in self.seen and re.search(mrx, text):
                    self.seen[name] = round(self.seconds_since_start(), 1)
            m = rx.search(text)
            if m:
                return m
            panic = PANIC.search(text)
            if panic:
                raise VmError(
                    f"{self.name}: the host kernel panicked (boot {self.boots}):\n{self.tail()}"
                )
            if self.proc is not None and self.proc.poll() is not None:
                raise VmError(
                    f"{self.name}: QEMU exited ({self.proc.returncode}) before /{pattern}/ "
                    f"(boot {self.boots}):\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise VmError(
                    f"{self.name}: no /{pattern}/ on the console within {timeout:.0f} s, "
                    f"{why} "
                    f"(boot {self.boots}):\n{self.tail()}"
                )
            time.sleep(0.5)

    def timeline(self) -> dict[str, float | None]:
        """Seconds from power-on to each milestone (sampled every 0.5 s), None if unseen."""
        return {name: self.seen.get(name) for name in self.milestones}

    def seconds_since_start(self) -> float:
        return time.monotonic() - self.boot_started

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            stop_group(self.proc.pid, 10.0)
            self.proc.poll()  # stop_group reaped it: Popen learns that it is gone
        self.proc = None
        if self.tpm is not None:
            self.tpm.stop()
