"""Progress for long transfers, on stderr, with rich."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

stderr = Console(stderr=True)


@contextlib.contextmanager
def transfer(description: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A progress bar for ``total`` bytes; yields ``advance(nbytes)``."""
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        disable=not enabled,
    )
    with progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)


def step(message: str) -> None:
    stderr.print(f"[bold]==>[/bold] {message}", highlight=False)
