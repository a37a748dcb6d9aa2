"""Unit tests cannot reach the network or run programs by accident."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest


class BlockedError(AssertionError):
    pass


@pytest.fixture(autouse=True)
def _no_subprocess_no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def blocked(*args: Any, **kwargs: Any) -> Any:
        raise BlockedError("unit tests may not run programs or open connections")

    monkeypatch.setattr(subprocess.Popen, "__init__", blocked)
    monkeypatch.setattr(socket.socket, "connect", blocked)
    monkeypatch.setattr(socket.socket, "connect_ex", blocked)
    yield
