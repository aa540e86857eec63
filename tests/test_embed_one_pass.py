"""One-pass object embedding (issue 19): every object of an image in one forward, one
read-out [OBJ] token each, equals one pass per object to fp32 tolerance."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from odis_core.embed.inference import embed_records, one_pass_features, one_pass_slots
from odis_core.masks.coco import import_coco
from odis_core.model.obj_vit import ObjViT

OBJECTS_PER_IMAGE = (1, 3, 40)


def _backbone(impl: str = "dense", obj_readout: bool = True) -> ObjViT:
    torch.manual_seed(0)
    return ObjViT(
        "vit_tiny", img_size=32, patch_size=8, drop_path_rate=0.0, depth=2,
        attention_impl=impl, obj_readout=obj_readout,
    ).eval()


def test_slots_group_objects_by_image_and_split_at_the_cap():
    images, rows, slots = one_pass_slots([0, 0, 1, 2, 2, 2], cap=2)
    assert images == [0, 1, 2, 2]
    assert rows == [0, 0, 1, 2, 2, 3]
    assert slots == [0, 1, 0, 0, 1, 0]


@pytest.mark.parametrize(("impl", "cap"), [("dense", 64), ("split", 64), ("dense", 16)])
def test_one_pass_features_equal_single_object_passes(impl, cap):
    backbone = _backbone(impl)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(len(OBJECTS_PER_IMAGE), 3, 32, 32, generator=g)
    owner = torch.tensor([i for i, k in enumerate(OBJECTS_PER_IMAGE) for _ in range(k)])
    masks = torch.rand(len(owner), 16, generator=g) > 0.7
    masks[torch.arange(len(owner)), torch.randint(0, 16, (len(owner),), generator=g)] = True
    with torch.no_grad():
        together = one_pass_features(backbone, images, owner, masks, cap)
        alone = backbone(images[owner], obj_patch_mask=masks)[:, 0]
    assert together.shape == (44, backbone.embed_dim)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    # The masks matter: the 40 objects of image 2 have 40 different features.
    assert torch.cdist(together[4:], together[4:]).fill_diagonal_(1).min() > 1e-4


def _store_with(root, objects_per_image=OBJECTS_PER_IMAGE):
    """32-px images holding 1, 3 and 40 box objects, as a mask store."""
    rng = np.random.default_rng(0)
    images_dir = root / "images"
    images_dir.mkdir()
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    for index, count in enumerate(objects_per_image):
        name = f"{index}.png"
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images_dir / name)
        coco["images"].append({"id": index, "file_name": name, "width": 32, "height": 32})
        for obj in range(count):
            w, h = rng.uniform(6, 20, size=2)
            x, y = rng.uniform(0, 32 - w), rng.uniform(0, 32 - h)
            coco["annotations"].append({"id": index * 100 + obj, "image_id": index,
                                        "category_id": 1, "iscrowd": 0,
                                        "bbox": [x, y, w, h], "area": w * h})
    (root / "coco.json").write_text(json.dumps(coco))
    store, _ = import_coco(root / "coco.json", root / "store", images_root=images_dir)
    return images_dir, store


@pytest.mark.parametrize("batch_size", [3, 2])
def test_embed_one_pass_equals_per_object_across_batches(tmp_path, batch_size):
    images_dir, store = _store_with(tmp_path)
    backbone = _backbone()
    records = list(store.images)
    # fp32: the claim is exactness to fp32 tolerance (bf16 autocast rounds differently per path)
    kwargs = dict(image_size=32, batch_size=batch_size, precision="fp32")
    together = embed_records(backbone, images_dir, records, store, one_pass=True, **kwargs)
    alone = embed_records(backbone, images_dir, records, store, one_pass=False, **kwargs)
    default = embed_records(backbone, images_dir, records, store, **kwargs)
    assert together.features.shape == (44, backbone.embed_dim)
    np.testing.assert_allclose(together.features, alone.features, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(default.features, together.features)  # read-out: one pass
    assert [r["object_id"] for r in together.meta] == [r["object_id"] for r in alone.meta]


def test_one_pass_is_refused_for_the_papers_model(tmp_path):
    images_dir, store = _store_with(tmp_path, (2,))
    with pytest.raises(ValueError, match="--one-pass needs a read-out model"):
        embed_records(_backbone(obj_readout=False), images_dir, list(store.images), store,
                      image_size=32, one_pass=True)
