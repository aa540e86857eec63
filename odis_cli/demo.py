"""`odis demo`: the whole pipeline on synthetic scenes, on a CPU, in a few minutes."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Annotated

import typer

from odis_cli.checks import check_at_least, check_device
from odis_cli.knn import knn_table
from odis_cli.pretrain import run_training
from odis_cli.ui import WORKERS_SHOWN, cli_errors, console, progress_callback
from odis_core.demo import DemoSettings

_RECIPE = DemoSettings().pretrain  # configs/cpu-demo.json


def demo(
    workdir: Annotated[Path, typer.Option(help="Directory for every artifact and demo.json.")]
    = Path("odis_demo"),
    train_scenes: Annotated[
        int | None, typer.Option(help="Training scenes.", show_default=str(DemoSettings.n_train))
    ] = None,
    test_scenes: Annotated[
        int | None, typer.Option(help="Test scenes.", show_default=str(DemoSettings.n_test))
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(help="Pretraining epochs.",
                     show_default=f"{_RECIPE.epochs}, configs/cpu-demo.json's"),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Data-loading processes.", show_default=WORKERS_SHOWN)
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of scenes, weights and crops.")] = 0,
) -> None:
    """The whole pipeline on synthetic scenes: pretrained vs untrained object-level k-NN.

    Generates scenes, imports their masks, pretrains, embeds both networks and prints
    the k-NN table; every artifact and demo.json stay in --workdir."""
    from odis_core.demo import demo_summary, eval_every
    from odis_core.embed.backbones import weights_fingerprint
    from odis_core.embed.features import write_features
    from odis_core.embed.inference import build_backbone, embed, load_teacher_backbone
    from odis_core.evaluate.knn import weighted_knn
    from odis_core.masks.coco import import_coco
    from odis_core.scenes.synthetic import SceneConfig, generate_scenes
    from odis_core.train.loop import pretrain, resolve_device

    settings = DemoSettings(seed=seed)
    started = time.perf_counter()
    with cli_errors():
        # Checked before any scene is drawn; 0 is a value, not "unset".
        for option, value in (("--train-scenes", train_scenes), ("--test-scenes", test_scenes),
                              ("--epochs", epochs)):
            check_at_least(option, value, 1)
        check_at_least("--workers", workers, 0)
        check_device(device)
        settings.scaled(
            settings.n_train if train_scenes is None else train_scenes,
            settings.n_test if test_scenes is None else test_scenes,
            settings.pretrain.epochs if epochs is None else epochs,
        )
        overrides = {"seed": seed, "device": device}
        if workers is not None:
            overrides["workers"] = workers
        config = dataclasses.replace(settings.pretrain, **overrides)
        if (workdir / "demo.json").exists() or (workdir / "run").exists():
            # The demo owns its workdir: it replaces its own artifacts, and says so.
            console.print(f"replacing the previous demo's scenes, masks, run and features in "
                          f"{workdir}", highlight=False, soft_wrap=True)
        workdir.mkdir(parents=True, exist_ok=True)
        with progress_callback("generating scenes") as progress:
            splits = generate_scenes(
                workdir / "scenes", settings.n_train, settings.n_test, seed=seed,
                config=SceneConfig(image_size=settings.image_size), progress=progress,
            )
        stores = {}
        for split, scenes in splits.items():
            with progress_callback(f"importing {split} masks") as progress:
                stores[split], _ = import_coco(
                    scenes.annotations, workdir / "masks" / split,
                    images_root=scenes.images_dir, progress=progress,
                )
        run_dir = workdir / "run"
        # The online k-NN curve, on the test store's own bank/query split (by image).
        config = dataclasses.replace(
            config, eval_masks=str(workdir / "masks" / "test"), eval_every=eval_every(settings),
            eval_max_objects=settings.eval_max_objects,
        )
        run_report = run_training(
            pretrain(config, splits["train"].images_dir, stores["train"], run_dir)
        )

        trained, run_config = load_teacher_backbone(run_dir)
        networks = {"pretrained": trained, "untrained": build_backbone(run_config)}
        reports = {}
        for name, backbone in networks.items():
            features = {}
            for split in ("train", "test"):
                with progress_callback(f"embedding {split} objects ({name})") as progress:
                    result = embed(
                        backbone, splits[split].images_dir, stores[split], level="object",
                        mode="masked", image_size=run_config.global_size,
                        device=resolve_device(device), progress=progress,
                    )
                write_features(
                    workdir / "features" / f"{name}_{split}", result.features, result.labels,
                    result.meta,
                    {"backbone": run_config.arch, "checkpoint": str(run_dir), "level": "object",
                     "mode": "masked", "random_init": name == "untrained",
                     # `odis knn` tells the two networks' features apart by this.
                     "weights": weights_fingerprint(backbone.vit)},
                )
                features[split] = result
            reports[name] = weighted_knn(
                features["train"].features, features["train"].labels,
                features["test"].features, features["test"].labels,
            ).to_json()
        summary = demo_summary(
            reports["pretrained"], reports["untrained"], features["test"].labels,
            extra={"wall_seconds": round(time.perf_counter() - started, 1),
                   "curve": run_report.get("curve", []),
                   "seconds_per_evaluation": run_report["eval"]["seconds_per_evaluation"],
                   "settings": {"n_train": settings.n_train, "n_test": settings.n_test,
                                "epochs": config.epochs, "arch": config.arch,
                                "depth": config.depth, "patch_size": config.patch_size}},
        )
        (workdir / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    title = (f"object-level weighted k-NN, synthetic scenes\n"
             f"{summary['n_train']} train / {summary['n_test']} test objects")
    console.print(knn_table(title, {"pretrained": reports["pretrained"],
                                    "untrained": reports["untrained"]}))
    console.print(
        f"chance: top-1 {summary['chance']['top1']:.1f}, top-5 {summary['chance']['top5']:.1f}"
        f"; wall time {summary['wall_seconds']} s; artifacts in {workdir}", highlight=False,
    )
    curve = summary["curve"]
    console.print(
        f"online k-NN top-1 (test store split by image, {run_report['eval']['n_bank']} bank / "
        f"{run_report['eval']['n_query']} query objects): "
        + " -> ".join(f"{top1:.1f}" for _, top1, _, _ in curve)
        + f" at steps {', '.join(str(step) for step, *_ in curve)}; "
        f"{summary['seconds_per_evaluation']} s per evaluation; curve: {run_dir / 'curve.png'}",
        highlight=False,
    )
