"""The sharded store: lazy access, pickling for spawned workers, the dataset's lazy reads."""

import pickle

import numpy as np

from odis_core.crops.dataset import ObjectCropDataset
from odis_core.crops.object_aware import ObjectMultiCrop
from odis_core.masks.store import ImageRecord, MaskStore, object_from_mask, write_store


def small_store(tmp_path, n_images=7, shard_images=3):
    images, objects = [], []
    for image_id in range(100, 100 + n_images):  # ids need not be positions
        images.append(ImageRecord(image_id, f"d/{image_id}.png", 16, 12))
        for k in range(image_id % 3):  # 0, 1 or 2 objects
            mask = np.zeros((12, 16), dtype=bool)
            mask[k : k + 5, 2 * k : 2 * k + 6] = True
            objects.append(object_from_mask(mask, 10 * image_id + k, image_id, score=0.5 + k))
    store = write_store(tmp_path / "store", images, objects, {1: "a"}, shard_images=shard_images)
    return store, images, objects


def test_every_lookup_returns_what_was_written(tmp_path):
    store, images, objects = small_store(tmp_path)
    assert list(store.images) == images and store.images[-1] == images[-1]
    assert store.images[2:4] == images[2:4]
    assert list(store.objects) == objects and len(store.objects) == len(objects)
    for image in reversed(images):  # out of order: every shard, any order
        assert store.objects_of(image.image_id) == [
            o for o in objects if o.image_id == image.image_id
        ]
    assert store.n_images_without_objects == sum(1 for i in images if i.image_id % 3 == 0)
    np.testing.assert_array_equal(store.object_areas(), [o.area for o in objects])


def test_a_store_pickles_by_path_and_reopens(tmp_path):
    store, images, _ = small_store(tmp_path)
    payload = pickle.dumps(store)
    assert len(payload) < 1000  # the path, not the columns
    again = pickle.loads(payload)
    assert again.objects_of(images[2].image_id) == store.objects_of(images[2].image_id)


def test_the_crop_dataset_reads_objects_only_for_the_images_it_draws(tmp_path, monkeypatch):
    store, images, _ = small_store(tmp_path)
    calls = []
    original = MaskStore.objects_of
    monkeypatch.setattr(
        MaskStore, "objects_of", lambda self, i: calls.append(i) or original(self, i)
    )
    multicrop = ObjectMultiCrop(global_size=16, local_size=8, n_local=0, patch_size=8)
    dataset = ObjectCropDataset(store, tmp_path, multicrop)
    assert calls == [] and len(dataset) == len(images)
    assert [o.object_id for o in dataset.candidates(images[1])] == [1010, 1011]
    assert calls == [images[1].image_id]
