"""edgepin's errors: one class per failure area, with structured fields and an exit code.

The CLI prints ``edgepin: error: <message>`` (and ``hint: ...`` when there is one) and exits
with the class's code; a traceback only with ``--debug``.
"""

from __future__ import annotations

import enum
from typing import Any


class Reason(enum.StrEnum):
    """The failure areas: one per error class, the ``kind`` of ``edgepin_failures_total``
    and the ``error`` of the node's status."""

    ERROR = "error"
    USAGE = "usage"
    CONFIG = "config"
    AUTH = "auth"
    SERVICE_UNAVAILABLE = "service-unavailable"
    NOT_FOUND = "not-found"
    IMAGE = "image"
    VERIFICATION = "verification"
    TRUST = "trust"
    STATE = "state"
    GUEST = "guest"


class EdgepinError(Exception):
    """Base class. ``exit_code`` is stable: scripts and units rely on it."""

    exit_code = 1
    reason = Reason.ERROR

    def __init__(self, message: str, *, hint: str | None = None, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.fields = fields


class UsageError(EdgepinError):
    """Bad arguments or a missing input file."""

    exit_code = 2
    reason = Reason.USAGE


class ConfigError(EdgepinError):
    """Node configuration or seed bundle missing or malformed."""

    exit_code = 3
    reason = Reason.CONFIG


class AuthError(EdgepinError):
    """The cloud credential was refused (expired, invalid, revoked)."""

    exit_code = 4
    reason = Reason.AUTH


class ServiceUnavailableError(EdgepinError):
    """A control-plane service cannot be reached or answers 5xx."""

    exit_code = 5
    reason = Reason.SERVICE_UNAVAILABLE


class NotFoundError(EdgepinError):
    """A node, image or secret that does not exist (or is not visible)."""

    exit_code = 6
    reason = Reason.NOT_FOUND


class ImageError(EdgepinError):
    """An image that is not acceptable: wrong format, missing properties."""

    exit_code = 7
    reason = Reason.IMAGE


class BundleError(ImageError):
    """An air-gapped bundle that is not one: no manifest for this node, a malformed
    manifest, a file missing, truncated or not a regular file. Refused; nothing changes."""


class HostUpdateError(ImageError):
    """A host update that is not one: not a whole tar, a malformed manifest, a member
    missing, out of place, or not the size and sha256 the manifest gives. Refused."""


class VerificationError(EdgepinError):
    """Hash or signature verification failed: the image is refused."""

    exit_code = 8
    reason = Reason.VERIFICATION


class TrustError(EdgepinError):
    """TPM unseal refused, EK chain invalid, measured state differs."""

    exit_code = 9
    reason = Reason.TRUST


class StateError(EdgepinError):
    """Local state that cannot be used (rollback attempt, lock held, disk full)."""

    exit_code = 10
    reason = Reason.STATE


class HostSlotError(StateError):
    """The host's root slots cannot take a host update now: no slot on the kernel command
    line, an unreadable or foreign environment block on the ESP, a slot on trial, an
    update not newer than the host, a partition too small or a write that did not read
    back. The slot that booted stays the next boot's."""


class GuestError(EdgepinError):
    """libvirt could not define or start the guest, or it is not healthy."""

    exit_code = 11
    reason = Reason.GUEST


# ---------------------------------------------------------------- errors that build their message
# The raise site passes the facts; the class writes the sentence once, and the facts travel
# in ``fields`` (into the node's status).


class DigestMismatch(VerificationError):
    """Something on the node's disk is not what was verified (and recorded) before."""

    def __init__(self, what: str, image_id: str, expected: str | None, got: str | None) -> None:
        super().__init__(
            f"{what} of image {image_id} is not what this node verified"
            + (" (no record)" if expected is None else "")
            + (" (missing)" if got is None else ""),
            image_id=image_id,
            what=what,
            expected=expected,
            got=got,
        )


class GenerationRollback(StateError):
    """An assignment older than one the node has already seen."""

    def __init__(self, image_id: str, generation: int, floor: int) -> None:
        super().__init__(
            f"assignment generation {generation} is lower than {floor} already seen: "
            "refused as a rollback attack",
            image_id=image_id,
            generation=generation,
            floor=floor,
        )


class GenerationConflict(StateError):
    """The generation the node has seen names another image now."""

    def __init__(self, image_id: str, generation: int, seen_image_id: str) -> None:
        super().__init__(
            f"assignment generation {generation} named image {seen_image_id} before and "
            f"names {image_id} now: refused (a new assignment has a higher generation)",
            image_id=image_id,
            generation=generation,
            seen_image_id=seen_image_id,
        )


class AlreadyRefused(ImageError):
    """An image this node has refused at this generation; it waits for a new assignment."""

    def __init__(self, image_id: str, generation: int) -> None:
        super().__init__(
            f"image {image_id} (generation {generation}) was already refused; "
            "waiting for a new assignment",
            image_id=image_id,
            generation=generation,
        )


class CredentialRefused(AuthError):
    """Keystone, reached over TLS against the CA fixed at enrollment, refused the node's
    credential (deleted, disabled, or the node's access removed)."""

    def __init__(self, status: int | str) -> None:
        super().__init__(
            f"keystone refused the node credential ({status}); revoked?", status=status
        )
