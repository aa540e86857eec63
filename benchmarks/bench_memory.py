"""Peak memory of one ODIS training step per batch size (does a model fit on one GPU?).

    python benchmarks/bench_memory.py --arch vit_large --batch-sizes 64 --grad-checkpointing
    python benchmarks/bench_memory.py --arch vit_large --batch-sizes 1,2 --grad-checkpointing \
        --device cpu --extrapolate 64                  # CPU: a slope from two small batches

Each batch size runs in a fresh process (`Trainer.train_step` on random tensors of iBOT's
multi-crop shapes, as in bench_pretrain.py): two steps, so the optimizer's moments exist.
On CUDA the figure is `torch.cuda.max_memory_allocated` (bf16 autocast, as in training);
on the CPU it is the process's peak resident memory in float32, an upper bound for the
GPU's bf16 activations. `--extrapolate B` fits memory = fixed + per-image x batch through
the two smallest measured batch sizes and prints the value at batch B.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pretrain import random_batch  # noqa: E402

from odis_core.train.config import PretrainConfig  # noqa: E402
from odis_core.train.loop import Trainer  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 130)


def measure(config: PretrainConfig, device: str, queue: multiprocessing.Queue) -> None:
    torch.manual_seed(0)
    trainer = Trainer(config.resolved(), iters_per_epoch=100, device=device)
    batch = random_batch(config, device)
    started = time.perf_counter()
    for _ in range(2):
        trainer.train_step(batch)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    queue.put((peak, (time.perf_counter() - started) / 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_large")
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--batch-sizes", default="64", help="comma-separated")
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--n-local-crops", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--out-dim", type=int, default=8192)
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--extrapolate", type=int, default=None, help="batch to extrapolate to")
    args = parser.parse_args()
    sizes = sorted(int(size) for size in args.batch_sizes.split(","))
    context = multiprocessing.get_context("spawn")  # a fresh process: its own peak
    rows = []
    for batch_size in sizes:
        config = PretrainConfig(
            arch=args.arch,
            depth=args.depth,
            batch_size=batch_size,
            global_size=args.global_size,
            local_size=args.local_size,
            patch_size=args.patch_size,
            min_patches_per_block=min(16, (args.global_size // args.patch_size) ** 2 // 4),
            n_local_crops=args.n_local_crops,
            out_dim=args.out_dim,
            head_hidden_dim=min(2048, 4 * args.out_dim),
            grad_checkpointing=args.grad_checkpointing,
            warmup_epochs=0,
            epochs=1,
            device=args.device,
        )
        queue = context.Queue()
        process = context.Process(target=measure, args=(config, args.device, queue))
        process.start()
        peak, seconds = queue.get()
        process.join()
        rows.append((batch_size, peak, seconds))

    what = "max_memory_allocated, bf16" if args.device.startswith("cuda") else "peak RSS, fp32"
    table = Table(
        title=f"one ODIS step, {args.arch}, 2x{args.global_size} + {args.n_local_crops}x"
        f"{args.local_size}, out_dim "
        f"{args.out_dim}{', grad checkpointing' if args.grad_checkpointing else ''}, "
        f"{torch.cuda.get_device_name() if args.device.startswith('cuda') else 'CPU'}"
    )
    for column in ("batch", f"peak GiB ({what})", "s / step"):
        table.add_column(column, justify="right")
    for batch_size, peak, seconds in rows:
        table.add_row(str(batch_size), f"{peak:.2f}", f"{seconds:.1f}")
    console.print(table)
    report = {"args": vars(args) | {"json": str(args.json)}, "rows": rows}
    if args.extrapolate is not None and len(rows) >= 2:
        (b0, m0, _), (b1, m1, _) = rows[0], rows[1]
        per_image = (m1 - m0) / (b1 - b0)
        fixed = m0 - per_image * b0
        report["extrapolated_gib"] = fixed + per_image * args.extrapolate
        console.print(
            f"fixed {fixed:.2f} GiB + {per_image:.3f} GiB per image -> batch "
            f"{args.extrapolate}: {report['extrapolated_gib']:.1f} GiB",
            highlight=False,
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
