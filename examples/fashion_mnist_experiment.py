"""Object-level vs image-level distillation on scenes of Fashion-MNIST items (issue 7).

For one fixed budget (the same optimizer steps, batch, seed and network for every arm) it
pretrains five arms — ODIS, plain iBOT (`objective="image"`), ODIS without masked
attention, ODIS without object-aware crops, and ODIS with mean-pooled in-object patches
instead of [OBJ] — then evaluates each teacher, and the same network at its initial
weights, with object-level weighted k-NN on the test scenes under every inference mode:

    masked      whole image in, the [OBJ] row attends only to the object's patches
    crop        the image cropped to the object's box, unmasked [OBJ]
    blackout    background pixels set to black, unmasked [OBJ]
    full-image  the unmasked [OBJ] of the whole image, given to each of its objects
    meanpool    mean of the object's final patch tokens from an unmasked pass

    # the CPU table of docs/results.md (wall time and hardware are recorded there)
    python examples/fashion_mnist_experiment.py --workdir runs/fashion_mnist
    # a few steps on a few scenes (the test suite runs this on tiny IDX files)
    python examples/fashion_mnist_experiment.py --workdir /tmp/fm --tiny --source DIR

Writes WORKDIR/results.md (k = 20 top-1 table), results.json (every k, top-1 and top-5,
wall times, settings, hardware) and results.png (bar chart). Finished arms and
evaluations are kept in WORKDIR and skipped on a re-run, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from odis_core.demo import DemoSettings, chance_level
from odis_core.embed.inference import build_backbone, embed, load_teacher_backbone
from odis_core.evaluate.knn import weighted_knn
from odis_core.masks.coco import import_coco
from odis_core.masks.store import MaskStore, MaskStoreError, write_store
from odis_core.model.obj_vit import ObjViT
from odis_core.scenes.fashion_mnist import (
    DEFAULT_SOURCE,
    FashionSceneConfig,
    generate_fashion_scenes,
)
from odis_core.train.config import PretrainConfig
from odis_core.train.loop import RunFinished, StepDone, pretrain, resolve_device

# name -> PretrainConfig overrides (spec §8); every other setting is shared.
ARMS: dict[str, dict[str, Any]] = {
    "odis": {},
    "ibot (image objective)": {"objective": "image"},
    "odis, no masked attention": {"masked_attention": False},
    "odis, no object-aware crops": {"object_crops": False},
    "odis, meanpool feature": {"feature": "meanpool"},
}
UNTRAINED = "untrained (random init)"
MODES = ("masked", "crop", "blackout", "full-image", "meanpool")
KS = (10, 20, 100, 200)
TABLE_K = 20
console = Console()


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").replace("__", "_")


# --------------------------------------------------------------------------- settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument(
        "--source", type=Path, default=DEFAULT_SOURCE, help="folder of the Fashion-MNIST IDX files"
    )
    parser.add_argument("--tiny", action="store_true", help="a few steps on a few scenes")
    parser.add_argument("--train-scenes", type=int, default=1024)
    parser.add_argument("--test-scenes", type=int, default=300)
    parser.add_argument(
        "--bank-scenes",
        type=int,
        default=512,
        help="train scenes whose objects form the k-NN bank (0: all)",
    )
    parser.add_argument("--canvas-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=64, help="optimizer steps per arm")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--arch", default="vit_tiny")
    parser.add_argument("--depth", type=int, default=4, help="0: the architecture's own")
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument(
        "--pretrain-config",
        type=Path,
        help="JSON of PretrainConfig fields that override the demo recipe",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--arms",
        default=",".join(slug(a) for a in ARMS),
        help="comma-separated subset of: " + ", ".join(slug(a) for a in ARMS),
    )
    args = parser.parse_args(argv)
    if args.tiny:
        args.train_scenes, args.test_scenes, args.steps, args.batch_size = 12, 6, 2, 4
        args.bank_scenes = 8
        args.depth, args.workers, args.canvas_size = 1, 0, 32
    return args


def base_config(args: argparse.Namespace, iters_per_epoch: int) -> PretrainConfig:
    """The shared recipe: the demo's (tuned on synthetic scenes, spec-faithful otherwise),
    sized to the canvas; the schedules span the epochs that hold the step budget (exactly
    the budget when --steps is a multiple of train scenes // batch)."""
    config = DemoSettings().pretrain
    if args.pretrain_config is not None:
        # from_dict rejects unknown keys; only the keys the file names override the recipe
        values = json.loads(args.pretrain_config.read_text(encoding="utf-8"))
        loaded = PretrainConfig.from_dict(values, source=str(args.pretrain_config))
        config = dataclasses.replace(config, **{key: getattr(loaded, key) for key in values})
    epochs = max(1, math.ceil(args.steps / iters_per_epoch))
    config = dataclasses.replace(
        config,
        arch=args.arch,
        depth=args.depth or None,
        patch_size=args.patch_size,
        global_size=args.canvas_size,
        local_size=args.canvas_size // 2,
        batch_size=args.batch_size,
        epochs=epochs,
        max_steps=args.steps,
        seed=args.seed,
        device=args.device,
        workers=args.workers,
    )
    if args.tiny:
        config = dataclasses.replace(
            config,
            out_dim=64,
            head_hidden_dim=64,
            head_bottleneck_dim=32,
            n_local_crops=2,
            min_patches_per_block=1,
        )
    return config


def hardware() -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or "unknown",
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# --------------------------------------------------------------------------- steps


def build_data(args: argparse.Namespace) -> tuple[dict[str, Path], dict[str, MaskStore]]:
    scene_config = FashionSceneConfig(canvas_size=args.canvas_size)
    splits = generate_fashion_scenes(
        args.source,
        args.workdir / "scenes",
        args.train_scenes,
        args.test_scenes,
        seed=args.seed,
        config=scene_config,
    )
    images = {name: split.images_dir for name, split in splits.items()}
    stores = {name: _imported_store(split, args.workdir / "masks" / name)
              for name, split in splits.items()}
    images["bank"], stores["bank"] = (
        images["train"],
        first_images(stores["train"], args.bank_scenes, args.workdir / "masks" / "bank"),
    )
    return images, stores


def _imported_store(split: Any, out: Path) -> MaskStore:
    """The split's annotations as a mask store: the one imported before when it holds the
    same images (re-importing would pull its shards from under another sweep of the same
    workdir that is reading them), else a fresh import."""
    try:
        written = MaskStore.open(out)
        if len(written.images) == len(json.loads(split.annotations.read_text())["images"]):
            return written
    except (MaskStoreError, OSError, KeyError, ValueError):  # absent or incomplete: import
        pass
    return import_coco(split.annotations, out, images_root=split.images_dir)[0]


def first_images(store: MaskStore, n_images: int, out: Path) -> MaskStore:
    """The store restricted to its first `n_images` images (all when 0), written to `out`:
    a smaller k-NN bank keeps the evaluation of many arms and modes affordable on a CPU."""
    if n_images <= 0 or n_images >= len(store.images):
        return store
    images = [store.images[i] for i in range(n_images)]
    # Reuse a bank written before: rewriting it would pull the shards from under another
    # process of a sweep that shares this workdir and reads the bank lazily.
    try:
        written = MaskStore.open(out)
        if [r.image_id for r in written.images] == [r.image_id for r in images]:
            return written
    except (MaskStoreError, OSError):  # absent or incomplete: write it
        pass
    return write_store(
        out,
        images,
        [obj for image in images for obj in store.objects_of(image.image_id)],
        categories=store.categories,
        source=store.source,
        images_root=store.images_root,
    )


def train_arm(
    name: str, config: PretrainConfig, images: Path, store: MaskStore, run_dir: Path
) -> dict[str, Any]:
    """Pretrain one arm (skipped when RUN_DIR already holds a finished run)."""
    report_path, config_path = run_dir / "report.json", run_dir / "config.json"
    wanted = json.loads(json.dumps(config.resolved().to_dict()))
    if report_path.is_file() and json.loads(config_path.read_text()) == wanted:
        return json.loads(report_path.read_text())
    shutil.rmtree(run_dir, ignore_errors=True)  # another budget or recipe: start over
    started, report = time.perf_counter(), {}
    for event in pretrain(config, images, store, run_dir):
        if isinstance(event, StepDone) and (event.step % 50 == 0 or event.step == 1):
            console.print(
                f"  [{name}] step {event.step}/{event.total_steps} "
                f"loss {event.metrics['loss']:.3f}",
                highlight=False,
            )
        elif isinstance(event, RunFinished):
            report = dict(event.report)
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return {**report, "trained_now": True}


def full_image_features(
    backbone: ObjViT, images: Path, store: MaskStore, image_size: int, device: str
) -> tuple[np.ndarray, np.ndarray]:
    """(N_objects, D) features and (N_objects,) labels: each object gets the unmasked
    [OBJ] feature of its whole image (what image-level pretraining offers per object)."""
    per_image = embed(backbone, images, store, level="image", image_size=image_size, device=device)
    row_of = {row["image_id"]: i for i, row in enumerate(per_image.meta)}
    rows, labels = [], []
    for record in store.images:
        if record.image_id not in row_of:  # unreadable image: skipped by embed, here too
            continue
        for obj in store.objects_of(record.image_id):
            rows.append(row_of[record.image_id])
            labels.append(obj.category_id)
    return per_image.features[rows], np.asarray(labels, dtype=np.int64)


def object_features(
    backbone: ObjViT, mode: str, images: Path, store: MaskStore, image_size: int, device: str
) -> tuple[np.ndarray, np.ndarray]:
    if mode == "full-image":
        return full_image_features(backbone, images, store, image_size, device)
    result = embed(
        backbone, images, store, level="object", mode=mode, image_size=image_size, device=device
    )
    return result.features, result.labels


def evaluate(
    backbone: ObjViT,
    image_size: int,
    images: dict[str, Path],
    stores: dict[str, MaskStore],
    device: str,
    cache: Path,
) -> dict[str, Any]:
    """Object-level weighted k-NN per inference mode (cached per mode in `cache`)."""
    cache.mkdir(parents=True, exist_ok=True)
    reports = {}
    for mode in MODES:
        path = cache / f"{mode}.json"
        if not path.is_file():
            started = time.perf_counter()
            train = object_features(
                backbone, mode, images["bank"], stores["bank"], image_size, device
            )
            test = object_features(
                backbone, mode, images["test"], stores["test"], image_size, device
            )
            report = weighted_knn(*train, *test, ks=KS).to_json()
            report["wall_seconds"] = round(time.perf_counter() - started, 1)
            path.write_text(json.dumps(report, indent=2) + "\n")
        reports[mode] = json.loads(path.read_text())
    return reports


# --------------------------------------------------------------------------- outputs


def standard_error(top1: float, n_test: int) -> float:
    """Binomial standard error (pp) of a top-1 accuracy over `n_test` queries: the spread
    from sampling the test set only; it says nothing of seed-to-seed variation."""
    p = top1 / 100.0
    return 100.0 * math.sqrt(p * (1.0 - p) / max(n_test, 1))


def markdown_table(results: dict[str, dict[str, Any]], chance: float) -> str:
    header = "| arm | " + " | ".join(MODES) + " |"
    lines = [header, "|" + "---|" * (len(MODES) + 1)]
    for arm, reports in results.items():
        cells = []
        for mode in MODES:
            report = reports[mode]
            top1 = report["results"][str(TABLE_K)]["top1"]
            cells.append(f"{top1:.1f} ± {standard_error(top1, report['n_test']):.1f}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines.append("| chance | " + " | ".join(f"{chance:.1f}" for _ in MODES) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(results: dict[str, dict[str, Any]], chance: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(results)
    width = 0.8 / len(MODES)
    figure, axes = plt.subplots(figsize=(11, 4.5))
    for m, mode in enumerate(MODES):
        values = [results[arm][mode]["results"][str(TABLE_K)]["top1"] for arm in arms]
        positions = np.arange(len(arms)) + (m - (len(MODES) - 1) / 2) * width
        axes.bar(positions, values, width, label=mode)
    axes.axhline(chance, color="black", linestyle="--", linewidth=1, label="chance")
    axes.set_xticks(np.arange(len(arms)), [a.replace(", ", ",\n") for a in arms], fontsize=8)
    axes.set_ylabel(f"object-level {TABLE_K}-NN top-1 (%)")
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8, ncol=len(MODES) + 1, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def rich_table(results: dict[str, dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    table.add_column("arm")
    for mode in MODES:
        table.add_column(mode, justify="right")
    for arm, reports in results.items():
        table.add_row(arm, *(f"{reports[m]['results'][str(TABLE_K)]['top1']:.1f}" for m in MODES))
    return table


# --------------------------------------------------------------------------- main


def forget_other_runs(args: argparse.Namespace, config: PretrainConfig) -> None:
    """Drop cached runs and k-NN results of another dataset or recipe in WORKDIR."""
    data = {
        k: str(v) if isinstance(v, Path) else v
        for k, v in vars(args).items()
        if k in ("source", "train_scenes", "test_scenes", "bank_scenes", "canvas_size", "seed")
    }
    fingerprint = json.loads(json.dumps({"data": data, "pretrain": config.to_dict()}))
    path = args.workdir / "fingerprint.json"
    if path.is_file() and json.loads(path.read_text()) != fingerprint:
        for stale in ("runs", "knn"):
            shutil.rmtree(args.workdir / stale, ignore_errors=True)
    path.write_text(json.dumps(fingerprint, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    selected = {slug(a) for a in args.arms.split(",") if a}
    unknown = selected - {slug(a) for a in ARMS}
    if unknown:
        raise SystemExit(f"unknown arm(s): {', '.join(sorted(unknown))}")
    arms = {name: overrides for name, overrides in ARMS.items() if slug(name) in selected}
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    device = resolve_device(args.device)

    console.print("composing scenes and importing masks ...")
    images, stores = build_data(args)
    iters_per_epoch = max(1, len(stores["train"].images) // args.batch_size)
    config = base_config(args, iters_per_epoch)
    forget_other_runs(args, config)

    results: dict[str, dict[str, Any]] = {}
    training: dict[str, Any] = {}
    # The floor first: every arm starts from these weights (same seed, same architecture;
    # the meanpool and image arms differ only in how they use them).
    console.print(f"evaluating {UNTRAINED}")
    results[UNTRAINED] = evaluate(
        build_backbone(config.resolved()),
        config.global_size,
        images,
        stores,
        device,
        args.workdir / "knn" / "untrained",
    )
    for name, overrides in arms.items():
        console.print(f"pretraining [bold]{name}[/bold] ({args.steps} steps)")
        run_dir = args.workdir / "runs" / slug(name)
        knn_cache = args.workdir / "knn" / slug(name)
        report = train_arm(
            name,
            dataclasses.replace(config, **overrides),
            images["train"],
            stores["train"],
            run_dir,
        )
        if report.get("trained_now"):
            shutil.rmtree(knn_cache, ignore_errors=True)  # results of an earlier run's weights
        training[name] = {
            k: report.get(k)
            for k in ("steps", "wall_seconds", "images_per_second", "whole_image_fallbacks")
        }
        backbone, run_config = load_teacher_backbone(run_dir)
        console.print(f"evaluating {name}")
        results[name] = evaluate(
            backbone, run_config.global_size, images, stores, device, knn_cache
        )

    results = {name: results[name] for name in [*arms, UNTRAINED]}  # floor row last
    test_labels = np.asarray([o.category_id for o in stores["test"].objects])
    chance = chance_level(test_labels)["top1"]
    n_test = results[UNTRAINED]["masked"]["n_test"]
    n_train = results[UNTRAINED]["masked"]["n_train"]
    title = (
        f"Fashion-MNIST scenes, object-level {TABLE_K}-NN top-1 (%): {n_train} train / "
        f"{n_test} test objects, {args.steps} steps x batch {args.batch_size} per arm"
    )
    wall = round(time.perf_counter() - started, 1)
    summary = {
        "results": results,
        "training": training,
        "chance_top1": chance,
        "settings": {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "pretrain": config.to_dict(),
            "device": device,
        },
        "hardware": hardware(),
        "wall_seconds_this_invocation": wall,
    }
    (args.workdir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.workdir / "results.md").write_text(
        f"{title}; ± is the binomial standard error over the test objects.\n\n"
        + markdown_table(results, chance)
    )
    bar_chart(results, chance, args.workdir / "results.png", title)
    console.print(rich_table(results, title))
    console.print(
        f"chance {chance:.1f}; wall time {wall} s; results in {args.workdir}", highlight=False
    )


if __name__ == "__main__":
    main()
