"""`odis masks coco|sam` on bad input, end to end: one line naming the file, exit 1."""

import json

import pytest
from bad_inputs import bad_annotation_cases
from typer.testing import CliRunner

from odis_cli.app import app

CASES = {name: (content, words) for name, content, words in bad_annotation_cases()}


@pytest.mark.parametrize("case", ["malformed_json", "parent_path", "negative_box"])
def test_a_bad_annotation_file_stops_masks_coco_with_one_line(tmp_path, bad_image_corpus, case):
    content, words = CASES[case]
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    result = CliRunner().invoke(
        app,
        [
            "masks",
            "coco",
            "--images",
            str(bad_image_corpus.root),
            "--annotations",
            str(path),
            "--out",
            str(tmp_path / "store"),
        ],
    )
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0] and "bad.json" in lines[0], result.output
    assert not (tmp_path / "store").exists()


def test_shard_auto_reads_torchrun_and_slurm_variables(monkeypatch):
    import typer

    from odis_cli.masks import _parse_shard

    for name in (
        "RANK",
        "WORLD_SIZE",
        "SLURM_ARRAY_TASK_ID",
        "SLURM_ARRAY_TASK_COUNT",
        "SLURM_ARRAY_TASK_MIN",
    ):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(typer.Exit):
        _parse_shard("auto")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert _parse_shard("auto") == (2, 4)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _parse_shard("auto") == (1, 2)  # torchrun first
    assert _parse_shard("0/3") == (0, 3)
