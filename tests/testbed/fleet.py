"""Fleets of "paper" nodes for placement tests and benchmarks: in Keystone and Glance exactly
as ``edgepin enroll`` leaves a node (project tagged ``edgepin-node`` with its labels, user,
report image named in the project) plus the report its node would write, but no TPM, no
libvirt, no bootstrap credential. Made with the admin connection, ``workers`` at a time,
a handful of requests per node: a 10,000-node fleet is minutes, not the hours that
enrolling through ``edgepin enroll`` would take.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from provisioner import nodereport
from provisioner.node.model import REPORT_IMAGE_ATTR, State
from provisioner.operator import labels, parallel, reports
from provisioner.operator.nodes import NODE_TAG

FACTS = nodereport.Facts(
    cpus=4,
    guest_cpus=3,
    memory_mb=8192,
    disk_free_mb=20480,
    cpu_model="Test CPU",
    cpu_flags=("aes", "avx2", "sse4_2"),
    host="Debian GNU/Linux 13 (trixie)",
    kernel="6.12.0",
    virt_type="kvm",
    edgepin_version="0.1.0",
    local_images=(),
)


@dataclass
class PaperNode:
    name: str
    project_id: str
    user_id: str
    report_image: str


def _retry(call: Callable[[], Any], what: str, tries: int = 8) -> Any:
    """A request that a busy SQLite-backed service may refuse (500, 409 locks), again."""
    for attempt in range(tries):
        r = call()
        if r.status_code < 500:
            return r
        time.sleep(min(2.0, 0.1 * 2**attempt))
    raise AssertionError(f"{what}: {r.status_code} {r.text[:200]}")


def report_text(
    name: str,
    state: State = State.WAITING,
    facts: nodereport.Facts | None = FACTS,
    running: nodereport.Ref | None = None,
    assignment: nodereport.Ref | None = None,
) -> str:
    return nodereport.NodeReport(
        node=name,
        reported_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        state=state,
        reason="no assignment yet" if state is State.WAITING else str(state),
        error=None,
        assignment=assignment,
        running=running,
        running_version="",
        facts=facts,
    ).text()


def make_node(
    admin: Any,
    domain_id: str,
    name: str,
    node_labels: dict[str, str] | None = None,
    facts: nodereport.Facts | None = FACTS,
) -> PaperNode:
    tags = [NODE_TAG, *(labels.tag(k, v) for k, v in sorted((node_labels or {}).items()))]
    r = _retry(
        lambda: admin.identity.post(
            "/projects",
            json={"project": {"name": name, "domain_id": domain_id, "tags": tags}},
            raise_exc=False,
        ),
        f"project {name}",
    )
    assert r.status_code == 201, r.text
    project_id = r.json()["project"]["id"]
    r = _retry(
        lambda: admin.identity.post(
            "/users",
            json={"user": {"name": name, "domain_id": domain_id, "default_project_id": project_id}},
            raise_exc=False,
        ),
        f"user {name}",
    )
    assert r.status_code == 201, r.text
    user_id = r.json()["user"]["id"]
    r = _retry(
        lambda: admin.image.post(
            "/images",
            json={
                "name": f"edgepin-report-{name}",
                "owner": project_id,
                "visibility": "private",
                reports.KIND_PROPERTY: reports.KIND,
                "edgepin_node": name,
                nodereport.PROPERTY: report_text(name, facts=facts),
            },
            raise_exc=False,
        ),
        f"report image {name}",
    )
    assert r.status_code == 201, r.text
    image_id = r.json()["id"]
    r = _retry(
        lambda: admin.identity.patch(
            f"/projects/{project_id}",
            json={"project": {REPORT_IMAGE_ATTR: image_id}},
            raise_exc=False,
        ),
        f"project {name}",
    )
    assert r.status_code == 200, r.text
    return PaperNode(name, project_id, user_id, image_id)


def make_fleet(
    admin: Any,
    domain_id: str,
    count: int,
    node_labels: Callable[[int], dict[str, str]],
    prefix: str | None = None,
    workers: int = 8,
    facts: Callable[[int], nodereport.Facts | None] = lambda i: FACTS,
) -> list[PaperNode]:
    prefix = prefix or f"p{secrets.token_hex(3)}"
    return parallel.bounded_map(
        lambda i: make_node(admin, domain_id, f"{prefix}-{i:05d}", node_labels(i), facts(i)),
        range(count),
        workers,
    )


def write_report(admin: Any, node: PaperNode, text: str) -> None:
    """What the node's own reconcile writes (as the admin, who may too)."""
    r = _retry(
        lambda: admin.image.patch(
            f"/images/{node.report_image}",
            headers={"Content-Type": "application/openstack-images-v2.1-json-patch"},
            json=[{"op": "add", "path": f"/{nodereport.PROPERTY}", "value": text}],
            raise_exc=False,
        ),
        f"report of {node.name}",
    )
    assert r.status_code == 200, r.text


def assignment_of(admin: Any, node: PaperNode) -> dict[str, Any] | None:
    raw = (
        admin.identity.get(f"/projects/{node.project_id}")
        .json()["project"]
        .get("edgepin_assignment")
    )
    return json.loads(raw) if raw else None


def small(facts: nodereport.Facts = FACTS, **changes: Any) -> nodereport.Facts:
    return replace(facts, **changes)
