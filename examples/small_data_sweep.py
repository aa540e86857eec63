"""Recipe sweep on the Fashion-MNIST scenes: learning curves of masked k-NN (issue 17).

For each named recipe (PretrainConfig overrides on top of the demo recipe) it pretrains on
the Fashion-MNIST train scenes and evaluates the teacher at step 0 and at every milestone:
object-level weighted k-NN (k = 20, T = 0.07) with masked inference on a fixed bank of
train objects and the test objects, plus the participation ratio of the test features
(how many dimensions they really use). A curve is built by pretraining with
`max_steps = m1`, evaluating the checkpoint, then resuming with `max_steps = m2`, ...
(a resume is exact), so the schedules always span the recipe's whole planned budget.

Each recipe's settings and curve live in WORKDIR/curves/NAME.json, rewritten (atomically)
after every milestone; finished milestones are skipped on a re-run, so a stopped sweep
resumes where it stopped. The recipes file is re-read after every recipe: append a recipe
while the sweep runs and it is picked up.

    # the recipes of benchmarks/small_data_recipes.json, in order, resumably
    python examples/small_data_sweep.py --workdir runs/small_data \
        --recipes benchmarks/small_data_recipes.json
    # one recipe from a config file (e.g. the shipped one), curve to 1,200 steps
    python examples/small_data_sweep.py --workdir runs/small_data \
        --config configs/small-data.json --name small-data --milestones 0,300,600,1200

The budget is counted in CPU seconds of the training process (time.process_time around
`pretrain`, loader workers off so every thread's time is counted): on a shared machine
wall time measures the neighbours' load, not the recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from odis_core.atomic import atomic_write
from odis_core.demo import DemoSettings
from odis_core.embed.inference import build_backbone, embed, load_teacher_backbone
from odis_core.evaluate.knn import weighted_knn
from odis_core.masks.store import MaskStore
from odis_core.train.checkpoint import CHECKPOINT_NAME
from odis_core.train.config import PretrainConfig
from odis_core.train.loop import StepDone, pretrain

K = 20
TEMPERATURE = 0.07


def _load_experiment() -> Any:
    """The issue-7 experiment script as a module (examples/ is not a package): its scene
    building and bank selection are reused, not copied."""
    path = Path(__file__).resolve().parent / "fashion_mnist_experiment.py"
    spec = importlib.util.spec_from_file_location("fashion_mnist_experiment", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fashion_mnist_experiment", module)
    spec.loader.exec_module(module)
    return module


experiment = _load_experiment()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--source", type=Path, default=experiment.DEFAULT_SOURCE)
    parser.add_argument("--recipes", type=Path, help="JSON: {name: {overrides}} run in order")
    parser.add_argument("--config", type=Path, help="one recipe: a PretrainConfig JSON file")
    parser.add_argument("--name", help="the recipe's name with --config")
    parser.add_argument("--milestones", default="0,100,200,300",
                        help="steps at which the teacher is evaluated (a recipe's "
                             "'milestones' key overrides it)")
    parser.add_argument("--train-scenes", type=int, default=1024)
    parser.add_argument("--test-scenes", type=int, default=300)
    parser.add_argument("--bank-scenes", type=int, default=333,
                        help="train scenes whose objects form the k-NN bank (~1,000 objects)")
    parser.add_argument("--canvas-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 keeps CPU seconds honest on a loaded machine "
                             "(spinning OpenMP threads count as CPU time)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a few steps on a few scenes")
    args = parser.parse_args(argv)
    if (args.recipes is None) == (args.config is None):
        parser.error("give exactly one of --recipes or --config")
    if args.config is not None and not args.name:
        args.name = args.config.stem
    if args.tiny:
        args.train_scenes, args.test_scenes, args.bank_scenes, args.canvas_size = 12, 6, 8, 32
    return args


def base_recipe(args: argparse.Namespace) -> PretrainConfig:
    """The demo recipe on these scenes, one process (loader workers would hide their CPU
    time from process_time), planned for 100 epochs unless a recipe says otherwise."""
    config = dataclasses.replace(
        DemoSettings().pretrain,
        global_size=args.canvas_size,
        local_size=args.canvas_size // 2,
        seed=args.seed,
        device="cpu",
        workers=0,
        tensorboard=False,
    )
    if args.tiny:
        config = dataclasses.replace(
            config, depth=1, out_dim=64, head_hidden_dim=64, head_bottleneck_dim=32,
            n_local_crops=2, min_patches_per_block=1, batch_size=4,
        )
    return config


def recipe_config(base: PretrainConfig, overrides: dict[str, Any], source: str) -> PretrainConfig:
    """`base` with the recipe's PretrainConfig keys applied (keys starting with "_" are
    comments; "milestones" belongs to the sweep)."""
    values = {k: v for k, v in overrides.items() if not k.startswith("_") and k != "milestones"}
    loaded = PretrainConfig.from_dict(values, source=source)
    return dataclasses.replace(base, **{key: getattr(loaded, key) for key in values})


def participation_ratio(features: np.ndarray) -> float:
    """(sum of eigenvalues)^2 / sum of squared eigenvalues of the covariance of the
    L2-normalised features (the space the k-NN searches): 1 when all variance lies along
    one direction, D when it is spread evenly over D."""
    normalised = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    centred = normalised - normalised.mean(axis=0, keepdims=True)
    eigenvalues = np.linalg.eigvalsh(centred.T @ centred / max(len(centred) - 1, 1))
    eigenvalues = np.clip(eigenvalues, 0.0, None)
    return float(eigenvalues.sum() ** 2 / max((eigenvalues**2).sum(), 1e-30))


def evaluate(backbone: Any, image_size: int, images: dict[str, Path],
             stores: dict[str, MaskStore]) -> dict[str, Any]:
    """Masked-inference k-NN top-1 (k = 20) and the test features' participation ratio."""
    bank = embed(backbone, images["bank"], stores["bank"], mode="masked",
                 image_size=image_size, device="cpu")
    test = embed(backbone, images["test"], stores["test"], mode="masked",
                 image_size=image_size, device="cpu")
    report = weighted_knn(bank.features, bank.labels, test.features, test.labels,
                          ks=(K,), temperature=TEMPERATURE).to_json()
    top1 = report["results"][str(K)]["top1"]
    return {"top1": top1, "top5": report["results"][str(K)]["top5"],
            "n_bank": report["n_train"], "n_test": report["n_test"],
            "participation_ratio": round(participation_ratio(test.features), 3)}


def train_to(config: PretrainConfig, step: int, images: Path, store: MaskStore,
             run_dir: Path) -> dict[str, Any]:
    """Pretrain (or resume) until `step`; CPU seconds and wall seconds of this leg."""
    resume = (run_dir / CHECKPOINT_NAME).is_file()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    losses: list[float] = []
    entropies: list[float] = []
    for event in pretrain(dataclasses.replace(config, max_steps=step), images, store,
                          run_dir, resume=resume):
        if isinstance(event, StepDone):
            losses.append(float(event.metrics["loss"]))
            entropies.append(float(event.metrics["teacher_entropy"]))
    return {"cpu_s": time.process_time() - cpu0, "wall_s": time.perf_counter() - wall0,
            "loss_last": float(np.mean(losses[-20:])) if losses else None,
            "teacher_entropy": float(np.mean(entropies[-20:])) if entropies else None}


def run_recipe(name: str, overrides: dict[str, Any], milestones: list[int],
               args: argparse.Namespace, images: dict[str, Path],
               stores: dict[str, MaskStore], log: Any) -> dict[str, Any]:
    config = recipe_config(base_recipe(args), overrides, source=name).resolved()
    settings = json.loads(json.dumps(config.to_dict()))
    settings.pop("max_steps", None)
    path = args.workdir / "curves" / f"{name}.json"
    run_dir = args.workdir / "runs" / name
    record: dict[str, Any] = {"name": name, "overrides": overrides, "settings": settings,
                              "curve": [], "cpu_s": 0.0, "wall_s": 0.0}
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["settings"] == settings:
            record = saved
        else:  # the recipe changed under this name: start it over
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)
    done = {point["step"] for point in record["curve"]}
    for step in milestones:
        if step in done:
            continue
        if step == 0:
            backbone = build_backbone(config)
            leg = {"cpu_s": 0.0, "wall_s": 0.0, "loss_last": None, "teacher_entropy": None}
        else:
            leg = train_to(config, step, images["train"], stores["train"], run_dir)
            backbone, _ = load_teacher_backbone(run_dir)
            record["cpu_s"] += leg["cpu_s"]
            record["wall_s"] += leg["wall_s"]
        point = {"step": step, **evaluate(backbone, config.global_size, images, stores),
                 "cpu_s": round(record["cpu_s"], 1), "wall_s": round(record["wall_s"], 1),
                 "loss": leg["loss_last"], "teacher_entropy": leg["teacher_entropy"]}
        record["curve"].append(point)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(record, indent=2) + "\n")
        log(f"[{name}] step {step}: top1 {point['top1']:.1f} PR {point['participation_ratio']}"
            f" loss {point['loss']} cpu {point['cpu_s']} s wall {point['wall_s']} s")
    return record


def read_recipes(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    if args.config is not None:
        return {args.name: json.loads(args.config.read_text(encoding="utf-8"))}
    return json.loads(args.recipes.read_text(encoding="utf-8"))


def milestones_of(overrides: dict[str, Any], args: argparse.Namespace) -> list[int]:
    value = overrides.get("milestones", args.milestones)
    steps = value if isinstance(value, list) else [int(s) for s in str(value).split(",") if s]
    return sorted(set(int(s) for s in steps))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(time.strftime("%H:%M:%S"), message, flush=True)

    data_args = argparse.Namespace(
        source=args.source, workdir=args.workdir, train_scenes=args.train_scenes,
        test_scenes=args.test_scenes, bank_scenes=args.bank_scenes,
        canvas_size=args.canvas_size, seed=args.seed,
    )
    images, stores = experiment.build_data(data_args)
    finished: set[str] = set()
    while True:
        recipes = read_recipes(args)  # re-read: recipes appended while running are run too
        pending = [name for name in recipes if name not in finished]
        if not pending:
            break
        name = pending[0]
        record = run_recipe(name, recipes[name], milestones_of(recipes[name], args), args,
                            images, stores, log)
        finished.add(name)
        curve = ", ".join(f"{p['step']}:{p['top1']:.1f}" for p in record["curve"])
        log(f"[{name}] done: {curve}")


if __name__ == "__main__":
    main()
