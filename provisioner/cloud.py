"""Connections to the control plane, and translation of its failures into edgepin errors.

Operators authenticate the way the OpenStack client does: clouds.yaml, ``--os-cloud``,
``--os-*`` options and ``OS_*`` variables, all through openstacksdk's own config loader.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from typing import Any

from keystoneauth1 import exceptions as ksa_exc

from provisioner import transport
from provisioner.errors import (
    AuthError,
    EdgepinError,
    NotFoundError,
    ServiceUnavailableError,
    UsageError,
)


def register_auth_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Add ``--os-cloud`` and the other ``--os-*`` options, as the openstack client has them."""
    # openstacksdk is the operator's (0.4-0.5 s of imports); the node talks to the
    # services through keystoneauth alone, so nothing here imports it at module level
    from openstack.config import OpenStackConfig

    OpenStackConfig().register_argparse_arguments(parser, argv)


def connect(args: argparse.Namespace) -> Any:
    """Build the operator's connection and make sure the credential works."""
    import openstack.connection
    from openstack import exceptions as sdk_exc
    from openstack.config import OpenStackConfig

    with translate("keystone"):
        try:
            region = OpenStackConfig().get_one(argparse=args)
            conn = openstack.connection.Connection(config=region, app_name="edgepin")
            transport.install(conn.session.session)
        except (sdk_exc.ConfigException, ksa_exc.MissingRequiredOptions) as e:
            raise UsageError(
                f"cannot load cloud configuration: {e}",
                hint="set --os-cloud or OS_CLOUD (clouds.yaml), or the OS_* variables",
            ) from None
        check_operator_urls(conn, before_auth=True)
        conn.authorize()
        check_operator_urls(conn, before_auth=False)
    return conn


def check_operator_urls(conn: Any, *, before_auth: bool) -> None:
    """The operator's Keystone URL (before the password goes to it), then every catalog
    endpoint and endpoint override the operator's commands use: https:// only."""
    from provisioner.operator import urls

    config = conn.config
    overridden = [s for s in urls.SERVICES if config.get_endpoint(s)]
    if before_auth:
        auth_url = config.get_auth_args().get("auth_url")
        urls.require_https(
            auth_url, "the Keystone URL (auth_url)", hint="use the https:// URL of Keystone"
        )
        for service in overridden:
            urls.require_https(config.get_endpoint(service), f"the {service} endpoint override")
        return
    urls.check_catalog(
        conn,
        config.get_interface() or "public",
        config.get_region_name(),
        "edgepin",
        services=[s for s in urls.SERVICES if s not in overridden],
    )


def _status(exc: Exception) -> int | None:
    for attr in ("status_code", "http_status"):
        value = getattr(exc, attr, None)
        if isinstance(value, int):
            return value
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None)
    return code if isinstance(code, int) else None


@contextlib.contextmanager
def translate(service: str, what: str = "") -> Iterator[None]:
    """Turn openstacksdk/keystoneauth exceptions into one-line edgepin errors.

    Anything else goes through unchanged.
    """
    subject = f"{service}{': ' + what if what else ''}"
    try:
        yield
    except EdgepinError:
        raise
    except Exception as e:
        err = _translated(subject, e)
        if err is None:
            raise
        raise err from None


def _translated(subject: str, e: Exception) -> EdgepinError | None:
    # openstacksdk's exceptions can only have been raised if openstacksdk was imported
    sdk_exc = sys.modules.get("openstack.exceptions")
    if transport.verification_failed(e):
        return ServiceUnavailableError(
            f"{subject}: TLS verification failed ({transport.describe(e)})",
            hint="check the CA bundle (cacert in clouds.yaml or --os-cacert)",
        )
    if transport.connection_broke(e):
        return ServiceUnavailableError(
            f"{subject}: unreachable (the connection broke: {transport.describe(e)})",
            hint="the service closed the connection before it answered; "
            "if it keeps happening, look at its load and its logs",
        )
    if isinstance(e, ksa_exc.SSLError):
        return ServiceUnavailableError(
            f"{subject}: TLS failed ({transport.describe(e)})",
            hint="is the URL the service's https:// endpoint?",
        )
    if isinstance(e, (ksa_exc.ConnectFailure, ksa_exc.ConnectTimeout, ksa_exc.DiscoveryFailure)):
        return ServiceUnavailableError(f"{subject}: unreachable ({_first_line(e)})")
    if isinstance(e, (ksa_exc.Unauthorized, ksa_exc.HttpError)) or (
        sdk_exc is not None and isinstance(e, sdk_exc.HttpException)
    ):
        code = _status(e)
        if code == 401 or isinstance(e, ksa_exc.Unauthorized):
            return AuthError(
                f"{subject}: the credential was refused (401)",
                hint="it may be expired, revoked or wrong",
            )
        if code == 403:
            return AuthError(f"{subject}: forbidden (403)")
        if code == 404 or (sdk_exc is not None and isinstance(e, sdk_exc.NotFoundException)):
            return NotFoundError(f"{subject}: not found")
        if code is not None and code >= 500:
            return ServiceUnavailableError(f"{subject}: server error {code}")
        return EdgepinError(f"{subject}: {_first_line(e)}")
    if isinstance(e, ksa_exc.ClientException):
        return ServiceUnavailableError(f"{subject}: {_first_line(e)}")
    if sdk_exc is not None and isinstance(e, sdk_exc.SDKException):
        text = _first_line(e)
        if "(HTTP 401)" in text:
            return AuthError(
                f"{subject}: the credential was refused (401)",
                hint="it may be expired, revoked or wrong",
            )
        if "does not have any supported versions" in text:
            return ServiceUnavailableError(f"{subject}: unreachable (version discovery failed)")
        if "Unable to establish connection" in text or "SSL" in text:
            return ServiceUnavailableError(f"{subject}: unreachable ({_short(text)})")
        return EdgepinError(f"{subject}: {text}")
    return None


def _short(text: str) -> str:
    """The useful tail of a urllib3 error: 'Connection refused', 'certificate verify failed'."""
    for marker in (
        "Connection refused",
        "certificate verify failed",
        "timed out",
        "Name or service",
    ):
        if marker in text:
            return marker
    return text[:120]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
