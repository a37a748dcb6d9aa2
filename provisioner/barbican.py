"""Barbican secrets through openstacksdk, with the failures openstacksdk hides made explicit.

openstacksdk's ``get_secret`` returns ``payload=None`` on a 403 instead of raising, so
payloads are read with a direct GET whose status is checked.
"""

from __future__ import annotations

import base64
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from provisioner.cloud import translate
from provisioner.errors import AuthError, EdgepinError, NotFoundError, ServiceUnavailableError


def secret_id(ref_or_id: str) -> str:
    return ref_or_id.rstrip("/").rsplit("/", 1)[-1]


def store(conn: Any, name: str, secret_type: str, payload: bytes, *, text: bool = False) -> str:
    """Store a secret and return its UUID. Binary payloads go base64 as castellan does."""
    with translate("barbican", f"store {secret_type} secret"):
        if text:
            created = conn.key_manager.create_secret(
                name=name,
                secret_type=secret_type,
                payload=payload.decode(),
                payload_content_type="text/plain",
            )
        else:
            created = conn.key_manager.create_secret(
                name=name,
                secret_type=secret_type,
                payload=base64.b64encode(payload).decode(),
                payload_content_type="application/octet-stream",
                payload_content_encoding="base64",
            )
    return secret_id(created.secret_ref)


def payload(conn: Any, sid: str, *, text: bool = False) -> bytes:
    """Read a secret's payload; 403 and 404 raise instead of returning nothing."""
    accept = "text/plain" if text else "application/octet-stream"
    with translate("barbican", f"secret {sid}"):
        r = conn.key_manager.get(
            f"/secrets/{sid}/payload", headers={"Accept": accept}, raise_exc=False
        )
    if r.status_code == 404:
        raise NotFoundError(f"barbican: secret {sid} does not exist", secret_id=sid)
    if r.status_code in (401, 403):
        raise AuthError(f"barbican: not allowed to read secret {sid}", secret_id=sid)
    if r.status_code >= 500:
        raise ServiceUnavailableError(f"barbican: server error {r.status_code}")
    if r.status_code != 200:
        raise ServiceUnavailableError(f"barbican: unexpected status {r.status_code}")
    return bytes(r.content)


def delete(conn: Any, sid: str) -> None:
    with translate("barbican", f"delete secret {sid}"):
        conn.key_manager.delete_secret(sid, ignore_missing=True)


def secret_meta(conn: Any, sid: str) -> dict[str, Any]:
    """A secret's metadata (name, type, content types, status), never its payload."""
    with translate("barbican", f"secret {sid}"):
        r = conn.key_manager.get(f"/secrets/{sid}", raise_exc=False)
    _check(r.status_code, sid, "reading")
    meta: dict[str, Any] = r.json()
    return meta


class RequestTooLarge(EdgepinError):
    """Barbican refused a request body larger than its ``max_allowed_request_size_in_bytes``
    (25,000 bytes by default): a secret's ACL listing more than ~690 node users."""

    def __init__(self, sid: str, doing: str) -> None:
        super().__init__(
            f"barbican: {doing} secret {sid} refused as too large (413): the ACL lists more "
            "users than barbican.conf's max_allowed_request_size_in_bytes allows",
            hint="raise [DEFAULT] max_allowed_request_size_in_bytes in barbican.conf to at "
            "least 40 bytes per node sharing one image (see docs/production.md)",
            secret_id=sid,
        )


def _check(status: int, sid: str, doing: str) -> None:
    if status == 413:
        raise RequestTooLarge(sid, doing)
    if status == 404:
        raise NotFoundError(f"barbican: secret {sid} does not exist", secret_id=sid)
    if status in (401, 403):
        raise AuthError(f"barbican: {doing} secret {sid} is not allowed", secret_id=sid)
    if status >= 300:
        raise ServiceUnavailableError(
            f"barbican: {doing} secret {sid} failed ({status})", secret_id=sid
        )


# ACLs go through python-barbicanclient's ACL API. Barbican has no "add one user" call:
# PUT and PATCH on /v1/secrets/{id}/acl both replace the whole user list of the operations
# they name (barbican's SecretACLRepo._create_or_replace_acl_users), and barbicanclient's
# ``SecretACL.submit()`` is that PUT. Callers that must not lose a concurrent writer's entry
# derive the list instead of editing it (provisioner/operator/access.py).


def acl_client(conn: Any) -> Any:
    """A python-barbicanclient client on the operator's authenticated session."""
    from barbicanclient import client

    # its own error logs repeat what the edgepin error says, response text included
    logging.getLogger("barbicanclient.client").setLevel(logging.CRITICAL)
    with translate("barbican", "connect"):
        return client.Client(
            session=conn.session,
            endpoint=conn.config.get_endpoint("key-manager"),
            interface=conn.config.get_interface(),
            region_name=conn.config.get_region_name(),
        )


@contextlib.contextmanager
def _acl_errors(sid: str, doing: str) -> Iterator[None]:
    from barbicanclient import exceptions as bc_exc

    with translate("barbican", f"ACL of {sid}"):
        try:
            yield
        except bc_exc.HTTPError as e:
            _check(e.status_code or 500, sid, doing)
            raise
        except ValueError:  # barbicanclient's answer to a malformed id
            raise NotFoundError(f"barbican: {sid!r} is not a secret id", secret_id=sid) from None


def acl_users(client: Any, sid: str) -> list[str]:
    """The users on a secret's read ACL (the owning project's access is separate)."""
    with _acl_errors(sid, "reading the ACL of"):
        acl = client.acls.get(sid, ref_type="secret")
    read = acl.get("read")
    return sorted(read.users) if read is not None and read.users else []


def set_acl_users(client: Any, sid: str, users: list[str]) -> None:
    """Replace the read ACL's user list; the owning project keeps its access."""
    acl = client.acls.create(
        entity_ref=sid, ref_type="secret", users=sorted(set(users)), project_access=True
    )
    with _acl_errors(sid, "setting the ACL of"):
        acl.submit()
