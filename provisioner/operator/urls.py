"""Only https:// URLs: the operator's own, and every one that is handed to a node.

An operator command sends an admin password, a signing key's payload and image
passphrases; a node sends its credential and receives its key. Over http:// any of them
is readable on the wire, so a plain URL is refused before anything is sent to it: the
operator's Keystone URL and the catalog endpoints the operator uses (checked when the
connection is built), and at enrollment the node's Keystone URL and the catalog endpoints
of the interface the node will use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from provisioner.errors import UsageError

# the services a node (and the operator CLI) talks to, by catalog type
SERVICES = ("identity", "image", "key-manager")


def is_https(url: object) -> bool:
    if not isinstance(url, str):
        return False
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return False
    return parts.scheme.lower() == "https" and bool(parts.hostname)


def require_https(url: object, what: str, hint: str | None = None) -> str:
    if not is_https(url):
        raise UsageError(
            f"{what} {url!r} is not an https:// URL: edgepin refuses plain or malformed URLs",
            hint=hint or "serve the control plane over TLS and register https:// endpoints",
            url=url,
        )
    assert isinstance(url, str)
    return url


def catalog_urls(conn: Any, service_type: str, interface: str, region: str | None) -> list[str]:
    """The endpoints the token's service catalog lists (no request is made)."""
    access = conn.session.auth.get_access(conn.session)
    found = access.service_catalog.get_urls(
        service_type=service_type, interface=interface, region_name=region
    )
    return [str(u) for u in found or ()]


def check_catalog(
    conn: Any,
    interface: str,
    region: str | None,
    whose: str,
    services: Sequence[str] = SERVICES,
) -> dict[str, str]:
    """Every endpoint of the services edgepin uses, on ``interface``, must be https://.

    Returns the first URL of each service. A service missing from the catalog is an error
    too: the one who follows the catalog (``whose``) could not reach it.
    """
    chosen: dict[str, str] = {}
    where = f"interface {interface}" + (f", region {region}" if region else "")
    for service in services:
        found = catalog_urls(conn, service, interface, region)
        if not found:
            raise UsageError(
                f"the service catalog has no {service} endpoint ({where}) for {whose}",
                hint="register the endpoint in Keystone or choose another interface",
            )
        for url in found:
            require_https(
                url,
                f"the catalog's {service} endpoint ({where}) that {whose} would use",
                hint=f"register the {service} endpoint of {interface} with https:// "
                "(openstack endpoint set --url https://...)",
            )
        chosen[service] = found[0]
    return chosen
