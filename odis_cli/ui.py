"""What every command shares: the console, progress bars, one-line errors."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console()
error_console = Console(stderr=True)


class Settings:
    debug = False


def make_progress(*extra_columns) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        *extra_columns,
        console=console,
        transient=False,
    )


@contextlib.contextmanager
def progress_callback(description: str) -> Iterator[Callable[[int, int], None]]:
    """A `progress(done, total)` callback for library functions, drawn as a bar."""
    with make_progress() as progress:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Turn any failure into one line on stderr and exit status 1 (traceback with --debug)."""
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except KeyboardInterrupt:
        error_console.print("interrupted")
        raise typer.Exit(130) from None
    except Exception as error:  # the CLI's contract: one line, no traceback
        if Settings.debug:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        name = type(error).__name__
        error_console.print(
            f"[red]error:[/red] {escape(message or name)}", highlight=False, soft_wrap=True
        )
        raise typer.Exit(1) from None


def fail(message: str) -> None:
    """Stop with a one-line error (for problems the CLI itself detects)."""
    error_console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)
