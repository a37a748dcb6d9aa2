"""``edgepin status``: the fleet as the control plane sees it."""

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
            }
        )
    return rows
