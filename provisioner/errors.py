"""edgepin's errors: one class per failure area, with structured fields and an exit code.

The CLI prints ``edgepin: error: <message>`` (and ``hint: ...`` when there is one) and exits
with the class's code; a traceback only with ``--debug``.
"""

from __future__ import annotations

from typing import Any


class EdgepinError(Exception):
    """Base class. ``exit_code`` is stable: scripts and units rely on it."""

    exit_code = 1
    reason = "error"

    def __init__(self, message: str, *, hint: str | None = None, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.fields = fields


class UsageError(EdgepinError):
    """Bad arguments or a missing input file."""

    exit_code = 2
    reason = "usage"


class ConfigError(EdgepinError):
    """Node configuration or seed bundle missing or malformed."""

    exit_code = 3
    reason = "config"


class AuthError(EdgepinError):
    """The cloud credential was refused (expired, invalid, revoked)."""

    exit_code = 4
    reason = "auth"


class ServiceUnavailableError(EdgepinError):
    """A control-plane service cannot be reached or answers 5xx."""

    exit_code = 5
    reason = "service-unavailable"


class NotFoundError(EdgepinError):
    """A node, image or secret that does not exist (or is not visible)."""

    exit_code = 6
    reason = "not-found"


class ImageError(EdgepinError):
    """An image that is not acceptable: wrong format, missing properties."""

    exit_code = 7
    reason = "image"


class VerificationError(EdgepinError):
    """Hash or signature verification failed: the image is refused."""

    exit_code = 8
    reason = "verification"


class TrustError(EdgepinError):
    """TPM unseal refused, EK chain invalid, measured state differs."""

    exit_code = 9
    reason = "trust"


class StateError(EdgepinError):
    """Local state that cannot be used (rollback attempt, lock held, disk full)."""

    exit_code = 10
    reason = "state"


class GuestError(EdgepinError):
    """libvirt could not define or start the guest, or it is not healthy."""

    exit_code = 11
    reason = "guest"
