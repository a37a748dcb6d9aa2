"""The node's calls to the control plane, and the one mapping of their answers to errors.

Every request the node makes after enrollment goes through :class:`NodeClient`: its
assignment (Keystone), an image's metadata and its bytes (Glance), an image key (Barbican)
and the node's member status on an image (Glance). Transport failures become edgepin
errors through :func:`provisioner.cloud.translate`; HTTP answers through :func:`check`.
"""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import Mapping
from typing import Any

from cryptography import x509
from keystoneauth1 import exceptions as ksa_exc

from provisioner import assignment, nodereport
from provisioner.cloud import translate
from provisioner.errors import (
    AuthError,
    CredentialRefused,
    EdgepinError,
    ImageError,
    NotFoundError,
    ServiceUnavailableError,
)
from provisioner.node import model
from provisioner.node.credentials import Identity

LOG = logging.getLogger(__name__)


RETRY_AFTER_MAX = 3600.0
"""The longest pause a Retry-After can ask of the node (an hour, like its own back-off)."""


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), at most
    :data:`RETRY_AFTER_MAX`; None when there is none or it says nothing usable."""
    if value is None:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit() and len(text) <= 12:
        seconds = float(text)
    else:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when is None or when.tzinfo is None:
            return None
        seconds = when.timestamp() - now
    return min(max(seconds, 0.0), RETRY_AFTER_MAX)


def check(
    status: int,
    service: str,
    what: str,
    ok: tuple[int, ...] = (200,),
    headers: Mapping[str, str] | None = None,
) -> None:
    """The one mapping from an HTTP status to an edgepin error (nothing for ``ok``).

    401 and 403 are refusals of access, never a verdict on an image: access can come back
    (an ACL being rewritten, a token renewed), so they are :class:`AuthError`. 404 is
    :class:`NotFoundError`; 429, 5xx and anything unexpected mean the service is not usable
    now (:class:`ServiceUnavailableError`; ``busy`` for 429 and 5xx, with the server's
    ``Retry-After`` in seconds when it sent one, so that the node backs off).
    """
    if status in ok:
        return
    subject = f"{service}: {what}"
    if status == 401:
        raise AuthError(f"{subject}: the credential was refused (401)", status=status)
    if status == 403:
        raise AuthError(f"{subject}: forbidden (403)", status=status)
    if status == 404:
        raise NotFoundError(f"{subject}: not found", status=status)
    if status == 429 or status >= 500:
        pause = parse_retry_after((headers or {}).get("Retry-After"), time.time())
        said = "too many requests" if status == 429 else "server error"
        raise ServiceUnavailableError(
            f"{subject}: {said} {status}", status=status, busy=True, retry_after=pause
        )
    raise ServiceUnavailableError(f"{subject}: unexpected status {status}", status=status)


class NodeClient:
    """The node's authenticated session and identity, and what it asks of each service."""

    def __init__(self, sess: Any, ident: Identity) -> None:
        self.sess = sess
        self.ident = ident

    def _endpoint(self, service_type: str) -> dict[str, str]:
        return {"service_type": service_type, "interface": self.ident.interface}

    def project(self) -> dict[str, Any]:
        """The node's project record (its assignment, its report image);
        :class:`CredentialRefused` when Keystone refuses the node."""
        url = f"{self.ident.auth_url}/projects/{self.ident.project_id}"
        try:
            r = self.sess.get(url, raise_exc=False)
            if r.status_code == 404 and self.sess.invalidate():
                # Keystone answers 404, not 401, to a token whose application credential
                # was deleted: ask again with a new token, which a deleted credential
                # cannot get (a project that is really gone stays 404)
                r = self.sess.get(url, raise_exc=False)
        except (ksa_exc.Unauthorized, ksa_exc.NotFound):
            # raised while authenticating: the application credential is gone or disabled
            raise CredentialRefused("authentication") from None
        except ksa_exc.HttpError as e:  # while authenticating: Keystone busy or broken
            response = getattr(e, "response", None)
            check(
                e.http_status or 500,
                "keystone",
                "authentication",
                headers=getattr(response, "headers", None),
            )
            raise  # pragma: no cover: check raises for every status an HttpError has
        except ksa_exc.ClientException as e:
            raise ServiceUnavailableError(
                f"control plane unreachable ({type(e).__name__})"
            ) from None
        if r.status_code in (401, 403):
            raise CredentialRefused(r.status_code)
        check(r.status_code, "keystone", "the node's project", headers=r.headers)
        try:
            project = r.json()["project"]
        except (ValueError, KeyError, TypeError):
            raise ServiceUnavailableError("keystone sent a malformed project record") from None
        if not isinstance(project, dict):
            raise ServiceUnavailableError("keystone sent a malformed project record")
        return project

    def verified_assignment(
        self, project: dict[str, Any], pinned: dict[str, x509.Certificate]
    ) -> model.Assignment | None:
        """The project's assignment, if signed for this node with a ``pinned`` certificate
        (else ImageError or VerificationError)."""
        raw = project.get(model.ASSIGNMENT_ATTR)
        return assignment.verify(raw, pinned, self.ident.project_id, self.ident.node_id)

    def assignment(self, pinned: dict[str, x509.Certificate]) -> model.Assignment | None:
        """The node's assignment (:meth:`project`, then :meth:`verified_assignment`)."""
        return self.verified_assignment(self.project(), pinned)

    def image(self, image_id: str) -> dict[str, Any]:
        """An image's metadata; ImageError when it does not exist or is not ours to see."""
        with translate("glance", f"image {image_id}"):
            r = self.sess.get(
                f"/v2/images/{image_id}", endpoint_filter=self._endpoint("image"), raise_exc=False
            )
        if r.status_code == 404:
            raise ImageError(
                f"assigned image {image_id} does not exist or is not shared with us",
                image_id=image_id,
            )
        check(r.status_code, "glance", f"image {image_id}", headers=r.headers)
        try:
            image = r.json()
        except ValueError:
            raise ImageError(
                f"glance sent malformed metadata for image {image_id}", image_id=image_id
            ) from None
        if not isinstance(image, dict) or image.get("id") != image_id:
            raise ImageError(
                f"glance sent metadata of another image than {image_id}", image_id=image_id
            )
        return image

    def download(self, image_id: str, offset: int) -> Any:
        """The response to a GET of the image's bytes from ``offset``; its status is the
        caller's to judge (a range answer decides how to go on; then :func:`check`)."""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        with translate("glance", f"download of {image_id}"):
            return self.sess.get(
                f"/v2/images/{image_id}/file",
                endpoint_filter=self._endpoint("image"),
                stream=True,
                headers=headers,
                raise_exc=False,
            )

    def secret(self, secret_id: str, *, text: bool) -> bytes:
        """A secret's payload; a 403 or 404 is an error, never an empty key."""
        accept = "text/plain" if text else "application/octet-stream"
        with translate("barbican", f"secret {secret_id}"):
            r = self.sess.get(
                f"/v1/secrets/{secret_id}/payload",
                endpoint_filter=self._endpoint("key-manager"),
                headers={"Accept": accept},
                raise_exc=False,
            )
        check(r.status_code, "barbican", f"secret {secret_id}", headers=r.headers)
        return bytes(r.content)

    def set_member_status(self, image_id: str, status: model.MemberStatus) -> bool:
        """Tell Glance what the node made of an image; False (logged) when it cannot."""
        try:
            with translate("glance", f"member status of {image_id}"):
                r = self.sess.put(
                    f"/v2/images/{image_id}/members/{self.ident.project_id}",
                    endpoint_filter=self._endpoint("image"),
                    json={"status": str(status)},
                    raise_exc=False,
                )
            check(r.status_code, "glance", f"member status of {image_id}", headers=r.headers)
        except EdgepinError as e:  # reporting never breaks the node; the local status has it
            LOG.warning("report: member status %s for %s not set: %s", status, image_id, e.message)
            return False
        return True

    def write_report(self, image_id: str, text: str) -> bool:
        """Write the node's report into its report image (its one writable record);
        False (logged) when it cannot: reporting never breaks the node."""
        try:
            with translate("glance", f"report image {image_id}"):
                r = self.sess.patch(
                    f"/v2/images/{image_id}",
                    endpoint_filter=self._endpoint("image"),
                    headers={"Content-Type": "application/openstack-images-v2.1-json-patch"},
                    json=[{"op": "add", "path": f"/{nodereport.PROPERTY}", "value": text}],
                    raise_exc=False,
                )
            check(r.status_code, "glance", f"report image {image_id}", headers=r.headers)
        except EdgepinError as e:
            LOG.warning("report: not written to %s: %s", image_id, e.message)
            return False
        return True
