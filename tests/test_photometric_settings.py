"""Photometric strength settings (issue 17): both augmentation paths and the config obey them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from pretrain_fixtures import make_store

from odis_core.crops.batched_photometric import (
    APPLY_BLUR,
    APPLY_GRAYSCALE,
    APPLY_JITTER,
    APPLY_SOLARIZE,
    BRIGHTNESS_FACTOR,
    HUE_FACTOR,
    draw_photometric_params,
)
from odis_core.crops.photometric import Photometric, PhotometricSettings, normalize_only
from odis_core.train.config import PretrainConfig, load_config_file
from odis_core.train.loop import make_dataset

KINDS = ("global_1", "global_2", "local")


# The defaults' draws are checked against iBOT's numbers in test_device_views.py.


def test_settings_set_probabilities_and_jitter_range_with_the_same_draws():
    settings = PhotometricSettings(
        color_jitter=0.25, jitter_prob=0.3, grayscale_prob=0.6, blur_prob_scale=0.4,
        solarize_prob=0.5,
    )
    generator = torch.Generator().manual_seed(5)
    n = 3000
    for kind, blur_p, solarize_p in (("global_1", 0.4, 0.0), ("global_2", 0.04, 0.5),
                                     ("local", 0.2, 0.0)):
        params = torch.stack(
            [draw_photometric_params(kind, generator, settings=settings) for _ in range(n)]
        )
        assert params[:, APPLY_JITTER].mean() == pytest.approx(0.3, abs=0.03)
        assert params[:, APPLY_GRAYSCALE].mean() == pytest.approx(0.6, abs=0.03)
        assert params[:, APPLY_BLUR].mean() == pytest.approx(blur_p, abs=0.03)
        assert params[:, APPLY_SOLARIZE].mean() == pytest.approx(solarize_p, abs=0.04)
        brightness = params[:, BRIGHTNESS_FACTOR]
        assert 0.9 <= brightness.min() and brightness.max() <= 1.1  # 1 +- 0.25 * 0.4
        assert brightness.max() > 1.09 and params[:, HUE_FACTOR].abs().max() <= 0.025
    # Another strength keeps the number of draws: the next view's crop does not move.
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    draw_photometric_params("local", a)
    draw_photometric_params("local", b, settings=settings)
    assert torch.rand((), generator=a) == torch.rand((), generator=b)


def test_pil_path_with_everything_off_only_normalises():
    off = PhotometricSettings(color_jitter=0.0, jitter_prob=0.0, grayscale_prob=0.0,
                              blur_prob_scale=0.0, solarize_prob=0.0)
    rgb = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    image = Image.fromarray(rgb)
    for kind in KINDS:
        out = Photometric(kind, off)(image, torch.Generator().manual_seed(0))
        torch.testing.assert_close(out, normalize_only(image))
        # ... and the default recipe does change it (global view 1 always blurs)
    assert not torch.allclose(
        Photometric("global_1")(image, torch.Generator().manual_seed(0)), normalize_only(image)
    )


def test_pretrain_config_reaches_the_crops(tmp_path):
    from odis_core.masks.store import MaskStore

    store_dir = make_store(tmp_path, n_images=2)
    config = dataclasses.replace(
        PretrainConfig(), color_jitter=0.5, jitter_prob=0.1, grayscale_prob=0.7,
        blur_prob_scale=0.0, solarize_prob=0.0,
    )
    store = MaskStore.open(store_dir)
    dataset = make_dataset(config, store, tmp_path / "scenes" / "train")
    assert dataset.multicrop.photometric_settings == PhotometricSettings(
        color_jitter=0.5, jitter_prob=0.1, grayscale_prob=0.7, blur_prob_scale=0.0,
        solarize_prob=0.0,
    )
    assert PretrainConfig().color_jitter == 1.0 and PretrainConfig().solarize_prob == 0.2


def test_config_files_may_carry_comment_keys(tmp_path):
    path = tmp_path / "recipe.json"
    path.write_text('{"_comment": {"lr": "why"}, "lr": 0.01, "color_jitter": 0.5}')
    config = load_config_file(path)
    assert config.lr == 0.01 and config.color_jitter == 0.5
    path.write_text('{"comment": "not a field"}')
    with pytest.raises(ValueError, match="unknown option"):
        load_config_file(path)
