"""``edgepin status``: the fleet as the control plane sees it.

A node's user should hold one application credential: the bootstrap credential until the
node enrolls, its own node credential after. Any other one (a credential someone minted
with the bootstrap credential, a second node credential) is listed per node as a warning:
``unexpected_credentials`` and ``warnings`` in the JSON, and in the table's credential
column.
"""

from __future__ import annotations

import datetime
from typing import Any

from provisioner.cloud import translate
from provisioner.operator import nodes


def member_status(conn: Any, image_id: str, project_id: str) -> str:
    with translate("glance", f"membership of {image_id}"):
        r = conn.image.get(f"/images/{image_id}/members/{project_id}", raise_exc=False)
    if r.status_code == 404:
        return "not-shared"
    if r.status_code >= 300:
        return f"error-{r.status_code}"
    return str(r.json().get("status", "unknown"))


def credential_state(creds: list[dict[str, Any]], enabled: bool) -> tuple[bool, str]:
    """(enrolled, description) from the user's application credentials."""
    if not enabled:
        return False, "revoked"
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    node_cred = [c for c in creds if c["name"] == nodes.NODE_CREDENTIAL_NAME]
    boot = [c for c in creds if c["name"].startswith(nodes.BOOTSTRAP_PREFIX)]
    if node_cred:
        return True, "node credential" + (" + bootstrap (stale)" if boot else "")
    if boot:
        exp = boot[0].get("expires_at")
        if exp and datetime.datetime.fromisoformat(exp.rstrip("Z")) < now:
            return False, "bootstrap expired"
        return False, f"bootstrap until {exp[:16] if exp else '?'}"
    return False, "none"


def unexpected_credentials(creds: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The application credentials a node's user should not have (pure).

    Expected: the one node credential once the node has enrolled, the one bootstrap
    credential before. Everything else is unexpected: a bootstrap credential beside a node
    credential, any other name, and every duplicate.
    """
    node_creds = [c for c in creds if c.get("name") == nodes.NODE_CREDENTIAL_NAME]
    boot = [c for c in creds if str(c.get("name", "")).startswith(nodes.BOOTSTRAP_PREFIX)]
    if len(node_creds) == 1:
        expected = node_creds
    elif not node_creds and len(boot) == 1:
        expected = boot
    else:
        expected = []
    keep = {id(c) for c in expected}
    return [
        {"id": str(c.get("id", "?")), "name": str(c.get("name", "?"))}
        for c in creds
        if id(c) not in keep
    ]


def status(conn: Any, edge_domain: str, node_id: str | None = None) -> list[dict[str, Any]]:
    domain_id = nodes.edge_domain_id(conn, edge_domain)
    found = (
        [nodes.get_node(conn, domain_id, node_id)] if node_id else nodes.list_nodes(conn, domain_id)
    )
    rows = []
    for node in found:
        assignment = node.assignment or {}
        enabled = bool(node.user and node.user.get("enabled", True))
        creds = nodes.app_credentials(conn, node.user_id) if node.user else []
        enrolled, cred_state = credential_state(creds, enabled)
        unexpected = unexpected_credentials(creds)
        warnings = [
            f"unexpected application credential {c['name']} ({c['id']})" for c in unexpected
        ]
        if unexpected:
            # the table shows this column: the warning must be seen there too
            names = ", ".join(c["name"] for c in unexpected)
            cred_state += f"; UNEXPECTED: {names}"
        image_id = assignment.get("image_id")
        rows.append(
            {
                "node": node.node_id,
                "project_id": node.project_id,
                "image_id": image_id,
                "generation": assignment.get("generation"),
                "member_status": member_status(conn, image_id, node.project_id)
                if image_id
                else None,
                "enrolled": enrolled,
                "credential": cred_state,
                "revoked_at": node.project.get("edgepin_revoked_at"),
                "unexpected_credentials": unexpected,
                "warnings": warnings,
            }
        )
    return rows
