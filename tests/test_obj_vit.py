"""[OBJ] masked attention over timm (spec §4)."""

import pytest
import timm
import torch

from odis_core.model.obj_vit import ObjViT, obj_attention_mask


def _tiny(depth: int = 2) -> ObjViT:
    torch.manual_seed(0)
    return ObjViT("vit_tiny", img_size=32, patch_size=8, drop_path_rate=0.0, depth=depth).eval()


def _timm_twin(model: ObjViT, depth: int = 2) -> torch.nn.Module:
    reference = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
        depth=depth,
    ).eval()
    reference.load_state_dict(model.vit.state_dict())
    return reference


def test_all_true_mask_equals_unmodified_timm_vit():
    model = _tiny()
    reference = _timm_twin(model)
    images = torch.randn(3, 3, 32, 32)
    all_true = torch.ones(3, 16, dtype=torch.bool)
    with torch.no_grad():
        expected = reference.forward_features(images)
        masked_path = model(images, obj_patch_mask=all_true, force_masked_path=True)
        default_path = model(images, obj_patch_mask=all_true)
    torch.testing.assert_close(masked_path, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(default_path, expected, rtol=1e-5, atol=1e-5)


def test_partial_mask_changes_only_what_it_should():
    model = _tiny()
    images = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :4] = True
    with torch.no_grad():
        unmasked = model(images)
        masked = model(images, obj_patch_mask=mask)
    # The [OBJ] token sees fewer keys, so its output differs from unmasked attention...
    assert not torch.allclose(masked[:, 0], unmasked[:, 0], atol=1e-4)


def test_attention_mask_rows():
    patch_mask = torch.tensor([[True, False, True]])
    mask = obj_attention_mask(patch_mask)
    assert mask.shape == (1, 1, 4, 4)
    assert mask[0, 0, 0].tolist() == [True, True, False, True]  # [OBJ] sees itself + object
    assert mask[0, 0, 1:].all()  # patch rows keep full attention


def _object_and_background_pixels(images: torch.Tensor, object_patches: list[int]) -> tuple:
    """Pixel masks (B,3,32,32) of the object's patches and of the rest (patch 8, 4x4 grid)."""
    inside = torch.zeros_like(images, dtype=torch.bool)
    for patch in object_patches:
        row, col = divmod(patch, 4)
        inside[..., row * 8:(row + 1) * 8, col * 8:(col + 1) * 8] = True
    return inside, ~inside


def test_one_block_obj_ignores_outside_pixels_and_follows_inside_pixels():
    model = _tiny(depth=1)
    torch.manual_seed(1)
    images = torch.randn(2, 3, 32, 32)
    object_patches = [5, 6, 9]
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, object_patches] = True
    inside, outside = _object_and_background_pixels(images, object_patches)
    outside_changed = torch.where(outside, torch.randn_like(images), images)
    inside_changed = torch.where(inside, torch.randn_like(images), images)
    with torch.no_grad():
        base = model(images, obj_patch_mask=mask)[:, 0]
        after_outside = model(outside_changed, obj_patch_mask=mask)[:, 0]
        after_inside = model(inside_changed, obj_patch_mask=mask)[:, 0]
        unmasked_after_outside = model(outside_changed)[:, 0]
        unmasked_base = model(images)[:, 0]
    torch.testing.assert_close(after_outside, base, rtol=1e-5, atol=1e-5)
    assert (after_inside - base).abs().max() > 1e-3
    # Without the mask the same outside change does reach [OBJ]: the mask is what blocks it.
    assert (unmasked_after_outside - unmasked_base).abs().max() > 1e-3


def test_mim_mask_replaces_patch_embeddings_with_mask_token():
    model = _tiny()
    with torch.no_grad():
        model.mask_token.normal_()
    images = torch.randn(1, 3, 32, 32)
    other = images.clone()
    other[..., :8, :8] = torch.randn(1, 3, 8, 8)  # change only patch 0's pixels
    mim = torch.zeros(1, 16, dtype=torch.bool)
    mim[0, 0] = True
    with torch.no_grad():
        a = model(images, mim_mask=mim)
        b = model(other, mim_mask=mim)
        c = model(other)
    torch.testing.assert_close(a, b)  # a masked patch's pixels are invisible
    assert not torch.allclose(a, c, atol=1e-4)


def test_local_crop_resolution_uses_resampled_position_embedding():
    model = _tiny()
    with torch.no_grad():
        tokens = model(torch.randn(2, 3, 16, 16))
    assert tokens.shape == (2, 1 + 4, model.embed_dim)


def test_sincos_positions_are_moco_v3_table_frozen_and_loadable_into_timm():
    torch.manual_seed(0)
    model = ObjViT("vit_tiny", img_size=32, patch_size=8, drop_path_rate=0.0, depth=2,
                   pos_embed="sincos")
    # Hand-built 2-D sin-cos, in timm's column order: sin y, sin x, cos y, cos x.
    grid_y, grid_x = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(48) / 48)
    angles_y = grid_y.reshape(-1, 1) * omega
    angles_x = grid_x.reshape(-1, 1) * omega
    expected = torch.cat(
        [angles_y.sin(), angles_x.sin(), angles_y.cos(), angles_x.cos()], dim=1
    )
    table = model.vit.pos_embed[0]
    assert torch.all(table[0] == 0)  # [OBJ]'s position
    torch.testing.assert_close(table[1:], expected, rtol=0, atol=1e-6)
    assert not model.vit.pos_embed.requires_grad
    # One optimiser step leaves it as it is, and a plain timm ViT runs it unchanged.
    before = model.vit.pos_embed.clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(2, 3, 32, 32))[:, 0].sum().backward()
    optimizer.step()
    assert torch.equal(model.vit.pos_embed, before)
    model.eval()
    reference = _timm_twin(model)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference.forward_features(images),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pos_embed"):
        ObjViT("vit_tiny", img_size=32, patch_size=8, pos_embed="rope")
