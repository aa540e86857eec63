"""The split [OBJ] attention equals the dense-masked reference and timm (spec §4, issue 5)."""

import pytest
import timm
import torch

from odis_core.model.obj_vit import ObjViT


def _pair(depth: int = 2, drop_path: float = 0.0) -> tuple[ObjViT, ObjViT]:
    torch.manual_seed(0)
    split = ObjViT(
        "vit_tiny",
        img_size=32,
        patch_size=8,
        drop_path_rate=drop_path,
        depth=depth,
        attention_impl="split",
    )
    dense = ObjViT(
        "vit_tiny",
        img_size=32,
        patch_size=8,
        drop_path_rate=drop_path,
        depth=depth,
        attention_impl="dense",
    )
    dense.load_state_dict(split.state_dict())
    assert split.attention_impl == "split" and dense.attention_impl == "dense"
    return split, dense


def _forward_backward(model: ObjViT, images: torch.Tensor, mask: torch.Tensor, weights):
    model.zero_grad(set_to_none=True)
    images = images.clone().requires_grad_(True)
    tokens = model(images, obj_patch_mask=mask, force_masked_path=True)
    (tokens * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return tokens.detach(), images.grad, grads


@pytest.mark.parametrize("seed", [0, 1])
def test_split_equals_dense_masked_reference_forward_and_backward(seed):
    split, dense = _pair()
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, 32, 32, generator=g)
    mask = torch.rand(3, 16, generator=g) > 0.6
    mask[:, 5] = True
    mask[2] = False  # an [OBJ] row that sees only its own key
    weights = torch.randn(3, 17, split.embed_dim, generator=g)
    out_s, din_s, grads_s = _forward_backward(split, images, mask, weights)
    out_d, din_d, grads_d = _forward_backward(dense, images, mask, weights)
    torch.testing.assert_close(out_s, out_d, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(din_s, din_d, rtol=1e-4, atol=1e-5)
    assert grads_s.keys() == grads_d.keys() and len(grads_s) > 10
    for name in grads_s:
        torch.testing.assert_close(grads_s[name], grads_d[name], rtol=1e-4, atol=1e-4, msg=name)
    # The mask matters: the same inputs with an all-true mask give another [OBJ] output.
    with torch.no_grad():
        unmasked = split(images)
    assert not torch.allclose(unmasked[:, 0], out_s[:, 0], atol=1e-4)


def test_split_with_all_true_mask_equals_timm_forward_and_backward():
    split, _ = _pair()
    reference = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=32,
        patch_size=8,
        depth=2,
        drop_path_rate=0.0,
    )
    reference.load_state_dict(split.vit.state_dict())
    images = torch.randn(2, 3, 32, 32)
    weights = torch.randn(2, 17, split.embed_dim)
    all_true = torch.ones(2, 16, dtype=torch.bool)
    out_s, din_s, grads_s = _forward_backward(split, images, all_true, weights)
    ref_images = images.clone().requires_grad_(True)
    (reference.forward_features(ref_images) * weights).sum().backward()
    torch.testing.assert_close(
        out_s, reference.forward_features(images).detach(), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(din_s, ref_images.grad, rtol=1e-4, atol=1e-5)
    for name, parameter in reference.named_parameters():
        torch.testing.assert_close(grads_s[f"vit.{name}"], parameter.grad, rtol=1e-4, atol=1e-4)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = ObjViT("vit_tiny", img_size=32, patch_size=8, drop_path_rate=0.1, depth=2)
    recomputed = ObjViT(
        "vit_tiny", img_size=32, patch_size=8, drop_path_rate=0.1, depth=2, grad_checkpointing=True
    )
    recomputed.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 32, 32)
    mask = torch.rand(2, 16) > 0.5
    weights = torch.randn(2, 17, plain.embed_dim)
    results = []
    for model in (plain, recomputed):
        torch.manual_seed(5)  # same drop-path draws; checkpoint replays the RNG state
        results.append(_forward_backward(model.train(), images, mask, weights))
    for a, b in zip(results[0][2].values(), results[1][2].values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_auto_picks_split_on_gpu_and_dense_on_cpu():
    model = ObjViT("vit_tiny", img_size=32, patch_size=8, depth=1)
    assert model.attention_impl == "auto"
    assert model._impl_for(torch.zeros(1)) == "dense"
    if torch.cuda.is_available():
        assert model._impl_for(torch.zeros(1, device="cuda")) == "split"
