"""Mask store at ImageNet scale: write + index time, peak memory, per-image lookup.

Synthetic objects: COCO-like compressed RLEs of random ellipses on 480x640 images (a pool
of distinct masks reused cyclically, so the RLE strings have realistic lengths), 10 per
image by default. Run:

    PYTHONPATH=. python3 benchmarks/bench_masks_store.py                 # 1.28 M x 10
    PYTHONPATH=. python3 benchmarks/bench_masks_store.py --quick         # 20 k x 10
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from odis_core.masks.store import ImageRecord, ObjectRecord, StoreWriter, encode_mask, read_store

HEIGHT, WIDTH = 480, 640


def mask_pool(n_masks: int, seed: int = 0) -> list[tuple[dict, tuple, float]]:
    """(rle, bbox, area) of `n_masks` random ellipses."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    pool = []
    for _ in range(n_masks):
        cy, cx = rng.uniform(0, HEIGHT), rng.uniform(0, WIDTH)
        ry, rx = rng.uniform(10, HEIGHT / 3), rng.uniform(10, WIDTH / 3)
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        rle = encode_mask(mask)
        pool.append((rle, tuple(float(v) for v in mask_utils.toBbox(rle)), float(mask.sum())))
    return pool


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1_280_000)
    parser.add_argument("--objects-per-image", type=int, default=10)
    parser.add_argument("--lookups", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true", help="20 000 images")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: tmp)")
    args = parser.parse_args()
    n_images = 20_000 if args.quick else args.images
    k = args.objects_per_image
    workdir = Path(tempfile.mkdtemp(dir=args.dir, prefix="odis-bench-store-"))
    try:
        pool = mask_pool(257)
        rss_before = peak_rss_gib()
        start = time.perf_counter()
        writer = StoreWriter(workdir / "store", {1: "thing"}, source="coco")
        object_id = 0
        for image_id in range(1, n_images + 1):
            objects = []
            for _ in range(k):
                rle, bbox, area = pool[object_id % len(pool)]
                object_id += 1
                objects.append(ObjectRecord(object_id, image_id, 1, bbox, area, rle, 0.9))
            writer.add(ImageRecord(image_id, f"train/{image_id:08d}.JPEG", WIDTH, HEIGHT), objects)
        writer.close()
        write_s = time.perf_counter() - start

        start = time.perf_counter()
        store = read_store(workdir / "store")
        open_s = time.perf_counter() - start
        rng = np.random.default_rng(1)
        ids = rng.integers(1, n_images + 1, size=args.lookups)
        start = time.perf_counter()
        found = sum(len(store.objects_of(int(i))) for i in ids)
        lookup_us = (time.perf_counter() - start) / args.lookups * 1e6
        assert found == k * args.lookups
        disk_gib = sum(f.stat().st_size for f in (workdir / "store").rglob("*") if f.is_file())
        disk_gib /= 2**30

        table = Table(title=f"mask store: {n_images:,} images x {k} objects (synthetic RLEs)")
        table.add_column("measure")
        table.add_column("value", justify="right")
        table.add_row("objects", f"{store.n_objects:,}")
        table.add_row("write + index (s)", f"{write_s:.1f}")
        table.add_row("open (s)", f"{open_s:.2f}")
        table.add_row("objects_of, random image (us)", f"{lookup_us:.1f}")
        table.add_row("peak RSS, whole process (GiB)", f"{peak_rss_gib():.2f}")
        table.add_row("peak RSS before writing (GiB)", f"{rss_before:.2f}")
        table.add_row("on disk (GiB)", f"{disk_gib:.2f}")
        Console().print(table)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
