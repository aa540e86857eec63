"""Object-aware multi-crop, photometric augmentation and iBOT block masks (spec §3, §5)."""

from odis_core.crops.block_mask import BlockMaskGenerator, sample_mask_ratio
from odis_core.crops.dataset import (
    CropBatch,
    CropSample,
    MimConfig,
    ObjectCropDataset,
    collate_crops,
)
from odis_core.crops.object_aware import (
    CropBox,
    MultiCropViews,
    ObjectMultiCrop,
    object_coverage,
    patch_coverage,
    patchify,
    sample_crop_box,
    sample_object_crop,
)
from odis_core.crops.photometric import IMAGENET_MEAN, IMAGENET_STD, normalize_only

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BlockMaskGenerator",
    "CropBatch",
    "CropBox",
    "CropSample",
    "MimConfig",
    "MultiCropViews",
    "ObjectCropDataset",
    "ObjectMultiCrop",
    "collate_crops",
    "normalize_only",
    "object_coverage",
    "patch_coverage",
    "patchify",
    "sample_crop_box",
    "sample_mask_ratio",
    "sample_object_crop",
]
