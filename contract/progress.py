"""Progress reporting for long work: a tiny protocol for domain code, rich bars on stderr for people."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

from rich import progress as rp
from rich.console import Console


class ProgressTask(Protocol):
    def advance(self, amount: float = 1) -> None: ...


class Progress(Protocol):
    def task(
        self, description: str, total: float | None = None, unit: str = ""
    ) -> AbstractContextManager[ProgressTask]:
        """A bar for one piece of work; ``unit="B"`` shows bytes and throughput."""


class _NullTask:
    def advance(self, amount: float = 1) -> None:
        pass


class NullProgress:
    """For tests and machine use: reports nothing."""

    @contextmanager
    def task(self, description: str, total: float | None = None, unit: str = "") -> Iterator[ProgressTask]:
        yield _NullTask()


class RichProgress:
    """Bars on stderr, so stdout stays clean for ``--json``."""

    def __init__(self) -> None:
        self.console = Console(stderr=True)

    @contextmanager
    def task(self, description: str, total: float | None = None, unit: str = "") -> Iterator[ProgressTask]:
        columns = [rp.TextColumn("{task.description}"), rp.BarColumn(), rp.TaskProgressColumn()]
        columns += [rp.DownloadColumn(), rp.TransferSpeedColumn()] if unit == "B" else [rp.MofNCompleteColumn()]
        columns.append(rp.TimeElapsedColumn())
        # Not a terminal (CI, logs): no bars at all rather than a wall of redraws.
        with rp.Progress(*columns, console=self.console, disable=not self.console.is_terminal) as bar:
            tid = bar.add_task(description, total=total)

            class _Task:
                def advance(self, amount: float = 1) -> None:
                    bar.advance(tid, amount)

            yield _Task()
