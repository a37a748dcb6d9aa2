"""The fleet commands of ``edgepin``: ``label``, ``plan``, ``apply``, and what ``status``
shows of labels and reports. Kept apart from provisioner/cli.py, which adds them with
:func:`add_parsers`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from provisioner.errors import UsageError


def add_parsers(sub: Any) -> None:
    _add_label(sub)
    _add_plan(sub)


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def add_signer_arguments(p: argparse.ArgumentParser) -> None:
    """The assignment-signing key's options, as ``edgepin assign`` has them."""
    p.add_argument(
        "--assignment-cert-id",
        default=_env("EDGEPIN_ASSIGNMENT_CERT_ID") or _env("EDGEPIN_SIGNING_CERT_ID"),
        help="Barbican UUID of the certificate whose key signs the assignments, pinned on "
        "the nodes (env EDGEPIN_ASSIGNMENT_CERT_ID, else EDGEPIN_SIGNING_CERT_ID)",
    )
    p.add_argument(
        "--assignment-key-id",
        default=_env("EDGEPIN_ASSIGNMENT_KEY_ID") or _env("EDGEPIN_SIGNING_KEY_ID"),
        help="Barbican UUID of the private key that signs the assignments "
        "(env EDGEPIN_ASSIGNMENT_KEY_ID, else EDGEPIN_SIGNING_KEY_ID)",
    )
    p.add_argument(
        "--assignment-key-file",
        type=Path,
        default=_env("EDGEPIN_ASSIGNMENT_KEY_FILE"),
        help="the signing key as an unencrypted PEM file on this machine instead, kept off "
        "the control plane (env EDGEPIN_ASSIGNMENT_KEY_FILE); needs --assignment-cert-file",
    )
    p.add_argument(
        "--assignment-cert-file",
        type=Path,
        default=_env("EDGEPIN_ASSIGNMENT_CERT_FILE"),
        help="the PEM certificate of --assignment-key-file (env EDGEPIN_ASSIGNMENT_CERT_FILE)",
    )


def signer_from_args(args: argparse.Namespace, command: str) -> Any:
    """The assignment signer that ``command``'s options (:func:`add_signer_arguments`) name."""
    from provisioner.operator.assign import AssignmentSigner

    files = args.assignment_key_file, args.assignment_cert_file
    if any(files) and not all(files):
        raise UsageError("--assignment-key-file and --assignment-cert-file go together")
    if all(files):
        return AssignmentSigner(key_file=files[0], cert_file=files[1])
    if args.assignment_cert_id and args.assignment_key_id:
        return AssignmentSigner(args.assignment_cert_id, args.assignment_key_id)
    raise UsageError(
        f"{command} needs --assignment-cert-id and --assignment-key-id (or the image-signing "
        "EDGEPIN_SIGNING_CERT_ID and EDGEPIN_SIGNING_KEY_ID), or --assignment-key-file and "
        "--assignment-cert-file: nodes run only signed assignments",
        hint="create a key with `edgepin signing-cert create` and pin its certificate in "
        "the host image (./build.sh image --assignment-cert FILE)",
    )


def _placement(path: Path) -> Any:
    from provisioner.operator.placement import load
    from provisioner.operator.rollout import parse

    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"placement file {path}: {e.strerror}") from None
    placement = load(data, str(path))
    if placement.rollout is not None:
        parse(placement.rollout, f"placement file: {path}: rollout")
    return placement


def _add_plan(sub: Any) -> None:
    p = sub.add_parser(
        "plan",
        help="what a placement file would change, node by node",
        description="Read the fleet (labels, assignments, reports) and the images FILE "
        "names, and print the change for every node: assign (current -> new image), "
        "unchanged, or left out with the reason (no rule selects it, the image does not fit "
        "its reported vCPUs, memory, disk or CPU flags, no report, revoked). The first rule "
        "whose selector matches a node places it. The same inputs give the same plan, byte "
        "for byte; its digest goes to `edgepin apply --plan-digest`. Changes nothing.",
    )
    p.add_argument("file", type=Path, metavar="FILE", help="placement file (YAML)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(handler=cmd_plan, needs_cloud=True)

    a = sub.add_parser(
        "apply",
        help="make the fleet what a placement file says",
        description="Make the plan of FILE (see `edgepin plan`) and carry it out: every node "
        "it lists as assign gets a signed assignment of its rule's image, as `edgepin assign` "
        "writes it, --workers at a time; each image and its secrets are checked once. "
        "Nodes left out are not touched. Running it again assigns only what is left, so an "
        "interrupted apply is finished by running it again.",
    )
    a.add_argument("file", type=Path, metavar="FILE", help="placement file (YAML)")
    a.add_argument(
        "--plan-digest",
        metavar="SHA256",
        help="apply only if the plan is still the one `edgepin plan` printed with this digest",
    )
    a.add_argument(
        "--workers",
        type=int,
        default=8,
        help="assignments in progress at a time (default 8)",
    )
    add_signer_arguments(a)
    a.add_argument(
        "--resume",
        action="store_true",
        help="rollout: take the wave that halted as passed and go on with the next",
    )
    a.add_argument(
        "--abort",
        action="store_true",
        help="rollout: assign every node of the rollout its previous image again (a higher "
        "generation); the rollout's name cannot be rolled out again",
    )
    a.add_argument(
        "--step",
        action="store_true",
        help="rollout: do what can be done now (gate the current wave on the reports so far, "
        "start the next one if it passed) and exit without waiting",
    )
    a.add_argument(
        "--poll",
        type=float,
        default=15.0,
        help="rollout: seconds between two readings of the nodes' reports (default 15)",
    )
    a.add_argument("--json", action="store_true", help="print the result as JSON")
    a.set_defaults(handler=cmd_apply, needs_cloud=True)


def cmd_plan(args: argparse.Namespace) -> int:
    from provisioner.operator.apply import make_plan
    from provisioner.operator.placement import Action
    from provisioner.operator.rollout import layout, parse

    placement = _placement(args.file)
    plan, fleet = make_plan(args.conn, args.edge_domain, placement)
    waves: list[dict[str, Any]] = []
    if placement.rollout is not None:
        # the waves of the nodes still to assign (those a run of the rollout started are
        # known to `edgepin apply`, which reads the signed records)
        labels = {v.node_id: v.labels for v in fleet.views}
        todo = {e.node: labels[e.node] for e in plan.of(Action.ASSIGN)}
        waves = [
            {"wave": w.index + 1, "name": w.name, "nodes": list(w.nodes)}
            for w in layout(parse(placement.rollout), todo)
        ]
    if args.json:
        data = {**plan.as_dict(), "digest": plan.digest}
        if placement.rollout is not None:
            data["rollout_waves"] = waves
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        sys.stdout.write(plan.text())
        for w in waves:
            print(f"wave {w['wave']} {w['name']}: {len(w['nodes'])} nodes")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from provisioner.operator import apply
    from provisioner.operator.placement import Action

    if not 1 <= args.workers <= 64:
        raise UsageError("--workers must be from 1 to 64")
    placement = _placement(args.file)
    signer = signer_from_args(args, "apply")
    if placement.rollout is not None:
        return _rollout(args, placement, signer)
    if args.resume or args.abort or args.step:
        raise UsageError("--resume, --abort and --step are for a placement file with a rollout")
    bar = _Bar(args.progress)
    try:
        result = apply.apply(
            args.conn,
            args.edge_domain,
            placement,
            signer,
            plan_digest=args.plan_digest,
            workers=args.workers,
            progress=bar.step,
            planned=lambda plan: bar.start(len(plan.of(Action.ASSIGN))),
        )
    finally:
        bar.stop()
    if args.json:
        print(json.dumps(result.as_dict(), indent=2, sort_keys=True))
    else:
        for d in result.done:
            if d.error is None:
                print(f"assigned   {d.node_id}  {d.image_id}  generation {d.generation}")
        for d in result.failed:
            print(f"failed     {d.node_id}  {d.error.message if d.error else ''}")
        for e in result.plan.of(Action.LEFT_OUT):
            print(f"left out   {e.node}  {e.reason}")
        print(
            f"{len(result.done) - len(result.failed)} assigned, {len(result.failed)} failed, "
            f"{len(result.plan.of(Action.UNCHANGED))} unchanged, "
            f"{len(result.plan.of(Action.LEFT_OUT))} left out (plan {result.plan.digest})"
        )
    if result.failed:
        raise apply.ApplyError(len(result.failed), len(result.done))
    return 0


def _rollout(args: argparse.Namespace, placement: Any, signer: Any) -> int:
    from provisioner.operator import rolloutrun
    from provisioner.operator.rollout import RolloutHalted, Verdict

    if args.resume and args.abort:
        raise UsageError("--resume and --abort exclude each other")
    if not 0.5 <= args.poll <= 3600:
        raise UsageError("--poll must be from 0.5 to 3600 seconds")

    def show(line: str) -> None:
        print(f"edgepin: {line}", file=sys.stderr, flush=True)

    options = rolloutrun.Options(
        resume=args.resume,
        abort=args.abort,
        step=args.step,
        poll=args.poll,
        workers=args.workers,
        plan_digest=args.plan_digest,
        show=show,
    )
    outcome = rolloutrun.run(args.conn, args.edge_domain, placement, signer, options)
    if args.json:
        print(json.dumps(outcome.as_dict(), indent=2, sort_keys=True))
    else:
        rollout_table(outcome)
    if outcome.state == "halted":
        p = outcome.progress
        raise RolloutHalted(
            outcome.rollout.name,
            p.wave_name(p.started),
            p.count(Verdict.REJECTED),
            p.count(Verdict.TIMED_OUT),
        )
    if outcome.failed:
        from provisioner.operator.apply import ApplyError

        raise ApplyError(len(outcome.failed), len(outcome.assigned))
    return 0


def rollout_table(outcome: Any) -> None:
    """The rollout's waves, and every node that did not run its image, with the reason."""
    from rich.console import Console
    from rich.table import Table

    data = outcome.as_dict()
    table = Table(title=f"rollout {data['rollout']}: {data['state']}")
    for col in ("wave", "nodes", "running", "rejected", "pending", "timed out", "started"):
        table.add_column(col)
    for w in data["waves"]:
        v = w["verdicts"]
        table.add_row(
            f"{w['index'] + 1} {w['name']}",
            str(w["nodes"]),
            str(v["running"]),
            str(v["rejected"]),
            str(v["pending"]),
            str(v["timed-out"]),
            "yes" if w["started"] else "no",
        )
    console = Console(width=200)
    console.print(table)
    for node, n in sorted(data["nodes"].items()):
        if n["verdict"] != "running":
            console.print(f"{n['verdict']:<9}  {node}  {n['reason'] or '-'}", highlight=False)
    for d in data["failed"]:
        console.print(f"failed     {d['node']}  {d['error']}", highlight=False)
    for node in data["kept"]:
        console.print(f"kept       {node}  (no previous image to go back to)", highlight=False)
    for d in data["assigned"]:
        console.print(
            f"assigned   {d['node']}  {d['image_id']}  generation {d['generation']}",
            highlight=False,
        )


class _Bar:
    """A progress bar on stderr while assignments are written (none when not a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.progress: Any = None
        self.task: Any = None

    def start(self, total: int) -> None:
        if not self.enabled or not total:
            return
        from rich.console import Console
        from rich.progress import Progress

        self.progress = Progress(console=Console(stderr=True), transient=True)
        self.progress.start()
        self.task = self.progress.add_task("assigning", total=total)

    def step(self, _done: Any) -> None:
        if self.progress is not None:
            self.progress.advance(self.task)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()


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


def write_prometheus(rows: list[dict[str, Any]], target: str) -> None:
    from provisioner.node.state import atomic_write
    from provisioner.operator.status import prometheus

    text = prometheus(rows)
    if target == "-":
        sys.stdout.write(text)
    else:
        atomic_write(Path(target), text.encode(), mode=0o644)


def _host(row: dict[str, Any]) -> str:
    """The status table's host column: the host version, the root slot it booted from, an
    update the node came back from, and the assigned release: written and tried at the next
    boot (NEXT), refused by the node (REFUSED, the reason in the JSON's host_refused), or
    not yet written (ASSIGNED)."""
    text = str(row["host_version"]) if row.get("host_version") else "-"
    if row.get("host_slot"):
        text += f" (slot {row['host_slot']})"
    if row.get("host_fallback"):
        text += f"; FELL BACK from {row['host_fallback']}"
    if row.get("host_next"):
        text += f"; NEXT {row['host_next']}"
    elif row.get("host_refused"):
        text += f"; REFUSED {row.get('host_assigned') or ''}".rstrip()
    elif (row.get("host_assigned") or 0) > (row.get("host_version") or 0) and not row.get(
        "host_fallback"
    ):
        text += f"; ASSIGNED {row['host_assigned']}"
    return text


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
        "host",
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
            _host(r),
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
