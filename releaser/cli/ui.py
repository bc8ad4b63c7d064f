"""The terminal reporter the CLI hands to stages: rich progress bars on stderr, messages as lines."""

from __future__ import annotations

import threading
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
        # one live display for every bar: stages running side by side (Ray) each open theirs from their own thread,
        # and rich allows one live display at a time
        self._lock = threading.Lock()
        self._bar: Progress | None = None
        self._open = 0

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
        with self._lock:
            if self._bar is None:
                columns = (TextColumn("{task.description}"), BarColumn(),
                           DownloadColumn() if self.in_bytes else MofNCompleteColumn(), TimeElapsedColumn(),
                           TimeRemainingColumn())
                self._bar = Progress(*columns, console=self.console, transient=True)
                self._bar.start()
            bar = self._bar
            task = bar.add_task(description, total=total)
            self._open += 1

        def advance(n: float = 1, description: str | None = None) -> None:
            bar.update(task, advance=n, **({"description": description} if description else {}))

        try:
            yield advance
        finally:
            with self._lock:
                bar.remove_task(task)
                self._open -= 1
                if not self._open:
                    bar.stop()
                    self._bar = None
