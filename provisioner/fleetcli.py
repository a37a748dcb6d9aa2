"""The fleet commands of ``edgepin``: ``label``, ``plan``, ``apply``, and what ``status``
shows of labels and reports. Kept apart from provisioner/cli.py, which adds them with
:func:`add_parsers`."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parsers(sub: Any) -> None:
    _add_label(sub)


def _add_label(sub: Any) -> None:
    p = sub.add_parser(
        "label",
        help="show or change a node's labels (Keystone project tags)",
        description="Set (KEY=VALUE) or remove (KEY-) labels of a node; without LABEL, show "
        "them. A label is the tag edgepin-label:KEY=VALUE on the node's project; keys and "
        "values are lowercase letters, digits, '.', '_' and '-' (at most 63). Placement "
        "files and `edgepin status --label` select nodes by them.",
    )
    p.add_argument("node_id", metavar="NODE_ID")
    p.add_argument("labels", metavar="LABEL", nargs="*", help="KEY=VALUE to set, KEY- to remove")
    p.add_argument("--json", action="store_true", help="print the labels as JSON")
    p.set_defaults(handler=cmd_label, needs_cloud=True)


def cmd_label(args: argparse.Namespace) -> int:
    from provisioner.operator.labels import label

    got = label(args.conn, args.edge_domain, args.node_id, args.labels)
    if args.json:
        data = {"node": args.node_id, "labels": got.as_dict(), "conflicts": got.conflicts}
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    for key, value in got.as_dict().items():
        print(f"{key}={value}")
    for key, values in sorted(got.conflicts.items()):
        print(f"{key}={'|'.join(values)}  (conflict: set it again to keep one value)")
    return 0


def status_table(rows: list[dict[str, Any]], title: str) -> None:
    """``edgepin status`` as a table and a summary (rich)."""
    from rich.console import Console
    from rich.table import Table

    from provisioner.operator.status import summary

    table = Table(title=title)
    columns = (
        "node",
        "labels",
        "assigned (gen)",
        "running (gen)",
        "outcome",
        "reason",
        "last seen",
        "member",
        "credential",
    )
    for col in columns:
        table.add_column(col, overflow="fold")
    for r in rows:
        labels = ",".join(f"{k}={v}" for k, v in r["labels"].items())
        if r["label_conflicts"]:
            labels += " CONFLICT: " + ",".join(r["label_conflicts"])
        table.add_row(
            r["node"],
            labels or "-",
            _image(r["image"], r["image_id"], r["generation"]),
            _image(r["running_image"], r["running_image_id"], r["running_generation"]),
            r["outcome"] or "-",
            (r["reason"] or "-")[:120],
            (r["seen_at"] or "-").replace("T", " ").rstrip("Z"),
            r["member_status"] or "-",
            r["credential"],
        )
    console = Console(width=200)
    console.print(table)
    s = summary(rows)
    console.print(
        f"{s['nodes']} nodes, {s['current']} running their assignment; "
        + "outcomes: "
        + ", ".join(f"{k} {v}" for k, v in s["by_outcome"].items())
    )


def _image(name: str | None, image_id: str | None, generation: int | None) -> str:
    if not image_id:
        return "-"
    return f"{name or image_id[:8]} ({generation if generation is not None else '?'})"
