"""qemu-img's LUKS key-derivation timing that sees no CPU time on a loaded machine."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from tenacity import stop_after_attempt, wait_none

from provisioner import qemuimg
from provisioner.errors import ImageError

pytestmark = pytest.mark.unit

NO_CPU = b"qemu-img: /tmp/x.qcow2: error while converting qcow2: Unable to get accurate CPU usage\n"


def fake_runs(monkeypatch: pytest.MonkeyPatch, results: list[tuple[int, bytes]]) -> list[Any]:
    calls: list[Any] = []

    def run(args: Any, secret: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        calls.append(args)
        code, err = results[min(len(calls), len(results)) - 1]
        return subprocess.CompletedProcess(args, code, b"", err)

    monkeypatch.setattr(qemuimg, "_run", run)
    monkeypatch.setattr(qemuimg._encrypt.retry, "wait", wait_none())  # type: ignore[attr-defined]
    monkeypatch.setattr(qemuimg._encrypt.retry, "stop", stop_after_attempt(5))  # type: ignore[attr-defined]
    return calls


def test_a_timing_run_that_saw_no_cpu_time_is_run_again(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_runs(monkeypatch, [(1, NO_CPU), (1, NO_CPU), (0, b"")])
    qemuimg.encrypt(Path("in"), "qcow2", Path("out"), b"secret", 100)
    assert len(calls) == 3


def test_it_ends_in_a_clear_error_not_an_internal_one(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_runs(monkeypatch, [(1, NO_CPU)])
    with pytest.raises(ImageError, match="could not time the LUKS key derivation") as e:
        qemuimg.encrypt(Path("in"), "qcow2", Path("out"), b"secret", 100)
    assert len(calls) == 5 and e.value.hint and "less loaded" in e.value.hint


def test_other_failures_are_not_tried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_runs(monkeypatch, [(1, b"qemu-img: Could not open 'in'\n")])
    with pytest.raises(ImageError, match="Could not open"):
        qemuimg.encrypt(Path("in"), "qcow2", Path("out"), b"secret", 100)
    assert len(calls) == 1
