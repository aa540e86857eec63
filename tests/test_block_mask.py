"""iBOT block-wise MIM masks (BEiT-style) and iBOT's per-crop mask ratio."""

import numpy as np
import pytest
import torch

from odis_core.crops.block_mask import BlockMaskGenerator, sample_mask_ratio


def components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """4-connected components of the True cells."""
    seen = np.zeros_like(mask, dtype=bool)
    found = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        stack, cells = [start], []
        seen[start] = True
        while stack:
            y, x = stack.pop()
            cells.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                inside = 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1]
                if inside and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        found.append(cells)
    return found


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.3, 0.4, 0.5])
def test_masked_fraction_reaches_the_target_without_exceeding_it(ratio):
    masks = BlockMaskGenerator((14, 14), min_patches_per_block=16)
    target = round(ratio * 196)
    generator = torch.Generator().manual_seed(0)
    counts = [int(masks(ratio, generator).sum()) for _ in range(200)]
    assert max(counts) <= target
    assert np.mean(counts) >= target - 2.5
    assert min(counts) >= 0.65 * target


def test_masks_are_blocks_not_scattered_patches():
    masks = BlockMaskGenerator((14, 14), min_patches_per_block=16)
    generator = torch.Generator().manual_seed(1)
    for _ in range(50):
        mask = masks(0.4, generator).numpy()
        sizes = sorted(len(c) for c in components(mask))
        # Blocks are >= 16 patches (up to rounding) or merged from such blocks; only the
        # last top-up block may be small. Independent masking of 78 patches would leave
        # dozens of small pieces.
        assert len(sizes) <= 6
        assert sizes[-1] >= 12


def largest_filled_rectangle(mask: np.ndarray) -> int:
    """Area of the largest axis-aligned rectangle of True cells (brute force, small grids)."""
    table = np.pad(mask.astype(int).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    best = 0
    height, width = mask.shape
    for y0 in range(height):
        for y1 in range(y0 + 1, height + 1):
            for x0 in range(width):
                for x1 in range(x0 + 1, width + 1):
                    area = (y1 - y0) * (x1 - x0)
                    inside = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
                    if inside == area:
                        best = max(best, area)
    return best


def test_the_first_block_is_a_filled_rectangle_of_about_min_size():
    masks = BlockMaskGenerator((14, 14), min_patches_per_block=16)
    generator = torch.Generator().manual_seed(2)
    for _ in range(20):
        mask = masks(20 / 196, generator).numpy()  # one block of >= 16 and a small top-up
        # Rounding h and w of a 16-patch block with aspect in [0.3, 3.3] leaves >= 12.
        assert largest_filled_rectangle(mask) >= 12


def test_tiny_grids_still_get_masked():
    masks = BlockMaskGenerator((4, 4), min_patches_per_block=16)
    generator = torch.Generator().manual_seed(3)
    counts = [int(masks(0.3, generator).sum()) for _ in range(50)]  # target 5 of 16
    assert max(counts) <= 5 and min(counts) >= 3


def test_zero_ratio_masks_nothing():
    masks = BlockMaskGenerator((14, 14))
    assert not masks(0.0, torch.Generator().manual_seed(0)).any()


def test_masks_are_deterministic_per_seed():
    masks = BlockMaskGenerator((14, 14))
    a = masks(0.3, torch.Generator().manual_seed(9))
    b = masks(0.3, torch.Generator().manual_seed(9))
    c = masks(0.3, torch.Generator().manual_seed(10))
    assert a.shape == (14, 14) and a.dtype == torch.bool
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ibot_mask_ratio_half_unmasked_half_in_point_one_to_point_five():
    generator = torch.Generator().manual_seed(0)
    ratios = np.array([sample_mask_ratio((0.0, 0.3), (0.0, 0.2), generator) for _ in range(2000)])
    zeros = ratios == 0.0
    assert 0.45 < zeros.mean() < 0.55
    masked = ratios[~zeros]
    assert masked.min() >= 0.1 and masked.max() <= 0.5
    assert masked.min() < 0.12 and masked.max() > 0.48  # spread over the whole range
    again = torch.Generator().manual_seed(0)
    assert sample_mask_ratio((0.0, 0.3), (0.0, 0.2), again) == ratios[0]
