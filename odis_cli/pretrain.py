"""`odis pretrain`: object-level self-distillation of a ViT."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import itertools
import math
import os
import time
from functools import partial
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import TextColumn

from odis_cli.ui import cli_errors, console, error_console, make_progress
from odis_core.train.config import PretrainConfig


def run_training(
    events, description: str = "pretraining", log_every_s: float | None = None
) -> dict:
    """Draw a run's events (from `odis_core.train.loop.pretrain`); return its final report.
    Under torchrun only rank 0 draws; the other ranks consume the events silently. When
    stdout is not a terminal (a Slurm log, nohup, a pipe) a plain line is printed every
    `log_every_s` seconds (default 30, or ODIS_LOG_EVERY_S) instead of a progress bar.
    A RunStopped event (a stop signal) is reported here and re-raised as typer.Exit by
    the caller."""
    from odis_core.train import distributed
    from odis_core.train.loop import (
        CheckpointSaved,
        CollapseWarning,
        Notice,
        RunFinished,
        RunStarted,
        RunStopped,
        StepDone,
    )

    report: dict = {}
    main = _is_main_rank()
    # Everything before RunStarted (checks, checkpoint loading, the memory estimate) runs
    # before the bar is drawn: an error there is one line, never after a `0/?` bar.
    source, before_start = iter(events), []
    for event in source:
        before_start.append(event)
        if isinstance(event, RunStarted):
            break
    events = itertools.chain(before_start, source)
    plain = main and not console.is_terminal
    if log_every_s is None:
        log_every_s = float(os.environ.get("ODIS_LOG_EVERY_S", "30"))
    display = (
        make_progress(TextColumn("{task.fields[status]}"))
        if main and not plain
        else contextlib.nullcontext(None)
    )
    last_logged = -math.inf  # the first step is logged: the run is alive
    started_at, start_step = time.monotonic(), 0
    with display as progress:
        task = progress.add_task(description, total=None, status="") if progress else None
        # Plain lines are never wrapped: one event, one line in a log file.
        say = progress.console.print if progress else partial(console.print, soft_wrap=True)
        for event in events:
            if not main:
                if isinstance(event, RunFinished):
                    report = event.report
                continue
            if isinstance(event, RunStarted):
                if progress:
                    progress.update(task, total=event.total_steps, completed=event.start_step)
                started_at, start_step = time.monotonic(), event.start_step
                processes = distributed.world_size()
                say(
                    f"{event.n_images} images, {event.iters_per_epoch} steps/epoch, "
                    f"{event.total_steps} steps, device {event.device}"
                    + (f", {processes} processes (DDP)" if processes > 1 else "")
                    + (f", resuming at step {event.start_step}" if event.start_step else ""),
                    highlight=False,
                )
            elif isinstance(event, StepDone):
                m = event.metrics
                status = (
                    f"loss {m['loss']:.3f} (obj {m['loss_obj']:.3f} mim {m['loss_mim']:.3f})"
                    f"  lr {m['lr']:.2e}  {m['images_per_second']:.1f} img/s"
                    f"  data wait {100 * m['data_wait_share']:.0f}%"
                )
                if progress:
                    progress.update(task, completed=event.step, status=status)
                elif (
                    time.monotonic() - last_logged >= log_every_s
                    or event.step == event.total_steps
                ):
                    last_logged = time.monotonic()
                    line = _plain_progress_line(event, status, started_at, start_step)
                    say(line, highlight=False)
            elif isinstance(event, CollapseWarning):
                say(
                    f"[yellow]warning:[/yellow] step {event.step}: {escape(event.message)}",
                    highlight=False,
                )
            elif isinstance(event, Notice):
                say(f"note: {escape(event.message)}", highlight=False)
            elif isinstance(event, CheckpointSaved):
                if progress:
                    progress.update(task, status=f"checkpoint saved at step {event.step}")
            elif isinstance(event, RunStopped):
                report = {"stopped_at": event.step, "checkpoint": str(event.path)}
            elif isinstance(event, RunFinished):
                report = event.report
    if main and "stopped_at" in report:
        error_console.print(
            f"stopped at step {report['stopped_at']}; checkpoint {report['checkpoint']}; "
            "continue with --resume",
            highlight=False,
            soft_wrap=True,
        )
    return report


def _plain_progress_line(event, status: str, started_at: float, start_step: int) -> str:
    """One log line: step/total, losses, speed, ETA (from this invocation's steps/s)."""
    done_here = event.step - start_step
    elapsed = time.monotonic() - started_at
    eta = ""
    if done_here > 0:
        remaining = elapsed / done_here * (event.total_steps - event.step)
        eta = f"  eta {datetime.timedelta(seconds=round(remaining))}"
    return f"step {event.step}/{event.total_steps}  {status}{eta}"


def _is_main_rank() -> bool:
    # Before the process group exists (it is created inside the run), torchrun's RANK says.
    return os.environ.get("RANK", "0") == "0"


def _exit_now_line(signum: int) -> None:
    error_console.print("second signal: exiting now (the last checkpoint on disk is whole)")


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
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps.")] = None,
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
    tensorboard: Annotated[
        bool | None,
        typer.Option("--tensorboard/--no-tensorboard", help="Event files in RUN_DIR/tensorboard."),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            help="Continue RUN_DIR from its last checkpoint (from step 0 when it has none: "
            "one command line for the first start and every restart)."
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Replace the run already in RUN_DIR (it says what it replaces).")
    ] = False,
    memory_check: Annotated[
        bool,
        typer.Option(
            "--memory-check/--no-memory-check",
            help="Refuse a batch whose estimated step memory exceeds the memory available.",
            show_default=True,
        ),
    ] = True,
) -> None:
    """Pretrain a ViT with object-level self-distillation (--objective image: plain iBOT)."""
    from odis_cli.checks import check_device
    from odis_cli.guards import guard_run_dir
    from odis_core.masks.store import read_store
    from odis_core.train.config import load_config_file
    from odis_core.train.loop import pretrain as run_pretrain
    from odis_core.train.signals import StopSignals

    overrides = {
        name: value
        for name, value in dict(
            arch=arch,
            objective=objective,
            epochs=epochs,
            max_steps=max_steps,
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
            attention_impl=attention_impl,
            augment_on=augment_on,
            grad_checkpointing=grad_checkpointing,
            compile=compile,
            deterministic=deterministic,
            tensorboard=tensorboard,
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
        run_config.resolved()  # a bad setting stops here, before anything is replaced
        check_device(run_config.device)
        replacing = guard_run_dir(out, resume, overwrite, main_rank=_is_main_rank())
        if replacing and _is_main_rank():
            console.print(replacing, highlight=False, soft_wrap=True)
        # Names the user set (command line or --config): on resume, those the checkpoint
        # overrides are reported.
        given = set(overrides) | {
            f.name for f in dataclasses.fields(base) if getattr(base, f.name) != f.default
            and f.default is not dataclasses.MISSING
        }
        with StopSignals(on_second=_exit_now_line) as stop:
            report = run_training(
                run_pretrain(
                    run_config, images_root, store, out, resume=resume, given=given,
                    stop_requested=stop, memory_check=memory_check,
                )
            )
        if "stopped_at" in report:
            raise typer.Exit(stop.exit_code)
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
