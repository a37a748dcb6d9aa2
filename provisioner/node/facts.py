"""What the node is, for placement: CPUs, memory, free disk for images, CPU model and flags,
host OS and edgepin's version, the USB devices plugged in. Read at every reconcile (cheap:
two libvirt calls, two small files, a statvfs and the USB devices' ids in sysfs) and sent
in the node's report when it changed (:mod:`provisioner.nodereport`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import libvirt

from provisioner import __version__, nodereport
from provisioner.errors import HostSlotError
from provisioner.node import domain, hostfetch, hostslot, policy
from provisioner.node.config import NodeConfig

LOG = logging.getLogger(__name__)
CPUINFO = Path("/proc/cpuinfo")


def cpu_model_and_flags(cpuinfo: str) -> tuple[str, tuple[str, ...]]:
    """The first processor's model name and flags, as ``/proc/cpuinfo`` gives them (x86:
    ``model name`` and ``flags``; other architectures: ``CPU part``/``Features``)."""
    model, flags = "", ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "cpu model", "CPU part") and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = value
        if not line.strip() and model and flags:
            break
    names = {f for f in flags.split() if nodereport.FLAG.fullmatch(f)}
    return (
        nodereport.clean_text(model, nodereport.TEXT_SIZE) or "unknown",
        tuple(sorted(names))[: nodereport.MAX_FLAGS],
    )


def os_release(root: Path) -> str:
    """The host OS's PRETTY_NAME from os-release under ``root``; "unknown" without one."""
    for path in (root / "etc" / "os-release", root / "usr" / "lib" / "os-release"):
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            key, _, value = line.partition("=")
            if key.strip() == "PRETTY_NAME":
                text = value.strip().strip('"').strip("'")
                return nodereport.clean_text(text, nodereport.TEXT_SIZE) or "unknown"
    return "unknown"


def disk_free_mb(path: Path) -> int:
    """Free space for an unprivileged writer at ``path`` (its nearest existing folder), MiB,
    rounded down to :data:`nodereport.DISK_QUANTUM_MB`."""
    while not path.exists() and path != path.parent:
        path = path.parent
    st = os.statvfs(path)
    mb = st.f_bavail * st.f_frsize // 2**20
    return mb - mb % nodereport.DISK_QUANTUM_MB


def gather(cfg: NodeConfig, conn: Any, local_images: list[str]) -> nodereport.Facts | None:
    """The node's facts; None (logged) when libvirt or the system cannot say."""
    try:
        online = domain.host_cpus(conn)
        memory = domain.host_memory_mb(conn)
        cpuinfo = CPUINFO.read_text(errors="replace")
        free = disk_free_mb(cfg.images_dir)
    except (libvirt.libvirtError, OSError) as e:
        LOG.warning("report: the node's facts cannot be read: %s", e)
        return None
    model, flags = cpu_model_and_flags(cpuinfo)
    return nodereport.Facts(
        cpus=len(online),
        guest_cpus=len([c for c in online if c not in cfg.reserved_cpus]),
        memory_mb=memory,
        disk_free_mb=free,
        cpu_model=model,
        cpu_flags=flags,
        host=os_release(cfg.root),
        kernel=nodereport.clean_text(os.uname().release, nodereport.TEXT_SIZE),
        virt_type=cfg.virt_type,
        edgepin_version=__version__,
        local_images=tuple(sorted(set(local_images)))[: nodereport.MAX_LOCAL_IMAGES],
        usb=domain.usb_present(cfg.root)[: nodereport.MAX_USB_DEVICES],
        pci=tuple(f"{a}={c}" for a, c in domain.pci_free(cfg.root).items())[
            : nodereport.MAX_PCI_DEVICES
        ],
        host_version=cfg.host_version,
        **host_slot_facts(cfg),
        host_watchdog=watchdog(cfg),
        host_epoch=cfg.host_epoch,
        host_floor=policy.host_floor(cfg),
    )


def watchdog(cfg: NodeConfig) -> str:
    """The hardware watchdog systemd keeps armed (``/sys/class/watchdog/watchdog0``), as
    "<driver>, <timeout> s"; "" when there is none or it is not armed."""
    base = cfg.root / "sys" / "class" / "watchdog" / "watchdog0"
    try:
        armed = (base / "state").read_text().strip() == "active"
        identity = (base / "identity").read_text().strip()
        timeout = int((base / "timeout").read_text().strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return ""
    if not armed:
        return ""
    return nodereport.clean_text(f"{identity}, {timeout} s", nodereport.TEXT_SIZE)


def host_slot_facts(cfg: NodeConfig) -> dict[str, Any]:
    """The root slot the host booted from and the version of an update the node came
    back from (provisioner.node.hostslot); nothing on a host without root slots."""
    try:
        cmdline = hostslot.Layout.of(cfg).cmdline.read_text()
        record = hostslot.pending(cfg)
    except FileNotFoundError:
        return {}  # no kernel command line under the node's root: a development machine
    except (OSError, HostSlotError) as e:
        LOG.warning("report: the host's root slot cannot be read: %s", e)
        return {}
    try:
        armed = hostslot.read_slots(hostslot.Layout.of(cfg)).armed
    except HostSlotError:
        armed = False
    refused = hostfetch.refused(cfg)
    return {
        "host_slot": hostslot.booted_slot(cmdline) or "",
        "host_fallback": record.host_version if record and record.fell_back else 0,
        "host_next": record.host_version if record and armed else 0,
        "host_refused": nodereport.clean_text(refused[2], nodereport.MAX_REASON) if refused else "",
    }
