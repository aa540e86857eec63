"""Property tests (hypothesis): crops and RLE hold for any box, any image size, any mask.

The example-based tests pin exact behaviour on chosen inputs; these search the input space
for the corner the examples missed (1-pixel objects, 1-pixel-wide images, objects on the
border, masks of every shape).
"""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from odis_core.crops.object_aware import (
    ObjectIntegral,
    ObjectMultiCrop,
    draw_object_crop,
    sample_object_crop,
)
from odis_core.crops.photometric import IMAGENET_MEAN, IMAGENET_STD
from odis_core.masks.store import MaskStore, ObjectRecord, encode_mask, object_from_mask

PATCH = 8
GLOBAL_SIZE, LOCAL_SIZE = 32, 16
# Bicubic resampling rings at edges and averages over slightly more than a patch footprint,
# so a patch's brightness tracks its exact coverage only to within this margin.
RESAMPLING_SLACK = 0.25

PROPERTY_SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@st.composite
def image_and_box(draw):
    """An image size from 1x1 to 96x96 and a box (x0, y0, x1, y1) anywhere inside it."""
    height = draw(st.integers(1, 96))
    width = draw(st.integers(1, 96))
    x0 = draw(st.integers(0, width - 1))
    y0 = draw(st.integers(0, height - 1))
    x1 = draw(st.integers(x0 + 1, width))
    y1 = draw(st.integers(y0 + 1, height))
    return (height, width), (x0, y0, x1, y1)


def _box_mask(hw, box):
    mask = np.zeros(hw, dtype=bool)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = True
    return mask


def _patch_brightness(view: torch.Tensor) -> torch.Tensor:
    """(gh * gw,) mean grey level in [0, 1] of each patch of a normalised view."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = (view * std + mean).mean(0)  # (S, S)
    size = pixels.shape[0]
    grid = size // PATCH
    return pixels.reshape(grid, PATCH, grid, PATCH).mean(dim=(1, 3)).reshape(-1)


@PROPERTY_SETTINGS
@given(image_and_box(), st.integers(0, 2**31 - 1))
def test_multicrop_patch_masks_are_never_empty_and_stay_aligned_with_the_image(
    image_box, seed
):
    hw, box = image_box
    mask = _box_mask(hw, box)
    # White object on black: a view's pixels show where the object went, so a patch mask
    # that was cropped, resized or flipped differently from the image is caught.
    image = Image.fromarray((mask * 255).astype(np.uint8)).convert("RGB")
    multicrop = ObjectMultiCrop(
        global_size=GLOBAL_SIZE, local_size=LOCAL_SIZE, n_global=2, n_local=3,
        patch_size=PATCH, photometric=False,
    )
    views = multicrop(image, mask, torch.Generator().manual_seed(seed))

    pairs = list(zip(views.global_images, views.global_patch_masks, strict=True)) + list(
        zip(views.local_images, views.local_patch_masks, strict=True)
    )
    for view, patch_mask in pairs:
        assert patch_mask.dtype == torch.bool
        assert patch_mask.numel() == (view.shape[-1] // PATCH) ** 2
        assert patch_mask.any(), "a view without any object patch"
        brightness = _patch_brightness(view)
        # Patches left out have coverage < 0.5, so they cannot be mostly white.
        assert (brightness[~patch_mask] <= 0.5 + RESAMPLING_SLACK).all()
        # Patches kept have coverage >= 0.5, except the one kept because it is the best
        # (when no patch reaches 0.5), so check them when more than one is kept.
        if patch_mask.sum() > 1:
            assert (brightness[patch_mask] >= 0.5 - RESAMPLING_SLACK).all()


def _production_crop(mask, *args):
    return draw_object_crop(ObjectIntegral(mask), *args)


# The reference sampler (one draw per try) and the production one ObjectMultiCrop uses.
@pytest.mark.parametrize("sampler", [sample_object_crop, _production_crop],
                         ids=["reference", "production"])
@PROPERTY_SETTINGS
@given(image_and_box(), st.integers(0, 2**31 - 1), st.booleans())
def test_a_successful_crop_shows_its_object(sampler, image_box, seed, is_global):
    hw, box = image_box
    mask = torch.from_numpy(_box_mask(hw, box))
    scale = (0.25, 1.0) if is_global else (0.05, 0.25)
    size = GLOBAL_SIZE if is_global else LOCAL_SIZE
    crop, tries, success = sampler(
        mask, box, scale, (3 / 4, 4 / 3), size, PATCH, is_global,
        torch.Generator().manual_seed(seed),
    )
    height, width = hw
    assert 1 <= tries <= 20
    assert 0 <= crop.top and crop.top + crop.height <= height and crop.height >= 1
    assert 0 <= crop.left and crop.left + crop.width <= width and crop.width >= 1
    if success and is_global:
        x0, y0, x1, y1 = box
        assert crop.left <= x0 and crop.top <= y0
        assert crop.left + crop.width >= x1 and crop.top + crop.height >= y1


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 64),
    st.integers(1, 64),
    st.sampled_from(["random", "empty", "full", "stripes"]),
    st.integers(0, 2**32 - 1),
)
def test_rle_round_trips_any_mask(height, width, kind, seed):
    rng = np.random.default_rng(seed)
    if kind == "random":
        mask = rng.random((height, width)) < rng.random()
    elif kind == "empty":
        mask = np.zeros((height, width), dtype=bool)
    elif kind == "full":
        mask = np.ones((height, width), dtype=bool)
    else:
        mask = (np.arange(width) % 2 == 0)[None, :].repeat(height, axis=0)

    rle = encode_mask(mask)
    assert isinstance(rle["counts"], str), "RLE counts must be JSON-ready text"
    assert list(rle["size"]) == [height, width]

    record = object_from_mask(mask, object_id=1, image_id=1)
    decoded = MaskStore.decode(record, height, width)
    assert decoded.dtype == bool and decoded.shape == (height, width)
    np.testing.assert_array_equal(decoded, mask)
    assert record.area == mask.sum()
    if mask.any():
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        x, y, w, h = record.bbox_xywh
        assert (x, y) == (cols[0], rows[0])
        assert (w, h) == (cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1)


def test_rle_round_trip_survives_a_json_store_text_round_trip():
    # The store keeps RLE counts as text; the decode must not depend on bytes vs str.
    import json

    mask = np.zeros((5, 7), dtype=bool)
    mask[1:4, 2:6] = True
    rle = json.loads(json.dumps(encode_mask(mask)))
    record = ObjectRecord(
        object_id=1, image_id=1, category_id=-1, bbox_xywh=(2.0, 1.0, 4.0, 3.0), area=12.0,
        rle=rle,
    )
    np.testing.assert_array_equal(MaskStore.decode(record, 5, 7), mask)
