"""A rich console Reporter for the awq commands (messages and a progress bar on stderr)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..stage import Reporter


class RichReporter(Reporter):
    def __init__(self, console: Console):
        self.console = console

    def message(self, text: str) -> None:
        self.console.print(text, highlight=False, soft_wrap=True)

    def warning(self, text: str) -> None:
        self.console.print(f"[yellow]warning:[/] {text}", highlight=False, soft_wrap=True)

    @contextmanager
    def progress(self, description: str, total: float | None = None) -> Iterator[Callable[..., None]]:
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        with Progress(*columns, console=self.console, transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task, n)
