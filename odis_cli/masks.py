"""`odis masks coco|sam|stats|show|export`: build and inspect the mask store."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from odis_cli.ui import cli_errors, console, error_console, fail, progress_callback

app = typer.Typer(
    help="Object masks for an image folder, into one mask store.", no_args_is_help=True
)


def _summary_table(title: str, rows: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column("what")
    table.add_column("count", justify="right")
    for name, value in rows.items():
        table.add_row(name, str(value))
    return table


# segment-anything 1.0's SamAutomaticMaskGenerator defaults, shown in --help; only the
# settings a user passes reach SAM (tests/cli/test_cli_help.py checks these match SAM's).
SAM_GENERATOR_DEFAULTS = {
    "points_per_side": 32,
    "points_per_batch": 64,
    "pred_iou_thresh": 0.88,
    "stability_score_thresh": 0.95,
    "box_nms_thresh": 0.7,
    "crop_n_layers": 0,
    "min_mask_region_area": 0,
}


def _sam_option(name: str, help: str) -> Any:
    return typer.Option(help=f"{help} (SAM generator setting)",
                        show_default=f"SAM's {SAM_GENERATOR_DEFAULTS[name]}")


@app.command("coco")
def coco(
    images: Annotated[Path, typer.Option(help="Image folder the annotation file names refer to.")],
    annotations: Annotated[Path, typer.Option(help="COCO instances JSON.")],
    out: Annotated[Path, typer.Option(help="Mask store directory to write.")],
    min_area: Annotated[float, typer.Option(help="Drop objects smaller than this (pixels).")] = 0.0,
    max_objects: Annotated[
        int | None,
        typer.Option(help="Keep at most this many objects per image, largest first.",
                     show_default="all"),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace a store at --out built from other annotations.")
    ] = False,
) -> None:
    """Import ground-truth objects (polygons, RLE, boxes) from a COCO instances file."""
    from odis_cli.guards import guard_coco_store
    from odis_core.masks.coco import file_sha1, import_coco, load_coco

    with cli_errors():
        loaded = load_coco(annotations)  # the whole file is validated before any work
        replacing = guard_coco_store(out, {
            "annotations_sha1": file_sha1(annotations), "min_area": min_area,
            "max_objects_per_image": max_objects}, overwrite)
        if replacing:
            console.print(replacing, highlight=False, soft_wrap=True)
        with progress_callback("importing objects") as progress:
            store, report = import_coco(
                annotations, out, images_root=images, min_area=min_area,
                max_objects_per_image=max_objects, progress=progress, loaded=loaded,
            )
    console.print(_summary_table(f"mask store {out}", vars(report)))
    if report.n_missing_images:
        # A file_name typo looks like this too: say it where it cannot be missed.
        error_console.print(
            f"[yellow]warning:[/yellow] {annotations}: {report.n_missing_images} image(s) "
            f"missing or unreadable under {images} (e.g. {escape(store.skipped[0])}); all "
            f"listed in {out / 'skipped.txt'}", highlight=False, soft_wrap=True,
        )


@app.command("sam")
def sam(
    images: Annotated[Path, typer.Option(help="Image folder.")],
    checkpoint: Annotated[Path, typer.Option(help="segment-anything checkpoint (.pth).")],
    out: Annotated[Path, typer.Option(help="Mask store directory to write.")],
    model_type: Annotated[str, typer.Option(help="SAM architecture: vit_b, vit_l or vit_h.")],
    max_masks: Annotated[
        int | None,
        typer.Option(help="Keep the best K masks per image (IoU x stability).",
                     show_default="all"),
    ] = None,
    min_area: Annotated[float, typer.Option(help="Drop masks smaller than this (pixels).")] = 0.0,
    device: Annotated[
        str, typer.Option(help="auto (cuda when present), cpu or cuda.")
    ] = "auto",
    points_per_side: Annotated[
        int | None, _sam_option("points_per_side", "Point grid side of the generator.")
    ] = None,
    points_per_batch: Annotated[
        int | None, _sam_option("points_per_batch", "Points the mask decoder takes at once.")
    ] = None,
    pred_iou_thresh: Annotated[
        float | None, _sam_option("pred_iou_thresh", "Keep masks of predicted IoU above this.")
    ] = None,
    stability_score_thresh: Annotated[
        float | None,
        _sam_option("stability_score_thresh", "Keep masks of stability score above this."),
    ] = None,
    box_nms_thresh: Annotated[
        float | None, _sam_option("box_nms_thresh", "Box IoU of non-maximum suppression.")
    ] = None,
    crop_n_layers: Annotated[
        int | None, _sam_option("crop_n_layers", "Layers of image crops also segmented.")
    ] = None,
    min_mask_region_area: Annotated[
        int | None,
        _sam_option("min_mask_region_area", "Remove islands and holes below this (needs "
                    "opencv)."),
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(help="I/N: segment every N-th image from the I-th (0-based); the last "
                     "shard to finish writes the store. 'auto': I and N from torchrun "
                     "(RANK/WORLD_SIZE) or a Slurm array.", show_default="the whole folder"),
    ] = None,
    batch_size: Annotated[
        int, typer.Option(help="Images per SAM image-encoder pass (same masks, faster on GPU).")
    ] = 8,
    bf16: Annotated[
        bool, typer.Option(help="Run SAM's image encoder in bf16 on CUDA (decoder stays fp32).")
    ] = True,
) -> None:
    """Class-agnostic objects from segment-anything's automatic mask generator."""
    import torch

    from odis_core.masks.sam import generate_sam_masks, load_sam

    # Only what the user set reaches SAM: its own defaults stay the one source of truth.
    generator_kwargs = {
        name: value
        for name, value in {
            "points_per_side": points_per_side,
            "points_per_batch": points_per_batch,
            "pred_iou_thresh": pred_iou_thresh,
            "stability_score_thresh": stability_score_thresh,
            "box_nms_thresh": box_nms_thresh,
            "crop_n_layers": crop_n_layers,
            "min_mask_region_area": min_mask_region_area,
        }.items()
        if value is not None
    }
    if device == "auto":
        # Under torchrun each process takes its own GPU.
        local_rank = os.environ.get("LOCAL_RANK", "0")
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    shard_pair = _parse_shard(shard) if shard is not None else None
    with cli_errors():
        model = load_sam(model_type, checkpoint, device=device)
        with progress_callback("segmenting") as progress:
            store, report = generate_sam_masks(
                images, out, model, generator_kwargs=generator_kwargs, max_masks=max_masks,
                min_area=min_area, progress=progress, shard=shard_pair,
                batch_size=batch_size, bf16=bf16,
            )
    rows = {"images": report.n_images, "objects": report.n_objects,
            "skipped": report.n_skipped, "resumed": report.n_resumed}
    title = f"mask store {out}" if store is not None else (
        f"shard {shard} of {out} (the store is written when every shard has finished)")
    console.print(_summary_table(title, rows))
    for line in report.skipped[:20]:
        console.print(f"[yellow]skipped[/yellow] {line}", highlight=False)
    if report.n_skipped > 20:
        console.print(f"... and {report.n_skipped - 20} more (all listed in {out}/skipped.txt)")


def _shard_from_environment() -> tuple[int, int] | None:
    """(index, count) from torchrun (RANK, WORLD_SIZE) or a Slurm array (SLURM_ARRAY_TASK_ID
    from SLURM_ARRAY_TASK_MIN, SLURM_ARRAY_TASK_COUNT); None outside both."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        return int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"])
    return None


def _parse_shard(text: str) -> tuple[int, int]:
    if text == "auto":
        found = _shard_from_environment()
        if found is None or not 0 <= found[0] < found[1]:
            fail(
                "--shard auto: needs RANK/WORLD_SIZE (torchrun) or SLURM_ARRAY_TASK_ID/"
                "SLURM_ARRAY_TASK_COUNT (a Slurm array) in the environment"
            )
        return found  # type: ignore[return-value]
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit()) or not 0 <= int(index) < int(count):
        fail(f"--shard {text}: expected I/N with 0 <= I < N, e.g. 0/4")
    return int(index), int(count)


@app.command("stats")
def stats(
    store: Annotated[Path, typer.Argument(help="Mask store directory.")],
    json_out: Annotated[
        Path | None,
        typer.Option("--json", help="Also write the figures here.", show_default="not written"),
    ] = None,
) -> None:
    """Objects per image, areas, and images without objects (they train on the whole image)."""
    from odis_core.masks.stats import store_statistics
    from odis_core.masks.store import read_store

    with cli_errors():
        opened = read_store(store)
        figures = store_statistics(opened)
        if json_out is not None:
            json_out.write_text(json.dumps(figures, indent=2) + "\n")
    console.print(_summary_table(f"mask store {store}", figures))


@app.command("show")
def show(
    store: Annotated[Path, typer.Argument(help="Mask store directory.")],
    image: Annotated[str, typer.Option(help="File name of the image, as the store lists it.")],
    out: Annotated[Path, typer.Option(help="PNG to write.")],
    images: Annotated[
        Path | None,
        typer.Option(help="Image folder.", show_default="the one the store records"),
    ] = None,
) -> None:
    """Draw an image with its objects' masks, boxes and labels into a PNG."""
    from odis_core.atomic import atomic_write
    from odis_core.masks.render import render_objects
    from odis_core.masks.store import read_store

    with cli_errors():
        opened = read_store(store)
        canvas = render_objects(opened, image, images)
        with atomic_write(out) as handle:
            canvas.save(handle, format="PNG")
        n_objects = len(opened.objects_of(opened.image_by_name(image).image_id))  # type: ignore[union-attr]
    console.print(f"wrote {out} ({canvas.width}x{canvas.height}, {n_objects} objects)")


@app.command("export")
def export(
    store: Annotated[Path, typer.Argument(help="Mask store directory.")],
    out: Annotated[Path, typer.Option(help="COCO instances JSON to write.")],
) -> None:
    """Write the store as a COCO instances JSON (pycocotools loads it; `odis masks coco`
    imports it back unchanged)."""
    from odis_core.masks.store import export_coco, read_store

    with cli_errors():
        opened = read_store(store)
        export_coco(opened, out)
    console.print(f"wrote {out} ({opened.n_images} images, {opened.n_objects} objects)")
