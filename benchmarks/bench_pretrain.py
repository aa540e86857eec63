"""Pretraining speed: our ODIS step vs. our image (iBOT) step vs. a plain timm step.

    python benchmarks/bench_pretrain.py --quick                 # CPU, seconds
    python benchmarks/bench_pretrain.py --arch vit_small --batch-size 128 --compile
    python benchmarks/bench_pretrain.py --arch vit_base --batch-size 64 --data --workers 16

One run, one device, random tensors of iBOT's multi-crop shapes (2 global + L local crops):
- "odis (split attn)": `Trainer.train_step`, masked [OBJ] attention on the default path;
- "odis (dense mask)": the same with one SDPA over a (B, 1, 1+N, 1+N) mask;
- "image (iBOT)": `--objective image`, no mask (the ODIS target is >= 95 % of this);
- "plain timm": timm's ViT with an iBOT-shaped step written out here (shared head on every
  token, soft cross-entropy, AdamW, EMA), no odis code at all.
FLOPs per step are counted by `torch.utils.flop_counter.FlopCounterMode` on one step (not
estimated); TFLOP/s = FLOPs / step time; MFU = TFLOP/s / the device's dense bf16 peak
(known GPUs or `--peak-tflops`). `--data` also runs the real loader (synthetic scenes,
object-aware crops) through `odis_core.train.loop.pretrain` and reports the share of step
time spent waiting for data. A second table times attention alone (forward + backward).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import multiprocessing
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from odis_core.crops.dataset import CropBatch
from odis_core.model.heads import IBOTHead
from odis_core.model.obj_vit import resolve_arch
from odis_core.train.config import PretrainConfig
from odis_core.train.loop import Trainer

# Dense bf16 tensor-core peaks (TFLOP/s) from NVIDIA's datasheets; MFU uses them.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}

console = Console(width=None if sys.stdout.isatty() else 130)  # full tables in logs


def device_peak_tflops(device: str, override: float | None) -> float | None:
    if override is not None:
        return override
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def random_batch(config: PretrainConfig, device: str, seed: int = 0) -> CropBatch:
    """A CropBatch of iBOT's shapes with random object masks (~half the patches inside)."""
    g = torch.Generator().manual_seed(seed)
    b, grid_g, grid_l = config.batch_size, config.global_size // config.patch_size, None
    grid_l = config.local_size // config.patch_size
    n_g, n_l = grid_g * grid_g, grid_l * grid_l

    def object_masks(rows: int, n: int) -> torch.Tensor:
        masks = torch.rand(rows, n, generator=g) > 0.5
        masks[:, 0] = True
        return masks

    locals_ = config.n_local_crops
    return CropBatch(
        global_crops=torch.randn(2 * b, 3, config.global_size, config.global_size, generator=g),
        local_crops=torch.randn(locals_ * b, 3, config.local_size, config.local_size, generator=g)
        if locals_
        else None,
        global_patch_masks=object_masks(2 * b, n_g),
        local_patch_masks=object_masks(locals_ * b, n_l) if locals_ else None,
        mim_masks=torch.rand(2 * b, n_g, generator=g) > 0.7,
        indices=torch.arange(b),
        n_skipped=0,
        n_whole_image_fallback=0,
        n_crop_failures=0,
    ).to(device)


def trainer_step(config: PretrainConfig, device: str, steps: int) -> Callable[[], None]:
    trainer = Trainer(config.resolved(), iters_per_epoch=steps + 100, device=device)
    batch = random_batch(config, device)
    return lambda: trainer.train_step(batch)


def plain_timm_step(config: PretrainConfig, device: str) -> Callable[[], None]:
    """timm ViT, iBOT-shaped: student on all crops, teacher on the globals, one shared head
    on every token, soft cross-entropy, per-step AdamW and EMA, bf16 autocast on GPU."""
    import timm

    kwargs = dict(
        num_classes=0,
        img_size=config.global_size,
        patch_size=config.patch_size,
        dynamic_img_size=True,
        drop_path_rate=config.drop_path,
    )
    if config.depth is not None:
        kwargs["depth"] = config.depth
    student = timm.create_model(resolve_arch(config.arch), **kwargs).to(device)
    teacher = timm.create_model(resolve_arch(config.arch), **{**kwargs, "drop_path_rate": 0.0})
    teacher = teacher.to(device).eval().requires_grad_(False)
    head = IBOTHead(
        student.embed_dim, config.out_dim, config.head_hidden_dim, config.head_bottleneck_dim
    ).to(device)
    teacher_head = (
        IBOTHead(
            student.embed_dim, config.out_dim, config.head_hidden_dim, config.head_bottleneck_dim
        )
        .to(device)
        .requires_grad_(False)
    )
    params = list(student.parameters()) + list(head.parameters())
    ema_pairs = list(
        zip(list(teacher.parameters()) + list(teacher_head.parameters()), params, strict=True)
    )
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch = random_batch(config, device)
    use_bf16 = device.startswith("cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            with torch.no_grad():
                target = F.softmax(teacher_head(teacher.forward_features(batch.global_crops)), -1)
            logits = head(student.forward_features(batch.global_crops))
            loss = -(target * F.log_softmax(logits.float() / 0.1, -1)).sum(-1).mean()
            if batch.local_crops is not None:
                local_cls = head(student.forward_features(batch.local_crops)[:, 0])
                cls_target = target[:, 0].repeat(config.n_local_crops // 2 + 1, 1)
                cls_target = cls_target[: len(local_cls)]
                local_log_probs = F.log_softmax(local_cls.float() / 0.1, -1)
                loss = loss - (cls_target * local_log_probs).sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            teachers, students = zip(*ema_pairs, strict=True)
            torch._foreach_mul_(teachers, 0.996)
            torch._foreach_add_(teachers, students, alpha=0.004)
        loss.item()

    return step


VARIANTS = ("odis (split attn)", "odis (dense mask)", "image (iBOT)", "plain timm")


def variant_step(
    name: str, config: PretrainConfig, device: str, steps: int
) -> Callable[[], None]:
    """One training step of a VARIANTS entry on random batches; `config.compile` compiles
    it (the Trainer's student and teacher, or the whole plain timm step)."""
    if name == "odis (split attn)":
        return trainer_step(dataclasses.replace(config, attention_impl="split"), device, steps)
    if name == "odis (dense mask)":
        return trainer_step(dataclasses.replace(config, attention_impl="dense"), device, steps)
    if name == "image (iBOT)":
        return trainer_step(dataclasses.replace(config, objective="image"), device, steps)
    if name == "plain timm":
        step = plain_timm_step(config, device)
        return torch.compile(step) if config.compile else step
    raise ValueError(f"unknown variant {name!r}: one of {', '.join(VARIANTS)}")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_step(
    step: Callable[[], None], device: str, warmup: int, steps: int, flops: int | None = None
) -> dict:
    """Step time, FLOPs, peak memory and TFLOP/s of `step` after `warmup` untimed calls.

    FLOPs are counted on one more call unless given (a compiled step does the eager step's
    arithmetic: pass the eager count instead of tracing the compiled graph)."""
    for _ in range(warmup):
        step()
    if flops is None:
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - started) / steps
    if device.startswith("cuda"):
        peak_memory = torch.cuda.max_memory_allocated() / 2**30
    else:  # CPU: the process's peak resident set so far (grows monotonically)
        peak_memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {
        "step_ms": 1000 * seconds,
        "flops": flops,
        "peak_gib": peak_memory,
        "tflops": flops / seconds / 1e12,
    }


def attention_timings(
    config: PretrainConfig, device: str, batch: int, steps: int, rounds: int = 1
) -> tuple[list, tuple]:
    """Forward + backward of attention alone at the model's global-crop shape; the median
    over `rounds` interleaved rounds of all kernels."""
    from odis_core.model.obj_attention import (
        obj_attention_mask,
        obj_row_attention,
        obj_row_mask,
    )
    from odis_core.model.obj_vit import ObjViT

    probe = ObjViT(
        config.arch,
        img_size=config.global_size,
        patch_size=config.patch_size,
        depth=1,
        drop_path_rate=0.0,
    )
    heads = probe.vit.blocks[0].attn.num_heads
    head_dim = probe.vit.blocks[0].attn.head_dim
    n = (config.global_size // config.patch_size) ** 2
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    q, k, v = (
        torch.randn(batch, heads, 1 + n, head_dim, device=device, dtype=dtype, requires_grad=True)
        for _ in range(3)
    )
    obj_mask = torch.rand(batch, n, device=device) > 0.5
    dense_mask, row_mask = obj_attention_mask(obj_mask), obj_row_mask(obj_mask)

    def unmasked():
        return F.scaled_dot_product_attention(q, k, v)

    def dense():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask)

    def split_sdpa_row():
        rows = F.scaled_dot_product_attention(q, k, v)
        obj = F.scaled_dot_product_attention(q[:, :, :1], k, v, attn_mask=row_mask)
        return torch.cat([obj.transpose(1, 2), rows.transpose(1, 2)[:, 1:]], dim=1)

    def reshaped(fn):  # every variant ends in the (B, T, H, d) layout timm reshapes from
        return lambda: fn().transpose(1, 2).contiguous()

    def split():  # the default path of odis_core.model.obj_attention
        rows = F.scaled_dot_product_attention(q, k, v)
        obj = obj_row_attention(q[:, :, :1], k, v, row_mask, head_dim**-0.5)
        return torch.cat([obj.transpose(1, 2), rows.transpose(1, 2)[:, 1:]], dim=1)

    kernels = (
        ("unmasked SDPA", reshaped(unmasked)),
        ("dense (B,1,N,N) mask", reshaped(dense)),
        ("split, [OBJ] row by a 2nd SDPA", split_sdpa_row),
        ("split, [OBJ] row written out (odis)", split),
    )
    grad = torch.randn(batch, 1 + n, heads, head_dim, device=device, dtype=dtype)  # (B, T, H, d)
    timings: dict[str, list[float]] = {name: [] for name, _ in kernels}
    for _ in range(rounds):
        for name, fn in kernels:
            for _ in range(3):
                fn().backward(grad)
            sync(device)
            started = time.perf_counter()
            for _ in range(steps):
                fn().backward(grad)
            sync(device)
            timings[name].append(1000 * (time.perf_counter() - started) / steps)
    results = [(name, sorted(ms)[len(ms) // 2]) for name, ms in timings.items()]
    return [(name, ms, ms / results[0][1]) for name, ms in results], (batch, heads, 1 + n, head_dim)


def data_pipeline(
    config: PretrainConfig, device: str, steps: int, workers: int, loader_only: bool = False
) -> dict:
    """The real pipeline on synthetic scenes: images/s and the share of time waiting for data
    (skipped with `loader_only`), and the loader's own throughput."""
    from odis_core.train.loop import RunFinished, pretrain

    with tempfile.TemporaryDirectory() as tmp:
        n_images = config.batch_size * (steps + 2)
        store, images_root = scene_store(
            Path(tmp), n_images, max(config.global_size, 64) * 2, processes=max(1, workers)
        )
        run_config = dataclasses.replace(
            config,
            device=device,
            workers=workers,
            max_steps=steps,
            epochs=1,
            warmup_epochs=0,
            tensorboard=False,
        )
        report: dict = {
            "images_per_second": float("nan"),
            "data_wait_share": float("nan"),
            "crop_fallbacks": "n/a",
            "steps": 0,
        }
        run = (
            ()
            if loader_only
            else pretrain(run_config, images_root, store, Path(tmp) / "run")
        )
        for event in run:
            if isinstance(event, RunFinished):
                report = dict(event.report)
        loader = loader_throughput(run_config, images_root, store, workers, device)
        report["loader_only_images_per_second"] = loader["loader_images_per_second"]
        report["render_images_per_second"] = loader.get("render_images_per_second", float("nan"))
        return report


def _scene_part(out: Path, part: int, n_images: int, image_size: int) -> Path:
    from odis_core.scenes.synthetic import SceneConfig, generate_split

    config = SceneConfig(image_size=image_size)
    return generate_split(out, f"part{part}", n_images, seed=part, config=config).annotations


def scene_store(root: Path, n_images: int, image_size: int, processes: int = 1):
    """(mask store, images root) of `n_images` synthetic scenes under `root`, rendered by
    `processes` processes (one scene takes ~0.1 s at 448 px: a few thousand would keep a
    single core busy for minutes). Part k is split "part<k>" of seed k; one COCO file
    names every image relative to `root / "scenes"`."""
    from concurrent.futures import ProcessPoolExecutor

    from odis_core.masks.coco import import_coco

    scenes = root / "scenes"
    processes = max(1, min(processes, n_images))
    sizes = [n_images // processes + (k < n_images % processes) for k in range(processes)]
    jobs = [(scenes, k, n, image_size) for k, n in enumerate(sizes)]
    if processes == 1:
        annotations = [_scene_part(*jobs[0])]
    else:  # fork: the children only run numpy and PIL, never the parent's CUDA context
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(processes, mp_context=context) as pool:
            annotations = list(pool.map(_scene_part, *zip(*jobs, strict=True)))
    merged: dict = {"images": [], "annotations": []}
    for part, path in enumerate(annotations):
        coco = json.loads(path.read_text())
        offset = part * 10_000_000  # ids unique across parts
        for image in coco["images"]:
            folder = path.parent.relative_to(scenes) / "images"
            merged["images"].append(
                {**image, "id": image["id"] + offset, "file_name": f"{folder}/{image['file_name']}"}
            )
        for annotation in coco["annotations"]:
            merged["annotations"].append(
                {**annotation, "id": annotation["id"] + offset,
                 "image_id": annotation["image_id"] + offset}
            )  # fmt: skip
        merged["categories"] = coco["categories"]
        merged["info"] = coco.get("info", {})
    (root / "scenes.json").write_text(json.dumps(merged))
    store, _ = import_coco(root / "scenes.json", root / "masks", images_root=scenes)
    return store, scenes


def loader_throughput(
    config: PretrainConfig,
    images_root: Path,
    store,
    workers: int,
    device: str = "cpu",
    max_images: int | None = None,
) -> dict:
    """What the CPU side can feed with `workers` processes, no model: images/s of the loader
    (decode, object-aware crops, MIM masks, collate; with `augment_on="loader"` also the PIL
    resize and photometric ops), and with `augment_on="device"` the images/s of rendering
    those batches' views on `device` (roi_align + batched photometric), timed apart."""
    from torch.utils.data import DataLoader

    from odis_core.crops.dataset import collate_crops
    from odis_core.train.loop import make_dataset

    dataset = make_dataset(config.resolved(), store, images_root)
    loader = DataLoader(
        dataset, batch_size=config.batch_size, num_workers=workers, collate_fn=collate_crops
    )
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    started, images, batches = time.perf_counter(), 0, []
    for batch in iterator:
        images += len(batch)
        if batch.pending is not None and len(batches) < 5:
            batches.append(batch)
        if max_images is not None and images >= max_images:
            break
    seconds = time.perf_counter() - started
    result = {
        "loader_images_per_second": images / seconds if seconds > 0 and images else float("nan")
    }
    if batches:
        moved = [batch.to(device) for batch in batches]
        moved[0].rendered(config.global_size, config.local_size)  # warm-up (kernels, caches)
        sync(device)
        started = time.perf_counter()
        for batch in moved:
            batch.rendered(config.global_size, config.local_size)
        sync(device)
        seconds = time.perf_counter() - started
        result["render_images_per_second"] = sum(map(len, moved)) / seconds
    return result


# ------------------------------------------------------------------------------------------
# ODIS vs image objective on multi-object scenes (issue 14, part 5): where the ODIS loader
# spends its time per sample, and the whole-run img/s ratio at equal workers.
# `--objective-ratio`; everything it needs lives in this section.


def ratio_scene_store(
    root: Path, n_images: int, size: int, objects: tuple[int, int], image_format: str
) -> tuple[Path, object]:
    """Synthetic scenes of `size` px with objects[0]..objects[1] objects each, written as
    `image_format` (png or jpeg, quality 90) and imported as a mask store of COCO RLEs.
    Reused when `root` already holds the same set (a marker file names its settings)."""
    from PIL import Image

    from odis_core.masks.coco import import_coco
    from odis_core.masks.store import MaskStore
    from odis_core.scenes.synthetic import SceneConfig, generate_scenes

    settings = {"n": n_images, "size": size, "objects": list(objects), "format": image_format}
    marker = root / "scene_set.json"
    images_dir, masks = root / "scenes" / "train" / "images", root / "masks"
    if marker.exists() and json.loads(marker.read_text()) == settings:
        return images_dir, MaskStore.open(masks)
    scene_config = SceneConfig(image_size=size, min_objects=objects[0], max_objects=objects[1])
    split = generate_scenes(root / "scenes", n_images, 0, seed=0, config=scene_config)["train"]
    if image_format == "jpeg":  # re-encode and point the COCO file at the JPEGs
        coco = json.loads(split.annotations.read_text())
        for image in coco["images"]:
            png = split.images_dir / image["file_name"]
            jpeg = png.with_suffix(".jpg")
            Image.open(png).convert("RGB").save(jpeg, format="JPEG", quality=90)
            png.unlink()
            image["file_name"] = jpeg.name
        split.annotations.write_text(json.dumps(coco))
    store, _ = import_coco(split.annotations, masks, images_root=split.images_dir)
    marker.write_text(json.dumps(settings))
    return split.images_dir, store


def loader_stage_costs(config: PretrainConfig, images_root: Path, store, n_samples: int) -> dict:
    """CPU milliseconds per sample and stage (`StageClock`), in this process, over the first
    `n_samples` images; plus the crops among them that fell back to the best try."""
    from odis_core.crops.stage_clock import StageClock
    from odis_core.train.loop import make_dataset

    dataset = make_dataset(config.resolved(), store, images_root)
    # CPU time of this thread, with one torch thread as in a loader worker: on a shared
    # machine other processes stretch wall time, much less the CPU time a sample needs.
    dataset.clock = StageClock(timer=time.thread_time)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    crops = fallbacks = 0
    try:
        dataset[0]  # first-call costs (imports, caches) are not per-sample costs
        dataset.clock = StageClock(timer=time.thread_time)
        started = time.thread_time()
        for index in range(min(n_samples, len(dataset))):
            sample = dataset[index]
            if sample is not None:
                fallbacks += sample.crop_failures
                crops += len(sample.global_patch_masks) + len(sample.local_patch_masks)
        total_ms = 1000 * (time.thread_time() - started) / max(dataset.clock.samples, 1)
    finally:
        torch.set_num_threads(threads)
    return {
        "stages_ms": dataset.clock.per_sample_ms(),
        "sample_ms": total_ms,
        "crop_fallbacks": fallbacks,
        "crops": crops,
    }


def whole_run_images_per_second(
    config: PretrainConfig, images_root: Path, store, out_dir: Path
) -> dict:
    """`odis_core.train.loop.pretrain` for `config.max_steps` steps: its report's img/s
    (wall time of the whole run: worker start-up, steps, checkpoint) and crop fallbacks."""
    from odis_core.train.loop import RunFinished, pretrain

    report: dict = {}
    for event in pretrain(config, images_root, store, out_dir):
        if isinstance(event, RunFinished):
            report = dict(event.report)
    return {
        "images_per_second": report.get("images_per_second", float("nan")),
        "crop_fallbacks": report.get("crop_fallbacks"),
        "data_wait_share": report.get("data_wait_share"),
    }


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def objective_ratio(args: argparse.Namespace, config: PretrainConfig) -> dict:
    """ODIS vs image, interleaved (odis, image, odis, image, ...) for `args.rounds` rounds:
    loader-only img/s with `args.workers` workers, optionally whole `pretrain` runs of
    `args.full_steps` steps, and the per-stage loader cost per sample; medians and ratios."""
    if args.recipe == "demo":
        from odis_core.demo import DemoSettings

        config = dataclasses.replace(DemoSettings().pretrain, device=args.device)
    config = dataclasses.replace(
        config, workers=args.workers, tensorboard=False, augment_on=args.augment_on
    )
    if config.augment_on == "auto":
        config = dataclasses.replace(
            config, augment_on="device" if args.device.startswith("cuda") else "loader"
        )
    objects = (args.min_objects, args.max_objects)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.scenes_dir or Path(tmp) / "scene_set"
        root.mkdir(parents=True, exist_ok=True)
        images_root, store = ratio_scene_store(
            root, args.n_scenes, args.scene_size, objects, args.scene_format
        )
        rounds: dict[str, list[dict]] = {"odis": [], "image": []}
        for round_index in range(args.rounds):
            for objective in rounds:
                run_config = dataclasses.replace(config, objective=objective)
                figures: dict = {}
                loader = loader_throughput(
                    run_config.resolved(),
                    images_root,
                    store,
                    args.workers,
                    args.device,
                    max_images=args.loader_images,
                )
                figures["loader_images_per_second"] = loader["loader_images_per_second"]
                if args.full_steps:
                    full_config = dataclasses.replace(
                        run_config, max_steps=args.full_steps, epochs=max(config.epochs, 1)
                    )
                    out_dir = Path(tmp) / f"run_{objective}_{round_index}"
                    figures["whole_run"] = whole_run_images_per_second(
                        full_config, images_root, store, out_dir
                    )
                figures["stages"] = loader_stage_costs(
                    run_config, images_root, store, args.profile_samples
                )
                rounds[objective].append(figures)
    summary: dict = {"config": config.to_dict(), "rounds": rounds, "median": {}}
    for objective, measured in rounds.items():
        stage_names = measured[0]["stages"]["stages_ms"]
        summary["median"][objective] = {
            "loader_images_per_second": median([m["loader_images_per_second"] for m in measured]),
            "sample_ms": median([m["stages"]["sample_ms"] for m in measured]),
            "stages_ms": {
                name: median([m["stages"]["stages_ms"][name] for m in measured])
                for name in stage_names
            },
            "crop_fallbacks": measured[0]["stages"]["crop_fallbacks"],
            "crops": measured[0]["stages"]["crops"],
        }
        if args.full_steps:
            summary["median"][objective]["whole_run_images_per_second"] = median(
                [m["whole_run"]["images_per_second"] for m in measured]
            )
            summary["median"][objective]["whole_run_crop_fallbacks"] = measured[0]["whole_run"][
                "crop_fallbacks"
            ]
    odis, image = summary["median"]["odis"], summary["median"]["image"]
    summary["ratio"] = {
        "loader": odis["loader_images_per_second"] / image["loader_images_per_second"],
        "sample_cost": image["sample_ms"] / odis["sample_ms"],
    }
    if args.full_steps:
        summary["ratio"]["whole_run"] = (
            odis["whole_run_images_per_second"] / image["whole_run_images_per_second"]
        )
    return summary


def print_objective_ratio(args: argparse.Namespace, summary: dict) -> None:
    odis, image = summary["median"]["odis"], summary["median"]["image"]
    config = summary["config"]
    stages = Table(
        title=f"loader CPU ms per sample (1 thread, first {args.profile_samples} images, "
        f"median of {args.rounds} interleaved rounds): {args.n_scenes} {args.scene_size}-px "
        f"{args.scene_format.upper()} scenes, {args.min_objects}-{args.max_objects} objects, "
        f"2x{config['global_size']} + {config['n_local_crops']}x{config['local_size']} crops, "
        f"augment on {config['augment_on']}"
    )
    for column in ("stage", "odis ms", "image ms", "odis - image ms"):
        stages.add_column(column, justify="left" if column == "stage" else "right")
    for name in odis["stages_ms"]:
        a, b = odis["stages_ms"][name], image["stages_ms"][name]
        stages.add_row(name, f"{a:.3f}", f"{b:.3f}", f"{a - b:+.3f}")
    stages.add_row(
        "whole sample",
        f"{odis['sample_ms']:.3f}",
        f"{image['sample_ms']:.3f}",
        f"{odis['sample_ms'] - image['sample_ms']:+.3f}",
    )
    console.print(stages)
    console.print(
        f"crop fallbacks (crops kept as the best-coverage try after {config['max_crop_tries']} "
        f"failed tries), first {args.profile_samples} images: odis {odis['crop_fallbacks']} of "
        f"{odis['crops']} crops, image {image['crop_fallbacks']} (never re-drawn)",
        highlight=False,
    )
    ratios = Table(title=f"ODIS / image at {args.workers} worker(s), median of {args.rounds}")
    for column in ("figure", "odis", "image", "odis / image"):
        ratios.add_column(column, justify="left" if column == "figure" else "right")
    ratios.add_row(
        "loader-only img/s",
        f"{odis['loader_images_per_second']:.1f}",
        f"{image['loader_images_per_second']:.1f}",
        f"{summary['ratio']['loader']:.3f}",
    )
    ratios.add_row(
        "1 / (ms per sample)",
        f"{1000 / odis['sample_ms']:.1f}",
        f"{1000 / image['sample_ms']:.1f}",
        f"{summary['ratio']['sample_cost']:.3f}",
    )
    if args.full_steps:
        ratios.add_row(
            f"whole run img/s ({args.full_steps} steps)",
            f"{odis['whole_run_images_per_second']:.1f}",
            f"{image['whole_run_images_per_second']:.1f}",
            f"{summary['ratio']['whole_run']:.3f}",
        )
    console.print(ratios)


def add_objective_ratio_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ODIS vs image objective (--objective-ratio)")
    group.add_argument(
        "--objective-ratio",
        action="store_true",
        help="ODIS vs image loader cost per stage and img/s ratio on generated scenes",
    )
    group.add_argument(
        "--recipe",
        default="demo",
        choices=("demo", "args"),
        help="demo: `odis demo`'s pretraining settings; args: this command's",
    )
    group.add_argument("--n-scenes", type=int, default=2000)
    group.add_argument("--scene-size", type=int, default=224, help="scene side in px")
    group.add_argument("--scene-format", default="jpeg", choices=("jpeg", "png"))
    group.add_argument("--min-objects", type=int, default=2)
    group.add_argument("--max-objects", type=int, default=4)
    group.add_argument(
        "--scenes-dir",
        type=Path,
        default=None,
        help="keep (and reuse) the generated scenes and masks here",
    )
    group.add_argument(
        "--full-steps",
        type=int,
        default=0,
        help="also time whole `pretrain` runs of this many steps (0: loader only)",
    )
    group.add_argument(
        "--loader-images",
        type=int,
        default=None,
        help="stop the loader-only timing after this many images (default: all scenes)",
    )
    group.add_argument(
        "--profile-samples",
        type=int,
        default=200,
        help="images timed stage by stage, per objective and round",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and crops (CPU)")
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--n-local-crops", type=int, default=10)
    parser.add_argument("--out-dim", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (20; --quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (5; --quick 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile every step")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--data", action="store_true", help="also time the real data loader")
    parser.add_argument(
        "--loader-only", action="store_true", help="only the loader's throughput, no model"
    )
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument(
        "--augment-on",
        default="auto",
        choices=("auto", "loader", "device", "both"),
        help="where views are rendered for --data/--loader-only (both: one row each)",
    )
    parser.add_argument("--attn-batch", type=int, default=None, help="256; --quick 8")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--rounds", type=int, default=1, help="repeat all variants; median")
    add_objective_ratio_options(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.arch, args.depth, args.batch_size = "vit_small", 2, 4
        args.global_size, args.local_size, args.n_local_crops = 64, 32, 4
        args.out_dim, args.workers = 1024, 0
    quick_or_full = {"steps": (3, 20), "warmup": (1, 5), "attn_batch": (8, 256)}
    for name, (quick, full) in quick_or_full.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    config = PretrainConfig(
        arch=args.arch,
        depth=args.depth,
        batch_size=args.batch_size,
        global_size=args.global_size,
        local_size=args.local_size,
        n_local_crops=args.n_local_crops,
        out_dim=args.out_dim,
        warmup_epochs=0,
        epochs=1,
        compile=args.compile,
        grad_checkpointing=args.grad_checkpointing,
        device=args.device,
        min_patches_per_block=4 if args.quick else 16,
    )
    device = args.device
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = device_peak_tflops(device, args.peak_tflops)
    device_name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    images_per_step = args.batch_size

    variants = {
        name: functools.partial(variant_step, name, config, device, args.steps)
        for name in VARIANTS
    }
    if args.objective_ratio:
        summary = objective_ratio(args, config)
        print_objective_ratio(args, summary)
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        return
    if args.augment_on == "auto":  # as `odis pretrain` resolves it
        args.augment_on = "device" if device.startswith("cuda") else "loader"
    modes = ("loader", "device") if args.augment_on == "both" else (args.augment_on,)
    if args.loader_only:
        loader_table = Table(
            title=f"data loader alone, {args.workers} worker(s), batch {args.batch_size}, "
            f"2x{args.global_size} + {args.n_local_crops}x{args.local_size} crops, "
            f"{2 * max(args.global_size, 64)} px PNG scenes, views rendered on {device_name}"
        )
        for column in ("augment on", "loader img/s", "img/s per worker", "render img/s"):
            loader_table.add_column(column, justify="left" if column == "augment on" else "right")
        figures = {}
        for mode in modes:
            data = data_pipeline(
                dataclasses.replace(config, augment_on=mode),
                device,
                args.steps,
                args.workers,
                loader_only=True,
            )
            figures[mode] = data
            rate = data["loader_only_images_per_second"]
            loader_table.add_row(
                mode,
                f"{rate:.1f}",
                f"{rate / max(args.workers, 1):.1f}",
                f"{data['render_images_per_second']:.1f}",
            )
        console.print(loader_table)
        console.print(
            "render img/s: the device's time to cut, resize and augment the views of one "
            "image (n/a when the loader renders them); workers=0 loads in this process.",
            highlight=False,
        )
        if args.json:
            args.json.write_text(json.dumps({"device": device_name, "loader": figures}, indent=2))
        return

    # Rounds of all variants, median per variant: on a shared machine a slow spell then
    # hits every variant alike instead of whichever ran during it.
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, build in variants.items():
            step = build()
            runs[name].append(time_step(step, device, args.warmup, args.steps))
            del step
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    rows = {}
    for name, measured in runs.items():
        rows[name] = sorted(measured, key=lambda row: row["step_ms"])[len(measured) // 2]
        rows[name]["img_s"] = images_per_step / (rows[name]["step_ms"] / 1000)
        rows[name]["step_ms_all_rounds"] = [round(row["step_ms"], 2) for row in measured]

    table = Table(
        title=f"pretrain step, {args.arch}"
        + (f" depth {args.depth}" if args.depth else "")
        + f", batch {args.batch_size}, 2x{args.global_size} + "
        f"{args.n_local_crops}x{args.local_size}, out_dim {args.out_dim}, "
        f"{device_name}{', compiled' if args.compile else ''}, median of {args.rounds} round(s)"
    )
    for column in (
        "step",
        "img/s",
        "step ms",
        "vs image",
        "GFLOP/img",
        "TFLOP/s",
        "MFU",
        "peak mem GiB",
    ):
        table.add_column(column, justify="right" if column != "step" else "left")
    base = rows["image (iBOT)"]["img_s"]
    for name, row in rows.items():
        mfu = f"{100 * row['tflops'] / peak:.1f} %" if peak else "n/a"
        table.add_row(
            name,
            f"{row['img_s']:.1f}",
            f"{row['step_ms']:.1f}",
            f"{100 * row['img_s'] / base:.1f} %",
            f"{row['flops'] / images_per_step / 1e9:.1f}",
            f"{row['tflops']:.3f}",
            mfu,
            f"{row['peak_gib']:.2f}",
        )
    console.print(table)
    if not device.startswith("cuda"):
        console.print(
            "CPU: peak mem is the process's peak RSS so far; MFU needs a known peak "
            "(--peak-tflops)."
        )

    attention, shape = attention_timings(
        config, device, args.attn_batch, max(args.steps, 5), args.rounds
    )
    attn_table = Table(title=f"attention fwd+bwd, (B, H, N, d) = {shape}, {device_name}")
    for column in ("kernel", "ms", "vs unmasked"):
        attn_table.add_column(column, justify="left" if column == "kernel" else "right")
    for name, ms, ratio in attention:
        attn_table.add_row(name, f"{ms:.3f}", f"{ratio:.2f}x")
    console.print(attn_table)

    report = {
        "device": device_name,
        "args": vars(args) | {"json": str(args.json)},
        "steps": rows,
        "attention": attention,
    }
    if args.data:
        data_table = Table(title=f"real data pipeline, {args.workers} workers, {device_name}")
        for column in (
            "augment on",
            "img/s",
            "data wait share",
            "loader alone img/s",
            "render img/s",
            "crop fallbacks",
            "steps",
        ):
            data_table.add_column(column, justify="left" if column == "augment on" else "right")
        report["data"] = {}
        for mode in modes:
            data = data_pipeline(
                dataclasses.replace(config, augment_on=mode), device, args.steps, args.workers
            )
            report["data"][mode] = data
            data_table.add_row(
                mode,
                f"{data['images_per_second']:.1f}",
                f"{100 * data['data_wait_share']:.1f} %",
                f"{data['loader_only_images_per_second']:.1f}",
                f"{data['render_images_per_second']:.1f}",
                str(data["crop_fallbacks"]),
                str(data["steps"]),
            )
        console.print(data_table)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
