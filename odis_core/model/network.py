"""Backbone + head as used for distillation: one object-level feature and the patch tokens.

`feature` chooses what stands for the object (spec §8 ablations):
- "obj": the [OBJ] token, whose attention row is masked to the object when
  `masked_attention` is on (ODIS), or sees everything when it is off (iBOT's [CLS]);
- "meanpool": the mean of the in-object patch tokens (the authors report it collapses).
"""

from __future__ import annotations

import torch
from torch import nn

from odis_core.model.heads import IBOTHead
from odis_core.model.obj_vit import ObjViT

FEATURES = ("obj", "meanpool")


def meanpool_object(patch_tokens: torch.Tensor, obj_patch_mask: torch.Tensor) -> torch.Tensor:
    """(B, N, D) tokens, (B, N) bool mask -> (B, D) mean over the object's patches."""
    weights = obj_patch_mask.to(patch_tokens.dtype).unsqueeze(-1)
    return (patch_tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class DistillationNetwork(nn.Module):
    def __init__(
        self,
        backbone: ObjViT,
        head: IBOTHead,
        masked_attention: bool = True,
        feature: str = "obj",
    ) -> None:
        super().__init__()
        if feature not in FEATURES:
            raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")
        self.backbone = backbone
        self.head = head
        self.masked_attention = masked_attention and feature == "obj"
        self.feature = feature

    def forward(
        self,
        images: torch.Tensor,
        obj_patch_mask: torch.Tensor,
        mim_mask: torch.Tensor | None = None,
        with_patches: bool = True,
        with_object_feature: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """images (B, 3, H, W), obj_patch_mask (B, N) bool, mim_mask (B, N) bool or None.

        Returns object logits (B, K), patch logits (B, N, K) if `with_patches` else None,
        and, if `with_object_feature`, the backbone's object feature (B, D) the head read.
        The head runs once over all tokens (shared head).
        A read-out backbone also takes obj_patch_mask (B, S, N): S objects per image, one
        [OBJ] token each (issue 19); the object logits are then (B, S, K).
        """
        if obj_patch_mask.ndim == 3:
            return self._several_objects(
                images, obj_patch_mask, mim_mask, with_patches, with_object_feature
            )
        object_token, patch_tokens = self.encode(images, obj_patch_mask, mim_mask)
        logits = self.project(object_token, patch_tokens, with_patches)
        return (*logits, object_token.squeeze(1)) if with_object_feature else logits

    def encode(
        self,
        images: torch.Tensor,
        obj_patch_mask: torch.Tensor,
        mim_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The backbone's object feature (B, 1, D) and patch tokens (B, N, D)."""
        attention_mask = obj_patch_mask if self.masked_attention else None
        tokens = self.backbone(images, obj_patch_mask=attention_mask, mim_mask=mim_mask)
        if self.feature == "meanpool":
            return meanpool_object(tokens[:, 1:], obj_patch_mask).unsqueeze(1), tokens[:, 1:]
        return tokens[:, :1], tokens[:, 1:]

    def project(
        self, object_token: torch.Tensor, patch_tokens: torch.Tensor, with_patches: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Head logits of `encode`'s output: object (B, K) and, if asked, patches (B, N, K)."""
        if not with_patches:
            return self.head(object_token).squeeze(1), None
        logits = self.head(torch.cat([object_token, patch_tokens], dim=1))
        return logits[:, 0], logits[:, 1:]

    def _several_objects(
        self,
        images: torch.Tensor,
        obj_patch_masks: torch.Tensor,
        mim_mask: torch.Tensor | None,
        with_patches: bool,
        with_object_feature: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """(B, S, N) object masks -> [OBJ] logits (B, S, K), patch logits (B, N, K) (None
        without `with_patches`) and, if asked, the target's (slot 0) [OBJ] feature (B, D)."""
        if not (self.backbone.obj_readout and self.masked_attention):
            raise ValueError("several objects per image need read-out [OBJ] tokens with "
                             "masked attention and the [OBJ] feature")
        n_objects = obj_patch_masks.shape[1]
        tokens = self.backbone(images, obj_patch_mask=obj_patch_masks, mim_mask=mim_mask)
        if not with_patches:
            logits = (self.head(tokens[:, :n_objects]), None)
        else:
            all_logits = self.head(tokens)
            logits = (all_logits[:, :n_objects], all_logits[:, n_objects:])
        return (*logits, tokens[:, 0]) if with_object_feature else logits


class MultiCropStudent(nn.Module):
    """The student's whole step in one `forward`: masked global crops with patch logits,
    then local crops with [OBJ] logits only. One call per step is what DDP expects (its
    gradient hooks are armed once per forward); the network's own keys stay unprefixed
    because checkpoints save `network`, not this wrapper."""

    def __init__(self, network: DistillationNetwork) -> None:
        super().__init__()
        self.network = network

    def forward(
        self,
        global_crops: torch.Tensor,
        global_patch_masks: torch.Tensor,
        mim_masks: torch.Tensor,
        local_crops: torch.Tensor | None,
        local_patch_masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Returns global [OBJ] logits (G*B, K), patch logits (G*B, N, K), local [OBJ]
        logits (L*B, K) or None, and the global crops' backbone object features (G*B, D)
        (what the KoLeo regulariser spreads; free: the head's input). With (., S, N)
        object masks (several objects per image) the [OBJ] logits are (G*B, S, K) and
        (L*B, S, K), and the features are the target's (slot 0)."""
        obj, patch, features = self.network(
            global_crops, global_patch_masks, mim_mask=mim_masks, with_object_feature=True
        )
        local_obj = None
        if local_crops is not None:
            local_obj, _ = self.network(local_crops, local_patch_masks, with_patches=False)
        assert patch is not None
        return obj, patch, local_obj, features
