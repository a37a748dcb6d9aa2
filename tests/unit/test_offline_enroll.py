"""What ``edgepin enroll`` creates for the node's user, online and offline (pure)."""

from __future__ import annotations

import pytest

from provisioner.node.credentials import NODE_CREDENTIAL_NAME, access_rules
from provisioner.operator import enroll, nodes

pytestmark = pytest.mark.unit

PROJECT = "p" * 32
REPORT = "11111111-2222-3333-4444-555555555555"


def test_the_offline_credential_is_the_one_the_node_would_create_itself() -> None:
    spec = enroll.credential_spec("node-0042", PROJECT, REPORT, None)
    # the same name and access rules as the node's own online enrollment: one builder
    assert spec["name"] == NODE_CREDENTIAL_NAME == nodes.NODE_CREDENTIAL_NAME
    assert spec["access_rules"] == access_rules(PROJECT, REPORT)
    assert {"service": "image", "method": "PATCH", "path": f"/v2/images/{REPORT}"} in (
        spec["access_rules"]
    )
    assert spec["roles"] == [{"name": "member"}]


def test_the_offline_credential_is_restricted_and_does_not_expire() -> None:
    spec = enroll.credential_spec("node-0042", PROJECT, REPORT, None)
    # restricted (Keystone's default): it cannot create or delete application credentials
    assert "unrestricted" not in spec
    assert "expires_at" not in spec
    assert "secret" not in spec  # Keystone makes the secret; it is never chosen or stored here
    assert not any(
        r["service"] == "identity" and r["method"] != "GET" for r in spec["access_rules"]
    )


def test_the_bootstrap_credential_expires_and_may_create_the_nodes_own() -> None:
    spec = enroll.credential_spec("node-0042", PROJECT, REPORT, "2026-12-17T00:00:00")
    assert spec["name"].startswith(nodes.BOOTSTRAP_PREFIX + "-")
    assert spec["expires_at"] == "2026-12-17T00:00:00"
    assert spec["unrestricted"] is True
    assert "access_rules" not in spec
