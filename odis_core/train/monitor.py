"""The online k-NN monitor: how well the current teacher's object features classify
held-out objects, measured while a run trains (`odis pretrain --eval-masks --eval-every`).

The split is by image, never by object: objects of one image share its background and
lighting, and a query whose neighbour comes from its own image would flatter the score.
The evaluation store's images that have objects are shuffled with `seed`; taken in that
order while their objects add up to at most `max_objects` (at least two images), the first
QUERY_FRACTION of them (at least one) hold the queries and the rest the bank. The same
(store, seed, max_objects) always give the same split, whatever the run.

Each evaluation embeds bank and queries with the backbone it is given, by masked inference
(the code of `odis embed`, `embed/inference.py`) at the run's global crop size, batched, in
eval mode and without gradients, and runs the weighted k-NN of `evaluate/knn.py` (k = 20,
T = 0.07). The images are decoded, resized and their object masks patchified once, when the
monitor is built, so an evaluation costs the forward passes and the search only. It draws
nothing from the global RNG: an exact resume is not disturbed by it.

`effective_rank` is the participation ratio (sum λ)^2 / sum λ^2 of the eigenvalues of the
covariance of the L2-normalised bank features (the k-NN's own geometry): d for features
spread evenly over d dimensions, 1 when they all lie on one line. It falls when features
collapse onto few dimensions, often before the k-NN accuracy shows it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from odis_core.embed.inference import batch_features, object_batches
from odis_core.evaluate.knn import DEFAULT_TEMPERATURE, weighted_knn
from odis_core.evaluate.search import l2_normalize
from odis_core.masks.store import UNKNOWN_CATEGORY, ImageRecord, MaskStore
from odis_core.model.obj_vit import ObjViT

QUERY_FRACTION = 0.25  # of the selected images; the other 75 % form the bank
DEFAULT_MAX_OBJECTS = 1000
DEFAULT_K = 20


def participation_ratio(features: np.ndarray) -> float:
    """(sum λ)^2 / sum λ^2 over the eigenvalues λ of the covariance of `features` (N, D),
    as trace(C)^2 / ||C||_F^2 (no eigendecomposition). 0.0 for constant features."""
    x = np.asarray(features, dtype=np.float64)
    x = x - x.mean(axis=0)
    # C = X^T X / n and the Gram matrix X X^T / n have the same non-zero eigenvalues.
    gram = x.T @ x if x.shape[1] <= x.shape[0] else x @ x.T
    frobenius = float(np.square(gram).sum())
    return float(np.trace(gram) ** 2 / frobenius) if frobenius > 0 else 0.0


@dataclass
class _Side:
    """One side of the split, decoded once: collated batches and the objects' labels."""

    records: list[ImageRecord]
    batches: list[dict[str, Any]]
    labels: np.ndarray


class KnnMonitor:
    """Weighted k-NN of an evaluation store's objects, split by image into bank and queries.

    store / images_root: the evaluation mask store and the folder its file names are
    relative to. global_size / patch_size: the run's input size and patch size. seed and
    max_objects fix the split (see the module docstring); k and temperature the vote.
    """

    def __init__(
        self,
        store: MaskStore,
        images_root: Path | str,
        global_size: int,
        patch_size: int,
        seed: int = 0,
        max_objects: int = DEFAULT_MAX_OBJECTS,
        k: int = DEFAULT_K,
        temperature: float = DEFAULT_TEMPERATURE,
        batch_size: int = 64,
    ) -> None:
        if k < 1:
            raise ValueError(f"eval k={k}: must be >= 1")
        if max_objects < 2:
            raise ValueError(f"eval max_objects={max_objects}: must be >= 2")
        self.store, self.images_root = store, Path(images_root)
        self.global_size, self.patch_size = global_size, patch_size
        self.seed, self.max_objects = seed, max_objects
        self.k, self.temperature = k, temperature
        started = time.perf_counter()
        bank_records, query_records = self._split()
        self.skipped: list[str] = []
        self.bank = self._preload(bank_records, batch_size)
        self.queries = self._preload(query_records, batch_size)
        for side in ("bank", "queries"):
            if not (getattr(self, side).labels != UNKNOWN_CATEGORY).any():
                raise ValueError(f"{store.path}: the evaluation {side} have no labelled object "
                                 "(k-NN needs category ids)")
        self.preload_seconds = time.perf_counter() - started

    def _split(self) -> tuple[list[ImageRecord], list[ImageRecord]]:
        counts = self.store.object_counts()
        candidates = np.flatnonzero(counts > 0)
        if len(candidates) < 2:
            raise ValueError(f"{self.store.path}: the evaluation store needs at least two "
                             f"images with objects, it has {len(candidates)}")
        order = candidates[np.random.default_rng(self.seed).permutation(len(candidates))]
        total = np.cumsum(counts[order])
        n_images = max(2, int(np.searchsorted(total, self.max_objects, side="right")))
        chosen = [self.store.images[int(i)] for i in order[:n_images]]
        n_query = max(1, round(QUERY_FRACTION * n_images))
        return chosen[n_query:], chosen[:n_query]

    def _preload(self, records: list[ImageRecord], batch_size: int) -> _Side:
        batches, labels = [], []
        for batch in object_batches(self.images_root, records, self.store, self.global_size,
                                    self.patch_size, batch_size):
            self.skipped += batch["skipped"]
            if batch["masks"] is None:
                continue
            labels += [row["category_id"] for row in batch["rows"]]
            batches.append({key: batch[key] for key in ("images", "owner", "masks")})
        if not batches:
            raise ValueError(f"{self.images_root}: none of the evaluation images could be read "
                             f"({'; '.join(self.skipped[:2])})")
        return _Side(records, batches, np.asarray(labels, dtype=np.int64))

    def split(self) -> dict[str, Any]:
        """The split, for RUN_DIR/eval_split.json: image file names of either side."""
        return {
            "store": str(self.store.path), "seed": self.seed, "max_objects": self.max_objects,
            "query_fraction": QUERY_FRACTION,
            "bank_images": [r.file_name for r in self.bank.records],
            "query_images": [r.file_name for r in self.queries.records],
            "n_bank": len(self.bank.labels), "n_query": len(self.queries.labels),
            "skipped": self.skipped,
        }

    @torch.no_grad()
    def features(self, backbone: ObjViT) -> tuple[np.ndarray, np.ndarray]:
        """(bank, query) masked-inference features of `backbone` (left in its mode)."""
        device = str(next(backbone.parameters()).device)
        was_training = backbone.training
        backbone.eval()
        try:
            sides = []
            for side in (self.bank, self.queries):
                parts = [
                    batch_features(backbone, batch["images"].to(device, non_blocking=True),
                                   batch["owner"], batch["masks"], "object", "masked", device)
                    for batch in side.batches
                ]
                sides.append(torch.cat(parts).cpu().numpy())
        finally:
            backbone.train(was_training)
        return sides[0], sides[1]

    def evaluate(self, backbone: ObjViT) -> dict[str, float]:
        """{"knn_top1", "knn_top5" (percent), "effective_rank", "eval_seconds"} of `backbone`."""
        started = time.perf_counter()
        bank, queries = self.features(backbone)
        result = weighted_knn(bank, self.bank.labels, queries, self.queries.labels,
                              ks=[self.k], temperature=self.temperature)
        scores = result.results[self.k]
        return {
            "knn_top1": scores["top1"],
            "knn_top5": scores["top5"],
            "effective_rank": participation_ratio(l2_normalize(bank)),
            "eval_seconds": time.perf_counter() - started,
        }
