"""Object-aware multi-crop (spec §3): crop sampling, coverage, fallback, mask/image geometry."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from odis_core.crops.object_aware import (
    CropBox,
    ObjectIntegral,
    ObjectMultiCrop,
    draw_object_crop,
    object_coverage,
    patch_coverage,
    patchify,
    sample_crop_box,
    sample_object_crop,
)
from odis_core.crops.photometric import IMAGENET_MEAN, IMAGENET_STD, Photometric, normalize_only

RATIO = (3 / 4, 4 / 3)
OBJECT_RGB = (255, 0, 0)
BACKGROUND_RGB = (0, 0, 255)


def box_mask(hw, box_xyxy):
    mask = np.zeros(hw, dtype=bool)
    x0, y0, x1, y1 = box_xyxy
    mask[y0:y1, x0:x1] = True
    return mask


def contains(crop: CropBox, box_xyxy) -> bool:
    x0, y0, x1, y1 = box_xyxy
    return (crop.left <= x0 and crop.top <= y0
            and crop.left + crop.width >= x1 and crop.top + crop.height >= y1)


@pytest.mark.parametrize("image_hw", [(375, 500), (64, 64), (20, 300)])
@pytest.mark.parametrize("scale", [(0.05, 0.25), (0.25, 1.0), (0.95, 1.0)])
def test_crop_box_is_torchvision_random_resized_crop_from_a_generator(image_hw, scale):
    image = Image.new("RGB", (image_hw[1], image_hw[0]))
    for seed in range(30):
        torch.manual_seed(seed)
        expected = RandomResizedCrop.get_params(image, list(scale), list(RATIO))
        crop = sample_crop_box(image_hw, scale, RATIO, torch.Generator().manual_seed(seed))
        assert (crop.top, crop.left, crop.height, crop.width) == expected


def test_crop_box_distribution_stays_in_scale_and_ratio_and_ignores_global_rng():
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(123)
    global_state = torch.get_rng_state()
    fractions, aspects = [], []
    for _ in range(500):
        crop = sample_crop_box((300, 400), (0.05, 0.25), RATIO, generator)
        assert 0 <= crop.top and crop.top + crop.height <= 300
        assert 0 <= crop.left and crop.left + crop.width <= 400
        fractions.append(crop.height * crop.width / (300 * 400))
        aspects.append(crop.width / crop.height)
    # Rounding w and h to pixels moves area and aspect by a few percent at most.
    assert 0.05 * 0.9 <= min(fractions) and max(fractions) <= 0.25 * 1.1
    assert RATIO[0] * 0.95 <= min(aspects) and max(aspects) <= RATIO[1] * 1.05
    assert np.std(fractions) > 0.03  # spread over the range, not a constant
    assert torch.equal(torch.get_rng_state(), global_state)


def test_patch_coverage_is_the_exact_area_average_of_each_patch_footprint():
    rng = np.random.default_rng(0)
    mask = rng.random((40, 50)) < 0.4
    crop = CropBox(top=3, left=5, height=13, width=22)  # not divisible by the grid
    grid = (4, 3)
    coverage = patch_coverage(torch.from_numpy(mask).float(), crop, grid)
    # Upsample so every patch footprint is a whole number of pixels, then average.
    region = mask[3:16, 5:27].astype(np.float64)
    fine = np.repeat(np.repeat(region, grid[0], axis=0), grid[1], axis=1)
    expected = fine.reshape(grid[0], 13, grid[1], 22).mean(axis=(1, 3))
    np.testing.assert_allclose(coverage.numpy(), expected, atol=1e-5)
    inside = mask[3:16, 5:27].sum() / mask.sum()
    assert object_coverage(torch.from_numpy(mask).float(), crop) == pytest.approx(inside)


def test_patchify_thresholds_at_half_and_always_keeps_the_best_patch():
    coverage = torch.tensor([[0.2, 0.5], [0.49, 1.0]])
    assert patchify(coverage).tolist() == [False, True, False, True]
    empty = torch.tensor([[0.0, 0.1], [0.3, 0.05]])
    assert patchify(empty).tolist() == [False, False, True, False]


def production_crop(mask, box, scale, ratio, out_size, patch, is_global, generator,
                    max_tries=20, object_aware=True):
    """`draw_object_crop` (what ObjectMultiCrop uses) with `sample_object_crop`'s signature."""
    return draw_object_crop(ObjectIntegral(mask), box, scale, ratio, out_size, patch, is_global,
                            generator, max_tries=max_tries, object_aware=object_aware)


# Both samplers: the reference (one draw per try) and the production one (all tries at once).
SAMPLERS = pytest.mark.parametrize("sampler", [sample_object_crop, production_crop],
                                   ids=["reference", "production"])


def success_rate(object_aware: bool, is_global: bool, box_xyxy, image_hw=(128, 128),
                 sampler=sample_object_crop) -> float:
    mask = torch.from_numpy(box_mask(image_hw, box_xyxy)).float()
    scale = (0.25, 1.0) if is_global else (0.05, 0.25)
    out_size, patch = (32, 8) if is_global else (16, 8)
    generator = torch.Generator().manual_seed(1)
    successes = 0
    n_draws = 300
    for _ in range(n_draws):
        crop, _, _ = sampler(mask, box_xyxy, scale, RATIO, out_size, patch, is_global,
                             generator, object_aware=object_aware)
        if is_global:
            successes += contains(crop, box_xyxy)
        else:
            successes += bool(patch_coverage(mask, crop, (2, 2)).max() >= 0.5)
    return successes / n_draws


@SAMPLERS
def test_global_crops_contain_the_object_box_when_feasible(sampler):
    box = (70, 20, 100, 50)  # 30 x 30 object off-centre in a 128 x 128 image
    assert success_rate(True, True, box, sampler=sampler) >= 0.99
    assert success_rate(False, True, box, sampler=sampler) < 0.8


@SAMPLERS
def test_local_crops_put_a_patch_on_the_object_when_feasible(sampler):
    box = (10, 70, 60, 120)  # 50 x 50: a patch of a 5-25 % local crop fits on it
    assert success_rate(True, False, box, sampler=sampler) >= 0.99
    assert success_rate(False, False, box, sampler=sampler) < 0.6


def test_fallback_keeps_the_best_coverage_try_when_no_crop_can_succeed():
    image_hw = (64, 64)
    box = (2, 2, 62, 62)  # larger than any crop of at most half the image
    mask = torch.from_numpy(box_mask(image_hw, box)).float()
    scale = (0.25, 0.5)
    for seed in range(5):
        crop, tries, success = sample_object_crop(
            mask, box, scale, RATIO, 32, 8, True, torch.Generator().manual_seed(seed), max_tries=20
        )
        assert not success and tries == 20
        replay = torch.Generator().manual_seed(seed)
        candidates = [sample_crop_box(image_hw, scale, RATIO, replay) for _ in range(20)]
        coverages = [object_coverage(mask, c) for c in candidates]
        assert object_coverage(mask, crop) == pytest.approx(max(coverages))
        assert crop in candidates
        assert object_coverage(mask, crop) > np.median(coverages) or len(set(coverages)) == 1


def painted_scene(size=96):
    """An asymmetric object (an L) painted in a unique colour on a distinct background."""
    mask = np.zeros((size, size), dtype=bool)
    mask[20:70, 10:34] = True
    mask[50:70, 34:80] = True
    pixels = np.empty((size, size, 3), dtype=np.uint8)
    pixels[:] = BACKGROUND_RGB
    pixels[mask] = OBJECT_RGB
    return Image.fromarray(pixels), mask


def object_fraction_per_patch(view: torch.Tensor, patch: int) -> torch.Tensor:
    """(N,) float: per patch, how red the de-normalised pixels are (1 = all object colour)."""
    red = (view[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]).clamp(0, 1)
    grid = view.shape[-1] // patch
    return red.reshape(grid, patch, grid, patch).mean(dim=(1, 3)).reshape(-1)


def test_object_mask_follows_the_image_through_crop_resize_and_flip():
    image, mask = painted_scene()
    multicrop = ObjectMultiCrop(global_size=32, local_size=16, n_global=2, n_local=4,
                                patch_size=8, photometric=False)
    checked = mirrored_mismatches = 0
    for seed in range(25):
        views = multicrop(image, mask, torch.Generator().manual_seed(seed))
        pairs = list(zip(views.global_images + views.local_images,
                         views.global_patch_masks + views.local_patch_masks, strict=True))
        for view, patch_mask in pairs:
            assert patch_mask.dtype == torch.bool and patch_mask.any()
            fraction = object_fraction_per_patch(view, 8)
            clear = (fraction - 0.5).abs() > 0.15  # bicubic blurs edges by about a pixel
            assert torch.equal(patch_mask[clear], fraction[clear] >= 0.5)
            grid = int(patch_mask.numel() ** 0.5)
            mirrored = patch_mask.reshape(grid, grid).flip(1).reshape(-1)
            mirrored_mismatches += int((mirrored[clear] != (fraction[clear] >= 0.5)).sum())
            checked += int(clear.sum())
    assert checked > 500
    assert mirrored_mismatches > 50  # the check above would catch a mask that is not flipped


def test_multicrop_shapes_and_every_view_has_an_object_patch():
    image, mask = painted_scene()
    multicrop = ObjectMultiCrop(global_size=32, local_size=16, n_global=2, n_local=3, patch_size=8)
    views = multicrop(image, mask, torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views.global_images] == [(3, 32, 32)] * 2
    assert [tuple(v.shape) for v in views.local_images] == [(3, 16, 16)] * 3
    assert [tuple(m.shape) for m in views.global_patch_masks] == [(16,)] * 2
    assert [tuple(m.shape) for m in views.local_patch_masks] == [(4,)] * 3
    assert all(m.any() for m in views.global_patch_masks + views.local_patch_masks)
    assert views.crop_failures == 0


def test_photometric_augmentation_changes_pixels_deterministically_per_generator():
    rng = np.random.default_rng(0)
    view = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    augment = Photometric("global_1")  # blur always on: never the identity
    torch.manual_seed(7)
    global_state = torch.get_rng_state()
    first = augment(view, torch.Generator().manual_seed(3))
    again = augment(view, torch.Generator().manual_seed(3))
    other = augment(view, torch.Generator().manual_seed(4))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.allclose(first, normalize_only(view), atol=1e-3)
    assert torch.equal(torch.get_rng_state(), global_state)  # global RNG left untouched


def test_same_generator_seed_gives_identical_views():
    image, mask = painted_scene()
    multicrop = ObjectMultiCrop(global_size=32, local_size=16, n_local=2, patch_size=8)
    a = multicrop(image, mask, torch.Generator().manual_seed(5))
    b = multicrop(image, mask, torch.Generator().manual_seed(5))
    c = multicrop(image, mask, torch.Generator().manual_seed(6))
    assert all(torch.equal(x, y) for x, y in zip(a.global_images, b.global_images, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(a.local_images, b.local_images, strict=True))
    assert not torch.equal(a.global_images[0], c.global_images[0])


def blue_per_view(views) -> list[float]:
    """Per view, the largest de-normalised blue value (the scene's background is blue)."""
    return [float((view[2] * IMAGENET_STD[2] + IMAGENET_MEAN[2]).max())
            for view in views.global_images + views.local_images]


def test_background_removal_shows_the_object_alone_on_black_per_view():
    image, mask = painted_scene()
    always = ObjectMultiCrop(global_size=32, local_size=16, n_global=2, n_local=4,
                             patch_size=8, photometric=False, background_removal=1.0)
    half = ObjectMultiCrop(global_size=32, local_size=16, n_global=2, n_local=4,
                           patch_size=8, photometric=False, background_removal=0.5)
    removed = kept = 0
    for seed in range(20):
        views = always(image, mask, torch.Generator().manual_seed(seed))
        assert max(blue_per_view(views)) < 1e-3  # no background pixel survives
        # The object itself is left as it was: red where the mask says in-object.
        for view, patch_mask in zip(views.global_images, views.global_patch_masks, strict=True):
            assert object_fraction_per_patch(view, 8)[patch_mask].mean() > 0.5
        blues = blue_per_view(half(image, mask, torch.Generator().manual_seed(seed)))
        removed += sum(blue < 1e-3 for blue in blues)
        kept += sum(blue > 0.5 for blue in blues)
    # Drawn per view, not per image: both kinds occur, about equally often.
    assert removed + kept == 20 * 6 and 0.3 < removed / 120 < 0.7


def test_background_removal_off_keeps_the_random_stream_and_is_validated():
    image, mask = painted_scene()
    plain = ObjectMultiCrop(global_size=32, local_size=16, n_local=2, patch_size=8)
    off = ObjectMultiCrop(global_size=32, local_size=16, n_local=2, patch_size=8,
                          background_removal=0.0)
    a = plain(image, mask, torch.Generator().manual_seed(3))
    b = off(image, mask, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in
               zip(a.global_images + a.local_images, b.global_images + b.local_images, strict=True))
    with pytest.raises(ValueError, match="background_removal 1.5"):
        ObjectMultiCrop(background_removal=1.5)
    with pytest.raises(ValueError, match="rendered in the loader"):
        ObjectMultiCrop(background_removal=0.5, render_pixels=False)
