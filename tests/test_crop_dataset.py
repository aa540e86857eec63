"""ObjectCropDataset + collate_crops: a tiny store, corrupt and object-less images, workers."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from odis_core.crops.dataset import CropBatch, MimConfig, ObjectCropDataset, collate_crops
from odis_core.crops.object_aware import ObjectMultiCrop
from odis_core.crops.photometric import IMAGENET_MEAN, IMAGENET_STD
from odis_core.masks.store import ImageRecord, object_from_mask, write_store

SIZE = 64
GLOBAL, LOCAL, PATCH, N_LOCAL = 32, 16, 8, 2
NG, NL = (GLOBAL // PATCH) ** 2, (LOCAL // PATCH) ** 2


def square(top, left, side, size=SIZE):
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + side, left : left + side] = True
    return mask


@pytest.fixture()
def store_and_root(tmp_path):
    """Images 0-2 with objects painted red on blue, 3 corrupt, 4 with no object."""
    root = tmp_path / "images"
    root.mkdir()
    masks = {0: [square(8, 8, 24), square(36, 30, 20)], 1: [square(20, 28, 30)],
             2: [square(4, 34, 28)], 4: []}
    images, objects = [], []
    for image_id in range(5):
        name = f"img{image_id}.png"
        images.append(ImageRecord(image_id, name, SIZE, SIZE))
        if image_id == 3:
            (root / name).write_bytes(b"not a png at all")
            continue
        pixels = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
        pixels[..., 2] = 255
        for k, mask in enumerate(masks[image_id]):
            pixels[mask] = (255, 0, 0)
            objects.append(object_from_mask(mask, 10 * image_id + k, image_id))
        Image.fromarray(pixels).save(root / name)
    store = write_store(tmp_path / "store", images, objects, images_root=root)
    return store, root


def make_dataset(store, root, seed=0, photometric=True, mim=MimConfig(min_patches_per_block=4)):  # noqa: B008
    multicrop = ObjectMultiCrop(global_size=GLOBAL, local_size=LOCAL, n_local=N_LOCAL,
                                patch_size=PATCH, photometric=photometric)
    return ObjectCropDataset(store, root, multicrop, mim, seed=seed)


def test_collated_batch_shapes_dtypes_and_counts(store_and_root):
    dataset = make_dataset(*store_and_root)
    assert len(dataset) == 5
    assert dataset[3] is None  # corrupt file: skipped, never raised
    batch = collate_crops([dataset[i] for i in range(5)])
    assert isinstance(batch, CropBatch)
    b = 4
    assert batch.global_crops.shape == (2 * b, 3, GLOBAL, GLOBAL)
    assert batch.global_crops.dtype == torch.float32
    assert batch.local_crops.shape == (N_LOCAL * b, 3, LOCAL, LOCAL)
    assert batch.global_patch_masks.shape == (2 * b, NG)
    assert batch.local_patch_masks.shape == (N_LOCAL * b, NL)
    assert batch.mim_masks.shape == (2 * b, NG)
    for mask in (batch.global_patch_masks, batch.local_patch_masks, batch.mim_masks):
        assert mask.dtype == torch.bool
    assert batch.global_patch_masks.any(dim=1).all() and batch.local_patch_masks.any(dim=1).all()
    assert batch.indices.tolist() == [0, 1, 2, 4]
    assert batch.indices.dtype == torch.long
    assert batch.n_skipped == 1
    assert batch.n_whole_image_fallback == 1
    # The object-less image is its own object: every patch of every view is in it.
    fallback_rows = [c * b + 3 for c in range(2)]
    assert batch.global_patch_masks[fallback_rows].all()


def test_batch_is_crop_major(store_and_root):
    dataset = make_dataset(*store_and_root)
    samples = [dataset[i] for i in (0, 1, 2)]
    batch = collate_crops(samples)
    for crop in range(2):
        for row, sample in enumerate(samples):
            assert torch.equal(batch.global_crops[crop * 3 + row], sample.global_images[crop])
            assert torch.equal(batch.mim_masks[crop * 3 + row], sample.mim_masks[crop])
    for crop in range(N_LOCAL):
        for row, sample in enumerate(samples):
            assert torch.equal(batch.local_crops[crop * 3 + row], sample.local_images[crop])
            assert torch.equal(batch.local_patch_masks[crop * 3 + row],
                               sample.local_patch_masks[crop])


def test_all_unreadable_batch_is_empty_and_counted():
    batch = collate_crops([None, None])
    assert batch.n_skipped == 2 and len(batch.indices) == 0 and batch.global_crops.shape[0] == 0


def test_same_seed_epoch_index_same_sample_and_new_epoch_new_crops(store_and_root):
    store, root = store_and_root
    first = make_dataset(store, root, seed=3)[1]
    second = make_dataset(store, root, seed=3)[1]
    assert all(torch.equal(a, b) for a, b in
               zip(first.global_images + first.local_images,
                   second.global_images + second.local_images, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(first.mim_masks, second.mim_masks, strict=True))
    later = make_dataset(store, root, seed=3)
    later.set_epoch(1)
    moved = later[1]
    assert not torch.equal(first.global_images[0], moved.global_images[0])
    other_seed = make_dataset(store, root, seed=4)[1]
    assert not torch.equal(first.global_images[0], other_seed.global_images[0])


def test_mim_masks_cover_about_half_the_global_crops_and_none_without_mim(store_and_root):
    store, root = store_and_root
    dataset = make_dataset(store, root)
    masked = []
    for epoch in range(10):
        dataset.set_epoch(epoch)
        for index in (0, 1, 2, 4):
            masked += [int(m.sum()) for m in dataset[index].mim_masks]
    masked = np.array(masked)
    assert 0.25 < (masked > 0).mean() < 0.75  # iBOT: half the crops are not masked
    assert masked.max() <= round(0.5 * NG)
    plain = make_dataset(store, root, mim=None)[0]
    assert all(not m.any() for m in plain.mim_masks)


def test_views_show_the_chosen_object(store_and_root):
    # Images 1 and 2 have one object each: with plain colours the in-object patches of every
    # view are the red ones, so the dataset decoded, cropped and flipped the right mask.
    dataset = make_dataset(*store_and_root, photometric=False)
    for epoch in range(4):
        dataset.set_epoch(epoch)
        for index in (1, 2):
            sample = dataset[index]
            assert not sample.whole_image_fallback
            for view, mask in zip(sample.global_images, sample.global_patch_masks, strict=True):
                red = (view[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]).clamp(0, 1)
                grid = GLOBAL // PATCH
                fraction = red.reshape(grid, PATCH, grid, PATCH).mean(dim=(1, 3)).reshape(-1)
                clear = (fraction - 0.5).abs() > 0.15
                assert torch.equal(mask[clear], fraction[clear] >= 0.5)


def test_masks_are_rescaled_when_the_file_size_changed(tmp_path):
    # The store says 32 x 32 (masks made on an older copy); the file on disk is 64 x 64.
    root = tmp_path / "images"
    root.mkdir()
    pixels = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    pixels[..., 2] = 255
    pixels[square(32, 0, 32)] = (255, 0, 0)
    Image.fromarray(pixels).save(root / "a.png")
    small = square(16, 0, 16, size=32)
    store = write_store(tmp_path / "store", [ImageRecord(1, "a.png", 32, 32)],
                        [object_from_mask(small, 1, 1)])
    sample = make_dataset(store, root, photometric=False)[0]
    assert sample is not None and not sample.whole_image_fallback
    for view, mask in zip(sample.global_images, sample.global_patch_masks, strict=True):
        red = (view[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]).clamp(0, 1)
        fraction = red.reshape(4, PATCH, 4, PATCH).mean(dim=(1, 3)).reshape(-1)
        clear = (fraction - 0.5).abs() > 0.15
        assert torch.equal(mask[clear], fraction[clear] >= 0.5)


def batches(dataset, workers):
    loader = DataLoader(dataset, batch_size=5, shuffle=False, num_workers=workers,
                        collate_fn=collate_crops)
    return list(loader)


def test_workers_give_the_same_batch_as_the_main_process(store_and_root):
    dataset = make_dataset(*store_and_root)
    dataset.set_epoch(2)
    (main,) = batches(dataset, 0)
    (parallel,) = batches(dataset, 2)
    for name in ("global_crops", "local_crops", "global_patch_masks", "local_patch_masks",
                 "mim_masks", "indices"):
        assert torch.equal(getattr(main, name), getattr(parallel, name)), name
    assert (main.n_skipped, main.n_whole_image_fallback) == (1, 1)
    assert (parallel.n_skipped, parallel.n_whole_image_fallback) == (1, 1)
