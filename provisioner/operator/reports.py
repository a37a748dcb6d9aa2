"""The nodes' reports, operator side: each node's report image, and reading the fleet's.

``edgepin enroll`` makes every node one report image: a Glance image record without data,
owned by the node's project (so that Glance lets the node's credential change it and no
other project see it), marked ``edgepin_kind=node-report``, and named in the node's
project (``edgepin_report_image``, which only admins write). The node's credential gets an
access rule for exactly that image (provisioner/node/credentials.py). Reading the fleet's
reports is one listing of those records (pages of 1,000), never a request per node.

A report counts only when the record is the one the node's project names and the node's
project owns it; its text is parsed as untrusted input (provisioner/nodereport.py). The
time a node was last seen is Glance's ``updated_at`` of the record: the control plane's
clock, not the node's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from provisioner import nodereport
from provisioner.cloud import translate
from provisioner.errors import EdgepinError, ServiceUnavailableError
from provisioner.node.model import REPORT_IMAGE_ATTR, report_image_of
from provisioner.operator import nodes, parallel

KIND_PROPERTY = "edgepin_kind"
KIND = "node-report"
PAGE = 1000  # Glance's default api_limit_max


@dataclass(frozen=True)
class Seen:
    """What the control plane holds of one node's report."""

    report: nodereport.NodeReport | None
    problem: str | None = None  # why there is no usable report
    seen_at: str | None = None  # when the node last wrote it (Glance's updated_at)

    def as_dict(self) -> dict[str, Any]:
        return {
            "report": self.report.as_dict() if self.report else None,
            "problem": self.problem,
            "seen_at": self.seen_at,
        }


def ensure_report_image(conn: Any, node: nodes.Node) -> str:
    """The node's report image: the one its project names if it is still there and the
    project's, else a new one, named in the project (idempotent)."""
    known = report_image_of(node.project)
    if known is not None:
        with translate("glance", f"report image {known}"):
            r = conn.image.get(f"/images/{known}", raise_exc=False)
        if r.status_code == 200 and r.json().get("owner") == node.project_id:
            return known
    with translate("glance", f"report image of {node.node_id}"):
        r = conn.image.post(
            "/images",
            json={
                "name": f"edgepin-report-{node.node_id}",
                "owner": node.project_id,
                "visibility": "private",
                KIND_PROPERTY: KIND,
                "edgepin_node": node.node_id,
            },
            raise_exc=False,
        )
    if r.status_code != 201:
        raise EdgepinError(f"glance refused the report image of {node.node_id} ({r.status_code})")
    image_id = str(r.json()["id"])
    nodes.update_project(conn, node.project_id, {REPORT_IMAGE_ATTR: image_id})
    node.project[REPORT_IMAGE_ATTR] = image_id
    return image_id


def report_images(conn: Any) -> list[dict[str, Any]]:
    """Every report image record, in pages (Glance lists every project's to an admin;
    ``visibility=all`` includes one a node made ``community``)."""
    found: list[dict[str, Any]] = []
    params: dict[str, Any] = {"visibility": "all", KIND_PROPERTY: KIND, "limit": PAGE}
    while True:
        with translate("glance", "list the nodes' reports"):
            r = conn.image.get("/images", params=params, raise_exc=False)
        if r.status_code != 200:
            raise ServiceUnavailableError(f"glance: list the nodes' reports ({r.status_code})")
        page = r.json().get("images", [])
        found += page
        if len(page) < PAGE or not r.json().get("next"):
            return found
        params["marker"] = page[-1]["id"]


def match(fleet: Iterable[nodes.Node], images: Iterable[dict[str, Any]]) -> dict[str, Seen]:
    """Each node's report (pure): only from the record its project names and owns."""
    by_id = {str(i.get("id")): i for i in images if isinstance(i, dict)}
    seen: dict[str, Seen] = {}
    for node in fleet:
        rid = report_image_of(node.project)
        if rid is None:
            seen[node.node_id] = Seen(
                None, "no report image (enrolled by an edgepin without reports: enroll again)"
            )
            continue
        image = by_id.get(rid)
        if image is None:
            seen[node.node_id] = Seen(None, f"report image {rid} is gone")
            continue
        if image.get("owner") != node.project_id:
            seen[node.node_id] = Seen(None, f"report image {rid} is not the node's")
            continue
        at = image.get("updated_at")
        at = at if isinstance(at, str) and len(at) <= 32 and at.isprintable() else None
        text = image.get(nodereport.PROPERTY)
        if text is None:
            seen[node.node_id] = Seen(None, "no report yet")
            continue
        try:
            seen[node.node_id] = Seen(nodereport.parse(text, node.node_id), None, at)
        except nodereport.ReportError as e:
            seen[node.node_id] = Seen(None, e.message, at)
    return seen


FEW = 20  # up to this many nodes, their records are read one by one, not the whole listing


def _one(conn: Any, image_id: str) -> list[dict[str, Any]]:
    with translate("glance", f"report image {image_id}"):
        r = conn.image.get(f"/images/{image_id}", raise_exc=False)
    if r.status_code == 404:
        return []
    if r.status_code != 200:
        raise ServiceUnavailableError(f"glance: report image {image_id} ({r.status_code})")
    record: dict[str, Any] = r.json()
    return [record]


def fleet_reports(conn: Any, fleet: list[nodes.Node]) -> dict[str, Seen]:
    """The reports of ``fleet``: one listing of every report record, or for a few nodes
    (``edgepin status NODE``, a small wave) their own records."""
    if len(fleet) > FEW:
        return match(fleet, report_images(conn))
    ids = sorted({i for n in fleet if (i := report_image_of(n.project)) is not None})
    return match(
        fleet, [r for rs in parallel.bounded_map(lambda i: _one(conn, i), ids) for r in rs]
    )
