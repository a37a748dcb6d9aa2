"""Processes, ports and private files for the test bed and the benchmarks, in one place.

Every server of the test bed is stopped by pid from a state file, so a pid may have been
reused by the time it is stopped: the stop functions take an ownership check (``ours``)
that is asked once, before any signal. A zombie counts as gone everywhere: a service
whose parent has not reaped it yet holds no port and no file.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# how long a process or group may take to disappear after SIGKILL
KILL_SETTLE = 5.0
POLL = 0.05


def _state(stat: str) -> tuple[str, int]:
    """(state, process group) from the text of ``/proc/<pid>/stat``; the command name in
    parentheses may hold spaces and parentheses itself, so split after the last one."""
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0], int(fields[2])


def alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state, _ = _state(Path(f"/proc/{pid}/stat").read_text())
    except OSError:
        return False
    return state != "Z"


def group_alive(pgid: int) -> bool:
    """Some process that is not a zombie is in process group ``pgid``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, group = _state((entry / "stat").read_text())
        except (OSError, IndexError, ValueError):
            continue
        if group == pgid and state != "Z":
            return True
    return False


def _reap(pid: int) -> None:
    """Collect ``pid``'s exit status if it is our child (it is a zombie until then)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _wait(gone: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if gone():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL)


def _stop(
    pid: int,
    timeout: float,
    send: Callable[[int, int], None],
    gone: Callable[[], bool],
    ours: Callable[[int], bool] | None,
) -> None:
    if ours is not None and not ours(pid):
        return  # gone, or the pid now belongs to something else
    try:
        send(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if _wait(gone, timeout):
        return
    try:
        send(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    _wait(gone, KILL_SETTLE)


def stop_group(pid: int, timeout: float, *, ours: Callable[[int], bool] | None = None) -> None:
    """Stop the process group that ``pid`` leads (a server started in its own session):
    SIGTERM to the group, up to ``timeout`` seconds for the leader and every member to go,
    then SIGKILL to the group and up to KILL_SETTLE seconds more. The leader is reaped if
    it is our child. Nothing is signalled if ``ours(pid)`` says the pid is not ours, and
    nothing more is done if the group no longer exists."""

    def gone() -> bool:
        if alive(pid):
            return False
        _reap(pid)  # a zombie now, so collected at once (reaping first would race its exit)
        return not group_alive(pid)

    _stop(pid, timeout, os.killpg, gone, ours)


def stop_process(pid: int, timeout: float, *, ours: Callable[[int], bool] | None = None) -> None:
    """Stop one process (a daemon that forked away from its group): SIGTERM, up to
    ``timeout`` seconds, SIGKILL, up to KILL_SETTLE seconds more; reaped if our child."""

    def gone() -> bool:
        if alive(pid):
            return False
        _reap(pid)  # as in stop_group: check, then reap
        return True

    _stop(pid, timeout, os.kill, gone, ours)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port_free(host: str, port: int, timeout: float = 10.0) -> None:
    """Wait up to ``timeout`` seconds until nothing accepts connections on ``host:port``;
    return either way (the next bind says whether it is really free)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex((host, port)) != 0:
                return
        time.sleep(0.1)


def write_private(path: Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` with mode 0600, readable by nobody else at any instant.

    The data goes to a new file in the same folder, which ``mkstemp`` creates 0600 (O_EXCL:
    never an existing file with a wider mode), then is renamed over ``path``: a reader that
    opened the old file never sees the new data, and a symlink at ``path`` is replaced, not
    followed. Test-bed files need not survive a power cut, so there is no fsync."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return path
