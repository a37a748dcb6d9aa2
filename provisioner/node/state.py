"""Node state: JSON files written atomically (temp file, fsync, rename, fsync of the
directory) and a process lock so that two provisioners never run at once."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from provisioner.errors import StateError


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if e.errno == errno.ENOSPC:
            raise StateError(f"no space left writing {path}") from None
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, data: Any, mode: int = 0o600) -> None:
    atomic_write(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(), mode)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        raise StateError(f"{path} is corrupt (not JSON)") from None
    return data


@contextlib.contextmanager
def node_lock(path: Path, wait: bool = False, timeout: float | None = None) -> Iterator[None]:
    """An exclusive flock; a second provisioner fails at once (or waits with wait=True, or
    for up to ``timeout`` seconds)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
                break
            except BlockingIOError:
                if deadline is None or time.monotonic() >= deadline:
                    raise StateError(
                        "another edgepin provisioner is running (lock held)", hint=str(path)
                    ) from None
                time.sleep(0.5)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Temp files of atomic writes interrupted by a crash (only run under the node lock)."""
    removed = []
    if directory.exists():
        for path in directory.rglob(".*.tmp"):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
