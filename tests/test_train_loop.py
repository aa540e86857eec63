"""One training step's mechanisms: EMA teacher, frozen last layer, clipping, NaN guard."""

import math
from dataclasses import dataclass

import pytest
import torch

from odis_core.train.config import PretrainConfig
from odis_core.train.loop import (
    EpochSampler,
    NonFiniteLossError,
    Trainer,
    clip_gradients_per_parameter,
    param_groups,
)

TINY = dict(arch="vit_tiny", depth=2, patch_size=8, global_size=32, local_size=16,
            n_local_crops=2, out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16,
            batch_size=3, epochs=2, warmup_epochs=0, min_patches_per_block=2, device="cpu")


@dataclass
class FakeBatch:
    """Random tensors with CropBatch's fields (crop-major, B = 3)."""

    global_crops: torch.Tensor
    local_crops: torch.Tensor
    global_patch_masks: torch.Tensor
    local_patch_masks: torch.Tensor
    mim_masks: torch.Tensor

    def to(self, device, non_blocking=False):
        return self

    def rendered(self, global_size, local_size):
        return self


def fake_batch(seed: int = 0, batch: int = 3) -> FakeBatch:
    g = torch.Generator().manual_seed(seed)
    global_masks = torch.rand(2 * batch, 16, generator=g) > 0.5
    global_masks[:, 0] = True
    local_masks = torch.rand(2 * batch, 4, generator=g) > 0.5
    local_masks[:, 0] = True
    return FakeBatch(
        torch.randn(2 * batch, 3, 32, 32, generator=g),
        torch.randn(2 * batch, 3, 16, 16, generator=g),
        global_masks,
        local_masks,
        torch.rand(2 * batch, 16, generator=g) > 0.7,
    )


def make_trainer(iters_per_epoch: int = 2, **overrides) -> Trainer:
    config = PretrainConfig(**{**TINY, **overrides}).resolved()
    return Trainer(config, iters_per_epoch=iters_per_epoch, device="cpu")


def test_teacher_is_ema_of_student_and_never_gets_gradients():
    trainer = make_trainer()
    before = [p.detach().clone() for p in trainer.teacher.parameters()]
    metrics = trainer.train_step(fake_batch())
    momentum = metrics["momentum"]
    for old, teacher_p, student_p in zip(before, trainer.teacher.parameters(),
                                         trainer.student.parameters(), strict=True):
        assert teacher_p.grad is None and not teacher_p.requires_grad
        torch.testing.assert_close(teacher_p, momentum * old + (1 - momentum) * student_p)
    assert math.isfinite(metrics["loss"]) and metrics["loss"] > 0


def test_last_layer_frozen_in_first_epoch_only():
    trainer = make_trainer(iters_per_epoch=1, norm_last_layer=False)
    last = trainer.student.head.last_layer
    before = [p.detach().clone() for p in last.parameters()]
    mlp_before = trainer.student.head.mlp[0].weight.detach().clone()
    trainer.train_step(fake_batch(0))  # epoch 0
    for old, new in zip(before, last.parameters(), strict=True):
        torch.testing.assert_close(old, new)
    assert not torch.equal(mlp_before, trainer.student.head.mlp[0].weight)
    trainer.train_step(fake_batch(1))  # epoch 1
    changed = [not torch.equal(a, b) for a, b in zip(before, last.parameters(), strict=True)]
    assert any(changed)


def test_per_parameter_clipping():
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([3.0, 4.0, 0.0])  # norm 5 -> clipped to 1
    b.grad = torch.tensor([0.3, 0.4])  # norm 0.5 -> unchanged
    module = torch.nn.Module()
    module.a, module.b = a, b
    total = clip_gradients_per_parameter(module, 1.0)
    assert total == pytest.approx(math.sqrt(25 + 0.25))
    assert a.grad.norm().item() == pytest.approx(1.0, rel=1e-4)
    torch.testing.assert_close(b.grad, torch.tensor([0.3, 0.4]))


def test_weight_decay_exempts_biases_and_norms():
    trainer = make_trainer()
    decayed, exempt = param_groups(trainer.student)
    assert all(p.ndim > 1 for p in decayed["params"])
    assert all(p.ndim == 1 for p in exempt["params"]) and exempt["weight_decay"] == 0.0


def test_non_finite_loss_stops_before_any_update():
    trainer = make_trainer()
    batch = fake_batch()
    batch.global_crops[0, 0, 0, 0] = float("nan")
    before = [p.detach().clone() for p in trainer.student.parameters()]
    with pytest.raises(NonFiniteLossError, match="step 1"):
        trainer.train_step(batch)
    for old, new in zip(before, trainer.student.parameters(), strict=True):
        torch.testing.assert_close(old, new, equal_nan=True)


def test_image_objective_turns_off_object_mechanisms():
    config = PretrainConfig(**TINY, objective="image").resolved()
    assert not config.masked_attention and not config.object_crops


def test_epoch_sampler_is_a_seeded_permutation_that_resumes_mid_epoch():
    sampler = EpochSampler(10, seed=1)
    sampler.set_position(epoch=3, start_index=0)
    full = list(sampler)
    assert sorted(full) == list(range(10))
    sampler.set_position(epoch=3, start_index=4)
    assert list(sampler) == full[4:]
    sampler.set_position(epoch=4, start_index=0)
    assert list(sampler) != full


def test_resume_refuses_a_checkpoint_of_another_process_count():
    from odis_core.train.checkpoint import CheckpointError

    trainer = make_trainer()
    state = trainer.state()
    assert state["world_size"] == 1
    state["world_size"] = 2
    with pytest.raises(CheckpointError, match="2 process"):
        make_trainer().load_state(state)
