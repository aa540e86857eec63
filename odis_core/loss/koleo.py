"""KoLeo regulariser (DINOv2, Sablayrolles et al. 2019's Kozachenko-Leonenko estimator).

Self-distillation on small data first collapses the features onto a few directions
(issue 17: the participation ratio of the [OBJ] features falls from 5.2 to 2.4 within 200
steps while k-NN falls). KoLeo spreads a batch over the sphere: each L2-normalised feature
is pushed away from its nearest neighbour in the batch, by -mean(log(distance to it)).
DINOv2 applies it to the student's [CLS] backbone features of each global crop separately,
with weight 0.1; `odis pretrain --koleo-weight` does the same for the [OBJ] feature
(0 = off, iBOT and the paper).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Guards log(0) when two features coincide; small enough not to change any other value.
EPS = 1e-8


def koleo_loss(features: Tensor) -> Tensor:
    """(B, D) features, B >= 2 -> scalar: -mean over the batch of log(the L2 distance from
    each normalised feature to its nearest other one)."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"koleo_loss needs (B >= 2, D) features, got {tuple(features.shape)}")
    unit = F.normalize(features.float(), dim=-1, eps=EPS)
    with torch.no_grad():
        # Nearest neighbour by cosine similarity (the same as by distance on the sphere);
        # the choice is not differentiated, the distance to it is.
        similarity = unit @ unit.T
        similarity.fill_diagonal_(-2.0)
        nearest = similarity.argmax(dim=1)
    distance = (unit - unit[nearest] + EPS).norm(dim=-1)
    return -torch.log(distance + EPS).mean()


def koleo_per_crop(features: Tensor, n_crops: int) -> Tensor:
    """Crop-major (n_crops * B, D) features -> the sum over crops of each crop's KoLeo
    (neighbours are searched within one crop's batch, as DINOv2 does)."""
    return sum(koleo_loss(chunk) for chunk in features.chunk(n_crops))
