"""Evaluation of learned features: weighted k-NN (spec §7)."""

from odis_core.evaluate.knn import (
    DEFAULT_KS,
    DEFAULT_TEMPERATURE,
    KnnResult,
    knn_search,
    l2_normalize,
    weighted_knn,
)

__all__ = [
    "DEFAULT_KS",
    "DEFAULT_TEMPERATURE",
    "KnnResult",
    "knn_search",
    "l2_normalize",
    "weighted_knn",
]
