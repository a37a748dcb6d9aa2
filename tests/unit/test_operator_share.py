"""What `edgepin assign` says when Glance refuses to share an image (pure logic)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from provisioner.errors import ImageError
from provisioner.operator import assign

pytestmark = pytest.mark.unit


@dataclass
class _Answer:
    status_code: int


class _Image:
    def __init__(self, status: int) -> None:
        self.status = status
        self.posted: list[dict[str, Any]] = []

    def post(self, path: str, json: dict[str, Any], raise_exc: bool) -> _Answer:
        self.posted.append(json)
        return _Answer(self.status)


class _Conn:
    def __init__(self, status: int) -> None:
        self.image = _Image(status)


def test_share_already_member_is_fine() -> None:
    conn = _Conn(409)
    assign.share(conn, "img", "proj")
    assert conn.image.posted == [{"member": "proj"}]


def test_share_member_quota_names_the_glance_option() -> None:
    with pytest.raises(ImageError) as e:
        assign.share(_Conn(413), "img", "proj")
    assert "image_member_quota" in e.value.message
    assert "image_member_quota" in (e.value.hint or "")


def test_share_other_refusal_keeps_the_status() -> None:
    with pytest.raises(ImageError, match=r"\(403\)"):
        assign.share(_Conn(403), "img", "proj")
