"""k-NN wall time and peak memory per search backend, and agreement of FAISS with torch.

Random features stand in for a real bank: one Gaussian cluster per class (class means
plus noise of `--spread` times their scale), so an IVF index meets the cluster structure
real features have; the exact search cost depends only on the sizes. Each backend runs
in a fresh process, so its peak resident memory (ru_maxrss, which includes the bank
itself) is its own.

    python3 benchmarks/bench_knn.py --bank 100000 --queries 5000            # CPU, reduced
    python3 benchmarks/bench_knn.py --bank 1281167 --queries 50000 --backends auto,torch
    python3 benchmarks/bench_knn.py --quick                                 # seconds

The full ImageNet problem (1,281,167 x 768 bank, 50,000 queries) is the GPU goal (< 60 s).
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import time

import numpy as np
from rich.console import Console
from rich.table import Table


def random_problem(n_bank, n_queries, dim, n_classes, dtype, spread=1.0, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((n_classes, dim), dtype=np.float32)
    bank_labels = rng.integers(n_classes, size=n_bank)
    query_labels = rng.integers(n_classes, size=n_queries)

    def sample(labels):
        out = np.empty((len(labels), dim), dtype=dtype)
        for start in range(0, len(labels), 65536):  # by blocks: no float64 copy of the bank
            rows = labels[start : start + 65536]
            noise = rng.standard_normal((len(rows), dim), dtype=np.float32)
            out[start : start + len(rows)] = means[rows] + spread * noise
        return out

    return sample(bank_labels), bank_labels, sample(query_labels), query_labels


def run_backend(args: dict, backend: str) -> dict:
    """Builds the random problem of `args` and times `weighted_knn` with `backend` (auto,
    faiss, torch or ivf) in this process: wall seconds, peak memory, top-1, IVF recall."""
    import torch

    from odis_core.evaluate.knn import weighted_knn
    from odis_core.evaluate.search import IvfSettings

    bank, bank_labels, queries, query_labels = random_problem(
        args["bank"], args["queries"], args["dim"], args["classes"], args["dtype"], args["spread"]
    )
    ivf = IvfSettings(args["ivf"], args["nprobe"]) if backend == "ivf" else None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = weighted_knn(
        bank,
        bank_labels,
        queries,
        query_labels,
        ks=args["ks"],
        chunk_size=args["chunk_size"],
        backend="auto" if backend == "ivf" else backend,
        ivf=ivf,
    )
    seconds = time.perf_counter() - start
    gpu_peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    recall = result.ivf["recall_at_k"] if result.ivf else None
    return {
        "backend": result.backend,
        "seconds": seconds,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "gpu_peak_gib": gpu_peak,
        "recall": recall,
        "top1_k20": result.results.get(20, {}).get("top1"),
    }


def _run_backend(args: dict, backend: str, queue) -> None:
    queue.put(run_backend(args, backend))


def measure(args: dict, backend: str) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_run_backend, args=(args, backend, queue))
    process.start()
    row = queue.get()
    process.join()
    return row


def agreement(n_bank: int, n_queries: int, dim: int, k: int, device: str = "cpu") -> dict:
    """FAISS exact (CPU) vs torch matmul + top-k on `device` on one problem: same
    neighbours?"""
    from odis_core.evaluate.search import FaissCpuSearch, TorchSearch, l2_normalize

    bank, _, queries, _ = random_problem(n_bank, n_queries, dim, 10, np.float32, seed=1)
    bank, queries = l2_normalize(bank), l2_normalize(queries)
    faiss_sim, faiss_idx = FaissCpuSearch(bank).search(queries, k)
    torch_sim, torch_idx = TorchSearch(bank, device).search(queries, k)
    differ = faiss_idx != torch_idx
    # A differing index where both similarity lists hold the same value is a tie order.
    return {
        "same_indices": float((~differ).mean()),
        "n_differ": int(differ.sum()),
        "n_differ_tied": int((differ & (faiss_sim == torch_sim)).sum()),
        "max_abs_sim_diff": float(np.abs(faiss_sim - torch_sim).max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=5_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--k", default="10,20,100,200")
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument(
        "--spread", type=float, default=1.0, help="within-class noise relative to the class means"
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "float16"),
        default="float32",
        help="dtype of the bank as read from features.npy",
    )
    parser.add_argument(
        "--backends", default="faiss,torch", help="comma-separated: auto, faiss, torch, ivf"
    )
    parser.add_argument("--ivf", type=int, default=1024, help="IVF cells (backend ivf)")
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--agree-bank", type=int, default=20_000)
    parser.add_argument("--agree-queries", type=int, default=1_000)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    options = parser.parse_args()
    if options.quick:
        options.bank, options.queries, options.dim = 5_000, 500, 128
        options.agree_bank, options.agree_queries, options.ivf = 2_000, 200, 32
    args = {
        "bank": options.bank,
        "queries": options.queries,
        "dim": options.dim,
        "classes": options.classes,
        "ks": tuple(int(k) for k in options.k.split(",")),
        "chunk_size": options.chunk_size,
        "dtype": np.dtype(options.dtype),
        "ivf": options.ivf,
        "nprobe": options.nprobe,
        "spread": options.spread,
    }

    console = Console(width=160)
    table = Table(
        title=f"weighted k-NN: bank {options.bank:,} x {options.dim} "
        f"({options.dtype}), {options.queries:,} queries, k = {options.k}"
    )
    for column in (
        "backend",
        "wall s",
        "queries/s",
        "peak RSS GiB",
        "peak GPU GiB",
        "top-1 k=20",
        f"IVF recall@{options.k.replace(',', '/')}",
    ):
        table.add_column(column, justify="right")
    for backend in options.backends.split(","):
        row = measure(args, backend.strip())
        recall = (
            " / ".join(f"{v:.3f}" for v in row["recall"].values()) if row["recall"] else "exact"
        )
        top1 = f"{row['top1_k20']:.1f}" if row["top1_k20"] is not None else "-"
        gpu = f"{row['gpu_peak_gib']:.2f}" if row["gpu_peak_gib"] is not None else "-"
        table.add_row(
            row["backend"],
            f"{row['seconds']:.2f}",
            f"{options.queries / row['seconds']:,.0f}",
            f"{row['peak_rss_gib']:.2f}",
            gpu,
            top1,
            recall,
        )
    console.print(table)
    agree = agreement(options.agree_bank, options.agree_queries, options.dim, 200)
    console.print(
        f"agreement, FAISS vs torch matmul+top-k ({options.agree_bank:,} x "
        f"{options.dim} bank, {options.agree_queries:,} queries, k = 200): "
        f"{agree['same_indices'] * 100:.3f} % identical neighbour indices "
        f"({agree['n_differ']} differ, {agree['n_differ_tied']} of them at equal "
        f"similarity: tie order), max |similarity difference| "
        f"{agree['max_abs_sim_diff']:.2e}"
    )


if __name__ == "__main__":
    main()
