"""Many ``assign``s at once against the real Barbican: no node loses its ACL entry.

Barbican's ACL API replaces a secret's whole user list on every write; ``assign`` derives
that list from every node's record instead of editing it (provisioner/operator/access.py).
Here many assigns run in parallel threads, each with its own connection, on the same
images (so on the same passphrase and the same certificate), and then every node's user
reads what it should and is refused what it should not.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import openstack
import pytest

from provisioner.operator import assign, nodes
from tests.testbed.controlplane import EDGE_DOMAIN, REGION, ControlPlane
from tests.testbed.operator import Signer

pytestmark = pytest.mark.integration

NODES = 12


@dataclass
class FleetNode:
    name: str
    user_id: str
    project_id: str
    password: str
    domain_id: str

    def connection(self, cp: ControlPlane) -> Any:
        return openstack.connect(
            auth_url=cp.auth_url,
            user_id=self.user_id,
            password=self.password,
            project_id=self.project_id,
            region_name=REGION,
            cacert=str(cp.ca_path),
            identity_api_version="3",
            load_yaml_config=False,
            load_envvars=False,
        )


@pytest.fixture(scope="module")
def fleet(admin: Any) -> list[FleetNode]:
    """Node identities as enroll makes them (project tagged as a node, user of the same
    name, member role), without the TPM part, which assign does not look at."""
    domain = admin.identity.find_domain(EDGE_DOMAIN, ignore_missing=False)
    member = admin.identity.find_role("member", ignore_missing=False)
    made = []
    for i in range(NODES):
        name = f"c{i:02d}-{secrets.token_hex(3)}"
        project = admin.identity.create_project(
            name=name, domain_id=domain.id, tags=[nodes.NODE_TAG]
        )
        password = secrets.token_urlsafe(18)
        user = admin.identity.create_user(
            name=name, password=password, domain_id=domain.id, default_project_id=project.id
        )
        admin.identity.assign_project_role_to_user(project, user, member)
        made.append(FleetNode(name, user.id, project.id, password, domain.id))
    return made


def assign_all(cp: ControlPlane, pairs: list[tuple[FleetNode, str]], signer: Signer) -> None:
    """Run every (node, image) assign at the same moment, one thread and connection each."""
    conns = [cp.admin_connection() for _ in pairs]
    for conn in conns:
        conn.authorize()
    start = threading.Barrier(len(pairs))

    def one(i: int) -> assign.Assigned:
        start.wait()
        node, image_id = pairs[i]
        by = assign.AssignmentSigner(signer.cert_id, signer.key_id)
        return assign.assign(conns[i], EDGE_DOMAIN, node.name, image_id, by)

    try:
        with ThreadPoolExecutor(max_workers=len(pairs)) as pool:
            results = list(pool.map(one, range(len(pairs))))
    finally:
        for conn in conns:
            conn.close()
    assert [r.image_id for r in results] == [image for _, image in pairs]


def acl(admin: Any, secret_id: str) -> set[str]:
    data = admin.key_manager.get(f"/secrets/{secret_id}/acl").json()
    return set(data.get("read", {}).get("users", []))


def readable(conn: Any, secret_id: str, accept: str = "text/plain") -> bool:
    r = conn.key_manager.get(
        f"/secrets/{secret_id}/payload", headers={"Accept": accept}, raise_exc=False
    )
    assert r.status_code in (200, 403), r.status_code
    return bool(r.status_code == 200)


def test_concurrent_assigns_lose_no_acl_entry(
    controlplane: ControlPlane,
    admin: Any,
    fleet: list[FleetNode],
    publish: Callable[..., dict[str, Any]],
    signer: Signer,
) -> None:
    a, b = publish(version="a"), publish(version="b")
    cert_id = admin.image.get(f"/images/{a['image_id']}").json()["img_signature_certificate_uuid"]
    users = {n.user_id for n in fleet}

    # every node onto image A at once: one passphrase, one certificate, twelve writers
    assign_all(controlplane, [(n, a["image_id"]) for n in fleet], signer)
    assert users <= acl(admin, a["key_id"])
    assert users <= acl(admin, cert_id)

    # then half move to B while the other half are assigned A again, all at once: grants
    # and withdrawals on the same three secrets
    on_b = fleet[::2]
    on_a = fleet[1::2]
    assign_all(
        controlplane,
        [(n, b["image_id"]) for n in on_b] + [(n, a["image_id"]) for n in on_a],
        signer,
    )
    assert acl(admin, b["key_id"]) & users == {n.user_id for n in on_b}
    assert acl(admin, a["key_id"]) & users == {n.user_id for n in on_a}
    assert users <= acl(admin, cert_id)

    # and what Barbican enforces, as each node's own user sees it
    for node in fleet:
        conn = node.connection(controlplane)
        try:
            mine, other = (b, a) if node in on_b else (a, b)
            assert readable(conn, mine["key_id"]), node.name
            assert readable(conn, cert_id, "application/octet-stream"), node.name
            assert not readable(conn, other["key_id"]), node.name
        finally:
            conn.close()
