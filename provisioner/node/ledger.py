"""The node's trusted record, anchored in its TPM.

Everything the node decides trust by and keeps on its state partition lives in one file,
``node.json`` (the ledger): who it enrolled as (node, project, user, Keystone URL, the CA's
and the sealed credential's digests), the generation floor, the current and previous
guest, what each local image and key blob hashed to when they were verified, and the
refused images. The state partition can be written by anyone who holds the disk, so the
ledger is trusted only when its SHA-256 equals the digest kept in a TPM NV index that the
node writes under its PCR policy (see :class:`provisioner.tpm.Anchor`). An edited ledger,
or an older copy of a genuine one, does not match and is refused; the generation floor in
the same NV index survives the restore of an old state partition.

Saving is crash-safe in three steps: the new ledger goes to ``node.json.next`` (atomic
write), the anchor takes its digest, ``node.json.next`` is renamed over ``node.json``.
Loading accepts ``node.json`` when it matches the anchor, else ``node.json.next`` when it
does (a power cut between the last two steps), and nothing else.

What changes at every run and decides nothing (counters, the last report, the partial
download in progress) is kept apart in ``counters.json`` and is not anchored: a
reconcile that changes nothing in the ledger writes nothing to the TPM.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from provisioner.errors import ImageError, StateError, TrustError
from provisioner.node import model, state
from provisioner.node.model import Enrollment, Guest, ImageRecord, Ledger
from provisioner.tpm import ANCHOR_NV_SIZE, Policy

LEDGER_FORMAT = 3  # 2: before floor_image_id (read and migrated by parse)
LEDGER_NAME = "node.json"
NEXT_NAME = "node.json.next"
ANCHOR_SIZE = ANCHOR_NV_SIZE  # 8 bytes generation floor, 32 bytes SHA-256 of the ledger
MAX_GENERATION = model.MAX_GENERATION
IMAGE_ID = model.IMAGE_ID
HEX = re.compile(r"^[0-9a-f]*$")


@dataclass(frozen=True)
class AnchorValue:
    """What the TPM keeps: the generation floor and the digest of the current ledger."""

    floor: int
    digest: bytes

    def to_bytes(self) -> bytes:
        if not 0 <= self.floor <= MAX_GENERATION or len(self.digest) != 32:
            raise StateError(f"anchor value out of range (floor {self.floor})")
        return self.floor.to_bytes(8, "big") + self.digest

    @classmethod
    def from_bytes(cls, data: bytes) -> AnchorValue:
        if len(data) != ANCHOR_SIZE:
            raise TrustError(f"the TPM's anchor holds {len(data)} bytes, not {ANCHOR_SIZE}")
        floor = int.from_bytes(data[:8], "big")
        if floor > MAX_GENERATION:
            raise TrustError("the TPM's anchor holds an impossible generation floor")
        return cls(floor, bytes(data[8:]))


class Anchor(Protocol):
    """The TPM NV index (or, in unit tests, a stand-in with the same rules)."""

    def read(self) -> AnchorValue | None:
        """The value, or None when the index is not defined (a node never enrolled)."""
        ...

    def write(self, value: AnchorValue) -> None: ...


def as_dict(ledger: Ledger) -> dict[str, Any]:
    return {
        "format": LEDGER_FORMAT,
        "enrollment": ledger.enrollment.as_dict(),
        "highest_generation": ledger.highest_generation,
        "floor_image_id": ledger.floor_image_id,
        "current": ledger.current.as_dict() if ledger.current else None,
        "previous": ledger.previous.as_dict() if ledger.previous else None,
        "images": {k: v.as_dict() for k, v in ledger.images.items()},
        "rejected": dict(ledger.rejected),
    }


def encode(ledger: Ledger) -> bytes:
    """The canonical bytes of a ledger: the same ledger, the same bytes, the same digest."""
    return (json.dumps(as_dict(ledger), indent=2, sort_keys=True) + "\n").encode()


def load(state_dir: Path, anchor: Anchor) -> Ledger:
    """The ledger, if and only if the TPM vouches for it."""
    value = anchor.read()
    if value is None:
        raise TrustError(
            "the TPM holds no edgepin anchor: this node was never enrolled on this TPM "
            "(or the TPM was cleared)",
            hint="enroll the node again with a new seed",
        )
    path, nxt = state_dir / LEDGER_NAME, state_dir / NEXT_NAME
    data = _read(path)
    if data is None or hashlib.sha256(data).digest() != value.digest:
        pending = _read(nxt)
        if pending is not None and hashlib.sha256(pending).digest() == value.digest:
            os.replace(nxt, path)  # a power cut came between the anchor and the rename
            state.fsync_dir(state_dir)
            data = pending
        else:
            raise TrustError(
                f"{path} does not match the record in the TPM: it was edited, replaced "
                "by an older copy or removed",
                hint="nothing from the state partition is used; enroll the node again",
                path=str(path),
            )
    with contextlib.suppress(FileNotFoundError):
        nxt.unlink()
    ledger = parse(data)
    if ledger.highest_generation != value.floor:
        raise TrustError(
            f"the ledger's generation floor {ledger.highest_generation} differs from "
            f"the TPM's {value.floor}"
        )
    return ledger


def save(state_dir: Path, anchor: Anchor, ledger: Ledger) -> bool:
    """Anchor and write the ledger; False (and no TPM write) when nothing changed."""
    data = encode(parse(encode(ledger)))  # what is saved is what load accepts
    digest = hashlib.sha256(data).digest()
    current = anchor.read()
    floor = ledger.highest_generation
    if current is not None:
        if current.digest == digest:
            return False
        if floor < current.floor:
            raise StateError(
                f"refusing to lower the generation floor from {current.floor} to {floor}"
            )
    state.atomic_write(state_dir / NEXT_NAME, data)
    anchor.write(AnchorValue(floor, digest))
    os.replace(state_dir / NEXT_NAME, state_dir / LEDGER_NAME)
    state.fsync_dir(state_dir)
    return True


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


# ------------------------------------------------------------------ the parser


def _fail(what: str) -> TrustError:
    return TrustError(f"the ledger is malformed: {what}")


def _int(value: Any, what: str, low: int = 0, high: int = MAX_GENERATION) -> int:
    if type(value) is not int or not low <= value <= high:
        raise _fail(f"{what} is not a whole number in [{low}, {high}]")
    return value


def _str(value: Any, what: str, pattern: re.Pattern[str] | None = None, size: int = 4096) -> str:
    if not isinstance(value, str) or len(value) > size or not value.isprintable():
        raise _fail(f"{what} is not short printable text")
    if pattern is not None and not pattern.fullmatch(value):
        raise _fail(f"{what} has the wrong form")
    return value


def _hexdigest(value: Any, what: str, length: int) -> str:
    text = _str(value, what, HEX)
    if len(text) != length:
        raise _fail(f"{what} is not a {length}-digit hex digest")
    return text


def _guest(value: Any, what: str) -> Guest | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _fail(f"{what} is not an object")
    marker = value.get("health_marker")
    try:
        network = model.guest_network(value.get("network"))
    except ImageError:
        raise _fail(f"{what}.network is not one of {model.NETWORK_FORMS}") from None
    return Guest(
        image_id=_str(value.get("image_id"), f"{what}.image_id", IMAGE_ID),
        generation=_int(value.get("generation"), f"{what}.generation"),
        vcpus=_int(value.get("vcpus"), f"{what}.vcpus", 1, model.MAX_VCPUS),
        memory_mb=_int(value.get("memory_mb"), f"{what}.memory_mb", *model.MEMORY_MB),
        health_marker=None if marker is None else _str(marker, f"{what}.health_marker", size=256),
        version=_str(value.get("version", ""), f"{what}.version", size=model.VERSION_SIZE),
        network=network,
        usb=_devices(value.get("usb"), f"{what}.usb", model.usb_ids, "vendor:product ids"),
        pci=_devices(
            value.get("pci"), f"{what}.pci", model.pci_selectors, "PCI addresses and classes"
        ),
    )


def _devices(
    value: Any, what: str, read: Callable[[Any], tuple[str, ...]], form: str
) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _fail(f"{what} is not a list")
    try:
        return read(value)
    except ImageError:
        raise _fail(f"{what} is not a list of {form}") from None


def _image(value: Any, what: str) -> ImageRecord:
    if not isinstance(value, dict):
        raise _fail(f"{what} is not an object")
    key = value.get("key_sha256")
    return ImageRecord(
        sha512=_hexdigest(value.get("sha512"), f"{what}.sha512", 128),
        size=_int(value.get("size"), f"{what}.size"),
        key_sha256=None if key is None else _hexdigest(key, f"{what}.key_sha256", 64),
    )


def enrollment(value: Any) -> Enrollment:
    """The enrollment record, checked; TrustError otherwise."""
    if not isinstance(value, dict):
        raise _fail("enrollment is not an object")
    region = value.get("region")
    pcrs = tuple(_int(p, "enrollment.pcrs[]", 0, 23) for p in _list(value.get("pcrs")))
    if not pcrs:
        raise _fail("enrollment.pcrs is empty")
    return Enrollment(
        node_id=_str(value.get("node_id"), "enrollment.node_id", size=255),
        project_id=_str(value.get("project_id"), "enrollment.project_id", size=64),
        user_id=_str(value.get("user_id"), "enrollment.user_id", size=64),
        auth_url=_str(value.get("auth_url"), "enrollment.auth_url", size=1024),
        region=None if region is None else _str(region, "enrollment.region", size=255),
        interface=_str(value.get("interface"), "enrollment.interface", size=16),
        ca_sha256=_hexdigest(value.get("ca_sha256"), "enrollment.ca_sha256", 64),
        credential_id=_str(value.get("credential_id"), "enrollment.credential_id", size=64),
        credential_sha256=_hexdigest(
            value.get("credential_sha256"), "enrollment.credential_sha256", 64
        ),
        pcrs=pcrs,
        enrolled_at=_str(value.get("enrolled_at"), "enrollment.enrolled_at", size=32),
    )


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise _fail("a list is not a list")
    return value


def _migrate(raw: dict[str, Any]) -> dict[str, Any]:
    """Older formats to the current one (the only place that knows them)."""
    if raw.get("format") == 2:
        # format 2 had no floor_image_id: the current guest's image, when it is at the floor
        current = raw.get("current")
        floor_image = None
        if isinstance(current, dict) and current.get("generation") == raw.get("highest_generation"):
            floor_image = current.get("image_id")
        raw = {**raw, "format": LEDGER_FORMAT, "floor_image_id": floor_image}
    return raw


def parse(data: bytes) -> Ledger:
    """A ledger from bytes: a checked value, or TrustError; never anything else."""
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _fail("not JSON") from None
    if not isinstance(raw, dict):
        raise _fail("not an object")
    raw = _migrate(raw)
    if raw.get("format") != LEDGER_FORMAT:
        raise _fail(f"format is not {LEDGER_FORMAT}")
    images = raw.get("images")
    rejected = raw.get("rejected")
    if not isinstance(images, dict) or not isinstance(rejected, dict):
        raise _fail("images and rejected must be objects")
    floor_image = raw.get("floor_image_id")
    return Ledger(
        enrollment=enrollment(raw.get("enrollment")),
        highest_generation=_int(raw.get("highest_generation"), "highest_generation"),
        floor_image_id=(
            None if floor_image is None else _str(floor_image, "floor_image_id", IMAGE_ID)
        ),
        current=_guest(raw.get("current"), "current"),
        previous=_guest(raw.get("previous"), "previous"),
        images={
            _str(k, "images key", IMAGE_ID): _image(v, f"images[{k}]") for k, v in images.items()
        },
        rejected={
            _str(k, "rejected key", IMAGE_ID): _int(v, f"rejected[{k}]")
            for k, v in rejected.items()
        },
    )


# ------------------------------------------------------------------ the TPM's side


class TpmAnchor:
    """:class:`Anchor` on the node's TPM, under the node's configured PCR selection."""

    def __init__(self, tcti: str, pcrs: Policy) -> None:
        self.tcti = tcti
        self.pcrs = pcrs
        # what this process last read or wrote: one TPM read per run, not one per save
        # (the node lock keeps other edgepin processes out; anyone else who can write the
        # index from the running system is root in the measured state already)
        self._known = False
        self._value: AnchorValue | None = None

    def _call(self, what: str, fn: Any) -> Any:
        from provisioner import tpm

        try:
            with tpm.Tpm.open(self.tcti) as t:
                return fn(t)
        except tpm.TpmPolicyError as e:
            raise TrustError(
                f"{what}: {e}",
                hint="the host OS, its boot chain or the TPM changed since enrollment",
            ) from None
        except tpm.TpmUnavailableError as e:
            raise TrustError(f"no TPM: {e}", hint=f"check {self.tcti}") from None
        except tpm.TpmError as e:
            raise TrustError(f"{what}: {e}") from None

    def read(self) -> AnchorValue | None:
        if not self._known:
            raw = self._call("reading the TPM's anchor", lambda t: t.anchor_read(self.pcrs))
            self._value = None if raw is None else AnchorValue.from_bytes(raw)
            self._known = True
        return self._value

    def write(self, value: AnchorValue) -> None:
        data = value.to_bytes()
        self._known = False
        self._call("writing the TPM's anchor", lambda t: t.anchor_write(self.pcrs, data))
        self._value, self._known = value, True

    def define(self) -> None:
        self._known = False
        self._call("defining the TPM's anchor", lambda t: t.anchor_define(self.pcrs))
