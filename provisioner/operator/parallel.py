"""Bounded parallelism for fleet-wide operator commands: at most ``workers`` requests in
flight, results in the order of the input. The first error (a bug, or Ctrl-C) cancels the
calls not started yet, waits for the running ones and is raised: an interrupted command
stops within one call per worker, and running it again finishes the job."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

WORKERS = 8  # what one Keystone worker process queues without failing (docs/performance.md)


def bounded_map(fn: Callable[[T], R], items: Iterable[T], workers: int = WORKERS) -> list[R]:
    """``[fn(x) for x in items]`` with at most ``workers`` calls at a time."""
    todo = list(items)
    if workers <= 1 or len(todo) <= 1:
        return [fn(x) for x in todo]
    pool = ThreadPoolExecutor(max_workers=min(workers, len(todo)))
    try:
        futures = [pool.submit(fn, x) for x in todo]
        results = [f.result() for f in futures]
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return results
