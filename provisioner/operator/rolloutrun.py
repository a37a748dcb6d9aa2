"""Running a rollout (``edgepin apply`` of a placement file with a ``rollout``): read the
fleet and the records, gate the last wave started on the nodes' reports, start the next
wave, until every node of the rollout is assigned, or a wave halts it. The decisions are
:mod:`provisioner.operator.rollout`'s pure functions; this module reads, assigns and
waits. Everything it knows comes from the control plane at each step, so an interrupted
run (Ctrl-C, a crash, a lost connection) loses nothing: the next one continues.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from provisioner import assignment
from provisioner.errors import EdgepinError, ImageError, UsageError, VerificationError
from provisioner.operator import apply, assign, parallel, reports
from provisioner.operator.placement import Action, Placement
from provisioner.operator.rollout import (
    Marker,
    Progress,
    Rollout,
    Verdict,
    evaluate,
    marker,
    parse,
    summary_line,
)
from provisioner.signing import fingerprint


@dataclass
class Outcome:
    """What one run of a rollout ended in."""

    rollout: Rollout
    progress: Progress
    state: str  # done, waiting (--step), halted, aborted
    assigned: list[assign.Done] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)  # node -> what its report says
    kept: list[str] = field(default_factory=list)  # --abort: nodes with no previous image

    @property
    def failed(self) -> list[assign.Done]:
        return [d for d in self.assigned if d.error is not None]

    def as_dict(self) -> dict[str, Any]:
        p = self.progress
        return {
            "rollout": self.rollout.name,
            "state": self.state,
            "waves": [
                {
                    "index": w.index,
                    "name": w.name,
                    "nodes": len(w.nodes),
                    "started": w.index in p.history,
                    "verdicts": {
                        str(v): sum(1 for x in p.history.get(w.index, {}).values() if x is v)
                        for v in Verdict
                    },
                }
                for w in p.waves
            ],
            "nodes": {
                n: {"wave": i, "verdict": str(v), "reason": self.reasons.get(n)}
                for i, vs in p.history.items()
                for n, v in vs.items()
            },
            "assigned": [
                {"node": d.node_id, "image_id": d.image_id, "generation": d.generation}
                for d in self.assigned
                if d.error is None
            ],
            "failed": [
                {"node": d.node_id, "error": d.error.message}
                for d in self.assigned
                if d.error is not None
            ],
            "kept": self.kept,
        }


@dataclass
class Options:
    resume: bool = False
    abort: bool = False
    step: bool = False  # do what can be done now, never wait
    poll: float = 15.0
    workers: int = parallel.WORKERS
    plan_digest: str | None = None
    show: Callable[[str], None] = lambda line: None  # live progress, a line at a time
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep


def _markers(fleet: apply.Fleet, cert: x509.Certificate, name: str) -> dict[str, Marker]:
    found = {}
    for node_id, node in fleet.nodes.items():
        m = marker(node, cert)
        if m is not None and m.name == name:
            found[node_id] = m
    return found


def _previous(node: Any, cert: x509.Certificate) -> dict[str, Any]:
    """The image the node's current record names, as signed (for the abort)."""
    raw = node.project.get("edgepin_assignment")
    try:
        prev = assignment.verify(raw, {fingerprint(cert): cert}, node.project_id, node.node_id)
    except (ImageError, VerificationError):
        prev = None
    return {
        "previous_image_id": prev.image_id if prev else None,
        "previous_generation": prev.generation if prev else None,
    }


def _reasons(fleet: apply.Fleet, names: Any) -> dict[str, str]:
    views = {v.node_id: v for v in fleet.views}
    out = {}
    for n in names:
        v = views.get(n)
        if v is not None:
            out[n] = v.report.reason if v.report else (v.report_problem or "no report")
    return out


def _prepare(conn: Any, image_ids: set[str], workers: int) -> dict[str, Any]:
    """Each image checked once; an image that cannot be assigned maps to its error."""

    def one(image_id: str) -> Any:
        try:
            return assign.prepare(conn, image_id)
        except EdgepinError as e:  # that image's nodes fail with it; the others go on
            return e

    ids = sorted(image_ids)
    return dict(zip(ids, parallel.bounded_map(one, ids, workers), strict=True))


def _assign(
    conn: Any,
    fleet: apply.Fleet,
    wanted: list[tuple[str, str, dict[str, Any]]],
    key: Any,
    cert: x509.Certificate,
    o: Options,
) -> list[assign.Done]:
    """Assign (node, image, signed extra) triples; a node whose image cannot be assigned
    fails with that image's error."""
    prepared = _prepare(conn, {image for _, image, _ in wanted}, o.workers)
    jobs, failed = [], []
    for node_id, image_id, extra in wanted:
        ready = prepared[image_id]
        if isinstance(ready, assign.Published):
            jobs.append(assign.Job(fleet.nodes[node_id], ready, extra=extra))
        else:
            failed.append(assign.Done(node_id, image_id, error=ready))
    return failed + assign.assign_many(conn, fleet.domain_id, jobs, key, cert, o.workers)


@dataclass
class Seen:
    """The fleet as one step of a rollout reads it."""

    plan: Any
    fleet: apply.Fleet
    marks: dict[str, Marker]  # this rollout's markers
    views: dict[str, Any]  # NodeView by node
    targets: dict[str, str]  # node -> image, for the plan's nodes to assign
    covered: dict[str, Any]  # node -> labels: the rollout's nodes

    def progress(self, r: Rollout, now: float) -> Progress:
        node_reports = {n: self.views[n].report for n in self.covered}
        return evaluate(r, self.covered, self.marks, node_reports, now)


def observe(conn: Any, edge_domain: str, p: Placement, r: Rollout, cert: x509.Certificate) -> Seen:
    plan, fleet = apply.make_plan(conn, edge_domain, p)
    marks = _markers(fleet, cert, r.name)
    views = {v.node_id: v for v in fleet.views}
    targets = {e.node: e.target for e in plan.of(Action.ASSIGN) if e.target}
    covered = {n: views[n].labels for n in sorted({*targets, *marks}) if n in views}
    return Seen(plan, fleet, marks, views, targets, covered)


def run(
    conn: Any,
    edge_domain: str,
    p: Placement,
    signer: assign.AssignmentSigner,
    o: Options,
) -> Outcome:
    if p.rollout is None:
        raise UsageError("the placement file has no rollout")
    r = parse(p.rollout)
    key, cert = signer.load(conn)
    resume = o.resume  # once: for the wave that halted before this run
    assigned: list[assign.Done] = []
    seen = observe(conn, edge_domain, p, r, cert)
    apply.check_digest(seen.plan, o.plan_digest)
    while True:
        if o.abort:
            return abort(conn, seen.fleet, r, seen.marks, key, cert, o)
        if any(m.aborted for m in seen.marks.values()):
            raise UsageError(
                f"rollout {r.name} was aborted: its nodes were assigned their previous images",
                hint="to roll out again, give the rollout a new name in the placement file",
            )
        prog = seen.progress(r, o.clock())
        while not prog.passed:
            o.show(summary_line(r, prog))
            if prog.halted:
                if resume:
                    resume = False
                    o.show(
                        f"rollout {r.name}: wave {prog.wave_name(prog.started)} taken as "
                        "passed (--resume)"
                    )
                    break
                reasons = _reasons(seen.fleet, prog.verdicts)
                return Outcome(r, prog, "halted", assigned, reasons)
            if o.step:
                return Outcome(r, prog, "waiting", assigned, _reasons(seen.fleet, prog.verdicts))
            o.sleep(o.poll)
            wave_nodes = [seen.fleet.nodes[n] for n in prog.verdicts if n in seen.fleet.nodes]
            for n, report in reports.fleet_reports(conn, wave_nodes).items():
                seen.views[n] = _with_report(seen.views[n], report)
            prog = seen.progress(r, o.clock())
        if prog.started >= 0:
            o.show(summary_line(r, prog))
        everyone = [n for vs in prog.history.values() for n in vs]
        if not prog.todo:
            return Outcome(r, prog, "done", assigned, _reasons(seen.fleet, everyone))
        wave = prog.next_index
        o.show(
            f"rollout {r.name}: starting wave {wave + 1}/{len(prog.waves)} "
            f"({prog.wave_name(wave)}, {len(prog.todo)} nodes)"
        )
        nodes_ = seen.fleet.nodes
        wanted = [
            (
                n,
                seen.targets[n],
                {"rollout": {"name": r.name, "wave": wave, **_previous(nodes_[n], cert)}},
            )
            for n in prog.todo
            if n in seen.targets
        ]
        assigned += _assign(conn, seen.fleet, wanted, key, cert, o)
        resume = False
        seen = observe(conn, edge_domain, p, r, cert)
        if o.step:
            prog = seen.progress(r, o.clock())
            return Outcome(r, prog, "waiting", assigned, _reasons(seen.fleet, prog.verdicts))


def _with_report(view: Any, seen: reports.Seen) -> Any:
    from dataclasses import replace

    return replace(view, report=seen.report, report_problem=seen.problem)


def abort(
    conn: Any,
    fleet: apply.Fleet,
    r: Rollout,
    marks: dict[str, Marker],
    key: Any,
    cert: x509.Certificate,
    o: Options,
) -> Outcome:
    """Assign every node of the rollout its previous image again (a higher generation),
    marked as this rollout's abort; nodes it gave their first image keep it."""
    live = {n: m for n, m in marks.items() if not m.aborted}
    kept = sorted(n for n, m in live.items() if m.previous_image_id is None)
    wanted = [
        (n, str(m.previous_image_id), {"rollout": {"name": r.name, "aborted": True}})
        for n, m in sorted(live.items())
        if m.previous_image_id is not None
    ]
    o.show(f"rollout {r.name}: aborting, {len(wanted)} nodes back to their previous image")
    done = _assign(conn, fleet, wanted, key, cert, o)
    prog = evaluate(r, {}, {}, {}, o.clock())
    return Outcome(r, prog, "aborted", done, {}, kept)
