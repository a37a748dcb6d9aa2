"""The one libvirt domain: deterministic XML, pinning, the key as an ephemeral secret.

The same inputs give byte-identical XML. The LUKS passphrase reaches QEMU through an
ephemeral, private libvirt secret set at every start (such secrets do not survive a
libvirtd restart, so libvirt's autostart is not used) and undefined right after the start.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt

from provisioner.errors import GuestError
from provisioner.node.config import NodeConfig
from provisioner.node.model import PCI_ADDRESS, USB_ID, GuestNetwork, pci_matches

LOG = logging.getLogger(__name__)
NAMESPACE = "https://edgepin.dev/xmlns/guest/1"
UUID_NS = uuid.UUID("4d6f2a44-6a1d-4bde-9a38-1f0a2c8b7e10")


@dataclass(frozen=True)
class GuestSpec:
    image_id: str
    generation: int
    disk: Path
    vcpus: int
    memory_mb: int
    network: GuestNetwork | None = None  # what the signed assignment declared
    usb: tuple[str, ...] = ()  # vendor:product ids, as the signed assignment declared
    pci: tuple[str, ...] = ()  # PCI addresses and classes, as the signed assignment declared
    node_id: str = ""  # the node's name: its guest's MAC address is derived from it


def secret_uuid(spec: GuestSpec) -> str:
    return str(uuid.uuid5(UUID_NS, f"secret:{spec.image_id}"))


def guest_cpus(cfg: NodeConfig, host_cpus: list[int], vcpus: int) -> list[int]:
    """The host CPUs for the guest's vCPUs: the online ones not reserved for the host."""
    free = [c for c in host_cpus if c not in cfg.reserved_cpus]
    if vcpus > len(free):
        raise GuestError(
            f"image wants {vcpus} vCPUs; this host has {len(free)} CPUs for guests "
            f"({len(host_cpus)} online, reserved {sorted(cfg.reserved_cpus)})"
        )
    return free[:vcpus]


def attachment(cfg: NodeConfig, declared: GuestNetwork | None) -> tuple[str, str] | None:
    """The libvirt attachment (``bridge``/``network``, name) of a guest that declared
    ``declared``, or None for no network device; GuestError for an image that needs a
    network this node was built without."""
    if declared == GuestNetwork.NONE:
        return None
    if declared == GuestNetwork.HOST:
        if cfg.host_network == "none":
            raise GuestError(
                "the image needs the network with the host (host); this node has none "
                "(EDGEPIN_HOST_NETWORK=none)"
            )
        kind, name = cfg.host_network.split(":", 1)
        return kind, name
    if cfg.network == "none":
        if declared is not None:
            raise GuestError(
                f"the image needs the site's network ({declared}); this node has no guest "
                "attachment (EDGEPIN_NETWORK=none)"
            )
        return None
    kind, name = cfg.network.split(":", 1)
    return kind, name


def usb_present(root: Path) -> tuple[str, ...]:
    """The vendor:product ids of the USB devices plugged into this host (sysfs under
    ``root``), sorted, each once; hubs included."""
    found = set()
    for dev in (root / "sys" / "bus" / "usb" / "devices").glob("*"):
        try:
            vendor = (dev / "idVendor").read_text().strip()
            product = (dev / "idProduct").read_text().strip()
        except OSError:
            continue  # an interface, not a device
        ident = f"{vendor}:{product}".lower()
        if USB_ID.fullmatch(ident):
            found.add(ident)
    return tuple(sorted(found))


def pci_present(root: Path) -> dict[str, str]:
    """The PCI devices of this host (sysfs under ``root``): address -> class, six hex
    digits (class, subclass, programming interface), as ``lspci -Dn`` prints them."""
    found = {}
    for dev in (root / "sys" / "bus" / "pci" / "devices").glob("*"):
        try:
            code = (dev / "class").read_text().strip().lower()
        except OSError:
            continue
        if PCI_ADDRESS.fullmatch(dev.name) and re.fullmatch(r"0x[0-9a-f]{6}", code):
            found[dev.name] = code[2:]
    return dict(sorted(found.items()))


def pci_in_use(root: Path) -> frozenset[str]:
    """The PCI devices the host itself uses: every device on the way to one of its disks
    (``/sys/block``) or to a network interface that is up, bridges included."""
    used: set[str] = set()
    sys = root / "sys"
    links = [b / "device" for b in (sys / "block").glob("*")]
    for net in (sys / "class" / "net").glob("*"):
        try:
            if (net / "operstate").read_text().strip() == "up":
                links.append(net / "device")
        except OSError:
            continue
    for link in links:
        try:
            path = link.resolve(strict=True)
        except OSError:
            continue
        used.update(p for p in path.parts if PCI_ADDRESS.fullmatch(p))
    return frozenset(used)


def pci_free(root: Path) -> dict[str, str]:
    """The PCI devices a guest may be given: this host's, but those it uses."""
    in_use = pci_in_use(root)
    return {a: c for a, c in pci_present(root).items() if a not in in_use}


def pci_chosen(cfg: NodeConfig, wanted: tuple[str, ...]) -> tuple[str, ...]:
    """The address of the one device each selector names, in the order asked, among the
    devices the host does not use (:func:`pci_in_use`); GuestError for a device this host
    does not have or uses, a class more than one free device has (the image must name one
    by address: a class is never a guess) or one device asked for twice."""
    if not wanted:
        return ()
    present = pci_present(cfg.root)
    in_use = pci_in_use(cfg.root)
    free = {a: c for a, c in present.items() if a not in in_use}
    chosen: list[str] = []
    for selector in wanted:
        matches = pci_matches(selector, free)
        if not matches:
            used = pci_matches(selector, present)
            raise GuestError(
                f"the image needs PCI device {selector}, which the host uses "
                f"({', '.join(used[:8])}: one of its disks, a network interface that is up, "
                "or a bridge on the way to them)"
                if used
                else f"the image needs PCI device {selector}, which this node does not have",
                present=",".join(f"{a}={c}" for a, c in free.items())[:300],
            )
        if len(matches) > 1:
            raise GuestError(
                f"the image needs PCI device {selector}, and this node has {len(matches)} "
                f"({', '.join(matches[:8])}): the image must name one by its address"
            )
        if matches[0] in chosen:
            raise GuestError(f"the image names PCI device {matches[0]} twice")
        chosen.append(matches[0])
    return tuple(chosen)


def check_usb(cfg: NodeConfig, wanted: tuple[str, ...]) -> None:
    """GuestError naming each USB device the image asks for that this host does not have."""
    if not wanted:
        return
    present = usb_present(cfg.root)
    missing = [u for u in wanted if u not in present]
    if missing:
        raise GuestError(
            f"the image needs USB device {', '.join(missing)}, which this node does not have",
            present=",".join(present)[:200],
        )


def guest_mac(node_id: str) -> str:
    """A locally administered MAC address for the guest, the same at every start of any
    image on this node (its DHCP lease and the site's view of it stay), different from
    node to node (every node names its one domain alike)."""
    digest = uuid.uuid5(UUID_NS, f"mac:{node_id}").bytes
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def build_xml(cfg: NodeConfig, spec: GuestSpec, host_cpus: list[int]) -> str:
    pins = guest_cpus(cfg, host_cpus, spec.vcpus)
    host_side = sorted(c for c in host_cpus if c in cfg.reserved_cpus) or pins
    dom = ET.Element("domain", {"type": cfg.virt_type})
    ET.SubElement(dom, "name").text = cfg.domain_name
    # one domain per node, whatever image it runs: the UUID follows the name
    ET.SubElement(dom, "uuid").text = str(uuid.uuid5(UUID_NS, f"domain:{cfg.domain_name}"))
    meta = ET.SubElement(dom, "metadata")
    guest = ET.SubElement(meta, f"{{{NAMESPACE}}}guest")
    ET.SubElement(guest, f"{{{NAMESPACE}}}image").text = spec.image_id
    ET.SubElement(guest, f"{{{NAMESPACE}}}generation").text = str(spec.generation)
    ET.SubElement(dom, "memory", {"unit": "MiB"}).text = str(spec.memory_mb)
    ET.SubElement(dom, "vcpu", {"placement": "static"}).text = str(spec.vcpus)
    tune = ET.SubElement(dom, "cputune")
    for i, cpu in enumerate(pins):
        ET.SubElement(tune, "vcpupin", {"vcpu": str(i), "cpuset": str(cpu)})
    ET.SubElement(tune, "emulatorpin", {"cpuset": ",".join(str(c) for c in host_side)})
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", {"arch": "x86_64", "machine": "pc"}).text = "hvm"
    ET.SubElement(os_el, "boot", {"dev": "hd"})
    # the firmware's console on the serial port too (QEMU's -machine graphics=off): what a
    # boot loader or firmware-level guest writes there reaches the serial log
    ET.SubElement(os_el, "bios", {"useserial": "yes"})
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = "restart"
    ET.SubElement(dom, "on_crash").text = "destroy"
    dev = ET.SubElement(dom, "devices")
    disk = ET.SubElement(dev, "disk", {"type": "file", "device": "disk"})
    ET.SubElement(disk, "driver", {"name": "qemu", "type": "qcow2", "cache": "none"})
    src = ET.SubElement(disk, "source", {"file": str(spec.disk)})
    enc = ET.SubElement(src, "encryption", {"format": "luks"})
    ET.SubElement(enc, "secret", {"type": "passphrase", "uuid": secret_uuid(spec)})
    ET.SubElement(disk, "target", {"dev": "vda", "bus": "virtio"})
    attach = attachment(cfg, spec.network)
    if attach is not None:
        kind, name = attach
        iface = ET.SubElement(dev, "interface", {"type": kind})
        ET.SubElement(iface, "mac", {"address": guest_mac(spec.node_id)})
        ET.SubElement(iface, "source", {kind: name})
        if spec.network is not None and spec.network.vlan is not None:
            # the guest's port is an untagged member of this VLAN only: the bridge tags its
            # frames on the uplink and lets no other VLAN's frames reach it
            vlan = ET.SubElement(iface, "vlan")
            ET.SubElement(vlan, "tag", {"id": str(spec.network.vlan)})
        ET.SubElement(iface, "model", {"type": "virtio"})
    for ident in spec.usb:
        vendor, product = ident.split(":")
        hostdev = ET.SubElement(
            dev, "hostdev", {"mode": "subsystem", "type": "usb", "managed": "yes"}
        )
        source = ET.SubElement(hostdev, "source")
        ET.SubElement(source, "vendor", {"id": f"0x{vendor}"})
        ET.SubElement(source, "product", {"id": f"0x{product}"})
    for address in pci_chosen(cfg, spec.pci):
        # managed: libvirt detaches the device from the host's driver (binding it to
        # vfio-pci) while the guest runs, and gives it back after
        dom_, bus, slot_fn = address.split(":")
        slot, function = slot_fn.split(".")
        hostdev = ET.SubElement(
            dev, "hostdev", {"mode": "subsystem", "type": "pci", "managed": "yes"}
        )
        source = ET.SubElement(hostdev, "source")
        ET.SubElement(
            source,
            "address",
            {
                "domain": f"0x{dom_}",
                "bus": f"0x{bus}",
                "slot": f"0x{slot}",
                "function": f"0x{function}",
            },
        )
    serial = ET.SubElement(dev, "serial", {"type": "pty"})
    ET.SubElement(serial, "log", {"file": str(cfg.serial_log), "append": "off"})
    ET.SubElement(serial, "target", {"port": "0"})
    console = ET.SubElement(dev, "console", {"type": "pty"})
    ET.SubElement(console, "target", {"type": "serial", "port": "0"})
    ET.SubElement(dev, "memballoon", {"model": "none"})
    ET.register_namespace("edgepin", NAMESPACE)
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode") + "\n"


def _secret_xml(spec: GuestSpec) -> str:
    sec = ET.Element("secret", {"ephemeral": "yes", "private": "yes"})
    ET.SubElement(sec, "uuid").text = secret_uuid(spec)
    ET.SubElement(sec, "description").text = f"edgepin key of image {spec.image_id}"
    return ET.tostring(sec, encoding="unicode")


def _quiet(_ctx: Any, _err: Any) -> None:
    """libvirt prints every error on stderr by default; edgepin reports them itself."""


def connect(cfg: NodeConfig) -> Any:
    libvirt.registerErrorHandler(_quiet, None)
    try:
        return libvirt.open(cfg.libvirt_uri)
    except libvirt.libvirtError as e:
        raise GuestError(f"libvirt unreachable at {cfg.libvirt_uri}: {e}") from None


def host_cpus(conn: Any) -> list[int]:
    _n, cpumap, _online = conn.getCPUMap()
    return [i for i, online in enumerate(cpumap) if online]


def host_memory_mb(conn: Any) -> int:
    return int(conn.getInfo()[1])


def remove_others(cfg: NodeConfig, conn: Any) -> list[str]:
    """Destroy and undefine every domain that is not edgepin's one guest."""
    removed = []
    for dom in conn.listAllDomains():
        name = dom.name()
        if name == cfg.domain_name:
            continue
        try:
            if dom.isActive():
                dom.destroy()
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise GuestError(f"cannot remove foreign domain {name!r}: {e}") from None
            # it went away by itself between the listing and here: what was wanted
        LOG.warning("domain: removed foreign domain %r", name)
        removed.append(name)
    return removed


def current(cfg: NodeConfig, conn: Any) -> tuple[Any | None, str | None]:
    """The edgepin domain (if defined) and the image id in its metadata."""
    try:
        dom = conn.lookupByName(cfg.domain_name)
    except libvirt.libvirtError:
        return None, None
    root = ET.fromstring(dom.XMLDesc(0))  # noqa: S314 - from our own libvirtd
    image = root.find(f"metadata/{{{NAMESPACE}}}guest/{{{NAMESPACE}}}image")
    return dom, image.text if image is not None else None


def stop(cfg: NodeConfig, conn: Any) -> None:
    dom, _ = current(cfg, conn)
    if dom is None:
        return
    try:
        if dom.isActive():
            dom.destroy()
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
    except libvirt.libvirtError as e:
        raise GuestError(f"cannot stop the guest: {e}") from None


def check_fits(
    cfg: NodeConfig,
    conn: Any,
    vcpus: int,
    memory_mb: int,
    network: GuestNetwork | None = None,
    usb: tuple[str, ...] = (),
    pci: tuple[str, ...] = (),
) -> None:
    """Refuse, before any download, a guest this host cannot run."""
    attachment(cfg, network)
    check_usb(cfg, usb)
    pci_chosen(cfg, pci)
    guest_cpus(cfg, host_cpus(conn), vcpus)
    if memory_mb > host_memory_mb(conn):
        raise GuestError(f"image wants {memory_mb} MiB; the host has {host_memory_mb(conn)} MiB")


def start(cfg: NodeConfig, conn: Any, spec: GuestSpec, passphrase: bytes) -> Any:
    """Define the domain from the XML, hand QEMU the key, start it."""
    check_fits(cfg, conn, spec.vcpus, spec.memory_mb, spec.network, spec.usb, spec.pci)
    xml = build_xml(cfg, spec, host_cpus(conn))
    dom, _ = current(cfg, conn)
    if dom is not None and dom.isActive():
        dom.destroy()
    cfg.serial_log.parent.mkdir(parents=True, exist_ok=True)
    try:
        dom = conn.defineXML(xml)
    except libvirt.libvirtError as e:
        raise GuestError(f"libvirt refused the domain: {e}") from None
    secret = None
    try:
        try:
            old = conn.secretLookupByUUIDString(secret_uuid(spec))
            old.undefine()
        except libvirt.libvirtError:
            pass
        secret = conn.secretDefineXML(_secret_xml(spec))
        secret.setValue(passphrase)
        dom.create()
    except libvirt.libvirtError as e:
        raise GuestError(f"the guest did not start: {e}") from None
    finally:
        if secret is not None:
            try:
                secret.undefine()  # QEMU has the key now; libvirt need not keep it
            except libvirt.libvirtError:
                pass
    given = passed_through(xml)
    if given:
        LOG.info("guest %s has the host's %s", spec.image_id, ", ".join(given))
    return dom


def passed_through(xml: str) -> list[str]:
    """The host devices a domain's XML gives its guest, as ``PCI 0000:00:04.0`` and ``USB
    0627:0001``, in the XML's order."""
    given = []
    for hostdev in ET.fromstring(xml).iter("hostdev"):  # noqa: S314 - build_xml's own
        source = hostdev.find("source")
        if source is None:
            continue
        if hostdev.get("type") == "pci" and (a := source.find("address")) is not None:
            parts = [a.get(k, "0x0")[2:] for k in ("domain", "bus", "slot", "function")]
            d, b, s, f = (int(x, 16) for x in parts)
            given.append(f"PCI {d:04x}:{b:02x}:{s:02x}.{f:x}")
        elif hostdev.get("type") == "usb":
            v, p = source.find("vendor"), source.find("product")
            if v is not None and p is not None:
                given.append(f"USB {v.get('id', '')[2:]}:{p.get('id', '')[2:]}")
    return given


def running(cfg: NodeConfig, conn: Any, image_id: str | None = None) -> bool:
    dom, current_image = current(cfg, conn)
    if dom is None or (image_id and current_image != image_id):
        return False
    state, _reason = dom.state()
    return bool(state == libvirt.VIR_DOMAIN_RUNNING)


def healthy(
    cfg: NodeConfig, conn: Any, image_id: str, marker: str | None, timeout: float
) -> tuple[bool, str]:
    """Running for the whole settle time, and the marker seen when the image declares one."""
    deadline = time.monotonic() + timeout
    settle = min(5.0, timeout)
    started = time.monotonic()
    while True:
        if not running(cfg, conn, image_id):
            return False, "guest is not running"
        seen = marker is None or _marker_seen(cfg.serial_log, marker)
        if seen and time.monotonic() - started >= settle:
            return True, "running" + (
                f" and reported healthy ({marker!r} on its console)" if marker else ""
            )
        if time.monotonic() > deadline:
            return False, f"no health signal {marker!r} within {timeout:.0f}s"
        time.sleep(0.5)


def _marker_seen(log: Path, marker: str) -> bool:
    try:
        return marker.encode() in log.read_bytes()
    except FileNotFoundError:
        return False
