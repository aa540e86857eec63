"""SAM throughput: our batched generator versus segment-anything's generator image by image.

Same model, settings and images for both; random weights (timing only: masks from random
weights mean nothing, and the thresholds are set to 0 so both paths keep every mask and
do the same work). Run:

    PYTHONPATH=. python3 benchmarks/bench_masks_sam.py --quick            # CPU, tiny SAM
    PYTHONPATH=. python3 benchmarks/bench_masks_sam.py --model-type vit_b --device cuda \\
        --images 64 --batch-size 16                                      # the GPU figure
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from segment_anything import SamAutomaticMaskGenerator, sam_model_registry

from odis_core.masks.sam_batch import BatchedMaskGenerator, batched_generator


def tiny_sam():
    """segment-anything's own modules at toy size (64 px input), for CPU runs."""
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=64,
            patch_size=16,
            embed_dim=32,
            depth=1,
            num_heads=2,
            mlp_ratio=2.0,
            out_chans=32,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=32, image_embedding_size=(4, 4), input_image_size=(64, 64), mask_in_chans=4
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=1, embedding_dim=32, mlp_dim=32, num_heads=2),
            transformer_dim=32,
            iou_head_depth=2,
            iou_head_hidden_dim=16,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def synthetic_images(n: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        image = np.zeros((height, width, 3), dtype=np.uint8)
        for _ in range(6):
            y, x = rng.integers(0, height * 3 // 4), rng.integers(0, width * 3 // 4)
            image[y : y + height // 4, x : x + width // 4] = rng.integers(0, 256, 3)
        images.append(image)
    return images


def timed(run, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare_generators(
    model, images: list[np.ndarray], settings: dict, batch_size: int, bf16: bool, device: str
) -> tuple[float, float, BatchedMaskGenerator]:
    """Seconds of SamAutomaticMaskGenerator image by image and of our batched generator
    (batches of `batch_size`) over the same images and settings, each after a warm-up;
    and our generator (its settings label the result)."""
    plain = SamAutomaticMaskGenerator(model, output_mode="coco_rle", **settings)
    ours = batched_generator(model, settings, bf16=bf16)
    with torch.inference_mode():
        plain.generate(images[0])  # warm-up (CUDA context, cuDNN autotune)
        ours.generate_batch(images[: min(2, len(images))])
        plain_s = timed(lambda: [plain.generate(image) for image in images], device)
        batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
        ours_s = timed(lambda: [ours.generate_batch(batch) for batch in batches], device)
    return plain_s, ours_s, ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-type", default="tiny", choices=["tiny", "vit_b", "vit_l", "vit_h"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--points-per-side", type=int, default=None, help="SAM default: 32")
    parser.add_argument("--no-bf16", action="store_true")
    parser.add_argument("--quick", action="store_true", help="8 images of 96x128, 8x8 points")
    args = parser.parse_args()
    if args.quick:
        args.images, args.size, args.points_per_side = 8, (96, 128), 8
    torch.manual_seed(0)
    model = tiny_sam() if args.model_type == "tiny" else sam_model_registry[args.model_type]()
    model = model.to(args.device).eval()
    settings = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    if args.points_per_side is not None:
        settings["points_per_side"] = args.points_per_side
    images = synthetic_images(args.images, *args.size)

    plain_s, ours_s, ours = compare_generators(
        model, images, settings, args.batch_size, not args.no_bf16, args.device
    )

    table = Table(
        title=f"SAM {args.model_type} on {args.device}: {args.images} images "
        f"{args.size[0]}x{args.size[1]}, random weights"
    )
    for column in ("path", "images/s", "speed-up"):
        table.add_column(column, justify="right" if column != "path" else "left")
    table.add_row(
        "SamAutomaticMaskGenerator, image by image", f"{args.images / plain_s:.2f}", "1.00x"
    )
    label = f"odis batched (batch {args.batch_size}, encoder {'bf16' if ours.bf16 else 'fp32'}, "
    label += f"{ours.points_per_batch} prompts/pass)"
    table.add_row(label, f"{args.images / ours_s:.2f}", f"{plain_s / ours_s:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
