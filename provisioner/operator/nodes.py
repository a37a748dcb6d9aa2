"""Node records in Keystone: one project and one user per node in the edge domain.

The assignment and the operator's bookkeeping live as extra attributes of the node's
project: operators (admin) can write them, the node's own credential can read its own
project and nothing else.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_random_exponential

from provisioner.cloud import translate
from provisioner.errors import EdgepinError, NotFoundError, ServiceUnavailableError, UsageError

NODE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
NODE_TAG = "edgepin-node"
BOOTSTRAP_PREFIX = "edgepin-bootstrap"
NODE_CREDENTIAL_NAME = "edgepin-node"
ASSIGNMENT_ATTR = "edgepin_assignment"
GRANTS_ATTR = "edgepin_grants"


def check_node_id(node_id: str) -> str:
    if not NODE_ID_RE.match(node_id):
        raise UsageError(
            f"invalid node id {node_id!r}",
            hint="lowercase letters, digits and '-', at most 63 characters",
        )
    return node_id


@dataclass
class Node:
    node_id: str
    project: dict[str, Any]
    user: dict[str, Any] | None

    @property
    def project_id(self) -> str:
        return str(self.project["id"])

    @property
    def user_id(self) -> str:
        if not self.user:
            raise NotFoundError(f"node {self.node_id} has no user")
        return str(self.user["id"])

    @property
    def assignment(self) -> dict[str, Any] | None:
        raw = self.project.get(ASSIGNMENT_ATTR)
        if not raw:
            return None
        data: dict[str, Any] = json.loads(raw) if isinstance(raw, str) else raw
        return data

    @property
    def grants(self) -> dict[str, list[str]]:
        raw = self.project.get(GRANTS_ATTR)
        if not raw:
            return {"images": [], "secrets": []}
        data: dict[str, list[str]] = json.loads(raw) if isinstance(raw, str) else raw
        return data


def edge_domain_id(conn: Any, domain: str) -> str:
    with translate("keystone", f"domain {domain}"):
        r = conn.identity.get("/domains", params={"name": domain})
        r.raise_for_status()
    found = r.json()["domains"]
    if not found:
        raise NotFoundError(
            f"keystone: edge domain {domain!r} does not exist",
            hint="create it (openstack domain create) or set --edge-domain",
        )
    return str(found[0]["id"])


def find_node(conn: Any, domain_id: str, node_id: str) -> Node | None:
    with translate("keystone", f"node {node_id}"):
        r = conn.identity.get("/projects", params={"name": node_id, "domain_id": domain_id})
        r.raise_for_status()
        projects = r.json()["projects"]
        if not projects:
            return None
        u = conn.identity.get("/users", params={"name": node_id, "domain_id": domain_id})
        u.raise_for_status()
        users = u.json()["users"]
    return Node(node_id, projects[0], users[0] if users else None)


def get_node(conn: Any, domain_id: str, node_id: str) -> Node:
    node = find_node(conn, domain_id, check_node_id(node_id))
    if node is None:
        raise NotFoundError(
            f"unknown node {node_id!r}", hint="enroll it first with `edgepin enroll`"
        )
    return node


def list_nodes(conn: Any, domain_id: str) -> list[Node]:
    # the domain's projects, filtered here by their tag: Keystone's own tag filter
    # (``?tags=``) loads every tagged project for each page and compares ids in a list
    # (keystone/resource/core.py, list_projects), 44 s of Keystone CPU for 10,000 nodes
    # against 6 s without it, and filters after paging, so that a page can come back
    # empty while more follow
    everything = _listing(conn, "/projects", {"domain_id": domain_id}, "projects")
    projects = [p for p in everything if NODE_TAG in (p.get("tags") or [])]
    users = {x["name"]: x for x in _listing(conn, "/users", {"domain_id": domain_id}, "users")}
    nodes = [Node(p["name"], p, users.get(p["name"])) for p in projects]
    return sorted(nodes, key=lambda n: n.node_id)


PAGE = 1000  # Keystone's [DEFAULT] max_db_limit by default: its largest page


def _listing(conn: Any, path: str, params: dict[str, str], key: str) -> list[dict[str, Any]]:
    """A whole Keystone listing, page by page (Keystone 30 answers at most ``max_db_limit``,
    1,000 by default, per request, with a link to the next page). A listing cut short with
    no next page (an older Keystone's ``[DEFAULT] list_limit``) is an error, not a shorter
    fleet: decisions made from it (who may read a secret) would be wrong."""
    found: list[dict[str, Any]] = []
    query: dict[str, Any] = {**params, "limit": PAGE}
    while True:
        with translate("keystone", f"list {key}"):
            r = conn.identity.get(path, params=query)
            r.raise_for_status()
        data = r.json()
        page: list[dict[str, Any]] = data[key]
        found += page
        if page and (data.get("links") or {}).get("next"):
            if page[-1]["id"] == query.get("marker"):  # a server that ignores the marker
                raise ServiceUnavailableError(f"keystone: the list of {key} does not page")
            query = {**query, "marker": page[-1]["id"]}
            continue
        if data.get("truncated") and page:
            raise ServiceUnavailableError(
                f"keystone: the list of {key} in the edge domain is truncated",
                hint="raise or unset Keystone's list_limit ([DEFAULT] and [resource]/[identity])",
            )
        return found


class ServerError(Exception):
    """A 5xx answer to an idempotent request: worth sending again."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


# Keystone on SQLite (and a busy database elsewhere) answers 500 to one of two concurrent
# writes; a project update is idempotent, so it is sent again, for a bounded time
server_retry = retry(
    retry=retry_if_exception_type(ServerError),
    wait=wait_random_exponential(multiplier=0.1, max=2),
    stop=stop_after_delay(30),
    reraise=True,
)


def update_project(conn: Any, project_id: str, attrs: dict[str, Any]) -> dict[str, Any]:
    body = {
        k: json.dumps(v, sort_keys=True) if isinstance(v, dict | list) else v
        for k, v in attrs.items()
    }

    @server_retry
    def patch() -> Any:
        with translate("keystone", f"update project {project_id}"):
            r = conn.identity.patch(
                f"/projects/{project_id}", json={"project": body}, raise_exc=False
            )
        if r.status_code >= 500:
            raise ServerError(r.status_code)
        if r.status_code == 404:
            raise NotFoundError(f"keystone: project {project_id} does not exist")
        if r.status_code >= 300:
            raise EdgepinError(f"keystone: update project {project_id} refused ({r.status_code})")
        return r

    try:
        r = patch()
    except ServerError as e:
        raise ServiceUnavailableError(
            f"keystone: update project {project_id}: server error {e.status}"
        ) from None
    data: dict[str, Any] = r.json()["project"]
    return data


def app_credentials(conn: Any, user_id: str) -> list[dict[str, Any]]:
    with translate("keystone", "application credentials"):
        r = conn.identity.get(f"/users/{user_id}/application_credentials")
        r.raise_for_status()
    creds: list[dict[str, Any]] = r.json()["application_credentials"]
    return creds


def delete_app_credential(conn: Any, user_id: str, cred_id: str) -> None:
    with translate("keystone", f"delete application credential {cred_id}"):
        r = conn.identity.delete(
            f"/users/{user_id}/application_credentials/{cred_id}", raise_exc=False
        )
    if r.status_code not in (204, 404):
        r.raise_for_status()
