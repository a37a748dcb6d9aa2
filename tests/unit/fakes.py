"""Stand-ins shared by unit tests of pure node logic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import strategies as st

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


IMAGE_A = "0b6c2f0e-5d1a-4c4e-9a51-1f0e2d3c4b5a"
IMAGE_B = "7f3e9a1c-2b4d-4e6f-8a0b-c1d2e3f4a5b6"


def enrollment_record() -> dict[str, Any]:
    return {
        "node_id": "node-0042",
        "project_id": "p" * 32,
        "user_id": "u" * 32,
        "auth_url": "https://keystone.example.test:5000/v3",
        "region": None,
        "interface": "public",
        "ca_sha256": "a" * 64,
        "credential_id": "c" * 32,
        "credential_sha256": "b" * 64,
        "pcrs": [7],
        "enrolled_at": "2026-12-01T23:00:00Z",
    }


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=30,
)
