"""The node's model: what it keeps, what it is told, what it reports.

Closed sets are enums, records are frozen dataclasses. What comes from outside (the
control plane's assignment and image properties) is read by a strict parser here, which
returns a typed value or raises edgepin's own error: the assignment's in
:mod:`provisioner.assignment`, the ledger's (what comes from the node's disk) in
:mod:`provisioner.node.ledger`.
"""

from __future__ import annotations

import enum
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from provisioner.errors import ImageError

MAX_GENERATION = 2**63 - 1
IMAGE_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
MAX_VCPUS = 512
MEMORY_MB = (16, 4 * 1024 * 1024)
VERSION_SIZE = 64
ASSIGNMENT_ATTR = "edgepin_assignment"  # the node project's attribute the operator writes
# the node project's attribute that names the node's report image (provisioner/nodereport.py)
REPORT_IMAGE_ATTR = "edgepin_report_image"


class State(enum.StrEnum):
    """What a reconcile ends in: exactly one, in the status and in ``edgepin_state``."""

    RUNNING = "running"  # the assigned guest runs
    OFFLINE = "offline"  # the control plane cannot be asked; the local copy runs
    REFUSED = "refused"  # the assignment was refused; the current guest (if any) runs
    FAILED = "failed"  # no guest runs although one should
    ROLLED_BACK = "rolled-back"  # the new guest was not healthy; the previous one runs
    WAITING = "waiting"  # enrolled, nothing assigned yet
    DISABLED = "disabled"  # /etc/edgepin/disabled exists
    UNENROLLED = "unenrolled"
    REVOKED = "revoked"  # keystone has refused the node past the grace period: keys destroyed


NETWORK_FORMS = "lan, none, host or vlan:N (N from 1 to 4094)"
_NETWORK = re.compile(r"lan|none|host|vlan:([1-9][0-9]{0,3})")


class GuestNetwork(str):
    """The network an image declares it needs (``edgepin publish --network``), signed into
    each assignment of it by ``edgepin assign``; an image that declares none gets the
    node's guest attachment (``EDGEPIN_NETWORK``), if it has one.

    ``lan``: the site's network, through the node's guest attachment; ``vlan:N``: the
    same, with the guest's frames in VLAN N (tagged on the uplink, untagged for the guest);
    ``host``: a network with only the host on it (``EDGEPIN_HOST_NETWORK``); ``none``: no
    network device. Text, so that it is stored and signed as it is written; constructing
    one checks it (ImageError)."""

    __slots__ = ()
    LAN: ClassVar[GuestNetwork]
    NONE: ClassVar[GuestNetwork]
    HOST: ClassVar[GuestNetwork]

    def __new__(cls, value: object) -> GuestNetwork:
        m = _NETWORK.fullmatch(value) if isinstance(value, str) else None
        if m is None or (m.group(1) is not None and int(m.group(1)) > 4094):
            raise ImageError(f"the declared guest network is not one of {NETWORK_FORMS}")
        return super().__new__(cls, value)

    @property
    def vlan(self) -> int | None:
        """The VLAN id of ``vlan:N``, else None."""
        return int(self[5:]) if self.startswith("vlan:") else None

    @property
    def site(self) -> bool:
        """Whether it needs the site's network (``lan`` or a VLAN on it)."""
        return self == "lan" or self.vlan is not None


GuestNetwork.LAN = GuestNetwork("lan")
GuestNetwork.NONE = GuestNetwork("none")
GuestNetwork.HOST = GuestNetwork("host")

NETWORK_PROPERTY = "edgepin_network"  # the Glance property the operator's tools read


def guest_network(value: Any) -> GuestNetwork | None:
    """A declared network (absent: None), or ImageError."""
    if value is None:
        return None
    return GuestNetwork(value)


USB_ID = re.compile(r"[0-9a-f]{4}:[0-9a-f]{4}")  # vendor:product, as lsusb prints them
MAX_USB = 16  # devices one image may ask for
USB_PROPERTY = "edgepin_usb"  # the Glance property: comma-separated vendor:product ids


def _declared(
    value: Any, limit: int, what: str, valid: re.Pattern[str], form: str
) -> tuple[str, ...]:
    """Devices an image declares, sorted and each once, lowercase: from a list (the signed
    assignment) or comma-separated text (the Glance property); none: (). ImageError."""
    if value is None or value == "" or value == []:
        return ()
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or len(items) > limit:
        raise ImageError(f"the declared {what} devices are not a list of at most {limit}")
    found = set()
    for item in items:
        text = item.strip().lower() if isinstance(item, str) else None
        if text is None or not valid.fullmatch(text):
            raise ImageError(f"a declared {what} device is not {form}")
        found.add(text)
    return tuple(sorted(found))


def usb_ids(value: Any) -> tuple[str, ...]:
    """The USB devices an image asks for (vendor:product ids), as :func:`_declared` reads
    them."""
    return _declared(value, MAX_USB, "USB", USB_ID, "vendor:product in hex (such as 0627:0001)")


PCI_ADDRESS = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-1][0-9a-f]\.[0-7]")  # domain:bus:slot.fn
PCI_CLASS = re.compile(r"class:[0-9a-f]{4}(?:[0-9a-f]{2})?")  # class+subclass[+prog-if]
PCI_SELECTOR = re.compile(f"{PCI_ADDRESS.pattern}|{PCI_CLASS.pattern}")
MAX_PCI = 8  # devices one image may ask for
PCI_PROPERTY = "edgepin_pci"  # the Glance property: comma-separated selectors


def pci_selectors(value: Any) -> tuple[str, ...]:
    """The PCI devices an image asks for, as :func:`_declared` reads them: an address
    (``0000:03:00.0``, as lspci -D prints it) or a class (``class:0c03``: class and
    subclass, or with the programming interface, ``class:0c0330``)."""
    return _declared(
        value,
        MAX_PCI,
        "PCI",
        PCI_SELECTOR,
        "an address (such as 0000:03:00.0) or a class (such as class:0c03)",
    )


PCI_FACT = re.compile(r"([0-9a-f]{4}:[0-9a-f]{2}:[0-1][0-9a-f]\.[0-7])=([0-9a-f]{6})")


def pci_matches(selector: str, present: dict[str, str]) -> list[str]:
    """The addresses of the devices in ``present`` (address -> six-digit class) that
    ``selector`` (an address, or ``class:`` and a class prefix) names."""
    if selector.startswith("class:"):
        code = selector[len("class:") :]
        return [a for a, c in sorted(present.items()) if c.startswith(code)]
    return [selector] if selector in present else []


class MemberStatus(enum.StrEnum):
    """What the node tells Glance about an image shared with it."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"


@dataclass(frozen=True)
class Assignment:
    """The operator's choice for this node, as signed: one image (and its sha512), at a
    generation that only goes up. Read by :func:`provisioner.assignment.verify`."""

    image_id: str
    generation: int
    image_sha512: str
    assigned_at: str
    network: GuestNetwork | None = None
    usb: tuple[str, ...] = ()  # vendor:product ids the guest is given
    # the vCPUs, memory and health marker the image asks for, as signed; None in a record
    # signed by an edgepin that did not sign them (the image's properties then decide)
    resources: GuestResources | None = None
    pci: tuple[str, ...] = ()  # PCI selectors (addresses, classes) the guest is given


@dataclass(frozen=True)
class GuestResources:
    """What an image asks of the node besides its network and devices: vCPUs, memory and the
    line that shows it healthy. Read from the image's properties by ``edgepin assign`` and
    signed into the assignment; the node takes them from there."""

    vcpus: int
    memory_mb: int
    health_marker: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def guest_resources(value: Any) -> GuestResources:
    """The signed ``resources`` object of an assignment, checked; ImageError."""
    if not isinstance(value, dict) or not set(value) <= {"vcpus", "memory_mb", "health_marker"}:
        raise ImageError("the assignment's guest resources are not an object of known fields")
    vcpus, memory, marker = value.get("vcpus"), value.get("memory_mb"), value.get("health_marker")
    if type(vcpus) is not int or type(memory) is not int:
        raise ImageError("the assignment's vCPUs and memory are not whole numbers")
    _check_resources(vcpus, memory, marker, None)
    return GuestResources(vcpus, memory, marker)


def _check_resources(vcpus: int, memory: int, marker: Any, image_id: str | None) -> None:
    where = {"image_id": image_id} if image_id else {}
    if not (1 <= vcpus <= MAX_VCPUS) or not (MEMORY_MB[0] <= memory <= MEMORY_MB[1]):
        raise ImageError(
            f"vCPUs {vcpus} or memory {memory} MiB out of range",
            vcpus=vcpus,
            memory_mb=memory,
            **where,
        )
    if marker is not None and (
        not isinstance(marker, str) or not marker or not marker.isprintable() or len(marker) > 256
    ):
        raise ImageError("edgepin_health_marker is not printable text", **where)


@dataclass(frozen=True)
class Guest:
    """A guest the node runs or ran: its image and what the image asked for."""

    image_id: str
    generation: int
    vcpus: int
    memory_mb: int
    health_marker: str | None = None
    version: str = ""
    network: GuestNetwork | None = None  # as the signed assignment declared it
    usb: tuple[str, ...] = ()  # the USB devices it is given, as the assignment declared
    pci: tuple[str, ...] = ()  # the PCI devices it is given (selectors), as declared

    def disk(self, images_dir: Path) -> Path:
        return images_dir / f"{self.image_id}.qcow2"

    def at(self, generation: int) -> Guest:
        return replace(self, generation=generation)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def report_image_of(project: Any) -> str | None:
    """The report image a node project's record names, if it is an image id."""
    value = project.get(REPORT_IMAGE_ATTR) if isinstance(project, dict) else None
    return value if isinstance(value, str) and IMAGE_ID.fullmatch(value) else None


def _printable(value: str) -> str:
    # shown on consoles and in status: no control characters (terminal escapes)
    return "".join(c for c in value if c.isprintable())


def guest_from_image(image: dict[str, Any], generation: int) -> Guest:
    """What an image's (signed-for) properties ask of the node, checked; ImageError."""
    image_id = image.get("id")
    if not isinstance(image_id, str) or not IMAGE_ID.fullmatch(image_id):
        raise ImageError("the image has no valid id")
    try:
        vcpus = int(image.get("edgepin_vcpus", "1"))
        memory = int(image.get("edgepin_memory_mb", "256"))
    except (ValueError, TypeError, OverflowError):
        raise ImageError(
            "edgepin_vcpus / edgepin_memory_mb are not numbers", image_id=image_id
        ) from None
    marker = image.get("edgepin_health_marker")
    _check_resources(vcpus, memory, marker, image_id)
    version = image.get("edgepin_version", "")
    return Guest(
        image_id=image_id,
        generation=generation,
        vcpus=vcpus,
        memory_mb=memory,
        health_marker=marker,
        version=_printable(version if isinstance(version, str) else str(version))[:VERSION_SIZE],
    )


def resources_of(image: dict[str, Any]) -> GuestResources:
    """The vCPUs, memory and health marker an image's properties ask for (checked, as the
    node checks them); ImageError."""
    g = guest_from_image(image, 0)
    return GuestResources(g.vcpus, g.memory_mb, g.health_marker)


def assigned_guest(image: dict[str, Any], assignment: Assignment) -> Guest:
    """The guest an assignment asks for: the image's properties (checked), overridden by
    what the assignment signed (network, USB devices and, when signed, vCPUs, memory and
    health marker). A property changed in Glance after signing changes nothing."""
    guest = replace(
        guest_from_image(image, assignment.generation),
        network=assignment.network,
        usb=assignment.usb,
        pci=assignment.pci,
    )
    r = assignment.resources
    if r is None:
        return guest
    return replace(guest, vcpus=r.vcpus, memory_mb=r.memory_mb, health_marker=r.health_marker)


@dataclass(frozen=True)
class ImageRecord:
    """What a local image and its sealed key hashed to when they were verified."""

    sha512: str
    size: int
    key_sha256: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Enrollment:
    """Who the node is, fixed at enrollment."""

    node_id: str
    project_id: str
    user_id: str
    auth_url: str
    region: str | None
    interface: str
    ca_sha256: str
    credential_id: str
    credential_sha256: str
    pcrs: tuple[int, ...]
    enrolled_at: str

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "pcrs": list(self.pcrs)}


@dataclass(frozen=True)
class Ledger:
    """Everything the node decides trust by; anchored in the TPM (see ledger.py)."""

    enrollment: Enrollment
    highest_generation: int = 0
    # the image the floor's assignment named: the same generation never names another
    floor_image_id: str | None = None
    current: Guest | None = None
    previous: Guest | None = None
    images: dict[str, ImageRecord] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)


@dataclass
class Counters:
    """What changes at every run and decides nothing (``counters.json``, not anchored)."""

    bytes_fetched_total: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    reported: dict[str, str] = field(default_factory=dict)
    last_success: float | None = None
    fetching: str | None = None  # the partial download in progress
    # since when Keystone has refused the node's credential, without a success since
    refused_since: float | None = None
    # a busy control plane (429, 5xx): no request before this moment; how many in a row
    quiet_until: float | None = None
    busy_streak: int = 0
    # the last report written to the control plane: its digest and when (nodereport.due)
    report_digest: str | None = None
    report_sent_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> Counters:
        """Whatever is usable of a counters file; a damaged one starts afresh, field by field."""
        counters = cls()
        if not isinstance(raw, dict):
            return counters

        def count(value: Any) -> bool:
            return type(value) is int and 0 <= value <= MAX_GENERATION

        def moment(value: Any) -> bool:
            return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0

        for name in ("bytes_fetched_total", "busy_streak"):
            if count(raw.get(name)):
                setattr(counters, name, raw[name])
        for name, valid in (("failures", count), ("reported", lambda v: v in set(MemberStatus))):
            value = raw.get(name)
            if isinstance(value, dict):
                setattr(
                    counters,
                    name,
                    {k: v for k, v in value.items() if isinstance(k, str) and valid(v)},
                )
        for name in ("last_success", "refused_since", "quiet_until", "report_sent_at"):
            if moment(raw.get(name)):
                setattr(counters, name, float(raw[name]))
        if isinstance(raw.get("fetching"), str):
            counters.fetching = raw["fetching"]
        if isinstance(raw.get("report_digest"), str):
            counters.report_digest = raw["report_digest"]
        return counters


@dataclass(frozen=True)
class Status:
    """``/run/edgepin/status.json``: what the last reconcile ended in."""

    state: State
    reason: str
    image_id: str | None = None
    generation: int | None = None
    version: str | None = None
    highest_generation: int | None = None
    previous_image_id: str | None = None
    last_success: float | None = None
    bytes_fetched_total: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    # the failing error's facts (image id, expected, got, ...): never a secret
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
