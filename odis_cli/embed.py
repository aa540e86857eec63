"""`odis embed`: features of objects (masked inference) or images from a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from odis_cli.ui import cli_errors, console, progress_callback


def embed(
    checkpoint: Annotated[Path, typer.Option(help="Run directory or checkpoint file.")],
    images: Annotated[Path, typer.Option(help="Image folder.")],
    out: Annotated[Path, typer.Option(help="Feature directory to write.")],
    masks: Annotated[
        Path | None, typer.Option(help="Mask store (needed at object level).")
    ] = None,
    level: Annotated[str, typer.Option(help="object or image.")] = "object",
    mode: Annotated[
        str, typer.Option(help="Object inference: masked, crop, blackout or meanpool.")
    ] = "masked",
    image_size: Annotated[
        int | None, typer.Option(help="Input size (default: the run's global crop size).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward batch.")] = 32,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    workers: Annotated[int, typer.Option(help="Data-loading processes.")] = 0,
    half: Annotated[bool, typer.Option(help="Store features as float16.")] = False,
    random_init: Annotated[
        bool, typer.Option(help="Baseline: the run's architecture at its initial weights.")
    ] = False,
) -> None:
    """Write features.npy, labels.npy and meta.jsonl for every object (or image)."""
    from odis_core.embed.features import write_features
    from odis_core.embed.inference import build_backbone, load_teacher_backbone
    from odis_core.embed.inference import embed as run_embed
    from odis_core.masks.store import read_store
    from odis_core.train.loop import resolve_device

    with cli_errors():
        backbone, config = load_teacher_backbone(checkpoint)
        if random_init:
            backbone = build_backbone(config)
        store = read_store(masks) if masks is not None else None
        with progress_callback(f"embedding ({level}, {mode})") as progress:
            result = run_embed(
                backbone, images, store, level=level, mode=mode,
                image_size=image_size or config.global_size, batch_size=batch_size,
                device=resolve_device(device), workers=workers, progress=progress,
            )
        features = result.features.astype("float16") if half else result.features
        info = {
            "backbone": config.arch, "checkpoint": str(checkpoint), "level": level,
            "mode": mode if level == "object" else "cls", "random_init": random_init,
            "dim": int(result.features.shape[1]), "skipped": result.skipped,
        }
        write_features(out, features, result.labels, result.meta, info)
    console.print(
        f"{len(result.labels)} features ({level}, {info['mode']}) -> {out}; "
        f"{len(result.skipped)} unreadable images skipped", highlight=False,
    )
    for line in result.skipped[:20]:
        console.print(f"[yellow]skipped[/yellow] {line}", highlight=False)
