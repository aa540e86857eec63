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

from odis_cli.ui import WORKERS_SHOWN, cli_errors, console, error_console, make_progress
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
        Evaluated,
        Notice,
        RunFinished,
        RunStarted,
        RunStopped,
        ScheduleWarning,
        StepDone,
    )

    report: dict = {}
    last_knn = ""  # the latest k-NN evaluation, kept on the progress line
    show_pairs = False  # several objects per image: the step's [OBJ] pairs on the line
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
                show_pairs = event.config.objects_per_image != 1
                processes = distributed.world_size()
                say(
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
                    + (f"  {m['object_pairs']:.0f} obj pairs" if show_pairs else "")
                    + f"  lr {m['lr']:.2e}  {m['images_per_second']:.1f} img/s"
                    f"  data wait {100 * m['data_wait_share']:.0f}%{last_knn}"
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
            elif isinstance(event, ScheduleWarning):
                say(f"[yellow]warning:[/yellow] {escape(event.message)}", highlight=False)
            elif isinstance(event, CollapseWarning):
                say(
                    f"[yellow]warning:[/yellow] step {event.step}: {escape(event.message)}",
                    highlight=False,
                )
            elif isinstance(event, Evaluated):
                last_knn = f"  k-NN {event.knn_top1:.1f}%"
                say(
                    f"step {event.step}: k-NN top-1 {event.knn_top1:.1f}%, top-5 "
                    f"{event.knn_top5:.1f}%, effective rank {event.effective_rank:.1f} "
                    f"({event.seconds:.1f} s)",
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


def print_config(config: PretrainConfig, source: str | None) -> None:
    """Every key of the resolved configuration: value, default and meaning (non-default
    values highlighted)."""
    from rich.table import Table

    from odis_core.train.recipes import config_rows, resolve_config

    origin = f"--config {source} ({resolve_config(source)})" if source else "defaults"
    table = Table(title=f"odis pretrain: resolved options from {origin} and the command line",
                  title_justify="left")
    for column in ("key", "value", "default", "meaning"):
        table.add_column(column, overflow="fold")
    for key, value, default, meaning in config_rows(config):
        style = "bold yellow" if value != default else ""
        table.add_row(key, escape(repr(value)), escape(repr(default)), escape(meaning),
                      style=style)
    console.print(table)


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
    """PretrainConfig's default of `name` as --help shows it. Options default to None so
    that a --config file can set them; show_default shows the value they stand for."""
    value = getattr(_DEFAULTS, name)
    if name == "workers":
        return WORKERS_SHOWN
    if isinstance(value, bool):
        flag = name.replace("_", "-")
        return flag if value else f"no-{flag}"
    if isinstance(value, tuple):
        return " ".join(str(item) for item in value)
    return str(value)


def _option(name: str, help: str, **kwargs) -> typer.models.OptionInfo:
    return typer.Option(help=help, show_default=_default(name), **kwargs)


def _flag(name: str, help: str) -> typer.models.OptionInfo:
    flag = name.replace("_", "-")
    return typer.Option(f"--{flag}/--no-{flag}", help=help, show_default=_default(name))


def pretrain(
    masks: Annotated[
        Path | None,
        typer.Option(help="Mask store (from `odis masks`).",
                     show_default="required, except with --show-config"),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Run directory: checkpoint, config, metrics.",
                     show_default="required, except with --show-config"),
    ] = None,
    images: Annotated[
        Path | None, typer.Option(help="Image folder.", show_default="the store's image folder")
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(
            help="JSON file of options, or the name of a recipe in configs/ (cpu-demo, "
            "vit_small-ibot, vit_base-ibot, vit_large-ibot, ...); command-line options win.",
            show_default="PretrainConfig's defaults",
        ),
    ] = None,
    show_config: Annotated[
        bool,
        typer.Option(help="Print every resolved option with its default and meaning; "
                     "train nothing."),
    ] = False,
    arch: Annotated[
        str | None,
        _option("arch", "vit_tiny, vit_small, vit_base, vit_large or a timm vit_* name."),
    ] = None,
    depth: Annotated[
        int | None, typer.Option(help="Transformer blocks.", show_default="the architecture's")
    ] = None,
    objective: Annotated[str | None, _option("objective", "odis, or image (plain iBOT).")] = None,
    epochs: Annotated[int | None, _option("epochs", "Epochs; schedules span them.")] = None,
    max_steps: Annotated[
        int | None,
        typer.Option(help="Stop after this many steps (the schedules keep their length: see "
                     "--steps).", show_default="all epochs"),
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
        int | None, _option("batch_size", "Images per step per process.")
    ] = None,
    lr: Annotated[float | None, _option("lr", "Base LR for a total batch of 256.")] = None,
    warmup_epochs: Annotated[
        int | None, _option("warmup_epochs", "Epochs of linear LR warm-up.")
    ] = None,
    teacher_temp: Annotated[
        float | None, _option("teacher_temp", "Teacher [OBJ] temperature after its warm-up.")
    ] = None,
    momentum_teacher: Annotated[
        float | None, _option("momentum_teacher", "Teacher EMA momentum at the start (to 1).")
    ] = None,
    koleo_weight: Annotated[
        float | None,
        _option("koleo_weight", "KoLeo regulariser on the [OBJ] features (DINOv2: 0.1; 0 off)."),
    ] = None,
    pos_embed: Annotated[
        str | None, _option("pos_embed", "learned (iBOT) or sincos (fixed, MoCo v3).")
    ] = None,
    background_removal: Annotated[
        float | None,
        _option("background_removal", "Per-view probability of the target alone on black."),
    ] = None,
    seed: Annotated[int | None, _option("seed", "Seed of weights, crops and data order.")] = None,
    device: Annotated[str | None, _option("device", "auto, cpu or cuda.")] = None,
    workers: Annotated[int | None, _option("workers", "Data-loading processes.")] = None,
    save_every: Annotated[
        int | None,
        typer.Option(help="Also checkpoint every N steps.", show_default="at epoch ends only"),
    ] = None,
    patch_size: Annotated[int | None, _option("patch_size", "ViT patch size in px.")] = None,
    global_size: Annotated[
        int | None, _option("global_size", "Global crop size in px.")
    ] = None,
    local_size: Annotated[int | None, _option("local_size", "Local crop size in px.")] = None,
    global_scale: Annotated[
        tuple[float, float] | None,
        _option("global_scale", "Area range of global crops (fraction of the image)."),
    ] = None,
    local_scale: Annotated[
        tuple[float, float] | None,
        _option("local_scale", "Area range of local crops (fraction of the image)."),
    ] = None,
    n_local_crops: Annotated[
        int | None, _option("n_local_crops", "Local crops per image.")
    ] = None,
    out_dim: Annotated[int | None, _option("out_dim", "Head output dimension.")] = None,
    masked_attention: Annotated[
        bool | None, _flag("masked_attention", "Ablation: unmasked [OBJ] attention.")
    ] = None,
    object_crops: Annotated[
        bool | None, _flag("object_crops", "Ablation: plain random crops.")
    ] = None,
    feature: Annotated[
        str | None, _option("feature", "obj, or meanpool (ablation: mean of object patches).")
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
    objects_per_image: Annotated[
        int | None,
        _option(
            "objects_per_image",
            "Objects trained per image: 1 = the crops' target (the paper), K = the target and "
            "up to K - 1 others, 0 = all; each its own read-out [OBJ] token and loss terms "
            "(needs --obj-readout).",
        ),
    ] = None,
    attention_impl: Annotated[
        str | None,
        _option(
            "attention_impl",
            "split (unmasked flash attention + the masked [OBJ] row apart), dense (one SDPA "
            "with a full mask) or auto (split on GPU).",
        ),
    ] = None,
    augment_on: Annotated[
        str | None,
        _option(
            "augment_on",
            "Where views are resized and colour-augmented: loader (PIL in the workers), device "
            "(batched on the GPU; workers only decode and draw crops) or auto (device on CUDA).",
        ),
    ] = None,
    grad_checkpointing: Annotated[
        bool | None,
        _flag("grad_checkpointing",
              "Recompute block activations in backward (less memory, ~1 more forward)."),
    ] = None,
    compile: Annotated[
        bool | None, _flag("compile", "torch.compile the student and teacher.")
    ] = None,
    deterministic: Annotated[
        bool | None,
        _flag("deterministic",
              "torch.use_deterministic_algorithms (bitwise-repeatable GPU runs, slower)."),
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
        bool | None, _flag("tensorboard", "Event files in RUN_DIR/tensorboard.")
    ] = None,
    eval_masks: Annotated[
        Path | None,
        typer.Option(help="Online k-NN monitor: mask store of held-out labelled objects, split "
                     "by image into bank and queries; the teacher is evaluated at the first "
                     "step, every --eval-every steps and the last.", show_default="no monitor"),
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
    from odis_core.train.loop import pretrain as run_pretrain
    from odis_core.train.recipes import load_recipe
    from odis_core.train.signals import StopSignals

    overrides = {
        name: value
        for name, value in dict(
            arch=arch,
            depth=depth,
            objective=objective,
            epochs=epochs,
            max_steps=max_steps,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            warmup_epochs=warmup_epochs,
            teacher_temp=teacher_temp,
            momentum_teacher=momentum_teacher,
            koleo_weight=koleo_weight,
            pos_embed=pos_embed,
            background_removal=background_removal,
            seed=seed,
            device=device,
            workers=workers,
            save_every=save_every,
            patch_size=patch_size,
            global_size=global_size,
            local_size=local_size,
            global_scale=global_scale,
            local_scale=local_scale,
            n_local_crops=n_local_crops,
            out_dim=out_dim,
            masked_attention=masked_attention,
            object_crops=object_crops,
            feature=feature,
            obj_readout=obj_readout,
            objects_per_image=objects_per_image,
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
        base = load_recipe(config) if config is not None else PretrainConfig()
        run_config = dataclasses.replace(base, **overrides)
        if show_config:
            print_config(run_config.resolved(), config)
            return
        for name, value in (("--masks", masks), ("--out", out)):
            if value is None:
                raise ValueError(f"missing option {name} (needed to train)")
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
    if report.get("curve"):
        first, last = report["curve"][0], report["curve"][-1]
        console.print(
            f"k-NN top-1 {first[1]:.1f}% (step {first[0]}) -> {last[1]:.1f}% (step {last[0]}), "
            f"{report['eval']['seconds_per_evaluation']} s per evaluation; {out / 'curve.png'}",
            highlight=False,
        )
