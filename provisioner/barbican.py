"""Barbican secrets through openstacksdk, with the failures openstacksdk hides made explicit.

openstacksdk's ``get_secret`` returns ``payload=None`` on a 403 instead of raising, so
payloads are read with a direct GET whose status is checked.
"""

from __future__ import annotations

import base64
from typing import Any

from provisioner.cloud import translate
from provisioner.errors import AuthError, NotFoundError, ServiceUnavailableError


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


def acl_users(conn: Any, sid: str) -> list[str]:
    with translate("barbican", f"ACL of {sid}"):
        r = conn.key_manager.get(f"/secrets/{sid}/acl", raise_exc=False)
    if r.status_code == 404:
        raise NotFoundError(f"barbican: secret {sid} does not exist", secret_id=sid)
    r.raise_for_status()
    users: list[str] = r.json().get("read", {}).get("users", [])
    return users


def set_acl_users(conn: Any, sid: str, users: list[str]) -> None:
    """Replace the read ACL's user list; the owning project keeps its access."""
    with translate("barbican", f"ACL of {sid}"):
        r = conn.key_manager.put(
            f"/secrets/{sid}/acl",
            json={"read": {"users": sorted(set(users)), "project-access": True}},
            raise_exc=False,
        )
    if r.status_code == 404:
        raise NotFoundError(f"barbican: secret {sid} does not exist", secret_id=sid)
    if r.status_code not in (200, 201):
        raise ServiceUnavailableError(f"barbican: setting the ACL failed ({r.status_code})")
