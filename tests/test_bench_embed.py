"""The embedding benchmark runs on the CPU at a tiny size, JPEGs decoded either way."""

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
