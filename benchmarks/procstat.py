"""Measure processes: wall time and peak RSS of a child, CPU seconds of a process group."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
GNU_TIME = shutil.which("time", path="/usr/bin:/bin")


@dataclass
class Run:
    seconds: float
    max_rss_kib: int
    # user + system CPU of the program and every child it waited for (wait4's rusage)
    cpu_seconds: float
    returncode: int
    stdout: bytes
    stderr: bytes


def run(
    args: Sequence[str],
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 1800,
) -> Run:
    """Run a program; its wall time and peak RSS.

    The peak RSS comes from GNU time when it is installed: a child forked from this
    (large) Python process carries the parent's RSS until it execs, and the kernel's
    ``ru_maxrss`` keeps that high-water mark. GNU time is small, so its child's figure is
    the program's own. Without it, wait4's figure is an upper bound.
    """
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.NamedTemporaryFile("r") as rss,
    ):
        prefix = [GNU_TIME, "-f", "%M", "-o", rss.name] if GNU_TIME else []
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [*prefix, *args],
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=env,
        )
        if proc.stdin is not None:
            try:
                proc.stdin.write(stdin or b"")
                proc.stdin.close()
            except BrokenPipeError:
                pass
        # wait4 (not Popen.wait) to get this child's own rusage
        try:
            _, status, usage = _wait4(proc.pid, timeout)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        seconds = time.monotonic() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
        max_rss = int(usage.ru_maxrss)
        if GNU_TIME:
            text = rss.read().strip().splitlines()
            # "Command exited with non-zero status N" comes first when it failed
            max_rss = int(text[-1]) if text and text[-1].isdigit() else max_rss
    cpu = usage.ru_utime + usage.ru_stime
    return Run(seconds, max_rss, cpu, proc.returncode, stdout, stderr)


def _wait4(pid: int, timeout: float) -> tuple[int, int, resource.struct_rusage]:
    deadline = time.monotonic() + timeout
    while True:
        wpid, status, usage = os.wait4(pid, os.WNOHANG)
        if wpid == pid:
            return wpid, status, usage
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            return os.wait4(pid, 0)
        time.sleep(0.01)


def group_cpu_seconds(pgid: int) -> float:
    """user+system CPU seconds of every live process in a process group (+ reaped children)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name is in parentheses and may contain spaces
        fields = raw[raw.rindex(")") + 2 :].split()
        if int(fields[2]) != pgid:
            continue
        utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
        total += utime + stime + cutime + cstime
    return total / CLK_TCK


def self_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system
