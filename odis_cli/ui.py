"""What every command shares: the console, progress bars, one-line errors."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import typer
import typer.core
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

# How --help shows the default of every --workers option (odis_core/cpus.py).
WORKERS_SHOWN = "min(8, CPUs)"

console = Console()
error_console = Console(stderr=True)


class Settings:
    debug = False


def _set_debug(ctx: Any, param: Any, value: bool) -> None:
    if value:
        Settings.debug = True


def _hide_flag_placeholder(params: list[Any]) -> None:
    # typer renders `<bool>` as the value of a boolean flag, which takes no value.
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""


def conform(command: Any, ctx: Any) -> Any:
    """One convention for every command, including options added later: boolean flags show
    no value placeholder, and `--debug` (the root option) also works after the subcommand."""
    if isinstance(command, typer.core.TyperGroup) and not isinstance(command, OdisGroup):
        command.__class__ = OdisGroup  # a nested group (`data scenes`): same rules below it
    if not isinstance(command, typer.core.TyperGroup) and not any(
        "--debug" in param.opts for param in command.params
    ):
        root_debug = next(p for p in ctx.find_root().command.params if p.name == "debug")
        debug = copy.copy(root_debug)  # same flag and help; sets Settings, passes nothing on
        debug.expose_value, debug.is_eager, debug.callback = False, True, _set_debug
        command.params.append(debug)
    _hide_flag_placeholder(command.get_params(ctx))  # the help option included
    return command


class OdisGroup(typer.core.TyperGroup):
    """The group class of `odis` and its sub-groups: every command it hands out (to run or
    for --help) follows `conform`."""

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        return conform(command, ctx) if command is not None else None

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        _hide_flag_placeholder(params)
        return params


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
