"""`odis pretrain`: object-level self-distillation of a ViT."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import TextColumn

from odis_cli.ui import cli_errors, console, make_progress


def run_training(events, description: str = "pretraining") -> dict:
    """Draw a run's events (from `odis_core.train.loop.pretrain`); return its final report."""
    from odis_core.train.loop import CheckpointSaved, RunFinished, RunStarted, StepDone

    report: dict = {}
    with make_progress(TextColumn("{task.fields[status]}")) as progress:
        task = progress.add_task(description, total=None, status="")
        started, images_seen, batch = time.perf_counter(), 0, 0
        for event in events:
            if isinstance(event, RunStarted):
                batch = event.config.batch_size
                progress.update(task, total=event.total_steps, completed=event.start_step)
                console.print(
                    f"{event.n_images} images, {event.iters_per_epoch} steps/epoch, "
                    f"{event.total_steps} steps, device {event.device}"
                    + (f", resuming at step {event.start_step}" if event.start_step else ""),
                    highlight=False,
                )
            elif isinstance(event, StepDone):
                images_seen += batch
                rate = images_seen / max(time.perf_counter() - started, 1e-9)
                m = event.metrics
                status = (f"loss {m['loss']:.3f} (obj {m['loss_obj']:.3f} mim {m['loss_mim']:.3f})"
                          f"  lr {m['lr']:.2e}  {rate:.1f} img/s")
                progress.update(task, completed=event.step, status=status)
            elif isinstance(event, CheckpointSaved):
                progress.update(task, status=f"checkpoint saved at step {event.step}")
            elif isinstance(event, RunFinished):
                report = event.report
    return report


def pretrain(
    masks: Annotated[Path, typer.Option(help="Mask store (from `odis masks`).")],
    out: Annotated[Path, typer.Option(help="Run directory: checkpoint, config, metrics.")],
    images: Annotated[
        Path | None, typer.Option(help="Image folder (default: the store's image folder).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="JSON file of options; command-line options win.")
    ] = None,
    arch: Annotated[str | None, typer.Option(help="vit_tiny, vit_small, vit_base, vit_large "
                                                  "or a timm vit_* name.")] = None,
    objective: Annotated[str | None, typer.Option(help="odis, or image (plain iBOT).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (schedules span them).")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per step per process.")] = None,
    lr: Annotated[float | None, typer.Option(help="Base LR for a batch of 256.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of weights, crops and data order.")]
    = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    workers: Annotated[int | None, typer.Option(help="Data-loading processes.")] = None,
    save_every: Annotated[int | None, typer.Option(help="Checkpoint every N steps.")] = None,
    patch_size: Annotated[int | None, typer.Option(help="ViT patch size.")] = None,
    global_size: Annotated[int | None, typer.Option(help="Global crop size (px).")] = None,
    local_size: Annotated[int | None, typer.Option(help="Local crop size (px).")] = None,
    n_local_crops: Annotated[int | None, typer.Option(help="Local crops per image.")] = None,
    out_dim: Annotated[int | None, typer.Option(help="Head output dimension.")] = None,
    masked_attention: Annotated[
        bool | None, typer.Option("--masked-attention/--no-masked-attention",
                                  help="Ablation: unmasked [OBJ] attention.")
    ] = None,
    object_crops: Annotated[
        bool | None, typer.Option("--object-crops/--no-object-crops",
                                  help="Ablation: plain random crops.")
    ] = None,
    feature: Annotated[
        str | None, typer.Option(help="obj, or meanpool (ablation: mean of object patches).")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue RUN_DIR from its last checkpoint.")]
    = False,
) -> None:
    """Pretrain a ViT with object-level self-distillation (or plain iBOT with
    --objective image)."""
    from odis_core.masks.store import read_store
    from odis_core.train.config import PretrainConfig, load_config_file
    from odis_core.train.loop import pretrain as run_pretrain

    overrides = {
        name: value
        for name, value in dict(
            arch=arch, objective=objective, epochs=epochs, max_steps=max_steps,
            batch_size=batch_size, lr=lr, seed=seed, device=device, workers=workers,
            save_every=save_every, patch_size=patch_size, global_size=global_size,
            local_size=local_size, n_local_crops=n_local_crops, out_dim=out_dim,
            masked_attention=masked_attention, object_crops=object_crops, feature=feature,
        ).items()
        if value is not None
    }
    with cli_errors():
        base = load_config_file(config) if config is not None else PretrainConfig()
        run_config = dataclasses.replace(base, **overrides)
        store = read_store(masks)
        images_root = images or (Path(store.images_root) if store.images_root else None)
        if images_root is None:
            raise ValueError(f"{masks}: the store records no image folder; pass --images")
        report = run_training(run_pretrain(run_config, images_root, store, out, resume=resume))
    console.print(
        f"done: {report.get('steps')} steps, {report.get('images_per_second')} img/s, "
        f"{report.get('images_skipped')} unreadable images skipped, "
        f"{report.get('whole_image_fallbacks')} whole-image fallbacks; run directory {out}",
        highlight=False,
    )
