"""The [OBJ] Vision Transformer: a timm ViT whose [CLS] token becomes [OBJ] (spec §4).

Masked attention: in every block, the [OBJ] query row may attend only to its own key and
to the patches of one object; every other row (the patch tokens) keeps full attention,
because patches need the context. Everything else — patch embedding, position embedding,
blocks, attention kernels, final norm — is timm's own code on timm's own weights, so a
backbone exported from here loads into `timm.create_model` unchanged, and with an
all-true mask the model computes exactly what timm computes (tested).

Read-out variant (`obj_readout`, issue 19; off by default, the paper's model is the one
above): no row attends to any [OBJ] key except each [OBJ] to its own, so the patch tokens
never read the [OBJ] tokens and one image can carry K [OBJ] tokens, one per object, in one
pass; each equals what a pass with that object alone gives (tested).

iBOT's masked-image modelling needs one addition: a learnable mask token that replaces the
embedding of masked patches before the position embedding is added (student only).

Inputs of another grid than the stored position embedding (local crops) get it resampled
the way DINO/iBOT do ("ibot": bicubic by the scale factor (grid + 0.1) / stored grid, which
samples the stored grid at other points than a resize to the target size; timm's own
`resample_abs_pos_embed` differs from it by up to 0.029 on a 4 x 4 -> 2 x 2 grid) or as
timm does ("timm", what the exported backbone does inside timm).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import build_sincos2d_pos_embed
from torch import nn
from torch.utils.checkpoint import checkpoint

from odis_core.model.obj_attention import (
    ATTENTION_IMPLS,
    obj_attention_mask,
    obj_row_mask,
    readout_attention_mask,
    split_block_forward,
    split_readout_block_forward,
    supports_split_attention,
)

__all__ = ["ARCHITECTURES", "ObjViT", "obj_attention_mask", "resolve_arch"]

# Short names users know from DINO/iBOT, mapped to timm architectures (patch 16).
ARCHITECTURES = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
}
POS_EMBED_RESAMPLE = ("ibot", "timm")
# "learned": timm's (iBOT's) trained table; "sincos": fixed 2-D sin-cos (MoCo v3, MAE).
POS_EMBEDS = ("learned", "sincos")


def resolve_arch(arch: str) -> str:
    """timm model name for a short name (`vit_small`) or a timm ViT name passed through."""
    name = ARCHITECTURES.get(arch, arch)
    if name not in timm.list_models("vit_*"):
        known = ", ".join(ARCHITECTURES)
        raise ValueError(f"unknown architecture {arch!r}: use one of {known} or a timm vit_* name")
    return name


class ObjViT(nn.Module):
    """timm ViT with an [OBJ] token (timm's class token) and masked [OBJ] attention.

    `vit` is a plain `timm.models.VisionTransformer` (no classifier head); its state dict
    has timm's key names. `mask_token` is iBOT's learnable embedding for masked patches.
    """

    def __init__(
        self,
        arch: str = "vit_small",
        img_size: int = 224,
        patch_size: int | None = None,
        drop_path_rate: float = 0.1,
        attention_impl: str = "auto",
        grad_checkpointing: bool = False,
        pos_embed_resample: str = "timm",
        obj_readout: bool = False,
        pos_embed: str = "learned",
        **timm_kwargs,
    ) -> None:
        super().__init__()
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {pos_embed!r}")
        if pos_embed_resample not in POS_EMBED_RESAMPLE:
            raise ValueError(
                f"pos_embed_resample must be one of {POS_EMBED_RESAMPLE}, "
                f"got {pos_embed_resample!r}"
            )
        self.pos_embed_resample = pos_embed_resample
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}"
            )
        kwargs = dict(
            pretrained=False,
            num_classes=0,
            img_size=img_size,
            drop_path_rate=drop_path_rate,
            # Local crops (96 px) and global crops (224 px) share one model: timm resamples
            # the position embedding to the input's grid, as iBOT's interpolate_pos_encoding.
            dynamic_img_size=True,
            **timm_kwargs,
        )
        if patch_size is not None:
            kwargs["patch_size"] = patch_size
        self.arch = resolve_arch(arch)
        self.vit = timm.create_model(self.arch, **kwargs)
        if not getattr(self.vit, "has_class_token", False) or self.vit.num_prefix_tokens != 1:
            raise ValueError(f"{self.arch}: [OBJ] needs exactly one class token and no registers")
        self.embed_dim: int = self.vit.embed_dim
        self.patch_size: int = self.vit.patch_embed.patch_size[0]
        if pos_embed == "sincos":
            self._freeze_sincos_pos_embed()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, self.embed_dim))
        # "split": flash-friendly unmasked attention + the masked [OBJ] row written out;
        # "dense": one SDPA with a (B, 1, 1+N, 1+N) mask; "auto" (default): split on GPUs,
        # dense on CPU (see obj_attention.ATTENTION_IMPLS).
        if attention_impl != "dense" and not all(map(supports_split_attention, self.vit.blocks)):
            attention_impl = "dense"  # an unusual timm block: fall back to timm's own forward
        self.attention_impl = attention_impl
        # Recompute each block's activations in the backward pass (ViT-L at batch >= 64 on
        # one 80 GB GPU): memory for about one extra forward.
        self.grad_checkpointing = grad_checkpointing
        # Read-out [OBJ] tokens: every [OBJ] key hidden from every row but its own.
        self.obj_readout = obj_readout

    def forward(
        self,
        images: torch.Tensor,
        obj_patch_mask: torch.Tensor | None = None,
        mim_mask: torch.Tensor | None = None,
        force_masked_path: bool = False,
    ) -> torch.Tensor:
        """All tokens after the final norm.

        images: (B, 3, H, W) normalised.
        obj_patch_mask: (B, N) bool, True where the [OBJ] row may attend; None = all patches.
            Read-out models also take (B, K, N): K [OBJ] tokens, token i for object i; an
            all-false row is padding (its output means nothing and affects nothing).
        mim_mask: (B, N) bool, True where the patch embedding is replaced by the mask token.
        force_masked_path: run the masked-attention kernel even for an all-true mask (the
            test that the mask path equals timm uses it).
        Returns (B, 1 + N, D): token 0 is [OBJ], tokens 1.. the patches in raster order
        ((B, K + N, D) with K [OBJ] tokens first for a (B, K, N) read-out mask).
        """
        tokens = self.vit.patch_embed(images)  # (B, gh, gw, D): dynamic_img_size keeps the grid
        if mim_mask is not None:
            mim_grid = mim_mask.view(tokens.shape[:3]).unsqueeze(-1)
            tokens = torch.where(mim_grid, self.mask_token.to(tokens.dtype), tokens)
        tokens = self._pos_embed(tokens)
        tokens = self.vit.patch_drop(tokens)
        tokens = self.vit.norm_pre(tokens)
        if self.obj_readout:
            return self.vit.norm(self._run_readout_blocks(tokens, obj_patch_mask))
        if obj_patch_mask is not None and obj_patch_mask.ndim != 2:
            raise ValueError(
                "several [OBJ] tokens per image need obj_readout: otherwise every patch "
                "would attend to every object's [OBJ] key"
            )
        if obj_patch_mask is None or (
            not force_masked_path
            and self._impl_for(tokens) == "dense"
            and bool(obj_patch_mask.all())
        ):
            # No mask: timm's blocks as they are (fused / flash attention).
            return self.vit.norm(self._run_blocks(tokens, None))
        return self.vit.norm(self._run_blocks(tokens, obj_patch_mask))

    def _freeze_sincos_pos_embed(self) -> None:
        """MoCo v3's fixed 2-D sin-cos positions ([OBJ]'s position 0), kept out of training.

        They stay in timm's `pos_embed` parameter, so the exported backbone is unchanged."""
        grid = list(self.vit.patch_embed.grid_size)
        table = build_sincos2d_pos_embed(grid, dim=self.embed_dim)
        with torch.no_grad():
            self.vit.pos_embed.zero_()
            self.vit.pos_embed[0, 1:] = table.to(self.vit.pos_embed.dtype)
        self.vit.pos_embed.requires_grad_(False)

    def _pos_embed(self, grid_tokens: torch.Tensor) -> torch.Tensor:
        """(B, gh, gw, D) patch embeddings -> (B, 1 + N, D): [OBJ] prepended, positions added."""
        stored_grid = tuple(self.vit.patch_embed.grid_size)
        if self.pos_embed_resample == "timm" or tuple(grid_tokens.shape[1:3]) == stored_grid:
            return self.vit._pos_embed(grid_tokens)
        batch, _, _, dim = grid_tokens.shape
        target_grid = tuple(grid_tokens.shape[1:3])
        positions = ibot_resampled_pos_embed(self.vit.pos_embed, stored_grid, target_grid)
        obj = self.vit.cls_token.expand(batch, -1, -1)
        tokens = torch.cat([obj, grid_tokens.reshape(batch, -1, dim)], dim=1)
        return self.vit.pos_drop(tokens + positions.to(tokens.dtype))

    def _impl_for(self, tokens: torch.Tensor) -> str:
        if self.attention_impl == "auto":
            return "split" if tokens.device.type == "cuda" else "dense"
        return self.attention_impl

    def _run_readout_blocks(
        self, tokens: torch.Tensor, obj_patch_mask: torch.Tensor | None
    ) -> torch.Tensor:
        batch, n_patches = tokens.shape[0], tokens.shape[1] - 1
        if obj_patch_mask is None:  # the image-level pass: one [OBJ] over all patches
            obj_patch_mask = tokens.new_ones(batch, 1, n_patches, dtype=torch.bool)
        elif obj_patch_mask.ndim == 2:
            obj_patch_mask = obj_patch_mask[:, None]
        n_obj = obj_patch_mask.shape[1]
        if n_obj > 1:  # every [OBJ] starts as the same token: class token + its position
            tokens = torch.cat([tokens[:, :1].expand(-1, n_obj, -1), tokens[:, 1:]], dim=1)
        if self._impl_for(tokens) == "split":
            mask, forward = obj_patch_mask, split_readout_block_forward
        else:
            mask, forward = readout_attention_mask(obj_patch_mask), _dense_block
        return self._apply_blocks(tokens, mask, forward)

    def _run_blocks(
        self, tokens: torch.Tensor, obj_patch_mask: torch.Tensor | None
    ) -> torch.Tensor:
        if obj_patch_mask is None:
            mask, forward = None, _plain_block
        elif self._impl_for(tokens) == "split":
            mask, forward = obj_row_mask(obj_patch_mask), split_block_forward
        else:
            mask, forward = obj_attention_mask(obj_patch_mask), _dense_block
        return self._apply_blocks(tokens, mask, forward)

    def _apply_blocks(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor | None,
        forward: Callable[[nn.Module, torch.Tensor, Any], torch.Tensor],
    ) -> torch.Tensor:
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.vit.blocks:
            if recompute:
                tokens = checkpoint(forward, block, tokens, mask, use_reentrant=False)
            else:
                tokens = forward(block, tokens, mask)
        return tokens


def ibot_resampled_pos_embed(
    pos_embed: torch.Tensor, stored_grid: tuple[int, int], target_grid: tuple[int, int]
) -> torch.Tensor:
    """(1, 1 + gh*gw, D) position embedding for a `target_grid` input, as DINO/iBOT's
    `interpolate_pos_encoding`: the [OBJ] row as it is; the grid resampled bicubically
    (align_corners false, no antialias) by the scale factor (target + 0.1) / stored. The
    0.1 guards the floor of the output size against rounding, and because a factor (not a
    size) is given, PyTorch samples the source at (i + 0.5) / factor - 0.5."""
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].reshape(1, *stored_grid, dim).permute(0, 3, 1, 2)
    factors = tuple((t + 0.1) / s for t, s in zip(target_grid, stored_grid, strict=True))
    resampled = F.interpolate(grid.float(), scale_factor=factors, mode="bicubic")
    if tuple(resampled.shape[-2:]) != tuple(target_grid):
        raise ValueError(f"position grid {stored_grid} resampled to {resampled.shape[-2:]}")
    patch_rows = resampled.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([pos_embed[:, :1], patch_rows], dim=1)


def _plain_block(block: nn.Module, tokens: torch.Tensor, _mask: None) -> torch.Tensor:
    return block(tokens)


def _dense_block(block: nn.Module, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return block(tokens, attn_mask=mask)
