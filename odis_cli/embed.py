"""`odis embed`: features of objects (masked inference) or images from a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import TextColumn

from odis_cli.ui import WORKERS_SHOWN, cli_errors, console, make_progress
from odis_core.cpus import default_workers

DTYPES = ("float32", "float16")


def embed(
    checkpoint: Annotated[
        Path, typer.Option(help="odis run directory or checkpoint, an odis export, or any "
                           "timm ViT state dict (.pth/.safetensors, with --arch).")
    ],
    images: Annotated[Path, typer.Option(help="Image folder.")],
    out: Annotated[Path, typer.Option(help="Feature directory to write.")],
    masks: Annotated[
        Path | None,
        typer.Option(help="Mask store (needed at object level).", show_default="none")
    ] = None,
    level: Annotated[str, typer.Option(help="object or image.")] = "object",
    mode: Annotated[
        str, typer.Option(help="Object inference: masked, crop, blackout or meanpool.")
    ] = "masked",
    arch: Annotated[
        str | None, typer.Option(help="timm architecture of a foreign checkpoint "
                                 "(e.g. vit_base_patch16_224).",
                                 show_default="the checkpoint's own")
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(help="Input size in px.", show_default="the checkpoint's native size")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward batch.")] = 32,
    shard_size: Annotated[
        int, typer.Option(help="Images per shard: the unit written atomically and resumed.")
    ] = 1000,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    workers: Annotated[
        int, typer.Option(help="Data-loading processes.", show_default=WORKERS_SHOWN)
    ] = default_workers(),
    decode_on: Annotated[
        str, typer.Option(help="Where whole-image inputs of plain JPEGs are decoded and "
                          "resized: loader (PIL), device (the GPU), or auto (device on CUDA).")
    ] = "auto",
    dtype: Annotated[str, typer.Option(help="Stored features: float32 or float16.")] = "float32",
    precision: Annotated[
        str, typer.Option(help="Autocast: bf16, fp32 or auto (bf16 on CUDA and on CPUs with "
                          "AMX / AVX-512 BF16, fp32 otherwise).", show_default=True)
    ] = "auto",
    half: Annotated[bool, typer.Option(help="Same as --dtype float16.")] = False,
    random_init: Annotated[
        bool, typer.Option(help="Baseline: the run's architecture at its initial weights.")
    ] = False,
    one_pass: Annotated[
        bool | None,
        typer.Option(
            "--one-pass/--no-one-pass",
            help="Masked objects of an image in one forward (read-out models only; same "
            "features, one pass per image instead of one per object).",
            show_default="one-pass for --obj-readout runs",
        ),
    ] = None,
    viz: Annotated[
        int, typer.Option(help="Also draw [OBJ] attention and patch-PCA PNGs of this many "
                          "images into OUT/viz.")
    ] = 0,
    overwrite: Annotated[
        bool, typer.Option(help="Replace a feature directory at --out of other settings.")
    ] = False,
) -> None:
    """Write features.npy, labels.npy and meta.jsonl for every object (or image).

    Resumable: a re-run with the same settings skips finished shards. Several GPUs:
    `torchrun --nproc-per-node N -m odis_cli embed ...` (each rank writes its shards).
    """
    from odis_cli.checks import check_at_least, check_device, check_folder
    from odis_cli.guards import guard_feature_dir
    from odis_core.embed.backbones import load_backbone, weights_fingerprint
    from odis_core.embed.inference import (
        build_backbone,
        list_records,
        resolve_decode_on,
        resolve_one_pass,
    )
    from odis_core.embed.shards import (
        EmbedFinished,
        EmbedSettings,
        close_distributed,
        distributed_rank,
        embed_to_directory,
        init_distributed,
        rank_device,
        rank_image_count,
        records_fingerprint,
    )
    from odis_core.masks.store import read_store
    from odis_core.precision import resolve_precision
    from odis_core.train.loop import resolve_device

    with cli_errors():
        dtype = "float16" if half else dtype
        if dtype not in DTYPES:
            raise ValueError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        if shard_size < 1:
            raise ValueError(f"--shard-size {shard_size}: must be >= 1")
        check_at_least("--batch-size", batch_size, 1)
        check_at_least("--workers", workers, 0)
        check_at_least("--image-size", image_size, 1)
        check_at_least("--viz", viz, 0)
        check_device(device)
        check_folder("--images", images)
        loaded = load_backbone(checkpoint, arch=arch)
        backbone, weights = loaded.backbone, loaded.weights
        if random_init:
            if loaded.config is None:
                raise ValueError("--random-init needs an odis run (its config and seed)")
            backbone = build_backbone(loaded.config)
            weights = weights_fingerprint(backbone.vit)
        one_pass = resolve_one_pass(one_pass, backbone)
        store = read_store(masks) if masks is not None else None
        records = list_records(images, store, level, mode)
        rank, world_size, local_rank = distributed_rank()
        device = rank_device(resolve_device(device), local_rank)
        barrier = init_distributed(device)
        size = image_size or loaded.image_size
        precision = resolve_precision(precision, device)
        settings = EmbedSettings(level, mode if level == "object" else "cls", size, shard_size,
                                 dtype, weights, len(records), records_fingerprint(records),
                                 resolve_decode_on(decode_on, device))
        replacing = guard_feature_dir(out, settings.as_dict(), overwrite, main_rank=rank == 0)
        if replacing and rank == 0:
            console.print(replacing, highlight=False, soft_wrap=True)
        info = {"backbone": loaded.name, "checkpoint": str(checkpoint), "level": level,
                "mode": settings.mode, "random_init": random_init, "weights": weights,
                "source": loaded.source, "precision": precision, "one_pass": one_pass}
        finished = None
        try:
            with make_progress(TextColumn("images")) as progress:
                # Rank 0 draws its own shards' images: one in `world_size` of all of them.
                total = rank_image_count(len(records), shard_size, rank, world_size)
                task = progress.add_task(f"embedding ({level}, {settings.mode})", total=total)
                events = embed_to_directory(
                    backbone, images, records, store, out, settings, info,
                    batch_size=batch_size, device=device, workers=workers, rank=rank,
                    world_size=world_size, barrier=barrier, precision=precision,
                    one_pass=one_pass,
                    progress=lambda done: progress.update(task, completed=done),
                )
                for event in events:
                    if isinstance(event, EmbedFinished):
                        finished = event
        finally:
            close_distributed()
        if finished is not None and viz > 0:
            from odis_core.embed.viz import write_viz

            write_viz(backbone, images, records[:viz], store, out / "viz", size, device)
    if finished is None:
        return  # ranks other than 0: rank 0 reports
    note = " (already complete)" if finished.already_complete else ""
    console.print(
        f"{finished.n_features} features ({level}, {settings.mode}, {dtype}) -> {out}{note}; "
        f"{len(finished.skipped)} unreadable images skipped", highlight=False,
    )
    for line in finished.skipped[:20]:
        console.print(f"[yellow]skipped[/yellow] {line}", highlight=False)
    if viz > 0:
        console.print(f"attention / PCA pictures -> {out / 'viz'}", highlight=False)
