"""Views cut, resized, flipped and augmented on the training device (`augment_on="device"`).

The loader decodes the image and samples every view's crop box, flip and photometric
parameters (the object-aware part, spec §3); it ships the decoded image once as uint8
instead of twelve float views, and the device renders all views of a batch in one
`roi_align` per crop size plus the batched photometric ops (spec §13).

Resampling: `roi_align` with aligned pixel centres and an adaptive sampling grid averages
ceil(crop / output) bilinear samples per output pixel along each axis, so a downscale is
area-averaged (antialiased) and an upscale is bilinear. The PIL path resizes with bicubic
filtering; the footprint of every output pixel, and so the patch masks, is the same.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.ops import roi_align

from odis_core.crops.batched_photometric import apply_photometric

# Larger images are downscaled (area filter) before they are shipped: a global crop covers
# at least a quarter of the image, so at 1024 px it is still downscaled to 224, and one huge
# image would otherwise set the padded size of its whole batch.
MAX_SOURCE_SIDE = 1024


@dataclass
class PendingViews:
    """A batch's views as the loader planned them, not yet rendered (crop-major rows)."""

    sources: Tensor  # (B, 3, H, W) uint8: each image edge-padded to the batch's largest
    global_boxes: Tensor  # (G*B, 5) float: source row, x0, y0, x1, y1 in source pixels
    local_boxes: Tensor | None  # (L*B, 5)
    global_flips: Tensor  # (G*B,) bool: flip the view horizontally
    local_flips: Tensor | None
    global_params: Tensor  # (G*B, N_PARAMS) photometric parameters
    local_params: Tensor | None

    def map_tensors(self, fn: Callable[[Tensor], Tensor]) -> PendingViews:
        """A copy with `fn` applied to every tensor (`to`, `pin_memory`)."""
        changes = {
            name: fn(value)
            for name in self.__dataclass_fields__
            if isinstance(value := getattr(self, name), Tensor)
        }
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PendingViews:
        """Images, boxes and flips to `device`; the photometric parameters (a few numbers a
        view) stay on the host, where `apply_photometric` reads them without a device sync."""
        moved = self.map_tensors(lambda tensor: tensor.to(device, non_blocking=non_blocking))
        return dataclasses.replace(
            moved, global_params=self.global_params, local_params=self.local_params
        )


def source_tensor(image: Image.Image) -> tuple[Tensor, tuple[float, float]]:
    """(3, H, W) uint8 of an RGB image, downscaled to MAX_SOURCE_SIDE; and (x, y) scales.

    Crop boxes drawn on the full-size image map onto the shipped one by those scales.
    """
    old_width, old_height = image.width, image.height
    longest = max(old_width, old_height)
    if longest > MAX_SOURCE_SIDE:
        ratio = MAX_SOURCE_SIDE / longest
        size = (max(1, round(old_width * ratio)), max(1, round(old_height * ratio)))
        image = image.resize(size, Image.Resampling.BOX)
    array = np.asarray(image, dtype=np.uint8)
    scales = (image.width / old_width, image.height / old_height)
    return torch.from_numpy(array.transpose(2, 0, 1).copy()), scales


def pad_sources(sources: list[Tensor]) -> Tensor:
    """Stack (3, Hi, Wi) uint8 images into (B, 3, H, W), repeating each one's edge pixels.

    Edge padding, not zeros: bilinear samples in the last half pixel of a smaller image
    then read that image's own border, as they would without the padding.
    """
    height = max(source.shape[1] for source in sources)
    width = max(source.shape[2] for source in sources)
    out = torch.empty((len(sources), 3, height, width), dtype=torch.uint8)
    for row, source in enumerate(sources):
        _, h, w = source.shape
        out[row, :, :h, :w] = source
        out[row, :, h:, :w] = source[:, h - 1 : h, :]
        out[row, :, :, w:] = out[row, :, :, w - 1 : w]
    return out


def render(sources: Tensor, boxes: Tensor, flips: Tensor, params: Tensor, size: int) -> Tensor:
    """(V, 3, size, size) ImageNet-normalised views; sources (B, 3, H, W) uint8 or float."""
    images = sources.float()
    if sources.dtype == torch.uint8:
        images = images / 255.0
    views = roi_align(
        images, boxes.to(images.dtype), output_size=size, sampling_ratio=-1, aligned=True
    )
    views = torch.where(flips.view(-1, 1, 1, 1), views.flip(-1), views)
    return apply_photometric(views.clamp_(0.0, 1.0), params)


def render_pending(
    pending: PendingViews, global_size: int, local_size: int
) -> tuple[Tensor, Tensor | None]:
    """(global views, local views or None) of a batch, rendered where `pending` lives."""
    global_views = render(
        pending.sources,
        pending.global_boxes,
        pending.global_flips,
        pending.global_params,
        global_size,
    )
    local_views = None
    if pending.local_boxes is not None:
        assert pending.local_flips is not None and pending.local_params is not None
        local_views = render(
            pending.sources,
            pending.local_boxes,
            pending.local_flips,
            pending.local_params,
            local_size,
        )
    return global_views, local_views
