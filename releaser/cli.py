"""The ``releaser`` command line: thin wrappers around the Python API; errors become one-line messages."""

from __future__ import annotations

import functools
import sys

import typer
from rich.console import Console

from .errors import ReleaserError

app = typer.Typer(
    name="releaser",
    help="Turn one recipe into a finished model release: merge weights, fix tokenizers, export GGUF, render cards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def friendly(fn):
    """Turn ReleaserError (and Ctrl-C) into a one-line message and a non-zero exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ReleaserError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            console.print("[bold red]interrupted[/]: nothing was written under the output name")
            raise typer.Exit(130) from None

    return wrapper


@app.callback()
def main() -> None:
    """releaser: merge, fix, quantize, document and publish model releases."""


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
