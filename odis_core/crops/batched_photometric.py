"""DINO/iBOT photometric augmentation of a whole batch of views at once, on any device.

Spec §13: a per-image PIL pipeline cannot feed 1,200 img/s from 16 cores, so with
`augment_on="device"` the loader only *draws* each view's parameters (from the sample's
own generator, so a view still depends only on (seed, epoch, index)) and the training
process applies them to every view of the batch in a few tensor ops on the GPU.

The recipe is the one of `photometric.py` (the PIL path), computed the way torchvision's
tensor transforms compute it:
- colour jitter p=0.8: brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, applied in
  a random order per view (as `ColorJitter` does per call);
- grayscale p=0.2;
- Gaussian blur, sigma ~ U[0.1, 2.0] px, p = 1.0 / 0.1 / 0.5 (global 1 / global 2 / local),
  a true Gaussian truncated at 3 x the largest sigma (13 taps), reflect padding;
- solarize p=0.2 on global view 2 only, above 128/255;
- then ImageNet normalisation.
PIL rounds to 8 bits after every operation and approximates the blur with box filters;
the tensor path does neither, so the two paths draw from the same distributions but do
not produce identical pixels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from odis_core.crops.photometric import (
    BLUR_SIGMA,
    IBOT_PHOTOMETRIC,
    IMAGENET_MEAN,
    IMAGENET_STD,
    JITTER_STRENGTH,
    PhotometricSettings,
    ViewKind,
)

BRIGHTNESS, CONTRAST, SATURATION, HUE = JITTER_STRENGTH
SOLARIZE_THRESHOLD = 128 / 255
BLUR_TAPS = 2 * math.ceil(3 * BLUR_SIGMA[1]) + 1

# Columns of a view's parameter row; the jitter ops are numbered in ORDER_COLUMNS by
# BRIGHTNESS_OP .. HUE_OP, the order in which the view applies them.
APPLY_JITTER, BRIGHTNESS_FACTOR, CONTRAST_FACTOR, SATURATION_FACTOR, HUE_FACTOR = range(5)
ORDER_COLUMNS = slice(5, 9)
APPLY_GRAYSCALE, APPLY_BLUR, BLUR_SIGMA_COLUMN, APPLY_SOLARIZE = range(9, 13)
N_PARAMS = 13
BRIGHTNESS_OP, CONTRAST_OP, SATURATION_OP, HUE_OP = range(4)


def draw_photometric_params(
    kind: ViewKind,
    generator: torch.Generator,
    enabled: bool = True,
    settings: PhotometricSettings = IBOT_PHOTOMETRIC,
) -> Tensor:
    """(N_PARAMS,) float32: one view's augmentation, drawn from `generator`.

    Always the same number of draws, whatever is applied, so the generator's stream (and
    with it the next view's crop) does not depend on this view's coin flips.
    enabled=False: the same draws, every flag off (normalisation only).
    """

    def uniform(low: float, high: float) -> float:
        return torch.empty(1).uniform_(low, high, generator=generator).item()

    def coin(probability: float) -> float:
        return float(torch.rand((), generator=generator).item() < probability and enabled)

    brightness, contrast, saturation, hue = settings.jitter_strength()
    params = torch.zeros(N_PARAMS)
    params[APPLY_JITTER] = coin(settings.jitter_prob)
    params[BRIGHTNESS_FACTOR] = uniform(1 - brightness, 1 + brightness)
    params[CONTRAST_FACTOR] = uniform(1 - contrast, 1 + contrast)
    params[SATURATION_FACTOR] = uniform(1 - saturation, 1 + saturation)
    params[HUE_FACTOR] = uniform(-hue, hue)
    params[ORDER_COLUMNS] = torch.randperm(4, generator=generator).float()
    params[APPLY_GRAYSCALE] = coin(settings.grayscale_prob)
    params[APPLY_BLUR] = coin(settings.blur_prob(kind))
    params[BLUR_SIGMA_COLUMN] = uniform(*BLUR_SIGMA)
    params[APPLY_SOLARIZE] = coin(settings.solarize_prob_of(kind))
    return params


def apply_photometric(images: Tensor, params: Tensor) -> Tensor:
    """(V, 3, S, S) float in [0, 1] + (V, N_PARAMS) -> (V, 3, S, S) ImageNet-normalised.

    Which views take which op is read from `params` on the host: pass them on the CPU (as
    `PendingViews.to` leaves them) and no step waits for the GPU to pick its rows.
    """
    if images.ndim != 4 or images.shape[1] != 3 or params.shape != (images.shape[0], N_PARAMS):
        raise ValueError(f"need (V, 3, S, S) images and (V, {N_PARAMS}) params")
    images = images.float()
    host = params.detach().to("cpu", torch.float32)
    factors = host.to(images.device, non_blocking=True)

    def rows_where(selected: Tensor) -> Tensor | None:
        rows = torch.nonzero(selected).squeeze(1)
        return rows.to(images.device, non_blocking=True) if rows.numel() else None

    jitter = host[:, APPLY_JITTER] > 0.5
    order = host[:, ORDER_COLUMNS].long()
    for position in range(4):
        for op in (BRIGHTNESS_OP, CONTRAST_OP, SATURATION_OP, HUE_OP):
            # Each op runs only on the views that apply it at this position of their order.
            rows = rows_where(jitter & (order[:, position] == op))
            if rows is not None:
                images = images.index_copy(0, rows, _JITTER_OPS[op](images[rows], factors[rows]))
    rows = rows_where(host[:, APPLY_GRAYSCALE] > 0.5)
    if rows is not None:
        images = images.index_copy(0, rows, _grayscale(images[rows]).expand(-1, 3, -1, -1))
    rows = rows_where(host[:, APPLY_BLUR] > 0.5)
    if rows is not None:
        images = images.index_copy(
            0, rows, gaussian_blur(images[rows], factors[rows, BLUR_SIGMA_COLUMN])
        )
    solarize = (factors[:, APPLY_SOLARIZE] > 0.5).view(-1, 1, 1, 1)
    images = torch.where(solarize & (images >= SOLARIZE_THRESHOLD), 1.0 - images, images)
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def gaussian_blur(images: Tensor, sigmas: Tensor) -> Tensor:
    """(V, C, H, W) blurred with a per-view sigma: separable 13-tap kernels, reflect pad.

    The kernel is torchvision's `gaussian_blur` kernel (taps at -6..6, normalised).
    """
    views, channels, height, width = images.shape
    half = BLUR_TAPS // 2
    taps = torch.arange(-half, half + 1, device=images.device, dtype=images.dtype)
    kernels = torch.exp(-0.5 * (taps[None, :] / sigmas.to(images.dtype)[:, None]) ** 2)
    kernels = kernels / kernels.sum(dim=1, keepdim=True)  # (V, taps)
    # One grouped convolution for all views: every (view, channel) plane is its own group.
    weight = kernels.repeat_interleave(channels, dim=0)  # (V * C, taps)
    planes = images.reshape(1, views * channels, height, width)
    planes = F.pad(planes, (half, half, half, half), mode="reflect")
    planes = F.conv2d(planes, weight[:, None, None, :], groups=views * channels)
    planes = F.conv2d(planes, weight[:, None, :, None], groups=views * channels)
    return planes.reshape(views, channels, height, width)


def _grayscale(images: Tensor) -> Tensor:
    # ITU-R 601-2 luma, the weights of torchvision's rgb_to_grayscale (and PIL's "L").
    red, green, blue = images.unbind(dim=1)
    return (0.2989 * red + 0.587 * green + 0.114 * blue).unsqueeze(1)


def _blend(images: Tensor, other: Tensor, factors: Tensor) -> Tensor:
    factors = factors.view(-1, 1, 1, 1)
    return (factors * images + (1.0 - factors) * other).clamp(0.0, 1.0)


def _brightness(images: Tensor, params: Tensor) -> Tensor:
    return _blend(images, torch.zeros_like(images), params[:, BRIGHTNESS_FACTOR])


def _contrast(images: Tensor, params: Tensor) -> Tensor:
    mean = _grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(images, mean, params[:, CONTRAST_FACTOR])


def _saturation(images: Tensor, params: Tensor) -> Tensor:
    return _blend(images, _grayscale(images), params[:, SATURATION_FACTOR])


def _hue(images: Tensor, params: Tensor) -> Tensor:
    hue, saturation, value = _rgb_to_hsv(images)
    hue = torch.remainder(hue + params[:, HUE_FACTOR].view(-1, 1, 1), 1.0)
    return _hsv_to_rgb(hue, saturation, value)


_JITTER_OPS = {
    BRIGHTNESS_OP: _brightness,
    CONTRAST_OP: _contrast,
    SATURATION_OP: _saturation,
    HUE_OP: _hue,
}


def _rgb_to_hsv(images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # Pillow's conversion (as torchvision's tensor adjust_hue uses it); hue in [0, 1).
    red, green, blue = images.unbind(dim=1)
    max_c = images.amax(dim=1)
    min_c = images.amin(dim=1)
    grey = max_c == min_c  # hue and saturation are 0; avoids 0 / 0
    chroma = max_c - min_c
    saturation = chroma / torch.where(grey, torch.ones_like(max_c), max_c)
    safe_chroma = torch.where(grey, torch.ones_like(chroma), chroma)
    red_c = (max_c - red) / safe_chroma
    green_c = (max_c - green) / safe_chroma
    blue_c = (max_c - blue) / safe_chroma
    hue_red = (max_c == red) * (blue_c - green_c)
    hue_green = ((max_c == green) & (max_c != red)) * (2.0 + red_c - blue_c)
    hue_blue = ((max_c != green) & (max_c != red)) * (4.0 + green_c - red_c)
    hue = torch.remainder((hue_red + hue_green + hue_blue) / 6.0 + 1.0, 1.0)
    return hue, saturation, max_c


def _hsv_to_rgb(hue: Tensor, saturation: Tensor, value: Tensor) -> Tensor:
    sector = torch.floor(hue * 6.0)
    fraction = hue * 6.0 - sector
    sector = sector.long() % 6
    p = (value * (1.0 - saturation)).clamp(0.0, 1.0)
    q = (value * (1.0 - saturation * fraction)).clamp(0.0, 1.0)
    t = (value * (1.0 - saturation * (1.0 - fraction))).clamp(0.0, 1.0)
    # Per sector (0..5), which of (v, q, p, t) each channel takes.
    red = torch.stack((value, q, p, p, t, value), dim=1)
    green = torch.stack((t, value, value, q, p, p), dim=1)
    blue = torch.stack((p, p, t, value, value, q), dim=1)
    index = sector.unsqueeze(1)
    return torch.cat([channel.gather(1, index) for channel in (red, green, blue)], dim=1)
