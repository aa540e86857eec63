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
from odis_core.evaluate.search import l2_normalize
from odis_core.masks.store import MaskStore
from odis_core.train.checkpoint import CHECKPOINT_NAME
from odis_core.train.config import PretrainConfig
from odis_core.train.loop import StepDone, pretrain
from odis_core.train.monitor import participation_ratio

K = 20
TEMPERATURE = 0.07
# Arm -> PretrainConfig overrides on top of the recipe. The paper's comparison (spec §8,
# issue 17), then issue 19's: read-out [OBJ] tokens with the target only, and with every
# object of the image (one [OBJ] token and its own loss terms each).
ARMS: dict[str, dict[str, Any]] = {
    "odis": {},
    "ibot": {"objective": "image"},
    "no_masked_attention": {"masked_attention": False},
    "no_object_crops": {"object_crops": False},
    "meanpool": {"feature": "meanpool"},
    "readout_k1": {"obj_readout": True},
    "readout_all": {"obj_readout": True, "objects_per_image": 0},
}
# The arms of issue 17's results JSON ("arms", "missing_arms"); the others go under
# "readout_arms" when they have run.
ISSUE17_ARMS = ("odis", "ibot", "no_masked_attention", "no_object_crops", "meanpool")


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
    parser.add_argument("--arms", default="odis",
                        help="with --config: comma-separated arms of " + ", ".join(ARMS)
                        + "; each runs as NAME@ARM")
    parser.add_argument("--report", action="store_true",
                        help="only write WORKDIR/curves.md and curves.png from the curves")
    parser.add_argument("--results-json", type=Path,
                        help="with --config and --report: also write the issue's results JSON")
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
    if (args.recipes is None) == (args.config is None) and not args.report:
        parser.error("give exactly one of --recipes or --config")
    if args.config is not None and not args.name:
        args.name = args.config.stem
    if args.tiny:
        args.train_scenes, args.test_scenes, args.bank_scenes, args.canvas_size = 12, 6, 8, 32
    return args


def build_data(args: argparse.Namespace) -> tuple[dict[str, Path], dict[str, MaskStore]]:
    """Scenes and mask stores of the train, test and bank splits (the issue-7 experiment's
    builder, with this sweep's sizes)."""
    return experiment.build_data(argparse.Namespace(
        source=args.source, workdir=args.workdir, train_scenes=args.train_scenes,
        test_scenes=args.test_scenes, bank_scenes=args.bank_scenes,
        canvas_size=args.canvas_size, seed=args.seed,
    ))


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
        save_every=25,  # a stopped sweep loses at most 25 steps
    )
    return tiny(config) if args.tiny else config


def tiny(config: PretrainConfig) -> PretrainConfig:
    """--tiny: a one-block network at batch 4 (whatever the recipe says: a shipped recipe's
    batch of 32 would not fit the 12 tiny scenes)."""
    return dataclasses.replace(
        config, depth=1, out_dim=64, head_hidden_dim=64, head_bottleneck_dim=32,
        n_local_crops=2, min_patches_per_block=1, batch_size=4,
    )


def arm_config(args: argparse.Namespace, overrides: dict[str, Any], source: str) -> PretrainConfig:
    """The resolved configuration a recipe (with its arm's overrides) runs with here."""
    config = recipe_config(base_recipe(args), overrides, source)
    return (tiny(config) if args.tiny else config).resolved()


def recipe_config(base: PretrainConfig, overrides: dict[str, Any], source: str) -> PretrainConfig:
    """`base` with the recipe's PretrainConfig keys applied (keys starting with "_" are
    comments; "milestones" belongs to the sweep)."""
    values = {k: v for k, v in overrides.items() if not k.startswith("_") and k != "milestones"}
    loaded = PretrainConfig.from_dict(values, source=source)
    return dataclasses.replace(base, **{key: getattr(loaded, key) for key in values})


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
            "participation_ratio": round(participation_ratio(l2_normalize(test.features)), 3)}


def train_to(config: PretrainConfig, step: int, images: Path, store: MaskStore,
             run_dir: Path) -> dict[str, Any]:
    """Pretrain (or resume) until `step`; CPU seconds and wall seconds of this leg."""
    resume = (run_dir / CHECKPOINT_NAME).is_file()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    losses: list[float] = []
    entropies: list[float] = []
    pairs: list[float] = []  # [OBJ] loss terms per step (issue 19: several objects per image)
    for event in pretrain(dataclasses.replace(config, max_steps=step), images, store,
                          run_dir, resume=resume):
        if isinstance(event, StepDone):
            losses.append(float(event.metrics["loss"]))
            entropies.append(float(event.metrics["teacher_entropy"]))
            pairs.append(float(event.metrics["object_pairs"]))
    return {"cpu_s": time.process_time() - cpu0, "wall_s": time.perf_counter() - wall0,
            "loss_last": float(np.mean(losses[-20:])) if losses else None,
            "teacher_entropy": float(np.mean(entropies[-20:])) if entropies else None,
            "object_pairs": round(float(np.mean(pairs)), 2) if pairs else None}


def run_recipe(name: str, overrides: dict[str, Any], milestones: list[int],
               args: argparse.Namespace, images: dict[str, Path],
               stores: dict[str, MaskStore], log: Any) -> dict[str, Any]:
    config = arm_config(args, overrides, source=name)
    settings = json.loads(json.dumps(config.to_dict()))
    settings.pop("max_steps", None)
    path = args.workdir / "curves" / f"{name}.json"
    run_dir = args.workdir / "runs" / name
    record: dict[str, Any] = {"name": name, "overrides": overrides, "settings": settings,
                              "curve": [], "cpu_s": 0.0, "wall_s": 0.0}
    if path.is_file():
        saved = json.loads(path.read_text())
        if same_recipe(saved["settings"], settings):  # keys added since: their defaults
            record = {**saved, "settings": settings}
        else:  # the recipe changed under this name: start it over
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)
    done = {point["step"] for point in record["curve"]}
    for step in milestones:
        if step in done:
            continue
        if step == 0:
            backbone = build_backbone(config)
            leg = {"cpu_s": 0.0, "wall_s": 0.0, "loss_last": None, "teacher_entropy": None,
                   "object_pairs": None}
        else:
            leg = train_to(config, step, images["train"], stores["train"], run_dir)
            backbone, _ = load_teacher_backbone(run_dir)
            record["cpu_s"] += leg["cpu_s"]
            record["wall_s"] += leg["wall_s"]
        point = {"step": step, **evaluate(backbone, config.global_size, images, stores),
                 "cpu_s": round(record["cpu_s"], 1), "wall_s": round(record["wall_s"], 1),
                 "loss": leg["loss_last"], "teacher_entropy": leg["teacher_entropy"],
                 "object_pairs": leg["object_pairs"]}  # mean per step over the leg
        record["curve"].append(point)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(record, indent=2) + "\n")
        log(f"[{name}] step {step}: top1 {point['top1']:.1f} PR {point['participation_ratio']}"
            f" loss {point['loss']} cpu {point['cpu_s']} s wall {point['wall_s']} s")
    return record


def read_recipes(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    if args.config is None:
        return json.loads(args.recipes.read_text(encoding="utf-8"))
    recipe = json.loads(args.config.read_text(encoding="utf-8"))
    arms = [arm for arm in args.arms.split(",") if arm]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"--arms: unknown arm(s) {', '.join(unknown)}")
    return {f"{args.name}@{arm}": {**recipe, **ARMS[arm]} for arm in arms}


def milestones_of(overrides: dict[str, Any], args: argparse.Namespace) -> list[int]:
    value = overrides.get("milestones", args.milestones)
    steps = value if isinstance(value, list) else [int(s) for s in str(value).split(",") if s]
    return sorted(set(int(s) for s in steps))


def standard_error(top1: float, n_test: int) -> float:
    return experiment.standard_error(top1, n_test)


def load_curves(workdir: Path) -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in sorted((workdir / "curves").glob("*.json"))]


def write_report(args: argparse.Namespace) -> None:
    """WORKDIR/curves.md (one row per recipe: start, best, end, CPU seconds; every point)
    and curves.png (top-1 and participation ratio against steps for the recipes, with the
    untrained and raw-pixel lines; a --config recipe's arms go to arms.png)."""
    records = load_curves(args.workdir)
    raw_path = args.workdir / "raw_pixels.json"
    raw = json.loads(raw_path.read_text()) if raw_path.is_file() else None
    lines = ["| recipe | overrides | step 0 | best (step) | last (step) | PR 0 -> last "
             "| CPU s | wall s |", "|---|---|---:|---:|---:|---|---:|---:|"]
    for record in records:
        curve = record["curve"]
        if not curve:
            continue
        first, last = curve[0], curve[-1]
        best = max(curve, key=lambda p: p["top1"])
        shown = {k: v for k, v in record["overrides"].items()
                 if not k.startswith("_") and k != "milestones"}
        lines.append(
            f"| {record['name']} | `{json.dumps(shown)}` | {first['top1']:.1f} | "
            f"{best['top1']:.1f} ({best['step']}) | {last['top1']:.1f} ± "
            f"{standard_error(last['top1'], last['n_test']):.1f} ({last['step']}) | "
            f"{first['participation_ratio']:.2f} -> {last['participation_ratio']:.2f} | "
            f"{last['cpu_s']:.0f} | {last['wall_s']:.0f} |")
    points = ["", "Every point (step: top-1 / participation ratio):", ""]
    for record in records:
        points.append(f"- {record['name']}: " + ", ".join(
            f"{p['step']}: {p['top1']:.1f} / {p['participation_ratio']:.2f}"
            for p in record["curve"]))
    pairs = [(record["name"], [(p["step"], p["object_pairs"]) for p in record["curve"]
                               if p.get("object_pairs") is not None]) for record in records]
    if any(points_with for _, points_with in pairs):
        points += ["", "[OBJ] loss terms per step, mean over the steps since the previous point "
                   "(object, teacher view, student view):", ""]
        points += [f"- {name}: " + ", ".join(f"{step}: {value:.1f}" for step, value in values)
                   for name, values in pairs if values]
    footer = [""]
    if raw is not None:
        footer.append(f"Raw pixels ({raw['feature']}, k = {raw['k']}): "
                      f"{raw['top1']:.1f} % top-1.")
    (args.workdir / "curves.md").write_text("\n".join(lines + points + footer) + "\n")
    plot_curves(records, raw, args.workdir / "curves.png")
    if args.config is not None:
        plot_arms(matched_arms(args, records), raw, args.workdir / "arms.png")
        if args.results_json is not None:
            write_results_json(args, records, raw)


def plot_curves(records: list[dict[str, Any]], raw: dict[str, Any] | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (axes, rank_axes) = plt.subplots(1, 2, figsize=(12, 5))
    # More recipes than the default ten colours: one colour per recipe.
    colours = plt.get_cmap("tab20").colors
    for each in (axes, rank_axes):
        each.set_prop_cycle(color=colours)
    untrained = None
    for record in records:
        curve = record["curve"]
        if len(curve) < 2 or "@" in record["name"]:  # arms (NAME@ARM) go to arms.png
            continue
        steps = [p["step"] for p in curve]
        axes.plot(steps, [p["top1"] for p in curve], marker="o", markersize=3,
                  label=record["name"])
        rank_axes.plot(steps, [p["participation_ratio"] for p in curve], marker="o",
                       markersize=3)
        untrained = untrained if untrained is not None else curve[0]["top1"]
    rank_axes.set_xlabel("optimizer steps (batch 32)")
    rank_axes.set_ylabel("participation ratio of the test features")
    if untrained is not None:
        axes.axhline(untrained, color="grey", linestyle="--", linewidth=1, label="untrained")
    if raw is not None:
        axes.axhline(raw["top1"], color="black", linestyle=":", linewidth=1, label="raw pixels")
    axes.set_xlabel("optimizer steps (batch 32)")
    axes.set_ylabel(f"masked {K}-NN top-1 (%)")
    axes.set_title("Fashion-MNIST scenes: teacher k-NN during pretraining", fontsize=10)
    rank_axes.set_title("how many dimensions the features use", fontsize=10)
    figure.legend(fontsize=7, loc="lower center", ncol=4)
    figure.tight_layout(rect=(0, 0.18, 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_arms(matched: dict[str, dict[str, Any]], raw: dict[str, Any] | None,
              path: Path) -> None:
    """The --config recipe's arms on one figure: k-NN against the step (equal steps) and
    against the training process's CPU seconds (equal compute: what a step of each arm
    costs), with the untrained and raw-pixel lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_step, by_cpu) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for arm, record in matched.items():
        curve = record["curve"]
        top1 = [p["top1"] for p in curve]
        by_step.plot([p["step"] for p in curve], top1, marker="o", markersize=3, label=arm)
        by_cpu.plot([p["cpu_s"] for p in curve], top1, marker="o", markersize=3)
    if matched:
        untrained = next(iter(matched.values()))["curve"][0]["top1"]
        for axes in (by_step, by_cpu):
            axes.axhline(untrained, color="grey", linestyle="--", linewidth=1)
            if raw is not None:
                axes.axhline(raw["top1"], color="black", linestyle=":", linewidth=1)
    by_step.plot([], [], color="grey", linestyle="--", label="untrained")
    if raw is not None:
        by_step.plot([], [], color="black", linestyle=":", label="raw pixels")
    by_step.set_xlabel("optimizer steps (batch 32)")
    by_cpu.set_xlabel("CPU seconds of the training process")
    by_step.set_ylabel(f"masked {K}-NN top-1 (%)")
    by_step.set_title("equal steps", fontsize=10)
    by_cpu.set_title("equal compute", fontsize=10)
    figure.legend(fontsize=7, loc="lower center", ncol=5)
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def same_recipe(ran: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether a run's recorded settings are `wanted`: a run recorded before a
    `PretrainConfig` key existed ran with that key's default (so a run recorded before
    `obj_readout` is the paper's model, never a read-out arm)."""
    defaults = json.loads(json.dumps(PretrainConfig().to_dict()))
    return all(
        ran[key] == value if key in ran else defaults.get(key) == value
        for key, value in wanted.items()
    )


def matched_arms(args: argparse.Namespace,
                 records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Arm -> the curve record that ran the --config recipe with that arm's overrides (a
    curve counts when its run's settings match, whatever name the sweep ran it under; the
    run named NAME@ARM first, then the longest curve)."""
    recipe = json.loads(args.config.read_text(encoding="utf-8"))
    matched = {}
    for arm, overrides in ARMS.items():
        wanted = arm_config(args, {**recipe, **overrides}, "recipe")
        settings = json.loads(json.dumps(wanted.to_dict()))
        settings.pop("max_steps", None)
        matches = [r for r in records if r["curve"] and same_recipe(r["settings"], settings)]
        matches.sort(key=lambda r: (r["name"] != f"{args.name}@{arm}", -len(r["curve"])))
        if matches:
            matched[arm] = matches[0]
    return matched


def write_results_json(args: argparse.Namespace, records: list[dict[str, Any]],
                       raw: dict[str, Any] | None) -> None:
    """The issue's machine-readable outcome: one curve per arm of the --config recipe."""
    arms, readout_arms = {}, {}
    for arm, record in matched_arms(args, records).items():
        (arms if arm in ISSUE17_ARMS else readout_arms)[arm] = {
            "run": record["name"],
            "curve": [[p["step"], round(p["top1"], 2)] for p in record["curve"]],
            "participation_ratio": [[p["step"], p["participation_ratio"]]
                                    for p in record["curve"]],
            "cpu_s": round(record["cpu_s"], 1), "wall_s": round(record["wall_s"], 1),
        }
        if arm not in ISSUE17_ARMS:
            readout_arms[arm]["object_pairs"] = [[p["step"], p.get("object_pairs")]
                                                 for p in record["curve"]]
    odis = arms.get("odis") or next(iter(arms.values()), None)
    runs = {arm["run"] for arm in arms.values()}
    first = next((r["curve"][0] for r in records if r["name"] in runs), None)
    result = {
        "recipe": str(args.config),
        "steps": odis["curve"][-1][0] if odis else 0,
        "wall_s": odis["wall_s"] if odis else None,
        "cpu_s": odis["cpu_s"] if odis else None,
        "arms": arms,
        "missing_arms": [arm for arm in ISSUE17_ARMS if arm not in arms],
        "untrained": {"top1": round(first["top1"], 2)} if first else None,
        "raw_pixels": {"top1": round(raw["top1"], 2)} if raw else None,
        "protocol": f"masked inference, weighted k-NN k = {K}, T = {TEMPERATURE}, top-1 %",
    }
    if readout_arms:  # issue 19's arms, apart: issue 17's keys stay as they were
        result["readout_arms"] = readout_arms
    args.results_json.write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.report:
        write_report(args)
        return
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(time.strftime("%H:%M:%S"), message, flush=True)

    images, stores = build_data(args)
    finished: set[tuple[str, tuple[int, ...]]] = set()
    while True:
        # Re-read: recipes appended (or milestones extended) while running are run too.
        recipes = read_recipes(args)
        pending = [(name, tuple(milestones_of(overrides, args)))
                   for name, overrides in recipes.items()]
        pending = [item for item in pending if item not in finished]
        if not pending:
            break
        name, milestones = pending[0]
        record = run_recipe(name, recipes[name], list(milestones), args, images, stores, log)
        finished.add((name, milestones))
        curve = ", ".join(f"{p['step']}:{p['top1']:.1f}" for p in record["curve"])
        log(f"[{name}] done: {curve}")


if __name__ == "__main__":
    main()
