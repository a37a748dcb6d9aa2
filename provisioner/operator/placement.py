"""Placement as data: a file of rules (label selector -> image, with constraints) and the
plan it makes of the fleet, a pure function.

The file (YAML, ``placement: 1``)::

    placement: 1
    rules:
      - name: web-eu                       # a label-like name, unique
        select: {region: eu-west, hw: [small, medium]}   # every key must match; absent: all
        image: {name: web, version: "1.4.0"}             # or {id: <Glance image id>}
        require: {cpu_flags: [avx2]}       # flags the node's CPU must have (optional)
    rollout: ...                           # waves, for `edgepin apply` (rollout.py)

The first rule whose selector matches a node places it. The image's vCPUs and memory
(``edgepin_vcpus``, ``edgepin_memory_mb``) must fit the node's reported facts, its size the
node's free disk (unless the node holds it already), and its CPU the rule's flags: what the
node itself would refuse is left out before it is assigned, with the reason.

The parser is strict: unknown keys, duplicate keys, a version or label value that YAML
would read as a number or a boolean (``1.10`` is the number 1.1), are errors, never
guesses. :func:`parse` raises only :class:`PlacementError`.

:func:`plan` is pure: the same fleet, images and file give the same plan, byte for byte
(:meth:`Plan.text`), with one entry per node in node order, each change and each node left
out explained.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from provisioner import nodereport
from provisioner.errors import ImageError, UsageError
from provisioner.node.model import (
    IMAGE_ID,
    MAX_VCPUS,
    MEMORY_MB,
    PCI_PROPERTY,
    USB_PROPERTY,
    pci_matches,
    pci_selectors,
    usb_ids,
)
from provisioner.operator.labels import NAME, Labels
from provisioner.operator.selector import Selector

FORMAT = 1
MAX_FILE = 1 << 20  # bytes
MAX_RULES = 1000
MAX_FLAGS = 64
VERSION_SIZE = 64


class PlacementError(UsageError):
    """A placement file that cannot be used: the file, the place and what is wrong."""

    def __init__(self, where: str, why: str) -> None:
        super().__init__(f"placement file: {where}: {why}", where=where)


# ------------------------------------------------------------------------------ the file


@dataclass(frozen=True)
class ImageRef:
    image_id: str | None = None
    name: str | None = None
    version: str | None = None

    def text(self) -> str:
        return self.image_id if self.image_id else f"{self.name} {self.version}"


@dataclass(frozen=True)
class Rule:
    name: str
    select: Selector
    image: ImageRef
    cpu_flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Placement:
    rules: tuple[Rule, ...]
    rollout: Mapping[str, Any] | None = None  # checked by provisioner/operator/rollout.py
    digest: str = ""  # sha256 of the file's bytes


class _StrictLoader(yaml.SafeLoader):  # type: ignore[misc]
    """SafeLoader that refuses a mapping with a key given twice."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key (a list): not ours either
            raise yaml.constructor.ConstructorError(
                None, None, "a key that is not text", key_node.start_mark
            ) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} given twice", key_node.start_mark
            )
        seen.add(key)
    mapping: dict[Any, Any] = loader.construct_mapping(node, deep=True)
    return mapping


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load(data: bytes, where: str = "placement") -> Placement:
    """Parse a placement file's bytes."""
    if len(data) > MAX_FILE:
        raise PlacementError(where, f"larger than {MAX_FILE} bytes")
    try:
        doc = yaml.load(data, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise PlacementError(where, f"not valid YAML{at}: {problem}") from None
    except (ValueError, TypeError, RecursionError, OverflowError) as e:
        raise PlacementError(where, f"not valid YAML: {type(e).__name__}") from None
    return parse(doc, where, hashlib.sha256(data).hexdigest())


def parse(doc: Any, where: str = "placement", digest: str = "") -> Placement:
    """The placement in an already loaded document (what YAML gave), checked."""
    top = _object(
        doc, where, required=frozenset({"placement", "rules"}), optional=frozenset({"rollout"})
    )
    if type(top["placement"]) is not int or top["placement"] != FORMAT:
        raise PlacementError(f"{where}: placement", f"must be {FORMAT} (the format's version)")
    rules_doc = top["rules"]
    if not isinstance(rules_doc, list) or not rules_doc:
        raise PlacementError(f"{where}: rules", "must be a list of at least one rule")
    if len(rules_doc) > MAX_RULES:
        raise PlacementError(f"{where}: rules", f"more than {MAX_RULES}")
    rules = tuple(_rule(r, f"{where}: rules[{i}]") for i, r in enumerate(rules_doc))
    names = [r.name for r in rules]
    for name in names:
        if names.count(name) > 1:
            raise PlacementError(f"{where}: rules", f"rule name {name} is used twice")
    rollout = top.get("rollout")
    if rollout is not None and not isinstance(rollout, dict):
        raise PlacementError(f"{where}: rollout", "must be a mapping")
    return Placement(rules, rollout, digest)


def _object(
    doc: Any,
    where: str,
    required: frozenset[str] = frozenset(),
    optional: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise PlacementError(where, "must be a mapping")
    keys = set(doc)
    unknown = sorted(str(k) for k in keys - required - optional)
    if unknown:
        raise PlacementError(where, f"unknown key {unknown[0]!r}")
    missing = sorted(required - keys)
    if missing:
        raise PlacementError(where, f"{missing[0]} is missing")
    return doc


def _text(value: Any, where: str, size: int = VERSION_SIZE) -> str:
    if isinstance(value, bool) or isinstance(value, int | float):
        raise PlacementError(where, f"{value!r} is read as a number or boolean: quote it")
    if not isinstance(value, str) or not value or len(value) > size or not value.isprintable():
        raise PlacementError(where, f"must be text of 1 to {size} printable characters")
    return value


def _name(value: Any, where: str) -> str:
    text = _text(value, where)
    if not NAME.fullmatch(text):
        raise PlacementError(
            where,
            f"{text!r}: lowercase letters, digits, '.', '_' and '-', at most 63, "
            "starting and ending with a letter or a digit",
        )
    return text


def _rule(doc: Any, where: str) -> Rule:
    r = _object(
        doc, where, required=frozenset({"name", "image"}), optional=frozenset({"select", "require"})
    )
    name = _name(r["name"], f"{where}: name")
    select = r.get("select") or {}
    if not isinstance(select, dict):
        raise PlacementError(f"{where}: select", "must be a mapping of label keys to values")
    terms: dict[str, list[str]] = {}
    for key, value in select.items():
        at = f"{where}: select.{key}"
        values = value if isinstance(value, list) else [value]
        if not values:
            raise PlacementError(at, "allows no value")
        terms[_name(key, at)] = [_name(v, at) for v in values]
    image_doc = _object(
        r["image"], f"{where}: image", optional=frozenset({"id", "name", "version"})
    )
    if "id" in image_doc:
        if set(image_doc) != {"id"}:
            raise PlacementError(f"{where}: image", "give either id, or name and version")
        image_id = _text(image_doc["id"], f"{where}: image.id")
        if not IMAGE_ID.fullmatch(image_id):
            raise PlacementError(f"{where}: image.id", "is not a Glance image id")
        image = ImageRef(image_id=image_id)
    else:
        if set(image_doc) != {"name", "version"}:
            raise PlacementError(f"{where}: image", "give either id, or name and version")
        image = ImageRef(
            name=_text(image_doc["name"], f"{where}: image.name", 255),
            version=_text(image_doc["version"], f"{where}: image.version"),
        )
    require = _object(
        r.get("require") or {}, f"{where}: require", optional=frozenset({"cpu_flags"})
    )
    flags = require.get("cpu_flags", [])
    if not isinstance(flags, list) or len(flags) > MAX_FLAGS:
        raise PlacementError(
            f"{where}: require.cpu_flags", f"must be a list of {MAX_FLAGS} or less"
        )
    cpu_flags = []
    for f in flags:
        flag = _text(f, f"{where}: require.cpu_flags")
        if not nodereport.FLAG.fullmatch(flag):
            raise PlacementError(f"{where}: require.cpu_flags", f"{flag!r} is no CPU flag name")
        cpu_flags.append(flag)
    return Rule(name, Selector.of(terms), image, tuple(sorted(set(cpu_flags))))


# ------------------------------------------------------------------------------ the plan


class Action(enum.StrEnum):
    ASSIGN = "assign"
    UNCHANGED = "unchanged"
    LEFT_OUT = "left-out"


@dataclass(frozen=True)
class Image:
    """A published image as the plan needs it (from Glance, checked by the caller)."""

    image_id: str
    name: str
    version: str
    vcpus: int
    memory_mb: int
    size: int  # bytes
    usb: tuple[str, ...] = ()  # the USB devices it asks for (edgepin_usb)
    pci: tuple[str, ...] = ()  # the PCI devices it asks for (edgepin_pci)

    def text(self) -> str:
        return f"{self.name} {self.version}"


def image_of(record: Mapping[str, Any]) -> Image:
    """An :class:`Image` from a Glance image record; PlacementError when it cannot be one."""
    image_id = str(record.get("id"))
    try:
        vcpus = int(record.get("edgepin_vcpus", "1"))
        memory = int(record.get("edgepin_memory_mb", "256"))
        size = int(record.get("size") or 0)
    except (TypeError, ValueError, OverflowError):
        raise PlacementError(
            f"image {image_id}", "edgepin_vcpus, memory or size is no number"
        ) from None
    if not (1 <= vcpus <= MAX_VCPUS and MEMORY_MB[0] <= memory <= MEMORY_MB[1]):
        raise PlacementError(f"image {image_id}", f"{vcpus} vCPUs, {memory} MiB: out of range")
    try:
        usb = usb_ids(record.get(USB_PROPERTY))
    except ImageError as e:
        raise PlacementError(f"image {image_id}", f"{USB_PROPERTY}: {e.message}") from None
    try:
        pci = pci_selectors(record.get(PCI_PROPERTY))
    except ImageError as e:
        raise PlacementError(f"image {image_id}", f"{PCI_PROPERTY}: {e.message}") from None
    return Image(
        image_id=image_id,
        name=nodereport.clean_text(str(record.get("name") or ""), 255),
        version=nodereport.clean_text(str(record.get("edgepin_version") or ""), VERSION_SIZE),
        vcpus=vcpus,
        memory_mb=memory,
        size=max(size, 0),
        usb=usb,
        pci=pci,
    )


@dataclass(frozen=True)
class NodeView:
    """A node as the plan sees it: labels, assignment (the record's readable fields),
    whether it is revoked, and its report."""

    node_id: str
    labels: Labels
    image_id: str | None = None
    generation: int | None = None
    revoked: bool = False
    report: nodereport.NodeReport | None = None
    report_problem: str | None = None


@dataclass(frozen=True)
class Entry:
    node: str
    action: Action
    reason: str
    rule: str | None = None
    current: str | None = None  # the image id assigned now
    generation: int | None = None  # its generation
    target: str | None = None  # the image id the rule places

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "action": str(self.action),
            "reason": self.reason,
            "rule": self.rule,
            "current": self.current,
            "generation": self.generation,
            "target": self.target,
        }


@dataclass(frozen=True)
class Plan:
    entries: tuple[Entry, ...]
    names: dict[str, str] = field(default_factory=dict)  # "name version" of the images named

    def of(self, action: Action) -> list[Entry]:
        return [e for e in self.entries if e.action is action]

    def as_dict(self) -> dict[str, Any]:
        return {
            "entries": [e.as_dict() for e in self.entries],
            "images": dict(sorted(self.names.items())),
            "counts": {str(a): len(self.of(a)) for a in Action},
        }

    @property
    def digest(self) -> str:
        """sha256 of the plan's canonical JSON: ``edgepin apply --plan-digest`` checks it."""
        text = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def name(self, image_id: str | None) -> str:
        if image_id is None:
            return "nothing"
        return self.names.get(image_id, image_id)

    def text(self) -> str:
        """The plan as lines: deterministic, byte for byte."""
        counts = {a: len(self.of(a)) for a in Action}
        lines = [
            f"plan: {counts[Action.ASSIGN]} to assign, {counts[Action.UNCHANGED]} unchanged, "
            f"{counts[Action.LEFT_OUT]} left out ({len(self.entries)} nodes)"
        ]
        width = max((len(e.node) for e in self.entries), default=0)
        for e in self.entries:
            now = f"{self.name(e.current)}" + (
                f" (gen {e.generation})" if e.generation is not None else ""
            )
            if e.action is Action.ASSIGN:
                what = f"{now} -> {self.name(e.target)}  [rule {e.rule}]"
            elif e.action is Action.UNCHANGED:
                what = f"{now}  [rule {e.rule}]"
            else:
                what = e.reason + (f"  [rule {e.rule}]" if e.rule else "")
            lines.append(f"{e.action!s:<9}  {e.node:<{width}}  {what}")
        lines.append(f"digest {self.digest}")
        return "\n".join(lines) + "\n"


def resolve(placement: Placement, images: Iterable[Image]) -> dict[str, Image]:
    """Each rule's image (pure): exactly one published image per rule, else PlacementError."""
    known = list(images)
    chosen: dict[str, Image] = {}
    for rule in placement.rules:
        ref = rule.image
        if ref.image_id:
            found = [i for i in known if i.image_id == ref.image_id]
        else:
            found = [i for i in known if i.name == ref.name and i.version == ref.version]
        if not found:
            raise PlacementError(f"rule {rule.name}", f"no active edgepin image is {ref.text()}")
        if len({i.image_id for i in found}) > 1:
            ids = ", ".join(sorted({i.image_id for i in found}))
            raise PlacementError(
                f"rule {rule.name}", f"{len(found)} images are {ref.text()} ({ids}): give its id"
            )
        chosen[rule.name] = found[0]
    return chosen


def misfit(node: NodeView, image: Image, rule: Rule) -> str | None:
    """Why ``image`` cannot run on ``node`` by its report (pure); None when it fits."""
    if node.report is None:
        return node.report_problem or "no report"
    facts = node.report.facts
    if facts is None:
        return "its report has no facts (libvirt could not be asked)"
    if image.vcpus > facts.guest_cpus:
        return (
            f"{image.text()} wants {image.vcpus} vCPUs; the node has {facts.guest_cpus} for guests"
        )
    if image.memory_mb > facts.memory_mb:
        return f"{image.text()} wants {image.memory_mb} MiB; the node has {facts.memory_mb} MiB"
    need_mb = -(-image.size // 2**20)
    if image.image_id not in facts.local_images and need_mb > facts.disk_free_mb:
        return (
            f"{image.text()} needs {need_mb} MiB of disk; the node has {facts.disk_free_mb} "
            "MiB free for images"
        )
    missing = [f for f in rule.cpu_flags if f not in facts.cpu_flags]
    if missing:
        return f"the node's CPU lacks {', '.join(missing)}"
    absent = [u for u in image.usb if u not in facts.usb]
    if absent:
        return f"{image.text()} needs USB device {', '.join(absent)}; the node has none"
    present = dict(d.split("=", 1) for d in facts.pci)
    for selector in image.pci:
        found = len(pci_matches(selector, present))
        if found != 1:
            return f"{image.text()} needs PCI device {selector}; the node has {found}"
    return None


def place(node: NodeView, placement: Placement, chosen: Mapping[str, Image]) -> Entry:
    """One node's entry (pure)."""

    def entry(
        action: Action, reason: str, rule: str | None = None, target: str | None = None
    ) -> Entry:
        return Entry(node.node_id, action, reason, rule, node.image_id, node.generation, target)

    rule = None
    for r in placement.rules:
        miss = r.select.miss(node.labels)
        if miss is None:
            rule = r
            break
        if miss.startswith("label ") and "two values" in miss:
            return entry(Action.LEFT_OUT, miss)
    if rule is None:
        labels = ",".join(f"{k}={v}" for k, v in sorted(node.labels.values.items())) or "none"
        return entry(Action.LEFT_OUT, f"no rule selects it (labels: {labels})")
    image = chosen[rule.name]
    if node.revoked or (node.report is not None and node.report.state == "revoked"):
        return entry(Action.LEFT_OUT, "revoked", rule.name, image.image_id)
    if node.image_id == image.image_id:
        return entry(Action.UNCHANGED, "assigned already", rule.name, image.image_id)
    why = misfit(node, image, rule)
    if why is not None:
        return entry(Action.LEFT_OUT, why, rule.name, image.image_id)
    return entry(Action.ASSIGN, f"{rule.name} places {image.text()}", rule.name, image.image_id)


def plan(
    nodes: Iterable[NodeView],
    placement: Placement,
    images: Iterable[Image],
    names: Mapping[str, str] | None = None,
) -> Plan:
    """The plan (pure): one entry per node, in node order. ``images`` are the published
    images the rules may name; ``names`` (id -> "name version") names the images nodes are
    assigned now, for people."""
    chosen = resolve(placement, images)
    entries = tuple(place(n, placement, chosen) for n in sorted(nodes, key=lambda n: n.node_id))
    known = {**(names or {}), **{i.image_id: i.text() for i in chosen.values()}}
    named = {e.current for e in entries} | {e.target for e in entries}
    return Plan(entries, {i: known[i] for i in sorted(x for x in named if x) if i in known})
