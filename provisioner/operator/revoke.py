"""``edgepin revoke``: cut a node off. Its user is disabled, its application credentials
deleted, its image memberships and secret ACLs withdrawn; the assignment record stays
for the audit trail, marked revoked."""

from __future__ import annotations

import datetime
from typing import Any

from provisioner.cloud import translate
from provisioner.operator import access, nodes
from provisioner.operator.assign import unshare


def revoke(conn: Any, edge_domain: str, node_id: str) -> dict[str, Any]:
    domain_id = nodes.edge_domain_id(conn, edge_domain)
    node = nodes.get_node(conn, domain_id, node_id)
    deleted: list[str] = []
    if node.user:
        with translate("keystone", f"disable user of {node_id}"):
            conn.identity.update_user(node.user_id, is_enabled=False)
        for cred in nodes.app_credentials(conn, node.user_id):
            nodes.delete_app_credential(conn, node.user_id, cred["id"])
            deleted.append(cred["id"])
    grants = node.grants
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    # the record first: the secrets' ACLs are derived from every node's record
    nodes.update_project(
        conn,
        node.project_id,
        {nodes.GRANTS_ATTR: {"images": [], "secrets": []}, "edgepin_revoked_at": now},
    )
    access.sync(conn, domain_id, grants.get("secrets", []))
    for image_id in grants.get("images", []):
        unshare(conn, image_id, node.project_id)
    return {
        "node_id": node_id,
        "credentials_deleted": deleted,
        "images_unshared": grants.get("images", []),
        "secrets_withdrawn": grants.get("secrets", []),
        "revoked_at": now,
    }
