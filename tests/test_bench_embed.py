"""The embedding benchmark runs on the CPU at a tiny size, JPEGs decoded either way, and
compares one pass per image with one per object (issue 19)."""

import runpy
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_embed.py"


@pytest.mark.parametrize("decode_on", ["loader", "device"])
def test_bench_embed_quick_prints_every_column(decode_on, monkeypatch, capsys):
    argv = [
        str(BENCH),
        "--quick",
        "--archs",
        "vit_tiny",
        "--image-size",
        "64",
        "--decode-on",
        decode_on,
    ]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(BENCH), run_name="__main__")
    output = capsys.readouterr().out
    assert f"JPEGs decoded on the {decode_on}" in output
    row = next(line for line in output.splitlines() if "vit_tiny" in line)
    cells = [cell.strip() for cell in row.split("│")[2:-2]]
    assert len(cells) == 7 and all(cells[:4]) and (cells[4] == "nan") == (decode_on == "loader")


def test_bench_embed_one_pass_both_compares_on_two_stores(monkeypatch, capsys):
    argv = [str(BENCH), "--one-pass", "both", "--archs", "vit_tiny", "--image-size", "32",
            "--n-images", "4", "--batch-size", "4", "--masks-per-image", "6", "--repeats", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(BENCH), run_name="__main__")
    rows = [line for line in capsys.readouterr().out.splitlines() if "vit_tiny" in line]
    assert len(rows) == 2 and "demo scenes" in rows[0]
    for row in rows:
        cells = [cell.strip() for cell in row.split("│")[1:-1]]
        assert cells[5].endswith("x") and cells[8].endswith("x")
        assert float(cells[10]) < 1e-4  # one pass gives the per-object features
