"""Keystone listings are read whole, page by page: a fleet larger than one page (1,000 by
default in Keystone 30) is the whole fleet, never its first page."""

from __future__ import annotations

from typing import Any

import pytest

from provisioner.errors import ServiceUnavailableError
from provisioner.operator import nodes

pytestmark = pytest.mark.unit


class Response:
    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body

    def raise_for_status(self) -> None:
        pass

    def json(self) -> dict[str, Any]:
        return self.body


class Keystone:
    """Pages as Keystone 30 makes them: at most ``size`` per page, a next link on a full
    page, ``truncated`` then too."""

    def __init__(self, items: int, size: int, marker: bool = True, pages: bool = True) -> None:
        self.items = [{"id": f"{i:04d}", "name": f"n{i}"} for i in range(items)]
        self.size, self.marker, self.pages = size, marker, pages
        self.identity = self
        self.calls: list[dict[str, Any]] = []

    def get(self, path: str, params: dict[str, Any]) -> Response:
        self.calls.append(dict(params))
        start = 0
        if self.marker and "marker" in params:
            start = next(i for i, x in enumerate(self.items) if x["id"] == params["marker"]) + 1
        limit = min(int(params.get("limit", self.size)), self.size)
        page = self.items[start : start + limit]
        full = len(page) == limit
        body: dict[str, Any] = {"projects": page, "links": {"next": None}}
        if full:
            body["truncated"] = True
            if self.pages:
                body["links"]["next"] = "https://keystone/v3/projects?marker=..."
        return Response(body)


def test_every_page_is_read() -> None:
    k = Keystone(2500, 1000)
    got = nodes._listing(k, "/projects", {"domain_id": "d"}, "projects")
    assert [x["id"] for x in got] == [x["id"] for x in k.items]
    assert all(c["domain_id"] == "d" and c["limit"] == nodes.PAGE for c in k.calls)
    # a page that happens to end the list exactly: one more request finds it empty
    k = Keystone(2000, 1000)
    assert len(nodes._listing(k, "/projects", {}, "projects")) == 2000
    assert len(k.calls) == 3


def test_a_listing_cut_short_or_that_does_not_page_is_an_error() -> None:
    with pytest.raises(ServiceUnavailableError, match="truncated"):
        nodes._listing(Keystone(1500, 1000, pages=False), "/projects", {}, "projects")
    with pytest.raises(ServiceUnavailableError, match="does not page"):
        nodes._listing(Keystone(1500, 1000, marker=False), "/projects", {}, "projects")
