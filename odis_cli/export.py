"""`odis export`: a run's teacher backbone for timm, with its shape and preprocessing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from odis_cli.ui import cli_errors, console


def export(
    checkpoint: Annotated[Path, typer.Argument(help="Run directory or checkpoint file.")],
    out: Annotated[
        Path,
        typer.Option(
            help="Folder to write (model.safetensors + config.json), or a .safetensors file "
            "(config.json is written beside it)."
        ),
    ],
) -> None:
    """Write the teacher backbone in the layout of timm's hub checkpoints:
    timm.create_model("local-dir:DIR", pretrained=True) rebuilds and loads it strictly."""
    from odis_core.export import export_teacher

    with cli_errors():
        written = export_teacher(checkpoint, out)
    hub = written["hub_config"]
    shape = ", ".join(f"{key}={value}" for key, value in hub["model_args"].items())
    data = hub["pretrained_cfg"]
    console.print(
        f"{written['tensors']} tensors -> {written['weights']} (+ {written['config'].name})\n"
        f"{hub['architecture']}: {shape}\n"
        f"input {data['input_size'][1]} px, {data['interpolation']} {data['crop_mode']} "
        f"resize, ImageNet mean/std\n"
        f"load with: timm.create_model(\"local-dir:{written['weights'].parent}\", "
        "pretrained=True)",
        highlight=False,
        soft_wrap=True,
    )
