"""`odis knn`: weighted k-NN evaluation (DINO protocol) with FAISS or torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from odis_cli.ui import cli_errors, console, error_console


def knn_table(title: str, columns: dict[str, dict]) -> Table:
    """columns: name -> KnnResult.to_json(); one row per k, top-1/top-5 per column.
    Each line of `title` stays whole: rich wraps a title to the table's width, which split
    the one-column table's title after a comma; the table is made as wide as its title."""
    widest_line = max(len(line) for line in title.splitlines())
    table = Table(title=title, min_width=widest_line + 4)
    table.add_column("k", justify="right")
    for name in columns:
        # Two header lines keep a two-network table inside 80 columns.
        prefix = f"{name}\n" if len(columns) > 1 else ""
        table.add_column(f"{prefix}top-1", justify="right")
        table.add_column(f"{prefix}top-5", justify="right")
    ks = next(iter(columns.values()))["results"].keys()
    for k in ks:
        cells = []
        for report in columns.values():
            result = report["results"][k]
            cells += [f"{result['top1']:.1f}", f"{result['top5']:.1f}"]
        table.add_row(str(k), *cells)
    return table


def _category_names(*feature_sets) -> dict[int, str]:
    names: dict[int, str] = {}
    for features in feature_sets:
        for row in features.meta:
            label, name = row.get("category_id"), row.get("category")
            if isinstance(label, int) and label >= 0 and name:
                names.setdefault(label, str(name))
    return names


def knn(
    train: Annotated[Path, typer.Option(help="Feature directory of the training bank.")],
    test: Annotated[Path, typer.Option(help="Feature directory of the queries.")],
    k: Annotated[str, typer.Option(help="Comma-separated neighbour counts.")] = "10,20,100,200",
    temperature: Annotated[float, typer.Option(help="Vote weight exp(sim / T).")] = 0.07,
    json_out: Annotated[
        Path | None,
        typer.Option("--json", help="Write the report here.", show_default="not written"),
    ] = None,
    backend: Annotated[
        str, typer.Option(help="auto (FAISS GPU, else torch GPU, else FAISS CPU), faiss or "
                          "torch (exact matmul + top-k).")
    ] = "auto",
    device: Annotated[
        str | None,
        typer.Option(help="Device of the torch backend.", show_default="cuda if seen, else cpu")
    ] = None,
    ivf: Annotated[
        int | None, typer.Option(help="Approximate search: a FAISS IVF index with this many "
                                 "cells (for banks past GPU memory); recall@k is reported.",
                                 show_default="exact search")
    ] = None,
    nprobe: Annotated[int, typer.Option(help="IVF cells visited per query.")] = 16,
    chunk_size: Annotated[int, typer.Option(help="Queries per search call (bounds memory).")]
    = 4096,
    confusion: Annotated[
        Path | None,
        typer.Option(help="Write the confusion matrix (top-1) as a PNG here.",
                     show_default="not drawn")
    ] = None,
    confusion_k: Annotated[
        int | None,
        typer.Option(help="k of the confusion matrix.",
                     show_default="20 if given, else the first k"),
    ] = None,
    allow_mismatch: Annotated[
        bool, typer.Option(help="Compare features of different backbones or levels anyway.")
    ] = False,
) -> None:
    """Top-1 and top-5 accuracy of a temperature-weighted k-NN vote."""
    from odis_cli.checks import check_at_least, check_device
    from odis_core.embed.features import check_same_embedding, read_features
    from odis_core.evaluate.knn import weighted_knn
    from odis_core.evaluate.search import IvfSettings

    with cli_errors():
        try:
            ks = tuple(int(value) for value in k.split(",") if value.strip())
        except ValueError:
            raise ValueError(f"--k {k!r}: expected comma-separated integers") from None
        check_at_least("--temperature", temperature, 1e-12)
        check_at_least("--nprobe", nprobe, 1)
        check_at_least("--chunk-size", chunk_size, 1)
        check_at_least("--ivf", ivf, 1)
        if any(value < 1 for value in ks) or not ks:
            raise ValueError(f"--k {k!r}: neighbour counts must be >= 1")
        if backend not in ("auto", "faiss", "torch"):
            raise ValueError(f"--backend {backend}: use auto, faiss or torch")
        device = None if device == "auto" else device
        check_device(device)
        bank, queries = read_features(train), read_features(test)
        if not allow_mismatch:
            check_same_embedding(bank, queries, train, test)
        if ivf is not None:
            _warn_sparse_ivf(ivf, nprobe, len(bank.features), max(ks))
        result = weighted_knn(
            bank.features, bank.labels, queries.features, queries.labels, ks=ks,
            temperature=temperature, chunk_size=chunk_size, backend=backend, device=device,
            ivf=IvfSettings(ivf, nprobe) if ivf is not None else None, confusion_k=confusion_k,
        )
        names = _category_names(bank, queries)
        report = result.to_json()
        report["category_names"] = {str(label): names.get(int(label), str(label))
                                    for label in result.class_labels}
        report["train"] = {"path": str(train), **{key: bank.info.get(key) for key in
                                                  ("backbone", "level", "mode", "weights")}}
        report["test"] = {"path": str(test), **{key: queries.info.get(key) for key in
                                                ("backbone", "level", "mode", "weights")}}
    title = (f"weighted k-NN, T={temperature}\n"
             f"{report['n_train']} train / {report['n_test']} test, {report['backend']}")
    console.print(knn_table(title, {"": report}))
    clamped = {key: used for key, used in result.effective_k.items() if used != key}
    if clamped:
        console.print(f"k clamped to the {result.n_train} training items: "
                      + ", ".join(f"{key} -> {used}" for key, used in clamped.items()),
                      highlight=False)
    if result.ivf is not None:
        recall = ", ".join(f"k={key}: {value:.3f}" for key, value
                           in result.ivf["recall_at_k"].items())
        console.print(f"IVF recall@k vs exact ({result.ivf['recall_queries']} queries): "
                      f"{recall}", highlight=False)
    # Written after the table is shown: a path that cannot be written loses nothing.
    with cli_errors():
        if json_out is not None:
            from odis_core.atomic import atomic_write

            try:
                with atomic_write(json_out, "w", encoding="utf-8") as handle:
                    handle.write(json.dumps(report, indent=2) + "\n")
            except OSError as error:
                raise ValueError(
                    f"--json {json_out}: cannot write ({error.strerror or error}); "
                    "the result is printed above"
                ) from None
        if confusion is not None:
            from odis_core.evaluate.confusion import save_confusion_png

            save_confusion_png(
                result.confusion, [names.get(int(c), str(c)) for c in result.class_labels],
                confusion, title=f"k-NN top-1 (k={result.confusion_k}, T={temperature})",
            )


def _warn_sparse_ivf(n_cells: int, nprobe: int, n_bank: int, k_max: int) -> None:
    """FAISS k-means wants >= 39 training vectors per cell; with fewer, the cells a query
    visits hold fewer vectors than k and the vote silently uses fewer neighbours."""
    if n_cells * 39 <= n_bank:
        return
    cells = min(n_cells, n_bank)
    reachable = max(1, round(min(nprobe, cells) * n_bank / cells))
    error_console.print(
        f"[yellow]warning:[/yellow] --ivf {n_cells}: more cells than {n_bank} bank vectors / "
        f"39 = {n_bank // 39}; a query visits about {reachable} vectors (--nprobe {nprobe})"
        + (f", fewer than k = {k_max}: the effective k is about {reachable}"
           if reachable < k_max else "")
        + " (see recall@k below)",
        highlight=False, soft_wrap=True,
    )
