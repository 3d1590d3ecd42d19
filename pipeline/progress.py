"""Progress bars of the stages that draw them (prepare, tokenize, train, evaluate), on the console's stream so log
lines print above them. Apart from console.py so that only those stages depend on them."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from pipeline.console import console


@contextmanager
def byte_progress(description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """A rich progress bar advanced by a callable taking a byte count."""
    columns = [TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()]
    with _bar(columns, description, total) as advance:
        yield advance


@contextmanager
def count_progress(description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """A rich progress bar advanced by a callable taking a count of items."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    with _bar(columns, description, total) as advance:
        yield advance


@contextmanager
def _bar(columns: list, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
