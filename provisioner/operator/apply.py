"""``edgepin plan`` and ``edgepin apply``: the fleet read once, the plan made, and the
changes it lists carried out with signed assignments.

Reading the fleet costs a few listings, never a request per node: the edge domain's
projects (labels, assignment records) and users, and the nodes' reports, a page per 1,000
(provisioner/operator/nodes.py, reports.py); one Glance query per rule's image and one
record per image nodes are assigned now. ``apply`` then checks each target image and its
secrets once, loads the signing key once, and assigns the nodes ``workers`` at a time
(:func:`provisioner.operator.assign.assign_many`).

``apply`` is idempotent: a node already assigned its rule's image is unchanged, so running
it again after an interruption (Ctrl-C, a crash, a lost connection) assigns only what is
left.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from provisioner.cloud import translate
from provisioner.errors import EdgepinError, ImageError, UsageError
from provisioner.operator import assign, labels, nodes, parallel, placement, reports
from provisioner.operator.placement import Action, Image, NodeView, Placement, Plan


@dataclass
class Fleet:
    domain_id: str
    nodes: dict[str, nodes.Node]
    views: list[NodeView]


def readable(node: nodes.Node) -> tuple[str | None, int | None]:
    """The assignment record's readable image id and generation (for people and plans;
    the node reads only the signed payload); (None, None) when there is none to read."""
    raw = node.project.get(nodes.ASSIGNMENT_ATTR)
    try:
        data = json.loads(raw) if isinstance(raw, str) else raw
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(data, dict):
        return None, None
    image_id, gen = data.get("image_id"), data.get("generation")
    return (
        image_id if isinstance(image_id, str) else None,
        gen if type(gen) is int else None,
    )


def load_fleet(conn: Any, edge_domain: str) -> Fleet:
    domain_id = nodes.edge_domain_id(conn, edge_domain)
    found = nodes.list_nodes(conn, domain_id)
    seen = reports.fleet_reports(conn, found)
    views = []
    for n in found:
        image_id, gen = readable(n)
        disabled = n.user is not None and n.user.get("enabled") is False
        views.append(
            NodeView(
                node_id=n.node_id,
                labels=labels.labels_of(n.project.get("tags")),
                image_id=image_id,
                generation=gen,
                revoked=bool(n.project.get("edgepin_revoked_at")) or disabled,
                report=seen[n.node_id].report,
                report_problem=seen[n.node_id].problem,
            )
        )
    return Fleet(domain_id, {n.node_id: n for n in found}, views)


def published(conn: Any, p: Placement) -> list[Image]:
    """The published images the rules name (one request per distinct reference); images
    that ``assign`` would refuse (not active, not edgepin's) are not among them."""
    refs = sorted({r.image for r in p.rules}, key=lambda r: (r.image_id or "", r.text()))

    def one(ref: placement.ImageRef) -> list[dict[str, Any]]:
        if ref.image_id:
            with translate("glance", f"image {ref.image_id}"):
                r = conn.image.get(f"/images/{ref.image_id}", raise_exc=False)
            return [r.json()] if r.status_code == 200 else []
        params = {"name": ref.name, "edgepin_version": ref.version, "status": "active"}
        with translate("glance", f"images {ref.text()}"):
            r = conn.image.get("/images", params={**params, "visibility": "all"})
        found: list[dict[str, Any]] = r.json().get("images", [])
        return found

    images: dict[str, Image] = {}
    for records in parallel.bounded_map(one, refs):
        for record in records:
            try:
                assign.check_image(record)
                image = placement.image_of(record)
            except (ImageError, placement.PlacementError):
                continue
            images[image.image_id] = image
    return sorted(images.values(), key=lambda i: i.image_id)


def current_names(conn: Any, views: list[NodeView]) -> dict[str, str]:
    """``name version`` of the images nodes are assigned now (one request per image)."""
    from provisioner.operator.status import image_names

    return image_names(conn, {v.image_id for v in views if v.image_id})


def make_plan(conn: Any, edge_domain: str, p: Placement) -> tuple[Plan, Fleet]:
    fleet = load_fleet(conn, edge_domain)
    images = published(conn, p)
    return placement.plan(fleet.views, p, images, current_names(conn, fleet.views)), fleet


@dataclass
class Applied:
    plan: Plan
    done: list[assign.Done]

    @property
    def failed(self) -> list[assign.Done]:
        return [d for d in self.done if d.error is not None]

    def as_dict(self) -> dict[str, Any]:
        return {
            "plan_digest": self.plan.digest,
            "assigned": [
                {"node": d.node_id, "image_id": d.image_id, "generation": d.generation}
                for d in self.done
                if d.error is None
            ],
            "failed": [
                {"node": d.node_id, "image_id": d.image_id, "error": d.error.message}
                for d in self.failed
                if d.error is not None
            ],
            "unchanged": len(self.plan.of(Action.UNCHANGED)),
            "left_out": [
                {"node": e.node, "reason": e.reason} for e in self.plan.of(Action.LEFT_OUT)
            ],
        }


def check_digest(plan: Plan, expected: str | None) -> None:
    if expected is not None and plan.digest != expected.removeprefix("sha256:"):
        raise UsageError(
            f"the plan is not the one given by --plan-digest (it is {plan.digest}): the fleet, "
            "its reports, the images or the file changed since",
            hint="run `edgepin plan FILE` again, read it, and apply with its digest",
        )


def assign_entries(
    conn: Any,
    fleet: Fleet,
    entries: list[placement.Entry],
    signer: assign.AssignmentSigner,
    workers: int,
    progress: Callable[[assign.Done], None] | None = None,
) -> list[assign.Done]:
    """Assign each entry's target to its node: every target image and its secrets checked
    once, the key loaded once."""
    if not entries:
        return []
    targets = sorted({e.target for e in entries if e.target})
    checked = parallel.bounded_map(lambda i: assign.prepare(conn, i), targets)
    prepared = dict(zip(targets, checked, strict=True))
    key, cert = signer.load(conn)
    jobs = [assign.Job(fleet.nodes[e.node], prepared[e.target]) for e in entries if e.target]
    return assign.assign_many(conn, fleet.domain_id, jobs, key, cert, workers, progress)


def apply(
    conn: Any,
    edge_domain: str,
    p: Placement,
    signer: assign.AssignmentSigner,
    *,
    plan_digest: str | None = None,
    workers: int = parallel.WORKERS,
    progress: Callable[[assign.Done], None] | None = None,
    planned: Callable[[Plan], None] | None = None,
) -> Applied:
    """Make the fleet what the placement says: assign every node the plan lists (all at
    once; the file's rollout, when it has one, is :mod:`provisioner.operator.rollout`'s)."""
    plan, fleet = make_plan(conn, edge_domain, p)
    check_digest(plan, plan_digest)
    if planned:
        planned(plan)
    done = assign_entries(conn, fleet, plan.of(Action.ASSIGN), signer, workers, progress)
    return Applied(plan, done)


class ApplyError(EdgepinError):
    """Some assignments of an apply failed (the others are written)."""

    def __init__(self, failed: int, total: int) -> None:
        super().__init__(
            f"{failed} of {total} assignments failed (the others are written)",
            hint="read the reasons above; `edgepin apply` again assigns what is left",
            failed=failed,
        )
