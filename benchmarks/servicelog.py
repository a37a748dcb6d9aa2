"""Requests seen by each test-bed service, from the access logs its gunicorn writes."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from tests.testbed.controlplane import SERVICES

REQUEST = re.compile(r'"([A-Z]+) (\S+) HTTP/[0-9.]+"')


class AccessLogs:
    """Mark the logs' ends now; ``since()`` returns the requests made after the mark."""

    def __init__(self, cp_run_dir: Path) -> None:
        self.paths = {s: cp_run_dir / s / "access.log" for s in SERVICES}
        self.offsets = {s: self._size(p) for s, p in self.paths.items()}

    @staticmethod
    def _size(p: Path) -> int:
        return p.stat().st_size if p.exists() else 0

    def since(self) -> dict[str, list[tuple[str, str]]]:
        out: dict[str, list[tuple[str, str]]] = {}
        for s, p in self.paths.items():
            found: list[tuple[str, str]] = []
            if p.exists():
                with p.open("rb") as f:
                    f.seek(self.offsets[s])
                    for line in f.read().decode(errors="replace").splitlines():
                        m = REQUEST.search(line)
                        if m:
                            found.append((m.group(1), m.group(2)))
            out[s] = found
        return out


def summarize(requests: dict[str, list[tuple[str, str]]]) -> dict[str, int]:
    counts = {s: len(r) for s, r in requests.items()}
    counts["tokens_issued"] = sum(
        1
        for m, path in requests.get("keystone", [])
        if m == "POST" and path.startswith("/v3/auth/tokens")
    )
    counts["token_validations"] = sum(
        1
        for m, path in requests.get("keystone", [])
        if m == "GET" and path.startswith("/v3/auth/tokens")
    )
    return counts


def by_route(requests: list[tuple[str, str]]) -> dict[str, int]:
    """Count requests by method and path with ids replaced by {id}."""
    c: Counter[str] = Counter()
    for method, path in requests:
        p = re.sub(r"[0-9a-f]{32}|[0-9a-f-]{36}", "{id}", path.split("?")[0])
        c[f"{method} {p}"] += 1
    return dict(c)
