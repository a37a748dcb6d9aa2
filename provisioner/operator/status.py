"""``edgepin status``: the fleet as the control plane sees it.

Per node: its labels, the assignment, the Glance member status and the report its node
wrote (the last reconcile's outcome and reason, what it runs, when it was last seen), and
its credentials. The fleet is read in listings (a page per 1,000 nodes) of nodes and
reports, one member list and one record per image, plus one request per node for its
application credentials (8 at a time).

A node's user should hold one application credential: the bootstrap credential until the
node enrolls, its own node credential after. Any other one (a credential someone minted
with the bootstrap credential, a second node credential) is listed per node as a warning:
``unexpected_credentials`` and ``warnings`` in the JSON, and in the table's credential
column.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

from provisioner import hostassign
from provisioner.cloud import translate
from provisioner.operator import labels, nodes, parallel, reports
from provisioner.operator.selector import Selector


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


def members(conn: Any, image_id: str) -> dict[str, str]:
    """The member status of every project an image is shared with (one request)."""
    with translate("glance", f"members of {image_id}"):
        r = conn.image.get(f"/images/{image_id}/members", raise_exc=False)
    if r.status_code == 404:
        return {}
    if r.status_code >= 300:
        return {"*": f"error-{r.status_code}"}
    return {str(m.get("member_id")): str(m.get("status", "unknown")) for m in r.json()["members"]}


def image_names(conn: Any, image_ids: set[str]) -> dict[str, str]:
    """``name version`` of each image that still exists (one request per image)."""

    def one(image_id: str) -> tuple[str, str | None]:
        with translate("glance", f"image {image_id}"):
            r = conn.image.get(f"/images/{image_id}", raise_exc=False)
        if r.status_code != 200:
            return image_id, None
        image = r.json()
        name = " ".join(str(x) for x in (image.get("name"), image.get("edgepin_version")) if x)
        return image_id, name or None

    found = parallel.bounded_map(one, sorted(image_ids))
    return {i: n for i, n in found if n}


def status(
    conn: Any,
    edge_domain: str,
    node_id: str | None = None,
    select: Selector | None = None,
) -> list[dict[str, Any]]:
    """One row per node (all of them, ``node_id``, or those ``select`` matches): its labels,
    assignment, the member status and report its node wrote, its credentials."""
    domain_id = nodes.edge_domain_id(conn, edge_domain)
    found = (
        [nodes.get_node(conn, domain_id, node_id)] if node_id else nodes.list_nodes(conn, domain_id)
    )
    if select is not None:
        found = [n for n in found if select.matches(labels.labels_of(n.project.get("tags")))]
    seen = reports.fleet_reports(conn, found)
    assigned = {n.node_id: (n.assignment or {}) for n in found}
    image_ids = {str(a["image_id"]) for a in assigned.values() if a.get("image_id")}
    statuses = {i: members(conn, i) for i in sorted(image_ids)}
    running = {s.report.running.image_id for s in seen.values() if s.report and s.report.running}
    names = image_names(conn, image_ids | running)

    def credentials(node: nodes.Node) -> list[dict[str, Any]]:
        return nodes.app_credentials(conn, node.user_id) if node.user else []

    all_creds = parallel.bounded_map(credentials, found)
    rows = []
    for node, creds in zip(found, all_creds, strict=True):
        assignment = assigned[node.node_id]
        enabled = bool(node.user and node.user.get("enabled", True))
        enrolled, cred_state = credential_state(creds, enabled)
        unexpected = unexpected_credentials(creds)
        warnings = [
            f"unexpected application credential {c['name']} ({c['id']})" for c in unexpected
        ]
        if unexpected:
            # the table shows this column: the warning must be seen there too
            names_ = ", ".join(c["name"] for c in unexpected)
            cred_state += f"; UNEXPECTED: {names_}"
        image_id = assignment.get("image_id")
        member = None
        if image_id:
            shared = statuses.get(str(image_id), {})
            member = shared.get(node.project_id) or shared.get("*") or "not-shared"
        tags = labels.labels_of(node.project.get("tags"))
        report = seen[node.node_id]
        run = report.report.running if report.report else None
        facts = report.report.facts if report.report else None
        rows.append(
            {
                "node": node.node_id,
                "project_id": node.project_id,
                "labels": tags.as_dict(),
                "label_conflicts": {k: list(v) for k, v in tags.conflicts.items()},
                "image_id": image_id,
                "image": names.get(str(image_id)) if image_id else None,
                "generation": assignment.get("generation"),
                "member_status": member,
                "running_image_id": run.image_id if run else None,
                "running_image": names.get(run.image_id) if run else None,
                "running_generation": run.generation if run else None,
                "host_version": facts.host_version if facts else None,
                "host_slot": (facts.host_slot or None) if facts else None,
                "host_fallback": (facts.host_fallback or None) if facts else None,
                "host_assigned": _host_assigned(node.project),
                "host_next": (facts.host_next or None) if facts else None,
                "host_refused": (facts.host_refused or None) if facts else None,
                "host_watchdog": (facts.host_watchdog or None) if facts else None,
                "host_epoch": facts.host_epoch if facts else None,
                "host_floor": facts.host_floor if facts else None,
                "outcome": str(report.report.state) if report.report else None,
                "reason": report.report.reason if report.report else report.problem,
                "seen_at": report.seen_at,
                "report": report.as_dict(),
                "enrolled": enrolled,
                "credential": cred_state,
                "revoked_at": node.project.get("edgepin_revoked_at"),
                "unexpected_credentials": unexpected,
                "warnings": warnings,
            }
        )
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The fleet in figures (pure): nodes by outcome, by assigned image, by member status."""

    def count(key: str, missing: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in rows:
            k = str(r.get(key) or missing)
            out[k] = out.get(k, 0) + 1
        return dict(sorted(out.items()))

    return {
        "nodes": len(rows),
        "by_outcome": count("outcome", "no report"),
        "by_image": count("image_id", "none"),
        "by_member_status": count("member_status", "none"),
        "current": sum(
            1
            for r in rows
            if r.get("image_id")
            and r.get("running_image_id") == r.get("image_id")
            and r.get("running_generation") == r.get("generation")
            and r.get("outcome") == "running"
        ),
    }


def _esc(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _seconds(stamp: Any) -> float | None:
    if not isinstance(stamp, str):
        return None
    try:
        when = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def prometheus(rows: list[dict[str, Any]]) -> str:
    """The fleet in Prometheus' text format (pure): the figures of ``edgepin status``, for
    a textfile collector or any scraper the operator runs."""
    from provisioner.node.model import State

    s = summary(rows)
    lines = [
        "# HELP edgepin_fleet_nodes Nodes by the outcome of their last reconcile.",
        "# TYPE edgepin_fleet_nodes gauge",
    ]
    outcomes = {str(x) for x in State} | {"no report"} | set(s["by_outcome"])
    for outcome in sorted(outcomes):
        count = s["by_outcome"].get(outcome, 0)
        lines.append(f'edgepin_fleet_nodes{{outcome="{_esc(outcome)}"}} {count}')
    lines += [
        "# HELP edgepin_fleet_nodes_current Nodes whose report says they run their assignment.",
        "# TYPE edgepin_fleet_nodes_current gauge",
        f"edgepin_fleet_nodes_current {s['current']}",
        "# HELP edgepin_fleet_image_nodes Nodes assigned each image.",
        "# TYPE edgepin_fleet_image_nodes gauge",
    ]
    images = {r["image_id"]: r.get("image") or "" for r in rows if r.get("image_id")}
    for image_id, count in s["by_image"].items():
        if image_id in images:
            name = _esc(images[image_id])
            lines.append(
                f'edgepin_fleet_image_nodes{{image_id="{_esc(image_id)}",image="{name}"}} {count}'
            )
    lines += [
        "# HELP edgepin_node_info A node: labels (label_<key>), images, outcome, member status.",
        "# TYPE edgepin_node_info gauge",
    ]
    gauges: dict[str, list[str]] = {
        "edgepin_node_assigned_generation": [],
        "edgepin_node_running_generation": [],
        "edgepin_node_last_seen_timestamp_seconds": [],
    }
    for r in rows:
        node = f'node="{_esc(r["node"])}"'
        extra = "".join(
            f',label_{k.replace(".", "_").replace("-", "_")}="{_esc(v)}"'
            for k, v in sorted(r["labels"].items())
        )
        fields = (
            ("image_id", r.get("image_id")),
            ("running_image_id", r.get("running_image_id")),
            ("outcome", r.get("outcome") or "no report"),
            ("member_status", r.get("member_status")),
        )
        info = "".join(f',{k}="{_esc(v or "")}"' for k, v in fields)
        lines.append(f"edgepin_node_info{{{node}{info}{extra}}} 1")
        for name, value in (
            ("edgepin_node_assigned_generation", r.get("generation")),
            ("edgepin_node_running_generation", r.get("running_generation")),
            ("edgepin_node_last_seen_timestamp_seconds", _seconds(r.get("seen_at"))),
        ):
            if isinstance(value, int | float) and not isinstance(value, bool):
                gauges[name].append(f"{name}{{{node}}} {value:.0f}")
    helps = {
        "edgepin_node_assigned_generation": "Generation of the node's assignment record.",
        "edgepin_node_running_generation": "Generation of the guest the node reports running.",
        "edgepin_node_last_seen_timestamp_seconds": "When the node last wrote its report.",
    }
    for name, samples in gauges.items():
        lines += [f"# HELP {name} {helps[name]}", f"# TYPE {name} gauge", *samples]
    return "\n".join(lines) + "\n"


def _host_assigned(project: dict[str, Any]) -> int | None:
    """The host version of the node's host assignment (the record's readable copy: the
    node acts only on the signed payload), or None."""
    raw = project.get(hostassign.ATTR)
    try:
        doc = json.loads(raw) if isinstance(raw, str) else raw
    except (ValueError, RecursionError):
        return None
    version = doc.get("host_version") if isinstance(doc, dict) else None
    return version if type(version) is int else None
