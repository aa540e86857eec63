"""Views rendered on the training device (`augment_on="device"`): the batched photometric
ops equal torchvision's tensor ops view by view, the planned box is the rendered box, and
the patch masks still mark the object in the rendered pixels."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from odis_core.crops.batched_photometric import (
    APPLY_BLUR,
    APPLY_GRAYSCALE,
    APPLY_JITTER,
    APPLY_SOLARIZE,
    BLUR_SIGMA_COLUMN,
    BLUR_TAPS,
    BRIGHTNESS_FACTOR,
    CONTRAST_FACTOR,
    HUE_FACTOR,
    N_PARAMS,
    ORDER_COLUMNS,
    SATURATION_FACTOR,
    apply_photometric,
    draw_photometric_params,
)
from odis_core.crops.dataset import ObjectCropDataset, collate_crops
from odis_core.crops.device_views import MAX_SOURCE_SIDE, pad_sources, render, source_tensor
from odis_core.crops.object_aware import ObjectMultiCrop
from odis_core.crops.photometric import IMAGENET_MEAN, IMAGENET_STD

KINDS = ("global_1", "global_2", "local")


def torchvision_reference(image: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """One view through torchvision's own tensor transforms, in the view's drawn order."""
    jitter_ops = [
        lambda x: TF.adjust_brightness(x, float(params[BRIGHTNESS_FACTOR])),
        lambda x: TF.adjust_contrast(x, float(params[CONTRAST_FACTOR])),
        lambda x: TF.adjust_saturation(x, float(params[SATURATION_FACTOR])),
        lambda x: TF.adjust_hue(x, float(params[HUE_FACTOR])),
    ]
    if params[APPLY_JITTER]:
        for op in params[ORDER_COLUMNS].long().tolist():
            image = jitter_ops[op](image)
    if params[APPLY_GRAYSCALE]:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    if params[APPLY_BLUR]:
        sigma = float(params[BLUR_SIGMA_COLUMN])
        image = TF.gaussian_blur(image, [BLUR_TAPS, BLUR_TAPS], [sigma, sigma])
    if params[APPLY_SOLARIZE]:
        image = TF.solarize(image, 128 / 255)
    return TF.normalize(image, IMAGENET_MEAN, IMAGENET_STD)


def test_batched_photometric_equals_torchvision_view_by_view():
    generator = torch.Generator().manual_seed(0)
    params = torch.stack([draw_photometric_params(KINDS[i % 3], generator) for i in range(60)])
    # Every branch is exercised (else this test could pass without testing it).
    for column in (APPLY_JITTER, APPLY_GRAYSCALE, APPLY_BLUR, APPLY_SOLARIZE):
        assert 0 < params[:, column].sum() < len(params)
    images = torch.rand(60, 3, 20, 20, generator=generator)
    images[::7] = images[::7].mean(dim=1, keepdim=True)  # grey views: hue's 0/0 corner
    batched = apply_photometric(images, params)
    for view in range(60):
        expected = torchvision_reference(images[view], params[view])
        torch.testing.assert_close(batched[view], expected, atol=2e-5, rtol=1e-5)


def test_photometric_parameters_follow_the_recipe():
    generator = torch.Generator().manual_seed(1)
    n = 3000
    for kind, blur_p, solarize_p in (
        ("global_1", 1.0, 0.0),
        ("global_2", 0.1, 0.2),
        ("local", 0.5, 0.0),
    ):
        params = torch.stack([draw_photometric_params(kind, generator) for _ in range(n)])
        assert params[:, APPLY_JITTER].mean() == pytest.approx(0.8, abs=0.03)
        assert params[:, APPLY_GRAYSCALE].mean() == pytest.approx(0.2, abs=0.03)
        assert params[:, APPLY_BLUR].mean() == pytest.approx(blur_p, abs=0.03)
        assert params[:, APPLY_SOLARIZE].mean() == pytest.approx(solarize_p, abs=0.03)
        for column, low, high in (
            (BRIGHTNESS_FACTOR, 0.6, 1.4),
            (CONTRAST_FACTOR, 0.6, 1.4),
            (SATURATION_FACTOR, 0.8, 1.2),
            (HUE_FACTOR, -0.1, 0.1),
            (BLUR_SIGMA_COLUMN, 0.1, 2.0),
        ):
            values = params[:, column]
            assert low <= values.min() and values.max() <= high
            assert values.min() < low + 0.05 * (high - low) and values.max() > high - 0.05 * (
                high - low
            )
        orders = params[:, ORDER_COLUMNS].long()
        assert (orders.sort(dim=1).values == torch.arange(4)).all()
        assert len({tuple(row) for row in orders.tolist()}) == 24


def test_disabled_photometric_draws_the_same_stream_and_only_normalises():
    a, b = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    on = draw_photometric_params("global_2", a)
    off = draw_photometric_params("global_2", b, enabled=False)
    assert off[[APPLY_JITTER, APPLY_GRAYSCALE, APPLY_BLUR, APPLY_SOLARIZE]].sum() == 0
    assert torch.equal(
        on[BRIGHTNESS_FACTOR : HUE_FACTOR + 1], off[BRIGHTNESS_FACTOR : HUE_FACTOR + 1]
    )
    assert torch.rand((), generator=a) == torch.rand((), generator=b)  # same number of draws
    image = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(
        apply_photometric(image, off[None]),
        TF.normalize(image[0], IMAGENET_MEAN, IMAGENET_STD)[None],
    )


def ramp_image(height: int, width: int) -> torch.Tensor:
    """(3, H, W) float: red = x of the pixel centre / W, green = y / H, blue = 0.5."""
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    return torch.stack(
        [
            xs.expand(height, width),
            ys[:, None].expand(height, width),
            torch.full((height, width), 0.5),
        ]
    )


def unnormalise(views: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return views * std + mean


@pytest.mark.parametrize("box", [(10.0, 20.0, 90.0, 60.0), (40.0, 5.0, 52.0, 17.0)])
@pytest.mark.parametrize("flip", [False, True])
def test_render_samples_the_planned_box_at_output_pixel_centres(box, flip):
    # A linear ramp is reproduced exactly by bilinear and area sampling, so every output
    # pixel must hold the ramp at its footprint's centre; a 80-px box -> 16 px downscales
    # (area average), a 12-px box -> 16 px upscales (bilinear).
    height, width, size = 80, 120, 16
    sources = ramp_image(height, width)[None]
    x0, y0, x1, y1 = box
    boxes = torch.tensor([[0.0, x0, y0, x1, y1]])
    params = draw_photometric_params("local", torch.Generator(), enabled=False)[None]
    view = unnormalise(render(sources, boxes, torch.tensor([flip]), params, size))[0]
    centres_x = x0 + (torch.arange(size) + 0.5) * (x1 - x0) / size
    centres_y = y0 + (torch.arange(size) + 0.5) * (y1 - y0) / size
    expected_red = (centres_x / width).expand(size, size)
    if flip:
        expected_red = expected_red.flip(-1)
    torch.testing.assert_close(view[0], expected_red, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        view[1], (centres_y / height)[:, None].expand(size, size), atol=1e-5, rtol=0
    )


def test_edge_padding_keeps_a_small_image_s_border_pixels():
    rng = np.random.default_rng(3)
    small = torch.from_numpy(rng.integers(0, 256, (3, 20, 30), dtype=np.uint8))
    large = torch.from_numpy(rng.integers(0, 256, (3, 50, 60), dtype=np.uint8))
    batch = pad_sources([small, large])
    assert batch.shape == (2, 3, 50, 60)
    assert torch.equal(batch[0, :, :20, :30], small) and torch.equal(batch[1], large)
    # A box touching the bottom-right corner of the small image renders as it would alone.
    params = draw_photometric_params("local", torch.Generator(), enabled=False)[None]
    box = torch.tensor([[0.0, 20.0, 8.0, 30.0, 20.0]])  # upscaled: samples past the last centre
    alone = render(small[None], box, torch.tensor([False]), params, 16)
    padded = render(batch, box, torch.tensor([False]), params, 16)
    torch.testing.assert_close(padded, alone)


def test_large_images_are_shipped_downscaled_with_their_scales():
    image = Image.new("RGB", (3000, 1000), (10, 20, 30))
    source, (sx, sy) = source_tensor(image)
    assert source.shape == (3, round(1000 * MAX_SOURCE_SIDE / 3000), MAX_SOURCE_SIDE)
    assert sx == pytest.approx(MAX_SOURCE_SIDE / 3000) and sy == pytest.approx(341 / 1000)
    assert source[:, 0, 0].tolist() == [10, 20, 30]
    small, scales = source_tensor(Image.new("RGB", (64, 48)))
    assert small.shape == (3, 48, 64) and scales == (1.0, 1.0)


def test_device_views_show_their_object_where_the_patch_masks_say(tmp_path):
    # The image is its own object mask (white object, black background), so a rendered view's
    # per-patch brightness is the object's coverage: the in-object patches of every view,
    # flipped or not, must be bright, the others dark.
    height, width = 90, 130
    mask = np.zeros((height, width), dtype=bool)
    mask[25:70, 40:95] = True
    image = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).convert("RGB")
    multicrop = ObjectMultiCrop(
        global_size=32,
        local_size=16,
        n_local=6,
        patch_size=8,
        photometric=False,
        render_pixels=False,
    )
    generator = torch.Generator().manual_seed(4)
    for _ in range(10):
        views = multicrop(image, mask, generator)
        assert views.global_images == [] and len(views.global_plans) == 2
        source, scales = source_tensor(image)
        for plans, masks, size in (
            (views.global_plans, views.global_patch_masks, 32),
            (views.local_plans, views.local_patch_masks, 16),
        ):
            for plan, in_object in zip(plans, masks, strict=True):
                c = plan.crop
                boxes = torch.tensor([[0.0, c.left, c.top, c.left + c.width, c.top + c.height]])
                rendered = unnormalise(
                    render(
                        source[None], boxes, torch.tensor([plan.flip]), plan.photometric[None], size
                    )
                )[0, 0]
                grid = size // 8
                brightness = rendered.reshape(grid, 8, grid, 8).mean(dim=(1, 3)).reshape(-1)
                # >= 0.5 coverage is in (spec §3); sampling blurs the edge by < 1 px.
                assert (brightness[in_object] > 0.35).all()
                assert not in_object[brightness > 0.65].logical_not().any()


def small_store(tmp_path, n_images=6):
    from odis_core.masks.coco import import_coco
    from odis_core.scenes.synthetic import SceneConfig, generate_scenes

    splits = generate_scenes(
        tmp_path / "scenes", n_images, 1, seed=2, config=SceneConfig(image_size=48)
    )
    store, _ = import_coco(
        splits["train"].annotations, tmp_path / "masks", images_root=splits["train"].images_dir
    )
    return store, splits["train"].images_dir


def test_device_batches_are_the_same_in_any_worker_and_render_to_valid_views(tmp_path):
    store, images_dir = small_store(tmp_path)
    multicrop = ObjectMultiCrop(
        global_size=32, local_size=16, n_local=2, patch_size=8, render_pixels=False
    )
    dataset = ObjectCropDataset(store, images_dir, multicrop, seed=7)
    batches = []
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=3, num_workers=workers, collate_fn=collate_crops
        )
        batches.append(list(loader))
    for a, b in zip(*batches, strict=True):
        assert a.pending is not None and a.global_crops.numel() == 0
        for field in dataclasses.fields(a.pending):
            assert torch.equal(getattr(a.pending, field.name), getattr(b.pending, field.name))
        assert a.pending.sources.dtype == torch.uint8
        assert a.pending.global_params.shape == (6, N_PARAMS)
        moved = a.to("cpu")  # what the trainer does first: the pending views travel along
        assert torch.equal(moved.pending.sources, a.pending.sources)
        assert moved.pending.global_params is a.pending.global_params  # stays on the host
        assert torch.equal(moved.global_patch_masks, a.global_patch_masks)
        rendered = moved.rendered(32, 16)
        assert rendered.pending is None
        assert rendered.global_crops.shape == (6, 3, 32, 32)
        assert rendered.local_crops.shape == (6, 3, 16, 16)
        assert torch.isfinite(rendered.global_crops).all()
        # Crop-major: rows c*B + i belong to image i; box rows name their source image.
        assert a.pending.global_boxes[:, 0].tolist() == [0, 1, 2, 0, 1, 2]


def test_pretrain_renders_on_the_device_when_asked_and_records_it(tmp_path):
    from odis_core.train.config import PretrainConfig
    from odis_core.train.loop import RunFinished, pretrain

    store, images_dir = small_store(tmp_path, n_images=8)
    base = PretrainConfig(
        arch="vit_tiny",
        depth=2,
        patch_size=8,
        global_size=32,
        local_size=16,
        n_local_crops=2,
        out_dim=64,
        head_hidden_dim=32,
        head_bottleneck_dim=16,
        batch_size=4,
        epochs=1,
        warmup_epochs=0,
        min_patches_per_block=2,
        device="cpu",
        workers=0,
        tensorboard=False,
    )
    for augment_on, expected in (("device", "device"), ("auto", "loader")):
        run = tmp_path / f"run_{augment_on}"
        config = dataclasses.replace(base, augment_on=augment_on)
        events = list(pretrain(config, images_dir, store, run))
        report = next(e for e in events if isinstance(e, RunFinished)).report
        assert report["steps"] == 2
        assert json.loads((run / "config.json").read_text())["augment_on"] == expected
        assert all(
            np.isfinite(json.loads(line)["loss"])
            for line in (run / "metrics.jsonl").read_text().splitlines()
        )
    with pytest.raises(ValueError, match="augment_on"):
        dataclasses.replace(base, augment_on="gpu").resolved()
