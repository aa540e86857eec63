"""iBOT's projection head (spec §4, §10).

A 3-layer MLP (hidden 2048, GELU) to a 256-d bottleneck, L2 normalisation, then a
weight-normalised linear layer to `out_dim` prototypes. With `norm_last_layer` the
weight-norm gain is frozen at 1 (iBOT's code default); the published ViT-S/16 run leaves
it trainable. One head serves the [OBJ] token and the patch tokens ("shared head").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class IBOTHead(nn.Module):
    def __init__(
        self,
        in_dim: int,
        out_dim: int = 8192,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        n_layers: int = 3,
        norm_last_layer: bool = False,
    ) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for index, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            layers.append(nn.Linear(d_in, d_out))
            if index < n_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.apply(_init_linear)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0
        gain.data.fill_(1.0)
        gain.requires_grad = not norm_last_layer

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (..., in_dim) -> (..., out_dim) logits (before temperature)."""
        bottleneck = F.normalize(self.mlp(tokens), dim=-1, p=2)
        return self.last_layer(bottleneck)


def _init_linear(module: nn.Module) -> None:
    # iBOT/DINO initialise head MLPs with a truncated normal (std 0.02) and zero biases.
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
