"""Several objects per image in training (issue 19, `objects_per_image`): the other objects'
patch masks in the target's views, the slot batch, the several-object [OBJ] loss (pairs
counted only where the object is in both views) and a training step."""

import dataclasses
import re

import numpy as np
import pytest
import torch
from PIL import Image

from odis_core.crops.dataset import (
    MimConfig,
    ObjectCropDataset,
    collate_crops,
    sample_generator,
)
from odis_core.crops.object_aware import (
    CropBox,
    ObjectIntegral,
    ObjectMultiCrop,
    visible_patch_mask,
)
from odis_core.loss.ibot import IBOTLoss, object_pair_masks
from odis_core.masks.store import ImageRecord, object_from_mask, write_store
from odis_core.train import loop
from odis_core.train.config import PretrainConfig

SIZE, GLOBAL, LOCAL, PATCH, N_LOCAL = 64, 32, 16, 8, 2


def square(top, left, side, size=SIZE):
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + side, left : left + side] = True
    return mask


def write_scenes(root, scenes):
    """A store of SIZE x SIZE images, scene i's objects (masks) painted in distinct colours."""
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    images, objects = [], []
    for image_id, masks in enumerate(scenes):
        name = f"img{image_id}.png"
        images.append(ImageRecord(image_id, name, SIZE, SIZE))
        pixels = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
        for k, mask in enumerate(masks):
            pixels[mask] = (255, 60 * k, 40)
            objects.append(object_from_mask(mask, 10 * image_id + k, image_id))
        Image.fromarray(pixels).save(images_dir / name)
    return write_store(root / "store", images, objects, images_root=images_dir), images_dir


def dataset(store, images_dir, objects_per_image, global_scale=(0.25, 1.0),
            local_scale=(0.05, 0.25)):
    multicrop = ObjectMultiCrop(global_size=GLOBAL, local_size=LOCAL, n_local=N_LOCAL,
                                patch_size=PATCH, global_scale=global_scale,
                                local_scale=local_scale)
    return ObjectCropDataset(store, images_dir, multicrop, MimConfig(min_patches_per_block=2),
                             seed=3, objects_per_image=objects_per_image)


def tiny_config(**overrides) -> PretrainConfig:
    values = dict(arch="vit_tiny", depth=2, patch_size=PATCH, global_size=GLOBAL,
                  local_size=LOCAL, n_local_crops=N_LOCAL, out_dim=32, head_hidden_dim=32,
                  head_bottleneck_dim=16, min_patches_per_block=2, batch_size=2, epochs=2,
                  warmup_epochs=1, workers=0, device="cpu", precision="fp32", seed=5,
                  obj_readout=True, drop_path=0.0)
    return PretrainConfig(**{**values, **overrides}).resolved()


def random_outputs(n_global, n_local, batch, n_slots, out_dim=16, n_patches=5, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape):
        return torch.randn(*shape, generator=generator)

    return dict(
        student_obj=normal(n_global * batch, n_slots, out_dim),
        student_local_obj=normal(n_local * batch, n_slots, out_dim),
        student_patch=normal(n_global * batch, n_patches, out_dim),
        teacher_obj=normal(n_global * batch, n_slots, out_dim),
        teacher_patch=normal(n_global * batch, n_patches, out_dim),
        student_mim_mask=torch.rand(n_global * batch, n_patches, generator=generator) < 0.5,
    )


def make_loss(n_local, out_dim=16):
    loss = IBOTLoss(out_dim, out_dim, 2, n_local, n_epochs=3)
    loss.center.normal_(generator=torch.Generator().manual_seed(9))  # centring matters
    return loss


def test_one_slot_per_image_is_the_one_object_loss():
    outputs = random_outputs(2, 3, batch=4, n_slots=1)
    one, several = make_loss(3), make_loss(3)
    old = one(*[outputs[k].squeeze(1) if k.endswith("obj") else outputs[k] for k in (
        "student_obj", "student_local_obj", "student_patch", "teacher_obj", "teacher_patch",
        "student_mim_mask")], epoch=1)
    new = several(**outputs, epoch=1, global_objects=torch.ones(8, 1, dtype=torch.bool),
                  local_objects=torch.ones(12, 1, dtype=torch.bool))
    torch.testing.assert_close(new.obj, old.obj, rtol=1e-6, atol=0)
    assert torch.equal(new.mim, old.mim)  # the MIM arithmetic is the same
    torch.testing.assert_close(torch.as_tensor(new.teacher_entropy),
                               torch.as_tensor(old.teacher_entropy), rtol=1e-6, atol=0)
    torch.testing.assert_close(several.center, one.center, rtol=1e-6, atol=1e-7)
    assert torch.equal(several.center_patch, one.center_patch)
    assert new.as_floats()["object_pairs"] == old.as_floats()["object_pairs"] == 2 * 4 * 4


def test_pairs_count_only_where_the_object_is_in_both_views():
    # 2 globals, 2 locals, one image, 3 objects: object 1 is outside local 0, object 2
    # outside global 1. Views in order g0, g1, l0, l1.
    present = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 1], [1, 1, 1]], dtype=torch.bool)
    global_objects, local_objects = present[:2], present[2:]
    pairs = object_pair_masks(list(present.split(1)), 2)
    # object 0: 2 x 3 pairs; object 1: (g0,g1) (g0,l1) (g1,g0) (g1,l1); object 2: (g0,l0) (g0,l1)
    assert sum(int(mask.sum()) for _, _, mask in pairs) == 6 + 4 + 2
    outputs = random_outputs(2, 2, batch=1, n_slots=3)
    loss = make_loss(2)
    terms = loss(**outputs, epoch=1, global_objects=global_objects, local_objects=local_objects)
    assert terms.as_floats()["object_pairs"] == 12

    # The loss is the mean of exactly those 12 terms (centre as it was before the update).
    center = make_loss(2).center
    teacher = torch.softmax((outputs["teacher_obj"] - center) / loss.teacher_temperatures(1)[0], -1)
    student = torch.cat([outputs["student_obj"], outputs["student_local_obj"]]) / 0.1
    expected = [
        -(teacher[q, s] * torch.log_softmax(student[v, s], -1)).sum()
        for q in range(2) for v in range(4) for s in range(3)
        if v != q and present[q, s] and present[v, s]
    ]
    torch.testing.assert_close(terms.obj, torch.stack(expected).mean())

    # An object's outputs in a view it is not in change nothing; in a view it is in, they do.
    def loss_with(name, row, slot):
        changed = {k: v.clone() for k, v in outputs.items()}
        changed[name][row, slot, 0] += 5.0  # one logit: a shift of all would be no change
        return make_loss(2)(**changed, epoch=1, global_objects=global_objects,
                            local_objects=local_objects).obj

    assert torch.equal(loss_with("teacher_obj", 1, 2), terms.obj)  # object 2, global 1
    assert torch.equal(loss_with("student_obj", 1, 2), terms.obj)
    assert torch.equal(loss_with("student_local_obj", 0, 1), terms.obj)  # object 1, local 0
    assert not torch.equal(loss_with("student_local_obj", 0, 2), terms.obj)


def test_another_object_outside_a_view_has_no_patch_there():
    integral = ObjectIntegral(square(40, 40, 16))
    assert not visible_patch_mask(integral, CropBox(0, 0, 32, 32), False, (4, 4)).any()
    inside = visible_patch_mask(integral, CropBox(32, 32, 32, 32), False, (4, 4)).view(4, 4)
    assert inside[1:3, 1:3].all() and inside.sum() == 4
    flipped = visible_patch_mask(ObjectIntegral(square(32, 32, 8)), CropBox(32, 32, 32, 32),
                                 True, (4, 4)).view(4, 4)
    assert flipped[0, 3] and flipped.sum() == 1  # mirrored with the view


def test_other_objects_leave_the_targets_views_alone_and_fill_slots(tmp_path):
    store, images_dir = write_scenes(
        tmp_path, [[square(4, 4, 20), square(30, 30, 24), square(8, 40, 16)], [square(10, 10, 30)]]
    )
    one, every, two = (dataset(store, images_dir, k) for k in (1, 0, 2))
    for index in range(2):
        a, b = one[index], every[index]
        for name in ("global_images", "local_images", "global_patch_masks",
                     "local_patch_masks", "mim_masks"):
            assert all(torch.equal(x, y) for x, y in zip(getattr(a, name), getattr(b, name),
                                                         strict=True)), name
        assert a.other_global_masks is None
    assert [len(m) for m in every[0].other_global_masks] == [2, 2]
    assert [len(m) for m in two[0].other_local_masks] == [1] * N_LOCAL  # K - 1 others
    # The same others on every call (the sample's generator): resume replays them.
    assert all(torch.equal(x, y) for x, y in zip(two[0].other_global_masks,
                                                 two[0].other_global_masks, strict=True))
    batch = collate_crops([every[0], every[1]])
    assert batch.global_object_masks.shape == (2 * 2, 3, (GLOBAL // PATCH) ** 2)
    assert batch.local_object_masks.shape == (N_LOCAL * 2, 3, (LOCAL // PATCH) ** 2)
    assert batch.object_slots.tolist() == [[True, True, True], [True, False, False]]
    assert torch.equal(batch.global_object_masks[:, 0], batch.global_patch_masks)
    assert not batch.global_object_masks[1::2, 1:].any()  # image 1's padding slots
    assert collate_crops([two[0], two[1]]).global_object_masks.shape[1] == 2  # fixed K


def test_objects_outside_every_global_view_add_no_pair(tmp_path):
    # Global crops of at most 20 % of the image that contain the top-left target cannot
    # reach the bottom row, where the two other objects are; local crops may.
    scene = [square(2, 2, 12), square(50, 4, 12), square(50, 48, 12)]
    store, images_dir = write_scenes(tmp_path, [scene] * 12)
    data = dataset(store, images_dir, 0, global_scale=(0.1, 0.2), local_scale=(0.3, 0.6))
    assert store.objects_of(0)[0].bbox_xywh[:2] == (2, 2)  # candidates in store order

    def target_of(index):  # the dataset's first draw from the sample's generator
        generator = sample_generator(data.seed, data.epoch, index)
        return int(torch.randint(0, 3, (1,), generator=generator).item())

    top_left = [index for index in range(12) if target_of(index) == 0][:2]
    assert len(top_left) == 2
    batch = collate_crops([data[index] for index in top_left])
    global_objects, local_objects = loop.objects_in_views(batch)
    assert batch.object_slots.all() and not global_objects[:, 1:].any()
    view_objects = list(torch.cat([global_objects, local_objects]).chunk(2 + N_LOCAL))
    n_pairs = sum(int(mask.sum()) for _, _, mask in object_pair_masks(view_objects, 2))
    assert n_pairs == 2 * (2 + N_LOCAL - 1) * 2  # the targets' pairs only


@pytest.fixture
def scenes(tmp_path):
    return write_scenes(tmp_path, [
        [square(4, 4, 20), square(30, 30, 24), square(8, 40, 16)],
        [square(10, 10, 30), square(44, 2, 18)],
        [square(6, 30, 26)],
        [square(20, 20, 24), square(0, 0, 12), square(50, 50, 12)],
    ])


def one_step(config, store, images_dir):
    torch.manual_seed(0)
    data = loop.make_dataset(config, store, images_dir)
    batch = collate_crops([data[index] for index in range(config.batch_size)])
    trainer = loop.Trainer(config, iters_per_epoch=1, device="cpu")
    return trainer, batch, trainer.train_step(batch)


def test_padding_slots_never_change_the_loss(tmp_path):
    store, images_dir = write_scenes(tmp_path, [[square(4, 4, 30)], [square(20, 16, 28)]])
    _, _, single = one_step(tiny_config(objects_per_image=1), store, images_dir)
    _, batch, padded = one_step(tiny_config(objects_per_image=3), store, images_dir)
    assert batch.global_object_masks.shape[1] == 3 and not batch.object_slots[:, 1:].any()
    for name in ("loss", "loss_obj", "loss_mim", "teacher_entropy", "object_pairs"):
        assert padded[name] == pytest.approx(single[name], rel=1e-5), name


def test_a_step_with_every_object_trains_each_objects_token(scenes):
    store, images_dir = scenes
    config = tiny_config(objects_per_image=0, batch_size=4)
    trainer, batch, metrics = one_step(config, store, images_dir)
    assert batch.object_slots.sum() == 9
    assert metrics["object_pairs"] > 4 * 2 * (2 + N_LOCAL - 1)  # more than the targets'
    assert np.isfinite(metrics["loss"])
    grad = trainer.student.backbone.vit.cls_token.grad
    assert grad is not None and grad.abs().sum() > 0

    # The extra objects' terms reach the student: their [OBJ] outputs get gradients.
    network = trainer.student
    obj, patch = network(batch.global_crops, batch.global_object_masks, batch.mim_masks)
    obj.retain_grad()
    local, _ = network(batch.local_crops, batch.local_object_masks, with_patches=False)
    with torch.no_grad():
        teacher_obj, teacher_patch = trainer.teacher(batch.global_crops, batch.global_object_masks)
    outputs = trainer.loss(obj, local, patch, teacher_obj, teacher_patch, batch.mim_masks, 0,
                           *loop.objects_in_views(batch))
    outputs.total.backward()
    global_objects, _ = loop.objects_in_views(batch)
    extra_grads = obj.grad[:, 1:].abs().sum(-1)
    assert (extra_grads[global_objects[:, 1:]] > 0).any()
    assert (extra_grads[~global_objects[:, 1:]] == 0).all()  # absent and padding: none


@pytest.mark.parametrize("overrides, needed", [
    ({"objects_per_image": 2}, "--obj-readout"),
    ({"objects_per_image": 0, "obj_readout": True, "objective": "image"}, "--objective odis"),
    ({"objects_per_image": 0, "obj_readout": True, "feature": "meanpool"}, "masked attention"),
    ({"objects_per_image": -1, "obj_readout": True}, ">= 0"),
])
def test_settings_several_objects_need(overrides, needed):
    with pytest.raises(ValueError, match=re.escape(needed)):
        dataclasses.replace(PretrainConfig(), **overrides).resolved()
