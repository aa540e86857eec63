"""Training samples: image + target object -> object-aware views and MIM masks; collate.

Every sample draws from its own generator seeded by (seed, epoch, index), so a sample is
the same in any DataLoader worker, with any number of workers, and after a resume.
Unreadable images come back as None and are dropped (and counted) by `collate_crops`.

Several objects per image (issue 19, `objects_per_image` != 1): the views still centre on
one target; every other object of the image (or up to K - 1 of them) gets its patch mask in
each view by the same exact coverage rule, and the batch carries a fixed number of [OBJ]
slots per image: slot 0 the target, then the others, then padding (all-false).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from odis_core.crops.block_mask import BlockMaskGenerator, sample_mask_ratio
from odis_core.crops.device_views import (
    PendingViews,
    pad_sources,
    render_pending,
    source_tensor,
)
from odis_core.crops.object_aware import (
    CropBox,
    ObjectIntegral,
    ObjectMultiCrop,
    ViewPlan,
    visible_patch_mask,
)
from odis_core.crops.stage_clock import StageClock
from odis_core.images import UnreadableImageError, load_rgb
from odis_core.masks.store import ImageRecord, MaskStore, ObjectRecord, box_to_mask


@dataclass(frozen=True)
class MimConfig:
    """iBOT's masked-image-modelling settings for the global crops (spec §10)."""

    pred_ratio: tuple[float, ...] = (0.0, 0.3)
    pred_ratio_var: tuple[float, ...] = (0.0, 0.2)
    min_patches_per_block: int = 16


@dataclass
class CropSample:
    """The views of one image for one training step."""

    global_images: list[Tensor]  # each (3, Sg, Sg) float
    local_images: list[Tensor]  # each (3, Sl, Sl) float
    global_patch_masks: list[Tensor]  # each (Ng,) bool: True where the object is
    local_patch_masks: list[Tensor]  # each (Nl,) bool
    mim_masks: list[Tensor]  # each (Ng,) bool: True = replaced by the mask token
    whole_image_fallback: bool  # no usable object: the whole image was the object
    crop_failures: int  # crops that fell back to the best-coverage try
    index: int  # dataset index
    # Views left to the device (`ObjectMultiCrop(render_pixels=False)`): the image lists
    # above are empty, the decoded image travels once and each view is a plan on it.
    source: Tensor | None = None  # (3, H, W) uint8
    source_scales: tuple[float, float] = (1.0, 1.0)  # plan boxes (full-size px) -> source px
    global_plans: list[ViewPlan] | None = None
    local_plans: list[ViewPlan] | None = None
    # The image's other objects (objects_per_image != 1; None otherwise): per view an
    # (E, N) bool mask of each other object's patches, all-false where it is outside.
    other_global_masks: list[Tensor] | None = None
    other_local_masks: list[Tensor] | None = None
    n_slots: int = 1  # [OBJ] slots this sample asks for (K; 1 + E for "every object")


@dataclass
class CropBatch:
    """A collated batch, crop-major: rows c*B .. c*B + B - 1 are crop c of every image."""

    global_crops: Tensor  # (G*B, 3, Sg, Sg) float; (0, 3, 0, 0) while `pending` holds them
    local_crops: Tensor | None  # (L*B, 3, Sl, Sl) float, None without local crops
    global_patch_masks: Tensor  # (G*B, Ng) bool: True where the [OBJ] row may attend
    local_patch_masks: Tensor | None  # (L*B, Nl) bool
    mim_masks: Tensor  # (G*B, Ng) bool: True = patch replaced by the mask token (student)
    indices: Tensor  # (B,) long dataset indices
    n_skipped: int  # unreadable images dropped from this batch
    n_whole_image_fallback: int  # images without a usable object
    n_crop_failures: int  # crops that fell back to the best-coverage try
    pending: PendingViews | None = None  # views still to render on the device
    # Several objects per image (None unless objects_per_image != 1), S slots per image:
    # slot 0 is the target (its masks are the patch masks above), slots 1.. other objects,
    # then padding. A slot's all-false row in a view: the object is not in that view.
    global_object_masks: Tensor | None = None  # (G*B, S, Ng) bool
    local_object_masks: Tensor | None = None  # (L*B, S, Nl) bool
    object_slots: Tensor | None = None  # (B, S) bool: True where the slot holds an object

    def map_tensors(self, fn: Callable[[Tensor], Tensor]) -> CropBatch:
        """A copy with `fn` applied to every tensor (the pending views' too)."""
        changes = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, PendingViews):
                changes[name] = value.map_tensors(fn)
            elif isinstance(value, Tensor):
                changes[name] = fn(value)
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CropBatch:
        return self.map_tensors(lambda tensor: tensor.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> CropBatch:
        # Called by the DataLoader's pin-memory thread (pin_memory=True on CUDA), so the
        # copy in `to(..., non_blocking=True)` overlaps the previous step.
        return self.map_tensors(lambda tensor: tensor.pin_memory())

    def rendered(self, global_size: int, local_size: int) -> CropBatch:
        """This batch with its pending views rendered where they live (no-op without)."""
        if self.pending is None:
            return self
        global_crops, local_crops = render_pending(self.pending, global_size, local_size)
        return dataclasses.replace(
            self, global_crops=global_crops, local_crops=local_crops, pending=None
        )

    def __len__(self) -> int:
        return len(self.indices)


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator that depends only on (seed, epoch, index), well mixed across all three."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


class ObjectCropDataset(torch.utils.data.Dataset):
    """One item per image of the store: views of a uniformly chosen target object."""

    def __init__(
        self,
        store: MaskStore,
        images_root: Path,
        multicrop: ObjectMultiCrop,
        mim: MimConfig | None = MimConfig(),  # noqa: B008 (frozen, immutable)
        seed: int = 0,
        min_object_area: float = 0.0,
        objects_per_image: int = 1,
    ) -> None:
        # Objects are fetched per image in __getitem__: a store of 12 M objects is never
        # listed up front (the store reads one image's objects in well under a millisecond).
        self.store = store
        self.images: Sequence[ImageRecord] = store.images
        self.min_object_area = min_object_area
        self.images_root = Path(images_root)
        self.multicrop = multicrop
        self.mim = mim
        self.seed = seed
        # 1: the target only (the paper); K > 1: up to K - 1 others too; 0: every other.
        self.objects_per_image = objects_per_image
        self.epoch = 0
        # Per-stage timing for the benchmark (None: off); it counts in this process only.
        self.clock: StageClock | None = None
        grid = multicrop.global_size // multicrop.patch_size
        self.block_masks = (
            BlockMaskGenerator((grid, grid), mim.min_patches_per_block) if mim is not None else None
        )

    def candidates(self, record: ImageRecord) -> list[ObjectRecord]:
        """The objects of `record` that can be a target (non-empty, >= min_object_area)."""
        return [
            obj
            for obj in self.store.objects_of(record.image_id)
            if obj.area >= self.min_object_area and obj.area > 0
        ]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> CropSample | None:
        clock = self.clock
        started = clock.now() if clock is not None else 0.0
        record = self.images[index]
        generator = sample_generator(self.seed, self.epoch, index)
        try:
            image = load_rgb(self.images_root / record.file_name)
        except UnreadableImageError:
            return None
        if clock is not None:
            started = clock.lap("decode image", started)
        candidates = self.candidates(record)
        object_mask = None
        choice = -1
        if candidates:
            choice = int(torch.randint(0, len(candidates), (1,), generator=generator).item())
            object_mask = _decode_at(candidates[choice], record, image.height, image.width)
        whole_image = object_mask is None or not object_mask.any()
        if whole_image:
            # Spec §2: no usable object -> the whole image is the object (iBOT for this image).
            object_mask = np.ones((image.height, image.width), dtype=bool)
        if clock is not None:
            started = clock.lap("decode mask", started)
        views = self.multicrop(image, object_mask, generator, clock=clock)
        if clock is not None:
            started = clock.now()
        mim_masks = self._mim_masks(len(views.global_patch_masks), generator)
        if clock is not None:
            started = clock.lap("mim masks", started)
        # Drawn last, so the target, its views and the MIM masks are those of K = 1.
        others = [] if whole_image else self.other_objects(candidates, choice, generator)
        sample = CropSample(
            views.global_images,
            views.local_images,
            views.global_patch_masks,
            views.local_patch_masks,
            mim_masks,
            whole_image,
            views.crop_failures,
            index,
        )
        if self.objects_per_image != 1:
            masks = [_decode_at(obj, record, image.height, image.width) for obj in others]
            sample.other_global_masks, sample.other_local_masks = self._other_patch_masks(
                masks, views.geometry
            )
            sample.n_slots = self.objects_per_image or 1 + len(others)
            if clock is not None:
                started = clock.lap("patch masks", started)
        if not self.multicrop.render_pixels:
            sample.source, sample.source_scales = source_tensor(image)
            sample.global_plans, sample.local_plans = views.global_plans, views.local_plans
            if clock is not None:
                clock.lap("render + photometric", started)
        if clock is not None:
            clock.samples += 1
        return sample

    def other_objects(
        self, candidates: list[ObjectRecord], target: int, generator: torch.Generator
    ) -> list[ObjectRecord]:
        """The objects besides the target that get their own [OBJ] slot: all of them, or
        (objects_per_image = K > 1) K - 1 drawn without replacement from the sample's
        generator (in store order), so a resume sees the same ones."""
        if self.objects_per_image == 1 or target < 0:
            return []
        others = [obj for position, obj in enumerate(candidates) if position != target]
        limit = self.objects_per_image - 1
        if self.objects_per_image == 0 or len(others) <= limit:
            return others
        drawn = torch.randperm(len(others), generator=generator)[:limit]
        return [others[position] for position in sorted(drawn.tolist())]

    def _other_patch_masks(
        self, object_masks: list[np.ndarray], geometry: list[tuple[CropBox, bool]]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Per view (globals, then locals) an (E, N) bool mask of each other object."""
        multicrop = self.multicrop
        integrals = [ObjectIntegral(mask) for mask in object_masks]
        per_view = []
        for view, (crop, flip) in enumerate(geometry):
            size = multicrop.global_size if view < multicrop.n_global else multicrop.local_size
            grid = (size // multicrop.patch_size, size // multicrop.patch_size)
            rows = [visible_patch_mask(integral, crop, flip, grid) for integral in integrals]
            per_view.append(
                torch.stack(rows) if rows else torch.zeros(0, grid[0] * grid[1], dtype=torch.bool)
            )
        return per_view[: multicrop.n_global], per_view[multicrop.n_global :]

    def _mim_masks(self, n_global: int, generator: torch.Generator) -> list[Tensor]:
        grid = self.multicrop.global_size // self.multicrop.patch_size
        if self.mim is None or self.block_masks is None:
            return [torch.zeros(grid * grid, dtype=torch.bool) for _ in range(n_global)]
        masks = []
        for _ in range(n_global):
            ratio = sample_mask_ratio(self.mim.pred_ratio, self.mim.pred_ratio_var, generator)
            masks.append(self.block_masks(ratio, generator).reshape(-1))
        return masks


def _decode_at(obj: ObjectRecord, record: ImageRecord, height: int, width: int) -> np.ndarray:
    """(height, width) bool mask of `obj` on the image as loaded now.

    The store's size differs from the file's only when the file changed after the masks
    were made (re-exported, EXIF-rotated copy); rescale the mask rather than misalign it.
    """
    if obj.rle is None:
        if (record.height, record.width) != (height, width):
            sx, sy = width / record.width, height / record.height
            x, y, w, h = obj.bbox_xywh
            return box_to_mask((x * sx, y * sy, w * sx, h * sy), height, width)
        return box_to_mask(obj.bbox_xywh, height, width)
    mask = MaskStore.decode(obj, height, width)
    if mask.shape != (height, width):
        resized = Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST)
        mask = np.asarray(resized, dtype=bool)
    return mask


def collate_crops(samples: list[CropSample | None]) -> CropBatch:
    """Stack samples crop-major; None samples (unreadable images) are dropped and counted."""
    kept = [sample for sample in samples if sample is not None]
    n_skipped = len(samples) - len(kept)
    if not kept:
        empty = torch.zeros(0)
        return CropBatch(
            empty.reshape(0, 3, 0, 0),
            None,
            torch.zeros(0, 0, dtype=torch.bool),
            None,
            torch.zeros(0, 0, dtype=torch.bool),
            torch.zeros(0, dtype=torch.long),
            n_skipped,
            0,
            0,
        )

    def crop_major(per_sample: list[list[Tensor]]) -> Tensor | None:
        n_crops = len(per_sample[0])
        if n_crops == 0:
            return None
        return torch.stack([views[c] for c in range(n_crops) for views in per_sample])

    pending = _collate_plans(kept) if kept[0].source is not None else None
    global_crops = (
        crop_major([s.global_images for s in kept]) if pending is None else torch.zeros(0, 3, 0, 0)
    )
    global_masks = crop_major([s.global_patch_masks for s in kept])
    mim_masks = crop_major([s.mim_masks for s in kept])
    assert global_crops is not None and global_masks is not None and mim_masks is not None
    batch = CropBatch(
        global_crops=global_crops,
        local_crops=crop_major([s.local_images for s in kept]) if pending is None else None,
        global_patch_masks=global_masks,
        local_patch_masks=crop_major([s.local_patch_masks for s in kept]),
        mim_masks=mim_masks,
        indices=torch.tensor([s.index for s in kept], dtype=torch.long),
        n_skipped=n_skipped,
        n_whole_image_fallback=sum(s.whole_image_fallback for s in kept),
        n_crop_failures=sum(s.crop_failures for s in kept),
        pending=pending,
    )
    if kept[0].other_global_masks is None:
        return batch
    return _with_object_slots(batch, kept)


def _with_object_slots(batch: CropBatch, kept: list[CropSample]) -> CropBatch:
    """`batch` with every sample's objects in S slots per view (S: the widest sample's
    slots): slot 0 the target, then its other objects, then all-false padding."""
    n_slots = max(sample.n_slots for sample in kept)
    object_slots = torch.zeros(len(kept), n_slots, dtype=torch.bool)
    for row, sample in enumerate(kept):
        assert sample.other_global_masks is not None
        object_slots[row, : 1 + len(sample.other_global_masks[0])] = True

    def slot_masks(targets: Tensor | None, others_of: list[list[Tensor]]) -> Tensor | None:
        if targets is None:
            return None
        n_views, width = len(others_of[0]), targets.shape[-1]
        masks = torch.zeros(n_views * len(kept), n_slots, width, dtype=torch.bool)
        masks[:, 0] = targets  # crop-major rows, as `targets`
        for view in range(n_views):
            for row, others in enumerate(others_of):
                masks[view * len(kept) + row, 1 : 1 + len(others[view])] = others[view]
        return masks

    return dataclasses.replace(
        batch,
        global_object_masks=slot_masks(
            batch.global_patch_masks, [s.other_global_masks or [] for s in kept]
        ),
        local_object_masks=slot_masks(
            batch.local_patch_masks, [s.other_local_masks or [] for s in kept]
        ),
        object_slots=object_slots,
    )


def _collate_plans(kept: list[CropSample]) -> PendingViews:
    """The samples' decoded images and view plans as one PendingViews, crop-major."""

    def stack(plans_of: list[list[ViewPlan]]) -> tuple[Tensor, Tensor, Tensor] | None:
        n_views = len(plans_of[0])
        if n_views == 0:
            return None
        boxes, flips, params = [], [], []
        for view in range(n_views):
            for row, (sample, plans) in enumerate(zip(kept, plans_of, strict=True)):
                crop, (sx, sy) = plans[view].crop, sample.source_scales
                boxes.append(
                    (
                        row,
                        crop.left * sx,
                        crop.top * sy,
                        (crop.left + crop.width) * sx,
                        (crop.top + crop.height) * sy,
                    )
                )
                flips.append(plans[view].flip)
                params.append(plans[view].photometric)
        return (
            torch.tensor(boxes, dtype=torch.float32),
            torch.tensor(flips, dtype=torch.bool),
            torch.stack(params),
        )

    global_views = stack([s.global_plans or [] for s in kept])
    local_views = stack([s.local_plans or [] for s in kept])
    assert global_views is not None
    return PendingViews(
        sources=pad_sources([s.source for s in kept if s.source is not None]),
        global_boxes=global_views[0],
        local_boxes=None if local_views is None else local_views[0],
        global_flips=global_views[1],
        local_flips=None if local_views is None else local_views[1],
        global_params=global_views[2],
        local_params=None if local_views is None else local_views[2],
    )
