"""Nearest-neighbour search over L2-normalised features, for the weighted k-NN.

Exact backends and one measured approximation, one interface (`search(queries, k)`):
- "faiss-cpu" / "faiss-gpu": FAISS exact inner product. On the CPU, `faiss.knn` searches
  the bank in place (an `IndexFlatIP` would hold a second copy: 3.9 GB more for ImageNet
  at ViT-B width); on the GPU the bank is sharded over every visible GPU.
- "torch": exact matmul + top-k in bank blocks, on any torch device. It exists for
  machines where torch sees a GPU but the installed FAISS has no GPU build (no faiss-gpu
  wheel fits a CUDA 13 image); on the CPU it is the same code, which is how it is tested
  equal to FAISS.
- "faiss-ivf": an approximate inverted-file index on the CPU, for banks past GPU memory;
  never the default, and its recall against exact search is measured by the caller.

Memory stays bounded by the query chunk (and, for torch, the bank block), never by a
(queries x bank) similarity matrix.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import faiss
import numpy as np
import torch

BACKENDS = ("auto", "faiss", "torch")
# FAISS GPU k-selection handles at most this many neighbours per query.
FAISS_GPU_MAX_K = 2048
# Similarity entries held at once by the torch backend: 2^26 float32 = 256 MiB.
TORCH_BLOCK_ELEMENTS = 1 << 26


def l2_normalize(x: np.ndarray, block_rows: int = 65536) -> np.ndarray:
    """(N, D) any float -> (N, D) float32 rows of unit L2 norm (all-zero rows stay zero).

    Works block by block so a float16 or memory-mapped bank is converted with one float32
    copy, not three.
    """
    x = np.asarray(x)
    out = np.empty(x.shape, dtype=np.float32)
    for start in range(0, len(x), block_rows):
        block = x[start : start + block_rows].astype(np.float32)
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        # Same guard as torch.nn.functional.normalize (eps 1e-12), which DINO uses.
        out[start : start + block_rows] = block / np.maximum(norms, np.float32(1e-12))
    return out


def faiss_gpu_available() -> bool:
    return hasattr(faiss, "index_cpu_to_all_gpus") and faiss.get_num_gpus() > 0


@dataclass
class IvfSettings:
    """An approximate search: `nlist` k-means cells, `nprobe` of them visited per query."""

    nlist: int
    nprobe: int = 16

    def __post_init__(self) -> None:
        if self.nlist < 1 or self.nprobe < 1:
            raise ValueError(f"IVF nlist={self.nlist}, nprobe={self.nprobe}: both must be >= 1")


class NeighbourSearch:
    """Searches one normalised (N, D) float32 bank; `search` returns the k most similar rows
    per query as (m, k) float32 similarities (decreasing) and (m, k) int64 row indices."""

    name = "base"

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class FaissCpuSearch(NeighbourSearch):
    name = "faiss-cpu"

    def __init__(self, bank: np.ndarray) -> None:
        self.bank = np.ascontiguousarray(bank, dtype=np.float32)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        similarities, indices = faiss.knn(
            np.ascontiguousarray(queries), self.bank, k, metric=faiss.METRIC_INNER_PRODUCT
        )
        return similarities, indices.astype(np.int64, copy=False)


class FaissIndexSearch(NeighbourSearch):
    """A FAISS index: exact (flat) sharded over all GPUs, or approximate IVF on the CPU.

    IVF stays on the CPU on purpose: it is for banks that do not fit in GPU memory, and an
    IVF-flat index holds every vector as well.
    """

    def __init__(self, bank: np.ndarray, ivf: IvfSettings | None, seed: int = 0) -> None:
        dim = bank.shape[1]
        if ivf is None:
            index = faiss.IndexFlatIP(dim)
            index.add(bank)
            options = faiss.GpuMultipleClonerOptions()
            options.shard = True  # each GPU holds 1/n of the bank, not a full replica
            self.index = faiss.index_cpu_to_all_gpus(index, co=options)
            self.name = "faiss-gpu"
            return
        nlist = min(ivf.nlist, len(bank))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        # k-means on a sample: FAISS warns below 39 points per cell and gains little
        # above 256 per cell.
        sample = np.random.default_rng(seed).permutation(len(bank))[: nlist * 256]
        index.train(bank[np.sort(sample)])
        index.add(bank)
        index.nprobe = min(ivf.nprobe, nlist)
        self.index, self.name = index, "faiss-ivf"

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        similarities, indices = self.index.search(np.ascontiguousarray(queries), k)
        return similarities, indices.astype(np.int64, copy=False)


class TorchSearch(NeighbourSearch):
    """Exact search as matmul + top-k on a torch device, bank split into blocks so that a
    query chunk's similarities never exceed `block_elements` entries."""

    name = "torch"

    def __init__(
        self, bank: np.ndarray, device: str = "cpu", block_elements: int = TORCH_BLOCK_ELEMENTS
    ) -> None:
        self.device = torch.device(device)
        self.bank = torch.from_numpy(np.ascontiguousarray(bank, dtype=np.float32)).to(self.device)
        self.block_elements = block_elements
        self.name = f"torch-{self.device.type}"

    @torch.no_grad()
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        # Exact means float32 products: TF32 (which a training script may have switched on
        # with set_float32_matmul_precision) would reorder close neighbours.
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            return self._search(queries, k)
        finally:
            torch.set_float32_matmul_precision(previous)

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        query = torch.from_numpy(np.ascontiguousarray(queries)).to(self.device)
        block_rows = max(k, self.block_elements // max(1, len(query)))
        best_sim = best_idx = None
        for start in range(0, len(self.bank), block_rows):
            block = self.bank[start : start + block_rows]
            similarities = query @ block.T
            top_sim, top_idx = similarities.topk(min(k, len(block)), dim=1)
            top_idx += start
            if best_sim is not None:
                # Running top-k: the merged candidates of this block and the best so far.
                top_sim = torch.cat([best_sim, top_sim], dim=1)
                top_idx = torch.cat([best_idx, top_idx], dim=1)
                top_sim, order = top_sim.topk(k, dim=1)
                top_idx = top_idx.gather(1, order)
            best_sim, best_idx = top_sim, top_idx
        return best_sim.float().cpu().numpy(), best_idx.cpu().numpy().astype(np.int64)


def build_search(
    bank: np.ndarray,
    k: int,
    backend: str = "auto",
    device: str | None = None,
    ivf: IvfSettings | None = None,
) -> NeighbourSearch:
    """A search over `bank` ((N, D) float32, already L2-normalised).

    backend "auto": FAISS on all GPUs when FAISS has GPU support and one is visible; else
    torch on the GPU when torch sees one (no faiss-gpu build); else FAISS on the CPU.
    "faiss": FAISS (GPU if it can, else CPU). "torch": torch on `device` (default: cuda
    when available, else cpu). `ivf` switches FAISS to the approximate IVF index.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if ivf is not None:
        if backend == "torch":
            raise ValueError("the IVF index is a FAISS index: use backend faiss or auto")
        return FaissIndexSearch(bank, ivf)
    faiss_gpu = faiss_gpu_available() and k <= FAISS_GPU_MAX_K
    if backend == "torch" or (backend == "auto" and not faiss_gpu and torch.cuda.is_available()):
        return TorchSearch(bank, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if faiss_gpu:
        return FaissIndexSearch(bank, None)
    return FaissCpuSearch(bank)


def search_chunks(
    searcher: NeighbourSearch, queries: np.ndarray, k: int, chunk_size: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yields (first row, (m, k) similarities, (m, k) bank indices) per chunk of queries."""
    for start in range(0, len(queries), chunk_size):
        similarities, indices = searcher.search(queries[start : start + chunk_size], k)
        yield start, similarities, indices


def recall_at_k(approximate: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each query's exact k neighbours that the approximate search found.

    approximate, exact: (m, k) int64 bank indices (-1 = no neighbour, never a match).
    """
    hits = [len(np.intersect1d(a[a >= 0], e)) for a, e in zip(approximate, exact, strict=True)]
    return float(np.mean(hits)) / exact.shape[1]
