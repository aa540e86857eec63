"""Read-out [OBJ] tokens (issue 19): no row attends to an [OBJ] key but that [OBJ] itself.

What an image-level read-out pass equals, exactly (tested against timm below):
- its [OBJ] token is timm's ViT on the same weights with one change, the [CLS] key hidden
  from the patch rows (`forward_features(x, attn_mask=M)`, M[patch rows, 0] = False), and
- its patch tokens are timm's patch tokens of the same ViT built without a class token
  (`class_token=False`, position embeddings of the patches only): the patches never read
  the [OBJ] token, so they are a plain patch-only ViT.
"""

import pytest
import timm
import torch

from odis_core.model.obj_attention import readout_attention_mask
from odis_core.model.obj_vit import ObjViT

N_PATCHES = 16  # 32 px images, patch 8


def _readout(impl: str = "dense", depth: int = 2) -> ObjViT:
    torch.manual_seed(0)
    return ObjViT(
        "vit_tiny", img_size=32, patch_size=8, drop_path_rate=0.0, depth=depth,
        attention_impl=impl, obj_readout=True,
    ).eval()


def _timm(depth: int = 2, **kwargs) -> torch.nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
        depth=depth, **kwargs,
    ).eval()


def _random_masks(generator: torch.Generator, batch: int, n_obj: int) -> torch.Tensor:
    masks = torch.rand(batch, n_obj, N_PATCHES, generator=generator) > 0.6
    masks[:, :, 3] = True
    return masks


def test_mask_rows_hide_every_obj_key_but_its_own():
    masks = torch.tensor([[[True, False, True], [False, False, False]]])  # K = 2, N = 3
    mask = readout_attention_mask(masks)[0, 0]
    assert mask.shape == (5, 5)
    assert mask[0].tolist() == [True, False, True, False, True]
    assert mask[1].tolist() == [False, True, False, False, False]  # padding: own key only
    assert not mask[2:, :2].any() and mask[2:, 2:].all()  # patches: patch keys only


def _forward_backward(model: ObjViT, images, masks, weights):
    model.zero_grad(set_to_none=True)
    images = images.clone().requires_grad_(True)
    tokens = model(images, obj_patch_mask=masks)
    (tokens * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return tokens.detach(), images.grad, grads


@pytest.mark.parametrize("n_obj", [1, 3])
def test_split_equals_dense_forward_and_backward(n_obj):
    split, dense = _readout("split"), _readout("dense")
    g = torch.Generator().manual_seed(n_obj)
    images = torch.randn(3, 3, 32, 32, generator=g)
    masks = _random_masks(g, 3, n_obj)
    masks[2, -1] = False  # a padding token
    weights = torch.randn(3, n_obj + N_PATCHES, split.embed_dim, generator=g)
    out_s, din_s, grads_s = _forward_backward(split, images, masks, weights)
    out_d, din_d, grads_d = _forward_backward(dense, images, masks, weights)
    torch.testing.assert_close(out_s, out_d, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(din_s, din_d, rtol=1e-4, atol=1e-5)
    assert grads_s.keys() == grads_d.keys() and "vit.cls_token" in grads_s
    for name in grads_s:
        torch.testing.assert_close(grads_s[name], grads_d[name], rtol=1e-4, atol=1e-4, msg=name)
    assert torch.isfinite(out_s).all()


@pytest.mark.parametrize("impl", ["split", "dense"])
def test_image_level_pass_equals_timm_with_cls_key_hidden_from_patches(impl):
    model = _readout(impl)
    reference = _timm()
    reference.load_state_dict(model.vit.state_dict())
    images = torch.randn(2, 3, 32, 32)
    hide_cls_from_patches = torch.ones(1, 1, 1 + N_PATCHES, 1 + N_PATCHES, dtype=torch.bool)
    hide_cls_from_patches[..., 1:, 0] = False
    with torch.no_grad():
        ours = model(images)
        all_true = model(images, obj_patch_mask=torch.ones(2, N_PATCHES, dtype=torch.bool))
        expected = reference.forward_features(images, attn_mask=hide_cls_from_patches)
        plain_timm = reference.forward_features(images)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(all_true, expected, rtol=1e-5, atol=1e-5)
    # Hiding the [CLS] key is the whole difference: plain timm differs in every token.
    assert (ours[:, 0] - plain_timm[:, 0]).abs().max() > 1e-3
    assert (ours[:, 1:] - plain_timm[:, 1:]).abs().max() > 1e-3


def test_patch_tokens_equal_timm_vit_without_class_token():
    model = _readout()
    no_cls = _timm(class_token=False, global_pool="avg", fc_norm=False)
    state = {k: v for k, v in model.vit.state_dict().items() if k != "cls_token"}
    state["pos_embed"] = state["pos_embed"][:, 1:]  # the patches' positions only
    no_cls.load_state_dict(state)
    images = torch.randn(2, 3, 32, 32)
    masks = _random_masks(torch.Generator().manual_seed(3), 2, 4)
    with torch.no_grad():
        ours = model(images, obj_patch_mask=masks)
        expected = no_cls.forward_features(images)
    assert expected.shape == (2, N_PATCHES, model.embed_dim)
    torch.testing.assert_close(ours[:, 4:], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["split", "dense"])
def test_k_tokens_equal_k_single_object_passes_with_padding(impl):
    model = _readout(impl)
    g = torch.Generator().manual_seed(7)
    images = torch.randn(2, 3, 32, 32, generator=g)
    masks = _random_masks(g, 2, 5)
    masks[1, 3:] = False  # image 1 has 3 objects and 2 padding tokens
    with torch.no_grad():
        together = model(images, obj_patch_mask=masks)
        for obj in range(5):
            alone = model(images, obj_patch_mask=masks[:, obj])
            live = [0, 1] if obj < 3 else [0]
            torch.testing.assert_close(together[live, obj], alone[live, 0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(together[:, 5:], alone[:, 1:], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(together).all()


def test_obj_token_ignores_other_objects_tokens():
    """Changing one object's mask changes its own [OBJ] output and nothing else."""
    model = _readout()
    g = torch.Generator().manual_seed(11)
    images = torch.randn(1, 3, 32, 32, generator=g)
    masks = _random_masks(g, 1, 3)
    other = masks.clone()
    other[0, 1] = ~other[0, 1]
    other[0, 1, 0] = True
    with torch.no_grad():
        a, b = model(images, obj_patch_mask=masks), model(images, obj_patch_mask=other)
    assert (a[0, 1] - b[0, 1]).abs().max() > 1e-3
    torch.testing.assert_close(a[0, [0, 2]], b[0, [0, 2]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a[0, 3:], b[0, 3:], rtol=1e-5, atol=1e-5)


def test_several_obj_tokens_without_readout_are_refused():
    torch.manual_seed(0)
    model = ObjViT("vit_tiny", img_size=32, patch_size=8, depth=1).eval()
    with pytest.raises(ValueError, match="obj_readout"):
        model(torch.randn(1, 3, 32, 32), obj_patch_mask=torch.ones(1, 2, N_PATCHES, dtype=bool))
