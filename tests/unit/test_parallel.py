"""Bounded parallelism: order kept, at most N at a time, the first error stops the rest."""

from __future__ import annotations

import threading
import time

import pytest

from provisioner.operator.parallel import bounded_map

pytestmark = pytest.mark.unit


def test_order_and_bound() -> None:
    running, peak = [0], [0]
    lock = threading.Lock()

    def work(x: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.002)
        with lock:
            running[0] -= 1
        return x * x

    assert bounded_map(work, range(50), 4) == [x * x for x in range(50)]
    assert peak[0] <= 4
    assert bounded_map(work, [3], 8) == [9] and bounded_map(work, [], 8) == []


def test_the_first_error_cancels_what_has_not_started() -> None:
    started: list[int] = []

    def work(x: int) -> int:
        started.append(x)
        if x == 0:
            raise KeyboardInterrupt  # what Ctrl-C raises in the waiting thread, here sooner
        time.sleep(0.01)
        return x

    with pytest.raises(KeyboardInterrupt):
        bounded_map(work, range(1000), 4)
    assert len(started) < 100  # not the whole fleet before giving up
