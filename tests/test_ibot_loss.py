"""iBOT loss on [OBJ] (spec §5, §10): official reference values and a hand computation."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from odis_core.loss.ibot import IBOTLoss, teacher_temp_schedule

REFERENCE = Path(__file__).parent / "reference" / "ibot_loss.npz"


def test_reproduces_official_ibot_loss_and_centres_over_three_calls():
    ref = np.load(REFERENCE)
    loss = IBOTLoss(
        out_dim=int(ref["cfg_out_dim"]), patch_out_dim=int(ref["cfg_patch_out_dim"]),
        n_global_crops=int(ref["cfg_ngcrops"]), n_local_crops=int(ref["cfg_nlcrops"]),
        n_epochs=int(ref["cfg_nepochs"]),
        warmup_teacher_temp=float(ref["cfg_warmup_teacher_temp"]),
        teacher_temp=float(ref["cfg_teacher_temp"]),
        warmup_teacher_patch_temp=float(ref["cfg_warmup_teacher_temp2"]),
        teacher_patch_temp=float(ref["cfg_teacher_temp2"]),
        warmup_teacher_temp_epochs=int(ref["cfg_warmup_teacher_temp_epochs"]),
        student_temp=float(ref["cfg_student_temp"]),
        center_momentum=float(ref["cfg_center_momentum"]),
        center_momentum_patch=float(ref["cfg_center_momentum2"]),
    )
    for call in range(3):
        def get(key, call=call):
            return torch.from_numpy(ref[f"call{call}_{key}"])
        mim_mask = get("student_mask").flatten(2).flatten(0, 1)  # (2, B, 4, 4) -> (2B, 16)
        terms = loss(
            get("student_cls"), get("student_local_cls"), get("student_patch"),
            get("teacher_cls"), get("teacher_patch"), mim_mask, int(ref[f"call{call}_epoch"]),
        )
        assert terms.obj.item() == pytest.approx(float(ref[f"call{call}_loss_cls"]), rel=1e-5)
        assert terms.mim.item() == pytest.approx(float(ref[f"call{call}_loss_patch"]), rel=1e-5)
        assert terms.total.item() == pytest.approx(float(ref[f"call{call}_loss"]), rel=1e-5)
        np.testing.assert_allclose(loss.center.numpy(), ref[f"call{call}_center_after"],
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(loss.center_patch.numpy(), ref[f"call{call}_center2_after"],
                                   rtol=1e-5, atol=1e-6)


def _cross_entropy(target_probs, student_logits, student_temp):
    scaled = [s / student_temp for s in student_logits]
    log_norm = math.log(sum(math.exp(s) for s in scaled))
    return -sum(t * (s - log_norm) for t, s in zip(target_probs, scaled, strict=True))


def _softmax(values):
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def test_matches_hand_computation_on_tiny_tensors():
    # B = 1, K = 2, 2 global crops, 1 local crop, 2 patches, zero centres, epoch 0 (temp 0.04).
    s_g = torch.tensor([[0.2, -0.1], [0.0, 0.3]])
    s_l = torch.tensor([[0.5, 0.1]])
    t_g = torch.tensor([[0.1, 0.0], [-0.2, 0.1]])
    s_p = torch.tensor([[[0.1, 0.2], [0.3, -0.3]], [[0.0, 0.0], [0.2, 0.1]]])
    t_p = torch.tensor([[[0.05, 0.0], [0.0, 0.1]], [[0.1, 0.1], [-0.1, 0.0]]])
    mim = torch.tensor([[True, False], [True, True]])
    loss = IBOTLoss(2, 2, n_global_crops=2, n_local_crops=1, n_epochs=1,
                    warmup_teacher_temp_epochs=0, teacher_temp=0.04, teacher_patch_temp=0.04)
    terms = loss(s_g, s_l, s_p, t_g, t_p, mim, epoch=0)

    def tp(row):
        return _softmax([v / 0.04 for v in row])
    students = [s_g[0].tolist(), s_g[1].tolist(), s_l[0].tolist()]
    teachers = [tp(t_g[0].tolist()), tp(t_g[1].tolist())]
    pairs = [(q, v) for q in range(2) for v in range(3) if v != q]
    expected_obj = sum(_cross_entropy(teachers[q], students[v], 0.1) for q, v in pairs) / 4
    per_crop = []
    for crop in range(2):
        masked = [n for n in range(2) if mim[crop, n]]
        ce = [_cross_entropy(tp(t_p[crop, n].tolist()), s_p[crop, n].tolist(), 0.1)
              for n in masked]
        per_crop.append(sum(ce) / len(masked))
    expected_mim = sum(per_crop) / 2
    assert terms.obj.item() == pytest.approx(expected_obj, rel=1e-5)
    assert terms.mim.item() == pytest.approx(expected_mim, rel=1e-5)


def test_centres_update_with_momentum_after_the_loss():
    loss = IBOTLoss(3, 2, n_global_crops=2, n_local_crops=0, n_epochs=1, center_momentum=0.9,
                    center_momentum_patch=0.9)
    teacher = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    teacher_patch = torch.arange(8, dtype=torch.float32).view(2, 2, 2)
    loss(teacher, None, teacher_patch, teacher, teacher_patch,
         torch.ones(2, 2, dtype=torch.bool), 0)
    torch.testing.assert_close(loss.center, 0.1 * teacher.mean(0, keepdim=True))
    patch_mean = teacher_patch.mean(1).mean(0).view(1, 1, 2)
    torch.testing.assert_close(loss.center_patch, 0.1 * patch_mean)


def test_image_without_masked_patch_contributes_zero_not_nan():
    loss = IBOTLoss(4, 4, n_global_crops=2, n_local_crops=0, n_epochs=1)
    logits = torch.randn(2, 4)
    patches = torch.randn(2, 3, 4)
    terms = loss(logits, None, patches, logits, patches, torch.zeros(2, 3, dtype=torch.bool), 0)
    assert terms.mim.item() == 0.0 and math.isfinite(terms.total.item())


def test_teacher_temperature_warms_up_linearly_then_stays():
    np.testing.assert_allclose(teacher_temp_schedule(0.04, 0.07, 3, 5),
                               [0.04, 0.055, 0.07, 0.07, 0.07])
