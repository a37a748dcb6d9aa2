"""Node labels: ``key=value`` pairs on a node, kept as Keystone project tags.

A label is the tag ``edgepin-label:<key>=<value>`` on the node's project, so that Keystone
itself stores, lists and filters them (``openstack project show`` shows them, and
``GET /v3/projects?tags=edgepin-label:site=paris`` finds a site's nodes). Keys and values
are lowercase letters, digits, ``.``, ``_`` and ``-`` (at most 63, starting and ending with
a letter or digit): nothing Keystone's tags refuse (``/``, ``,``), nothing a terminal
shows differently, and no two labels that a case-insensitive database (MySQL's default
collation under Keystone) would take for one. A project holds at most 80 tags, the node's
``edgepin-node`` tag included.

Each change is one tag added or removed (``PUT``/``DELETE /v3/projects/{id}/tags/{tag}``),
never the whole list written back, so two operators labelling one node at once lose
nothing of each other's. A key that ends up with two values (two operators setting it at
once) is a conflict: :func:`labels_of` reports it, and placement leaves the node out.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from provisioner.cloud import translate
from provisioner.errors import EdgepinError, ServiceUnavailableError, UsageError
from provisioner.operator import nodes

PREFIX = "edgepin-label:"
NAME = re.compile(r"[a-z0-9](?:[a-z0-9._-]{0,61}[a-z0-9])?")
MAX_TAGS = 80  # Keystone's limit per project


@dataclass(frozen=True)
class Labels:
    """A node's labels, and the keys that have more than one value (conflicts)."""

    values: dict[str, str] = field(default_factory=dict)
    conflicts: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, str]:
        return dict(sorted(self.values.items()))

    def text(self) -> str:
        """``key=value,key=value`` (sorted), and ``key=a|b`` for a conflict."""
        parts = [f"{k}={v}" for k, v in sorted(self.values.items())]
        parts += [f"{k}={'|'.join(v)}" for k, v in sorted(self.conflicts.items())]
        return ",".join(sorted(parts))


def check_name(text: str, what: str) -> str:
    if not NAME.fullmatch(text):
        raise UsageError(
            f"invalid label {what} {text!r}",
            hint="lowercase letters, digits, '.', '_' and '-', at most 63 characters, "
            "starting and ending with a letter or a digit",
        )
    return text


def tag(key: str, value: str) -> str:
    return f"{PREFIX}{check_name(key, 'key')}={check_name(value, 'value')}"


def parse_tag(text: Any) -> tuple[str, str] | None:
    """(key, value) of a label tag; None for any other tag (or a malformed label tag)."""
    if not isinstance(text, str) or not text.startswith(PREFIX):
        return None
    key, sep, value = text[len(PREFIX) :].partition("=")
    if not sep or not NAME.fullmatch(key) or not NAME.fullmatch(value):
        return None
    return key, value


def labels_of(tags: Any) -> Labels:
    """The labels among a project's tags (anything that is not a list has none)."""
    found: dict[str, set[str]] = {}
    for t in tags if isinstance(tags, list) else []:
        kv = parse_tag(t)
        if kv is not None:
            found.setdefault(kv[0], set()).add(kv[1])
    return Labels(
        values={k: next(iter(v)) for k, v in found.items() if len(v) == 1},
        conflicts={k: tuple(sorted(v)) for k, v in found.items() if len(v) > 1},
    )


@dataclass(frozen=True)
class Change:
    """What ``edgepin label`` was asked: labels to set, keys to remove."""

    set: dict[str, str]
    remove: frozenset[str]


def parse_changes(args: Iterable[str]) -> Change:
    """``key=value`` sets a label, ``key-`` removes it; a key given twice is an error."""
    sets: dict[str, str] = {}
    removes: set[str] = set()
    for arg in args:
        if "=" in arg:
            key, _, value = arg.partition("=")
            check_name(key, "key")
            check_name(value, "value")
        elif arg.endswith("-"):
            key, value = check_name(arg[:-1], "key"), ""
        else:
            raise UsageError(f"{arg!r} is neither key=value nor key-")
        if key in sets or key in removes:
            raise UsageError(f"label {key} is given twice")
        if value:
            sets[key] = value
        else:
            removes.add(key)
    return Change(sets, frozenset(removes))


def tag_changes(tags: list[str], change: Change) -> tuple[list[str], list[str]]:
    """The tags to add and to delete (pure): every other value of a key set or removed goes."""
    present = set(tags)
    add = sorted({tag(k, v) for k, v in change.set.items()} - present)
    touched = set(change.set) | change.remove
    keep = {tag(k, v) for k, v in change.set.items()}
    delete = sorted(
        t for t in present if (kv := parse_tag(t)) and kv[0] in touched and t not in keep
    )
    if len(present) + len(add) - len(delete) > MAX_TAGS:
        raise UsageError(f"a node holds at most {MAX_TAGS - 1} labels (Keystone's tag limit)")
    return add, delete


def _tag_url(project_id: str, t: str) -> str:
    return f"/projects/{project_id}/tags/{urllib.parse.quote(t, safe='')}"


def write(conn: Any, project_id: str, add: list[str], delete: list[str]) -> None:
    """Add and delete single tags (a tag already there, or already gone, is fine)."""
    for t in add:
        with translate("keystone", f"label {t}"):
            r = conn.identity.put(_tag_url(project_id, t), raise_exc=False)
        if r.status_code == 400 and t in _tags(conn, project_id):  # added meanwhile
            continue
        _ok(r.status_code, (200, 201, 204), f"add tag {t}")
    for t in delete:
        with translate("keystone", f"label {t}"):
            r = conn.identity.delete(_tag_url(project_id, t), raise_exc=False)
        _ok(r.status_code, (204, 404), f"delete tag {t}")


def _ok(status: int, ok: tuple[int, ...], what: str) -> None:
    if status in ok:
        return
    if status >= 500:
        raise ServiceUnavailableError(f"keystone: {what}: server error {status}")
    raise EdgepinError(f"keystone: {what} refused ({status})")


def _tags(conn: Any, project_id: str) -> list[str]:
    with translate("keystone", f"tags of project {project_id}"):
        r = conn.identity.get(f"/projects/{project_id}/tags")
        r.raise_for_status()
    found: list[str] = r.json().get("tags", [])
    return found


def label(conn: Any, edge_domain: str, node_id: str, args: list[str]) -> Labels:
    """Change a node's labels as ``args`` say (none: change nothing) and return them."""
    change = parse_changes(args)
    domain_id = nodes.edge_domain_id(conn, edge_domain)
    node = nodes.get_node(conn, domain_id, node_id)
    tags = list(node.project.get("tags") or [])
    add, delete = tag_changes(tags, change)
    if add or delete:
        write(conn, node.project_id, add, delete)
        tags = _tags(conn, node.project_id)
    return labels_of(tags)
