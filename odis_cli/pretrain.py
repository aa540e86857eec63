"""`odis pretrain`: object-level self-distillation of a ViT."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import TextColumn

from odis_cli.ui import cli_errors, console, make_progress
from odis_core.train.config import PretrainConfig


def run_training(events, description: str = "pretraining") -> dict:
    """Draw a run's events (from `odis_core.train.loop.pretrain`); return its final report.
    Under torchrun only rank 0 draws; the other ranks consume the events silently."""
    from odis_core.train import distributed
    from odis_core.train.loop import (
        CheckpointSaved,
        CollapseWarning,
        Evaluated,
        RunFinished,
        RunStarted,
        ScheduleWarning,
        StepDone,
    )

    report: dict = {}
    last_knn = ""  # the latest k-NN evaluation, kept on the progress line
    display = (
        make_progress(TextColumn("{task.fields[status]}"))
        if _is_main_rank()
        else contextlib.nullcontext(None)
    )
    with display as progress:
        task = progress.add_task(description, total=None, status="") if progress else None
        for event in events:
            if progress is None:
                if isinstance(event, RunFinished):
                    report = event.report
                continue
            if isinstance(event, RunStarted):
                progress.update(task, total=event.total_steps, completed=event.start_step)
                processes = distributed.world_size()
                console.print(
                    f"{event.n_images} images, {event.iters_per_epoch} steps/epoch, "
                    f"{event.total_steps} steps, device {event.device} ({event.config.precision})"
                    + (f", {processes} processes (DDP)" if processes > 1 else "")
                    + (f", resuming at step {event.start_step}" if event.start_step else ""),
                    highlight=False,
                )
            elif isinstance(event, StepDone):
                m = event.metrics
                status = (
                    f"loss {m['loss']:.3f} (obj {m['loss_obj']:.3f} mim {m['loss_mim']:.3f})"
                    f"  lr {m['lr']:.2e}  {m['images_per_second']:.1f} img/s"
                    f"  data wait {100 * m['data_wait_share']:.0f}%{last_knn}"
                )
                progress.update(task, completed=event.step, status=status)
            elif isinstance(event, ScheduleWarning):
                progress.console.print(
                    f"[yellow]warning:[/yellow] {escape(event.message)}", highlight=False
                )
            elif isinstance(event, CollapseWarning):
                progress.console.print(
                    f"[yellow]warning:[/yellow] step {event.step}: {escape(event.message)}",
                    highlight=False,
                )
            elif isinstance(event, Evaluated):
                last_knn = f"  k-NN {event.knn_top1:.1f}%"
                progress.console.print(
                    f"step {event.step}: k-NN top-1 {event.knn_top1:.1f}%, top-5 "
                    f"{event.knn_top5:.1f}%, effective rank {event.effective_rank:.1f} "
                    f"({event.seconds:.1f} s)",
                    highlight=False,
                )
            elif isinstance(event, CheckpointSaved):
                progress.update(task, status=f"checkpoint saved at step {event.step}")
            elif isinstance(event, RunFinished):
                report = event.report
    return report


def _is_main_rank() -> bool:
    # Before the process group exists (it is created inside the run), torchrun's RANK says.
    return os.environ.get("RANK", "0") == "0"


_DEFAULTS = PretrainConfig()


def _default(name: str) -> str:
    # Options default to None so a --config file can set them; show the real default here.
    return f" (default {getattr(_DEFAULTS, name)})"


def pretrain(
    masks: Annotated[Path, typer.Option(help="Mask store (from `odis masks`).")],
    out: Annotated[Path, typer.Option(help="Run directory: checkpoint, config, metrics.")],
    images: Annotated[
        Path | None, typer.Option(help="Image folder (default: the store's image folder).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="JSON file of options; command-line options win.")
    ] = None,
    arch: Annotated[
        str | None,
        typer.Option(
            help=f"vit_tiny, vit_small, vit_base, vit_large or a timm vit_* name{_default('arch')}."
        ),
    ] = None,
    objective: Annotated[
        str | None, typer.Option(help=f"odis, or image (plain iBOT){_default('objective')}.")
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help=f"Epochs; schedules span them{_default('epochs')}.")
    ] = None,
    max_steps: Annotated[
        int | None,
        typer.Option(help="Stop after this many steps (the schedules keep their length: see "
                     "--steps)."),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(
            help="Schedule length in steps: warm-ups, cosines and the last-layer freeze laid "
            "proportionally over S steps, and the run trains S steps.",
            show_default="epochs x steps per epoch",
        ),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help=f"Images per step per process{_default('batch_size')}.")
    ] = None,
    lr: Annotated[
        float | None, typer.Option(help=f"Base LR for a batch of 256{_default('lr')}.")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help=f"Seed of weights, crops and data order{_default('seed')}.")
    ] = None,
    device: Annotated[
        str | None, typer.Option(help=f"auto, cpu or cuda{_default('device')}.")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help=f"Data-loading processes{_default('workers')}.")
    ] = None,
    save_every: Annotated[
        int | None, typer.Option(help="Also checkpoint every N steps (always at epoch ends).")
    ] = None,
    patch_size: Annotated[
        int | None, typer.Option(help=f"ViT patch size{_default('patch_size')}.")
    ] = None,
    global_size: Annotated[
        int | None, typer.Option(help=f"Global crop size in px{_default('global_size')}.")
    ] = None,
    local_size: Annotated[
        int | None, typer.Option(help=f"Local crop size in px{_default('local_size')}.")
    ] = None,
    n_local_crops: Annotated[
        int | None, typer.Option(help=f"Local crops per image{_default('n_local_crops')}.")
    ] = None,
    out_dim: Annotated[
        int | None, typer.Option(help=f"Head output dimension{_default('out_dim')}.")
    ] = None,
    masked_attention: Annotated[
        bool | None,
        typer.Option(
            "--masked-attention/--no-masked-attention", help="Ablation: unmasked [OBJ] attention."
        ),
    ] = None,
    object_crops: Annotated[
        bool | None,
        typer.Option("--object-crops/--no-object-crops", help="Ablation: plain random crops."),
    ] = None,
    feature: Annotated[
        str | None, typer.Option(help="obj, or meanpool (ablation: mean of object patches).")
    ] = None,
    obj_readout: Annotated[
        bool | None,
        typer.Option(
            "--obj-readout/--no-obj-readout",
            help="Read-out [OBJ]: no token attends to the [OBJ] key (one-pass object "
            "embedding; not the paper's model).",
            show_default="no-obj-readout",
        ),
    ] = None,
    attention_impl: Annotated[
        str | None,
        typer.Option(
            help="split (unmasked flash attention + the masked [OBJ] row apart), dense (one "
            f"SDPA with a full mask) or auto (split on GPU){_default('attention_impl')}."
        ),
    ] = None,
    augment_on: Annotated[
        str | None,
        typer.Option(
            help="Where views are resized and colour-augmented: loader (PIL in the workers), "
            f"device (batched on the GPU; workers only decode and draw crops) or auto (device "
            f"on CUDA){_default('augment_on')}."
        ),
    ] = None,
    grad_checkpointing: Annotated[
        bool | None,
        typer.Option(
            "--grad-checkpointing/--no-grad-checkpointing",
            help="Recompute block activations in backward (less memory, ~1 more forward).",
        ),
    ] = None,
    compile: Annotated[
        bool | None,
        typer.Option("--compile/--no-compile", help="torch.compile the student and teacher."),
    ] = None,
    deterministic: Annotated[
        bool | None,
        typer.Option(
            "--deterministic/--no-deterministic",
            help="torch.use_deterministic_algorithms (bitwise-repeatable GPU runs, slower).",
        ),
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(
            help="Autocast: bf16, fp32 or auto (bf16 on CUDA and on CPUs with AMX / AVX-512 "
            "BF16, fp32 otherwise; kept on resume).",
            show_default=_DEFAULTS.precision,
        ),
    ] = None,
    tensorboard: Annotated[
        bool | None,
        typer.Option("--tensorboard/--no-tensorboard", help="Event files in RUN_DIR/tensorboard."),
    ] = None,
    eval_masks: Annotated[
        Path | None,
        typer.Option(help="Online k-NN monitor: mask store of held-out labelled objects, split "
                     "by image into bank and queries; the teacher is evaluated at the first "
                     "step, every --eval-every steps and the last."),
    ] = None,
    eval_images: Annotated[
        Path | None,
        typer.Option(help="Image folder of --eval-masks.", show_default="the store's folder"),
    ] = None,
    eval_every: Annotated[
        int | None,
        typer.Option(help="Steps between k-NN evaluations.", show_default="first and last step"),
    ] = None,
    eval_max_objects: Annotated[
        int | None,
        typer.Option(help="Objects of the k-NN bank and queries together (bounds the cost).",
                     show_default=str(_DEFAULTS.eval_max_objects)),
    ] = None,
    eval_k: Annotated[
        int | None,
        typer.Option(help="Neighbours of the monitor's k-NN vote.",
                     show_default=str(_DEFAULTS.eval_k)),
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue RUN_DIR from its last checkpoint.")
    ] = False,
) -> None:
    """Pretrain a ViT with object-level self-distillation (--objective image: plain iBOT)."""
    from odis_core.masks.store import read_store
    from odis_core.train.config import load_config_file
    from odis_core.train.loop import pretrain as run_pretrain

    overrides = {
        name: value
        for name, value in dict(
            arch=arch,
            objective=objective,
            epochs=epochs,
            max_steps=max_steps,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            device=device,
            workers=workers,
            save_every=save_every,
            patch_size=patch_size,
            global_size=global_size,
            local_size=local_size,
            n_local_crops=n_local_crops,
            out_dim=out_dim,
            masked_attention=masked_attention,
            object_crops=object_crops,
            feature=feature,
            obj_readout=obj_readout,
            attention_impl=attention_impl,
            augment_on=augment_on,
            grad_checkpointing=grad_checkpointing,
            compile=compile,
            deterministic=deterministic,
            precision=precision,
            tensorboard=tensorboard,
            eval_masks=str(eval_masks) if eval_masks is not None else None,
            eval_images=str(eval_images) if eval_images is not None else None,
            eval_every=eval_every,
            eval_max_objects=eval_max_objects,
            eval_k=eval_k,
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
    if not _is_main_rank():
        return
    console.print(
        f"done: {report.get('steps')} steps, {report.get('images_per_second')} img/s, "
        f"{report.get('images_skipped')} unreadable images skipped, "
        f"{report.get('whole_image_fallbacks')} whole-image fallbacks, "
        f"data wait {100 * (report.get('data_wait_share') or 0):.1f}% of the time; "
        f"run directory {out}",
        highlight=False,
    )
    if report.get("curve"):
        first, last = report["curve"][0], report["curve"][-1]
        console.print(
            f"k-NN top-1 {first[1]:.1f}% (step {first[0]}) -> {last[1]:.1f}% (step {last[0]}), "
            f"{report['eval']['seconds_per_evaluation']} s per evaluation; {out / 'curve.png'}",
            highlight=False,
        )
