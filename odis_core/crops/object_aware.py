"""Object-aware multi-crop (ODIS spec §3): every view of an image shows its target object.

Per image one target object is chosen (by the dataset); here each crop is drawn with
RandomResizedCrop's distribution and re-drawn, up to `max_tries` times, until it shows the
object: a global crop must contain the object's whole box, a local crop must put at least
one output patch at >= 50 % object coverage. When no try succeeds the try with the largest
object coverage is kept: an image is never dropped.

Geometry (crop, resize, flip) is applied identically to the image and to the object mask;
the mask never goes through the photometric augmentations. The mask is not resampled as
pixels at all: each output patch's coverage is the exact area integral of the object over
the patch's footprint in the source image (a summed-area table), flipped with the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode

from odis_core.crops.batched_photometric import draw_photometric_params
from odis_core.crops.photometric import (
    IBOT_PHOTOMETRIC,
    Photometric,
    PhotometricSettings,
    normalize_only,
    view_kind,
)
from odis_core.crops.stage_clock import StageClock

# Spec §3: "a patch is in when the object covers at least half of it".
PATCH_IN_THRESHOLD = 0.5


@dataclass(frozen=True)
class CropBox:
    """A crop of the source image in pixels: rows [top, top+height), cols [left, left+width)."""

    top: int
    left: int
    height: int
    width: int


def sample_crop_box(
    image_hw: tuple[int, int],
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> CropBox:
    """One draw of torchvision's RandomResizedCrop over an image of `image_hw` = (H, W).

    Same distribution and the same sequence of draws as `RandomResizedCrop.get_params`
    (10 attempts of area-scale uniform and log-ratio uniform, then the central fallback),
    but from the explicit `generator`: get_params uses the global RNG, which would make a
    sample's crops depend on the worker and the samples before it, and break exact resume.
    """
    height, width = image_hw
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        log_aspect = torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)
        aspect_ratio = torch.exp(log_aspect).item()
        crop_w = int(round(math.sqrt(target_area * aspect_ratio)))
        crop_h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(torch.randint(0, height - crop_h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - crop_w + 1, size=(1,), generator=generator).item())
            return CropBox(top, left, crop_h, crop_w)
    return _central_crop(image_hw, ratio)


class ObjectIntegral:
    """Summed-area table of one object mask: O(1) coverage of any box, exact at any scale.

    The continuous integral of a pixel-constant mask is bilinear inside each pixel cell,
    so bilinear interpolation of the table at fractional coordinates is exact; the 20
    re-draws of 12 crops then cost almost nothing next to decoding the image. NumPy, not
    torch: these are a few dozen tiny array ops per crop, where torch's per-op overhead
    was most of a loader worker's time (benchmarks/bench_pretrain.py --loader-only).
    """

    def __init__(self, object_mask: Tensor | np.ndarray) -> None:
        """object_mask: (H, W) bool or float in [0, 1], 1 where the object is."""
        if isinstance(object_mask, Tensor):
            object_mask = object_mask.detach().cpu().numpy()
        mask = np.asarray(object_mask, dtype=np.float64)
        if mask.ndim != 2:
            raise ValueError(f"object mask must be (H, W), got shape {tuple(mask.shape)}")
        self.height, self.width = mask.shape
        # table[y, x] = object area in rows [0, y) x cols [0, x); (H + 1, W + 1).
        self.table = np.zeros((self.height + 1, self.width + 1), dtype=np.float64)
        np.cumsum(mask, axis=0, out=self.table[1:, 1:])
        np.cumsum(self.table[1:, 1:], axis=1, out=self.table[1:, 1:])
        self.total = float(self.table[-1, -1])

    def box_sum(self, crop: CropBox) -> float:
        """Object area (pixels) inside the integer box `crop`."""
        t = self.table
        y0, x0 = crop.top, crop.left
        y1, x1 = crop.top + crop.height, crop.left + crop.width
        return float(t[y1, x1] - t[y0, x1] - t[y1, x0] + t[y0, x0])

    def object_coverage(self, crop: CropBox) -> float:
        """Fraction of the object's area inside `crop` (0 for an empty object)."""
        return self.box_sum(crop) / self.total if self.total > 0 else 0.0

    def patch_coverage(self, crop: CropBox, grid: tuple[int, int]) -> Tensor:
        """(gh, gw) float: fraction of each output patch's footprint in `crop` that is object."""
        return torch.from_numpy(self.patch_coverage_array(crop, grid))

    def patch_coverage_array(self, crop: CropBox, grid: tuple[int, int]) -> np.ndarray:
        """`patch_coverage` as a (gh, gw) float32 NumPy array."""
        grid_h, grid_w = grid
        edges_y = crop.top + _even_edges(crop.height, grid_h)
        edges_x = crop.left + _even_edges(crop.width, grid_w)
        rows = self._lerp(self.table, edges_y, self.height)  # (gh + 1, W + 1)
        integral = self._lerp(rows.T, edges_x, self.width).T  # (gh + 1, gw + 1)
        sums = integral[1:, 1:] - integral[:-1, 1:] - integral[1:, :-1] + integral[:-1, :-1]
        cell_area = (crop.height / grid_h) * (crop.width / grid_w)
        return np.minimum(np.maximum(sums / cell_area, 0.0), 1.0).astype(np.float32)

    @staticmethod
    def _lerp(table: np.ndarray, coords: np.ndarray, size: int) -> np.ndarray:
        # Rows of `table` at fractional positions `coords` in [0, size].
        low = np.minimum(np.maximum(coords.astype(np.int64), 0), max(size - 1, 0))  # floor: >= 0
        frac = (coords - low)[:, None]
        return table[low] * (1 - frac) + table[np.minimum(low + 1, size)] * frac


def _even_edges(length: int, parts: int) -> np.ndarray:
    # np.linspace(0, length, parts + 1) without its per-call overhead (same values).
    edges = np.arange(parts + 1, dtype=np.float64) * (length / parts)
    edges[-1] = length
    return edges


def object_coverage(object_mask: Tensor, crop: CropBox) -> float:
    """Fraction of the object's pixels inside `crop`; object_mask: (H, W) float in [0, 1]."""
    return ObjectIntegral(object_mask).object_coverage(crop)


def patch_coverage(object_mask: Tensor, crop: CropBox, grid: tuple[int, int]) -> Tensor:
    """(gh, gw) float: fraction of each output patch covered by the object.

    The crop region is divided into gh x gw equal cells (the footprints of the output
    patches after the resize) and each cell's exact area average of `object_mask`
    ((H, W) float in [0, 1]) is returned. Flip it with the image (`torch.flip(., [1])`).
    """
    return ObjectIntegral(object_mask).patch_coverage(crop, grid)


def patchify(coverage: Tensor, threshold: float = PATCH_IN_THRESHOLD) -> Tensor:
    """(gh * gw,) bool, row-major: True for patches with coverage >= threshold.

    Always at least the best-covered patch, so the [OBJ] row never attends to nothing
    (spec §3.4) even when a fallback crop barely touches the object.
    """
    flat = coverage.reshape(-1)
    inside = flat >= threshold
    inside[torch.argmax(flat)] = True
    return inside


def visible_patch_mask(
    integral: ObjectIntegral, crop: CropBox, flip: bool, grid: tuple[int, int]
) -> Tensor:
    """(gh * gw,) bool, row-major: the patches of a view where an object that is NOT the
    view's target covers >= 50 % (the same exact rule as `patchify`, flipped with the view).

    Unlike `patchify`, no patch is forced in: another object may be outside the view, and
    an all-false mask is how it says so (issue 19, several objects per image)."""
    coverage = integral.patch_coverage_array(crop, grid)
    if flip:
        coverage = coverage[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(coverage).reshape(-1) >= PATCH_IN_THRESHOLD)


def _contains_box(crop: CropBox, box_xyxy: tuple[float, float, float, float]) -> bool:
    x0, y0, x1, y1 = box_xyxy
    return (
        crop.left <= x0
        and crop.top <= y0
        and crop.left + crop.width >= x1
        and crop.top + crop.height >= y1
    )


def sample_object_crop(
    object_mask: Tensor | ObjectIntegral,
    object_box_xyxy: tuple[float, float, float, float],
    scale: tuple[float, float],
    ratio: tuple[float, float],
    out_size: int,
    patch_size: int,
    is_global: bool,
    generator: torch.Generator,
    max_tries: int = 20,
    object_aware: bool = True,
) -> tuple[CropBox, int, bool]:
    """Draw a crop that shows the object; returns (crop, tries used, success).

    object_mask: (H, W) float (or its prebuilt ObjectIntegral). object_box_xyxy: the
    object's box in pixels, (x0, y0) inclusive, (x1, y1) exclusive. A global crop succeeds
    when it contains the whole box; a local crop when one of its (out_size / patch_size)^2
    output patches has coverage >= 0.5. After `max_tries` failures the try with the largest
    object coverage (then largest best-patch coverage) is kept. The generator is used only
    for `sample_crop_box` draws, one per try. object_aware=False: one plain draw, no check
    (the `image` objective and the "no object-aware crops" ablation).
    """
    integral = (
        object_mask if isinstance(object_mask, ObjectIntegral) else ObjectIntegral(object_mask)
    )
    image_hw = (integral.height, integral.width)
    if not object_aware:
        return sample_crop_box(image_hw, scale, ratio, generator), 1, True
    grid = (out_size // patch_size, out_size // patch_size)
    best_crop, best_score = None, (-1.0, -1.0)
    for attempt in range(1, max_tries + 1):
        crop = sample_crop_box(image_hw, scale, ratio, generator)
        if is_global:
            if _contains_box(crop, object_box_xyxy):
                return crop, attempt, True
            score = (integral.object_coverage(crop), 0.0)
        else:
            best_patch = float(integral.patch_coverage_array(crop, grid).max())
            if best_patch >= PATCH_IN_THRESHOLD:
                return crop, attempt, True
            score = (integral.object_coverage(crop), best_patch)
        if score > best_score:
            best_crop, best_score = crop, score
    assert best_crop is not None  # max_tries >= 1 is checked by the callers
    return best_crop, max_tries, False


class CropDraws:
    """RandomResizedCrop tries for one crop: the first attempt of every try drawn up front
    in ONE generator call ((tries, 4) float64 uniforms), each try's box computed on demand
    in plain Python.

    Each try follows `sample_crop_box`'s procedure (up to 10 attempts of area-scale uniform
    and log-ratio uniform, the first that fits, a uniform position; else the central
    fallback), so its distribution is RandomResizedCrop's. The rare try whose first attempt
    does not fit draws its other 9 attempts when it is computed. A crop thus costs about one
    torch call instead of ~8 per try (what made object-aware crops slow).
    """

    def __init__(
        self,
        image_hw: tuple[int, int],
        scale: tuple[float, float],
        ratio: tuple[float, float],
        tries: int,
        generator: torch.Generator,
    ) -> None:
        self.height, self.width = image_hw
        self.ratio = ratio
        self.generator = generator
        self.area = float(self.height * self.width)
        self.scale_low, self.scale_span = scale[0], scale[1] - scale[0]
        self.log_low = math.log(ratio[0])
        self.log_span = math.log(ratio[1]) - self.log_low
        self.first_attempts = torch.rand((tries, 4), generator=generator, dtype=torch.float64)
        self.first_attempts = self.first_attempts.tolist()

    def __len__(self) -> int:
        return len(self.first_attempts)

    def box(self, index: int) -> CropBox:
        """Try `index`'s crop (call in order: a try may draw its further attempts)."""
        crop = self._attempt(*self.first_attempts[index])
        if crop is not None:
            return crop
        more = torch.rand((9, 4), generator=self.generator, dtype=torch.float64).tolist()
        for uniforms in more:
            crop = self._attempt(*uniforms)
            if crop is not None:
                return crop
        return _central_crop((self.height, self.width), self.ratio)

    def _attempt(
        self, u_area: float, u_ratio: float, u_top: float, u_left: float
    ) -> CropBox | None:
        height, width = self.height, self.width
        target_area = self.area * (self.scale_low + self.scale_span * u_area)
        aspect = math.exp(self.log_low + self.log_span * u_ratio)
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if not (0 < crop_w <= width and 0 < crop_h <= height):
            return None
        # A uniform integer in [0, H - h] (torch.randint's range) from a uniform in [0, 1).
        top = min(int(u_top * (height - crop_h + 1)), height - crop_h)
        left = min(int(u_left * (width - crop_w + 1)), width - crop_w)
        return CropBox(top, left, crop_h, crop_w)


def draw_crop_boxes(
    image_hw: tuple[int, int],
    scale: tuple[float, float],
    ratio: tuple[float, float],
    n: int,
    generator: torch.Generator,
) -> list[CropBox]:
    """`n` RandomResizedCrop boxes from one generator call (`CropDraws`)."""
    draws = CropDraws(image_hw, scale, ratio, n, generator)
    return [draws.box(index) for index in range(n)]


def _central_crop(image_hw: tuple[int, int], ratio: tuple[float, float]) -> CropBox:
    # RandomResizedCrop's fallback after 10 attempts that do not fit (as in sample_crop_box).
    height, width = image_hw
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_h, crop_w = height, int(round(height * max(ratio)))
    else:
        crop_h, crop_w = height, width
    return CropBox((height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w)


def _shows_object(
    integral: ObjectIntegral,
    crop: CropBox,
    object_box_xyxy: tuple[float, float, float, float],
    grid: tuple[int, int],
    is_global: bool,
) -> bool:
    """`sample_object_crop`'s success test for one try, with a cheap exact pre-check."""
    if is_global:
        return _contains_box(crop, object_box_xyxy)
    # A patch at >= 50 % coverage needs at least half a patch of object inside the crop
    # (the patch integrals sum to the crop's). Most misses stop here, four table reads
    # instead of the patch grid. The margin (far above float64 rounding of the integrals
    # and the float32 rounding of the coverage) only lets borderline crops through to the
    # exact test, so the outcome is always `sample_object_crop`'s.
    cell_area = (crop.height / grid[0]) * (crop.width / grid[1])
    if integral.box_sum(crop) < PATCH_IN_THRESHOLD * cell_area * (1 - 1e-6) - 1e-6:
        return False
    return float(integral.patch_coverage_array(crop, grid).max()) >= PATCH_IN_THRESHOLD


def draw_object_crop(
    integral: ObjectIntegral,
    object_box_xyxy: tuple[float, float, float, float],
    scale: tuple[float, float],
    ratio: tuple[float, float],
    out_size: int,
    patch_size: int,
    is_global: bool,
    generator: torch.Generator,
    max_tries: int = 20,
    object_aware: bool = True,
) -> tuple[CropBox, int, bool]:
    """`sample_object_crop` with its `max_tries` tries drawn in one generator call
    (`CropDraws`); returns (crop, tries used, success) by the same rule: the first try that
    shows the object, else the first try of the largest (object coverage, best-patch
    coverage). What `ObjectMultiCrop` uses.

    For a seed, not the crops of `sample_object_crop` (the uniforms are drawn at once), but
    the same distribution of tries and the same choice among them. object_aware=False is
    `sample_crop_box`, the same draws as before (the image objective's crops are unchanged).
    """
    image_hw = (integral.height, integral.width)
    if not object_aware:
        return sample_crop_box(image_hw, scale, ratio, generator), 1, True
    draws = CropDraws(image_hw, scale, ratio, max_tries, generator)
    grid = (out_size // patch_size, out_size // patch_size)
    tried = []
    for index in range(max_tries):
        crop = draws.box(index)
        if _shows_object(integral, crop, object_box_xyxy, grid, is_global):
            return crop, index + 1, True
        tried.append(crop)
    return tried[select_fallback(integral, tried, grid, is_global)], max_tries, False


def select_fallback(
    integral: ObjectIntegral, tried: list[CropBox], grid: tuple[int, int], is_global: bool
) -> int:
    """Index of the try `sample_object_crop` keeps when none succeeded: the first of the
    largest (object coverage, best-patch coverage; 0 for global crops). The best-patch
    coverage only breaks ties, so only the tied tries' patch grids are computed."""
    coverage = [integral.object_coverage(crop) for crop in tried]
    best = max(coverage)
    tied = [index for index, value in enumerate(coverage) if value == best]
    if is_global or len(tied) == 1:
        return tied[0]
    best_patch = {
        index: float(integral.patch_coverage_array(tried[index], grid).max()) for index in tied
    }
    return max(tied, key=best_patch.__getitem__)  # max() keeps the first of equals


@dataclass(frozen=True)
class ViewPlan:
    """A view drawn but not rendered (`render_pixels=False`): the device renders it."""

    crop: CropBox  # in the source image's pixels
    flip: bool  # horizontal flip after the resize
    photometric: Tensor  # (N_PARAMS,) from `draw_photometric_params`


@dataclass
class MultiCropViews:
    """The views of one image and, per view, which of its patches show the target object.

    With `render_pixels=False` the image lists stay empty and the plan lists hold the views.
    """

    global_images: list[Tensor]  # each (3, Sg, Sg) float, ImageNet-normalised
    local_images: list[Tensor]  # each (3, Sl, Sl)
    global_patch_masks: list[Tensor]  # each (Ng,) bool, Ng = (Sg / p)^2: True where in-object
    local_patch_masks: list[Tensor]  # each (Nl,) bool
    crop_failures: int  # crops that fell back to the best-coverage try
    global_plans: list[ViewPlan] = field(default_factory=list)
    local_plans: list[ViewPlan] = field(default_factory=list)
    # Every view's geometry, globals then locals: (crop in source pixels, flipped). Other
    # objects of the image get their patch masks in these views from it (issue 19).
    geometry: list[tuple[CropBox, bool]] = field(default_factory=list)


class ObjectMultiCrop:
    """iBOT's multi-crop (2 global + 10 local views) made object-aware (spec §3).

    Defaults are the published iBOT ViT-S/16 settings (spec §10).
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        n_global: int = 2,
        n_local: int = 10,
        global_scale: tuple[float, float] = (0.25, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.25),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        patch_size: int = 16,
        max_tries: int = 20,
        object_aware: bool = True,
        photometric: bool = True,
        render_pixels: bool = True,
        photometric_settings: PhotometricSettings = IBOT_PHOTOMETRIC,
        background_removal: float = 0.0,
    ) -> None:
        """render_pixels=False: draw every view (crop, flip, photometric parameters) but
        leave resampling and augmentation to the training device (`device_views.py`).

        background_removal: probability that a view shows the target object alone on
        black (everything outside its mask zeroed before the crop), drawn per view. Views
        of one object then disagree on the background and the neighbours, so matching them
        by the scene's texture stops paying (Ryali et al. 2021, "BG_RM"). 0: off."""
        for name, size in (("global_size", global_size), ("local_size", local_size)):
            if size % patch_size != 0:
                raise ValueError(f"{name} {size} is not a multiple of patch_size {patch_size}")
        if n_global < 1 or n_local < 0 or max_tries < 1:
            raise ValueError("need n_global >= 1, n_local >= 0 and max_tries >= 1")
        if not 0.0 <= background_removal <= 1.0:
            raise ValueError(f"background_removal {background_removal}: must be in [0, 1]")
        if background_removal > 0 and not render_pixels:
            raise ValueError("background_removal needs views rendered in the loader")
        self.global_size, self.local_size = global_size, local_size
        self.n_global, self.n_local = n_global, n_local
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.ratio = tuple(ratio)
        self.patch_size = patch_size
        self.max_tries = max_tries
        self.object_aware = object_aware
        self.photometric = photometric
        self.render_pixels = render_pixels
        self.photometric_settings = photometric_settings
        self.background_removal = background_removal
        self._global_photometric = [
            Photometric(view_kind(i, is_global=True), photometric_settings)
            for i in range(n_global)
        ]
        self._local_photometric = Photometric(view_kind(0, is_global=False), photometric_settings)

    def __call__(
        self,
        image: Image.Image,
        object_mask: np.ndarray,
        generator: torch.Generator,
        clock: StageClock | None = None,
    ) -> MultiCropViews:
        """image: RGB PIL image; object_mask: (H, W) bool of the target object, same size.

        clock: adds this call's time per stage to it (benchmarks; None: not timed)."""
        if object_mask.shape != (image.height, image.width):
            raise ValueError(
                f"object mask {object_mask.shape} does not match image {image.height}x{image.width}"
            )
        started = clock.now() if clock is not None else 0.0
        integral = ObjectIntegral(object_mask)
        box = _mask_box_xyxy(object_mask)
        # An object that fills the image (the whole-image fallback) is shown by every crop;
        # requiring its box inside a global crop would fail 20 times for nothing.
        object_aware = self.object_aware and not bool(object_mask.all())
        if clock is not None:
            started = clock.lap("mask integral", started)
        views = MultiCropViews([], [], [], [], 0)
        on_black: Image.Image | None = None
        for index in range(self.n_global + self.n_local):
            is_global = index < self.n_global
            size = self.global_size if is_global else self.local_size
            crop, _, success = draw_object_crop(
                integral,
                box,
                self.global_scale if is_global else self.local_scale,
                self.ratio,
                size,
                self.patch_size,
                is_global,
                generator,
                self.max_tries,
                object_aware,
            )
            views.crop_failures += int(not success)
            if clock is not None:
                started = clock.lap("crop sampling", started)
            grid = (size // self.patch_size, size // self.patch_size)
            coverage = integral.patch_coverage(crop, grid)
            flip = torch.rand((), generator=generator).item() < 0.5
            if flip:
                coverage = torch.flip(coverage, dims=[1])
            masks = views.global_patch_masks if is_global else views.local_patch_masks
            masks.append(patchify(coverage))
            views.geometry.append((crop, flip))
            if clock is not None:
                started = clock.lap("patch masks", started)
            if not self.render_pixels:
                kind = view_kind(index, is_global)
                params = draw_photometric_params(
                    kind, generator, enabled=self.photometric, settings=self.photometric_settings
                )
                plans = views.global_plans if is_global else views.local_plans
                plans.append(ViewPlan(crop, flip, params))
                if clock is not None:
                    started = clock.lap("render + photometric", started)
                continue
            source = image
            # Drawn only when on, so runs without it keep their random stream.
            if self.background_removal > 0 and (
                torch.rand((), generator=generator).item() < self.background_removal
            ):
                if on_black is None:
                    on_black = _object_on_black(image, object_mask)
                source = on_black
            view = TF.resized_crop(
                source,
                crop.top,
                crop.left,
                crop.height,
                crop.width,
                [size, size],
                InterpolationMode.BICUBIC,
            )
            if flip:
                view = TF.hflip(view)
            if self.photometric:
                augment = self._global_photometric[index] if is_global else self._local_photometric
                tensor = augment(view, generator)
            else:
                tensor = normalize_only(view)
            images = views.global_images if is_global else views.local_images
            images.append(tensor)
            if clock is not None:
                started = clock.lap("render + photometric", started)
        return views


def _object_on_black(image: Image.Image, object_mask: np.ndarray) -> Image.Image:
    """`image` with every pixel outside `object_mask` set to black."""
    pixels = np.asarray(image.convert("RGB")) * object_mask[..., None].astype(np.uint8)
    return Image.fromarray(pixels)


def _mask_box_xyxy(object_mask: np.ndarray) -> tuple[float, float, float, float]:
    """Tight box of the True pixels, (x0, y0) inclusive and (x1, y1) exclusive."""
    rows = np.flatnonzero(object_mask.any(axis=1))
    cols = np.flatnonzero(object_mask.any(axis=0))
    if rows.size == 0:
        return 0.0, 0.0, float(object_mask.shape[1]), float(object_mask.shape[0])
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)
