"""The test bed's process helpers, the parts that need no child process and no connection:
whether a pid is alive, a free port, a private file's mode."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
from pathlib import Path

import pytest

from tests.testbed import process

pytestmark = pytest.mark.unit


def _no_such_pid() -> int:
    """A pid above the kernel's limit: no process can have it."""
    return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1


def test_this_process_is_alive_and_a_pid_nobody_has_is_not() -> None:
    assert process.alive(os.getpid())
    assert not process.alive(_no_such_pid())


def test_this_process_group_is_alive_and_an_unused_one_is_not() -> None:
    assert process.group_alive(os.getpgid(0))
    assert not process.group_alive(_no_such_pid())


def test_stopping_a_pid_nobody_has_does_nothing() -> None:
    process.stop_group(_no_such_pid(), 0.1)
    process.stop_process(_no_such_pid(), 0.1)


@pytest.fixture
def signals(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    """Record the signals the helpers send instead of sending them."""
    sent: list[tuple[str, int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append(("kill", pid, sig)))
    monkeypatch.setattr(os, "killpg", lambda pid, sig: sent.append(("killpg", pid, sig)))
    monkeypatch.setattr(process, "KILL_SETTLE", 0.1)
    return sent


def test_a_pid_that_is_not_ours_gets_no_signal(signals: list[tuple[str, int, int]]) -> None:
    asked = []

    def ours(pid: int) -> bool:
        asked.append(pid)
        return False

    process.stop_process(1234, 0.1, ours=ours)
    process.stop_group(1235, 0.1, ours=ours)
    assert asked == [1234, 1235] and signals == []


def test_sigkill_follows_sigterm_only_when_the_process_stays(
    signals: list[tuple[str, int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # a process that ignores SIGTERM (not our child: waitpid says so)
    monkeypatch.setattr(process, "alive", lambda pid: True)
    monkeypatch.setattr(process, "group_alive", lambda pgid: False)

    def not_our_child(pid: int, flags: int) -> tuple[int, int]:
        raise ChildProcessError(pid)

    monkeypatch.setattr(os, "waitpid", not_our_child)
    process.stop_process(1234, 0.1)
    assert signals == [("kill", 1234, signal.SIGTERM), ("kill", 1234, signal.SIGKILL)]
    signals.clear()
    # a group whose leader went at SIGTERM but whose member stayed
    monkeypatch.setattr(process, "alive", lambda pid: False)
    monkeypatch.setattr(process, "group_alive", lambda pgid: True)
    process.stop_group(1235, 0.1)
    assert signals == [("killpg", 1235, signal.SIGTERM), ("killpg", 1235, signal.SIGKILL)]
    signals.clear()
    # a process that goes at SIGTERM
    monkeypatch.setattr(process, "group_alive", lambda pgid: False)
    process.stop_group(1236, 5.0)
    assert signals == [("killpg", 1236, signal.SIGTERM)]


def test_a_free_port_can_be_bound() -> None:
    port = process.free_port()
    assert 0 < port < 65536
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_private_file_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = process.write_private(tmp_path / "new" / "secret", "s3cret\n")
    finally:
        os.umask(old)
    assert _mode(path) == 0o600
    assert path.read_text() == "s3cret\n"
    assert [p.name for p in path.parent.iterdir()] == ["secret"]  # no temporary file left


def test_a_private_file_replaces_a_readable_one_without_reusing_it(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("old")
    path.chmod(0o644)
    inode = path.stat().st_ino
    assert process.write_private(path, b"\x00new") == path
    assert _mode(path) == 0o600
    assert path.read_bytes() == b"\x00new"
    assert path.stat().st_ino != inode  # a reader of the old file never sees the new data


def test_a_private_file_replaces_a_symlink_and_leaves_its_target(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("keep")
    link = tmp_path / "secret"
    link.symlink_to(target)
    process.write_private(link, "new")
    assert not link.is_symlink() and link.read_text() == "new"
    assert target.read_text() == "keep"


def test_a_control_plane_that_finds_another_running_leaves_it_alone(tmp_path: Path) -> None:
    """A second session in the same run folder (a child pytest, a second
    ``./build.sh controlplane up``) is refused, and the clean-up its caller does after the
    failed up() stops nothing of the first one's and keeps its state."""
    from tests.testbed.controlplane import ControlPlane, ControlPlaneRunningError

    run = tmp_path / "controlplane"
    run.mkdir()
    state = {"pids": {"keystone": os.getpid()}, "ports": {"keystone": 1}}
    (run / "controlplane.json").write_text(json.dumps(state))
    cp = ControlPlane(run)
    with pytest.raises(ControlPlaneRunningError, match="already running"):
        cp.up(None)
    cp.down()
    assert json.loads((run / "controlplane.json").read_text()) == state
