"""`odis export`: a run's teacher backbone as safetensors with timm key names."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from odis_cli.ui import cli_errors, console


def export(
    checkpoint: Annotated[Path, typer.Argument(help="Run directory or checkpoint file.")],
    out: Annotated[Path, typer.Option(help="File to write (.safetensors).")],
) -> None:
    """Write the teacher backbone as safetensors that timm.create_model loads strictly."""
    from odis_core.export import export_teacher

    with cli_errors():
        written = export_teacher(checkpoint, out)
    kwargs = ", ".join(f"{key}={value!r}" for key, value in written["timm_kwargs"].items())
    console.print(
        f"{written['tensors']} tensors -> {out}\n"
        f"load with: timm.create_model({written['arch']!r}, pretrained=True, "
        f"pretrained_cfg_overlay=dict(file={str(out)!r}), {kwargs})",
        highlight=False,
        soft_wrap=True,
    )
