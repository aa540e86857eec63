"""Whole images decoded and resized on the inference device (`odis embed --decode-on device`).

At image level and for masked/meanpool objects the model input is the whole image resized
to a square; decoding and resizing it is most of a loader process's work (~100 images/s
per core), so a GPU embedding thousands of images per second would wait for its loader.
Here the loader only reads the file and its header; `torchvision.io.decode_jpeg` decodes
the batch on the device (nvJPEG on CUDA) and `interpolate(bicubic, antialias=True)`,
torch's counterpart of PIL's bicubic resize, makes the square input.

Only files the device decodes exactly as `load_rgb` would are sent this way: complete
JPEGs in RGB or grayscale, upright (no EXIF rotation), within the pixel limit. Every other
file (PNG, CMYK, rotated, suspect) is decoded by the loader as before, in the same batch.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg

from odis_core.crops.photometric import IMAGENET_MEAN, IMAGENET_STD
from odis_core.images import MAX_IMAGE_PIXELS, open_image, orientation_of

_JPEG_END = b"\xff\xd9"


def encoded_jpeg(path: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[Tensor, int, int] | None:
    """(file bytes as a 1-D uint8 tensor, width, height) when the device can decode `path`,
    else None (the caller decodes it with `load_rgb`, which also reports broken files)."""
    try:
        with open_image(path, max_pixels) as image:
            if image.format != "JPEG" or image.mode not in ("RGB", "L"):
                return None
            if orientation_of(image) != 1:
                return None
            width, height = image.size
        data = path.read_bytes()
    except Exception:  # noqa: BLE001 (load_rgb gives the one-line reason)
        return None
    # A file cut short has no end-of-image marker: let PIL report it.
    if not data.rstrip(b"\x00").endswith(_JPEG_END):
        return None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), width, height


def model_inputs(
    entries: Tensor | list[Tensor], size: int, device: str
) -> tuple[Tensor, list[int]]:
    """(M, 3, size, size) normalised inputs on `device` from loader entries, each either a
    ready (3, size, size) tensor or encoded JPEG bytes (1-D uint8); and the indices of
    entries whose bytes did not decode (their rows are left zero: drop them)."""
    if isinstance(entries, Tensor):  # every entry decoded by the loader, already stacked
        return entries.to(device, non_blocking=True), []
    out = torch.zeros((len(entries), 3, size, size), device=device)
    encoded = [i for i, entry in enumerate(entries) if entry.ndim == 1]
    for i, entry in enumerate(entries):
        if entry.ndim != 1:
            out[i] = entry.to(device, non_blocking=True)
    decoded, failed = _decode_all([entries[i] for i in encoded], device)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)
    for index, pixels in zip(encoded, decoded, strict=True):
        if pixels is None:
            continue
        resized = F.interpolate(
            pixels[None].float(),
            size=(size, size),
            mode="bicubic",
            antialias=True,
            align_corners=False,
        )[0]
        out[index] = (resized.clamp_(0.0, 255.0) / 255.0 - mean) / std
    return out, [encoded[j] for j in failed]


def _decode_all(data: list[Tensor], device: str) -> tuple[list[Tensor | None], list[int]]:
    """Decode a batch at once; when that fails, one by one, to find the broken files."""
    if not data:
        return [], []
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device)), []
    except RuntimeError:
        decoded: list[Tensor | None] = []
        failed = []
        for index, one in enumerate(data):
            try:
                decoded.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
                failed.append(index)
        return decoded, failed
