"""Stand-ins shared by unit tests of pure node logic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from provisioner.node.client import NodeClient
from provisioner.node.credentials import Identity


def identity(interface: str = "public") -> Identity:
    return Identity(
        node_id="node-1",
        project_id="p" * 32,
        user_id="u" * 32,
        auth_url="https://keystone.invalid/v3",
        region=None,
        interface=interface,
        ca_file=Path("/nonexistent/ca.pem"),
    )


def node_client(session: Any) -> NodeClient:
    """A NodeClient over a fake session (an object with keystoneauth's get/put signature)."""
    return NodeClient(session, identity())
