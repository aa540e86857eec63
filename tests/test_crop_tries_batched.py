"""Object-aware crop tries drawn in one generator call (`draw_object_crop`, what
`ObjectMultiCrop` uses) against the one-draw-per-try reference (`sample_object_crop`)."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

import odis_core.crops.object_aware as object_aware
from odis_core.crops.object_aware import (
    ObjectIntegral,
    ObjectMultiCrop,
    draw_crop_boxes,
    draw_object_crop,
    patchify,
    sample_crop_box,
    sample_object_crop,
)

RATIO = (3 / 4, 4 / 3)


def blob_mask(hw, seed, radius=(0.05, 0.45)):
    """A random ellipse object somewhere in the image (never empty); radii as fractions."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0 : hw[0], 0 : hw[1]]
    cy, cx = rng.uniform(0.1, 0.9) * hw[0], rng.uniform(0.1, 0.9) * hw[1]
    ry, rx = rng.uniform(*radius) * hw[0], rng.uniform(*radius) * hw[1]
    mask = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1
    mask[int(cy), int(cx)] = True
    return mask


def box_of(mask):
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def ks_statistic(a, b):
    """Two-sample Kolmogorov-Smirnov distance between the samples a and b."""
    values = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), values, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), values, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


@pytest.mark.parametrize("scale", [(0.05, 0.25), (0.25, 1.0)])
def test_batched_draws_have_random_resized_crop_s_distribution(scale):
    image_hw, n = (300, 400), 3000
    image = Image.new("RGB", (image_hw[1], image_hw[0]))
    torch.manual_seed(0)
    reference = np.array(
        [RandomResizedCrop.get_params(image, list(scale), list(RATIO)) for _ in range(n)]
    )  # (top, left, h, w)
    drawn = np.array(
        [
            (c.top, c.left, c.height, c.width)
            for c in draw_crop_boxes(image_hw, scale, RATIO, n, torch.Generator().manual_seed(0))
        ]
    )
    top, left, h, w = drawn.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= image_hw[0]).all() and (left + w <= image_hw[1]).all()

    def features(boxes):
        top, left, h, w = boxes.T.astype(np.float64)
        free_y, free_x = np.maximum(image_hw[0] - h, 1), np.maximum(image_hw[1] - w, 1)
        return h * w / (image_hw[0] * image_hw[1]), w / h, top / free_y, left / free_x

    # 3000 vs 3000 draws: a KS distance of 0.05 is beyond the 0.1 % level (critical ~0.05).
    for ours, theirs in zip(features(drawn), features(reference), strict=True):
        assert ks_statistic(ours, theirs) < 0.05
    # A wrong distribution is caught: half the scale range moves the area far away.
    narrow = np.array(
        [
            (c.top, c.left, c.height, c.width)
            for c in draw_crop_boxes(
                image_hw, (scale[0], sum(scale) / 2), RATIO, n, torch.Generator()
            )
        ]
    )
    assert ks_statistic(features(narrow)[0], features(reference)[0]) > 0.2


def test_batched_draws_fall_back_to_the_central_crop_like_torchvision():
    image_hw, scale = (20, 300), (0.95, 1.0)  # no 3/4..4/3 crop of 95 % fits: always central
    image = Image.new("RGB", (image_hw[1], image_hw[0]))
    expected = RandomResizedCrop.get_params(image, list(scale), list(RATIO))
    drawn = draw_crop_boxes(image_hw, scale, RATIO, 50, torch.Generator().manual_seed(1))
    assert {(c.top, c.left, c.height, c.width) for c in drawn} == {tuple(expected)}


def test_local_pre_check_never_changes_the_outcome_of_the_patch_test():
    rejected = 0
    for seed in range(20):
        mask = blob_mask((64, 80), seed, (0.03, 0.3))
        integral = ObjectIntegral(mask)
        crops = draw_crop_boxes(
            (64, 80), (0.02, 0.3), RATIO, 100, torch.Generator().manual_seed(seed)
        )
        for crop in crops:
            for grid in ((2, 2), (4, 4), (3, 5)):
                exact = integral.patch_coverage_array(crop, grid).max() >= 0.5
                fast = object_aware._shows_object(integral, crop, (0, 0, 1, 1), grid, False)
                assert fast == exact
                cell = (crop.height / grid[0]) * (crop.width / grid[1])
                rejected += integral.box_sum(crop) < 0.5 * cell
    assert rejected > 500  # the pre-check decided many of them


def test_image_objective_crops_are_the_one_draw_per_try_crops():
    mask = blob_mask((50, 70), 0)
    integral = ObjectIntegral(mask)
    for seed in range(10):
        crop, used, success = draw_object_crop(
            integral,
            box_of(mask),
            (0.05, 1.0),
            RATIO,
            32,
            8,
            True,
            torch.Generator().manual_seed(seed),
            object_aware=False,
        )
        expected = sample_crop_box(
            (50, 70), (0.05, 1.0), RATIO, torch.Generator().manual_seed(seed)
        )
        assert (crop, used, success) == (expected, 1, True)


@pytest.mark.parametrize("is_global", [True, False])
def test_choice_among_the_tries_is_the_one_at_a_time_rule(is_global, monkeypatch):
    """Fed the same tries, `sample_object_crop` (one draw and one full check per try) and
    `draw_object_crop` (one draw for all tries, pre-checked) keep the same crop, also when
    all 20 fail and the best-coverage try is kept."""
    image_hw = (72, 96)
    scale = (0.2, 0.5) if is_global else (0.02, 0.1)  # small: many tries fail, some all 20
    out_size, patch = (32, 8) if is_global else (16, 8)
    outcomes = {True: 0, False: 0}
    for seed in range(60):
        # Small objects for the local crops, so that some crops fail all 20 tries.
        mask = blob_mask(image_hw, seed, (0.05, 0.45) if is_global else (0.02, 0.12))
        integral, box = ObjectIntegral(mask), box_of(mask)
        tries = draw_crop_boxes(image_hw, scale, RATIO, 20, torch.Generator().manual_seed(seed))
        replay = iter(tries)
        monkeypatch.setattr(object_aware, "sample_crop_box", lambda *_, r=replay: next(r))
        crop, used, success = sample_object_crop(
            integral, box, scale, RATIO, out_size, patch, is_global, torch.Generator()
        )
        monkeypatch.undo()
        # The same 20 tries from the same seed, checked with the pre-check, in one call.
        drawn = draw_object_crop(
            integral,
            box,
            scale,
            RATIO,
            out_size,
            patch,
            is_global,
            torch.Generator().manual_seed(seed),
        )
        assert drawn == (crop, used, success)
        outcomes[success] += 1
    assert outcomes[True] > 5 and outcomes[False] > 5  # both branches were exercised


@pytest.mark.parametrize("is_global", [True, False])
def test_batched_crops_show_their_object_as_often_as_the_reference(is_global):
    image_hw = (128, 128)
    box = (70, 20, 100, 50) if is_global else (10, 70, 60, 120)
    mask = np.zeros(image_hw, dtype=bool)
    mask[box[1] : box[3], box[0] : box[2]] = True
    integral = ObjectIntegral(mask)
    scale = (0.25, 1.0) if is_global else (0.05, 0.25)
    out_size, patch = (32, 8) if is_global else (16, 8)
    generator = torch.Generator().manual_seed(1)
    shown = {True: 0, False: 0}
    for aware in (True, False):
        for _ in range(300):
            crop, used, success = draw_object_crop(
                integral,
                box,
                scale,
                RATIO,
                out_size,
                patch,
                is_global,
                generator,
                object_aware=aware,
            )
            if is_global:
                x0, y0, x1, y1 = box
                ok = (
                    crop.left <= x0
                    and crop.top <= y0
                    and crop.left + crop.width >= x1
                    and crop.top + crop.height >= y1
                )
            else:
                ok = integral.patch_coverage_array(crop, (2, 2)).max() >= 0.5
            assert ok or not success or not aware  # an object-aware success shows it
            assert aware or used == 1
            shown[aware] += ok
    assert shown[True] / 300 >= 0.99
    assert shown[False] / 300 < (0.8 if is_global else 0.6)


def test_multicrop_patch_masks_are_the_coverage_of_the_kept_crops(monkeypatch):
    """The patch masks still come from the exact coverage of each kept crop (flipped with
    the view): recorded crops and flips reproduce them."""
    mask = blob_mask((80, 80), 7)
    image = Image.fromarray(np.where(mask[..., None], 255, 0).astype(np.uint8).repeat(3, 2))
    kept = []
    original = object_aware.draw_object_crop

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        kept.append(result[0])
        return result

    monkeypatch.setattr(object_aware, "draw_object_crop", recording)
    multicrop = ObjectMultiCrop(
        global_size=32, local_size=16, n_local=4, patch_size=8, render_pixels=False
    )
    views = multicrop(image, mask, torch.Generator().manual_seed(2))
    integral = ObjectIntegral(mask)
    plans = views.global_plans + views.local_plans
    masks = views.global_patch_masks + views.local_patch_masks
    for crop, plan, patch_mask, size in zip(kept, plans, masks, [32, 32] + [16] * 4, strict=True):
        assert plan.crop == crop
        coverage = integral.patch_coverage(crop, (size // 8, size // 8))
        if plan.flip:
            coverage = torch.flip(coverage, dims=[1])
        assert torch.equal(patch_mask, patchify(coverage))
