"""Raw-pixel floor for the Fashion-MNIST scenes: k-NN on the object's own pixels (issue 17).

Each object is cut from its scene with every pixel outside its visible mask set to black,
cropped to its box, resized to 28 x 28 and turned grey; the 784 values are the feature.
Weighted k-NN (k = 20, T = 0.07, cosine similarity) on the same bank and test objects as
`small_data_sweep.py`. No learning: a floor the pretrained features must one day pass.

    python examples/raw_pixel_baseline.py --workdir runs/small_data   # writes raw_pixels.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

sys.path.insert(0, str(Path(__file__).resolve().parent))
import small_data_sweep as sweep  # noqa: E402  (a sibling script, not a package)

from odis_core.evaluate.knn import weighted_knn  # noqa: E402
from odis_core.masks.store import MaskStore  # noqa: E402

SIDE = 28


def object_pixels(images_root: Path, store: MaskStore) -> tuple[np.ndarray, np.ndarray]:
    """(N, 784) float32 blacked-out box crops and (N,) labels, in the store's order."""
    rows, labels = [], []
    for record in store.images:
        scene = np.asarray(Image.open(images_root / record.file_name).convert("L"))
        for obj in store.objects_of(record.image_id):
            mask = mask_utils.decode(obj.rle).astype(bool)
            x, y, w, h = (int(round(v)) for v in obj.bbox_xywh)
            cut = np.where(mask, scene, 0)[y:y + max(h, 1), x:x + max(w, 1)]
            small = Image.fromarray(cut.astype(np.uint8)).resize((SIDE, SIDE), Image.BILINEAR)
            rows.append(np.asarray(small, dtype=np.float32).ravel() / 255.0)
            labels.append(obj.category_id)
    return np.stack(rows), np.asarray(labels, dtype=np.int64)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--source", type=Path, default=sweep.experiment.DEFAULT_SOURCE)
    parser.add_argument("--train-scenes", type=int, default=1024)
    parser.add_argument("--test-scenes", type=int, default=300)
    parser.add_argument("--bank-scenes", type=int, default=333)
    parser.add_argument("--canvas-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    images, stores = sweep.build_data(args)
    bank = object_pixels(images["bank"], stores["bank"])
    test = object_pixels(images["test"], stores["test"])
    report = weighted_knn(*bank, *test, ks=(sweep.K,), temperature=sweep.TEMPERATURE).to_json()
    result = {"top1": report["results"][str(sweep.K)]["top1"],
              "top5": report["results"][str(sweep.K)]["top5"],
              "n_bank": report["n_train"], "n_test": report["n_test"],
              "feature": f"blacked-out box crop, {SIDE}x{SIDE} grey", "k": sweep.K}
    (args.workdir / "raw_pixels.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
