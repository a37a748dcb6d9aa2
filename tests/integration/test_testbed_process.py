"""The test bed's process helpers against real processes: a group of ``sleep`` children."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from tests.testbed import process

pytestmark = pytest.mark.integration

# a leader with a member in its group, as a service with its workers
GROUP = ["sh", "-c", "sleep 60 & exec sleep 61"]
# the same, deaf to SIGTERM (the disposition is inherited by the member)
DEAF = ["sh", "-c", "trap '' TERM; sleep 60 & exec sleep 61"]
Start = Callable[[list[str]], subprocess.Popen[bytes]]


@pytest.fixture
def start() -> Iterator[Start]:
    """Start a group in its own session; whatever a test leaves is stopped afterwards."""
    started: list[subprocess.Popen[bytes]] = []

    def do(argv: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, start_new_session=True)
        started.append(proc)
        deadline = time.monotonic() + 10
        # both there: pgrep -g lists the group
        while time.monotonic() < deadline:
            members = subprocess.run(
                ["pgrep", "-g", str(proc.pid)], capture_output=True, text=True, check=False
            ).stdout.split()
            if len(members) == 2:
                return proc
            time.sleep(0.05)
        raise AssertionError(f"{argv} did not start two processes")

    yield do
    for proc in started:
        process.stop_group(proc.pid, 10.0)
        proc.poll()  # reaped by stop_group: Popen learns that it is gone
        assert not process.group_alive(proc.pid)


def test_stop_group_ends_the_leader_and_its_members_and_reaps_the_leader(
    start: Start,
) -> None:
    proc = start(GROUP)
    t0 = time.monotonic()
    process.stop_group(proc.pid, 10.0)
    assert time.monotonic() - t0 < 5, "SIGTERM should have been enough"
    assert not process.alive(proc.pid) and not process.group_alive(proc.pid)
    with pytest.raises(ChildProcessError):
        os.waitpid(proc.pid, 0)  # reaped already


def test_stop_group_kills_a_group_deaf_to_sigterm_after_the_timeout(start: Start) -> None:
    proc = start(DEAF)
    t0 = time.monotonic()
    process.stop_group(proc.pid, 1.0)
    assert time.monotonic() - t0 >= 1.0
    assert not process.group_alive(proc.pid)


def test_nothing_is_signalled_when_the_pid_is_not_ours(start: Start) -> None:
    proc = start(GROUP)
    process.stop_group(proc.pid, 1.0, ours=lambda pid: False)
    process.stop_process(proc.pid, 1.0, ours=lambda pid: False)
    assert process.alive(proc.pid) and proc.poll() is None


def test_stop_process_ends_one_process_and_leaves_its_group(start: Start) -> None:
    proc = start(GROUP)
    process.stop_process(proc.pid, 10.0)
    assert not process.alive(proc.pid)
    assert process.group_alive(proc.pid), "the member was not asked to stop"


def test_a_zombie_counts_as_gone() -> None:
    proc = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while process.alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process.alive(proc.pid)
    assert proc.poll() == 0  # it was a zombie until now: nobody had reaped it


def test_wait_port_free_returns_once_the_listener_closes() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    t0 = time.monotonic()
    process.wait_port_free("127.0.0.1", port, timeout=0.5)
    assert time.monotonic() - t0 >= 0.5  # still listening: it waited out its timeout
    listener.close()
    t0 = time.monotonic()
    process.wait_port_free("127.0.0.1", port, timeout=10)
    assert time.monotonic() - t0 < 2
