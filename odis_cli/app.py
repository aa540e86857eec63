"""The `odis` Typer application: one sub-command per module, each thin."""

from __future__ import annotations

from typing import Annotated

import typer

from odis_cli import data, demo, embed, export, knn, masks, pretrain
from odis_cli.ui import OdisGroup, Settings

app = typer.Typer(
    name="odis",
    cls=OdisGroup,
    help="Object-level self-distillation (ODIS) pretraining of Vision Transformers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        from odis_core import __version__

        typer.echo(f"odis {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option(help="Show tracebacks instead of one-line errors.")]
    = False,
    version: Annotated[bool | None, typer.Option("--version", callback=_version,
                                                 is_eager=True, help="Print the version.")]
    = None,
) -> None:
    Settings.debug = debug


app.add_typer(masks.app, name="masks", cls=OdisGroup)
app.command("pretrain")(pretrain.pretrain)
app.command("export")(export.export)
app.command("embed")(embed.embed)
app.command("knn")(knn.knn)
app.command("demo")(demo.demo)
app.add_typer(data.app, name="data", cls=OdisGroup)


def main() -> None:
    app()
