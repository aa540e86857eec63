"""`odis data scenes fashion-mnist`: build multi-object scene datasets from real images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from odis_cli.ui import cli_errors, console, progress_callback

app = typer.Typer(help="Build datasets to pretrain and evaluate on.", no_args_is_help=True)
scenes_app = typer.Typer(
    help="Multi-object scenes (image folder + COCO instances JSON per split).",
    no_args_is_help=True,
)
app.add_typer(scenes_app, name="scenes")


def _default(name: str) -> str:
    from odis_core.scenes.fashion_mnist import FashionSceneConfig

    value = getattr(FashionSceneConfig(), name)
    shown = " ".join(str(v) for v in value) if isinstance(value, tuple) else value
    return str(shown)


@scenes_app.command("fashion-mnist")
def fashion_mnist(
    out: Annotated[Path, typer.Option(help="Directory to write train/ and test/ into.")],
    source: Annotated[
        Path, typer.Option(help="Folder of the Fashion-MNIST IDX files (gzipped or not).")
    ] = Path("/usr/share/datasets/fashion-mnist"),
    train: Annotated[int, typer.Option(help="Train scenes (from train items only).")] = 5000,
    test: Annotated[int, typer.Option(help="Test scenes (from test items only).")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed; the same seed gives the same files.")] = 0,
    canvas_size: Annotated[
        int | None,
        typer.Option(help="Scene side in px.", show_default=_default("canvas_size")),
    ] = None,
    min_objects: Annotated[
        int | None,
        typer.Option(help="Fewest items per scene.", show_default=_default("min_objects")),
    ] = None,
    max_objects: Annotated[
        int | None,
        typer.Option(help="Most items per scene.", show_default=_default("max_objects")),
    ] = None,
    object_scale: Annotated[
        tuple[float, float] | None,
        typer.Option(help="Item side / scene side, low high.",
                     show_default=_default("object_scale")),
    ] = None,
    background: Annotated[
        str | None,
        typer.Option(help="texture, plain or black.", show_default=_default("background")),
    ] = None,
    tint: Annotated[
        float | None,
        typer.Option(help="Saturation of each item's random colour, 0 = grey.",
                     show_default=_default("tint")),
    ] = None,
    occlusion_limit: Annotated[
        float | None,
        typer.Option(
            help="Most of an item's silhouette later items may cover.",
            show_default=_default("occlusion_limit"),
        ),
    ] = None,
) -> None:
    """Scenes of 2-4 Fashion-MNIST items each; masks are the items' visible silhouettes.

    Train scenes use only the train split's items, test scenes only the test split's."""
    from odis_core.scenes.fashion_mnist import FashionSceneConfig, generate_fashion_scenes

    options = dict(
        canvas_size=canvas_size,
        min_objects=min_objects,
        max_objects=max_objects,
        object_scale=object_scale,
        background=background,
        tint=tint,
        occlusion_limit=occlusion_limit,
    )
    with cli_errors():
        config = FashionSceneConfig(**{k: v for k, v in options.items() if v is not None})
        with progress_callback("composing scenes") as progress:
            splits = generate_fashion_scenes(
                source, out, train, test, seed=seed, config=config, progress=progress
            )
    table = Table(title=f"Fashion-MNIST scenes in {out}")
    for column in ("split", "images", "objects", "annotations"):
        table.add_column(column, justify="left" if column in ("split", "annotations") else "right")
    for name, split in splits.items():
        table.add_row(name, str(split.n_images), str(split.n_objects), str(split.annotations))
    console.print(table)
