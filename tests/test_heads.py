"""iBOT projection head (spec §4)."""

import torch

from odis_core.model.heads import IBOTHead


def test_shapes_and_frozen_gain_when_norm_last_layer():
    head = IBOTHead(16, out_dim=32, hidden_dim=24, bottleneck_dim=8, norm_last_layer=True)
    assert head(torch.randn(5, 7, 16)).shape == (5, 7, 32)
    gain = head.last_layer.parametrizations.weight.original0
    assert not gain.requires_grad and torch.all(gain == 1)
    trainable = IBOTHead(16, out_dim=32, hidden_dim=24, bottleneck_dim=8, norm_last_layer=False)
    assert trainable.last_layer.parametrizations.weight.original0.requires_grad


def test_logits_depend_only_on_direction_of_bottleneck():
    # The bottleneck is L2-normalised, so every logit is bounded by the row norms of the
    # weight-normalised last layer (gain 1): |logit| <= 1.
    head = IBOTHead(16, out_dim=32, hidden_dim=24, bottleneck_dim=8, norm_last_layer=True)
    logits = head(100 * torch.randn(50, 16))
    assert logits.abs().max() <= 1.0 + 1e-5
