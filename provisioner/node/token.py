"""The node's Keystone token, kept in memory between reconciles.

A reconcile that finds nothing to do costs Keystone one request (the node's project) when
the node still holds a token, and two when it must first issue one; issuing and validating
tokens is most of what a fleet costs Keystone (docs/performance.md). The token is kept in
``/run/edgepin/token.json`` (0600) and only if that folder is in memory (tmpfs or ramfs):
it never reaches a persistent disk, and a power cut forgets it. keystoneauth renews it
when it has less than two minutes left, and on a 401 it issues a new one once; Keystone
answers 404 to a token of a deleted application credential, and the node's client then asks
once with a new token. A revoked node is refused as soon as Keystone refuses its token
(docs/production.md says how Keystone must run for that to be at once).

The file is read back as untrusted input: :func:`parse` accepts only a token of the
credential the node holds now, for the Keystone it was enrolled with.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from provisioner.errors import StateError
from provisioner.node import state

LOG = logging.getLogger(__name__)

MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})
MAX_BYTES = 1 << 20  # a token with its catalog is a few KiB


def path(run_dir: Path) -> Path:
    return run_dir / "token.json"


def filesystem_of(p: Path, mounts: str | None = None) -> str | None:
    """The type of the filesystem ``p`` is on, from ``/proc/self/mounts`` (the mount point
    that is the longest prefix of the resolved path)."""
    if mounts is None:
        try:
            mounts = Path("/proc/self/mounts").read_text()
        except OSError:
            return None
    target = str(p.resolve())
    best, kind = "", None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[1])  # \040: " "
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(
            best
        ):
            best, kind = point, fields[2]
    return kind


def in_memory(run_dir: Path) -> bool:
    return filesystem_of(run_dir) in MEMORY_FILESYSTEMS


def parse(raw: bytes, credential_id: str, auth_url: str) -> str:
    """keystoneauth's auth state for ``credential_id`` at ``auth_url``, or :class:`StateError`."""
    if len(raw) > MAX_BYTES:
        raise StateError("the kept token is too large")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise StateError("the kept token is not JSON") from None
    if not isinstance(doc, dict):
        raise StateError("the kept token is not a record")
    if doc.get("credential_id") != credential_id or doc.get("auth_url") != auth_url:
        raise StateError("the kept token belongs to another credential")
    auth_state = doc.get("auth_state")
    if not isinstance(auth_state, str):
        raise StateError("the kept token has no auth state")
    try:
        inner = json.loads(auth_state)
    except (ValueError, RecursionError):
        raise StateError("the kept token's auth state is not JSON") from None
    if not isinstance(inner, dict):
        raise StateError("the kept token's auth state is not a record")
    token, body = inner.get("auth_token"), inner.get("body")
    if not (isinstance(token, str) and token.isascii() and token.isprintable() and token):
        raise StateError("the kept token's id is malformed")
    if not (isinstance(body, dict) and isinstance(body.get("token"), dict)):
        raise StateError("the kept token's body is malformed")
    if not isinstance(body["token"].get("expires_at"), str):
        raise StateError("the kept token has no expiry")
    return auth_state


def restore(run_dir: Path, auth: Any, credential_id: str, auth_url: str) -> bool:
    """Give ``auth`` (a keystoneauth identity plugin) the kept token, if there is a usable one."""
    p = path(run_dir)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        return False
    except OSError as e:
        LOG.warning("token: cannot read %s (%s); issuing a new one", p, e.strerror)
        return False
    try:
        auth.set_auth_state(parse(raw, credential_id, auth_url))
    except StateError as e:
        LOG.info("token: %s; issuing a new one", e.message)
        forget(run_dir)
        return False
    except Exception as e:  # keystoneauth's own reading of a state we checked the shape of
        LOG.info("token: keystoneauth cannot use the kept token (%s)", type(e).__name__)
        forget(run_dir)
        return False
    return True


def keep(run_dir: Path, auth: Any, credential_id: str, auth_url: str) -> None:
    """Save ``auth``'s token for the next reconcile (in memory only), or forget it when
    the plugin holds none (never issued, or invalidated after a refusal)."""
    auth_state = auth.get_auth_state() if getattr(auth, "auth_ref", None) is not None else None
    if not auth_state:
        forget(run_dir)
        return
    if not in_memory(run_dir):
        LOG.debug("token: %s is not in memory; the token is not kept", run_dir)
        return
    doc = {"credential_id": credential_id, "auth_url": auth_url, "auth_state": auth_state}
    data = json.dumps(doc, sort_keys=True).encode()
    p = path(run_dir)
    with contextlib.suppress(OSError):
        if p.read_bytes() == data:
            return
    try:
        state.atomic_write(p, data, 0o600)
    except (OSError, StateError) as e:
        LOG.warning("token: cannot keep it in %s (%s)", p, e)


def forget(run_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path(run_dir))
