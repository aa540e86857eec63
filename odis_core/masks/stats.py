"""Figures about a mask store: what a user checks before trusting it for training."""

from __future__ import annotations

from typing import Any

import numpy as np

from odis_core.masks.store import MaskStore

OBJECTS_PER_IMAGE_BINS = (("1", 1, 1), ("2-5", 2, 5), ("6-20", 6, 20), ("over_20", 21, 2**62))


def store_statistics(store: MaskStore) -> dict[str, Any]:
    """Counts, objects per image, area percentiles; images without objects train on the
    whole image (spec §2), so their number is reported."""
    per_image = store.object_counts()
    areas = store.object_areas()
    figures: dict[str, Any] = {
        "source": store.source,
        "images": store.n_images,
        "objects": store.n_objects,
        "images_without_objects": store.n_images_without_objects,
        "categories": len(store.categories),
        "objects_per_image_mean": round(float(per_image.mean()), 2) if per_image.size else 0.0,
        "objects_per_image_max": int(per_image.max()) if per_image.size else 0,
    }
    for percentile in (10, 50, 90):
        value = float(np.percentile(areas, percentile)) if areas.size else 0.0
        figures[f"area_p{percentile}"] = round(value, 1)
    for name, low, high in OBJECTS_PER_IMAGE_BINS:
        figures[f"images_with_{name}_objects"] = int(
            ((per_image >= low) & (per_image <= high)).sum()
        )
    # COCO's own size classes, so the figures compare with COCO's APs/APm/APl splits.
    figures["objects_small"] = int((areas < 32**2).sum())
    figures["objects_medium"] = int(((areas >= 32**2) & (areas < 96**2)).sum())
    figures["objects_large"] = int((areas >= 96**2).sum())
    figures["images_skipped"] = len(store.skipped)
    return figures
