"""The terminal reporter the CLI hands to stages: rich progress bars on stderr, messages as lines."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from ..stage import Reporter


class RichReporter(Reporter):
    def __init__(self, console: Console | None = None, *, quiet: bool = False, in_bytes: bool = False):
        self.console = console or Console(stderr=True)
        self.quiet, self.in_bytes = quiet, in_bytes   # in_bytes: progress counts bytes (shown as MB/GB)

    @property
    def shows_progress(self) -> bool:
        return not self.quiet

    def message(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def warning(self, text: str) -> None:
        self.console.print(f"[yellow]warning:[/] {text}", highlight=False, soft_wrap=True)

    @contextmanager
    def progress(self, description: str, total: float | None = None) -> Iterator[Callable[..., None]]:
        if self.quiet:
            yield lambda n=1, description=None: None
            return
        columns = (TextColumn("{task.description}"), BarColumn(),
                   DownloadColumn() if self.in_bytes else MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn())
        with Progress(*columns, console=self.console, transient=True) as bar:
            task = bar.add_task(description, total=total)

            def advance(n: float = 1, description: str | None = None) -> None:
                bar.update(task, advance=n, **({"description": description} if description else {}))

            yield advance
