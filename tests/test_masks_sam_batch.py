"""The batched generator gives the plain SAM generator's masks, with one encoder pass."""

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator

from odis_core.masks.sam import load_sam
from odis_core.masks.sam_batch import BatchedMaskGenerator


@pytest.fixture
def sam(tiny_sam_checkpoint):
    return load_sam("vit_b", tiny_sam_checkpoint)


def images():
    rng = np.random.default_rng(0)
    shapes = [(48, 64), (64, 40), (30, 30)]  # landscape, portrait, square: padding differs
    out = []
    for h, w in shapes:
        image = np.zeros((h, w, 3), dtype=np.uint8)
        for _ in range(3):
            y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
            image[y : y + h // 3, x : x + w // 3] = rng.integers(0, 256, 3)
        out.append(image)
    return out


def key(records):
    return [
        (r["segmentation"]["counts"], round(r["predicted_iou"], 4), round(r["stability_score"], 4))
        for r in records
    ]


# The tiny random SAM's scores sit below SAM's default thresholds: keep every mask.
KEEP_ALL = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


@pytest.mark.parametrize(
    "settings",
    [{"points_per_side": 6, **KEEP_ALL}, {"points_per_side": 4, "crop_n_layers": 1, **KEEP_ALL}],
)
def test_batched_masks_equal_the_plain_generator(sam, settings):
    plain = SamAutomaticMaskGenerator(sam, output_mode="coco_rle", **settings)
    batched = BatchedMaskGenerator(sam, output_mode="coco_rle", **settings)
    expected = [plain.generate(image) for image in images()]
    got = batched.generate_batch(images())
    assert sum(len(r) for r in expected) > 0
    assert [key(r) for r in got] == [key(r) for r in expected]


def test_the_encoder_runs_once_per_batch(sam, monkeypatch):
    calls = []
    original = sam.image_encoder.forward
    monkeypatch.setattr(
        sam.image_encoder, "forward", lambda x: calls.append(x.shape[0]) or original(x)
    )
    BatchedMaskGenerator(sam, output_mode="coco_rle", points_per_side=4).generate_batch(images())
    assert calls == [3]


def test_bf16_is_only_used_on_cuda(sam):
    assert not BatchedMaskGenerator(sam, bf16=True, points_per_side=4).bf16
    assert torch.float32 == next(sam.parameters()).dtype
