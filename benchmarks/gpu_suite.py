"""One command that proves and measures every CUDA path (issue 18).

    python benchmarks/gpu_suite.py --out $OUT              # a GPU machine: about 8 minutes
    python benchmarks/gpu_suite.py --dry-run --out /tmp/s  # every stage at toy size on the CPU

Five stages, in this order, each under its own time cap (a stage stops starting items when
its cap is reached; the rest are recorded "skipped: time cap"):
1. correctness on the device: split [OBJ] attention = dense masked attention = timm (all-true
   mask) in fp32 and under bf16 autocast, forward and backward; device-rendered views vs
   the loader's on the same plans; `--decode-on device` features vs loader-decoded ones;
   the device k-NN vs FAISS on the CPU; 20 ODIS steps with `torch.compile` (finite, first
   loss = eager); checkpoint and resume on the device;
2. the pretraining step table (bench_pretrain.py): ODIS vs image objective vs plain timm,
   ViT-S/16 batch 128 and ViT-B/16 batch 64, eager and compiled; attention alone;
3. the real data path end to end (synthetic 448 px scenes, 16 workers, views on the device);
4. embed throughput (bench_embed.py) and the 1,281,167 x 768 k-NN with 50,000 queries
   (bench_knn.py);
5. batched SAM vs SamAutomaticMaskGenerator image by image (bench_masks_sam.py).

After every item, OUT/gpu_suite.json and OUT/gpu_suite.md are rewritten atomically, so a
run stopped by its time limit still returns every finished row. An item that raises is
recorded as failed with its one-line error and the suite goes on. `--dry-run` runs every
item at toy sizes on the CPU (bf16 autocast where training uses it; `torch.compile` rows
are skipped there, which the rows say): it is what the test suite runs. Absolute times of a
dry run mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import importlib.metadata
import json
import math
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench_* modules beside us

from odis_core.atomic import atomic_write  # noqa: E402

# Seconds an item may run past its stage's cap before it is interrupted (SIGALRM).
OVERRUN_GRACE_S = 30.0
SKIPPED = "skipped: time cap"

Row = dict[str, Any]


@dataclass(frozen=True)
class Sizes:
    """Every size the suite uses: FULL on the GPU, DRY for the CPU dry run."""

    # stage 1
    attn_arch: str
    attn_depth: int | None
    attn_size: int
    attn_patch: int
    attn_batch: int
    views_scene: int  # side of the synthetic test image, px
    views_global: int
    views_local: int
    views_n_local: int
    views_patch: int
    views_images: int
    decode_images: int
    decode_arch: str
    decode_depth: int | None
    decode_size: int
    decode_patch: int
    knn_check: tuple[int, int, int, int]  # bank, queries, dim, k
    compile_steps: int
    # stage 2
    step_models: tuple[tuple[str, int], ...]  # (arch, batch)
    step_depth: int | None
    step_patch: int
    step_global: int
    step_local: int
    step_n_local: int
    step_out_dim: int
    step_head: tuple[int, int]  # hidden, bottleneck
    step_warmup: int
    step_steps: int
    attn_table_batch: int
    # stage 3
    data_steps: int
    data_workers: int
    # stage 4
    embed_arch: str
    embed_depth: int | None
    embed_size: int
    embed_patch: int
    embed_images: int
    embed_batch: int
    embed_workers: int
    knn_problem: tuple[int, int, int, int]  # bank, queries, dim, classes
    knn_chunk: int
    # stage 5
    sam_model: str
    sam_images: int
    sam_size: tuple[int, int]
    sam_batch: int
    sam_points: int | None  # None: SAM's default 32 per side


FULL = Sizes(
    attn_arch="vit_small",
    attn_depth=None,
    attn_size=224,
    attn_patch=16,
    attn_batch=4,
    views_scene=448,
    views_global=224,
    views_local=96,
    views_n_local=10,
    views_patch=16,
    views_images=4,
    decode_images=32,
    decode_arch="vit_small",
    decode_depth=None,
    decode_size=224,
    decode_patch=16,
    knn_check=(20_000, 1_000, 768, 200),
    compile_steps=20,
    step_models=(("vit_small", 128), ("vit_base", 64)),
    step_depth=None,
    step_patch=16,
    step_global=224,
    step_local=96,
    step_n_local=10,
    step_out_dim=8192,
    step_head=(2048, 256),
    step_warmup=3,
    step_steps=10,
    attn_table_batch=256,
    data_steps=8,
    data_workers=16,
    embed_arch="vit_base",
    embed_depth=None,
    embed_size=224,
    embed_patch=16,
    embed_images=1024,
    embed_batch=256,
    embed_workers=16,
    knn_problem=(1_281_167, 50_000, 768, 1000),
    knn_chunk=8192,
    sam_model="vit_b",
    sam_images=8,
    sam_size=(480, 640),
    sam_batch=8,
    sam_points=None,
)

DRY = Sizes(
    attn_arch="vit_tiny",
    attn_depth=2,
    attn_size=32,
    attn_patch=8,
    attn_batch=3,
    views_scene=64,
    views_global=32,
    views_local=16,
    views_n_local=2,
    views_patch=8,
    views_images=2,
    decode_images=3,
    decode_arch="vit_tiny",
    decode_depth=1,
    decode_size=32,
    decode_patch=8,
    knn_check=(500, 40, 32, 10),
    compile_steps=3,
    step_models=(("vit_tiny", 2),),
    step_depth=1,
    step_patch=8,
    step_global=32,
    step_local=16,
    step_n_local=2,
    step_out_dim=64,
    step_head=(32, 16),
    step_warmup=1,
    step_steps=1,
    attn_table_batch=2,
    data_steps=2,
    data_workers=0,
    embed_arch="vit_tiny",
    embed_depth=1,
    embed_size=32,
    embed_patch=8,
    embed_images=3,
    embed_batch=2,
    embed_workers=0,
    knn_problem=(1_000, 50, 32, 10),
    knn_chunk=32,
    sam_model="tiny",
    sam_images=2,
    sam_size=(48, 64),
    sam_batch=2,
    sam_points=2,
)

# Stage caps (seconds) on the GPU: about 8 minutes together, inside one 540 s command.
STAGE_CAPS = {1: 90.0, 2: 150.0, 3: 70.0, 4: 100.0, 5: 60.0}


@dataclass
class Context:
    device: str
    dry_run: bool
    sizes: Sizes
    work: Path  # scratch files (scenes, JPEG folders, checkpoints) on local disk

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def release(self) -> None:
        """Memory of the last item back to the device (so peaks are each item's own)."""
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


@dataclass
class Item:
    name: str
    run: Callable[[], Row | list[Row]]


@dataclass
class Stage:
    number: int
    title: str
    cap_s: float
    items: list[Item]
    status: str = "not run"
    wall_s: float = 0.0
    rows: list[Row] = field(default_factory=list)


class TimeCapExceeded(Exception):
    pass


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


# ----------------------------------------------------------------------------- checks


def relative_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64 (0 when both are zero)."""
    got, want = got.double(), want.double()
    norm = want.norm().item()
    difference = (got - want).norm().item()
    return difference / norm if norm > 0 else difference


def forward_backward(
    forward: Callable[[torch.Tensor], torch.Tensor],
    module: torch.nn.Module,
    images: torch.Tensor,
    weights: torch.Tensor,
    bf16: bool,
) -> dict[str, torch.Tensor]:
    """Tokens, the input's gradient and every parameter's gradient of sum(forward * weights)."""
    module.zero_grad(set_to_none=True)
    images = images.clone().requires_grad_(True)
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
        tokens = forward(images)
    (tokens.float() * weights).sum().backward()
    out = {"tokens": tokens.detach().float(), "input": images.grad.detach().float()}
    for name, parameter in module.named_parameters():
        if parameter.grad is not None:
            out[name.removeprefix("vit.")] = parameter.grad.detach().float()
    return out


def compare(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: float) -> Row:
    """Outputs and gradients of two paths: the worst relative L2 error over the tensors
    (pass when <= tol) and which tensor it is, and the largest absolute error."""
    shared = [name for name in want if name in got]
    if len(shared) < 3:
        raise RuntimeError(f"only {len(shared)} gradients in common")
    errors = {name: relative_l2(got[name], want[name]) for name in shared}
    # A NaN anywhere is the worst error (max() alone would not see it).
    worst = max(errors, key=lambda name: errors[name] if math.isfinite(errors[name]) else math.inf)
    max_abs = max((got[n] - want[n]).abs().max().item() for n in shared)
    return {
        "status": "pass" if math.isfinite(errors[worst]) and errors[worst] <= tol else "FAIL",
        "max rel L2 err": errors[worst],
        "worst tensor": worst,
        "tokens rel L2 err": errors["tokens"],
        "max abs err": max_abs,
        "tolerance": tol,
        "tensors": len(shared),
    }


def check_attention(ctx: Context) -> list[Row]:
    """Split = dense (random object masks) and split = timm (all-true mask), fp32 and bf16."""
    from odis_core.model.obj_vit import ObjViT

    s = ctx.sizes
    torch.manual_seed(0)
    kwargs = dict(img_size=s.attn_size, patch_size=s.attn_patch, drop_path_rate=0.0)
    if s.attn_depth is not None:
        kwargs["depth"] = s.attn_depth
    split = ObjViT(s.attn_arch, attention_impl="split", **kwargs).to(ctx.device)
    dense = ObjViT(s.attn_arch, attention_impl="dense", **kwargs).to(ctx.device)
    dense.load_state_dict(split.state_dict())
    n_patches = (s.attn_size // s.attn_patch) ** 2
    g = torch.Generator().manual_seed(0)
    images = torch.randn(s.attn_batch, 3, s.attn_size, s.attn_size, generator=g).to(ctx.device)
    mask = torch.rand(s.attn_batch, n_patches, generator=g) > 0.5
    mask[:, n_patches // 2] = True
    mask[-1] = False  # an [OBJ] row that sees only its own key
    mask = mask.to(ctx.device)
    all_true = torch.ones_like(mask)
    weights = torch.randn(s.attn_batch, 1 + n_patches, split.embed_dim, generator=g)
    weights = weights.to(ctx.device)

    def masked(model: ObjViT, obj_mask: torch.Tensor) -> Callable:
        return lambda x: model(x, obj_patch_mask=obj_mask, force_masked_path=True)

    paths = {
        "split": (masked(split, mask), split),
        "dense": (masked(dense, mask), dense),
        "split, all-true mask": (masked(split, all_true), split),
        "timm": (split.vit.forward_features, split),
    }
    previous_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here (matmul and the
    torch.backends.cudnn.allow_tf32 = False  # patch-embedding convolution)
    try:
        results = {
            (name, bf16): forward_backward(forward, module, images, weights, bf16)
            for name, (forward, module) in paths.items()
            for bf16 in (False, True)
        }
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous_tf32
    rows = []
    # Stated tolerances: in fp32 the paths agree to float rounding (1e-4). Under bf16
    # autocast each path rounds at other points: the bound is 2 %, or twice the reference
    # path's own bf16-vs-fp32 error where that is larger (deep models accumulate more).
    for got, want in (("split", "dense"), ("split, all-true mask", "timm")):
        fp32 = compare(results[got, False], results[want, False], 1e-4)
        floor = compare(results[want, True], results[want, False], 1.0)["max rel L2 err"]
        bf16 = compare(results[got, True], results[want, True], max(2e-2, 2 * floor))
        rows.append({"check": f"{got} vs {want}, fp32", **fp32, "bf16 floor": ""})
        rows.append({"check": f"{got} vs {want}, bf16 autocast", **bf16, "bf16 floor": floor})
    return rows


def textured_image(height: int, width: int, seed: int):
    """An RGB PIL image of smooth colour fields plus noise (resamples like a photo)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack(
        [(x * rng.uniform(0.3, 1.2) + y * rng.uniform(0.2, 0.9)) % 256 for _ in range(3)], -1
    )
    return Image.fromarray((base + rng.normal(0, 8, base.shape)).clip(0, 255).astype(np.uint8))


def check_views(ctx: Context) -> list[Row]:
    """Views rendered on the device vs (a) the same renderer on the CPU and (b) the loader's
    PIL resampling of the same plans (crop box, flip, photometric parameters)."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    from odis_core.crops.batched_photometric import apply_photometric
    from odis_core.crops.device_views import render, source_tensor
    from odis_core.crops.object_aware import ObjectMultiCrop

    s = ctx.sizes
    multicrop = ObjectMultiCrop(
        global_size=s.views_global,
        local_size=s.views_local,
        n_local=s.views_n_local,
        patch_size=s.views_patch,
        render_pixels=False,
    )
    generator = torch.Generator().manual_seed(0)
    device_views, cpu_views, loader_views = [], [], []
    for index in range(s.views_images):
        image = textured_image(s.views_scene * 3 // 4, s.views_scene, index)
        mask = np.zeros((image.height, image.width), dtype=bool)
        mask[image.height // 4 : image.height * 3 // 4, image.width // 5 : image.width // 2] = True
        views = multicrop(image, mask, generator)
        source, (scale_x, scale_y) = source_tensor(image)
        kinds = ((views.global_plans, s.views_global), (views.local_plans, s.views_local))
        for plans, size in kinds:
            # roi_align boxes: (source row, x0, y0, x1, y1) in the shipped image's pixels.
            xyxy = [(p.crop.left, p.crop.top, p.crop.left + p.crop.width,
                     p.crop.top + p.crop.height) for p in plans]  # fmt: skip
            boxes = torch.tensor(
                [[0.0, x0 * scale_x, y0 * scale_y, x1 * scale_x, y1 * scale_y]
                 for x0, y0, x1, y1 in xyxy]
            )  # fmt: skip
            flips = torch.tensor([plan.flip for plan in plans])
            params = torch.stack([plan.photometric for plan in plans])
            device_views.append(
                render(source[None].to(ctx.device), boxes.to(ctx.device), flips.to(ctx.device),
                       params, size).cpu()
            )
            cpu_views.append(render(source[None], boxes, flips, params, size))
            for plan in plans:  # the loader's resampling: PIL bicubic, then the same ops
                b = plan.crop
                view = TF.resized_crop(
                    image, b.top, b.left, b.height, b.width, [size, size],
                    InterpolationMode.BICUBIC,
                )
                pixels = TF.to_tensor(TF.hflip(view) if plan.flip else view)
                loader_views.append(apply_photometric(pixels[None], plan.photometric[None]))
    on_device = torch.cat([v.flatten() for v in device_views])
    on_cpu = torch.cat([v.flatten() for v in cpu_views])
    by_loader = torch.cat([v.flatten() for v in loader_views])
    rows = []
    # (a) Same code on two devices: float rounding (TF32 convolutions in the blur on a
    # GPU), except where a pixel sits on a threshold (solarize at 0.5) and lands on the
    # other side: a tiny share may differ by more. A wrong box or flip moves the mean ~0.5.
    same = (on_device - on_cpu).abs()
    off_share = (same > 1e-2).float().mean().item()
    rows.append(
        {
            "check": f"device vs CPU render, {len(device_views)} view batches",
            "status": "pass" if same.mean().item() <= 1e-3 and off_share <= 1e-3 else "FAIL",
            "mean abs err": same.mean().item(),
            "max abs err": same.max().item(),
            "share > 1e-2": off_share,
            "tolerance": "mean <= 1e-3, share > 1e-2 <= 1e-3",
        }
    )
    # (b) roi_align area sampling vs PIL bicubic (normalised units, 1/255/0.225 = 0.017 is
    # one grey level): resampling differences of a few levels, larger at sharp edges.
    loader = (on_device - by_loader).abs()
    rows.append(
        {
            "check": "device render vs loader PIL resampling, same plans",
            "status": "pass" if loader.mean().item() <= 0.05 else "FAIL",
            "mean abs err": loader.mean().item(),
            "max abs err": loader.max().item(),
            "share > 1e-2": (loader > 1e-2).float().mean().item(),
            "tolerance": "mean <= 0.05",
        }
    )
    return rows


def check_decode(ctx: Context) -> Row:
    """Image-level features with JPEGs decoded on the device vs by the loader."""
    from bench_embed import make_folder

    from odis_core.embed.inference import embed
    from odis_core.model.obj_vit import ObjViT

    s = ctx.sizes
    images_dir, store = make_folder(ctx.work / "decode_check", s.decode_images, 1)
    kwargs = dict(img_size=s.decode_size, patch_size=s.decode_patch, drop_path_rate=0.0)
    if s.decode_depth is not None:
        kwargs["depth"] = s.decode_depth
    torch.manual_seed(0)
    backbone = ObjViT(s.decode_arch, **kwargs).to(ctx.device).eval()
    features = {
        where: embed(
            backbone, images_dir, store, level="image", image_size=s.decode_size,
            batch_size=8, device=ctx.device, decode_on=where,
        ).features
        for where in ("loader", "device")
    }
    cosine = torch.nn.functional.cosine_similarity(
        torch.from_numpy(features["device"]).double(), torch.from_numpy(features["loader"]).double()
    )
    return {
        "check": f"--decode-on device vs loader, {len(cosine)} JPEGs",
        "status": "pass" if cosine.min().item() > 0.999 else "FAIL",
        "min cosine": cosine.min().item(),
        "mean cosine": cosine.mean().item(),
        "tolerance": "min cosine > 0.999",
    }


def check_knn(ctx: Context) -> Row:
    """Exact neighbours by torch on the device vs FAISS on the CPU."""
    from bench_knn import agreement

    bank, queries, dim, k = ctx.sizes.knn_check
    agree = agreement(bank, queries, dim, k, device=ctx.device)
    ok = agree["same_indices"] >= 0.999 and agree["max_abs_sim_diff"] <= 1e-4
    return {
        "check": f"k-NN torch on {ctx.device} vs FAISS CPU, {bank:,} x {dim}, k {k}",
        "status": "pass" if ok else "FAIL",
        "same indices": agree["same_indices"],
        "differ (tied)": f"{agree['n_differ']} ({agree['n_differ_tied']})",
        "max abs err": agree["max_abs_sim_diff"],
        "tolerance": "same >= 0.999, sim err <= 1e-4",
    }


def step_config(ctx: Context, arch: str, batch: int, **changes):
    from odis_core.train.config import PretrainConfig

    s = ctx.sizes
    config = PretrainConfig(
        arch=arch,
        depth=s.step_depth,
        patch_size=s.step_patch,
        batch_size=batch,
        global_size=s.step_global,
        local_size=s.step_local,
        n_local_crops=s.step_n_local,
        out_dim=s.step_out_dim,
        head_hidden_dim=s.step_head[0],
        head_bottleneck_dim=s.step_head[1],
        min_patches_per_block=4 if ctx.dry_run else 16,
        warmup_epochs=0,
        epochs=1,
        device=ctx.device,
        tensorboard=False,
    )
    return dataclasses.replace(config, **changes)


def check_compile(ctx: Context) -> Row:
    """`--compile`: finite losses over the steps, first loss = eager's (drop-path off, so
    both draw nothing at random; same weights from the config's seed, same batch)."""
    from bench_pretrain import random_batch

    from odis_core.train.loop import Trainer

    s = ctx.sizes
    arch, _ = s.step_models[0]
    depth = 4 if not ctx.dry_run else s.step_depth  # compile time grows with depth
    config = step_config(ctx, arch, 16 if not ctx.dry_run else 2, depth=depth, drop_path=0.0)
    batch = random_batch(config, ctx.device)

    def losses(compiled: bool, steps: int) -> list[float]:
        trainer = Trainer(
            dataclasses.replace(config, compile=compiled).resolved(), steps + 10, ctx.device
        )
        return [trainer.train_step(batch)["loss"] for _ in range(steps)]

    eager = losses(False, 1 if ctx.cuda else s.compile_steps)
    row: Row = {"check": f"{s.compile_steps} ODIS steps, torch.compile, {arch} depth {depth}"}
    if not ctx.cuda:  # inductor's CPU compile takes minutes here: eager only
        finite = all(map(math.isfinite, eager))
        return row | {
            "status": "pass" if finite else "FAIL",
            "note": "compile skipped on CPU (dry run): eager steps only",
            "first loss eager": eager[0],
            "all finite": finite,
        }
    compiled = losses(True, s.compile_steps)
    difference = abs(compiled[0] - eager[0])
    finite = all(map(math.isfinite, compiled))
    # bf16 kernels fused differently: agree to 1 % of the loss.
    ok = finite and difference <= 1e-2 * abs(eager[0])
    return row | {
        "status": "pass" if ok else "FAIL",
        "first loss eager": eager[0],
        "first loss compiled": compiled[0],
        "max abs err": difference,
        "all finite": finite,
        "last loss compiled": compiled[-1],
        "tolerance": "|diff| <= 1 % of eager",
    }


def tiny_store(root: Path, n_images: int, image_size: int):
    from odis_core.masks.coco import import_coco
    from odis_core.scenes.synthetic import SceneConfig, generate_scenes

    splits = generate_scenes(
        root / "scenes", n_images, 1, seed=3, config=SceneConfig(image_size=image_size)
    )
    store, _ = import_coco(
        splits["train"].annotations, root / "masks", images_root=splits["train"].images_dir
    )
    return store, splits["train"].images_dir


def check_resume(ctx: Context) -> Row:
    """4 steps straight vs 2 steps, checkpoint, resume to 4: the same training state."""
    from odis_core.train.config import PretrainConfig
    from odis_core.train.loop import pretrain

    root = ctx.work / "resume_check"
    store, images_dir = tiny_store(root, 16, 32)
    config = PretrainConfig(
        arch="vit_tiny", depth=2, patch_size=8, global_size=32, local_size=16, n_local_crops=2,
        out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16, min_patches_per_block=2,
        batch_size=4, epochs=2, warmup_epochs=1, device=ctx.device, workers=0,
        tensorboard=False, save_every=2,
    )  # fmt: skip
    for run, steps, resume in (("straight", 4, False), ("resumed", 2, False), ("resumed", 4, True)):
        for _ in pretrain(
            dataclasses.replace(config, max_steps=steps), images_dir, store, root / run, resume
        ):
            pass
    states = [
        torch.load(root / run / "checkpoint.pt", map_location="cpu", weights_only=True)
        for run in ("straight", "resumed")
    ]
    tensors = [
        (f"{part}.{key}", states[0][part][key], states[1][part][key])
        for part in ("student", "teacher", "loss")
        for key in states[0][part]
    ]
    for index, (a, b) in enumerate(
        zip(states[0]["optimizer"]["state"].values(), states[1]["optimizer"]["state"].values(),
            strict=True)
    ):
        tensors += [(f"optimizer.{index}.{key}", a[key], b[key]) for key in a]
    errors = {name: (a.double() - b.double()).abs().max().item() for name, a, b in tensors}
    worst = max(errors, key=errors.get)
    same_step = states[0]["step"] == states[1]["step"] == 4
    # bf16 steps with non-deterministic atomics may differ in the last bits on a GPU.
    ok = same_step and errors[worst] <= 1e-4
    return {
        "check": f"checkpoint + resume on {ctx.device}, vit_tiny, 2 + 2 vs 4 steps",
        "status": "pass" if ok else "FAIL",
        "max abs err": errors[worst],
        "worst tensor": worst,
        "tensors": len(tensors),
        "tolerance": "<= 1e-4, step 4 in both",
    }


def stage_correctness(ctx: Context) -> list[Item]:
    return [
        Item("attention", lambda: check_attention(ctx)),
        Item("device views", lambda: check_views(ctx)),
        Item("device decode", lambda: check_decode(ctx)),
        Item("k-NN", lambda: check_knn(ctx)),
        Item("checkpoint/resume", lambda: check_resume(ctx)),
        Item("compile", lambda: check_compile(ctx)),  # last: compiling takes the longest
    ]


# ----------------------------------------------------------------------- measurements


STEP_VARIANTS = ("odis (split attn)", "image (iBOT)", "plain timm")


def step_row(
    ctx: Context, arch: str, batch: int, name: str, compiled: bool, flops: dict
) -> Row:
    """One bench_pretrain step variant: img/s, step ms, FLOPs, TFLOP/s, MFU, peak memory."""
    from bench_pretrain import device_peak_tflops, time_step, variant_step

    s = ctx.sizes
    label = f"{name}, {arch} b{batch}, {'compiled' if compiled else 'eager'}"
    if compiled and not ctx.cuda:
        return {"step": label, "status": "skipped: compile on CPU (dry run)"}
    peak = device_peak_tflops(ctx.device, None)
    config = step_config(ctx, arch, batch, compile=compiled)
    step = variant_step(name, config, ctx.device, s.step_steps)
    try:
        measured = time_step(
            step, ctx.device, s.step_warmup, s.step_steps, flops=flops.get((arch, name))
        )
    finally:
        del step
        if compiled:
            torch._dynamo.reset()
        ctx.release()
    flops.setdefault((arch, name), measured["flops"])  # the compiled row reuses the count
    return {
        "step": label,
        "status": "ok",
        "img/s": batch / (measured["step_ms"] / 1000),
        "step ms": measured["step_ms"],
        "GFLOP/img": measured["flops"] / batch / 1e9,
        "TFLOP/s": measured["tflops"],
        "MFU": f"{100 * measured['tflops'] / peak:.1f} %" if peak else "n/a",
        "peak GiB": measured["peak_gib"],
    }


def attention_rows(ctx: Context, arch: str) -> list[Row]:
    from bench_pretrain import attention_timings

    s = ctx.sizes
    config = step_config(ctx, arch, s.attn_table_batch)
    timings, shape = attention_timings(config, ctx.device, s.attn_table_batch, s.step_steps + 4)
    return [
        {"kernel": f"{name}, {arch} (B,H,N,d)={shape}", "status": "ok", "fwd+bwd ms": ms,
         "vs unmasked": ratio}
        for name, ms, ratio in timings
    ]  # fmt: skip


def stage_steps(ctx: Context) -> list[Item]:
    """Eager rows of both models first, then attention alone, then the compiled rows
    (compiling takes the longest: what the cap cuts is compiled ViT-B first)."""
    flops: dict = {}
    models = ctx.sizes.step_models

    def steps(compiled: bool) -> list[Item]:
        return [
            Item(
                f"{arch} b{batch} {'compiled' if compiled else 'eager'}",
                functools.partial(step_row, ctx, arch, batch, name, compiled, flops),
            )
            for arch, batch in models
            for name in STEP_VARIANTS
        ]

    attention = [
        Item(f"attention {arch}", functools.partial(attention_rows, ctx, arch))
        for arch, _ in models
    ]
    return steps(False) + attention + steps(True)


def data_row(ctx: Context) -> Row:
    """bench_pretrain.data_pipeline: ViT-S, real loader, views rendered on the device."""
    from bench_pretrain import data_pipeline

    s = ctx.sizes
    arch, batch = s.step_models[0]
    config = step_config(ctx, arch, batch, augment_on="device")
    report = data_pipeline(config, ctx.device, s.data_steps, s.data_workers)
    return {
        "run": f"{arch} b{batch}, {s.data_workers} workers, {2 * max(s.step_global, 64)} px "
        f"scenes, views on {ctx.device}",
        "status": "ok",
        "img/s": report["images_per_second"],
        "data wait share": report["data_wait_share"],
        "loader alone img/s": report["loader_only_images_per_second"],
        "render img/s": report["render_images_per_second"],
        "steps": report["steps"],
    }


def stage_data(ctx: Context) -> list[Item]:
    return [Item("real data path", lambda: data_row(ctx))]


def embed_rows(ctx: Context) -> list[Row]:
    """bench_embed: the model alone and `embed` end to end at image level (loader vs device
    decode) and object level (masked), bf16 on CUDA."""
    from bench_embed import embed_seconds, make_folder, model_rate

    from odis_core.model.obj_vit import ObjViT

    s = ctx.sizes
    images_dir, store = make_folder(ctx.work / "embed_folder", s.embed_images, 4)
    kwargs = dict(img_size=s.embed_size, patch_size=s.embed_patch, drop_path_rate=0.0)
    if s.embed_depth is not None:
        kwargs["depth"] = s.embed_depth
    backbone = ObjViT(s.embed_arch, **kwargs).to(ctx.device).eval()
    rows = [
        {
            "run": f"{s.embed_arch} model alone, image level, batch {s.embed_batch}",
            "status": "ok",
            "items/s": model_rate(backbone, s.embed_batch, s.embed_size, False, 5, ctx.device),
            "unit": "img/s",
        }
    ]
    runs = (("image", "loader"), ("image", "device"), ("object", "loader"))
    for level, decode_on in runs:
        seconds = embed_seconds(
            backbone, images_dir, store, level, s.embed_size, s.embed_batch, ctx.device,
            s.embed_workers, decode_on,
        )  # fmt: skip
        count = s.embed_images if level == "image" else len(store.objects)
        rows.append(
            {
                "run": f"{s.embed_arch} embed, {level} level, decode on {decode_on}, "
                f"{s.embed_workers} workers",
                "status": "ok",
                "items/s": count / seconds,
                "unit": "img/s" if level == "image" else "obj/s (masked)",
            }
        )
    return rows


def knn_row(ctx: Context) -> Row:
    """bench_knn.run_backend on the full ImageNet-sized problem (auto backend)."""
    from bench_knn import run_backend

    bank, queries, dim, classes = ctx.sizes.knn_problem
    args = {
        "bank": bank, "queries": queries, "dim": dim, "classes": classes,
        "ks": (10, 20, 100, 200), "chunk_size": ctx.sizes.knn_chunk,
        "dtype": np.dtype("float32"), "ivf": 1024, "nprobe": 16, "spread": 1.0,
    }  # fmt: skip
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    row = run_backend(args, "auto")
    return {
        "run": f"k-NN {bank:,} x {dim} fp32 bank, {queries:,} queries, k 10/20/100/200",
        "status": "ok",
        "backend": row["backend"],
        "seconds": row["seconds"],
        "queries/s": queries / row["seconds"],
        "peak GPU GiB": row["gpu_peak_gib"] if row["gpu_peak_gib"] is not None else "n/a",
        "suite peak RSS GiB": row["peak_rss_gib"],  # the bank lives in this process
    }


def stage_embed_knn(ctx: Context) -> list[Item]:
    # k-NN first: the 1.28 M x 768 search is the stage's headline figure.
    return [Item("k-NN", lambda: knn_row(ctx)), Item("embed", lambda: embed_rows(ctx))]


def sam_row(ctx: Context) -> Row:
    """bench_masks_sam.compare_generators with random weights (timing only)."""
    from bench_masks_sam import compare_generators, synthetic_images, tiny_sam
    from segment_anything import sam_model_registry

    s = ctx.sizes
    torch.manual_seed(0)
    model = tiny_sam() if s.sam_model == "tiny" else sam_model_registry[s.sam_model]()
    model = model.to(ctx.device).eval()
    settings: dict = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    if s.sam_points is not None:
        settings["points_per_side"] = s.sam_points
    images = synthetic_images(s.sam_images, *s.sam_size)
    plain_s, ours_s, ours = compare_generators(
        model, images, settings, s.sam_batch, ctx.cuda, ctx.device
    )
    return {
        "run": f"SAM {s.sam_model} (random weights), {s.sam_images} images "
        f"{s.sam_size[0]}x{s.sam_size[1]}, batch {s.sam_batch}, "
        f"{ours.points_per_batch} prompts/pass, encoder {'bf16' if ours.bf16 else 'fp32'}",
        "status": "ok",
        "plain img/s": s.sam_images / plain_s,
        "batched img/s": s.sam_images / ours_s,
        "speed-up": plain_s / ours_s,
    }


def stage_sam(ctx: Context) -> list[Item]:
    return [Item("SAM", lambda: sam_row(ctx))]


STAGES: tuple[tuple[int, str, Callable[[Context], list[Item]]], ...] = (
    (1, "correctness on the device", stage_correctness),
    (2, "pretraining step", stage_steps),
    (3, "end to end with the real data path", stage_data),
    (4, "embed and k-NN", stage_embed_knn),
    (5, "SAM, batched vs image by image", stage_sam),
)


# ----------------------------------------------------------------------------- report


def environment(ctx: Context) -> dict[str, Any]:
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {
        "device": torch.cuda.get_device_name() if ctx.cuda else f"CPU, {os.cpu_count()} cores",
        "dry_run": ctx.dry_run,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "timm": version("timm"),
        "torchvision": version("torchvision"),
        "faiss": version("faiss-cpu") if version("faiss-gpu") == "not installed"
        else version("faiss-gpu"),
        "segment_anything": version("segment-anything"),
        "pycocotools": version("pycocotools"),
    }  # fmt: skip


def stage_status(stage: Stage) -> str:
    statuses = [str(row.get("status", "")) for row in stage.rows]
    if any(status.startswith("failed") for status in statuses):
        return "failed"
    if any(status == "FAIL" for status in statuses):
        return "check failed"
    if any(status.startswith(("skipped: time cap", "stopped")) for status in statuses):
        return "partial (time cap)"
    return "ok"


def cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.4g}"
    return str(value).replace("|", "/")


def markdown(env: dict, stages: list[Stage], wall_s: float) -> str:
    lines = [
        f"## GPU suite: {env['device']}" + (" (DRY RUN, toy sizes: times mean nothing)"
                                            if env["dry_run"] else ""),
        "",
        ", ".join(f"{key} {value}" for key, value in env.items() if key not in ("device",
                                                                              "dry_run"))
        + f"; total wall {wall_s:.0f} s.",
        "",
    ]  # fmt: skip
    for stage in stages:
        lines += [
            f"### Stage {stage.number}: {stage.title} ({stage.status}, "
            f"{stage.wall_s:.1f} s of a {stage.cap_s:.0f} s cap)",
            "",
        ]
        if not stage.rows:
            lines += ["(no rows)", ""]
        # One table per run of rows with the same columns (checks differ in their figures).
        columns: list[str] = []
        for row in stage.rows:
            if list(row) != columns:
                if columns:
                    lines.append("")
                columns = list(row)
                lines.append("| " + " | ".join(columns) + " |")
                lines.append("|" + "---|" * len(columns))
            lines.append("| " + " | ".join(cell(value) for value in row.values()) + " |")
        lines.append("")
    return "\n".join(lines)


def write_report(out: Path, env: dict, stages: list[Stage], started: float) -> None:
    wall_s = time.perf_counter() - started
    payload = {
        "environment": env,
        "wall_s": wall_s,
        "stages": [
            {
                "stage": stage.number,
                "title": stage.title,
                "status": stage.status,
                "cap_s": stage.cap_s,
                "wall_s": stage.wall_s,
                "rows": stage.rows,
            }
            for stage in stages
        ],
    }
    with atomic_write(out / "gpu_suite.json", "w", encoding="utf-8") as handle:
        handle.write(json.dumps(payload, indent=2, default=str) + "\n")
    with atomic_write(out / "gpu_suite.md", "w", encoding="utf-8") as handle:
        handle.write(markdown(env, stages, wall_s) + "\n")


# ----------------------------------------------------------------------------- runner


def _raise_time_cap(signum, frame) -> None:  # noqa: ARG001 (signal handler signature)
    raise TimeCapExceeded()


def run_stage(stage: Stage, deadline: float, on_row: Callable[[], None]) -> None:
    """Runs the stage's items until `deadline` (perf_counter seconds); an item still
    running OVERRUN_GRACE_S later is interrupted. Rows go to `stage.rows`."""
    started = time.perf_counter()
    stage.status = "running"
    for item in stage.items:
        left = deadline - time.perf_counter()
        if left <= 0:
            stage.rows.append({"item": item.name, "status": SKIPPED})
            continue
        previous = signal.signal(signal.SIGALRM, _raise_time_cap)
        signal.setitimer(signal.ITIMER_REAL, left + OVERRUN_GRACE_S)
        item_started = time.perf_counter()
        try:
            result = item.run()
            rows = result if isinstance(result, list) else [result]
        except TimeCapExceeded:
            stopped_after = time.perf_counter() - item_started
            rows = [{"status": f"stopped: time cap, after {stopped_after:.0f} s"}]
        except Exception as error:  # noqa: BLE001 (recorded; the suite goes on)
            rows = [{"status": f"failed: {one_line(error)}"}]
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        item_s = time.perf_counter() - item_started
        stage.rows += [{"item": item.name, **row, "item s": item_s} for row in rows]
        stage.wall_s = time.perf_counter() - started
        on_row()
    stage.wall_s = time.perf_counter() - started
    stage.status = stage_status(stage)


def run_suite(
    ctx: Context,
    out: Path,
    stage_numbers: set[int],
    budget_s: float,
    caps: dict[int, float] | None = None,
    stage_table: tuple[tuple[int, str, Callable[[Context], list[Item]]], ...] = STAGES,
) -> list[Stage]:
    """Every selected stage in order, each until its cap (and the whole within `budget_s`);
    the report is rewritten after every item."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    env = environment(ctx)
    caps = caps or STAGE_CAPS
    stages = [
        Stage(number, title, caps.get(number, 60.0), build(ctx))
        for number, title, build in stage_table
        if number in stage_numbers
    ]

    def after_item() -> None:
        write_report(out, env, stages, started)
        ctx.release()  # an item's tensors (or an OOM's leftovers) do not crowd the next

    after_item()
    for stage in stages:
        deadline = min(time.perf_counter() + stage.cap_s, started + budget_s - OVERRUN_GRACE_S)
        run_stage(stage, deadline, after_item)
        after_item()
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="gpu_suite.json and .md go here")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu for --dry-run")
    parser.add_argument("--stages", default="1,2,3,4,5", help="comma-separated stage numbers")
    parser.add_argument(
        "--budget", type=float, default=480.0, help="seconds for the whole suite (default 480)"
    )
    parser.add_argument(
        "--caps", default="", help="stage caps in seconds, e.g. 2=200,4=90 (default: STAGE_CAPS)"
    )
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: /tmp)")
    args = parser.parse_args()
    device = args.device or ("cpu" if args.dry_run else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_suite: --device cuda but torch sees no GPU (use --dry-run)", file=sys.stderr)
        raise SystemExit(2)
    try:
        numbers = {int(part) for part in args.stages.split(",")}
        caps = dict(STAGE_CAPS)
        for part in filter(None, args.caps.split(",")):
            number, seconds = part.split("=")
            caps[int(number)] = float(seconds)
    except ValueError:
        print(
            f"gpu_suite: --stages {args.stages!r} / --caps {args.caps!r}: need 1,2,3 and 2=200",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # as bench_pretrain.py sets it
    if args.dry_run:
        torch.set_num_threads(1)  # toy sizes: threads only contend on a shared CPU
    with tempfile.TemporaryDirectory(dir=args.work, prefix="gpu_suite_") as work:
        ctx = Context(device, args.dry_run, DRY if args.dry_run else FULL, Path(work))
        stages = run_suite(ctx, args.out, numbers, args.budget, caps)
    for stage in stages:
        print(f"stage {stage.number} {stage.title}: {stage.status} ({stage.wall_s:.1f} s)")
    print(f"wrote {args.out / 'gpu_suite.json'} and {args.out / 'gpu_suite.md'}")


if __name__ == "__main__":
    main()
