"""Signed host assignments: which host release a node installs, and when it may restart.

A host assignment is a record of its own kind (``edgepin-host-assignment/1``), in its own
project attribute (``edgepin_host_assignment``) beside the guest's: a host release can
never be read as a guest assignment, nor a guest assignment as a host one. The operator
(``edgepin host assign``) signs what the node needs to know, with the key that signs guest
assignments, and the node acts only on that: this node (its project id and its name), the
release's Glance image id, its sha512 (which the fetched bytes are checked against), its
host version, a generation that goes up with every host assignment of the node, when it
was made, and the restart: ``now`` (as soon as the release is written into the other root
slot), ``never`` (the next restart, whoever makes it) or a daily window ``HH:MM-HH:MM`` in
UTC.

:func:`verify` is total: any input gives a :class:`HostAssignment`, None (no record) or an
:class:`~provisioner.errors.ImageError` / :class:`~provisioner.errors.VerificationError`
that says why it is refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from provisioner import assignment
from provisioner.errors import ImageError, UsageError, VerificationError
from provisioner.hostupdate import MAX_HOST_VERSION
from provisioner.node.model import IMAGE_ID, MAX_GENERATION

KIND = "edgepin-host-assignment/1"
ATTR = "edgepin_host_assignment"  # the node project's attribute

# A host release in Glance (``edgepin host publish`` writes it, the node checks it)
RELEASE_KIND = "host-update"  # its edgepin_kind: never a guest image
KIND_PROPERTY = "edgepin_kind"
VERSION_PROPERTY = "edgepin_host_version"
# the release key's approvals of the PCR values the release measures (a JSON list of
# `edgepin release approve` documents): public, each signed, checked by the node
APPROVALS_PROPERTY = "edgepin_host_approvals"
MAX_APPROVALS = 8  # one per root slot and PCR bank is two; eight leave room
MAX_APPROVALS_TEXT = 16384
HINT = "assign host releases with `edgepin host assign`, which signs the assignment"
WINDOW = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])-([01][0-9]|2[0-3]):([0-5][0-9])")
DAY = 24 * 60


@dataclass(frozen=True)
class Restart:
    """When a node restarts into a host release it has written: ``now``, ``never`` or a
    daily window in UTC (minutes after midnight; a window may cross midnight)."""

    when: str  # "now", "never" or "HH:MM-HH:MM"

    @property
    def window(self) -> tuple[int, int] | None:
        m = WINDOW.fullmatch(self.when)
        if m is None:
            return None
        h1, m1, h2, m2 = (int(x) for x in m.groups())
        return h1 * 60 + m1, h2 * 60 + m2

    def due(self, now: float) -> bool:
        """Whether the node may restart at ``now`` (seconds since the epoch)."""
        if self.when == "now":
            return True
        window = self.window
        if window is None:
            return False
        start, end = window
        minute = int(now // 60) % DAY
        if start <= end:
            return start <= minute < end
        return minute >= start or minute < end  # across midnight

    def __str__(self) -> str:
        return self.when


def restart(value: Any) -> Restart:
    """``now``, ``never`` or ``HH:MM-HH:MM`` (UTC, start and end differ); ImageError
    otherwise."""
    if not isinstance(value, str) or not (
        value in ("now", "never") or WINDOW.fullmatch(value) is not None
    ):
        raise ImageError("the host assignment's restart is not now, never or HH:MM-HH:MM")
    r = Restart(value)
    if r.window is not None and r.window[0] == r.window[1]:
        raise ImageError("the host assignment's restart window is empty")
    return r


def restart_option(value: str) -> Restart:
    """``--restart`` of ``edgepin host assign``: a UsageError that says what is accepted."""
    try:
        return restart(value)
    except ImageError:
        raise UsageError(
            f"--restart {value!r}: give now, never or a daily window HH:MM-HH:MM in UTC "
            "(start and end differ; 22:00-04:00 crosses midnight)"
        ) from None


@dataclass(frozen=True)
class HostAssignment:
    """The host release the operator chose for this node, as signed."""

    image_id: str
    image_sha512: str
    host_version: int
    generation: int
    assigned_at: str
    restart: Restart

    def as_dict(self) -> dict[str, Any]:
        return {
            "image_id": self.image_id,
            "host_version": self.host_version,
            "generation": self.generation,
            "assigned_at": self.assigned_at,
            "restart": str(self.restart),
        }


def payload(node: str, node_name: str, a: HostAssignment) -> bytes:
    """The signed bytes: canonical JSON (sorted keys, no spaces, ASCII)."""
    doc = {
        "kind": KIND,
        "node": node,
        "node_name": node_name,
        "image_id": a.image_id,
        "image_sha512": a.image_sha512,
        "host_version": a.host_version,
        "generation": a.generation,
        "assigned_at": a.assigned_at,
        "restart": str(a.restart),
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def sign(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    certificate: x509.Certificate,
    node: str,
    node_name: str,
    a: HostAssignment,
) -> dict[str, Any]:
    """The record ``edgepin host assign`` writes: readable fields, and the signed payload."""
    return {
        **a.as_dict(),
        "signed": assignment.envelope(key, certificate, payload(node, node_name, a)),
    }


def verify(
    raw: Any, pinned: dict[str, x509.Certificate], node: str, node_name: str
) -> HostAssignment | None:
    """The host assignment in ``raw`` (the project attribute), if it is signed for ``node``
    (project id) named ``node_name`` by a pinned certificate; None when there is none."""
    body = assignment.open_envelope(raw, pinned, "host assignment", HINT)
    return None if body is None else parse_payload(body, node, node_name)


def previous(
    raw: Any, certificate: x509.Certificate, node: str, node_name: str
) -> HostAssignment | None:
    """The operator's reading of a node's current record: the host assignment this key
    signed for it, or None (none, another key's, or not one it can read)."""
    from provisioner.signing import fingerprint

    try:
        return verify(raw, {fingerprint(certificate): certificate}, node, node_name)
    except (ImageError, VerificationError):
        return None


def parse_payload(body: bytes, node: str, node_name: str) -> HostAssignment:
    """The signed payload, field by field (signed by a pinned key, still checked)."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise VerificationError("the signed host assignment is not JSON") from None
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise VerificationError("the signed payload is not an edgepin host assignment")
    if doc.get("node") != node or doc.get("node_name") != node_name:
        raise VerificationError(
            "the host assignment is signed for another node: refused",
            signed_for=str(doc.get("node_name"))[:64],
        )
    image_id, sha, version, gen, at = (
        doc.get("image_id"),
        doc.get("image_sha512"),
        doc.get("host_version"),
        doc.get("generation"),
        doc.get("assigned_at"),
    )
    if not isinstance(image_id, str) or not IMAGE_ID.fullmatch(image_id):
        raise ImageError("the host assignment names no valid image id")
    if not isinstance(sha, str) or not assignment.SHA512.fullmatch(sha):
        raise ImageError("the host assignment names no valid sha512")
    if type(version) is not int or not 1 <= version <= MAX_HOST_VERSION:
        raise ImageError("the host assignment's host version is not a whole number in range")
    if type(gen) is not int or not 1 <= gen <= MAX_GENERATION:
        raise ImageError("the host assignment's generation is not a whole number in range")
    if not isinstance(at, str) or len(at) > 64 or not at.isprintable():
        raise ImageError("the host assignment's time is not valid")
    return HostAssignment(image_id, sha, version, gen, at, restart(doc.get("restart")))
