"""The node's report to the operator: its facts and the outcome of its last reconcile.

Where it lives: a Glance image record with no data, owned by the node's project and created
by ``edgepin enroll`` (provisioner/operator/reports.py). The node's credential may change
exactly that record (an access rule: ``PATCH /v2/images/<its report image>``), and it writes
the report as one property, ``edgepin_report``: canonical JSON. Operators (admin) read every
node's report in one listing. Keystone's own credential API would have been the natural
place, but Keystone refuses it to application-credential tokens ("Delegated tokens cannot
access credentials directly", keystone/api/credentials.py), and the node holds nothing else.

The node writes it at the end of a reconcile that reached Keystone, only when it differs
from the last one written (:func:`digest` leaves out the time), or once
``EDGEPIN_REPORT_INTERVAL`` has passed since then, so that a reconcile with nothing new
costs no request. For the operator it is untrusted input: :func:`parse` returns a
:class:`NodeReport` or raises :class:`ReportError`, whatever the text.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from provisioner.errors import EdgepinError, Reason
from provisioner.node.model import IMAGE_ID, MAX_GENERATION, PCI_FACT, USB_ID, State

KIND = "edgepin-node-report/1"
PROPERTY = "edgepin_report"  # the report image's property that holds the report
MAX_TEXT = 16384  # characters of a report: a real one is under 4 KiB
MAX_REASON = 512
MAX_FLAGS = 512
MAX_LOCAL_IMAGES = 8
MAX_USB_DEVICES = 64
MAX_PCI_DEVICES = 128
MAX_CPUS = 65536
MAX_MB = 2**40  # a mebibyte count: a petabyte is 2**30
DISK_QUANTUM_MB = 256  # free disk is reported in steps of this: small writes change nothing
FLAG = re.compile(r"[a-z0-9][a-z0-9_.]{0,63}")
TEXT_SIZE = 128
MAX_HOST_VERSION = 2**63 - 1
MAX_EPOCH = 63  # a host epoch: provisioner.tpm.MAX_EPOCH


class ReportError(EdgepinError):
    """A node report that cannot be read (malformed, for another node, too long)."""

    def __init__(self, why: str, **fields: Any) -> None:
        super().__init__(f"unreadable node report: {why}", **fields)


@dataclass(frozen=True)
class Facts:
    """What the node is: what a placement must fit."""

    cpus: int  # host CPUs online
    guest_cpus: int  # of those, the ones a guest's vCPUs may be pinned to
    memory_mb: int  # host memory
    disk_free_mb: int  # free space where images are kept, in steps of DISK_QUANTUM_MB
    cpu_model: str
    cpu_flags: tuple[str, ...]  # sorted, as /proc/cpuinfo names them
    host: str  # the host OS (os-release PRETTY_NAME)
    kernel: str
    virt_type: str  # kvm, or qemu (software emulation)
    edgepin_version: str
    local_images: tuple[str, ...]  # images on the node's disk (current, previous)
    usb: tuple[str, ...] = ()  # USB devices plugged in (vendor:product), hubs included
    # PCI devices a guest may be given (not the host's disks' or up interfaces'):
    # ADDRESS=CLASS (six hex digits), by address
    pci: tuple[str, ...] = ()
    host_version: int = 0  # the host release (EDGEPIN_HOST_VERSION); 0: not known
    host_slot: str = ""  # the root slot the host booted from, a or b; "": not known
    # the host version of an update whose root slot the node came back from; 0: none
    host_fallback: int = 0
    # the host version written into the other root slot, tried at the next boot; 0: none
    host_next: int = 0
    host_refused: str = ""  # why the assigned host release is refused; "": it is not
    # the hardware watchdog systemd keeps armed ("<driver>, <timeout> s"); "": none
    host_watchdog: str = ""
    host_epoch: int = 0  # the host release's epoch (EDGEPIN_HOST_EPOCH)
    host_floor: int = 0  # the TPM's host floor: no release of a lower epoch opens anything

    def as_dict(self) -> dict[str, Any]:
        return {
            "cpus": self.cpus,
            "guest_cpus": self.guest_cpus,
            "memory_mb": self.memory_mb,
            "disk_free_mb": self.disk_free_mb,
            "cpu_model": self.cpu_model,
            "cpu_flags": list(self.cpu_flags),
            "host": self.host,
            "kernel": self.kernel,
            "virt_type": self.virt_type,
            "edgepin_version": self.edgepin_version,
            "local_images": list(self.local_images),
            "usb": list(self.usb),
            "pci": list(self.pci),
            "host_version": self.host_version,
            "host_slot": self.host_slot,
            "host_fallback": self.host_fallback,
            "host_next": self.host_next,
            "host_refused": self.host_refused,
            "host_watchdog": self.host_watchdog,
            "host_epoch": self.host_epoch,
            "host_floor": self.host_floor,
        }


@dataclass(frozen=True)
class Ref:
    """An image at a generation."""

    image_id: str
    generation: int

    def as_dict(self) -> dict[str, Any]:
        return {"image_id": self.image_id, "generation": self.generation}


@dataclass(frozen=True)
class NodeReport:
    node: str
    reported_at: str
    state: State  # the last reconcile's outcome
    reason: str  # and why, in a sentence
    error: Reason | None  # the failure's kind, when it failed
    assignment: Ref | None  # the highest signed assignment the node has read
    running: Ref | None  # the guest it runs
    running_version: str
    facts: Facts | None  # None when libvirt could not be asked

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": KIND,
            "node": self.node,
            "reported_at": self.reported_at,
            "state": str(self.state),
            "reason": self.reason,
            "error": str(self.error) if self.error else None,
            "assignment": self.assignment.as_dict() if self.assignment else None,
            "running": self.running.as_dict() if self.running else None,
            "running_version": self.running_version,
            "facts": self.facts.as_dict() if self.facts else None,
        }

    def text(self) -> str:
        """The canonical JSON the node writes (sorted keys, no spaces)."""
        return json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def rejected(self) -> bool:
        """Whether the node refused its assignment: a verdict, not a passing failure (a
        refused image, or a new guest that was not healthy and was rolled back)."""
        return self.state in (State.REFUSED, State.ROLLED_BACK)


def digest(report: NodeReport) -> str:
    """What makes two reports the same: everything but the time."""
    data = report.as_dict()
    del data["reported_at"]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def due(
    report: NodeReport,
    last_digest: str | None,
    last_sent: float | None,
    now: float,
    interval: float,
) -> bool:
    """Whether the node writes this report: it changed, or ``interval`` has passed since the
    last one was written (a clock that went back counts as passed)."""
    if last_digest != digest(report) or last_sent is None:
        return True
    return not 0 <= now - last_sent < interval


def clean_text(value: str, size: int) -> str:
    """Printable characters only (reports are shown on terminals), at most ``size``."""
    return "".join(c for c in value if c.isprintable())[:size]


# ---------------------------------------------------------------------------- the parser


def parse(text: Any, node: str) -> NodeReport:
    """The report of ``node`` in ``text`` (the property's value), checked field by field."""
    if not isinstance(text, str):
        raise ReportError("not text")
    if len(text) > MAX_TEXT:
        raise ReportError(f"longer than {MAX_TEXT} characters")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        raise ReportError("not JSON") from None
    if not isinstance(doc, dict):
        raise ReportError("not an object")
    if doc.get("kind") != KIND:
        raise ReportError(f"not an {KIND}")
    if doc.get("node") != node:
        raise ReportError("written for another node", node=_short(doc.get("node")))
    state = _choice(doc, "state", State)
    error = None if doc.get("error") is None else _choice(doc, "error", Reason)
    return NodeReport(
        node=node,
        reported_at=_text(doc, "reported_at", 32),
        state=state,
        reason=_text(doc, "reason", MAX_REASON),
        error=error,
        assignment=_ref(doc.get("assignment"), "assignment"),
        running=_ref(doc.get("running"), "running"),
        running_version=_text(doc, "running_version", 64),
        facts=_facts(doc.get("facts")),
    )


def _short(value: Any) -> str:
    return clean_text(str(value), 64)


def _host_slot(doc: dict[str, Any]) -> str:
    value = doc.get("host_slot", "")  # absent in reports of nodes from before root slots
    if value not in ("", "a", "b"):
        raise ReportError("host_slot is not a, b or empty")
    return str(value)


def _int(doc: dict[str, Any], key: str, top: int) -> int:
    value = doc.get(key)
    if type(value) is not int or not 0 <= value <= top:
        raise ReportError(f"{key} is not a whole number from 0 to {top}")
    return value


def _text(doc: dict[str, Any], key: str, size: int) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or len(value) > size or not value.isprintable():
        raise ReportError(f"{key} is not printable text of at most {size} characters")
    return value


def _choice(doc: dict[str, Any], key: str, kind: type[State] | type[Reason]) -> Any:
    value = doc.get(key)
    if not isinstance(value, str) or value not in {str(v) for v in kind}:
        raise ReportError(f"{key} is not one of {', '.join(str(v) for v in kind)}")
    return kind(value)


def _image_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not IMAGE_ID.fullmatch(value):
        raise ReportError(f"{what} is not an image id")
    return value


def _ref(value: Any, what: str) -> Ref | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ReportError(f"{what} is not an object")
    image_id = _image_id(value.get("image_id"), f"{what}.image_id")
    return Ref(image_id, _int(value, "generation", MAX_GENERATION))


def _devices(
    doc: dict[str, Any], key: str, limit: int, valid: re.Pattern[str], what: str
) -> tuple[str, ...]:
    """A list of device names under ``facts.<key>`` (absent: none), sorted, each once."""
    items = doc.get(key, [])
    if (
        not isinstance(items, list)
        or len(items) > limit
        or not all(isinstance(i, str) and valid.fullmatch(i) for i in items)
    ):
        raise ReportError(f"facts.{key} is not a list of at most {limit} {what}")
    return tuple(sorted(set(items)))


def _facts(value: Any) -> Facts | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ReportError("facts is not an object")
    flags = value.get("cpu_flags")
    if (
        not isinstance(flags, list)
        or len(flags) > MAX_FLAGS
        or not all(isinstance(f, str) and FLAG.fullmatch(f) for f in flags)
    ):
        raise ReportError(f"facts.cpu_flags is not a list of at most {MAX_FLAGS} flag names")
    images = value.get("local_images")
    if not isinstance(images, list) or len(images) > MAX_LOCAL_IMAGES:
        raise ReportError(f"facts.local_images is not a list of at most {MAX_LOCAL_IMAGES}")
    usb = _devices(value, "usb", MAX_USB_DEVICES, USB_ID, "vendor:product ids")
    pci = _devices(value, "pci", MAX_PCI_DEVICES, PCI_FACT, "ADDRESS=CLASS entries")
    cpus = _int(value, "cpus", MAX_CPUS)
    guest_cpus = _int(value, "guest_cpus", MAX_CPUS)
    if guest_cpus > cpus:
        raise ReportError("facts.guest_cpus is more than facts.cpus")
    virt_type = value.get("virt_type")
    if virt_type not in ("kvm", "qemu"):
        raise ReportError("facts.virt_type is not kvm or qemu")
    return Facts(
        cpus=cpus,
        guest_cpus=guest_cpus,
        memory_mb=_int(value, "memory_mb", MAX_MB),
        disk_free_mb=_int(value, "disk_free_mb", MAX_MB),
        cpu_model=_text(value, "cpu_model", TEXT_SIZE),
        cpu_flags=tuple(sorted(set(flags))),
        host=_text(value, "host", TEXT_SIZE),
        kernel=_text(value, "kernel", TEXT_SIZE),
        virt_type=str(virt_type),
        edgepin_version=_text(value, "edgepin_version", 64),
        local_images=tuple(sorted({_image_id(i, "facts.local_images") for i in images})),
        usb=usb,
        pci=pci,
        # absent in reports of nodes from before host versions: not known
        host_version=_int(value, "host_version", MAX_HOST_VERSION)
        if "host_version" in value
        else 0,
        host_slot=_host_slot(value),
        host_fallback=_int(value, "host_fallback", MAX_HOST_VERSION)
        if "host_fallback" in value
        else 0,
        # absent in reports of nodes from before host assignments
        host_next=_int(value, "host_next", MAX_HOST_VERSION) if "host_next" in value else 0,
        host_refused=_text(value, "host_refused", MAX_REASON) if "host_refused" in value else "",
        # absent in reports of nodes from before the watchdog
        host_watchdog=_text(value, "host_watchdog", TEXT_SIZE) if "host_watchdog" in value else "",
        # absent in reports of nodes from before the host floor
        host_epoch=_int(value, "host_epoch", MAX_EPOCH) if "host_epoch" in value else 0,
        host_floor=_int(value, "host_floor", MAX_EPOCH) if "host_floor" in value else 0,
    )
