"""provisioner.transport: which requests may be sent again, and how a session gets the
retrying adapter (pure logic; the behaviour on real connections is in
tests/integration/test_transport.py)."""

from __future__ import annotations

import pytest
import requests

from provisioner import transport

pytestmark = pytest.mark.unit


def test_a_requests_session_gets_each_adapter_wrapped_once() -> None:
    s = requests.Session()
    transport.install(transport.install(s))
    adapters = list(s.adapters.values())
    assert adapters and all(isinstance(a, transport.RetryingAdapter) for a in adapters)
    assert not any(isinstance(a.inner, transport.RetryingAdapter) for a in adapters)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("method", "path", "body", "expected"),
    [
        ("GET", "/v3/projects/p", None, True),
        ("PUT", "/v2/images/i/file", b"x", True),
        ("DELETE", "/v1/secrets/s", None, True),
        ("POST", "/v3/auth/tokens", b"{}", True),
        ("POST", "/v3/users/u/application_credentials", b"{}", False),
        ("PATCH", "/v2/images/i", b"[]", False),
        ("PUT", "/v2/images/i/file", iter([b"x"]), False),
    ],
)
def test_what_is_repeatable(method: str, path: str, body: object, expected: bool) -> None:
    req = requests.Request(method, f"https://h{path}").prepare()
    req.body = body  # type: ignore[assignment]
    assert transport.repeatable(req) is expected
