"""iBOT's block-wise masked-image-modelling masks (BEiT-style), spec §5 and §10.

The student sees each global crop with some patches replaced by a mask token; the patch
loss is taken at those positions. iBOT masks rectangular blocks (>= 16 patches, aspect
0.3-3.3) rather than independent patches: neighbouring patches are too easy to copy from.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    # Like random.uniform: also fine when high < low (iBOT relies on that near the end).
    return low + (high - low) * torch.rand((), generator=generator, dtype=torch.float64).item()


def sample_mask_ratio(
    pred_ratio: tuple[float, ...] = (0.0, 0.3),
    pred_ratio_var: tuple[float, ...] = (0.0, 0.2),
    generator: torch.Generator | None = None,
) -> float:
    """One crop's masking ratio, iBOT's `get_pred_ratio`.

    For each (mean, var) pair draw uniform(mean - var, mean + var) (mean when var is 0),
    then pick one of the draws uniformly. With the defaults half of the crops are unmasked
    and the rest are masked at a ratio in [0.1, 0.5].
    """
    if generator is None:
        raise ValueError("sample_mask_ratio needs an explicit torch.Generator")
    if len(pred_ratio) != len(pred_ratio_var) or not pred_ratio:
        raise ValueError("pred_ratio and pred_ratio_var must be non-empty and of equal length")
    draws = []
    for mean, var in zip(pred_ratio, pred_ratio_var, strict=True):
        if var > mean:
            raise ValueError(f"pred_ratio_var {var} exceeds pred_ratio {mean}")
        draws.append(_uniform(mean - var, mean + var, generator) if var > 0 else float(mean))
    choice = int(torch.randint(0, len(draws), (1,), generator=generator).item())
    return draws[choice]


class BlockMaskGenerator:
    """Masks of rectangular patch blocks on a (gh, gw) grid; see `__call__`."""

    def __init__(
        self,
        grid_hw: tuple[int, int],
        min_patches_per_block: int = 16,
        aspect_range: tuple[float, float] = (0.3, 1 / 0.3),
    ) -> None:
        if min_patches_per_block < 1:
            raise ValueError("min_patches_per_block must be >= 1")
        self.grid_h, self.grid_w = grid_hw
        self.min_patches_per_block = min_patches_per_block
        self.log_aspect = (math.log(aspect_range[0]), math.log(aspect_range[1]))

    def __call__(self, mask_ratio: float, generator: torch.Generator) -> Tensor:
        """(gh, gw) bool: True = patch replaced by the mask token.

        Blocks are added until round(mask_ratio * gh * gw) patches are masked or no block
        fits in 10 attempts; the count never exceeds that target.
        """
        mask = torch.zeros(self.grid_h, self.grid_w, dtype=torch.bool)
        target = round(mask_ratio * self.grid_h * self.grid_w)
        # Tiny grids (tests, small crops) cannot hold a 16-patch block; shrink the minimum.
        min_block = min(self.min_patches_per_block, target)
        count = 0
        while count < target:
            added = self._add_block(mask, min_block, target - count, generator)
            if added == 0:
                break
            count += added
        return mask

    def _add_block(
        self, mask: Tensor, min_block: int, max_new: int, generator: torch.Generator
    ) -> int:
        for _ in range(10):
            area = _uniform(min_block, max_new, generator)
            aspect = math.exp(_uniform(*self.log_aspect, generator))
            block_h = max(1, int(round(math.sqrt(area * aspect))))
            block_w = max(1, int(round(math.sqrt(area / aspect))))
            if block_h > self.grid_h or block_w > self.grid_w:
                continue
            top = int(torch.randint(0, self.grid_h - block_h + 1, (1,), generator=generator))
            left = int(torch.randint(0, self.grid_w - block_w + 1, (1,), generator=generator))
            block = mask[top : top + block_h, left : left + block_w]
            # Only newly masked patches count; the block must add some and not overshoot.
            new = int((~block).sum())
            if 0 < new <= max_new:
                block.fill_(True)
                return new
        return 0
