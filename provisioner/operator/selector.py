"""Label selectors: which nodes a placement rule, a wave or ``edgepin status --label`` means.

A selector maps label keys to the values allowed for each; a node matches when, for every
key, its label has one of the values. The empty selector matches every node. A key whose
label has two values on a node (:class:`provisioner.operator.labels.Labels` conflicts)
matches nothing: which value is meant cannot be known.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from provisioner.errors import UsageError
from provisioner.operator.labels import Labels, check_name


@dataclass(frozen=True)
class Selector:
    terms: tuple[tuple[str, frozenset[str]], ...] = ()  # sorted by key

    @classmethod
    def of(cls, mapping: Mapping[str, Iterable[str]]) -> Selector:
        terms = []
        for key, values in sorted(mapping.items()):
            allowed = frozenset(check_name(v, "value") for v in values)
            if not allowed:
                raise UsageError(f"selector key {key} allows no value")
            terms.append((check_name(key, "key"), allowed))
        return cls(tuple(terms))

    def miss(self, labels: Labels) -> str | None:
        """None when ``labels`` match; else why not, in a few words."""
        for key, allowed in self.terms:
            if key in labels.conflicts:
                return f"label {key} has two values ({'|'.join(labels.conflicts[key])})"
            value = labels.values.get(key)
            if value is None:
                return f"no label {key}"
            if value not in allowed:
                return f"{key}={value}"
        return None

    def matches(self, labels: Labels) -> bool:
        return self.miss(labels) is None

    def text(self) -> str:
        if not self.terms:
            return "all nodes"
        return ",".join(f"{k}={'|'.join(sorted(v))}" for k, v in self.terms)


def from_args(args: Iterable[str]) -> Selector:
    """``key=value`` arguments (``--label``), all of which must match; ``key=a|b`` allows
    either value."""
    mapping: dict[str, set[str]] = {}
    for arg in args:
        key, sep, values = arg.partition("=")
        if not sep:
            raise UsageError(f"--label {arg!r} is not key=value")
        if key in mapping:
            raise UsageError(f"--label {key} is given twice (key=a|b allows either value)")
        mapping[key] = set(values.split("|"))
    return Selector.of(mapping)
