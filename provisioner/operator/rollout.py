"""Rollouts: a placement applied in waves, each gated by what its nodes report.

The placement file's ``rollout`` section::

    rollout:
      name: web-1.4              # names the rollout in every assignment it signs
      canary: {count: 2}         # or {percent: 1}, or {select: {hw: lab}}
      waves: [{percent: 10}, {by: site}, {count: 500}]  # then every node left: one last wave
      deadline: 2h               # how long a node has to report, from its assignment
      max_rejected: 0            # per wave: more rejections than this halt (or "5%")
      max_timeouts: 0            # per wave: more nodes without a verdict by their deadline

``percent`` is the share of the rollout's nodes assigned once the wave has started (10, then
50, then 100); ``count`` adds that many nodes; ``by: KEY`` makes one wave per value of the
label KEY (in order of value); ``select`` takes the nodes a selector matches. The nodes are
ordered by a hash of the rollout's name and the node's id, so that a count or a percentage
takes nodes across sites rather than the first names in the alphabet, the same way at every
run.

Nothing is kept anywhere but in the assignments themselves. Each assignment a rollout writes
carries, signed with it (fields the node does not read), ``rollout: {name, wave,
previous_image_id, previous_generation}``; running ``edgepin apply`` again reads the
records (verified with the signing certificate), finds the last wave started and gates it
on the nodes' reports again. A node of that wave is *running* once its report says it runs
the image at that generation or later, *rejected* once it reports refusing it (``refused``,
``rolled-back``), and *timed out* when neither came within ``deadline`` of its assignment.
The wave passes when every node is running or rejected and neither count passes its
threshold; the rollout halts as soon as one passes (exit 12), and ``--resume`` takes the
halted wave as passed and goes on (once a later wave has started, the earlier ones are not
gated again). ``--abort`` assigns every node of the rollout its previous image again, at a
higher generation, and marks those records so that the rollout is not started again by
mistake: a new rollout needs a new name.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import enum
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from provisioner import assignment, nodereport
from provisioner.errors import EdgepinError, ImageError, UsageError, VerificationError
from provisioner.node.model import State
from provisioner.operator import nodes
from provisioner.operator.labels import NAME, Labels
from provisioner.operator.placement import PlacementError
from provisioner.operator.selector import Selector
from provisioner.signing import fingerprint

DURATION = re.compile(r"([0-9]{1,7})(s|m|h|d)?")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
MAX_WAVES = 1000


class RolloutHalted(EdgepinError):
    """A wave had more rejections or timeouts than its thresholds allow."""

    exit_code = 12

    def __init__(self, name: str, wave: str, rejected: int, timed_out: int) -> None:
        super().__init__(
            f"rollout {name} halted at wave {wave}: {rejected} rejected, {timed_out} timed "
            "out (more than the rollout allows)",
            hint="read the reasons in the table; `edgepin apply FILE --resume` goes on, "
            "`edgepin apply FILE --abort` assigns every node of the rollout its previous image",
            rollout=name,
            wave=wave,
        )


# ------------------------------------------------------------------------------ the section


@dataclass(frozen=True)
class Threshold:
    count: int | None = None
    percent: float | None = None

    def allows(self, size: int) -> int:
        if self.percent is not None:
            return math.floor(self.percent * size / 100)
        return self.count or 0

    def text(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else str(self.count or 0)


@dataclass(frozen=True)
class WaveSpec:
    count: int | None = None
    percent: float | None = None
    by: str | None = None
    select: Selector | None = None


@dataclass(frozen=True)
class Rollout:
    name: str
    canary: WaveSpec | None
    waves: tuple[WaveSpec, ...]
    deadline: float
    max_rejected: Threshold = field(default_factory=Threshold)
    max_timeouts: Threshold = field(default_factory=Threshold)


def _duration(value: Any, where: str) -> float:
    if type(value) is int and value > 0:
        return float(value)
    m = DURATION.fullmatch(value) if isinstance(value, str) else None
    if m is None or int(m.group(1)) == 0:
        raise PlacementError(where, "must be a duration such as 90s, 30m, 2h or 1d")
    return float(int(m.group(1)) * UNITS[m.group(2)])


def _threshold(value: Any, where: str) -> Threshold:
    if type(value) is int and value >= 0:
        return Threshold(count=value)
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,3}(\.[0-9]{1,2})?%", value):
        percent = float(value[:-1])
        if percent <= 100:
            return Threshold(percent=percent)
    raise PlacementError(where, "must be a whole number of nodes or a percentage such as 5%")


def _wave(doc: Any, where: str, canary: bool = False) -> WaveSpec:
    kinds = {"count", "percent", "select"} if canary else {"count", "percent", "by"}
    if not isinstance(doc, dict) or len(doc) != 1 or next(iter(doc)) not in kinds:
        raise PlacementError(where, f"must be one of {', '.join(sorted(kinds))}")
    kind, value = next(iter(doc.items()))
    if kind == "count":
        if type(value) is not int or not 1 <= value <= 10**7:
            raise PlacementError(where, "count must be a whole number of nodes, at least 1")
        return WaveSpec(count=value)
    if kind == "percent":
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not 0 < value <= 100
            or math.isnan(value)
        ):
            raise PlacementError(where, "percent must be a number above 0, at most 100")
        return WaveSpec(percent=float(value))
    if kind == "by":
        if not isinstance(value, str) or not NAME.fullmatch(value):
            raise PlacementError(where, "by must name a label key")
        return WaveSpec(by=value)
    if not isinstance(value, dict) or not value:
        raise PlacementError(where, "select must be a mapping of label keys to values")
    try:
        terms = {
            str(k): [str(x) for x in (v if isinstance(v, list) else [v])] for k, v in value.items()
        }
        for k, v in value.items():
            for x in v if isinstance(v, list) else [v]:
                if not isinstance(x, str) or not isinstance(k, str):
                    raise PlacementError(where, f"select.{k}: values must be text: quote them")
        return WaveSpec(select=Selector.of(terms))
    except UsageError as e:
        if isinstance(e, PlacementError):
            raise
        raise PlacementError(where, e.message) from None


def parse(doc: Mapping[str, Any], where: str = "placement: rollout") -> Rollout:
    known = {"name", "canary", "waves", "deadline", "max_rejected", "max_timeouts"}
    unknown = sorted(str(k) for k in set(doc) - known)
    if unknown:
        raise PlacementError(where, f"unknown key {unknown[0]!r}")
    for key in ("name", "deadline"):
        if key not in doc:
            raise PlacementError(where, f"{key} is missing")
    name = doc["name"]
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise PlacementError(f"{where}.name", "lowercase letters, digits, '.', '_', '-'")
    waves_doc = doc.get("waves", [])
    if not isinstance(waves_doc, list) or len(waves_doc) > MAX_WAVES:
        raise PlacementError(f"{where}.waves", f"must be a list of at most {MAX_WAVES} waves")
    canary = doc.get("canary")
    return Rollout(
        name=name,
        canary=None if canary is None else _wave(canary, f"{where}.canary", canary=True),
        waves=tuple(_wave(w, f"{where}.waves[{i}]") for i, w in enumerate(waves_doc)),
        deadline=_duration(doc["deadline"], f"{where}.deadline"),
        max_rejected=_threshold(doc.get("max_rejected", 0), f"{where}.max_rejected"),
        max_timeouts=_threshold(doc.get("max_timeouts", 0), f"{where}.max_timeouts"),
    )


# ------------------------------------------------------------------------------ the waves


@dataclass(frozen=True)
class Wave:
    index: int
    name: str
    nodes: tuple[str, ...]


def order(name: str, node_ids: Sequence[str]) -> list[str]:
    """The rollout's node order: a hash of its name and each node's id (pure, stable)."""
    return sorted(node_ids, key=lambda n: (hashlib.sha256(f"{name}:{n}".encode()).digest(), n))


def layout(r: Rollout, covered: Mapping[str, Labels]) -> list[Wave]:
    """The waves of the nodes ``covered`` (pure): canary, the listed waves, then the rest."""
    left = order(r.name, list(covered))
    total = len(left)
    taken = 0
    waves: list[Wave] = []

    def add(name: str, chosen: list[str]) -> None:
        nonlocal left, taken
        if chosen:
            picked = set(chosen)
            left = [n for n in left if n not in picked]
            taken += len(chosen)
            waves.append(Wave(len(waves), name, tuple(chosen)))

    def take(spec: WaveSpec) -> list[str]:
        if spec.count is not None:
            return left[: spec.count]
        if spec.percent is not None:
            return left[: max(0, math.ceil(spec.percent * total / 100) - taken)]
        if spec.select is not None:
            return [n for n in left if spec.select.matches(covered[n])]
        return []

    if r.canary is not None:
        add("canary", take(r.canary))
    for spec in r.waves:
        if spec.by is not None:
            key = spec.by
            values = sorted({covered[n].values[key] for n in left if key in covered[n].values})
            for value in values:
                add(f"{key}={value}", [n for n in left if covered[n].values.get(key) == value])
        else:
            label = f"{spec.count} nodes" if spec.count is not None else f"{spec.percent:g}%"
            add(label, take(spec))
    add("rest", list(left))
    return waves


# ------------------------------------------------------------------------------ the records


@dataclass(frozen=True)
class Marker:
    """What a node's current signed assignment says of a rollout."""

    name: str
    image_id: str
    generation: int
    assigned_at: float  # seconds since the epoch
    wave: int | None = None  # None for an aborted rollout's record
    aborted: bool = False
    previous_image_id: str | None = None
    previous_generation: int | None = None


def _stamp(text: str) -> float:
    try:
        when = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return 0.0
    return when.replace(tzinfo=datetime.UTC).timestamp()


def marker(node: nodes.Node, cert: x509.Certificate) -> Marker | None:
    """The rollout marker of the node's record, if this key signed the record for it."""
    raw = node.project.get(nodes.ASSIGNMENT_ATTR)
    try:
        signed = assignment.verify(raw, {fingerprint(cert): cert}, node.project_id, node.node_id)
    except (ImageError, VerificationError):
        return None
    if signed is None:
        return None
    try:
        data: Any = json.loads(raw) if isinstance(raw, str) else raw
        doc = json.loads(base64.b64decode(data["signed"]["payload"]))
    except (ValueError, KeyError, TypeError, binascii.Error):  # pragma: no cover: verified
        return None
    ro = doc.get("rollout")
    if not isinstance(ro, dict) or not isinstance(ro.get("name"), str):
        return None
    wave, prev, prev_gen = (
        ro.get("wave"),
        ro.get("previous_image_id"),
        ro.get("previous_generation"),
    )
    return Marker(
        name=ro["name"],
        image_id=signed.image_id,
        generation=signed.generation,
        assigned_at=_stamp(signed.assigned_at),
        wave=wave if type(wave) is int and 0 <= wave <= MAX_WAVES else None,
        aborted=ro.get("aborted") is True,
        previous_image_id=prev if isinstance(prev, str) else None,
        previous_generation=prev_gen if type(prev_gen) is int else None,
    )


# ------------------------------------------------------------------------------ the gate


class Verdict(enum.StrEnum):
    RUNNING = "running"
    REJECTED = "rejected"
    PENDING = "pending"
    TIMED_OUT = "timed-out"


def verdict(
    m: Marker, report: nodereport.NodeReport | None, now: float, deadline: float
) -> Verdict:
    """What a node made of its rollout assignment, by its report (pure)."""
    if report is not None:
        run, seen = report.running, report.assignment
        if (
            report.state is State.RUNNING
            and run is not None
            and run.image_id == m.image_id
            and run.generation >= m.generation
        ):
            return Verdict.RUNNING
        if (
            report.rejected
            and seen is not None
            and seen.image_id == m.image_id
            and seen.generation >= m.generation
        ):
            return Verdict.REJECTED
    if now >= m.assigned_at + deadline:
        return Verdict.TIMED_OUT
    return Verdict.PENDING


@dataclass(frozen=True)
class Progress:
    """Where a rollout stands (pure result of :func:`evaluate`)."""

    waves: tuple[Wave, ...]
    started: int  # index of the last wave started, -1 before the first
    verdicts: dict[str, Verdict]  # the nodes of that wave
    allowed_rejected: int
    allowed_timeouts: int
    todo: tuple[str, ...]  # the nodes the next wave assigns, in order
    next_index: int
    history: dict[int, dict[str, Verdict]]  # every started wave's nodes and verdicts

    def count(self, v: Verdict) -> int:
        return sum(1 for x in self.verdicts.values() if x is v)

    @property
    def halted(self) -> bool:
        return (
            self.count(Verdict.REJECTED) > self.allowed_rejected
            or self.count(Verdict.TIMED_OUT) > self.allowed_timeouts
        )

    @property
    def passed(self) -> bool:
        return self.started < 0 or (not self.halted and self.count(Verdict.PENDING) == 0)

    @property
    def done(self) -> bool:
        return self.passed and not self.todo

    def wave_name(self, index: int) -> str:
        return self.waves[index].name if 0 <= index < len(self.waves) else f"#{index}"


def evaluate(
    r: Rollout,
    covered: Mapping[str, Labels],
    markers: Mapping[str, Marker],
    node_reports: Mapping[str, nodereport.NodeReport | None],
    now: float,
) -> Progress:
    """The rollout's state from the records, the reports and the time (pure). ``markers``
    are this rollout's (not aborted); ``covered`` are its nodes: the plan's nodes to assign
    and the nodes it has assigned."""
    waves = layout(r, covered)
    started = max((m.wave for m in markers.values() if m.wave is not None), default=-1)
    history: dict[int, dict[str, Verdict]] = {}
    for node, m in sorted(markers.items()):
        if m.wave is not None:
            v = verdict(m, node_reports.get(node), now, r.deadline)
            history.setdefault(m.wave, {})[node] = v
    current = history.get(started, {})
    last = max(len(waves) - 1, 0)
    next_index = min(started + 1, last) if waves else started + 1
    todo = tuple(n for w in waves if w.index <= next_index for n in w.nodes if n not in markers)
    size = len(current)
    return Progress(
        waves=tuple(waves),
        started=started,
        verdicts=current,
        allowed_rejected=r.max_rejected.allows(size),
        allowed_timeouts=r.max_timeouts.allows(size),
        todo=todo,
        next_index=max(next_index, 0),
        history=dict(sorted(history.items())),
    )


def summary_line(r: Rollout, p: Progress) -> str:
    if p.started < 0:
        return f"rollout {r.name}: no wave started; {len(p.todo)} nodes in the first"
    return (
        f"rollout {r.name}: wave {p.started + 1}/{len(p.waves)} ({p.wave_name(p.started)}, "
        f"{len(p.verdicts)} nodes): {p.count(Verdict.RUNNING)} running, "
        f"{p.count(Verdict.REJECTED)} rejected, {p.count(Verdict.PENDING)} pending, "
        f"{p.count(Verdict.TIMED_OUT)} timed out"
    )
