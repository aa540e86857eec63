"""KoLeo regulariser (DINOv2): a hand computation, its direction, and its place in a step."""

import math

import pytest
import torch

from odis_core.loss.koleo import koleo_loss, koleo_per_crop
from odis_core.model.network import MultiCropStudent
from tests.test_train_loop import fake_batch, make_trainer


def test_koleo_matches_a_hand_computation():
    # Normalised: a = (1, 0), b = (0, 1), c = (1, 1)/sqrt 2. Every point's nearest other
    # one is at distance sqrt((1 - 1/sqrt 2)^2 + 1/2) = sqrt(2 - sqrt 2).
    features = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    expected = -math.log(math.sqrt(2 - math.sqrt(2)))
    assert koleo_loss(features).item() == pytest.approx(expected, abs=1e-6)


def test_koleo_uses_the_nearest_neighbour_not_the_mean_distance():
    close = torch.tensor([[1.0, 0.0], [1.0, 0.01], [-1.0, 0.0]])
    spread = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert koleo_loss(close).item() > koleo_loss(spread).item() + 3.0


def test_a_gradient_step_on_koleo_spreads_the_batch():
    torch.manual_seed(0)
    base = torch.randn(1, 8)
    features = (base + 0.05 * torch.randn(16, 8)).requires_grad_()  # a near-collapsed batch
    before = koleo_loss(features).item()
    koleo_loss(features).backward()
    with torch.no_grad():
        stepped = features - 0.5 * features.grad
    assert koleo_loss(stepped).item() < before


def test_koleo_per_crop_searches_neighbours_within_each_crop():
    # Crop 0's rows are a batch of two identical-direction features far from crop 1's:
    # pooled, each row would find its twin; per crop it must too, so both sums agree only
    # when the split is per crop.
    crop0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    crop1 = torch.tensor([[1.0, 0.001], [0.001, 1.0]])
    per_crop = koleo_per_crop(torch.cat([crop0, crop1]), n_crops=2)
    assert per_crop.item() == pytest.approx((koleo_loss(crop0) + koleo_loss(crop1)).item())
    assert per_crop.item() != pytest.approx(koleo_loss(torch.cat([crop0, crop1])).item() * 2)


def test_koleo_needs_two_features():
    with pytest.raises(ValueError, match="B >= 2"):
        koleo_loss(torch.ones(1, 4))


def test_student_step_returns_the_backbone_object_features():
    trainer = make_trainer(precision="fp32", drop_path=0.0)  # no random drop-path
    batch = fake_batch()
    step = MultiCropStudent(trainer.student)
    *_, features = step(batch.global_crops, batch.global_patch_masks, batch.mim_masks,
                        batch.local_crops, batch.local_patch_masks)
    tokens = trainer.student.backbone(batch.global_crops, obj_patch_mask=batch.global_patch_masks,
                                      mim_mask=batch.mim_masks)
    torch.testing.assert_close(features, tokens[:, 0])


def test_koleo_weight_adds_its_term_to_the_step_loss():
    plain = make_trainer(precision="fp32").train_step(fake_batch())
    regularised = make_trainer(precision="fp32", koleo_weight=0.1).train_step(fake_batch())
    assert "loss_koleo" not in plain
    # Same weights and batch: the iBOT terms agree; the total adds 0.1 x the KoLeo sum.
    assert regularised["loss_obj"] == pytest.approx(plain["loss_obj"], rel=1e-6)
    assert regularised["loss_koleo"] > 0
    assert regularised["loss"] == pytest.approx(plain["loss"] + regularised["loss_koleo"], rel=1e-6)


def test_koleo_settings_are_checked_before_training():
    from odis_core.train.config import PretrainConfig

    with pytest.raises(ValueError, match="koleo_weight .*--batch-size >= 2"):
        PretrainConfig(koleo_weight=0.1, batch_size=1).resolved()
    with pytest.raises(ValueError, match="koleo_weight .*must be >= 0"):
        PretrainConfig(koleo_weight=-0.1).resolved()
    assert PretrainConfig(koleo_weight=0.1, batch_size=2).resolved().koleo_weight == 0.1
