"""Embedding throughput: the model alone, the input pipeline alone, and `embed` end to end.

For each architecture: images/s at image level ([CLS] = unmasked [OBJ]) and objects/s at
object level (masked inference, one pass per object) with synthetic input tensors (the
model's ceiling); images/s of the decode + resize + normalise pipeline over a folder of
500 x 375 JPEGs with `--workers` processes (the input's ceiling); and both levels end to
end through `odis_core.embed.inference.embed`. The smaller ceiling is the bottleneck.
bf16 autocast on CUDA, float32 on the CPU (as `odis embed` does).

`--one-pass both` (issue 19) instead compares, in one run, a read-out model's objects/s
with one pass per object against one pass per image (all its objects as read-out [OBJ]
tokens), model alone and end to end, on the demo scenes (2-5 objects per image) and on a
store of `--masks-per-image` box masks per image. The two ways take turns (batch by batch
for the model, run by run end to end), `--repeats` times, and each way's fastest time
counts: on a shared machine the fastest is the one least slowed by other processes.

    python3 benchmarks/bench_embed.py --quick                      # CPU, seconds
    python3 benchmarks/bench_embed.py --archs vit_small,vit_base --batch-size 256 \\
        --n-images 4096 --workers 16 --device cuda                  # the GPU goal run
    python3 benchmarks/bench_embed.py --one-pass both --archs vit_small --n-images 32
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from odis_core.embed.device_decode import model_inputs
from odis_core.embed.inference import (
    _collate,
    _ObjectInputs,
    embed,
    one_pass_features,
    resolve_decode_on,
)
from odis_core.masks.coco import import_coco
from odis_core.masks.store import MaskStore
from odis_core.model.obj_vit import ObjViT
from odis_core.scenes.synthetic import generate_scenes


def make_folder(
    root: Path,
    n_images: int,
    objects_per_image: int,
    seed: int = 0,
    box_px: tuple[float, float] = (60, 250),
):
    """JPEGs of ImageNet's typical size (500 x 375) and a boxes-only COCO file -> store."""
    rng = np.random.default_rng(seed)
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    y, x = np.mgrid[0:375, 0:500]
    for index in range(n_images):
        # Smooth colour fields plus noise: decodes like a photo, not like flat colour.
        base = np.stack(
            [(x * rng.uniform(0.2, 0.5) + y * rng.uniform(0.1, 0.4)) % 256 for _ in range(3)],
            axis=-1,
        )
        pixels = (base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
        name = f"{index:05d}.jpg"
        Image.fromarray(pixels).save(images_dir / name, quality=90)
        coco["images"].append({"id": index, "file_name": name, "width": 500, "height": 375})
        for obj in range(objects_per_image):
            w, h = rng.uniform(*box_px), rng.uniform(box_px[0], min(box_px[1], 200))
            bx, by = rng.uniform(0, 500 - w), rng.uniform(0, 375 - h)
            coco["annotations"].append(
                {
                    "id": index * 100 + obj,
                    "image_id": index,
                    "category_id": 1,
                    "iscrowd": 0,
                    "bbox": [bx, by, w, h],
                    "area": w * h,
                }
            )
    (root / "coco.json").write_text(json.dumps(coco))
    store, _ = import_coco(root / "coco.json", root / "store", images_root=images_dir)
    return images_dir, store


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def model_rate(
    backbone: ObjViT, batch: int, size: int, masked: bool, iters: int, device: str
) -> float:
    """Items per second of the backbone alone on random inputs."""
    images = torch.randn(batch, 3, size, size, device=device)
    n_patches = (size // backbone.patch_size) ** 2
    mask = None
    if masked:
        mask = torch.rand(batch, n_patches, device=device) < 0.3
        mask[:, 0] = True
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
        backbone(images, obj_patch_mask=mask)  # warm-up (kernels, allocator)
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            backbone(images, obj_patch_mask=mask)
        sync(device)
    return batch * iters / (time.perf_counter() - start)


def pipeline_rate(
    images_dir, store, level, size, patch, batch, workers, on_device=False, device="cpu"
) -> tuple[float, float]:
    """Images per second of the loader alone (decode + resize + normalise, + object masks;
    with `on_device`, JPEGs only read and checked), and of decoding and resizing the
    loader's encoded batches on `device` (nan when the loader decodes everything)."""
    dataset = _ObjectInputs(
        images_dir, list(store.images), store, level, "masked", size, patch,
        decode_on_device=on_device,
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, num_workers=workers, collate_fn=_collate
    )
    start = time.perf_counter()
    batches = [item["images"] for item in loader if item["images"] is not None]
    loader_rate = len(dataset) / (time.perf_counter() - start)
    if not on_device:
        return loader_rate, float("nan")
    model_inputs(batches[0], size, device)  # warm-up
    sync(device)
    start = time.perf_counter()
    n_inputs = 0
    for entries in batches:
        n_inputs += len(entries)
        model_inputs(entries, size, device)
    sync(device)
    return loader_rate, n_inputs / (time.perf_counter() - start)


def embed_seconds(
    backbone: ObjViT,
    images_dir: Path,
    store,
    level: str,
    size: int,
    batch: int,
    device: str,
    workers: int,
    decode_on: str,
) -> float:
    """Wall seconds of `embed` end to end over the folder (loader start-up included)."""
    start = time.perf_counter()
    embed(
        backbone,
        images_dir,
        store,
        level=level,
        image_size=size,
        batch_size=batch,
        device=device,
        workers=workers,
        decode_on=decode_on,
    )
    sync(device)
    return time.perf_counter() - start


def demo_scenes(root: Path, n_images: int) -> tuple[Path, MaskStore]:
    """The demo's synthetic scenes (64 px, 2-5 objects each) as a mask store."""
    splits = generate_scenes(root / "scenes", n_images, 1, seed=0)
    store, _ = import_coco(
        splits["train"].annotations, root / "store", images_root=splits["train"].images_dir
    )
    return splits["train"].images_dir, store


@torch.no_grad()
def one_pass_model_rates(
    backbone: ObjViT,
    images_dir: Path,
    store: MaskStore,
    size: int,
    batch: int,
    device: str,
    repeats: int,
) -> tuple[float, float]:
    """Objects/s of the model alone, (one pass per object, one pass per image), over the
    store's object batches (decoded beforehand): per batch, the two take turns `repeats`
    times and the fastest time of each counts."""
    dataset = _ObjectInputs(
        images_dir, list(store.images), store, "object", "masked", size, backbone.patch_size
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, collate_fn=_collate)
    batches = [
        (model_inputs(item["images"], size, device)[0], item["owner"], item["masks"].to(device))
        for item in loader
        if item["masks"] is not None
    ]
    seconds = {"per_object": 0.0, "one_pass": 0.0}
    n_objects = 0
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
        images, owner, masks = batches[0]  # warm-up both
        backbone(images[owner.to(device)][:1], obj_patch_mask=masks[:1])
        one_pass_features(backbone, images, owner, masks)
        for images, owner, masks in batches:
            n_objects += len(owner)
            fastest = {way: float("inf") for way in seconds}
            for _ in range(repeats):
                for way in seconds:
                    sync(device)
                    start = time.perf_counter()
                    if way == "per_object":
                        backbone(images[owner.to(device)], obj_patch_mask=masks)[:, 0]
                    else:
                        one_pass_features(backbone, images, owner, masks)
                    sync(device)
                    fastest[way] = min(fastest[way], time.perf_counter() - start)
            for way in seconds:
                seconds[way] += fastest[way]
    return n_objects / seconds["per_object"], n_objects / seconds["one_pass"]


def one_pass_table(options, device: str, size: int) -> Table:
    """Objects/s per object vs one pass per image, for each store (see the docstring)."""
    table = Table(
        title=f"one pass per image vs per object, read-out model, {device} "
        f"({'bf16' if 'cuda' in device else 'fp32'}), {size} px, batch {options.batch_size} "
        "images (ratios only on a shared machine)"
    )
    for column in (
        "arch", "store", "obj/image", "model obj/s per-object", "model obj/s one-pass",
        "model speed-up", "embed obj/s per-object", "embed obj/s one-pass", "embed speed-up",
        "goal (0.8 x obj/image)", "max |diff|",
    ):
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        stores = {
            "demo scenes": demo_scenes(Path(tmp) / "demo", options.n_images),
            f"{options.masks_per_image} boxes/image": make_folder(
                Path(tmp) / "many", max(1, options.n_images // 4), options.masks_per_image,
                box_px=(20, 120),
            ),
        }
        for arch in options.archs.split(","):
            backbone = ObjViT(arch, img_size=size, drop_path_rate=0.0, obj_readout=True)
            backbone = backbone.to(device).eval()
            for name, (images_dir, store) in stores.items():
                per_image = len(store.objects) / len(store.images)
                model_per, model_one = one_pass_model_rates(
                    backbone, images_dir, store, size, options.batch_size, device,
                    options.repeats,
                )
                rates, features = {False: 0.0, True: 0.0}, {}
                for _ in range(options.repeats):
                    for one_pass in (False, True):
                        start = time.perf_counter()
                        result = embed(
                            backbone, images_dir, store, image_size=size,
                            batch_size=options.batch_size, device=device,
                            workers=options.workers, decode_on=options.decode_on,
                            one_pass=one_pass,
                        )
                        sync(device)
                        rate = len(result.features) / (time.perf_counter() - start)
                        rates[one_pass] = max(rates[one_pass], rate)
                        features[one_pass] = result.features
                difference = float(np.abs(features[True] - features[False]).max())
                table.add_row(
                    arch, name, f"{per_image:.1f}", f"{model_per:,.1f}", f"{model_one:,.1f}",
                    f"{model_one / model_per:.1f}x", f"{rates[False]:,.1f}",
                    f"{rates[True]:,.1f}", f"{rates[True] / rates[False]:.1f}x",
                    f"{0.8 * per_image:.1f}x", f"{difference:.1e}",
                )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="vit_small,vit_base")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch")
    parser.add_argument("--n-images", type=int, default=256)
    parser.add_argument("--objects-per-image", type=int, default=4)
    parser.add_argument("--iters", type=int, default=10, help="timed model batches")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes for a CPU run")
    parser.add_argument(
        "--decode-on",
        default="auto",
        choices=("auto", "loader", "device"),
        help="where whole-image JPEG inputs are decoded (auto: device on CUDA)",
    )
    parser.add_argument(
        "--one-pass",
        default="off",
        choices=("off", "both"),
        help="both: compare one pass per object and per image (read-out model) instead",
    )
    parser.add_argument(
        "--masks-per-image", type=int, default=40, help="objects per image of the --one-pass "
        "both store of many masks (it has a quarter of --n-images images)"
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="--one-pass both: turns per way (fastest counts)"
    )
    options = parser.parse_args()
    if options.quick:
        options.batch_size, options.n_images, options.iters = 8, 16, 2
    device, size = options.device, options.image_size
    decode_on = resolve_decode_on(options.decode_on, device)
    on_device = decode_on == "device"

    console = Console(width=160)
    if options.one_pass == "both":
        console.print(one_pass_table(options, device, size))
        return
    table = Table(
        title=f"embed throughput on {device} ({'bf16' if 'cuda' in device else 'fp32'}"
        f"), {size} px, batch {options.batch_size} images, "
        f"{options.objects_per_image} objects/image, {options.workers} workers, "
        f"JPEGs decoded on the {decode_on}"
    )
    for column in (
        "arch",
        "model img/s (image)",
        "model obj/s (masked)",
        "input img/s (image)",
        "input img/s (object)",
        "device decode img/s",
        "embed img/s (image)",
        "embed obj/s (masked)",
        "bottleneck",
    ):
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        images_dir, store = make_folder(Path(tmp), options.n_images, options.objects_per_image)
        n_objects = len(store.objects)
        for arch in options.archs.split(","):
            backbone = ObjViT(arch, img_size=size, drop_path_rate=0.0).to(device).eval()
            model_images = model_rate(
                backbone, options.batch_size, size, False, options.iters, device
            )
            model_objects = model_rate(
                backbone,
                options.batch_size * options.objects_per_image,
                size,
                True,
                options.iters,
                device,
            )
            patch = backbone.patch_size
            input_image, device_decode = pipeline_rate(
                images_dir, store, "image", size, patch, options.batch_size, options.workers,
                on_device, device,
            )
            input_object, _ = pipeline_rate(
                images_dir, store, "object", size, patch, options.batch_size, options.workers,
                on_device, device,
            )
            rates = {
                level: embed_seconds(
                    backbone, images_dir, store, level, size, options.batch_size, device,
                    options.workers, decode_on,
                )
                for level in ("image", "object")
            }
            input_ceiling = min(input_image, device_decode) if on_device else input_image
            bottleneck = "input" if input_ceiling < model_images else "model"
            table.add_row(
                arch,
                f"{model_images:,.1f}",
                f"{model_objects:,.1f}",
                f"{input_image:,.1f}",
                f"{input_object:,.1f}",
                f"{device_decode:,.1f}",
                f"{options.n_images / rates['image']:,.1f}",
                f"{n_objects / rates['object']:,.1f}",
                bottleneck,
            )
    console.print(table)


if __name__ == "__main__":
    main()
