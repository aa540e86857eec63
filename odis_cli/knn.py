"""`odis knn`: weighted k-NN evaluation (DINO protocol) with FAISS."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from odis_cli.ui import cli_errors, console


def knn_table(title: str, columns: dict[str, dict]) -> Table:
    """columns: name -> KnnResult.to_json(); one row per k, top-1/top-5 per column."""
    table = Table(title=title)
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


def knn(
    train: Annotated[Path, typer.Option(help="Feature directory of the training bank.")],
    test: Annotated[Path, typer.Option(help="Feature directory of the queries.")],
    k: Annotated[str, typer.Option(help="Comma-separated neighbour counts.")] = "10,20,100,200",
    temperature: Annotated[float, typer.Option(help="Vote weight exp(sim / T).")] = 0.07,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report here.")]
    = None,
) -> None:
    """Top-1 and top-5 accuracy of a temperature-weighted k-NN vote."""
    from odis_core.embed.features import read_features
    from odis_core.evaluate.knn import weighted_knn

    with cli_errors():
        try:
            ks = tuple(int(value) for value in k.split(",") if value.strip())
        except ValueError:
            raise ValueError(f"--k {k!r}: expected comma-separated integers") from None
        bank, queries = read_features(train), read_features(test)
        result = weighted_knn(bank.features, bank.labels, queries.features, queries.labels,
                              ks=ks, temperature=temperature)
        report = result.to_json()
        if json_out is not None:
            json_out.write_text(json.dumps(report, indent=2) + "\n")
    title = (f"weighted k-NN (T={temperature}): {report['n_train']} train, "
             f"{report['n_test']} test")
    console.print(knn_table(title, {"": report}))
